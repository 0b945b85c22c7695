"""Logs a cluster can read: no carriage-return stream without a terminal, step lines in
RUN_DIR/train.log (Hydra's job log) through the ``powergrad`` logger."""

import re

from conftest import TINY as CONFTEST_TINY
from conftest import run_train

TINY = [
    *(o for o in CONFTEST_TINY if o not in ("trainer.progress=false",)),
    "trainer.log_every_steps=1",
]


def test_without_a_terminal_step_lines_go_to_train_log_and_stderr_has_no_bar(tmp_path):
    run_dir = tmp_path / "run"
    # trainer.progress=true (the default), but stderr is a pipe here, as under sbatch.
    proc = run_train([*TINY, "trainer.progress=true", f"hydra.run.dir={run_dir}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "\r" not in proc.stderr
    assert "\r" not in proc.stdout
    log = (run_dir / "train.log").read_text()
    steps = re.findall(
        r"\[powergrad\]\[INFO\] - epoch (\d)/2 step (\d)/4 loss [\d.]+ lr \S+ "
        r"images/s [\d.]+ ETA \d+:\d\d:\d\d",
        log,
    )
    assert [(int(e), int(s)) for e, s in steps] == [(1, 1), (1, 2), (2, 3), (2, 4)], log
    assert len(re.findall(r"epoch \d/2 done: step \d loss \S+ train \S+ val \S+", log)) == 2, log
