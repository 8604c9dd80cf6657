"""Where pqflex keeps what it writes to disk: one directory for all of it.

``$PQFLEX_CACHE_DIR``, else ``$XDG_CACHE_HOME/pqflex``, else ``~/.cache/pqflex``. It holds converted models
(``models/``: the embedded default model is about 0.5 GB), written by the harness when asked for a model; the
library itself writes nothing (its native kernels are built at install time). ``pip uninstall pqflex`` leaves the
directory, and ``pqflex cache --clear`` (or :func:`clear`) removes it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def cache_dir() -> Path:
    """The directory (it may not exist yet)."""
    if os.environ.get("PQFLEX_CACHE_DIR"):
        return Path(os.environ["PQFLEX_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pqflex"


def _size(path: Path) -> int:
    if path.is_file() or path.is_symlink():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() or p.is_symlink())


def entries() -> list[tuple[Path, int]]:
    """What the directory holds: each top-level entry (and each converted model) with its size in bytes."""
    root = cache_dir()
    if not root.is_dir():
        return []
    out = []
    for path in sorted(root.iterdir()):
        if path.name == "models" and path.is_dir():
            out += [(model, _size(model)) for model in sorted(path.iterdir())]
        else:
            out.append((path, _size(path)))
    return out


def clear() -> int:
    """Remove the directory and everything in it; returns the bytes freed."""
    root = cache_dir()
    if not root.exists():
        return 0
    freed = _size(root)
    shutil.rmtree(root)
    return freed
