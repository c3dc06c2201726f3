"""Engine benchmark: lumen's engine beside Hugging Face transformers `generate()` on the same machine,
in one run, and (GPU) beside the decode / prefill rooflines measured on the card.

    python benchmarks/engine.py                         # CPU: the default model (SmolLM2-135M), fp32
    python benchmarks/engine.py --gpu --out gpu.json    # GPU: Qwen3-8B-shaped bf16 random weights
    python benchmarks/engine.py --smoke [--gpu]         # tiny preset, seconds: checks every code path
    python benchmarks/engine.py --profile [--batch 32 | --prefill | --attn-micro]   # GPU diagnostics

CPU: tokens/s of greedy generation (eos ignored, same prompts, same number of new tokens) for one
request at a time and for the whole batch at once, lumen vs transformers, and the ratio.

GPU (preset:qwen3-8b unless --model), 512-token prompts:
  decode steps/s at batch 1, 32, 128 (timed over engine.step() once every request is decoding;
  CUDA graphs on); prefill tokens/s on 1024-token chunks; the same from transformers (`generate()`
  for decode: (t(N new tokens) - t(1 new token)) / (N - 1); one forward for prefill), built from the
  same config with its own random weights (the comparison is about speed, not values);
  rooflines: decode steps/s = device copy bandwidth (measured here: read + write bytes of a large
  device-to-device copy per second) / weight bytes; prefill = measured bf16 matmul peak (FLOP/s) /
  (2 * params FLOPs per token).
Writes everything as JSON to --out (and prints it).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import random
import sys
import time

import torch

from lumen.engine import Engine, EngineConfig, SamplingParams
from lumen.engine.model_runner import ForwardItem
from lumen.model import fused_qk, load_model

PROMPTS = [
    "The history of the printing press begins",
    "Write a short poem about the sea at night.",
    "Explain how a hash table works to a new programmer.",
    "List three reasons why unit tests are useful:",
    "In a distant future, humanity has learned to",
    "The recipe for a simple tomato soup is",
    "What is the difference between a process and a thread?",
    "Once upon a time, in a small village by the mountains,",
]


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- lumen

def lumen_generate(eng: Engine, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
    """Wall time to generate new_tokens for every prompt (all submitted at once)."""
    sp = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    out: dict[str, list[int]] = {}
    sync(eng.device)
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        eng.add_request(f"g{i}-{time.monotonic_ns()}", p, sp)
        out[list(eng._seqs)[-1]] = []
    while eng.has_work():
        for o in eng.step():
            out[o.req_id].extend(o.token_ids)
    sync(eng.device)
    return time.perf_counter() - t0, list(out.values())


def lumen_decode_rate(eng: Engine, batch: int, prompt_len: int, steps: int, vocab: int) -> dict:
    """Decode steps/s at a fixed batch: prefill everything first, then time `steps` engine steps."""
    rng = random.Random(batch)
    sp = SamplingParams(max_tokens=1 << 20, ignore_eos=True)  # aborted when done
    for i in range(batch):
        eng.add_request(f"d{batch}-{i}", [rng.randrange(vocab) for _ in range(prompt_len)], sp)
    while any(not s.sampled for s in eng.scheduler.running) or eng.scheduler.waiting:
        eng.step()
    for _ in range(3):  # warm-up: captures the CUDA graph of this batch / context bucket
        eng.step()
    sync(eng.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        outs = eng.step()
        assert len(outs) == batch, "every request must decode in every timed step"
    sync(eng.device)
    dt = time.perf_counter() - t0
    for i in range(batch):
        eng.abort(f"d{batch}-{i}")
    return dict(batch=batch, steps_per_s=steps / dt, tokens_per_s=batch * steps / dt, step_ms=1e3 * dt / steps)


def lumen_prefill_rate(eng: Engine, chunk: int, chunks: int, vocab: int) -> dict:
    """Prefill tokens/s with the step budget = one chunk: a long prompt runs as `chunks` chunks."""
    rng = random.Random(0)
    sp = SamplingParams(max_tokens=1, ignore_eos=True)
    # warm up with a prompt of the measured shape: chunks after the first attend over earlier context,
    # a different kernel path whose first use (autotuning, lazy init) must not land in the timing
    eng.add_request("warm", [rng.randrange(vocab) for _ in range(chunk * chunks)], sp)
    while eng.has_work():
        eng.step()
    eng.add_request("pf", [rng.randrange(vocab) for _ in range(chunk * chunks)], sp)
    sync(eng.device)
    t0 = time.perf_counter()
    n = 0
    while eng.has_work():
        eng.step()
        n += 1
    sync(eng.device)
    dt = time.perf_counter() - t0
    return dict(chunk_tokens=chunk, chunks=n, tokens_per_s=chunk * chunks / dt)


# ----------------------------------------------------------------------------- transformers

def hf_model_from_dir(path, dtype, device):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()


def hf_model_random(cfg, dtype, device):
    """Same architecture and shapes, random weights, built directly on the device in `dtype`."""
    from transformers import AutoConfig, AutoModelForCausalLM
    d = {k: v for k, v in cfg.to_hf().items() if k not in ("architectures", "torch_dtype", "_name_or_path")}
    hf_cfg = AutoConfig.for_model(d.pop("model_type"), **d)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            try:
                model = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)
            except TypeError:  # transformers < 4.56 names it torch_dtype
                model = AutoModelForCausalLM.from_config(hf_cfg, torch_dtype=dtype)
    finally:
        torch.set_default_dtype(prev)
    return model.to(dtype).eval()


@torch.inference_mode()
def hf_generate(model, prompts: list[list[int]], new_tokens: int, pad_id: int) -> tuple[float, list[list[int]]]:
    dev = model.device
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=dev)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=dev)
    sync(dev)
    t0 = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=pad_id, eos_token_id=None)
    sync(dev)
    return time.perf_counter() - t0, out[:, width:].tolist()


def hf_decode_rate(model, batch: int, prompt_len: int, steps: int, vocab: int) -> dict:
    rng = random.Random(batch)
    prompts = [[rng.randrange(vocab) for _ in range(prompt_len)] for _ in range(batch)]
    hf_generate(model, prompts, 2, 0)  # warm-up
    t1, _ = hf_generate(model, prompts, 1, 0)
    tn, _ = hf_generate(model, prompts, steps + 1, 0)
    dt = max(tn - t1, 1e-9)
    return dict(batch=batch, steps_per_s=steps / dt, tokens_per_s=batch * steps / dt, step_ms=1e3 * dt / steps)


@torch.inference_mode()
def hf_prefill_rate(model, chunk: int, vocab: int, repeats: int = 3) -> dict:
    ids = torch.randint(0, vocab, (1, chunk), device=model.device)
    model(ids)
    sync(model.device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        model(ids, logits_to_keep=1)
    sync(model.device)
    return dict(chunk_tokens=chunk, tokens_per_s=chunk * repeats / (time.perf_counter() - t0))


# ----------------------------------------------------------------------------- rooflines

def copy_bandwidth(dev: torch.device, nbytes: int = 2 << 30) -> float:
    """Bytes moved per second (read + write) by a device-to-device copy."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    b.copy_(a)
    sync(dev)
    reps = 10
    t0 = time.perf_counter()
    for _ in range(reps):
        b.copy_(a)
    sync(dev)
    return 2 * nbytes * reps / (time.perf_counter() - t0)


def matmul_peak(dev: torch.device, n: int = 8192, dtype=torch.bfloat16) -> float:
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    a @ b
    sync(dev)
    reps = 20
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(dev)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


# ----------------------------------------------------------------------------- diagnostics (GPU)

def timeit(fn, n=20):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e3


def attention_micro(batch: int, ctx: int, nkv: int = 8, g: int = 4, hd: int = 128) -> None:  # noqa: D401
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


def decode_profile(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="engine.py --profile")
    ap.add_argument("--model", default="preset:qwen3-8b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--attn-micro", action="store_true", help="only time decode attention variants")
    ap.add_argument("--prefill", action="store_true", help="profile 1024-token prefill chunks instead")
    a = ap.parse_args(argv)
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



# ----------------------------------------------------------------------------- modes

def env_info(dev: torch.device) -> dict:
    info = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), torch=torch.__version__,
                python=platform.python_version(), machine=platform.machine(), device=str(dev))
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
    else:
        info["cpu_threads"] = torch.get_num_threads()
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def run_cpu(args) -> dict:
    dev = torch.device("cpu")
    spec = "preset:tiny" if args.smoke else args.model or "default"
    new = 8 if args.smoke else args.new_tokens
    loaded = load_model(spec, device=dev, dtype=torch.float32)
    tok = loaded.tokenizer
    vocab = loaded.config.vocab_size
    if tok is not None:
        prompts = [tok.encode(p) for p in PROMPTS]
    else:
        rng = random.Random(0)
        prompts = [[rng.randrange(vocab) for _ in range(rng.randint(8, 16))] for _ in PROMPTS]
    if args.smoke:
        prompts = prompts[:3]
    res: dict = dict(mode="cpu", model=spec, new_tokens=new, repeats=args.repeats, num_prompts=len(prompts),
                     prompt_tokens=[len(p) for p in prompts], env=env_info(dev))
    eng = Engine(loaded, EngineConfig(device="cpu"))
    hf = hf_model_from_dir(loaded.path, torch.float32, dev) if loaded.path else \
        hf_model_random(loaded.config, torch.float32, dev)
    if loaded.path is None:  # presets: same weights for a like-for-like token check
        hf.load_state_dict(_hf_state(loaded), strict=False)
    pad = 0  # left padding is masked out; any id will do
    lumen_generate(eng, prompts[:1], 4)  # warm-up both
    hf_generate(hf, prompts[:1], 4, pad)
    # Interleaved and best-of-N: on a shared machine the load drifts; both sides see the same drift.
    l1 = [0.0] * len(prompts)
    h1 = [0.0] * len(prompts)
    lb = hb = float("inf")
    lumen_out: list[list[int]] = []
    single: list[list[int]] = []
    for r in range(args.repeats):
        lumen_out, single = [], []
        for i, p in enumerate(prompts):
            t, o = lumen_generate(eng, [p], new)
            l1[i] = t if r == 0 else min(l1[i], t)
            lumen_out += o
            t, o = hf_generate(hf, [p], new, pad)
            h1[i] = t if r == 0 else min(h1[i], t)
            single += o
        lb = min(lb, lumen_generate(eng, prompts, new)[0])
        hb = min(hb, hf_generate(hf, prompts, new, pad)[0])
    total = new * len(prompts)
    res["lumen"] = dict(batch1_tokens_per_s=total / sum(l1), batched_tokens_per_s=total / lb)
    res["transformers"] = dict(batch1_tokens_per_s=total / sum(h1), batched_tokens_per_s=total / hb)
    log(f"lumen: {res['lumen']}")
    log(f"transformers: {res['transformers']}")
    res["ratio"] = dict(batch1=res["lumen"]["batch1_tokens_per_s"] / res["transformers"]["batch1_tokens_per_s"],
                        batched=res["lumen"]["batched_tokens_per_s"] / res["transformers"]["batched_tokens_per_s"])
    # Same greedy tokens? (fp32 on both sides; informational -- long runs may drift on near-ties.)
    res["greedy_identical_requests"] = sum(a == b for a, b in zip(lumen_out, single, strict=True))
    return res


def _hf_state(loaded) -> dict:
    from lumen.model.weights import to_hf_state
    return to_hf_state(loaded.config, loaded.model.state_dict())


def measure_lumen(loaded, roofline: dict, args, batches, prompt_len, steps, chunk, bw, wbytes) -> dict:
    cfg = loaded.config
    eng = Engine(loaded, EngineConfig(device="cuda", max_batch=max(batches), chunk_tokens=chunk,
                                      gpu_memory_utilization=args.gpu_mem))
    out = dict(decode=[], prefill=None, kv_blocks=eng.block_manager.num_blocks)
    kv_tok = cfg.kv_bytes_per_token(torch.bfloat16)
    for b in batches:
        r = lumen_decode_rate(eng, b, prompt_len, steps, cfg.vocab_size)
        r["fraction_of_roofline"] = r["steps_per_s"] / roofline["decode_steps_per_s"]
        # At larger batches the KV read per step matters too: weights + every sequence's context.
        ctx = prompt_len + steps // 2 + 8
        r["roofline_with_kv_steps_per_s"] = bw / (wbytes + b * ctx * kv_tok)
        r["fraction_of_roofline_with_kv"] = r["steps_per_s"] / r["roofline_with_kv_steps_per_s"]
        out["decode"].append(r)
        log(f"lumen decode (fused qk {loaded.model.fused_qk}) {r}")
    r = lumen_prefill_rate(eng, chunk, 2 if args.smoke else 4, cfg.vocab_size)
    r["fraction_of_peak"] = r["tokens_per_s"] / roofline["prefill_tokens_per_s"]
    out["prefill"] = r
    log(f"lumen prefill (one long prompt in chunks) {r}")
    r = lumen_prefill_rate(eng, chunk, 1, cfg.vocab_size)  # one chunk from position 0, like transformers'
    r["fraction_of_peak"] = r["tokens_per_s"] / roofline["prefill_tokens_per_s"]
    out["prefill_single_chunk"] = r
    log(f"lumen prefill (single chunk) {r}")
    out["stats"] = {k: v for k, v in eng.stats().items() if isinstance(v, int | float)}
    del eng
    gc.collect()
    torch.cuda.empty_cache()
    return out


def run_gpu(args) -> dict:
    dev = torch.device("cuda")
    spec = "preset:tiny" if args.smoke else args.model or "preset:qwen3-8b"
    prompt_len = 32 if args.smoke else args.prompt_len
    batches = [1, 4] if args.smoke else args.batches
    steps = 10 if args.smoke else args.steps
    chunk = 128 if args.smoke else 1024
    res: dict = dict(mode="gpu", model=spec, prompt_len=prompt_len, env=env_info(dev))
    bw = copy_bandwidth(dev, (256 << 20) if args.smoke else (2 << 30))
    peak = matmul_peak(dev, 2048 if args.smoke else 8192)
    log(f"copy bandwidth {bw / 1e9:.0f} GB/s, bf16 matmul {peak / 1e12:.0f} TFLOP/s")
    log(f"loading {spec} (bf16)")
    loaded = load_model(spec, device=dev, dtype=torch.bfloat16)
    cfg = loaded.config
    wbytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    params = sum(p.numel() for p in loaded.model.parameters())
    res["roofline"] = dict(copy_bandwidth_GBps=bw / 1e9, weight_GB=wbytes / 1e9, decode_steps_per_s=bw / wbytes,
                           matmul_TFLOPs=peak / 1e12, prefill_tokens_per_s=peak / (2 * params))
    # the fused QK-norm + RoPE kernel beside the default path, in the same run (each on a fresh engine:
    # CUDA graphs keep the forward they captured)
    default = loaded.model.fused_qk
    variants = [("lumen", default)] + ([("lumen_fused_qk" if not default else "lumen_eager_qk", not default)]
                                       if fused_qk.triton is not None else [])
    for name, fused in variants:
        loaded.model.fused_qk = fused
        res[name] = measure_lumen(loaded, res["roofline"], args, batches, prompt_len, steps, chunk, bw, wbytes)
        res[name]["fused_qk"] = fused
    loaded.model.fused_qk = default
    del loaded
    gc.collect()
    torch.cuda.empty_cache()
    if args.no_hf:
        return res
    log("building the transformers model (random weights, same config)")
    hf = hf_model_random(cfg, torch.bfloat16, dev)
    res["transformers"] = dict(decode=[], prefill=None)
    for b in batches:
        r = hf_decode_rate(hf, b, prompt_len, min(steps, 32), cfg.vocab_size)
        res["transformers"]["decode"].append(r)
        log(f"transformers decode {r}")
    res["transformers"]["prefill"] = hf_prefill_rate(hf, chunk, cfg.vocab_size)
    log(f"transformers prefill {res['transformers']['prefill']}")
    res["speedup_vs_transformers"] = dict(
        decode={str(a["batch"]): a["steps_per_s"] / b["steps_per_s"]
                for a, b in zip(res["lumen"]["decode"], res["transformers"]["decode"], strict=True)},
        prefill=res["lumen"]["prefill"]["tokens_per_s"] / res["transformers"]["prefill"]["tokens_per_s"])
    return res


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--profile"]:  # where a step's time goes (GPU diagnostics, not a benchmark)
        return decode_profile(argv[1:])
    ap = argparse.ArgumentParser(description="lumen engine vs transformers (and rooflines on GPU)")
    ap.add_argument("--gpu", action="store_true", help="GPU benchmark (default: CPU)")
    ap.add_argument("--smoke", action="store_true", help="tiny preset, a few seconds: checks the code paths")
    ap.add_argument("--model", default=None, help="HF dir / preset:NAME / default (mode default if omitted)")
    ap.add_argument("--out", default=None, help="write the JSON results here")
    ap.add_argument("--new-tokens", type=int, default=64, help="CPU: new tokens per prompt")
    ap.add_argument("--prompt-len", type=int, default=512, help="GPU: prompt tokens")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128], help="GPU: decode batch sizes")
    ap.add_argument("--steps", type=int, default=64, help="GPU: timed decode steps per batch size")
    ap.add_argument("--gpu-mem", type=float, default=0.6, help="GPU: memory fraction for lumen (model + KV)")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    ap.add_argument("--repeats", type=int, default=2, help="CPU: interleaved repeats (best time kept)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU: torch threads for both engines (use 1 on a loaded shared machine)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gpu and not torch.cuda.is_available():
        ap.error("--gpu needs CUDA")
    res = run_gpu(args) if args.gpu else run_cpu(args)
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
