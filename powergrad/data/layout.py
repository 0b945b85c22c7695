"""Dataset layout check: ROOT/{train,val}/<class>/<file>, cheap bad-file sniffing, manifests.

The check runs before any model is built and reports every problem with its path:
missing split, empty class, train/val class mismatch, and files that cannot be decoded.
`sniff_file` is the cheap test (size, magic bytes, end marker); its results are cached per
dataset keyed by the listing (path, size, mtime), so a second start does not reread the files.
Under DDP one rank per node runs the check (`check_dataset_per_node`) and the node's other ranks
read its listing from the cache. scripts/check_dataset.py does the full decode scan and writes a
bad-file manifest (`read_bad_manifest`), which the loaders also skip.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import stat
import warnings
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from powergrad import distributed as pgdist
from powergrad.fileio import atomic_write

SPLITS = ("train", "val")
BAD_MANIFEST_NAME = "bad_files.tsv"
# Bytes read from the end of a file to find its end marker: ImageNet has JPEGs with a few
# hundred bytes of padding after EOI, which are valid.
_TAIL_BYTES = 4096
_CHECK_CACHE_VERSION = 1
_LISTING_CACHE_VERSION = 1


class DatasetError(ValueError):
    """The dataset folder is not usable; the message names the offending paths."""


@dataclass
class Sample:
    """One image: path relative to the dataset root, and its class index."""

    path: str
    label: int


@dataclass
class Listing:
    """The checked dataset: sorted classes and per-split samples with bad files removed."""

    root: str
    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    # Relative path -> reason, for files excluded from `train` / `val`.
    bad: dict[str, str] = field(default_factory=dict)

    def files(self, split: str) -> list[str]:
        """Absolute paths of `split`'s samples, in listing order."""
        samples = self.train if split == "train" else self.val
        return [os.path.join(self.root, s.path) for s in samples]

    def labels(self, split: str) -> list[int]:
        """Class indices of `split`'s samples, in listing order."""
        samples = self.train if split == "train" else self.val
        return [s.label for s in samples]

    def digest(self) -> str:
        """The file list in one line: image counts and a hash of every (split, path, class).

        Saved in a checkpoint and compared at resume (:func:`file_list_change`): a different
        list (files added, removed, newly listed as bad) changes the sample order of the
        remaining epochs.
        """
        h = hashlib.sha256()
        for c in self.classes:
            h.update(f"class\0{c}\n".encode())
        for s in self.train + self.val:
            h.update(f"{s.path}\0{s.label}\n".encode())
        return f"train={len(self.train)} val={len(self.val)} sha256={h.hexdigest()[:16]}"


def file_list_change(saved: str | None, current: str) -> str | None:
    """None when a checkpoint's file-list digest equals the current one, else a message.

    `saved` is what `Listing.digest()` (or `Loaders.file_list_digest()`) returned when the
    checkpoint was written; None (an older checkpoint) also yields None: nothing to compare.
    """
    if saved is None or saved == current:
        return None

    def counts(digest: str) -> dict[str, str]:
        return dict(part.split("=", 1) for part in digest.split() if "=" in part)

    old, new = counts(saved), counts(current)
    sizes = ", ".join(
        f"{split} {old.get(split, '?')} -> {new.get(split, '?')} images" for split in SPLITS
    )
    return (
        f"the dataset's file list changed since the checkpoint ({sizes}; digest {saved!r} -> "
        f"{current!r}): files were added, removed or newly listed as bad, so the remaining "
        "epochs see another sample order than the interrupted run would have"
    )


def default_cache_dir() -> Path:
    """Cache directory: $POWERGRAD_CACHE, else ~/.cache/powergrad."""
    env = os.environ.get("POWERGRAD_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "powergrad"


def sniff_bytes(head: bytes, tail: bytes, size: int) -> str:
    """Classify a file from its first bytes and last bytes; '' means it looks decodable.

    Catches what makes decoders fail outright: empty files, non-image content, formats one of
    the backends cannot read, and truncated JPEG / PNG files (no end marker near the end).
    """
    if size == 0:
        return "empty file"
    if head.startswith(b"\xff\xd8\xff"):
        # JPEG: the EOI marker FFD9 must be near the end; entropy-coded data never contains it
        # (FF is byte-stuffed), so its absence in the tail means the file was cut short.
        return "" if b"\xff\xd9" in tail else "truncated JPEG (no EOI marker)"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "" if b"IEND" in tail else "truncated PNG (no IEND chunk)"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return ""
    if head[:2] == b"BM" or head[:4] in (b"II*\x00", b"MM\x00*"):
        return ""
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF is not supported by DALI"
    return "not an image (unknown format)"


# JPEG start-of-frame markers (baseline, extended, progressive, lossless, arithmetic variants);
# 0xC4 (DHT), 0xC8 (reserved) and 0xCC (DAC) share the range but are not frames.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Segments walked before giving up on finding the scan (real files have a few dozen at most).
_JPEG_MAX_SEGMENTS = 4096


def jpeg_header_problem(f: BinaryIO) -> str:
    """Walk a JPEG's marker segments from SOI to the first scan (SOS); '' if the structure holds.

    Reads a few bytes per segment (seeks over the payloads), so it is cheap; catches corrupt or
    cut-off headers, files without a frame header and frames of zero width (height 0 is legal
    in a frame header: it may follow in a DNL marker, which decoders then reject), all of which
    make decoders fail outright.
    """
    pos, frame = 2, False
    for _ in range(_JPEG_MAX_SEGMENTS):
        f.seek(pos)
        # marker (2 bytes), length (2), and for a frame: precision (1), height (2), width (2)
        head = f.read(9)
        if len(head) < 2:
            return "truncated JPEG header"
        if head[0] != 0xFF:
            return f"corrupt JPEG header (no marker at byte {pos})"
        marker = head[1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == 0xDA:
            return "" if frame else "corrupt JPEG header (scan before frame header)"
        if marker == 0xD9:
            return "JPEG without image data (EOI before scan)"
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # standalone markers, no length
            pos += 2
            continue
        if len(head) < 4 or int.from_bytes(head[2:4], "big") < 2:
            return f"corrupt JPEG header (bad segment length at byte {pos})"
        if marker in _JPEG_SOF:
            if len(head) < 9 or head[7:9] == b"\0\0":
                return "corrupt JPEG header (zero image width)"
            frame = True
        pos += 2 + int.from_bytes(head[2:4], "big")
    return "corrupt JPEG header (too many segments)"


def sniff_file(path: str | os.PathLike) -> str:
    """Cheap decodability check of one file on disk; '' if it looks fine, else the reason.

    sniff_bytes on the first and last bytes, plus the JPEG marker walk for JPEGs.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - _TAIL_BYTES))
            tail = f.read()
            problem = sniff_bytes(head, tail, size)
            if not problem and head.startswith(b"\xff\xd8"):
                problem = jpeg_header_problem(f)
    except OSError as e:
        return f"unreadable: {e.strerror or e}"
    return problem


def _follow(entry: os.DirEntry) -> tuple[int | None, str]:
    """(st_mode of what the entry is or links to, ''), or (None, why it cannot be followed)."""
    try:
        return entry.stat().st_mode, ""
    except FileNotFoundError:
        return None, "broken symlink (its target does not exist)"
    except OSError as e:
        return None, "symlink loop" if e.errno == errno.ELOOP else f"unreadable: {e.strerror}"


def _entry_problem(entry: os.DirEntry) -> str:
    """'' for a regular file (or a symlink to one); else why the entry cannot be read as an
    image. Never opens the entry (a FIFO would block); a plain file costs no system call."""
    if entry.is_file(follow_symlinks=False):
        return ""
    mode, why = _follow(entry)
    if mode is None or stat.S_ISREG(mode):
        return why
    if stat.S_ISDIR(mode):
        return "a folder inside a class folder (only its files are read)"
    kind = "FIFO" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode) else "device"
    return f"not a regular file ({kind})"


def _scandir(path: Path) -> list[os.DirEntry]:
    """The entries of a folder, or DatasetError naming it (loop, permissions, I/O error)."""
    try:
        with os.scandir(path) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError as e:
        reason = "a symlink loop" if e.errno == errno.ELOOP else e.strerror or str(e)
        raise DatasetError(f"cannot list {path}: {reason}") from None


def scan_split(root: Path, split: str) -> tuple[dict[str, list[os.DirEntry]], dict[str, str]]:
    """One split's class folders: (class name -> sorted image file entries, relative path ->
    reason for each entry of a class folder that cannot be an image: a broken symlink, a
    symlink loop, a FIFO, socket or device, a subfolder). Hidden entries are ignored.

    Raises DatasetError naming the path for a missing split, a split without class folders, and
    a class entry that is a broken symlink, a symlink loop or an unreadable folder.
    """
    split_dir = root / split
    if not split_dir.is_dir():
        what = "not a folder" if split_dir.exists() else "missing split folder"
        if split_dir.is_symlink() and not split_dir.exists():
            what = "broken symlink or symlink loop"
        raise DatasetError(f"{what}: {split_dir} (expected ROOT/{split}/<class>/*)")
    classes: dict[str, list[os.DirEntry]] = {}
    odd: dict[str, str] = {}
    entries = _scandir(split_dir)
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_symlink():  # a class folder linked from elsewhere may be gone
            mode, why = _follow(entry)
            if mode is None:
                raise DatasetError(f"class folder {entry.path}: {why}")
        if not entry.is_dir():
            continue
        files = []
        for e in _scandir(Path(entry.path)):
            if e.name.startswith("."):
                continue
            why = _entry_problem(e)
            if why:
                odd[f"{split}/{entry.name}/{e.name}"] = why
            else:
                files.append(e)
        classes[entry.name] = files
    if not classes:
        hint = ""
        if any(e.is_file() for e in entries):
            hint = "; it holds loose files: for ImageNet's flat val folder run scripts/prepare_imagenet.py"
        raise DatasetError(
            f"no class folders in {split_dir} (expected {split_dir}/<class>/*){hint}"
        )
    return classes, odd


def list_split(root: Path, split: str) -> dict[str, list[os.DirEntry]]:
    """Class name -> sorted image file entries of one split (:func:`scan_split` without the
    entries that cannot be images)."""
    return scan_split(root, split)[0]


def _listing_key(root: Path, entries: Iterable[tuple[str, os.DirEntry]]) -> tuple[str, list]:
    """Digest of (relative path, size, mtime_ns) of every file, and the stat rows."""
    digest = hashlib.sha256()
    rows = []
    for rel, e in entries:
        st = e.stat()
        rows.append((rel, st.st_size))
        digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    digest.update(str(root.resolve()).encode())
    return digest.hexdigest(), rows


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text)


def _cache_file(cache_dir: Path, root: Path, suffix: str) -> Path:
    root_id = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    return cache_dir / "checks" / f"{root_id}{suffix}"


def cheap_check(
    root: Path, entries: list[tuple[str, os.DirEntry]], cache_dir: Path | None, threads: int = 8
) -> dict[str, str]:
    """Sniff every file (cached by listing digest); returns relative path -> reason for bad ones."""
    key, _ = _listing_key(root, entries)
    cache_file = None
    if cache_dir is not None:
        cache_file = _cache_file(cache_dir, root, ".json")
        try:
            cached = json.loads(cache_file.read_text())
            if cached.get("version") == _CHECK_CACHE_VERSION and cached.get("key") == key:
                return dict(cached["bad"])
        except (OSError, ValueError, KeyError):
            pass
    with ThreadPoolExecutor(max_workers=threads) as pool:
        reasons = list(pool.map(lambda item: sniff_file(item[1].path), entries))
    bad = {rel: why for (rel, _), why in zip(entries, reasons, strict=True) if why}
    if cache_file is not None:
        try:
            payload = {"version": _CHECK_CACHE_VERSION, "root": str(root.resolve()), "key": key}
            _atomic_write_text(cache_file, json.dumps({**payload, "bad": bad}, indent=0))
        except OSError:
            # A read-only cache only costs a re-sniff next start.
            pass
    return bad


def read_bad_manifest(path: str | os.PathLike) -> dict[str, str]:
    """Read a bad-file manifest: lines `relative/path<TAB>reason`, '#' starts a comment."""
    bad = {}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(
            f"bad-file manifest {path} is not readable as text ({type(e).__name__}: {e}); "
            "write it again with scripts/check_dataset.py"
        ) from None
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        rel, _, why = line.partition("\t")
        bad[rel.strip()] = why.strip() or "listed in bad-file manifest"
    return bad


def write_bad_manifest(path: str | os.PathLike, bad: dict[str, str], scanned: int) -> None:
    """Write the manifest read by `read_bad_manifest` (atomically)."""
    lines = [
        f"# bad files found by a full decode scan of {scanned} files; loaders skip these",
        *(f"{rel}\t{why}" for rel, why in sorted(bad.items())),
    ]
    _atomic_write_text(Path(path), "\n".join(lines) + "\n")


def format_bad(bad: dict[str, str], root: str, limit: int = 20) -> str:
    """Human-readable list of bad files with absolute paths (first `limit`)."""
    items = sorted(bad.items())
    text = "\n".join(f"  {os.path.join(root, rel)}: {why}" for rel, why in items[:limit])
    if len(items) > limit:
        text += f"\n  ... and {len(items) - limit} more"
    return text


def check_dataset(
    root: str | os.PathLike,
    *,
    on_bad_file: str = "skip",
    bad_manifest: str | os.PathLike | None = None,
    cache_dir: Path | None = None,
    sniff: bool = True,
) -> Listing:
    """Check ROOT/{train,val}/<class>/* and return the usable listing.

    Raises DatasetError naming paths for: a missing root or split, a split without class folders,
    an empty class, train/val class mismatch, and (with on_bad_file="error") bad files. With
    "skip", bad files (entries that are not files: broken symlinks, symlink loops, FIFOs,
    subfolders; the cheap sniff; the manifest, ROOT/bad_files.tsv by default) are left out and
    listed in a warning. Classes are the sorted train folder names, labels their indices.
    """
    root_path = Path(root)
    if not root_path.is_dir():
        raise DatasetError(f"dataset root not found: {root_path}")
    scanned = {split: scan_split(root_path, split) for split in SPLITS}
    splits = {split: classes for split, (classes, _) in scanned.items()}
    # Entries of class folders that cannot be images (broken symlinks, FIFOs, ...): bad files.
    odd = {rel: why for _, entries in scanned.values() for rel, why in entries.items()}
    empty = [
        str(root_path / split / cls)
        for split, classes in splits.items()
        for cls, files in classes.items()
        if not files and not any(rel.startswith(f"{split}/{cls}/") for rel in odd)
    ]
    if empty:
        raise DatasetError("empty class folders:\n  " + "\n  ".join(empty))
    train_cls, val_cls = set(splits["train"]), set(splits["val"])
    if train_cls != val_cls:
        only_train = sorted(train_cls - val_cls)
        only_val = sorted(val_cls - train_cls)
        raise DatasetError(
            f"train/val class mismatch under {root_path}:\n"
            f"  only in {root_path / 'train'}: {only_train[:20]}{' ...' if len(only_train) > 20 else ''}\n"
            f"  only in {root_path / 'val'}: {only_val[:20]}{' ...' if len(only_val) > 20 else ''}"
        )
    classes = sorted(train_cls)
    entries = [
        (f"{split}/{cls}/{e.name}", e)
        for split in SPLITS
        for cls in classes
        for e in splits[split][cls]
    ]
    bad: dict[str, str] = dict(odd)
    if sniff:
        bad.update(cheap_check(root_path, entries, cache_dir))
    manifest = Path(bad_manifest) if bad_manifest else root_path / BAD_MANIFEST_NAME
    if bad_manifest and not manifest.is_file():
        raise DatasetError(f"bad-file manifest not found: {manifest}")
    if manifest.is_file():
        known = {rel for rel, _ in entries}
        bad.update({rel: why for rel, why in read_bad_manifest(manifest).items() if rel in known})
    if bad:
        message = f"{len(bad)} undecodable file(s) under {root_path}:\n" + format_bad(
            bad, str(root_path)
        )
        if on_bad_file == "error":
            raise DatasetError(message + "\n(set data.on_bad_file=skip to leave them out)")
        warnings.warn(message + "\nskipping them (data.on_bad_file=skip)", stacklevel=2)
    index = {cls: i for i, cls in enumerate(classes)}
    samples: dict[str, list[Sample]] = {split: [] for split in SPLITS}
    for rel, _ in entries:
        if rel in bad:
            continue
        split, cls, _ = rel.split("/", 2)
        samples[split].append(Sample(rel, index[cls]))
    for split in SPLITS:
        if not samples[split]:
            raise DatasetError(f"no usable images left in {root_path / split}")

    # A class whose files are all bad would train (or be scored) with zero images.
    def _entries_in(split: str, cls: str) -> int:
        return len(splits[split][cls]) + sum(r.startswith(f"{split}/{cls}/") for r in odd)

    hollow = [
        f"{root_path / split / cls} ({_entries_in(split, cls)} file(s), none usable)"
        for split in SPLITS
        for cls in classes
        if not any(s.label == index[cls] for s in samples[split])
    ]
    if hollow:
        raise DatasetError(
            "classes without a usable image (every file is bad):\n  "
            + "\n  ".join(hollow[:50])
            + (f"\n  ... and {len(hollow) - 50} more" if len(hollow) > 50 else "")
            + "\nremove the class on both splits or replace its files"
        )
    return Listing(str(root_path), classes, samples["train"], samples["val"], bad)


def check_dataset_per_node(
    root: str | os.PathLike, *, local_rank: int, cache_dir: Path, **check: object
) -> Listing:
    """:func:`check_dataset` once per node: its local rank 0 checks, the others read its result.

    Every rank of a node would otherwise list (one stat per file) and, on a first start, sniff
    every file of the dataset: 8 ranks x 1.33M files for ImageNet on a shared filesystem.
    Here the node's local rank 0 runs the check and writes the listing (or the DatasetError it
    raised) to ``CACHE/checks/<root id>.listing.json`` with a token drawn for this start; after
    a barrier the node's other ranks read it. The barrier is an ordinary collective: it waits
    for the slowest node's check, up to the process group's timeout (trainer.dist_timeout_min).
    A rank that finds another token there (a cache it cannot write, another job starting on the
    same dataset at the same moment) checks the dataset itself. Without a process group of more
    than one rank this is :func:`check_dataset`. ``check``: check_dataset's keyword arguments.
    """
    if pgdist.world_size() == 1:
        return check_dataset(root, cache_dir=cache_dir, **check)
    token = pgdist.broadcast_object(secrets.token_hex(8))
    path = _cache_file(cache_dir, Path(root), ".listing.json")
    listing = error = None
    if local_rank == 0:
        try:
            listing = check_dataset(root, cache_dir=cache_dir, **check)
        except DatasetError as e:
            error = str(e)
        try:
            _write_listing(path, token, listing, error)
        except OSError as e:
            warnings.warn(
                f"cannot share the dataset check with this node's ranks: {e}", stacklevel=2
            )
    pgdist.barrier()
    if local_rank != 0:
        listing, error = _read_listing(path, token) or (None, None)
        if listing is None and error is None:
            listing = check_dataset(root, cache_dir=cache_dir, **check)
    if error is not None:
        raise DatasetError(error)
    return listing


def _write_listing(path: Path, token: str, listing: Listing | None, error: str | None) -> None:
    """The check's result as JSON: per split, each class's file names in listing order."""
    payload: dict[str, object] = {"token": token, "version": _LISTING_CACHE_VERSION}
    if listing is None:
        payload["error"] = error
    else:
        payload.update(root=listing.root, classes=listing.classes, bad=listing.bad)
        for split in SPLITS:
            names: list[list[str]] = [[] for _ in listing.classes]
            for s in listing.train if split == "train" else listing.val:
                names[s.label].append(s.path.rsplit("/", 1)[1])
            payload[split] = names
    _atomic_write_text(path, json.dumps(payload, separators=(",", ":")))


def _read_listing(path: Path, token: str) -> tuple[Listing | None, str | None] | None:
    """(listing, None) or (None, error) written by this start's local rank 0; None otherwise."""
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if payload.get("token") != token or payload.get("version") != _LISTING_CACHE_VERSION:
        return None
    if "error" in payload:
        return None, payload["error"]
    classes = payload["classes"]
    samples = {
        split: [
            Sample(f"{split}/{cls}/{name}", label)
            for label, cls in enumerate(classes)
            for name in payload[split][label]
        ]
        for split in SPLITS
    }
    listing = Listing(payload["root"], classes, samples["train"], samples["val"], payload["bad"])
    return listing, None
