"""Files that fail while a run reads them (corrupt past the header, deleted mid-run).

The start-up check (powergrad.data.layout) removes what the cheap sniff and the bad-file manifest
find; this module handles what only a decoder finds, in both backends, under `data.on_bad_file`:

error
    stop with DatasetError naming the file.
skip
    train: the sample is replaced by the next readable file of the listing (index + 1, + 2, ...,
    the same rule on every backend and world size, so the global batches stay identical for a
    given set of bad files); val: the sample is dropped (scoring a substitute would count an
    image twice). Each file is warned about once, counted, and appended to RUN_DIR/bad_files.log
    as `relative/path<TAB>reason (split, epoch, rank)`, the manifest format: copy it to
    ROOT/bad_files.tsv and later runs leave those files out at start.

MAX_CONSECUTIVE_BAD unreadable files in a row mean the dataset itself is gone (unmounted,
deleted): that stops the run under either policy.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from powergrad.data.layout import DatasetError

BAD_FILE_LOG_NAME = "bad_files.log"
MAX_CONSECUTIVE_BAD = 32
_HINT = (
    "run `python scripts/check_dataset.py ROOT` once: it decodes every file and lists the bad "
    "ones in ROOT/bad_files.tsv, which the loaders leave out at start"
)


def describe_error(error: BaseException) -> str:
    """One line, no tabs: the exception type and the first line of its message (<= 200 chars)."""
    text = str(error).strip().splitlines()
    first = text[0][:200] if text else ""
    return f"{type(error).__name__}: {first}".replace("\t", " ")


class BadFileLog:
    """The policy, the count and the log of files that failed during the run, for one rank.

    bad: absolute path -> reason of each distinct file met; skipped: samples skipped so far
    (a file met in several epochs counts each time). Both are local to this rank.
    """

    def __init__(
        self, root: str, policy: str, log_path: str | os.PathLike | None = None, rank: int = 0
    ) -> None:
        self.root, self.policy, self.rank = root, policy, rank
        self.log_path = Path(log_path) if log_path is not None else None
        self.bad: dict[str, str] = {}
        self.skipped = 0

    def report(self, path: str, reason: str, *, split: str, epoch: int | None = None) -> None:
        """Apply the policy to one failed file: raise DatasetError, or count, warn and log it."""
        reason = " ".join(reason.split())
        where = (
            f"{split}" + (f", epoch {epoch}" if epoch is not None else "") + f", rank {self.rank}"
        )
        if self.policy == "error":
            raise DatasetError(
                f"cannot read {path} during the run ({reason}; {where}). data.on_bad_file=error "
                f"stops here: {_HINT}, or set data.on_bad_file=skip"
            )
        self.skipped += 1
        if path in self.bad:
            return
        self.bad[path] = reason
        action = "replaced by the next readable file" if split == "train" else "left out"
        logged = f"; listed in {self.log_path}" if self.log_path is not None else ""
        warnings.warn(
            f"unreadable file {path} ({reason}; {where}): {action} (data.on_bad_file=skip){logged}",
            stacklevel=3,
        )
        if self.log_path is not None:
            self._append(f"{os.path.relpath(path, self.root)}\t{reason} ({where})\n")

    def too_many(self, first: str) -> DatasetError:
        """The error for MAX_CONSECUTIVE_BAD unreadable files in a row starting at `first`."""
        return DatasetError(
            f"{MAX_CONSECUTIVE_BAD} consecutive files unreadable, starting at {first}: is the "
            f"dataset under {self.root} still there (unmounted, deleted, permissions)?"
        )

    def _append(self, line: str) -> None:
        # Every rank appends to the same file: one write per line in append mode (O_APPEND)
        # keeps lines whole on a local file system.
        assert self.log_path is not None
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        header = (
            "# files that failed to read during the run (relative to "
            f"{self.root}); the manifest format: copy to ROOT/bad_files.tsv to skip them at start\n"
        )
        try:
            with open(self.log_path, "x") as f:
                f.write(header)
        except FileExistsError:
            pass
        with open(self.log_path, "a") as f:
            f.write(line)
