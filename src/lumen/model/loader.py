"""Load a Decoder from a Hugging Face directory, a random-init preset, or the embedded default model."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import PRESETS, ModelConfig
from .decoder import Decoder
from .quant import QUANT_KEY, fp16_linear_available, quantize_linears
from .safetensors_io import read_safetensors
from .tokenizer import Tokenizer
from .weight_files import (
    SHARED_SHARD,
    read_weight_index,
    write_one_file,
    write_split,
)
from .weights import assemble, fill_rows, gather_parts, hf_sources, to_hf_state

# Decoder parameter name -> host tensor, or the parts a fused parameter is made of (see
# read_weights_to_host).
HostState = dict[str, "torch.Tensor | tuple[torch.Tensor, ...]"]

PRESET_SEED = 1234

@dataclass
class LoadedModel:
    model: Decoder
    config: ModelConfig
    tokenizer: Tokenizer | None
    path: Path | None  # the HF directory weights came from (None for presets)
    phases: dict[str, float] = field(default_factory=dict)  # seconds: disk_to_host, host_to_device


# ---------------------------------------------------------------- HF directories

def read_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"not a model directory (no config.json): {path}")
    d = json.loads(cfg_file.read_text())
    gen = path / "generation_config.json"
    if gen.is_file():  # generation_config's eos list is the one generation should stop on
        eos = json.loads(gen.read_text()).get("eos_token_id")
        if eos is not None:
            d = {**d, "eos_token_id": eos}
    return ModelConfig.from_hf(d, name=path.name)


def _weight_files(path: Path) -> list[Path]:
    weight_map = read_weight_index(path)
    if weight_map is not None:
        files = [path / n for n in sorted(set(weight_map.values()))]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"weight shards listed in the index are missing: {missing}")
    return files


@contextmanager
def _progress(total: int, desc: str, enabled: bool) -> Iterator:
    if not enabled:
        yield lambda _name: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    # stderr, so a CLI's stdout (generated text, JSON) stays clean
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(desc, total=total)
        yield lambda _name: bar.advance(task)


@dataclass
class SharedReads:
    """Safetensors files one load read for two models (see `read_weights_to_host`): the file's
    identity -> its tensors (until a later read takes them), and the bytes such reads took from
    here instead of the disk."""

    files: dict[tuple, dict[str, torch.Tensor]] = field(default_factory=dict)
    reused_bytes: int = 0

    def nbytes(self) -> int:
        return sum(_nbytes(got) for got in self.files.values())


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _file_identity(f: Path) -> tuple:
    """The file behind f (links followed): path, device, inode, size, mtime and ctime (which no
    tool sets back), equal only for the same file unchanged since it was read."""
    st = f.stat()
    return str(f.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def read_weights_to_host(path: str | Path, dtype: torch.dtype = torch.float32, pin: bool = False,
                         progress: bool = False, config: ModelConfig | None = None,
                         shared_reads: SharedReads | None = None) -> HostState:
    """Disk -> host phase: read the safetensors of an HF directory; Decoder name -> host tensor.

    Reads the files (no cache across loads): recovery reloads must pay the real disk cost. The one
    exception is `shared_reads`, the files one load read for two models: a self-draft's shard that
    is a link to its target's shard (`lumen.model.draft.copy_layers(share_with_target=True)`) is
    recorded there when the draft is read, and the target read that follows in the same recovery
    takes those tensors instead of reading the same file again (the same file, unchanged: see
    `_file_identity`).
    With `pin` (a CUDA destination) the files are read into page-locked buffers and fused
    parameters stay as their parts (a tuple), assembled on the device by `build_model_from_host`
    with no host-side copy; otherwise they are assembled into `dtype` host tensors here.
    """
    path = Path(path)
    cfg = config or read_config(path)
    tensors: dict[str, torch.Tensor] = {}
    for f in _weight_files(path):
        # only a linked shared shard (a self-draft's) is kept, and given once: no more is held
        key = _file_identity(f) if shared_reads is not None and f.name == SHARED_SHARD else None
        got = shared_reads.files.pop(key, None) if key is not None else None
        if got is None:
            got = read_safetensors(f, pin=pin)
            if key is not None and Path(key[0]).parent != path.resolve():  # a link out of this dir
                shared_reads.files[key] = got
        else:
            shared_reads.reused_bytes += _nbytes(got)
        tensors.update(got)

    def get(name: str) -> torch.Tensor:
        if name not in tensors:
            raise ValueError(f"{path}: tensor {name!r} missing from the checkpoint")
        return tensors[name]

    if pin:
        return {name: got if len(got) > 1 else got[0] for name, got in gather_parts(cfg, get).items()}
    sources = hf_sources(cfg)
    n_src = sum(len(srcs) for srcs in sources.values())
    with _progress(n_src, f"loading {path.name}", progress) as tick:
        return assemble(cfg, get, dtype, on_tensor=tick)


def _assign(model: Decoder, state: dict[str, torch.Tensor]) -> None:
    """Install tensors as the parameters (no copy); a tied lm_head is re-pointed at the embedding."""
    res = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in res.missing_keys if not (model.config.tie_embeddings and k == "lm_head.weight")]
    if missing or res.unexpected_keys:
        raise ValueError(f"state does not match the model: missing {missing}, unexpected {res.unexpected_keys}")
    if model.config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight


def _to_device(v: torch.Tensor | tuple[torch.Tensor, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v.to(device=device, dtype=dtype, non_blocking=True)
    # each part lands straight in its rows: no fused copy on the host
    dst = torch.empty((sum(t.shape[0] for t in v), *v[0].shape[1:]), device=device, dtype=dtype)
    return fill_rows(dst, v, "fused parameter")


def _param_nbytes(v: torch.Tensor | tuple[torch.Tensor, ...]) -> int:
    return sum(t.nbytes for t in ((v,) if isinstance(v, torch.Tensor) else v))


def build_model_from_host(config: ModelConfig, host_state: HostState,
                          device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                          before_copy: Callable[[int], None] | None = None) -> Decoder:
    """Host -> device phase: a Decoder on `device` holding copies of `host_state` (non-blocking if pinned).

    `before_copy(nbytes)`, if given, runs before each tensor's copy and each copy completes before the
    next (a worker with a time slot copies only inside its slot: lumen.policy.slots)."""
    device = torch.device(device)
    with torch.device("meta"):
        model = Decoder(config)
    state = {}
    for k, v in host_state.items():
        if before_copy is not None:
            before_copy(_param_nbytes(v))
        state[k] = _to_device(v, device, dtype)
        if before_copy is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
    _assign(model, state)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return model.eval()


def _apply_quantization(model: Decoder, path: Path, device: torch.device, dtype: torch.dtype) -> None:
    """Apply the load-time quantization a directory's config.json asks for (lumen.model.quant).

    CPU only: elsewhere the directory loads unquantized in `dtype` (the scheme targets CPU decode),
    and so it does on a CPU whose torch lacks the kernels; a draft only proposes, so either way
    outputs are unchanged and only speed differs. Both fallbacks say so on stderr.
    """
    scheme = json.loads((path / "config.json").read_text()).get(QUANT_KEY)
    if not scheme:
        return
    if device.type != "cpu" or not fp16_linear_available():
        why = f"on {device}" if device.type != "cpu" else "this torch build lacks the FBGEMM fp16 kernels"
        print(f"[lumen] {path.name}: {QUANT_KEY}={scheme} not applied ({why}); loaded unquantized in "
              f"{str(dtype).removeprefix('torch.')}", file=sys.stderr, flush=True)
        return
    quantize_linears(model, scheme)


def random_model(config: ModelConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 seed: int = PRESET_SEED, std: float = 0.02) -> Decoder:
    """Random weights made directly on the device in the target dtype (no fp32 CPU detour), seeded."""
    device = torch.device(device)
    with torch.device("meta"):
        model = Decoder(config)
    gen = torch.Generator(device=device).manual_seed(seed) if device.type != "meta" else None
    state = {}
    for name, p in model.state_dict().items():
        if config.tie_embeddings and name == "lm_head.weight":
            continue
        if name.endswith("norm.weight"):
            state[name] = torch.ones(p.shape, device=device, dtype=dtype)
        else:
            # Drawn in fp32 whatever the dtype, so fp32/bf16/fp64 copies of a preset hold the same
            # values (rounded); the stream depends on the device type (CPU vs CUDA generators).
            t = torch.empty(p.shape, device=device, dtype=torch.float32).normal_(0.0, std, generator=gen)
            state[name] = t.to(dtype)
    _assign(model, state)
    return model.eval()


# ---------------------------------------------------------------- public entry points

def load_model(spec: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               progress: bool = True, shared_reads: SharedReads | None = None,
               pin: bool | None = None) -> LoadedModel:
    """spec: an HF directory, "preset:NAME", "default" or "default-draft". `shared_reads`: see
    `read_weights_to_host`. `pin`: page-lock the host copy (default: for a CUDA device)."""
    spec_s = str(spec)
    if spec_s.startswith("preset:"):
        name = spec_s.split(":", 1)[1]
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}")
        cfg = PRESETS[name]
        return LoadedModel(random_model(cfg, device, dtype), cfg, None, None)
    if spec_s in ("default", "default-draft"):
        from .hub import default_paths, prepare_default
        prepare_default()
        path = default_paths()[0 if spec_s == "default" else 1]
    else:
        path = Path(spec_s).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"model path does not exist: {path} "
                                    "(expected an HF directory, preset:NAME, default or default-draft)")
        if not path.is_dir():
            raise ValueError(f"model path is not a directory: {path}")
    cfg = read_config(path)
    t0 = time.perf_counter()
    # page-locked for a CUDA destination by default: pageable host -> device copies run several times
    # slower, though page-locking costs time of its own, which a one-time copy may not win back
    if pin is None:
        pin = torch.device(device).type == "cuda"
    host = read_weights_to_host(path, dtype=dtype, progress=progress, config=cfg,
                                pin=pin, shared_reads=shared_reads)
    t1 = time.perf_counter()
    model = build_model_from_host(cfg, host, device, dtype)
    del host  # the quantized linears below replace these tensors: let them go
    _apply_quantization(model, path, torch.device(device), dtype)
    t2 = time.perf_counter()
    tok = Tokenizer.from_dir(path, eos_token_ids=cfg.eos_token_ids) if (path / "tokenizer.json").is_file() else None
    return LoadedModel(model, cfg, tok, path, {"disk_to_host_s": round(t1 - t0, 3),
                                               "host_to_device_s": round(t2 - t1, 3)})


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "chat_template.jinja", "generation_config.json")


def save_model(model: Decoder, config: ModelConfig, directory: str | Path,
               tokenizer_dir: str | Path | None = None, dtype: torch.dtype | None = None,
               split_shared: bool = False) -> Path:
    """Write an HF-compatible directory: config.json + model.safetensors (+ tokenizer files copied);
    with `split_shared`, the weights as `write_split` shards instead of one file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype or v.dtype) for k, v in model.state_dict().items()}
    hf = to_hf_state(config, state)
    (write_split if split_shared else write_one_file)(directory, hf)
    d = config.to_hf()
    d["torch_dtype"] = str(next(iter(hf.values())).dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(d, indent=2) + "\n")
    if tokenizer_dir is not None:
        for name in _TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.is_file() and src.resolve() != (directory / name).resolve():
                (directory / name).write_bytes(src.read_bytes())
    return directory
