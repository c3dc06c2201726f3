"""Tokenizer: tokenizer.json through `tokenizers`, the model's own jinja2 chat template, streaming decode."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer


def _token_content(tok: Any) -> str | None:
    # tokenizer_config.json writes special tokens either as strings or as AddedToken dicts.
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


def _template_env() -> ImmutableSandboxedEnvironment:
    # Same environment settings as transformers' apply_chat_template, so templates render identically.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, **_: json.dumps(
        x, indent=indent, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _flatten_content(content: Any) -> str:
    """OpenAI-style content: a string, or a list of {"type": "text", "text": ...} parts."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, dict) and part.get("type") == "text":
                out.append(str(part.get("text", "")))
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"unsupported message content part {kind!r}: only text is supported")
        return "".join(out)
    raise ValueError(f"message content must be a string or a list of text parts, got {type(content).__name__}")


class Tokenizer:
    def __init__(self, tokenizer: _HFTokenizer, chat_template: str | None = None,
                 bos_token: str | None = None, eos_tokens: Sequence[str] = (),
                 eos_token_ids: Iterable[int] = ()) -> None:
        self._tok = tokenizer
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.bos_token_id = tokenizer.token_to_id(bos_token) if bos_token else None
        ids = list(eos_token_ids)
        for t in eos_tokens:
            tid = tokenizer.token_to_id(t)
            if tid is not None and tid not in ids:
                ids.append(tid)
        self.eos_token_ids: tuple[int, ...] = tuple(ids)
        self.eos_token = eos_tokens[0] if eos_tokens else None
        self._template = _template_env().from_string(chat_template) if chat_template else None
        self.special_ids = frozenset(
            i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special)

    @classmethod
    def from_dir(cls, path: str | Path, eos_token_ids: Iterable[int] = ()) -> Tokenizer:
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {path}")
        cfg: dict[str, Any] = {}
        if (path / "tokenizer_config.json").is_file():
            cfg = json.loads((path / "tokenizer_config.json").read_text())
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        if template is None and (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        eos = _token_content(cfg.get("eos_token"))
        return cls(_HFTokenizer.from_file(str(tj)), chat_template=template,
                   bos_token=_token_content(cfg.get("bos_token")),
                   eos_tokens=[eos] if eos else [], eos_token_ids=eos_token_ids)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> _HFTokenizer:
        return self._tok

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = False, **kwargs: Any) -> str | list[int]:
        """Render with the model's own template; tokenize=True returns ids (special tokens parsed)."""
        if self._template is None:
            raise ValueError("this tokenizer has no chat template")
        msgs = [{**m, "content": _flatten_content(m.get("content"))} for m in messages]
        text = self._template.render(messages=msgs, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                                     **kwargs)
        return self.encode(text) if tokenize else text


class IncrementalDecoder:
    """Streaming detokenizer: `add(ids)` returns only the newly completed text.

    Decodes a short window of already-emitted tokens together with the new ones and emits the
    difference, so byte-level pieces of one UTF-8 character (or tokenizers that merge leading
    spaces) never leak half-decoded text; an unfinished character is held back as long as the
    decoded window ends in U+FFFD.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the context window
        self.read_offset = 0  # tokens before this have been emitted

    def add(self, new_ids: Iterable[int]) -> str:
        self.ids.extend(int(i) for i in new_ids)
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        full = self.tok.decode(self.ids[self.prefix_offset:], self.skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (e.g. a truncated character at the end of the stream)."""
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        full = self.tok.decode(self.ids[self.prefix_offset:], self.skip)
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix):]
