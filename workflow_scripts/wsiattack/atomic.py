"""The one write path of every output: write to a temporary sibling, rename into place on success.

A killed writer leaves only ``.<name>.tmp-*`` debris, which the next writer of the same output
removes, never a file or directory that looks finished (the profile's ``rerun-incomplete`` then
redoes the job). Standard library only, so every rule's environment can import it; ``stores``
re-exports it beside ``atomic_store`` (zarr stores).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


def fresh_temp_sibling(path: Path) -> Path:
    """A new temporary path beside ``path``, after removing the ones a killed writer left.

    Only one job writes a given output at a time (Snakemake locks the directory), so any
    ``.name.tmp-*`` sibling is debris of an earlier attempt, never work in progress.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_file(path: Path | str) -> Iterator[Path]:
    """Yield a temporary sibling path to write a file to; rename it to ``path`` on success only."""
    path = Path(path)
    tmp = fresh_temp_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: Path | str) -> Iterator[Path]:
    """Yield a fresh temporary directory; rename it to ``path`` on success only.

    The per-shard outputs (one store per slide inside) are written this way: a job killed
    mid-shard leaves no directory that looks complete, and its re-run redoes that shard only.
    """
    path = Path(path)
    tmp = fresh_temp_sibling(path)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():  # Snakemake removes outputs before a job; a manual re-run may not.
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
