"""lumen.engine on CUDA (skipped without a GPU): CUDA-graph decode, async page export, auto sizing.

float32 here (not bf16) so that greedy tokens can be compared with the dense oracle exactly.
"""

from __future__ import annotations

import random
import sys
import traceback
from pathlib import Path

import pytest
import torch

from lumen.engine import Engine, EngineConfig, KVPage, SamplingParams
from lumen.engine.kv_pages import page_tags
from lumen.model import PRESETS, DenseKV
from lumen.model.loader import random_model
from lumen.runtime.worker import warm_up

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CFG = PRESETS["tiny"]


def _model(dtype=torch.float32):
    return random_model(CFG, device="cuda", dtype=dtype, seed=7, std=0.3)


def _reference(model, prompt: list[int], n: int) -> list[int]:
    kv = DenseKV(CFG, device="cuda", dtype=model.dtype)
    out: list[int] = []
    with torch.inference_mode():
        h = model(torch.tensor(prompt, device="cuda"), torch.arange(len(prompt), device="cuda"), kv)
        for i in range(n):
            out.append(int(model.logits(h[-1:]).argmax(-1)))
            h = model(torch.tensor(out[-1:], device="cuda"), torch.tensor([len(prompt) + i], device="cuda"), kv)
    return out


def _first_host_alloc(fn):
    """fn() and, where torch's pinned allocator made a new cudaHostAlloc during it, the two profile
    events around it (the last one before, the first one after, with the Python frames above the
    latter), else None: names the allocation that the phase counts of the restore test below could
    only place in a step. (Calls through slots, such as tensor indexing, raise no event.)"""
    stats = torch.cuda.host_memory_stats
    start, found, last = stats()["num_host_alloc"], [], ["(start)"]

    def describe(frame, event, arg) -> str:
        name = getattr(arg, "__qualname__", repr(arg)) if event.startswith("c_") else frame.f_code.co_qualname
        return f"{event} {name} at {Path(frame.f_code.co_filename).name}:{frame.f_lineno}"

    def hook(frame, event, arg):
        if found:
            return
        if stats()["num_host_alloc"] == start:
            last[0] = describe(frame, event, arg)
            return
        stack = traceback.extract_stack(frame, limit=8)
        found.append(f"between [{last[0]}] and [{describe(frame, event, arg)}] <- "
                     + " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(stack)))

    sys.setprofile(hook)
    try:
        result = fn()
    finally:
        sys.setprofile(None)
    return result, (found[0] if found else None)


def _run(eng: Engine) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    while eng.has_work():
        for o in eng.step():
            out.setdefault(o.req_id, []).extend(o.token_ids)
    return out


def test_cuda_graph_decode_matches_oracle():
    m = _model()
    rng = random.Random(0)
    prompts = {f"r{i}": [rng.randrange(2, CFG.vocab_size) for _ in range(rng.randint(1, 100))] for i in range(7)}
    eng = Engine(m, EngineConfig(device="cuda", num_blocks=256, chunk_tokens=64, max_batch=8))
    assert eng.runner.use_graphs
    try:
        import triton  # noqa: F401
        assert eng.runner.use_triton, "Triton is installed but the paged kernel is off"
    except ImportError:
        pass
    for rid, p in prompts.items():
        eng.add_request(rid, p, SamplingParams(max_tokens=24, ignore_eos=True))
    out = _run(eng)
    assert eng.runner._graphs, "no decode step replayed a CUDA graph"
    for rid, p in prompts.items():
        assert out[rid] == _reference(m, p, 24), rid
    assert eng.block_manager.num_free == eng.block_manager.num_blocks


def test_cuda_portable_attention_path_matches_oracle():
    """The gather + SDPA path (no Triton) on CUDA, with graphs."""
    m = _model()
    rng = random.Random(3)
    prompts = {f"r{i}": [rng.randrange(2, CFG.vocab_size) for _ in range(rng.randint(1, 60))] for i in range(4)}
    eng = Engine(m, EngineConfig(device="cuda", num_blocks=256, chunk_tokens=48, block_size=8))  # bs 8: no Triton
    assert not eng.runner.use_triton
    for rid, p in prompts.items():
        eng.add_request(rid, p, SamplingParams(max_tokens=12, ignore_eos=True))
    out = _run(eng)
    for rid, p in prompts.items():
        assert out[rid] == _reference(m, p, 12), rid


def test_cuda_pages_export_import_and_verify():
    m = _model()
    p = [random.Random(1).randrange(2, CFG.vocab_size) for _ in range(37)]
    ref = _reference(m, p, 30)
    sp = SamplingParams(max_tokens=30, ignore_eos=True)
    a = Engine(m, EngineConfig(device="cuda", num_blocks=64, block_size=8))
    a.add_request("r", p, sp)
    gen, pages = [], []
    for _ in range(10):
        for o in a.step():
            gen += o.token_ids
        pages += a.new_completed_pages("r")
    assert pages and all(pg.data.is_pinned() for pg in pages)
    for pg in pages:
        pg.wait()
    b = Engine(m, EngineConfig(device="cuda", num_blocks=64, block_size=8))
    b.add_request("r", p, sp, generated_ids=gen, restored_pages=pages)
    rest: list[int] = []
    while b.has_work():  # propose the oracle's tokens: all must be accepted, output unchanged
        s = b._seqs.get("r")
        if s is not None and s.is_decoding:
            b.propose("r", len(s), ref[s.num_generated:s.num_generated + 3])
        for o in b.step():
            rest += o.token_ids
    assert gen + rest == ref
    st = b.stats()
    assert st["restored_pages"] == len(pages) and st["spec_accepted_tokens"] == st["spec_draft_tokens"] > 0


def test_cuda_bf16_auto_sized_pool_runs():
    m = _model(torch.bfloat16)
    eng = Engine(m, EngineConfig(device="cuda", gpu_memory_utilization=0.3))
    assert eng.block_manager.num_blocks > 100
    for i in range(5):
        eng.add_request(f"r{i}", list(range(2, 40 + i)),
                        SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=i, ignore_eos=True))
    out = _run(eng)
    assert all(len(v) == 16 for v in out.values()) and len(out) == 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_triton_paged_kernel_matches_reference(dtype):
    triton_attention = pytest.importorskip("lumen.engine.triton_attention")
    torch.manual_seed(0)
    nb, bs, nkv, hd, g = 40, 16, 2, 64, 4
    kc = torch.randn(nb + 1, bs, nkv, hd, device="cuda", dtype=dtype)
    vc = torch.randn_like(kc)
    tables = torch.randint(0, nb, (3, 8), device="cuda")
    rows = [(0, 1), (0, 5), (1, 17), (1, 18), (2, 100), (2, 128)]
    row_seq = torch.tensor([r[0] for r in rows], device="cuda")
    ctx = torch.tensor([r[1] for r in rows], device="cuda")
    q = torch.randn(len(rows), nkv * g, hd, device="cuda", dtype=dtype)
    for splits in (1, 3, 8):
        out = triton_attention.paged_attention(q, kc, vc, tables, row_seq, ctx, splits)
        torch.cuda.synchronize()
        for i, (s, c) in enumerate(rows):
            k = kc[tables[s]].reshape(-1, nkv, hd)[:c].repeat_interleave(g, 1).transpose(0, 1).float()
            v = vc[tables[s]].reshape(-1, nkv, hd)[:c].repeat_interleave(g, 1).transpose(0, 1).float()
            ref = (torch.softmax((q[i].float().unsqueeze(1) @ k.transpose(1, 2)) * hd ** -0.5, -1) @ v).squeeze(1)
            tol = 1e-4 if dtype == torch.float32 else 3e-2
            torch.testing.assert_close(out[i].float(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_rms_norm_is_one_fused_kernel_and_matches_fp32_math(dtype):
    from lumen.model.decoder import FUSED_RMS_NORM, RMSNorm

    if FUSED_RMS_NORM is None:
        pytest.skip("this torch has no fused RMSNorm kernel (torch.compile'd norms are used instead)")
    torch.manual_seed(0)
    norm = RMSNorm(128, 1e-6).to("cuda", dtype)
    norm.weight.data.normal_(1.0, 0.2)
    x = torch.randn(5, 8, 128, device="cuda", dtype=dtype)
    with torch.inference_mode():
        fused = norm(x)
        xf = x.float()
        ref = (norm.weight.float() * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)))
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: one rounding step of 8 bits of mantissa
    torch.testing.assert_close(fused.float(), ref, rtol=tol, atol=tol)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        with torch.inference_mode():
            norm(x)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == 1, [e.name for e in kernels]


def test_cuda_export_ring_burst_and_restore_allocate_no_pinned_memory():
    """A 100-token prefill (12 pages of 8 tokens) through an export ring of 2 slots x 4 pages: the
    pages go out over several exports (one held in flight for a turn, as by the sender), each equal
    to its block in the pool; a restore from pinned pages (as from the checkpoint store) reproduces
    the oracle's tokens. Neither allocates pinned memory once the engines exist (torch's pinned
    allocator counts cudaHostAlloc calls)."""
    m = _model()
    p = [random.Random(2).randrange(2, CFG.vocab_size) for _ in range(100)]
    ref = _reference(m, p, 30)
    sp = SamplingParams(max_tokens=30, ignore_eos=True)
    cfg = dict(device="cuda", num_blocks=64, block_size=8, export_slots=2, export_slot_pages=4)
    # b, the restoring engine, chunks at 64 tokens so that the worker's warm-up runs all its prefill paths
    a, b = Engine(m, EngineConfig(**cfg)), Engine(m, EngineConfig(**cfg, chunk_tokens=64))
    ring = a.runner.ring
    assert ring.num_slots == 2 and ring.pages.is_pinned() and ring.index.is_pinned()
    a.add_request("r", p, sp)
    gen = [t for o in a.step() for t in o.token_ids]
    seq = a._seqs["r"]
    assert seq.num_computed_tokens // 8 == 12
    # b's lazy one-time work (graph captures, compiles, first calls of each attention path) before
    # counting, as a restarted worker does it before it serves; the first step of the restore (a short
    # continued prefill) allocated once on an H200 (2026-12-03, 2026-12-04) without the warm-up's
    # continued chunks
    warm_up(b)
    b.add_request("warm", p, sp)
    _run(b)
    store = torch.empty((12, *ring.pages.shape[2:]), dtype=ring.pages.dtype, pin_memory=True)
    host_allocs = getattr(torch.cuda, "host_memory_stats", None)
    before = host_allocs().get("num_host_alloc") if host_allocs else None
    got, sizes, inflight = [], [], []
    for _ in range(10):
        pages = a.export_pages(["r"])
        sizes.append(len(pages))
        for pg in pages:
            pg.wait()
            assert torch.equal(pg.data, a.runner.kv_pool[:, :, seq.block_table[pg.index]].cpu()), pg.index
            store[pg.index].copy_(pg.data)
            got.append(pg.index)
        inflight = pages  # the previous export's slots come back only now
        pg = None
        if len(got) == 12 and not pages:
            break
    del inflight, pages
    assert got == list(range(12)) and max(sizes) == 8 and 0 in sizes[:3]  # deferred, in order, once
    # checked per phase: on an H200 (2026-12-03) one cudaHostAlloc happened somewhere in this test
    if before is not None:
        assert host_allocs()["num_host_alloc"] == before, "pinned memory allocated by the exports"
    tags = page_tags(p, 8)
    restored = [KVPage("r", i, 8 * (i + 1), tags[i], store[i]) for i in range(12)]
    b.add_request("r", p, sp, generated_ids=gen, restored_pages=restored)
    del restored
    # allocations counted after each phase: an H200 (2026-12-03, 2026-12-04) saw one in step 1, which the
    # hook below traced to a boolean-mask index in attention (now an index tensor: 9/9 pass, 2026-12-04)
    allocs = [("add_request", host_allocs()["num_host_alloc"] - before if before is not None else 0)]
    rest, culprit = [], None
    while b.has_work():
        if before is not None:
            outs, where = _first_host_alloc(b.step)
            culprit = culprit or where
        else:
            outs = b.step()
        rest += [t for o in outs for t in o.token_ids]
        if before is not None:
            allocs.append((f"step {len(allocs)}", host_allocs()["num_host_alloc"] - before))
    torch.cuda.synchronize()
    assert not b.restore_pending("r") and b.stats()["restored_pages"] == 12
    assert gen + rest == ref
    if before is not None:
        first = next(((name, n) for name, n in allocs if n > 0), None)
        assert host_allocs()["num_host_alloc"] == before, (
            f"pinned memory allocated by the restore; first in {first}, {culprit} (the profile hook slows "
            "each step: an allocation that depends on timing may not recur under it)")
