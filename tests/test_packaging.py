"""Installs: pyproject.toml's ranges, constraints.txt's exact pins, environment.yml, CI's command.

pyproject.toml accepts compatible ranges (a cluster's own torch / CUDA stack); constraints.txt
holds the exact, tested versions that CI, the README's commands and the containers install;
environment.yml pins the same versions for conda. These tests keep the three consistent.
"""

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^\s*([A-Za-z0-9_.\-]+)==(\S+)\s*$")


def _pins(lines):
    """``{canonical name: Version}`` of ``name==version`` lines (comments, blanks, options skipped)."""
    out = {}
    for line in lines:
        line = line.split("#", 1)[0]
        if m := PIN.match(line):
            name = canonicalize_name(m.group(1))
            assert name not in out, f"{name} pinned twice"
            out[name] = Version(m.group(2))
    return out


def _constraints():
    return _pins((ROOT / "constraints.txt").read_text().splitlines())


def _environment_pins():
    lines = (ROOT / "environment.yml").read_text().splitlines()
    return _pins(line.strip()[2:] for line in lines if line.strip().startswith("- "))


def _project():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _requirements(*extras):
    project = _project()
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    return [Requirement(r) for r in reqs]


def test_pyproject_accepts_ranges_not_pins():
    # A cluster's own torch (or any newer compatible release) must satisfy the project.
    for req in _requirements(*_project()["optional-dependencies"]):
        assert not any(s.operator == "==" for s in req.specifier), f"{req}: a range, not a pin"
        assert req.specifier, f"{req}: give a range"


def test_every_requirement_is_pinned_within_its_range():
    pins = _constraints()
    for req in _requirements(*_project()["optional-dependencies"]):
        name = canonicalize_name(req.name)
        assert name in pins, f"constraints.txt pins no {name}"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt: {name}=={pins[name]} outside pyproject's {req.specifier}"
        )


def test_torch_and_torchvision_are_a_matching_pair():
    # torchvision 0.N is built for torch 2.(N-15), and each wheel requires exactly that torch.
    pins = _constraints()
    assert pins["torch"].minor + 15 == pins["torchvision"].minor
    assert pins["torch"].major == 2 and pins["torchvision"].major == 0
    lows = {
        canonicalize_name(r.name): next(
            Version(s.version) for s in r.specifier if s.operator == ">="
        )
        for r in _requirements()
        if r.name in ("torch", "torchvision")
    }
    assert lows["torch"].minor + 15 == lows["torchvision"].minor


def test_dali_is_an_extra_per_cuda_major():
    project = _project()
    assert not [r for r in project["dependencies"] if "dali" in r]  # the main job installs without
    extras = project["optional-dependencies"]
    assert [Requirement(r).name for r in extras["dali"]] == ["nvidia-dali-cuda130"]
    assert [Requirement(r).name for r in extras["dali-cu12"]] == ["nvidia-dali-cuda120"]
    pins = _constraints()
    assert pins["nvidia-dali-cuda130"] == pins["nvidia-dali-cuda120"]  # one DALI release


def test_environment_yml_pins_the_constraints():
    env, pins = _environment_pins(), _constraints()
    assert env, "environment.yml pins nothing"
    # The same version wherever both name a package ...
    assert {n: v for n, v in env.items() if n in pins} == {n: pins[n] for n in env if n in pins}
    assert set(env) <= set(pins)
    # ... and the conda environment is the tested one: runtime, dev and the CUDA 13 DALI.
    wanted = {canonicalize_name(r.name) for r in _requirements("dev", "dali")}
    assert wanted <= set(env)
    text = (ROOT / "environment.yml").read_text()
    assert "- -c constraints.txt" in text and "- -e ." in text
    python = re.search(r"^\s*- python=(\S+)\s*$", text, re.M).group(1)
    assert Version(python) >= Version(_project()["requires-python"].removeprefix(">="))


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    test_cmd = next(line for line in ci.splitlines() if "pytest" in line).strip()
    assert test_cmd in readme


def test_main_job_starts_without_dali(tmp_path):
    """DALI is an extra: with nvidia.dali unimportable, the package imports and train.py --help
    runs (DALI is imported only when loader=dali builds its loaders)."""
    code = (
        "import runpy, sys\n"
        "sys.modules['nvidia.dali'] = None  # import nvidia.dali now raises ImportError\n"
        "import powergrad, powergrad.config, powergrad.data, powergrad.compare\n"
        f"sys.argv = [{str(ROOT / 'train.py')!r}, '--help']\n"
        f"runpy.run_path({str(ROOT / 'train.py')!r}, run_name='__main__')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "== Configuration groups ==" in proc.stdout
