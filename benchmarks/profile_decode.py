"""Where does a decode step's time go? (GPU; diagnostic, not a benchmark.)

    python benchmarks/profile_decode.py [--model preset:qwen3-8b] [--batch 1] [--prompt-len 512]
"""

from __future__ import annotations

import argparse
import time

import torch

from lumen.engine import Engine, EngineConfig, SamplingParams
from lumen.engine.model_runner import ForwardItem
from lumen.model import load_model


def timeit(fn, n=20):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e3


def attention_micro(batch: int, ctx: int, nkv: int = 8, g: int = 4, hd: int = 128) -> None:
    """Decode attention variants at one shape (per layer call)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q = torch.randn(batch, nkv, g, hd, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, nkv, ctx, hd, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    mask = (torch.arange(ctx, device="cuda") < ctx - 100).view(1, 1, 1, ctx).expand(batch, 1, 1, ctx)
    for name, be in [("cudnn", SDPBackend.CUDNN_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                     ("math", SDPBackend.MATH)]:
        try:
            with sdpa_kernel([be]):
                print(f"  sdpa {name}: {timeit(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)) * 1e3:.1f} us")
        except Exception as e:  # backend refuses the inputs
            print(f"  sdpa {name}: n/a ({type(e).__name__})")

    def manual(q, k, v, mask):
        s = torch.matmul(q, k.transpose(-1, -2)) * hd ** -0.5
        s = s.masked_fill(~mask, float("-inf")).softmax(-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(s, v)
    print(f"  manual: {timeit(lambda: manual(q, k, v, mask)) * 1e3:.1f} us")
    cm = torch.compile(manual, dynamic=False)
    print(f"  manual compiled: {timeit(lambda: cm(q, k, v, mask)) * 1e3:.1f} us")


def prefill_profile(spec: str) -> None:
    loaded = load_model(spec, device="cuda", dtype=torch.bfloat16)
    eng = Engine(loaded, EngineConfig(device="cuda", chunk_tokens=1024, gpu_memory_utilization=0.5))
    sp = SamplingParams(max_tokens=1, ignore_eos=True)
    for rep in range(2):
        eng.add_request(f"p{rep}", list(range(10, 10 + 4096)), sp)
        while eng.has_work():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            eng.step()
            torch.cuda.synchronize()
            print(f"chunk step {1e3 * (time.perf_counter() - t0):.1f} ms")
    from torch.profiler import ProfilerActivity, profile
    eng.add_request("p", list(range(10, 10 + 4096)), sp)
    eng.step()
    eng.step()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        eng.step()  # third chunk: 2048 tokens of context before it
        torch.cuda.synchronize()
    ev = prof.key_averages()
    print(ev.table(sort_by="cuda_time_total", row_limit=15))
    print(ev.table(sort_by="cpu_time_total", row_limit=12))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="preset:qwen3-8b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--attn-micro", action="store_true", help="only time decode attention variants")
    ap.add_argument("--prefill", action="store_true", help="profile 1024-token prefill chunks instead")
    a = ap.parse_args()
    if a.prefill:
        return prefill_profile(a.model)
    if a.attn_micro:
        for b, c in [(1, 1024), (32, 1024), (128, 1024)]:
            print(f"attention batch {b} ctx {c}")
            attention_micro(b, c)
        return
    loaded = load_model(a.model, device="cuda", dtype=torch.bfloat16)
    t0 = time.perf_counter()
    eng = Engine(loaded, EngineConfig(device="cuda", max_batch=max(a.batch, 8), gpu_memory_utilization=0.5,
                                      compile=not a.no_compile))
    print(f"engine init {time.perf_counter() - t0:.1f} s, norms compiled: {eng.runner.norms_compiled}")
    for i in range(a.batch):
        eng.add_request(f"r{i}", list(range(10, 10 + a.prompt_len)), SamplingParams(max_tokens=1 << 20, ignore_eos=True))
    t0 = time.perf_counter()
    for _ in range(a.batch * a.prompt_len // eng.chunk_tokens + 6):
        eng.step()
    print(f"prefill + first decode steps (graph capture) {time.perf_counter() - t0:.1f} s")
    print(f"engine.step(): {timeit(eng.step):.3f} ms")
    seqs = list(eng.scheduler.running)
    items = [ForwardItem([s.last_token], s.num_computed_tokens, s.block_table, 1) for s in seqs]
    try:
        print(f"runner.forward (graph + lm_head): {timeit(lambda: eng.runner.forward(items)):.3f} ms")
    except Exception as e:  # diagnostics only
        print(f"runner.forward failed: {e!r}")
    graph = next(g for k, g in eng.runner._graphs.items() if k[0] >= a.batch)[0]
    print(f"graph.replay(): {timeit(graph.replay):.3f} ms")
    h = torch.randn(a.batch, loaded.config.hidden_size, device="cuda", dtype=torch.bfloat16)
    print(f"lm_head: {timeit(lambda: loaded.model.logits(h)):.3f} ms")
    eng.runner.use_graphs = False
    print(f"eager forward: {timeit(lambda: eng.runner.forward(items), 5):.3f} ms")
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        eng.runner.forward(items)
        torch.cuda.synchronize()
    ev = prof.key_averages()
    print(f"kernels: {sum(e.count for e in ev if e.device_type.name == 'CUDA')}")
    print(ev.table(sort_by="cuda_time_total", row_limit=12))


if __name__ == "__main__":
    main()
