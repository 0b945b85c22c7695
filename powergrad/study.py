"""The CPU-scale study's report: results/cpu/README.md and its plots, from runs.json.

``scripts/cpu_study.py`` trains the runs and writes ``runs.json`` (per-run summaries, epoch
histories, filter-norm digests) and ``provenance.json``; :func:`render_cpu_study` turns them into
tables, plots and a verdict table on the paper's claims. Every number in the README comes from
those two files.

Verdicts. Each claim is checked by one or more two-sided tests (:class:`Test`): Welch's t-test
(``scipy.stats.ttest_ind(equal_var=False)``) of a difference of means, Fisher's exact test of
divergence counts, Spearman's or Pearson's correlation. :func:`holm` adjusts their p-values over
the whole study (Holm's step-down procedure: the chance that any verdict below is a false
"holds" or "against the claim" is at most 5%). A claim *holds* where the adjusted p < 0.05 with
the effect in the paper's direction, is *against the claim* where the adjusted p < 0.05 with the
opposite effect, and is *within noise* otherwise (:func:`verdict`).

Diverged runs are counted, not dropped: a run that diverged is a failure of its method at that
point. Its accuracy counts at chance level (100 / classes %: its model predicts no better than a
guess), so the Welch test of a comparison sees every run; and where a run of either group
diverged, Fisher's exact test of the divergence counts (n diverged / n) joins the family.
A rank test placing diverged runs last would assume no value for them, but with 5-6 runs a group
its smallest possible p (about 0.002 to 0.008) could never pass Holm's correction over the
study's 20-odd tests, so it could only ever say "within noise".
"""

from __future__ import annotations

import json
import math
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from powergrad.plots import plot_accuracy_loglog, plot_filter_norms, plot_vs_alpha
from powergrad.results import (
    NOT_RUN,
    baseline_id,
    fmt_delta,
    fmt_ms,
    load_paper,
    mean_std,
    paper_row,
)
from powergrad.tables import METHOD_NAMES

__all__ = [
    "SIGNIFICANCE",
    "Test",
    "Welch",
    "accuracies",
    "fisher",
    "holm",
    "load_study",
    "render_cpu_study",
    "verdict",
    "welch",
]

CPU_DIR = Path(__file__).resolve().parents[1] / "results" / "cpu"

# ImageNet-1K's training images (the paper's epochs), for the scale caveat.
IMAGENET_TRAIN = 1_281_167

# Family-wise significance level: a verdict needs a Holm-adjusted two-sided p below it.
SIGNIFICANCE = 0.05


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


# ---------------------------------------------------------------------------------------------
# Statistics


class Welch(NamedTuple):
    """Welch's t-test of mean(a) - mean(b): group sizes, difference of means, t, two-sided p."""

    n_a: int
    n_b: int
    diff: float
    t: float
    p: float


def welch(a: Sequence[float], b: Sequence[float]) -> Welch | None:
    """Welch's t-test of ``a`` against ``b``; None when a group has fewer than 2 values.
    t and p are NaN when neither group varies."""
    from scipy import stats

    if len(a) < 2 or len(b) < 2:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # zero variance in both groups
        t, p = stats.ttest_ind(a, b, equal_var=False)
    diff = sum(a) / len(a) - sum(b) / len(b)
    return Welch(len(a), len(b), diff, float(t), float(p))


def fisher(diverged_a: int, n_a: int, diverged_b: int, n_b: int) -> float:
    """Two-sided p of Fisher's exact test: do two groups of runs diverge at different rates?"""
    from scipy import stats

    table = [[diverged_a, n_a - diverged_a], [diverged_b, n_b - diverged_b]]
    return float(stats.fisher_exact(table).pvalue)


def holm(ps: Sequence[float]) -> list[float]:
    """Holm's (1979) step-down adjusted p-values, in the order given.

    Sorted ascending, the k-th smallest p (k = 0, 1, ...) is multiplied by (m - k), capped at 1,
    and made non-decreasing along the sorted order; a hypothesis is rejected at level a when
    its adjusted p is below a. Controls the family-wise error rate under any dependence.
    """
    m = len(ps)
    adjusted = [1.0] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda j: ps[j])):
        running = max(running, min(1.0, (m - rank) * ps[i]))
        adjusted[i] = running
    return adjusted


def verdict(diff: float, p_adjusted: float, direction: int = 1) -> str:
    """ "holds" (adjusted p < 0.05, the effect's sign == ``direction``), "against the claim"
    (adjusted p < 0.05, the other sign), "within noise", or "not testable" (no p)."""
    if not _finite(p_adjusted):
        return "not testable"
    if p_adjusted >= SIGNIFICANCE or diff == 0:
        return "within noise"
    return "holds" if (diff > 0) == (direction > 0) else "against the claim"


@dataclass(frozen=True)
class Test:
    """One test of the study, before multiplicity correction.

    ``diff`` is the effect (difference of means a - b, difference of diverged fractions, or a
    correlation coefficient) and ``direction`` the sign the paper's claim gives it; ``p`` is
    two-sided, NaN when the test cannot be computed (it then stays out of Holm's family).
    """

    claim: str  # the paper's claim, e.g. "Table 1: PGT raises test accuracy"
    comparison: str  # what is compared, e.g. "PGT 0.25 - baseline, val top-1 % (final epoch)"
    groups: str  # runs per group and how many of them diverged, e.g. "6 (0) vs 6 (2)"
    diff: float
    method: str  # the test and its statistic, e.g. "Welch t = 2.31"
    p: float
    direction: int = 1
    digits: int = 2  # decimals of diff
    paper: str = "-"  # the paper's effect, e.g. "+0.090"
    untestable: str = "not testable"  # the verdict shown when there is no p


def accuracies(runs: list[dict[str, Any]], key: str, chance: float) -> list[float]:
    """Per-run accuracy ``key`` (a summary key, or "val_top1_best"): finished runs' values,
    diverged runs at ``chance``; failed runs (crashed, unfinished) are not results."""
    out = []
    for r in runs:
        if r["status"] == "diverged":
            out.append(chance)
        elif r["status"] == "ok":
            value = _best_val(r) if key == "val_top1_best" else r["summary"].get(key)
            if _finite(value):
                out.append(float(value))
    return out


def _groups(a: list[dict], b: list[dict]) -> str:
    def one(rs: list[dict]) -> str:
        done = [r for r in rs if r["status"] in ("ok", "diverged")]
        return f"{len(done)} ({_diverged(rs)})"

    return f"{one(a)} vs {one(b)}"


def _welch_test(
    claim: str,
    comparison: str,
    a: list[dict],
    b: list[dict],
    key: str,
    chance: float,
    *,
    direction: int = 1,
    paper: str = "-",
) -> Test:
    """Welch's test of accuracy ``key`` between runs ``a`` and ``b`` (diverged at chance)."""
    test = welch(accuracies(a, key, chance), accuracies(b, key, chance))
    if test is None:
        return Test(claim, comparison, _groups(a, b), math.nan, "Welch", math.nan, direction)
    method = f"Welch t = {test.t:.2f}" if _finite(test.t) else "Welch (no variance)"
    return Test(claim, comparison, _groups(a, b), test.diff, method, test.p, direction, paper=paper)


def _fisher_test(claim: str, name: str, a: list[dict], b: list[dict], base: str) -> Test | None:
    """Fisher's test of the divergence counts of ``a`` and ``b``; None when neither diverged
    (given those margins its p is 1: it could never reject, so it stays out of the family)."""
    da, db = _diverged(a), _diverged(b)
    na, nb = da + len(_ok(a)), db + len(_ok(b))
    if not (da or db) or not (na and nb):
        return None
    return Test(
        claim,
        f"{name} vs {base}, fraction of runs diverged",
        _groups(a, b),
        da / na - db / nb,
        "Fisher exact",
        fisher(da, na, db, nb),
        direction=-1,  # the paper's methods are to train better, not to diverge more often
        paper="< 0",
    )


def _corr_test(claim: str, kind: str, xs: list[float], ys: list[float], label: str, sign: int):
    from scipy import stats

    fn = stats.spearmanr if kind == "Spearman" else stats.pearsonr
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant input
        r, p = fn(xs, ys)
    paper = "< 0" if sign < 0 else "> 0"
    groups = f"{len(xs)} runs"
    return Test(claim, f"{kind}({label})", groups, float(r), f"{kind} r", float(p), sign, 2, paper)


def _fmt_p(p: float) -> str:
    if not _finite(p):
        return "-"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


# ---------------------------------------------------------------------------------------------
# Runs of the study


@dataclass
class Study:
    """runs.json and provenance.json of one study, grouped by point."""

    cpu_dir: Path
    paper: dict[str, Any]
    runs: list[dict[str, Any]]
    prov: dict[str, Any]
    groups: dict[str, list[dict[str, Any]]]
    chance: float  # top-1 % of a guess: 100 / number of classes


def load_study(cpu_dir: Path, paper: dict[str, Any] | None = None) -> Study | None:
    """The study in ``cpu_dir``, None without a runs.json."""
    runs_path, prov_path = cpu_dir / "runs.json", cpu_dir / "provenance.json"
    if not runs_path.is_file():
        return None
    data = json.loads(runs_path.read_text())
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in data["runs"]:
        groups[r["point"]].append(r)
    prov = json.loads(prov_path.read_text()) if prov_path.is_file() else {}
    # runs.json files written before the field existed are digits studies: 10 classes.
    chance = 100.0 / data.get("num_classes", 10)
    return Study(cpu_dir, paper or load_paper(), data["runs"], prov, dict(groups), chance)


def _ok(runs: list[dict]) -> list[dict]:
    return [r for r in runs if r["status"] == "ok"]


def _diverged(runs: list[dict]) -> int:
    return sum(r["status"] == "diverged" for r in runs)


def _values(runs: list[dict], key: str) -> list[float]:
    """Finite summary values of ``key`` over the finished runs."""
    vals = (r["summary"].get(key) for r in _ok(runs))
    return [float(v) for v in vals if _finite(v)]


def _stat(runs: list[dict], key: str):
    return mean_std(_values(runs, key))


def _best_val(run: dict) -> float | None:
    """The run's best-epoch val top-1 (summary key, or the maximum over its epoch history)."""
    best = run["summary"].get("val_top1_best")
    if best is None:
        vals = [h["val_top1"] for h in run.get("history", []) if h.get("val_top1") is not None]
        best = max(vals) if vals else None
    return best


def _paper_delta(paper: dict[str, Any], row_id: str, key: str, base_id: str | None = None):
    """The paper's row-minus-baseline difference of ``key`` (train or test), e.g. "+0.090";
    the baseline is the row's own unless ``base_id`` names another row."""
    table, row = paper_row(paper, row_id)
    _, base = paper_row(paper, base_id or baseline_id(paper, table, row))
    return f"{row[key] - base[key]:+.3f}"


def _paper_claim(paper: dict[str, Any], key: str) -> dict[str, Any]:
    """The entry of results/paper.yaml's ``claims`` that carries ``key``."""
    return next(c for c in paper.get("claims", []) if key in c)


def _label(run: dict) -> str:
    """``PGT 0.25``, ``AGC``: the method's name in the paper's tables, with alpha."""
    alpha = run["alpha"]
    return METHOD_NAMES[run["method"]] + ("" if alpha is None else f" {alpha:g}")


def _alpha_points(groups: dict[str, list[dict]]) -> dict[float, list[dict]]:
    """Parts (a) and (c) at full length: alpha -> runs (the baseline is alpha 1)."""
    points: dict[float, list[dict]] = {}
    for runs in groups.values():
        first = runs[0]
        if first["part"] in ("a", "c"):
            points[1.0 if first["alpha"] is None else float(first["alpha"])] = runs
    return points


def divergence_note(runs: list[dict[str, Any]]) -> str:
    """What stopped the diverged runs, from their histories: each skipped the optimizer steps
    whose loss or gradients were non-finite (as the paper's fp16 GradScaler does), so a stop
    means the loss had grown through finite values first."""
    peaks = [
        max(h["train_loss"] for h in r["history"] if _finite(h.get("train_loss")))
        for r in runs
        if r["status"] == "diverged" and any(_finite(h.get("train_loss")) for h in r["history"])
    ]
    if not peaks:
        return "none diverged"
    return (
        "every run skips each optimizer step whose loss or gradients are inf/NaN, as the "
        "paper's fp16 GradScaler does (`trainer.skip_nonfinite_steps=true`), and stops when "
        "every loss of an epoch is non-finite. The diverged runs did not stop on a transient "
        f"overflow: their train loss first grew through finite values (largest finite epoch "
        f"mean per run: {min(peaks):.1e} to {max(peaks):.1e}), a divergence that skipping "
        "steps does not prevent"
    )


# ---------------------------------------------------------------------------------------------
# Sections: each returns (markdown lines, tests, notes)


class Section(NamedTuple):
    md: list[str]
    tests: list[Test]
    notes: list[str]


def _header(study: Study) -> list[str]:
    prov, runs = study.prov, study.runs
    run_seconds = sum((r.get("summary") or {}).get("wall_s") or 0.0 for r in _ok(runs))
    wall = float(prov.get("wall_s_total", prov.get("wall_s", float("nan"))))
    invocations = "; ".join(
        f"{i.get('started', 'start time not recorded')}: {i['wall_s']:.0f} s "
        f"({i['ran']} runs trained)"
        for i in prov.get("invocations", [])
    )
    recorded = [(r.get("summary") or {}).get("git_sha") for r in _ok(runs)]
    shas = sorted({s for s in recorded if s})
    dirty = sum(s.endswith("-dirty") for s in shas)
    unknown = sum(s is None for s in recorded)
    one_commit = len(shas) == 1 and not dirty and not unknown
    host = prov.get("host", {})
    versions = ", ".join(f"{k} {v}" for k, v in prov.get("versions", {}).items())
    return [
        "# CPU-scale study of the paper's claims",
        "",
        "Generated by `python scripts/cpu_study.py` (it trains the runs, then renders this file "
        "with `powergrad.study`; `python scripts/report.py --cpu-only` re-renders it from "
        "runs.json) from real `train.py` runs on the embedded digits dataset (32x32, 1,437 train "
        "/ 360 val images, 10 classes) with its ImageNet-style augmentation (RandomResizedCrop, "
        "scale >= 0.35; no flip, which would change a digit). Recipe shape as the paper's text "
        "(`recipe=paper_text`): SGD Nesterov 0.9, lr 0.1 per 256 images, weight decay 5e-4, "
        "linear warmup (1 epoch; 0.6 in the 60%-length runs), cosine decay to 0 stepped every "
        "iteration, fp32. Values are mean ± sample std over n seeds; train accuracy is over the "
        "last epoch's augmented batches (as the paper's), val is the 360 val images at the final "
        "epoch unless a column says best epoch. Accuracy columns and tests count a run that "
        f"diverged at chance level ({study.chance:g}%); part (b) also shows the finished runs "
        "alone.",
        "",
        f"- command: `{prov.get('command', '?')}`",
        f"- git SHA: `{prov.get('git_sha', '?')}`",
        f"- the finished runs were trained at {len(shas)} commit(s), {dirty} of them with "
        "uncommitted changes (`-dirty`)"
        + (f", and {unknown} run(s) recorded no commit" if unknown else "")
        + ": "
        + (
            "one clean commit, reproducible from it."
            if one_commit
            else "not reproducible from one commit; the study is to be rerun from one clean "
            "commit (see the end of this file)."
        ),
        f"- wall time: {wall:.0f} s with {prov.get('jobs', '?')} runs at a time, over the "
        f"invocations: {invocations}"
        + _unrecorded(prov, runs)
        + f". Training time summed over the finished runs: {run_seconds:.0f} s",
        f"- host: {host.get('platform', '?')}, {host.get('cpus', '?')} CPUs (shared with other "
        "jobs)" + (f"; {versions}" if versions else ""),
        f"- finished: {prov.get('finished', '?')}; failed runs: {prov.get('failed') or 'none'}",
    ]


def _unrecorded(prov: dict[str, Any], runs: list[dict]) -> str:
    """A note when some runs were trained by an invocation that was stopped before it wrote
    provenance.json (its wall time is then missing from the total)."""
    done = sum(r["status"] in ("ok", "diverged") for r in runs)
    ran = sum(i.get("ran", 0) for i in prov.get("invocations", []))
    if prov and done > ran:
        return f" (+{done - ran} runs from an interrupted invocation whose wall time is not here)"
    return ""


def _acc_cell(runs: list[dict], key: str, chance: float) -> str:
    """mean ± std over every run, diverged ones at chance (or "not run")."""
    return fmt_ms(mean_std(accuracies(runs, key, chance)))


def part_a(study: Study) -> Section:
    """(a) ResNet-18 (BN), baseline vs PGT, full length and 60%: Table 1, Fig. 3c, Fig. 3."""
    g = study.groups
    base, pgt = g.get("a_baseline", []), g.get("a_pgt_0.25", [])
    base60, pgt60 = g.get("a60_baseline", []), g.get("a60_pgt_0.25", [])
    if not base or not pgt:
        return Section([], [], [])
    epochs = base[0]["epochs"]
    md = [
        "",
        f"## (a) ResNet-18 (BN), batch 128, {epochs} epochs: baseline vs PGT, and the 60% schedule",
        "",
        "| method | alpha | epochs (warmup) | n | diverged | train top-1 % | val top-1 % "
        "| best-epoch val top-1 % | train loss | val loss | val logit norm |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rs in (base, pgt, base60, pgt60):
        if not rs:
            continue
        first = rs[0]
        cells = [
            METHOD_NAMES[first["method"]],
            "-" if first["alpha"] is None else f"{first['alpha']:g}",
            f"{first['epochs']} ({first.get('warmup', 1):g})",
            str(len(_ok(rs)) + _diverged(rs)),
            str(_diverged(rs)),
            _acc_cell(rs, "train_top1", study.chance),
            _acc_cell(rs, "val_top1", study.chance),
            _acc_cell(rs, "val_top1_best", study.chance),
            fmt_ms(_stat(rs, "train_loss"), 3),
            fmt_ms(_stat(rs, "val_loss"), 3),
            fmt_ms(_stat(rs, "logit_norm")),
        ]
        md.append("| " + " | ".join(cells) + " |")
    tr = fmt_delta(_stat(pgt, "train_top1"), _stat(base, "train_top1"))
    va = fmt_delta(_stat(pgt, "val_top1"), _stat(base, "val_top1"))
    md += ["", f"PGT - baseline: train {tr}, val {va} (± standard error of the difference)."]

    paper, chance = study.paper, study.chance
    row = "t1_resnet18_cosine_pgt"
    claim_train = "Table 1: PGT raises train accuracy (ResNet-18, cosine)"
    claim_test = "Table 1: PGT raises test accuracy (ResNet-18, cosine)"
    tests = [
        _welch_test(
            claim_train,
            "PGT 0.25 - baseline, train top-1 % (last epoch)",
            pgt,
            base,
            "train_top1",
            chance,
            paper=_paper_delta(paper, row, "train"),
        ),
        _welch_test(
            claim_test,
            "PGT 0.25 - baseline, val top-1 % (best epoch, as the paper's tables)",
            pgt,
            base,
            "val_top1_best",
            chance,
            paper=_paper_delta(paper, row, "test"),
        ),
        _welch_test(
            claim_test,
            "PGT 0.25 - baseline, val top-1 % (final epoch)",
            pgt,
            base,
            "val_top1",
            chance,
            paper=_paper_delta(paper, row, "test"),
        ),
    ]
    notes = []
    if pgt60:
        short = pgt60[0]["epochs"]
        claim = "Fig. 3c: PGT with 60% of the epochs reaches the baseline's final test accuracy"
        tests.append(
            _welch_test(
                claim,
                f"PGT 0.25 at {short} epochs - baseline at {epochs}, final val top-1 %",
                pgt60,
                base,
                "val_top1",
                chance,
                paper="0: both 76.5",
            )
        )
        notes.append(
            f"- **Fig. 3c**: the 60%-length runs train {short} of {epochs} epochs with the whole "
            f"schedule compressed (warmup {pgt60[0].get('warmup', 1):g} epochs, cosine to 0 at "
            f"epoch {short}); the paper's text says only that its ResNet-50 PGT run took 60 "
            "epochs. The claim is that PGT *reaches* the baseline: 'holds' would mean PGT's "
            "60% run is above the full baseline, 'within noise' that the two are not "
            "distinguished (consistent with reaching it, not a proof of equality). Control, "
            "not tested: the baseline compressed the same way minus the full baseline, "
            f"{fmt_delta(_stat(base60, 'val_top1'), _stat(base, 'val_top1'))}; PGT minus "
            f"baseline, both at {short} epochs, "
            f"{fmt_delta(_stat(pgt60, 'val_top1'), _stat(base60, 'val_top1'))} (± standard "
            "error)."
        )
    series = {"baseline": base, "PGT 0.25": pgt}
    if base60:
        series["baseline, 60% schedule"] = base60
    if pgt60:
        series["PGT 0.25, 60% schedule"] = pgt60
    plot_accuracy_loglog(
        {k: [r["history"] for r in _ok(v)] for k, v in series.items()},
        study.cpu_dir / "a_accuracy_loglog.png",
        title="ResNet-18 on digits (Fig. 3 layout, log-log)",
    )
    md += ["", "![accuracy vs epoch](a_accuracy_loglog.png)"]
    return Section(md, tests, notes)


def part_c(study: Study) -> Section:
    """(c) loss and logit norm against alpha (with (a)'s runs at alpha 1 and 0.25)."""
    points = _alpha_points(study.groups)
    if len(points) < 2 or 1.0 not in points:
        return Section([], [], [])
    md = [
        "",
        "## (c) ResNet-18 (BN), batch 128: final loss and logit norm vs alpha (alpha 1 = baseline)",
        "",
        "| alpha | n | diverged | train top-1 % | val top-1 % | train loss | val loss "
        "| val logit norm |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for a in sorted(points):
        rs = points[a]
        cells = [
            f"{a:g}",
            str(len(_ok(rs)) + _diverged(rs)),
            str(_diverged(rs)),
            _acc_cell(rs, "train_top1", study.chance),
            _acc_cell(rs, "val_top1", study.chance),
            fmt_ms(_stat(rs, "train_loss"), 3),
            fmt_ms(_stat(rs, "val_loss"), 3),
            fmt_ms(_stat(rs, "logit_norm")),
        ]
        md.append("| " + " | ".join(cells) + " |")
    # Correlations over the finished runs: a diverged run has no final loss or logit norm.
    every = [(a, r) for a in sorted(points) for r in _ok(points[a])]
    xs = [a for a, _ in every]

    def col(key: str) -> list[float]:
        return [r["summary"][key] for _, r in every]

    diverged = sum(_diverged(rs) for rs in points.values())
    loss = "Sec. 5.3: loss at convergence rises as alpha falls"
    norm = "Sec. 5.3: the mean logit norm rises as alpha falls"
    linear = "Sec. 5.3: loss and logit norm correlate linearly"
    tests = [
        _corr_test(loss, "Spearman", xs, col("train_loss"), "alpha, final train loss", -1),
        _corr_test(loss, "Spearman", xs, col("val_loss"), "alpha, final val loss", -1),
        _corr_test(norm, "Spearman", xs, col("logit_norm"), "alpha, val logit norm", -1),
        _corr_test(
            linear, "Pearson", col("val_loss"), col("logit_norm"), "val loss, val logit norm", 1
        ),
    ]
    low = min(points)
    claim = _paper_claim(study.paper, "baseline_loss")
    ends = {
        key: (_stat(points[low], key), _stat(points[1.0], key))
        for key in ("train_loss", "val_loss", "logit_norm")
    }
    base_val = _stat(points[1.0], "val_loss")
    below = [
        a
        for a in sorted(points, reverse=True)
        if a < 1.0 and base_val and (s := _stat(points[a], "val_loss")) and s.mean < base_val.mean
    ]
    note = (
        f"- **Section 5.3**: the tests use the {len(every)} finished full-length runs of (a) "
        "and (c)"
        + (f" ({diverged} more diverged, without a final loss)" if diverged else "")
        + f". At alpha {low:g} against alpha 1: train loss "
        + " vs ".join(f"{s.mean:.3f}" for s in ends["train_loss"] if s)
        + ", val loss "
        + " vs ".join(f"{s.mean:.3f}" for s in ends["val_loss"] if s)
        + ", val logit norm "
        + " vs ".join(f"{s.mean:.1f}" for s in ends["logit_norm"] if s)
        + f" (the paper, ResNet-50 on ImageNet: loss {claim['pgt_loss_alpha_0_05']} at alpha "
        f"0.05 vs {claim['baseline_loss']})."
        + (
            " Not monotone in val: the mean val loss at alpha "
            + ", ".join(f"{a:g}" for a in below)
            + " is below the baseline's ("
            + "; ".join(
                f"alpha {a:g} - alpha 1: {fmt_delta(_stat(points[a], 'val_loss'), base_val, 3)}"
                for a in below
            )
            + ", ± standard error; not tested: the trend test above covers monotonicity)."
            if below
            else " The mean val loss at every alpha < 1 is above the baseline's."
        )
    )
    plot_vs_alpha(
        {a: [r["summary"] for r in _ok(points[a])] for a in sorted(points)},
        [
            ("val_top1", "val top-1 %"),
            ("train_loss", "final train loss"),
            ("val_loss", "final val loss"),
            ("logit_norm", "val logit norm"),
        ],
        study.cpu_dir / "c_vs_alpha.png",
        title="ResNet-18 on digits: accuracy, loss and logit norm vs alpha (Fig. 7)",
    )
    md += ["", "![loss and logit norm vs alpha](c_vs_alpha.png)"]
    return Section(md, tests, [note])


def _digests(rs: list[dict]) -> list[dict]:
    return [r["filter_norms"] for r in _ok(rs) if r.get("filter_norms")]


def _zeroed(rs: list[dict]) -> list[float]:
    """Zeroed-out filters (norm < 1e-6) at the end of each finished run."""
    return [float(sum(d["zeroed"][-1])) for d in _digests(rs)]


def _filter_cells(rs: list[dict]) -> list[str]:
    """Zeroed, collapsed and min-norm cells of a part (b) point."""
    digests = _digests(rs)
    zero = mean_std(_zeroed(rs))
    coll = mean_std(sum(d["collapsed"][-1]) for d in digests)
    low = mean_std(min(d["min_norm"]) for d in digests)
    return [fmt_ms(zero, 1), fmt_ms(coll, 1), fmt_ms(low, 3)]


def _zeroed_tests(by_batch: dict[int, dict[str, list[dict]]], large: int, small: int):
    """Section 5.2 on zeroed-out filter counts (finished runs): more at the large batch without
    PGT; fewer with PGT; none with AGC. Tested only where some filter zeroed out."""
    claim = (
        "Sec. 5.2: without PGT filters zero out, more at large batch; PGT reduces this, AGC "
        "removes it"
    )
    every = [r for points in by_batch.values() for rs in points.values() for r in rs]
    if not any(_zeroed(every)):
        comparison = f"zeroed filters (norm < 1e-6) in {len(_digests(every))} finished runs"
        return [Test(claim, comparison, "-", math.nan, "-", math.nan, untestable="not observed")]

    def test(comparison: str, a: list[dict], b: list[dict], direction: int) -> Test:
        w = welch(_zeroed(a), _zeroed(b))
        sign = "> 0" if direction > 0 else "< 0"
        if w is None or not _finite(w.p):
            diff = w.diff if w else math.nan
            return Test(
                claim, comparison, _groups(a, b), diff, "Welch", math.nan, direction, 1, sign
            )
        method = f"Welch t = {w.t:.2f}"
        return Test(claim, comparison, _groups(a, b), w.diff, method, w.p, direction, 1, sign)

    tests = []
    if "baseline" in by_batch.get(large, {}) and "baseline" in by_batch.get(small, {}):
        tests.append(
            test(
                f"baseline at batch {large} - at {small}, zeroed filters",
                by_batch[large]["baseline"],
                by_batch[small]["baseline"],
                1,
            )
        )
    for batch, points in sorted(by_batch.items(), reverse=True):
        base = points.get("baseline")
        for key, rs in points.items():
            if base and key != "baseline" and rs[0]["method"] in ("pgt", "agc", "agc_pgt"):
                comparison = f"{_label(rs[0])} - baseline at batch {batch}, zeroed filters"
                tests.append(test(comparison, rs, base, -1))
    return tests


def _table2_tests(study: Study, batch: int, points: dict[str, list[dict]]) -> list[Test]:
    """Table 2 at one batch: each method vs the non-BN baseline (val top-1 at the final epoch,
    diverged runs at chance; Fisher on divergence), and AGC + PGT vs AGC, GC + PGT vs GC."""
    base = points.get("baseline")
    if not base:
        return []
    paper = study.paper
    paper_batch = base[0].get("paper_batch")
    where = f"batch {batch}" + (f" (the paper's {paper_batch})" if paper_batch else "")
    pairs = []  # (claim, name, runs, reference name, reference runs, paper's effect)
    for key, rs in points.items():
        if key == "baseline":
            continue
        row, name = rs[0].get("paper_row"), _label(rs[0])
        if row:
            claim = f"Table 2, {where}: {name} beats the non-BN baseline"
            effect = _paper_delta(paper, row, "test")
        elif rs[0]["method"] == "pgt":  # no paper row at this alpha and batch
            claim = f"Table 2's caption: PGT beats the non-BN baseline at any batch; here {where}"
            effect = "> 0"
        else:
            claim = f"Table 2, {where}: {name} beats the non-BN baseline"
            effect = "> 0"
        pairs.append((claim, name, rs, "baseline", base, effect))
    for combined, single in (("agc_pgt", "agc"), ("gc_pgt", "gc")):
        both = next((rs for rs in points.values() if rs[0]["method"] == combined), None)
        alone = next((rs for rs in points.values() if rs[0]["method"] == single), None)
        if both and alone:
            name, ref = _label(both[0]), _label(alone[0])
            rows = (both[0].get("paper_row"), alone[0].get("paper_row"))
            effect = _paper_delta(paper, rows[0], "test", rows[1]) if all(rows) else "-"
            claim = f"Table 2, {where}: {name} beats {ref}"
            pairs.append((claim, name, both, ref, alone, effect))
    tests = []
    for claim, name, rs, ref, ref_runs, effect in pairs:
        tests.append(
            _welch_test(
                claim,
                f"{name} - {ref}, val top-1 % (final epoch; diverged at chance)",
                rs,
                ref_runs,
                "val_top1",
                study.chance,
                direction=-1 if effect.startswith("-") else 1,
                paper=effect,
            )
        )
        divergence = _fisher_test(claim, name, rs, ref_runs, ref)
        tests += [divergence] if divergence else []
    return tests


def part_b(study: Study) -> Section:
    """(b) non-BN ResNet-18 at two batches: table, zeroed filters, Table 2 tests, Figs. 4-6."""
    names = [n for n, rs in study.groups.items() if rs[0]["part"] == "b"]
    if not names:
        return Section([], [], [])
    by_batch: dict[int, dict[str, list[dict]]] = defaultdict(dict)
    for name in names:
        rs = study.groups[name]
        by_batch[rs[0]["batch"]][name] = rs
    batches = sorted(by_batch, reverse=True)
    large, small = batches[0], batches[-1]
    first = study.groups[names[0]][0]
    heads = {b: next(iter(by_batch[b].values()))[0] for b in batches}
    paper_batch = {b: h["paper_batch"] for b, h in heads.items() if h.get("paper_batch")}
    md = [
        "",
        f"## (b) ResNet-18 without normalization, {first['epochs']} epochs: zeroed-out filters "
        "and accuracy",
        "",
        (
            "Batches: the paper's Table 2 compares batch 1024 with 256 over the same 100 "
            "epochs; "
            + ", ".join(f"batch {b} here stands for its {paper_batch[b]}" for b in paper_batch)
            + " (the same ratio), with lr 0.1 per 256 images. "
            if paper_batch
            else ""
        )
        + "Zeroed: filters whose weight L2 norm "
        "is below 1e-6 at the end (the paper's zeroed-out filters; "
        "`powergrad.diagnostics.ZERO_FILTER_NORM`), summed over the 20 conv layers (4,800 "
        "filters). Collapsed: filters whose norm ended below 10% of its first recorded value (a "
        "looser, scale-free measure). Min filter norm: the smallest final filter norm in the "
        "network (the plots show where the norms started); filter columns are over the finished "
        "runs. Diverged: runs stopped by a non-finite loss; "
        f"{divergence_note([r for n in names for r in study.groups[n]])}.",
        "",
        "| batch (paper's) | method | alpha | steps | n | diverged | train top-1 % | val top-1 % "
        "(diverged at chance) | val top-1 % (finished runs) | zeroed | collapsed "
        "| min filter norm |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for batch in batches:
        for rs in by_batch[batch].values():
            head = rs[0]
            steps = mean_std(_values(rs, "steps"))
            cells = [
                f"{batch} ({head.get('paper_batch') or '-'})",
                METHOD_NAMES[head["method"]],
                "-" if head["alpha"] is None else f"{head['alpha']:g}",
                f"{steps.mean:.0f}" if steps else "-",
                str(len(_ok(rs)) + _diverged(rs)),
                str(_diverged(rs)),
                _acc_cell(rs, "train_top1", study.chance),
                _acc_cell(rs, "val_top1", study.chance),
                fmt_ms(_stat(rs, "val_top1")),
                *_filter_cells(rs),
            ]
            # A point whose every run diverged has no finished run: say so, not "not run".
            none = "all diverged" if not _ok(rs) and _diverged(rs) else NOT_RUN
            md.append("| " + " | ".join(none if c == NOT_RUN else c for c in cells) + " |")
    by_method: dict[int, dict[str, list[dict]]] = {
        b: {("baseline" if rs[0]["method"] == "baseline" else n): rs for n, rs in p.items()}
        for b, p in by_batch.items()
    }
    tests = _zeroed_tests(by_method, large, small)
    for batch in batches:
        tests += _table2_tests(study, batch, by_method[batch])
    every = [r for n in names for r in study.groups[n]]
    zeroed = sum(sum(_zeroed([r])) for r in _ok(every))
    collapsed = sum(sum(d["collapsed"][-1]) for d in _digests(every))
    steps = max(_values(every, "steps"), default=0)
    notes = [
        "- **Section 5.2, zeroed-out filters**: "
        + (
            f"{zeroed:.0f} zeroed filters over the finished runs; tested above (Welch on the "
            "per-run counts)."
            if zeroed
            else "not observed at this scale: 0 zeroed filters in every finished run (and "
            f"{collapsed} collapsed below 10% of their initial norm), so the claim can be "
            "neither confirmed nor refuted here. The paper's Table 2 runs take 100 epochs of "
            "1.28M images, 125,000 (batch 1024) to 500,000 (batch 256) steps; these take at "
            f"most {steps:.0f} steps."
        ),
        "- **Table 2**: each method against the non-BN baseline at its batch on the final "
        "epoch's val top-1 (the paper's tables give the best epoch; the final one is what a "
        "diverged run leaves, counted at chance). At the large batch the paper ran only the "
        "baseline and PGT (alpha 0.92 at 1024); PGT 0.25 there tests its caption's 'at any "
        "batch size'. The paper's text calls the advantage of combining GC with PGT 'not "
        "very significant' (its table: GC + PGT +0.024 over GC).",
    ]
    for batch in batches:
        digests = {
            _label(rs[0]): _ok(rs)[0]["filter_norms"]
            for rs in by_batch[batch].values()
            if _ok(rs) and "trajectories" in _ok(rs)[0].get("filter_norms", {})
        }
        if digests:
            name = f"b_filter_norms_b{batch}.png"
            plot_filter_norms(
                digests,
                study.cpu_dir / name,
                title=f"ResNet-18 without normalization, batch {batch}, first seed",
            )
            md += ["", f"![filter norms, batch {batch}]({name})"]
    return Section(md, tests, notes)


# ---------------------------------------------------------------------------------------------
# The claims: Holm over every test, the verdict table, a reading per claim


def _verdict_table(tests: list[Test], adjusted: list[float]) -> list[str]:
    md = [
        "| claim | comparison | n (diverged) | effect (paper's) | test | raw p | Holm p "
        "| verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t, p_adj in zip(tests, adjusted, strict=True):
        diff = f"{t.diff:+.{t.digits}f}" if _finite(t.diff) else "-"
        found = _verdict_of(t, p_adj)
        cells = [t.claim, t.comparison, t.groups, f"{diff} ({t.paper})", t.method]
        md.append("| " + " | ".join([*cells, _fmt_p(t.p), _fmt_p(p_adj), found]) + " |")
    return md


def _verdict_of(test: Test, p_adjusted: float) -> str:
    found = verdict(test.diff, p_adjusted, test.direction)
    return test.untestable if found == "not testable" else found


READING = {
    "holds": "holds",
    "against the claim": "significantly against the claim",
    "within noise": "within noise (neither confirmed nor refuted at this scale)",
    "not testable": "not testable (a group has under 2 runs, or no variance)",
}


def _readings(tests: list[Test], adjusted: list[float]) -> list[str]:
    """One line per claim: which of its comparisons hold, go against it, or are within noise."""
    by_claim: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for t, p_adj in zip(tests, adjusted, strict=True):
        found, what = _verdict_of(t, p_adj), t.comparison
        if found == "within noise" and t.p < SIGNIFICANCE:
            side = "the claim's" if (t.diff > 0) == (t.direction > 0) else "the opposite"
            what += f" (raw p = {t.p:.3f}, {side} direction, not significant after Holm)"
        by_claim[t.claim][found].append(what)
    lines = []
    for claim, found in by_claim.items():
        annotated = any("after Holm" in c for cs in found.values() for c in cs)
        if set(found) == {"holds"}:
            overall = "holds at this scale"
        elif set(found) == {"against the claim"}:
            overall = "against the claim at this scale"
        elif len(found) == 1 and not annotated:
            overall = READING.get(next(iter(found)), next(iter(found)))
        else:
            overall = "; ".join(f"{READING.get(v, v)}: {', '.join(c)}" for v, c in found.items())
        lines.append(f"- **{claim}**: {overall}.")
    return lines


def _closing(study: Study, sections: list[Section]) -> list[str]:
    tests = [t for s in sections for t in s.tests]
    family = [i for i, t in enumerate(tests) if _finite(t.p)]
    adjusted = [math.nan] * len(tests)
    for i, p in zip(family, holm([tests[i].p for i in family]), strict=True):
        adjusted[i] = p
    epochs = max((r["epochs"] for r in study.runs), default=0)
    seeds = study.prov.get("seeds") or max((r["seed"] + 1 for r in study.runs), default=1)
    jobs = study.prov.get("jobs") or 2
    process_s = sum(r.get("process_wall_s") or 0.0 for r in study.runs)
    cpu_s = sum(r.get("process_cpu_s") or 0.0 for r in study.runs)
    rerun = (
        f"; rerunning it as it ran takes about {process_s / jobs / 60:.0f} minutes at {jobs} "
        "runs at a time on the machine above (the runs' process wall times, start-up "
        f"included, summed and divided by {jobs})"
        + (
            f"; the runs took {cpu_s / 60:.0f} CPU minutes (train.py and its loader worker), "
            "a measure that other jobs on the machine do not inflate"
            if cpu_s
            else ""
        )
        if process_s
        else ""
    )
    return [
        "",
        "## The paper's claims at this scale",
        "",
        f"{len(family)} two-sided tests: Welch's t-test (unequal variances; "
        "`scipy.stats.ttest_ind(equal_var=False)`) of a difference of means, Fisher's exact "
        "test of divergence counts (`scipy.stats.fisher_exact`), Spearman's and Pearson's "
        "correlations. Their p-values are adjusted together by Holm's step-down procedure "
        "(the chance that any verdict below is a false 'holds' or 'against the claim' is at "
        "most 5%). A claim *holds* where the Holm-adjusted p < 0.05 with the effect in the "
        "paper's direction, is *against the claim* where the adjusted p < 0.05 with the "
        "opposite effect, and is *within noise* otherwise. Diverged runs are counted, not "
        f"dropped: in accuracy tests a diverged run counts at chance level ({study.chance:g}%, "
        "the accuracy of a guess: the method failed at that point), and where a run of either "
        "group diverged, Fisher's exact test of the counts (paper's direction: fewer "
        "divergences) joins the family; where neither group diverged that test has nothing to "
        "compare (its p is 1 whatever the accuracies) and is left out. The effect column gives ours (a difference of "
        "means a - b, of diverged fractions, or a correlation coefficient) and, in parentheses, "
        "the paper's (ImageNet top-1, best epoch).",
        "",
        *_verdict_table(tests, adjusted),
        "",
        "Reading, per claim:",
        "",
        *_readings(tests, adjusted),
        "",
        "Notes:",
        "",
        *[n for s in sections for n in s.notes],
        "",
        "Scale caveat: each run sees 1,437 training images of 10 classes at 32x32 for "
        f"{epochs} epochs or fewer, under 1/{IMAGENET_TRAIN // (1437 * max(epochs, 1))} of one "
        "ImageNet epoch's images; effects of a few "
        "tenths of a percent on ImageNet are far below this study's seed-to-seed noise, so "
        "'within noise' is the expected outcome for the accuracy claims, not evidence against "
        "them.",
        "",
        "## Rerunning",
        "",
        f"This study used {seeds} seeds per point{rerun}. To rerun it from one clean commit "
        "(every run trained by that commit), from a clean checkout:",
        "",
        "```bash",
        "python scripts/cpu_study.py --fresh     # refuses a tree with uncommitted changes",
        "python scripts/report.py --cpu-only     # re-render this file from runs.json",
        "```",
    ]


def render_cpu_study(cpu_dir: Path = CPU_DIR, paper: dict[str, Any] | None = None) -> str | None:
    """Write ``cpu_dir``/README.md and plots from runs.json + provenance.json; return the
    markdown (None without a runs.json)."""
    study = load_study(Path(cpu_dir), paper)
    if study is None:
        return None
    sections = [part(study) for part in (part_a, part_c, part_b)]
    md = [*_header(study), *(line for s in sections for line in s.md)]
    text = "\n".join([*md, *_closing(study, sections)]) + "\n"
    (study.cpu_dir / "README.md").write_text(text)
    return text
