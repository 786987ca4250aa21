"""Named real-text corpora that every machine already holds (issue 18): smooth losses for scaling-law and FP8
studies, where the embedded arithmetic corpus gives step functions.

    corpus = load_corpus("stdlib")
    corpus.train, corpus.heldout      # documents (one per source file)
    corpus.info["sha256"]             # what exactly was read, recorded in every run

`stdlib`: the Python standard library's own sources (the `.py` files of the running interpreter's `stdlib` path,
its test suites, site-packages and files that are not UTF-8 left out: ~12 MB of code on CPython 3.11; code is a
third of Ling's reasoning data, SPEC §2). No download, the same bytes on every machine with the same Python.

The held-out split is by file: a file is held out when a stable hash of its path (relative to the library root)
falls under `heldout_percent`, so no held-out file shares text with a training one. `info` names the corpus, its
root and Python version, the file and byte counts, and a SHA-256 over every (path, content) pair in order: two runs
trained on the same text have the same hash, and `linglab train --resume` refuses a corpus that changed.
"""

from __future__ import annotations

import hashlib
import platform
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from linglab.errors import LinglabError

CORPORA = ("stdlib",)
HELDOUT_PERCENT = 5
_LEFT_OUT_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


@dataclass
class Corpus:
    train: list[str]
    heldout: list[str]
    info: dict


def stdlib_root() -> Path:
    """The running interpreter's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path) -> list[tuple[str, Path]]:
    """(path relative to the root, path) of every `.py` file of the standard library, sorted, tests left out."""
    files = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if not _LEFT_OUT_DIRS & set(relative.parts[:-1]):
            files.append((relative.as_posix(), path))
    return files


def is_heldout(relative_path: str, percent: int = HELDOUT_PERCENT) -> bool:
    digest = hashlib.blake2b(relative_path.encode(), digest_size=8, person=b"linglab-corpus").digest()
    return int.from_bytes(digest, "big") % 100 < percent


def load_corpus(name: str, heldout_percent: int = HELDOUT_PERCENT) -> Corpus:
    """The corpus `name` (one of CORPORA) split into train and held-out documents, with its `info`."""
    if name not in CORPORA:
        raise LinglabError(f"data.corpus: unknown corpus {name!r}; expected one of {', '.join(CORPORA)}")
    root = stdlib_root()
    files = stdlib_files(root)
    if not files:
        raise LinglabError(f"data.corpus {name}: no .py files under {root}")
    digest, train, heldout, skipped, size = hashlib.sha256(), [], [], 0, 0
    for relative, path in files:
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            skipped += 1
            continue
        if not text.strip():
            continue
        digest.update(relative.encode() + b"\0" + raw + b"\0")
        size += len(raw)
        (heldout if is_heldout(relative, heldout_percent) else train).append(text)
    info = {"name": name, "root": str(root), "python": platform.python_version(),
            "files": len(train) + len(heldout), "heldout_files": len(heldout), "bytes": size,
            "skipped_non_utf8": skipped, "heldout_percent": heldout_percent, "sha256": digest.hexdigest()}
    if not train or not heldout:
        raise LinglabError(f"data.corpus {name}: {len(train)} train and {len(heldout)} held-out files; need both")
    return Corpus(train, heldout, info)
