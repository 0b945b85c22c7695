"""Reads back what an offline wandb run logged (config, history, summary, tags), without a
server: the tests' way to check the real wandb runs the trainer makes.

It parses wandb's own ``.wandb`` datastore (a private format that may change with wandb), which
is why it lives with the tests and not in the package.
"""

from __future__ import annotations

import json
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _wandb_records(path: Path) -> Iterator[Any]:
    """Protobuf records of a ``.wandb`` file: a 7-byte W&B header, then LevelDB-log blocks."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, _magic, _version = struct.unpack("<4sHB", data[:7])
    if ident != b":W&B":
        raise ValueError(f"{path}: not a wandb datastore file")
    block, header = 32768, 7  # LevelDB log: 32 KiB blocks, 7-byte record headers
    pos, pending = 7, b""
    while pos + header <= len(data):
        left = block - pos % block
        if left < header:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + header])
        if length == 0 and kind == 0:
            pos += left
            continue
        if pos + header + length > len(data):  # a record still being written
            return
        pending += data[pos + header : pos + header + length]
        pos += header + length
        if kind in (1, 4):  # FULL or LAST fragment
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def read_offline_run(run_dir: str | os.PathLike, *, wait_s: float = 60.0) -> dict[str, Any]:
    """Read back what an offline wandb run under ``run_dir`` logged (the latest one).

    ``run.finish()`` can return before wandb's service process has flushed the ``.wandb``
    file, so this re-reads it for up to ``wait_s`` seconds until the run's exit record is there.

    Returns:
        ``{"id", "name", "config", "tags", "group", "job_type", "history": [dict, ...],
        "summary", "exit_code", "artifacts": [{"name", "type", "aliases", "metadata",
        "files"}], "files"}``; ``files`` lists every offline run directory found (oldest
        first), e.g. two after a resume.
    """
    roots = sorted(Path(run_dir).glob("wandb/offline-run-*"))
    if not roots:
        raise FileNotFoundError(f"no offline wandb run under {run_dir}/wandb")
    deadline = time.monotonic() + wait_s
    while True:
        out = _read_store(roots)
        if out["exit_code"] is not None or time.monotonic() > deadline:
            return out
        time.sleep(0.2)


def _read_store(roots: list[Path]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "config": {},
        "history": [],
        "summary": {},
        "exit_code": None,
        "artifacts": [],
        "files": [str(r) for r in roots],
    }
    (store,) = roots[-1].glob("run-*.wandb")
    for record in _wandb_records(store):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            out.update(
                id=run.run_id,
                name=run.display_name,
                tags=list(run.tags),
                group=run.run_group,
                job_type=run.job_type,
            )
            for item in run.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "history":
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            out["history"].append(row)
        elif kind == "summary":
            for item in record.summary.update:
                key = item.key or "/".join(item.nested_key)
                out["summary"][key] = json.loads(item.value_json)
        elif kind == "artifact":
            a = record.artifact
            out["artifacts"].append(
                {
                    "name": a.name,
                    "type": a.type,
                    "aliases": list(a.aliases),
                    "metadata": json.loads(a.metadata or "{}"),
                    "files": {e.path: e.local_path for e in a.manifest.contents},
                }
            )
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
    out["config"].pop("_wandb", None)
    return out
