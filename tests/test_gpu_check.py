"""scripts/gpu_check.py, the prepared check for a lent GPU, checked on the CPU.

The dry run runs every measure's code at toy sizes in an interpreter that sees only the GPU
image's packages (those of them installed here) plus the carried ones: a throwaway venv without
system site packages, the allowed distributions linked into it. So train.py, bench_train and
the check itself are shown to need nothing else (no wandb, DALI, submitit) before a GPU session
spends its minutes. The scripts run as subprocesses (tests import no script).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
MEASURES = [
    "environment",
    "r50_bf16_eager",
    "r50_fp16_eager",
    "no_host_sync",
    "compile",
    "batch1024_memory",
    "train_py",
    "torch_loader",
]


def _gpu_check(*args: str, python: str = sys.executable, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [python, "scripts/gpu_check.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        **kw,
    )


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _link_distribution(dist: importlib.metadata.Distribution, site: Path, shared: set[str]):
    """Symlink ``dist``'s files into ``site`` by top-level entry; an entry that several
    distributions share (a namespace such as nvidia/, where DALI also lives) one level down."""
    source = Path(dist.locate_file(""))
    for entry in {f.parts[:2] for f in dist.files or [] if f.parts[0] != ".."}:
        top = entry[0]
        if top in shared and len(entry) == 2:
            (site / top).mkdir(exist_ok=True)
            target, link = source / top / entry[1], site / top / entry[1]
        else:
            target, link = source / top, site / top
        if target.exists() and not link.exists():
            link.symlink_to(target)


def _with_requirements(names: set[str], dists: dict[str, importlib.metadata.Distribution]):
    """``names`` (those installed here) and, transitively, what their installed versions
    require: a version here may need a package the image's own version does not (e.g.
    huggingface_hub 2.x needs httpx2), which the image therefore lacks without harm."""
    todo, seen = [n for n in names if n in dists], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for text in dists[name].requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo += [_norm(req.name)] if _norm(req.name) in dists else []
    return seen


@pytest.fixture(scope="module")
def image_python(tmp_path_factory) -> str:
    """A Python that imports only the GPU image's packages (the ones installed here, at this
    machine's versions) and the carried ones (constraints.txt's versions, as gpu_check.sh
    --prepare fetches them), plus the repository itself."""
    listing = json.loads(_gpu_check("--list-packages").stdout)
    carried = listing["carried"]
    dists = {_norm(d.metadata["Name"]): d for d in importlib.metadata.distributions()}
    allowed = _with_requirements(set(listing["image"]) | set(carried), dists)
    venv = tmp_path_factory.mktemp("image") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (site,) = venv.glob("lib/python*/site-packages")
    owners: dict[str, set[str]] = {}
    for name, dist in dists.items():
        for f in dist.files or []:
            owners.setdefault(f.parts[0], set()).add(name)
    shared = {top for top, names in owners.items() if len(names) > 1}
    for name in allowed:
        assert name not in carried or dists[name].version == carried[name], name
        _link_distribution(dists[name], site, shared)
    return str(venv / "bin" / "python")


@pytest.fixture(scope="module")
def dry_run(image_python, tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict, Path]:
    """Every measure at toy sizes on the CPU, in the image-only interpreter."""
    out = tmp_path_factory.mktemp("dry")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONNOUSERSITE": "1"}
    proc = _gpu_check(
        "--device", "cpu", "--tiny", "--out-dir", str(out), python=image_python, env=env
    )
    files = list(out.glob("*.json"))
    assert len(files) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(files[0].read_text()), out


def test_dry_run_runs_every_measure_in_order(dry_run):
    proc, record, out = dry_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(record["measures"]) == MEASURES
    failed = {n: m for n, m in record["measures"].items() if m["status"] != "ok"}
    assert not failed, failed
    assert record["finished"] and record["tiny"] and record["device"] == "cpu"
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}-cpu\.json", next(out.glob("*.json")).name)


def test_dry_run_sees_only_the_image_packages(dry_run):
    """wandb, submitit and DALI are installed here, but not importable in the dry run, and
    train.py (logger=none) and every measure ran without them; Hydra and timm are the carried
    versions."""
    _, record, _ = dry_run
    env = record["measures"]["environment"]["result"]
    assert env["importable"] == {"wandb": False, "submitit": False, "nvidia.dali": False}
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    pins = dict(x.split("==") for x in lines if "==" in x and not x.startswith("#"))
    assert env["hydra"] == pins["hydra-core"] and env["timm"] == pins["timm"]
    assert env["commit"]["from"] == "git"
    train = record["measures"]["train_py"]["result"]
    assert train["imported_by"] == {"wandb": None, "nvidia.dali": None, "submitit": None}


def test_dry_run_measures_hold_their_numbers(dry_run):
    _, record, _ = dry_run
    m = {name: v["result"] for name, v in record["measures"].items()}
    for name in ("r50_bf16_eager", "r50_fp16_eager"):
        assert set(m[name]["images_per_s"]) == {"minimal", "ours_ce", "ours_pgt"}
        for key in ("ratio_ours_ce_vs_minimal", "ratio_ours_pgt_vs_ours_ce"):
            r = m[name][key]
            assert 0 < r["ci95_lo"] <= r["median"] <= r["ci95_hi"]
        assert m[name]["channels_last"] and m[name]["batch"] == 4
    assert m["r50_bf16_eager"]["precision"] == "bf16"
    assert (
        m["r50_fp16_eager"]["precision"] == "fp32"
        and "fp16 needs CUDA" in m["r50_fp16_eager"]["note"]
    )
    sync = m["no_host_sync"]
    assert sync["steps"] == 2 and sync["host_syncs"] is None  # nothing to count on a CPU
    assert sync["trainer_steps"]["profiler_sync_total"] == 0
    compiled = m["compile"]
    assert compiled["compile"] and compiled["compile_backend"] == "eager"
    assert compiled["images_per_s"]["ours_ce"] > 0 and compiled["dynamo"]["unique_graphs"] >= 1
    assert m["batch1024_memory"]["batch"] == 8
    train = m["train_py"]
    assert [e["epoch"] for e in train["epochs"]] == [1, 2]
    assert all(e["images_per_s"] > 0 for e in train["epochs"])
    assert train["summary_written"] and "last.pt" in train["checkpoints"]
    assert all(v is not None for v in train["rss_mib_per_epoch"])
    loader = m["torch_loader"]
    assert loader["images"] == loader["files"] == 16 and loader["images_per_s"] > 0
    assert loader["dali"].startswith("skipped")


def test_render_fills_the_table_from_the_json(dry_run, tmp_path):
    _, record, out = dry_run
    readme = tmp_path / "README.md"
    start = "<!-- gpu-table: generated by scripts/gpu_check.py --render, do not edit by hand -->"
    readme.write_text(f"intro\n{start}\nold\n<!-- /gpu-table -->\noutro\n")
    proc = _gpu_check("--render", "--results", str(out), "--readme", str(readme))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = readme.read_text()
    assert text.startswith(f"intro\n{start}\n") and text.endswith("<!-- /gpu-table -->\noutro\n")
    assert "old" not in text and "(dry run, CPU)" in text
    ips = record["measures"]["r50_bf16_eager"]["result"]["images_per_s"]["ours_ce"]
    assert f"| {ips:,.0f} |" in text
    assert "not run" not in text.split("(dry run, CPU)")[1]  # every measure has its cell
    assert (
        _gpu_check("--render", "--check", "--results", str(out), "--readme", str(readme)).returncode
        == 0
    )


def test_committed_table_is_rendered_from_the_committed_json():
    proc = _gpu_check("--render", "--check")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_measure_killed_by_its_cap_is_recorded_and_the_next_runs(tmp_path):
    """A cap of 0 s stops the first measure at once; the next one runs in a fresh child."""
    proc = _gpu_check(
        *("--device", "cpu", "--tiny", "--out-dir", str(tmp_path)),
        *("--only", "environment,torch_loader", "--cap", "environment=0"),
    )
    assert proc.returncode == 1, proc.stderr[-3000:]  # not every measure ran
    (file,) = tmp_path.glob("*.json")
    measures = json.loads(file.read_text())["measures"]
    assert list(measures) == ["environment", "torch_loader"]
    assert measures["environment"]["status"] == "timeout"
    assert measures["environment"]["cap_s"] == 0
    assert measures["torch_loader"]["status"] == "ok"
    assert measures["torch_loader"]["result"]["images"] == 16


def test_a_dry_run_needs_an_out_dir_outside_results():
    proc = _gpu_check("--device", "cpu", "--tiny")
    assert proc.returncode == 2
    assert proc.stdout.startswith("error: --tiny needs --out-dir")
