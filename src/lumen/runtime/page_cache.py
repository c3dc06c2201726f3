"""Drop a model's files from the OS page cache, so the next load reads the disk.

A worker restarted on the same machine would otherwise read its weights back from memory at
tens of GB/s, which hides the reload cost that recovery policies differ on. After a real node
failure (reboot, replacement) the cache is cold; `lumen serve --cold-restart` models that.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger("lumen.page_cache")

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


def weight_files(model_dir: str | Path) -> list[Path]:
    d = Path(model_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def evict(paths: Iterable[str | Path]) -> int:
    """Ask the kernel to drop the cached pages of each file (POSIX_FADV_DONTNEED); returns the bytes
    covered. Pages still mapped by a live process stay, so call this once no process holds them."""
    covered = 0
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            log.warning("cannot open %s to evict it from the page cache: %s", path, e)
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            covered += os.fstat(fd).st_size
        finally:
            os.close(fd)
    return covered


def evict_models(model_dirs: Iterable[str | Path | None]) -> int:
    return evict(f for d in model_dirs if d for f in weight_files(d))
