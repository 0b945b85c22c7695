"""The container recipes (containers/Dockerfile, containers/powergrad.def), checked without an
engine: what they copy exists, they install with constraints.txt and the dali extra, on a CUDA 13
base image matching torch's CUDA build, with the Python of environment.yml. hadolint, where it is
on PATH, lints the Dockerfile."""

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "containers" / "Dockerfile"
DEFFILE = ROOT / "containers" / "powergrad.def"


def _dockerfile():
    """``[(INSTRUCTION, arguments)]`` with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        buf = f"{buf} {line}" if buf else line
        if buf.endswith("\\"):
            buf = buf[:-1].rstrip()
            continue
        instr, _, args = buf.partition(" ")
        out.append((instr.upper(), args.strip()))
        buf = ""
    return out


def _deffile():
    """``(header {key: value}, {section: [lines]})`` of the Apptainer definition."""
    header, sections, current = {}, {}, None
    for raw in DEFFILE.read_text().splitlines():
        line = raw.strip()
        if m := re.match(r"^%(\w+)", line):
            current = m.group(1)
            sections.setdefault(current, [])
        elif current is None:
            if line and not line.startswith("#"):
                key, _, value = line.partition(":")
                header[key.strip().lower()] = value.strip()
        elif line and not line.startswith("#"):
            sections[current].append(line)
    return header, sections


def _tracked_top_level():
    out = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    return {p.split("/", 1)[0] for p in out.splitlines()}


def _env_python():
    text = (ROOT / "environment.yml").read_text()
    return re.search(r"^\s*- python=(\S+)\s*$", text, re.M).group(1)


def _torch_cuda_major():
    """CUDA major of the pinned torch's PyPI build (its nvidia-*-cu13 companions in the lock)."""
    text = (ROOT / "constraints.txt").read_text()
    majors = {int(m) for m in re.findall(r"^nvidia-[a-z0-9-]+-cu(\d+)==", text, re.M)}
    assert len(majors) == 1, majors
    return majors.pop()


def _dockerignored(name):
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    return any(Path(name).match(p) for p in patterns)


def test_dockerfile_copies_what_exists_and_installs_the_pins():
    instructions = _dockerfile()
    (base,) = [a for i, a in instructions if i == "FROM"]
    assert re.fullmatch(rf"nvidia/cuda:{_torch_cuda_major()}\.\d+\.\d+-\w+-ubuntu[\d.]+", base)
    args = dict(a.split("=", 1) for i, a in instructions if i == "ARG")
    assert args["PYTHON"] == _env_python()
    assert "dali" in args["EXTRAS"].split(",")
    for instr, arg in instructions:
        if instr == "COPY":
            *sources, _dest = arg.split()
            for src in sources:
                assert (ROOT / src).exists(), f"COPY {src}: not in the build context"
                assert src == "." or not _dockerignored(src), f"COPY {src}: .dockerignore drops it"
    runs = " ".join(a for i, a in instructions if i == "RUN")
    assert 'pip install -c constraints.txt ".[${EXTRAS}]"' in runs
    assert "pip install -c constraints.txt --no-deps -e ." in runs
    assert 'python${PYTHON}" -m venv /opt/venv' in runs


def test_dockerignore_keeps_the_code_and_git():
    # .git comes along so that runs in the container record their commit (git_sha).
    for name in (".git", "powergrad", "configs", "train.py", "constraints.txt", "pyproject.toml"):
        assert not _dockerignored(name), name
    for name in (".venv", "outputs", "multirun"):
        assert _dockerignored(name), name


def test_apptainer_definition_matches_the_dockerfile():
    header, sections = _deffile()
    assert header["bootstrap"] == "docker"
    (docker_base,) = [a for i, a in _dockerfile() if i == "FROM"]
    assert header["from"] == docker_base
    files = [line.split() for line in sections["files"]]
    for src, dest in files:
        assert (ROOT / src).exists(), f"%files {src}: no such path"
        assert dest == f"/opt/powergrad/{src}"
    # Every tracked top-level entry comes along: the image's checkout is clean for git_sha.
    assert _tracked_top_level() <= {src for src, _ in files}
    post = "\n".join(sections["post"])
    assert f"PYTHON={_env_python()}" in post
    assert "-m venv /opt/venv" in post
    assert 'pip install -c /opt/powergrad/constraints.txt -e "/opt/powergrad[dali]"' in post
    assert "PATH=/opt/venv/bin:$PATH" in "\n".join(sections["environment"])
    assert sections["runscript"] == ['exec python /opt/powergrad/train.py "$@"']


def test_recipes_python_fits_the_project():
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires == ">=3.11" and _env_python() == "3.11"


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed")
def test_hadolint_passes():
    proc = subprocess.run(["hadolint", str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
