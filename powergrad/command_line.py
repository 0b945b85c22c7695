"""The command line of train.py / eval.py, checked before Hydra starts: one line, nothing written.

Hydra reports a misspelled group option, key or value in several lines with exit status 1
(after a multirun has written its ``multirun.yaml``), and an optional group such as
``experiment`` silently skips an option it cannot find. :func:`check_command_line` composes
every job the command would run, with Hydra's own parser, sweeper and compose API, and raises
:class:`~powergrad.config.ConfigError` with one line naming the override:

- every group option (``experiment=``, ``model=``, ``+sweep=``, ``hydra/launcher=``, ...,
  each value of a sweep) must exist; the message lists the valid names;
- every key must exist in the typed schema (also ``+key=``, which Hydra would add unread) and
  every value must have its type;
- each job that runs in this process (a single run, or a multirun on Hydra's basic launcher)
  passes ``validate`` (``validate_train`` / ``validate_eval``) before the first job starts.

:func:`exit_on_bad_command_line` is what the entry points call: ``error: ...`` and exit 2.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from powergrad.config import ConfigError

__all__ = ["check_command_line", "exit_on_bad_command_line"]

# Hydra's in-process launcher: jobs launched by it run here, one after another.
_BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
_GRAMMAR = "https://hydra.cc/docs/advanced/override_grammar/basic"


def _valid_names(value: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(value, options, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return f"{hint}valid: {', '.join(options)}"


def _check_group_options(overrides: list[Any], loader: Any) -> None:
    """Every value of every group override (sweeps included) names an existing option."""
    for o in overrides:
        group = o.key_or_group
        options = loader.get_group_options(group)
        if not options or o.is_delete():
            continue  # a key (model.name=...), not a group; or a deletion (~group)
        if o.is_sweep_override():
            values = list(o.sweep_string_iterator())
            if not values:  # a glob that matches nothing
                raise ConfigError(f"{o.input_line}: matches no option; valid: {', '.join(options)}")
        else:
            value = o.value()
            values = value if isinstance(value, list) else [value]
        for v in values:
            if v is not None and str(v) not in options:
                raise ConfigError(
                    f"{o.input_line}: {group} has no option {v!r}; {_valid_names(str(v), options)}"
                )


def _hydra_error(e: Exception) -> str:
    """One line from a Hydra composition error (the cause's key and message when it has one)."""
    cause = e.__cause__
    key, msg = getattr(cause, "full_key", None), getattr(cause, "msg", None)
    if key and msg:
        msg = msg.splitlines()[0]
        parent = getattr(cause, "parent_node", None)
        if isinstance(cause, ConfigAttributeError | ConfigKeyError) and OmegaConf.is_dict(parent):
            name = key.rsplit(".", 1)[-1]
            close = difflib.get_close_matches(name, [str(k) for k in parent], n=1)
            hint = f"; did you mean {key[: -len(name)]}{close[0]}?" if close else ""
            return f"{key}: no such key ({msg}){hint}"
        return f"{key}: {msg}"
    # e.g. "In 'experiment/x': Could not find 'model/y'\n\nAvailable options in 'model':\n\t..."
    text = str(e).split("Config search path:")[0]
    head, _, options = text.partition("Available options")
    head = " ".join(head.split()) or type(e).__name__
    names = [ln.strip() for ln in options.splitlines()[1:] if ln.strip()]
    return f"{head}; valid: {', '.join(names)}" if names else head


def _unknown_keys(node: Any, schema: Any, prefix: str = "") -> list[str]:
    """Keys of ``node`` that the typed ``schema`` does not have (added with ``+key=``)."""
    if not isinstance(node, dict) or not isinstance(schema, dict):
        return []
    out = []
    for key, value in node.items():
        if key not in schema:
            out.append(f"{prefix}{key}")
        else:
            out += _unknown_keys(value, schema[key], f"{prefix}{key}.")
    return out


def _compose(config_name: str, overrides: list[str], schema: Any) -> DictConfig:
    from hydra import compose
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_hydra_error(e)) from None
    if schema is not None:
        job = OmegaConf.to_container(cfg, resolve=False)
        job.pop("hydra")
        extra = _unknown_keys(job, OmegaConf.to_container(OmegaConf.structured(schema)))
        if extra:
            raise ConfigError(
                f"{', '.join(extra)}: no such key in the config (a + override adds a key that "
                "nothing reads); drop it, or set an existing key without +"
            )
    return cfg


def check_command_line(
    config_dir: str | Path,
    config_name: str,
    argv: Sequence[str],
    *,
    schema: Any = None,
    validate: Callable[[DictConfig], None] | None = None,
) -> None:
    """Compose every job of ``argv`` (a train.py / eval.py command line) and check it.

    Args:
        config_dir: the entry point's Hydra config folder.
        config_name: its primary config (``train`` / ``eval``; ``-cn`` on the line wins).
        argv: the arguments after the script name, as Hydra reads them.
        schema: the typed root config (e.g. ``TrainConfig``): keys beyond it are refused.
        validate: run on each job's composed config when the job runs in this process.

    Raises:
        ConfigError: one line naming the override, key or value that cannot run. Flags that
            only print (``--help``, ``--info``, ...) and custom config paths (``-cp``,
            ``-cd``) are left to Hydra.
    """
    from hydra import initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra._internal.utils import get_args_parser
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException
    from hydra.types import RunMode

    args = get_args_parser().parse_args(list(argv))
    if args.help or args.hydra_help or args.info or args.shell_completion:
        return
    if args.config_path or args.config_dir:
        return
    config_name = args.config_name or config_name
    if args.cfg:
        validate = None  # --cfg only prints the config: no job runs
    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        parser = OverridesParser.create(config_loader=loader)

        def parse(lines: list[str]) -> list[Any]:
            parsed = []
            for line in lines:  # one at a time, so the message names the one that fails
                try:
                    parsed += parser.parse_overrides([line])
                except OverrideParseException:
                    raise ConfigError(
                        f"{line}: not a valid override (quote a value with special characters, "
                        f"e.g. key='~/data'; {_GRAMMAR})"
                    ) from None
            return parsed

        overrides = parse(args.overrides)
        _check_group_options(overrides, loader)
        # The first job: the first value of each sweep.
        first = [
            f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}"
            if o.is_sweep_override()
            else o.input_line
            for o in overrides
        ]
        cfg = _compose(config_name, first, schema)
        multirun = args.multirun or cfg.hydra.mode == RunMode.MULTIRUN
        if not multirun:
            sweeps = [o.input_line for o in overrides if o.is_sweep_override()]
            if sweeps:
                raise ConfigError(
                    f"{sweeps[0]}: several values run a sweep, add -m (a list is key=[a,b], "
                    "a string with commas key='a,b')"
                )
            jobs = [first]
        else:
            # Exactly the jobs Hydra's sweeper will run: the sweep config's params, then the
            # command line (which wins on a shared key), as a product.
            params = [f"{k}={v}" for k, v in (cfg.hydra.sweeper.get("params") or {}).items()]
            swept = parse(params) + overrides
            _check_group_options(swept, loader)
            jobs = BasicSweeper.split_arguments(swept, None)[0]
        in_process = not multirun or cfg.hydra.launcher._target_ == _BASIC_LAUNCHER
        for job in jobs:
            job_cfg = cfg if job == first else _compose(config_name, list(job), schema)
            if validate is not None and in_process:
                validate(job_cfg)


def exit_on_bad_command_line(
    config_dir: str | Path,
    config_name: str,
    *,
    schema: Any = None,
    validate: Callable[[DictConfig], None] | None = None,
) -> None:
    """For an entry point's ``__main__``: :func:`check_command_line` on ``sys.argv``; on a
    ConfigError print ``error: ...`` (rank 0 only) and exit with status 2."""
    from powergrad.distributed import env_world

    try:
        check_command_line(config_dir, config_name, sys.argv[1:], schema=schema, validate=validate)
    except ConfigError as e:
        if env_world()[0] == 0:  # under torchrun every rank checks; rank 0 says it
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
