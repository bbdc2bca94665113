"""Outputs written so that a kill never leaves them half-written, mixed or lost.

- `atomic_path(path)`: write to a temporary file beside `path`; on success it is fsynced, renamed over `path`,
  and the folder fsynced, so after a crash `path` holds the old bytes or the new ones, never a part.
- `together(*paths)`: several files replaced as one unit (validate's splits, collect's rows and judgements,
  refeed's snapshots). Each is written to a temporary name and fsynced; then a journal naming every
  (temporary, final) pair is written and fsynced, the renames follow, and the journal goes last. A kill before
  the journal leaves the old set whole; a kill after it is rolled forward by `finish_interrupted` when the next
  stage starts, so no reader ever sees a new train split beside an old test split.
- `replace_folder(new, out)`: a checkpoint folder; the old one is kept until the new one is in place, and a
  kill after the new folder is complete is rolled forward by `finish_interrupted`.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

JOURNAL_DIR = Path(".rlhf") / "journal"  # relative to the project root, where stages run


def fsync_path(path: str | Path) -> None:
    """Flush a file's or a folder's entry to disk (a folder's fsync makes renames inside it durable)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary_beside(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """A temporary path to write `path`'s new content to; renamed into place durably when the block succeeds."""
    path = Path(path)
    tmp = _temporary_beside(path)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _write_journal(name: str, entry: dict) -> Path:
    JOURNAL_DIR.mkdir(parents=True, exist_ok=True)
    journal = JOURNAL_DIR / f"{name}.json"
    write_text(journal, json.dumps(entry))
    return journal


def _remove_journal(journal: Path) -> None:
    journal.unlink(missing_ok=True)
    fsync_path(journal.parent)


@contextlib.contextmanager
def together(*paths: str | Path):
    """Temporary paths to write each of `paths` to (in order); all replace their finals as one unit on success."""
    finals = [Path(p) for p in paths]
    temporaries = [_temporary_beside(p) for p in finals]
    try:
        yield temporaries
        for tmp in temporaries:
            fsync_path(tmp)
    except BaseException:
        for tmp in temporaries:
            tmp.unlink(missing_ok=True)
        raise
    pairs = [(str(t.resolve()), str(f.resolve())) for t, f in zip(temporaries, finals)]
    journal = _write_journal(f"files-{os.getpid()}-{id(temporaries)}", {"kind": "files", "pairs": pairs})
    # from here on the new set is committed: an interruption leaves the journal and the temporaries, and
    # finish_interrupted completes the renames
    _roll_forward(pairs)
    _remove_journal(journal)


def _roll_forward(pairs: list[tuple[str, str]]) -> None:
    for tmp, final in pairs:
        if Path(tmp).exists():
            os.replace(tmp, final)
    for folder in {Path(final).parent for _, final in pairs}:
        fsync_path(folder)


def replace_folder(new: str | Path, out: str | Path) -> None:
    """Put the complete folder `new` (beside `out`) in place of `out`; the old one is deleted only after."""
    new, out = Path(new), Path(out)
    for file in new.rglob("*"):
        if file.is_file():
            fsync_path(file)
    fsync_path(new)
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    journal = _write_journal(f"folder-{out.name}-{os.getpid()}",
                             {"kind": "folder", "new": str(new.resolve()), "out": str(out.resolve()),
                              "old": str(old.resolve())})
    if out.exists():
        os.replace(out, old)
    os.replace(new, out)
    fsync_path(out.parent)
    _remove_journal(journal)
    shutil.rmtree(old, ignore_errors=True)


def finish_interrupted() -> list[str]:
    """Complete the swaps a killed process left half-done (see the module's docstring); what was repaired."""
    repaired = []
    for journal in sorted(JOURNAL_DIR.glob("*.json")) if JOURNAL_DIR.exists() else []:
        try:
            entry = json.loads(journal.read_text())
        except (OSError, ValueError):  # a journal is written atomically; an unreadable one was never complete
            _remove_journal(journal)
            continue
        if entry["kind"] == "files":
            _roll_forward(entry["pairs"])
            repaired.append(", ".join(final for _, final in entry["pairs"]))
        else:
            new, out, old = Path(entry["new"]), Path(entry["out"]), Path(entry["old"])
            if new.exists():  # complete (the journal comes after it): roll forward
                if out.exists():
                    shutil.rmtree(old, ignore_errors=True)
                    os.replace(out, old)
                os.replace(new, out)
            elif not out.exists() and old.exists():
                os.replace(old, out)
            fsync_path(out.parent)
            shutil.rmtree(old, ignore_errors=True)
            repaired.append(str(out))
        _remove_journal(journal)
    return repaired
