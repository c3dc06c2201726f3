"""`--cold-restart`: a model's weight files leave the page cache, so a restart reads the disk."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from lumen.runtime.page_cache import evict_models, weight_files


def _resident_bytes(path: Path) -> int:
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


@pytest.mark.skipif(shutil.which("fincore") is None, reason="needs util-linux fincore to read page residency")
def test_evict_models_drops_weight_files_from_the_page_cache(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    weights = model / "model.safetensors"
    weights.write_bytes(os.urandom(8 << 20))
    (model / "config.json").write_text("{}")
    os.sync()
    weights.read_bytes()  # pull it into the cache
    if _resident_bytes(weights) == 0:
        pytest.skip("this filesystem keeps no page cache for the file (e.g. tmpfs semantics)")
    assert weight_files(model) == [weights]
    assert evict_models([model, None, tmp_path / "missing"]) == 8 << 20
    assert _resident_bytes(weights) < (1 << 20), "the weights stayed in the page cache"
