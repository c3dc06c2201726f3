"""The draft model kept resident in host memory on each node (issue 24, DESIGN section 3).

A restarted worker process has lost its memory, so "resident" means outside any worker: a copy of the
draft's files in the node's shared memory (/dev/shm, a tmpfs: RAM, not disk). A worker that restarts
reads its draft from there at memory speed and needs only the host -> device copy, while its target
is read from disk at the same time; the draft's read no longer comes before the target's. A node
reboot empties /dev/shm: the draft then comes from disk again, and `policy.draft_phase_pays` decides
whether to read it first.

The first worker of a node stages the copy in the background when it starts (once per draft and
node; the others find it there or see another one staging it).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
from pathlib import Path

log = logging.getLogger("lumen.draft_cache")

SHM_ROOT_ENV = "LUMEN_DRAFT_SHM"   # where the resident copies live (default /dev/shm/lumen-drafts; "off": none)
DEFAULT_ROOT = "/dev/shm/lumen-drafts"
COMPLETE = ".complete"
MAX_SHARE_OF_FREE_MEMORY = 0.25    # never stage a draft larger than this share of the memory available
PIN_ENV = "LUMEN_DRAFT_PIN"         # "0": copy the resident draft to the device from pageable memory
STALE_STAGING_S = 600.0            # a staging this old was left by a process that died while copying
STALE_COPY_S = 3600.0              # another copy of the same draft (older files) unused this long goes


def cache_root() -> Path | None:
    env = os.environ.get(SHM_ROOT_ENV, "").strip()
    if env.lower() == "off":
        return None
    return Path(env or DEFAULT_ROOT)


def pin_resident() -> bool | None:
    """Whether a worker page-locks the resident draft before its one copy to the device (None: the
    loader's default, page-locked on a GPU). Page-locking 4 GB takes seconds of its own, and the copy
    happens once per restart; `benchmarks/reload_paths.py` (arms draft, draft-pageable) measures both."""
    env = os.environ.get(PIN_ENV, "").strip().lower()
    if env in ("0", "off", "false", "no"):
        return False
    if env in ("1", "on", "true", "yes"):
        return True
    return None


def _key(draft_dir: Path) -> str:
    """One name per draft and content: its path, and each file's size and mtime (links followed)."""
    h = hashlib.sha256(str(draft_dir.resolve()).encode())
    for f in sorted(draft_dir.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return f"{draft_dir.name}-{h.hexdigest()[:16]}"


def resident_copy(draft_dir: str | Path, root: Path | None = None) -> Path | None:
    """The complete resident copy of the draft, or None."""
    root = root if root is not None else cache_root()
    d = Path(draft_dir)
    if root is None or not d.is_dir():
        return None
    copy = root / _key(d)
    return copy if (copy / COMPLETE).exists() else None


def _available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def stage(draft_dir: str | Path, root: Path | None = None) -> Path | None:
    """Copy the draft's files (links followed) into shared memory once; returns the copy, or None when
    there is no room, no shared memory, or another process is staging it now."""
    root = root if root is not None else cache_root()
    d = Path(draft_dir)
    if root is None or not d.is_dir():
        return None
    done = resident_copy(d, root)
    if done is not None:
        return done
    files = [f for f in sorted(d.iterdir()) if f.is_file()]
    size = sum(f.stat().st_size for f in files)
    if size > MAX_SHARE_OF_FREE_MEMORY * _available_bytes():
        log.info("draft %s (%.1f GB) not kept in host memory: too large for what is free", d, size / 1e9)
        return None
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f"{_key(d)}.staging"
        _clear_stale(root, d.name, tmp)
        tmp.mkdir()  # the one process that creates it stages; the others go on without
    except FileExistsError:
        return None
    except OSError as e:
        log.info("no shared memory for the draft (%s)", e)
        return None
    final = root / _key(d)
    try:
        for f in files:
            shutil.copyfile(f, tmp / f.name)
        (tmp / COMPLETE).touch()
        os.rename(tmp, final)
    except OSError as e:
        log.warning("staging the draft in %s failed: %s", root, e)
        shutil.rmtree(tmp, ignore_errors=True)
        return None
    log.info("draft %s resident in host memory at %s (%.2f GB)", d, final, size / 1e9)
    return final


def _clear_stale(root: Path, name: str, staging: Path) -> None:
    """Older copies of a draft of this name (its files changed since) and a staging left by a process
    that died while copying: shared memory is the node's RAM."""
    now = time.time()
    for p in root.glob(f"{name}-*"):
        try:
            age = now - p.stat().st_mtime
        except OSError:
            continue
        if p == staging:
            if age > STALE_STAGING_S:
                shutil.rmtree(p, ignore_errors=True)
        elif not p.name.endswith(".staging") and p.name != staging.name.removesuffix(".staging") \
                and age > STALE_COPY_S:
            shutil.rmtree(p, ignore_errors=True)


def stage_in_background(draft_dir: str | Path) -> threading.Thread:
    t = threading.Thread(target=stage, args=(draft_dir,), daemon=True, name="draft-stage")
    t.start()
    return t
