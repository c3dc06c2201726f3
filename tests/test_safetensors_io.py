"""lumen.model.safetensors_io: parallel chunked reads give exactly safetensors' tensors; bad files
fail with a clear error before any large allocation; the device-assembly path equals the host one."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from lumen.model import PRESETS, build_model_from_host, read_config, read_weights_to_host
from lumen.model.loader import random_model, save_model
from lumen.model.safetensors_io import read_safetensors


def test_chunked_parallel_read_equals_safetensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "odd_bytes": torch.randint(0, 255, (3,), dtype=torch.uint8, generator=g),  # misaligns what follows
        "a_bf16": torch.randn(37, 11, generator=g).to(torch.bfloat16),
        "b_f32": torch.randn(1000, generator=g),
        "c_i64": torch.arange(9, dtype=torch.int64).reshape(3, 3),
        "scalar": torch.tensor(2.5),
        "flags": torch.tensor([True, False, True]),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    want = load_file(str(path))
    got = read_safetensors(path, chunk_bytes=64, threads=3)  # many chunks, several threads
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def _write(path, header: dict, data: bytes, header_len: int | None = None):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)


@pytest.mark.parametrize("case, match", [
    ("huge_header", "out of bounds"),
    ("outside", "outside the file"),
    ("wrong_size", "wrong size"),
    ("dtype", "unsupported dtype"),
])
def test_bad_files_fail_clearly(tmp_path, case, match):
    path = tmp_path / "bad.safetensors"
    ok = {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    if case == "huge_header":
        _write(path, ok, b"\0" * 8, header_len=1 << 40)
    elif case == "outside":
        _write(path, {"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8)
    elif case == "wrong_size":
        _write(path, {"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8)
    else:
        _write(path, {"x": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8)
    with pytest.raises(ValueError, match=match):
        read_safetensors(path)


def test_parts_path_assembles_the_same_model(tmp_path):
    cfg = PRESETS["tiny"]
    save_model(random_model(cfg, "cpu", torch.float32), cfg, tmp_path)
    assembled = read_weights_to_host(tmp_path, dtype=torch.float32)
    parts = read_weights_to_host(tmp_path, dtype=torch.float32, pin=True)  # the CUDA layout, here on CPU
    assert any(isinstance(v, tuple) for v in parts.values())  # fused projections left as parts
    a = build_model_from_host(read_config(tmp_path), assembled, "cpu", torch.float32)
    b = build_model_from_host(read_config(tmp_path), parts, "cpu", torch.float32)
    for (k1, v1), (k2, v2) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert k1 == k2 and torch.equal(v1, v2), k1
