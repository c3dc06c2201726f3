"""Speculative measurement loop and the default draft (built from the committed recipe): an fp16 copy
of the target whose linears the loader packs as fp16 on CPU."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from torch import nn

from lumen.engine import Engine, EngineConfig, SamplingParams
from lumen.model import PRESETS, load_model, random_model, save_model
from lumen.model.draft import copy_layers, load_recipe
from lumen.model.hub import _build, _is_prepared, default_paths, prepare_default
from lumen.model.quant import FP16_WEIGHTS, QUANT_KEY, Fp16Linear
from lumen.model.specmeasure import PROMPTS, SpecStats, decode_step_time, greedy_decode, greedy_spec_decode

torch.set_num_threads(1)


@pytest.mark.parametrize("k", [1, 3, 4])
def test_spec_decode_equals_target_greedy_with_any_draft(k):
    cfg = PRESETS["tiny-llama"]
    target = random_model(cfg, dtype=torch.float64, std=0.5, seed=1)
    prompt = [3, 17, 250, 9, 41]
    want = greedy_decode(target, prompt, 30)
    for draft, expect_all in ((random_model(cfg, dtype=torch.float64, std=0.5, seed=2), False), (target, True)):
        stats = SpecStats()
        assert greedy_spec_decode(target, draft, prompt, 30, k=k, stats=stats) == want
        assert stats.proposed > 0 and (stats.acceptance == 1.0) == expect_all


def test_copy_layers_keeps_selected_layers(tmp_path):
    cfg = PRESETS["tiny-llama"]
    src = save_model(random_model(cfg, seed=3), cfg, tmp_path / "t")
    (tmp_path / "d").mkdir()
    copy_layers(src, tmp_path / "d", [0, 2], dtype=torch.bfloat16)
    d = load_model(tmp_path / "d", progress=False)
    t = load_model(src, progress=False)
    assert d.config.num_layers == 2 and d.config.replace(num_layers=3, name="t") == t.config
    for dst, srcl in ((0, 0), (1, 2)):
        for (n1, p1), (n2, p2) in zip(d.model.layers[dst].named_parameters(), t.model.layers[srcl].named_parameters(),
                                      strict=True):
            assert n1 == n2 and torch.equal(p1, p2.to(torch.bfloat16).float())
    with pytest.raises(ValueError):
        copy_layers(src, tmp_path / "d", [2, 1])


def test_a_self_draft_linked_to_its_target_is_read_once_for_both(tmp_path, monkeypatch):
    """share_with_target: the draft's embedding/norm/head shard is a link to the target's, the draft
    loads as the target's first layers, and the target read that follows takes that shard from the
    draft's read (mechanism 3 reads it once) -- unless the file changed since."""
    from lumen.model import loader
    from lumen.model.draft import LAYERS_SHARD, SHARED_SHARD
    from lumen.model.selfdraft import first_layers

    cfg = PRESETS["tiny-llama"]
    target_dir = save_model(random_model(cfg, seed=5), cfg, tmp_path / "t")
    draft_dir = tmp_path / "d"
    draft_dir.mkdir()
    copy_layers(target_dir, draft_dir, [0, 1], share_with_target=True)
    assert sorted(p.name for p in target_dir.glob("*.safetensors")) == [LAYERS_SHARD, SHARED_SHARD]
    assert (draft_dir / SHARED_SHARD).is_symlink()
    assert (draft_dir / SHARED_SHARD).resolve() == (target_dir / SHARED_SHARD).resolve()

    reads = []
    real_read = loader.read_safetensors
    monkeypatch.setattr(loader, "read_safetensors", lambda f, **kw: reads.append(f.name) or real_read(f, **kw))
    shared = loader.SharedReads()
    draft = load_model(draft_dir, progress=False, shared_reads=shared)
    target = load_model(target_dir, progress=False)
    want = first_layers(target.model, 2)
    assert draft.config.num_layers == 2
    for (n1, p1), (n2, p2) in zip(draft.model.state_dict().items(), want.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)
    assert len(shared.files) == 1 and shared.nbytes() > 0 and sorted(reads) == [LAYERS_SHARD, LAYERS_SHARD, SHARED_SHARD, SHARED_SHARD]

    reads.clear()
    held = shared.nbytes()
    host = loader.read_weights_to_host(target_dir, shared_reads=shared)
    assert reads == [LAYERS_SHARD] and shared.reused_bytes == held  # from the draft's read
    assert shared.files == {}  # given once: nothing more is held
    plain = loader.read_weights_to_host(target_dir)
    assert host.keys() == plain.keys() and all(torch.equal(host[k], plain[k]) for k in plain)

    shared = loader.SharedReads()
    load_model(draft_dir, progress=False, shared_reads=shared)
    st = (target_dir / SHARED_SHARD).stat()
    os.utime(target_dir / SHARED_SHARD, ns=(st.st_atime_ns, st.st_mtime_ns))  # same times, new ctime
    reads.clear()
    loader.read_weights_to_host(target_dir, shared_reads=shared)
    assert sorted(reads) == [LAYERS_SHARD, SHARED_SHARD]  # touched on disk since: read again

    with pytest.raises(ValueError, match="not BF16"):  # a linked shard cannot change dtype
        copy_layers(target_dir, tmp_path / "d", [0], dtype=torch.bfloat16, share_with_target=True)


def test_linked_self_draft_layouts_and_refusals(tmp_path):
    """The link holds through a symlinked directory; a refused copy leaves the target as it was;
    a directory re-used for the other layout loads the new weights; a target sharded another way
    is refused; a split cut short before removing the one file is finished."""
    from lumen.model.draft import SHARED_SHARD, split_shared_shard

    cfg = PRESETS["tiny"]  # untied: the head is in the shared shard too
    target_dir = save_model(random_model(cfg, seed=6), cfg, tmp_path / "real" / "t")
    with pytest.raises(ValueError, match="not BF16"):
        copy_layers(target_dir, tmp_path, [0], dtype=torch.bfloat16, share_with_target=True)
    assert [p.name for p in target_dir.glob("*.safetensors")] == ["model.safetensors"]  # untouched

    (tmp_path / "deep" / "er").mkdir(parents=True)
    (tmp_path / "via").symlink_to(tmp_path / "deep" / "er")  # not as deep as it looks
    draft_dir = tmp_path / "via" / "d"
    draft_dir.mkdir()
    copy_layers(target_dir, draft_dir, [1], share_with_target=True)
    target = load_model(target_dir, progress=False).model
    layer1 = dict(target.layers[1].named_parameters())

    def draft_layer0():
        return dict(load_model(draft_dir, progress=False).model.layers[0].named_parameters())

    assert all(torch.equal(p, layer1[n]) for n, p in draft_layer0().items())
    copy_layers(target_dir, draft_dir, [0])  # the same directory, one file now
    layer0 = dict(target.layers[0].named_parameters())
    assert all(torch.equal(p, layer0[n]) for n, p in draft_layer0().items())

    save_model(random_model(cfg, seed=6), cfg, target_dir, split_shared=True)  # leave a stray one file
    torch.save({}, target_dir / "model.safetensors")
    split_shared_shard(target_dir)
    assert not (target_dir / "model.safetensors").exists()

    index = json.loads((target_dir / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "model-layers.safetensors"
    (target_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="not as write_split does"):
        copy_layers(target_dir, tmp_path / "real", [0], share_with_target=True)
    assert (target_dir / SHARED_SHARD).is_file()


def test_build_is_atomic_and_marker_checks_recipe(tmp_path):
    final = tmp_path / "m"

    def broken(out):
        (out / "half-written").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        _build(final, 1, broken)
    assert not final.exists() and list(tmp_path.iterdir()) == []
    _build(final, 1, lambda out: {"recipe": {"drop_layers": [5]}})
    assert _is_prepared(final, 1) and _is_prepared(final, 1, {"drop_layers": [5]})
    assert not _is_prepared(final, 2) and not _is_prepared(final, 1, {"drop_layers": [4]})


@pytest.fixture(scope="module")
def pair():
    prepare_default()
    return load_model("default", progress=False), load_model("default-draft", progress=False)


def test_default_draft_follows_committed_recipe(pair):
    target, draft = pair
    recipe = load_recipe()
    assert draft.config.num_layers == target.config.num_layers - len(recipe["drop_layers"])
    path = default_paths()[1]
    assert json.loads((path / "lumen_prepared.json").read_text())["recipe"] == recipe
    assert json.loads((path / "config.json").read_text())[QUANT_KEY] == recipe["quantization"] == FP16_WEIGHTS
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:  # fp16 on disk: half the bytes
        assert f.get_tensor("model.norm.weight").dtype == torch.float16
    assert draft.model.dtype == torch.float32  # embedding / norms cast to the requested dtype at load
    # on CPU every linear (the tied head too, as its own copy) is fp16-packed
    assert not any(isinstance(m, nn.Linear) for m in draft.model.modules())
    assert isinstance(draft.model.lm_head, Fp16Linear)
    assert draft.tokenizer.encode("Hello world") == target.tokenizer.encode("Hello world")


def _chat(tok, text):
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]))


def test_default_draft_acceptance_on_prompt_subset(pair):
    # The full figure (16 prompts) comes from benchmarks/draft_acceptance.py; a 4-prompt subset keeps
    # this test short while still failing for a draft that does not track the target. The fp16 copy
    # measured 1.0 on the full set; 0.9 leaves room for a rare near-tie in the logits.
    target, draft = pair
    stats = SpecStats()
    for text in PROMPTS[:4]:
        prompt = _chat(target.tokenizer, text)
        out = greedy_spec_decode(target.model, draft.model, prompt, 32, 4, target.config.eos_token_ids, stats)
        assert out == greedy_decode(target.model, prompt, 32, target.config.eos_token_ids)
    assert stats.acceptance >= 0.9, stats


def test_default_draft_step_is_much_cheaper_than_the_target(pair):
    # The point of the draft: batch-1 decode steps measured ~0.37 of the target's on the CPU box.
    # Interleaved repeats, minimum of each (interference on a shared machine only adds time).
    target, draft = pair
    t_target, t_draft = [], []
    for _ in range(3):
        t_target.append(decode_step_time(target.model, steps=16, repeats=1))
        t_draft.append(decode_step_time(draft.model, steps=16, repeats=1))
    assert min(t_draft) < 0.7 * min(t_target), (t_draft, t_target)


def test_default_draft_in_engine_keeps_target_greedy_outputs(pair):
    # The engine's fused verify (deterministic float64 target) with the default draft proposing:
    # the committed tokens are the target's own greedy tokens, and nearly every proposal is accepted.
    target = load_model("default", dtype=torch.float64, progress=False)
    _, draft = pair
    prompts = {f"r{i}": _chat(target.tokenizer, text) for i, text in enumerate(PROMPTS[4:6])}
    eng = Engine(target, EngineConfig(deterministic=True, draft=draft, num_draft_tokens=4))
    for rid, p in prompts.items():
        eng.add_request(rid, p, SamplingParams(max_tokens=24, ignore_eos=True))
    out = {rid: [] for rid in prompts}
    while eng.has_work():
        for o in eng.step():
            out[o.req_id] += o.token_ids
    for rid, p in prompts.items():
        assert out[rid] == greedy_decode(target.model, p, 24), rid
    s = eng.stats()
    assert s["spec_drafts"] > 0 and s["spec_acceptance"] >= 0.9, s
