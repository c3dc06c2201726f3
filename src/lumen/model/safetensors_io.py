"""Read a safetensors file with large parallel reads into one host buffer; tensors are views of it.

`safe_open(...).get_tensor` maps the file and copies tensor by tensor on one thread, so a read
from a cold page cache advances at page-fault pace: a worker's reload of a 16.4 GB Qwen3-8B-shaped
file ran at 0.63 GB/s on a disk that reads 2.0 GB/s with O_DIRECT (2x H200 machine, 2026-11-28).
Here the data section is read in 16 MiB chunks by 4 threads (`os.preadv` releases the
GIL), which keeps the disk's queue full. For CUDA the buffer is page-locked in place
(cudaHostRegister) so host -> device copies run at pinned bandwidth, without the caching host
allocator, which rounds each pinned allocation up to a power of two.

The format (https://github.com/huggingface/safetensors): 8-byte little-endian header length,
a JSON header {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, data.
"""

from __future__ import annotations

import json
import math
import os
import struct
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
CHUNK_BYTES = 16 << 20
READ_THREADS = 4

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}  # torch dtype -> its name in a header


def read_header(path: str | Path) -> tuple[dict, int]:
    """(tensor entries, byte offset of the data section); validates sizes before allocating."""
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER_BYTES or 8 + n > file_size:
            raise ValueError(f"{path}: header length {n} is out of bounds")
        header = json.loads(f.read(n))
    if not isinstance(header, dict):
        raise ValueError(f"{path}: header is not a JSON object")
    header.pop("__metadata__", None)
    data_size = file_size - 8 - n
    for name, meta in header.items():
        dtype = _DTYPES.get(meta.get("dtype")) if isinstance(meta, dict) else None
        if dtype is None:
            raise ValueError(f"{path}: tensor {name!r} has an unsupported dtype")
        begin, end = meta["data_offsets"]
        numel = math.prod(meta["shape"])
        if not 0 <= begin <= end <= data_size or end - begin != numel * dtype.itemsize:
            raise ValueError(f"{path}: tensor {name!r} lies outside the file or has the wrong size")
    return header, 8 + n


def _pin_in_place(array: np.ndarray) -> bool:
    """Page-lock `array` for fast async copies; unlocked when it is freed. The numpy array, not a
    tensor, carries the finalizer: tensors viewing it keep it alive through their storage, while
    a tensor's own Python object can die before its views do."""
    if not torch.cuda.is_available() or array.nbytes == 0:
        return False
    cudart = torch.cuda.cudart()
    ptr = array.ctypes.data
    if int(cudart.cudaHostRegister(ptr, array.nbytes, 0)) != 0:
        return False  # pageable copies still work, at a lower rate
    weakref.finalize(array, cudart.cudaHostUnregister, ptr)
    return True


def read_safetensors(path: str | Path, pin: bool = False, threads: int = READ_THREADS,
                     chunk_bytes: int = CHUNK_BYTES) -> dict[str, torch.Tensor]:
    """name -> tensor (a view of one host buffer holding the file's data section)."""
    header, base = read_header(path)
    size = os.path.getsize(path) - base
    array = np.empty(size, dtype=np.uint8)
    view = memoryview(array).cast("B")
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, base, size, os.POSIX_FADV_SEQUENTIAL)

        def read(offset: int) -> None:
            end = min(offset + chunk_bytes, size)
            while offset < end:
                got = os.preadv(fd, [view[offset:end]], base + offset)
                if got == 0:
                    raise ValueError(f"{path}: file ended early (truncated while reading?)")
                offset += got

        with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="weights-read") as ex:
            list(ex.map(read, range(0, size, chunk_bytes)))
    finally:
        os.close(fd)
    if pin:
        _pin_in_place(array)
    buf = torch.from_numpy(array)
    out: dict[str, torch.Tensor] = {}
    for name, meta in header.items():
        dtype = _DTYPES[meta["dtype"]]
        begin, end = meta["data_offsets"]
        raw = buf[begin:end]
        if begin % dtype.itemsize:  # a view needs aligned storage; rare (after odd-sized U8/BOOL data)
            raw = raw.clone()
        out[name] = raw.view(dtype).view(meta["shape"])
    return out
