"""The conda environment and the pip project must pin the same packages."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pins(lines):
    return dict(re.match(r"^\s*([A-Za-z0-9_.\-]+)==(\S+)\s*$", s).groups() for s in lines)


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = _pins(project["dependencies"] + project["optional-dependencies"]["dev"])
    conda_pins = [
        line.strip()[2:]
        for line in (ROOT / "environment.yml").read_text().splitlines()
        if line.strip().startswith("- ") and "==" in line
    ]
    assert _pins(conda_pins) == wanted


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    test_cmd = next(line for line in ci.splitlines() if "pytest" in line).strip()
    assert test_cmd in readme
