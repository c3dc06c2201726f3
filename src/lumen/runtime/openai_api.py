"""OpenAI-compatible request parsing and response shaping.

Validation is done by hand rather than through pydantic models so that every bad field gets the
OpenAI error shape (`{"error": {"message", "type", "param", "code"}}`) with a message naming the
field, and so that nothing a client sends can reach the engine unchecked.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_STOP_STRINGS = 16
MAX_STOP_LEN = 256
MAX_PROMPT_TOKENS_HARD = 1 << 20
MAX_TOP_K = 2**31 - 1  # larger means "off" anyway, and must still fit the int64 of the wire format


class APIError(Exception):
    """An error returned to the client with an OpenAI-style body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or _default_type(status)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def _default_type(status: int) -> str:
    return {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error",
            503: "service_unavailable"}.get(status, "invalid_request_error" if status < 500 else "server_error")


@dataclass
class GenerationRequest:
    """A validated request, ready for the controller."""

    kind: str  # "completion" | "chat"
    model: str
    prompt_ids: list[int] | None
    prompt_text: str | None
    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    stream: bool = False
    include_usage: bool = False
    return_token_ids: bool = False
    request_id: str = ""


def body_too_large(size: int | None, limit: int) -> APIError:
    got = f"{size} bytes" if size is not None else "larger than that"
    return APIError(413, f"request body is {got}; the limit is {limit} bytes", code="request_too_large")


def parse_json_body(raw: bytes, max_bytes: int = MAX_BODY_BYTES) -> dict[str, Any]:
    if len(raw) > max_bytes:
        raise body_too_large(len(raw), max_bytes)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(400, f"request body is not valid UTF-8 (byte {exc.start})") from None
    try:
        body = json.loads(text)
    except (ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError and integers past Python's 4300-digit conversion limit
        raise APIError(400, f"request body is not valid JSON: {str(exc)[:200]}") from None
    if "\\u" in text:
        # "\ud800" is valid JSON but not text: a lone surrogate would blow up the tokenizer, or the
        # encoding of an error message that quotes it, long after parsing
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except (UnicodeEncodeError, RecursionError, ValueError):
            raise APIError(400, "request body has a string with a lone UTF-16 surrogate (\\ud800-\\udfff)") \
                from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    return body


def _get(body: dict, name: str, types: tuple, default=None, *, required=False):
    if name not in body or body[name] is None:
        if required:
            raise APIError(400, f"'{name}' is a required property", param=name)
        return default
    value = _integral(body[name]) if int in types and float not in types else body[name]
    # bool is an int subclass in Python; a JSON true must not pass as a number
    if isinstance(value, bool) and bool not in types:
        raise APIError(400, f"'{name}' must be of type {_type_names(types)}, got boolean", param=name)
    if not isinstance(value, types):
        raise APIError(400, f"'{name}' must be of type {_type_names(types)}, got {type(value).__name__}",
                       param=name)
    return value


def _float(body: dict, name: str, default: float) -> float:
    value = _get(body, name, (int, float), default=default)
    try:
        return float(value)
    except OverflowError:  # a JSON integer too large for a double
        raise APIError(400, f"'{name}' is out of range", param=name) from None


def _integral(value: Any) -> Any:
    """JSON has one number type: 2.0 is an integer (as JSON Schema and pydantic read it), 2.5 is not."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _type_names(types: tuple) -> str:
    names = {int: "integer", float: "number", str: "string", bool: "boolean", list: "array", dict: "object"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def _token_id_list(value: list, param: str, vocab_size: int) -> list[int]:
    if len(value) > MAX_PROMPT_TOKENS_HARD:
        raise APIError(400, f"'{param}' has too many tokens", param=param)
    ids = [_integral(tok) for tok in value]
    for tok in ids:
        if isinstance(tok, bool) or not isinstance(tok, int):
            raise APIError(400, f"'{param}' must be a string or a list of token ids", param=param)
        if tok < 0 or tok >= vocab_size:
            raise APIError(400, f"token id {tok} in '{param}' is outside the vocabulary [0, {vocab_size})",
                           param=param)
    return ids


def _common(body: dict, kind: str, served_model: str, vocab_size: int) -> dict[str, Any]:
    model = _get(body, "model", (str,), default=served_model)
    if model != served_model:
        raise APIError(404, f"The model '{model}' does not exist; this server serves '{served_model}'",
                       param="model", code="model_not_found")
    n = _get(body, "n", (int,), default=1)
    if n != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    best_of = _get(body, "best_of", (int,), default=None)
    if best_of not in (None, 1):
        raise APIError(400, "best_of is not supported", param="best_of")
    for unsupported in ("logprobs", "top_logprobs", "echo", "suffix", "tools", "functions", "logit_bias"):
        value = body.get(unsupported)
        if value not in (None, False, 0, [], {}):
            raise APIError(400, f"'{unsupported}' is not supported by lumen", param=unsupported)

    max_tokens = _get(body, "max_tokens", (int,), default=None)
    if kind == "chat":
        mct = _get(body, "max_completion_tokens", (int,), default=None)
        if mct is not None:
            max_tokens = mct
    if max_tokens is not None and max_tokens < 1:
        raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")

    temperature = _float(body, "temperature", 1.0)
    if not 0.0 <= temperature <= 2.0:
        raise APIError(400, f"temperature must be in [0, 2], got {temperature}", param="temperature")
    top_p = _float(body, "top_p", 1.0)
    if not 0.0 < top_p <= 1.0:
        raise APIError(400, f"top_p must be in (0, 1], got {top_p}", param="top_p")
    top_k = _get(body, "top_k", (int,), default=-1)
    if top_k == 0 or not -1 <= top_k <= MAX_TOP_K:
        raise APIError(400, f"top_k must be -1 (off) or in [1, {MAX_TOP_K}], got {top_k}", param="top_k")
    seed = _get(body, "seed", (int,), default=None)
    if seed is not None and not -(2**63) <= seed < 2**63:
        raise APIError(400, "seed must fit in 64 bits", param="seed")

    stop_raw = _get(body, "stop", (str, list), default=None)
    stop: list[str] = []
    if isinstance(stop_raw, str):
        stop = [stop_raw]
    elif isinstance(stop_raw, list):
        if len(stop_raw) > MAX_STOP_STRINGS:
            raise APIError(400, f"at most {MAX_STOP_STRINGS} stop sequences are allowed", param="stop")
        if not all(isinstance(s, str) for s in stop_raw):
            raise APIError(400, "'stop' must be a string or a list of strings", param="stop")
        stop = list(stop_raw)
    if any(len(s) == 0 or len(s) > MAX_STOP_LEN for s in stop):
        raise APIError(400, f"stop sequences must be 1 to {MAX_STOP_LEN} characters", param="stop")
    stop_token_ids = _get(body, "stop_token_ids", (list,), default=[])
    if len(stop_token_ids) > MAX_STOP_STRINGS:  # refused, as the schema says, never silently cut
        raise APIError(400, f"at most {MAX_STOP_STRINGS} stop token ids are allowed", param="stop_token_ids")
    stop_token_ids = _token_id_list(stop_token_ids, "stop_token_ids", vocab_size)

    stream = _get(body, "stream", (bool,), default=False)
    options = _get(body, "stream_options", (dict,), default={})
    include_usage = _get(options, "include_usage", (bool,), default=False) if options else False
    if options and not stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
    return dict(model=model, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                seed=seed, stop=stop, stop_token_ids=stop_token_ids,
                ignore_eos=_get(body, "ignore_eos", (bool,), default=False), stream=stream,
                include_usage=include_usage,
                return_token_ids=_get(body, "return_token_ids", (bool,), default=False))


def parse_completion(body: dict, served_model: str, vocab_size: int) -> GenerationRequest:
    common = _common(body, "completion", served_model, vocab_size)
    prompt = _get(body, "prompt", (str, list), required=True)
    prompt_ids = None
    prompt_text = None
    if isinstance(prompt, str):
        prompt_text = prompt
    else:
        # OpenAI accepts a string, a token list, or a batch of either; lumen serves one prompt a request
        if len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            prompt_text = prompt
        elif all(isinstance(p, list) for p in prompt) and prompt:
            raise APIError(400, "batched prompts are not supported; send one prompt per request", param="prompt")
        elif any(isinstance(p, str) for p in prompt):
            raise APIError(400, "batched prompts are not supported; send one prompt per request", param="prompt")
        else:
            prompt_ids = _token_id_list(prompt, "prompt", vocab_size)
    if (prompt_text is not None and prompt_text == "") or (prompt_ids is not None and not prompt_ids):
        raise APIError(400, "prompt must not be empty", param="prompt")
    return GenerationRequest(kind="completion", prompt_ids=prompt_ids, prompt_text=prompt_text,
                             request_id=f"cmpl-{uuid.uuid4().hex}", **common)


def parse_chat(body: dict, served_model: str, vocab_size: int) -> tuple[GenerationRequest, list[dict]]:
    common = _common(body, "chat", served_model, vocab_size)
    messages = _get(body, "messages", (list,), required=True)
    if not messages:
        raise APIError(400, "'messages' must contain at least one message", param="messages")
    if len(messages) > 1024:
        raise APIError(400, "too many messages", param="messages")
    clean: list[dict] = []
    for i, msg in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise APIError(400, f"{param} must be an object", param=param)
        role = msg.get("role")
        if role not in ("system", "user", "assistant", "developer", "tool"):
            raise APIError(400, f"{param}.role must be one of system, user, assistant, developer, tool",
                           param=f"{param}.role")
        content = msg.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError(400, f"{param}.content[{j}] must be a text part "
                                        "({'type': 'text', 'text': ...}); other part types are not supported",
                                   param=f"{param}.content")
                parts.append(part["text"])
            content = "".join(parts)
        elif content is None and role == "assistant":
            content = ""
        elif not isinstance(content, str):
            raise APIError(400, f"{param}.content must be a string or a list of text parts",
                           param=f"{param}.content")
        clean.append({"role": "system" if role == "developer" else role, "content": content})
    request = GenerationRequest(kind="chat", prompt_ids=None, prompt_text=None,
                                request_id=f"chatcmpl-{uuid.uuid4().hex}", **common)
    return request, clean


# ---- responses -------------------------------------------------------------------------------

def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_response(req: GenerationRequest, text: str, token_ids: list[int], finish_reason: str,
                        prompt_tokens: int) -> dict[str, Any]:
    created = int(time.time())
    if req.kind == "chat":
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                  "finish_reason": finish_reason, "logprobs": None}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        obj = "text_completion"
    if req.return_token_ids:
        choice["token_ids"] = token_ids
    return {"id": req.request_id, "object": obj, "created": created, "model": req.model,
            "choices": [choice], "usage": usage(prompt_tokens, len(token_ids))}


def stream_chunk(req: GenerationRequest, text: str, token_ids: list[int], finish_reason: str | None,
                 first: bool = False) -> dict[str, Any]:
    if req.kind == "chat":
        delta: dict[str, Any] = {"content": text}
        if first:
            delta["role"] = "assistant"
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        obj = "text_completion"
    if req.return_token_ids:
        choice["token_ids"] = token_ids
    chunk = {"id": req.request_id, "object": obj, "created": int(time.time()), "model": req.model,
             "choices": [choice]}
    if req.include_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(req: GenerationRequest, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    obj = "chat.completion.chunk" if req.kind == "chat" else "text_completion"
    return {"id": req.request_id, "object": obj, "created": int(time.time()), "model": req.model,
            "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


# ---- OpenAPI description ---------------------------------------------------------------------
# The handlers validate by hand (above); these schemas only *describe* what they accept, so that
# /openapi.json documents the API and schema-driven fuzzers (tests/test_fuzz_api.py) can generate
# valid and invalid requests. Keep them in step with _common / parse_completion / parse_chat.

def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def openapi_components(vocab_size: int, max_model_len: int, served_model: str) -> dict[str, Any]:
    token = {"type": "integer", "minimum": 0, "maximum": vocab_size - 1}
    stop_str = {"type": "string", "minLength": 1, "maxLength": MAX_STOP_LEN}
    common = {
        "model": {"type": "string", "enum": [served_model]},
        "max_tokens": _nullable({"type": "integer", "minimum": 1, "maximum": max(1, max_model_len - 1)}),
        "temperature": _nullable({"type": "number", "minimum": 0, "maximum": 2}),
        "top_p": _nullable({"type": "number", "exclusiveMinimum": 0, "maximum": 1}),
        "top_k": _nullable({"anyOf": [{"type": "integer", "enum": [-1]},
                                      {"type": "integer", "minimum": 1, "maximum": MAX_TOP_K}]}),
        "seed": _nullable({"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1}),
        "stop": _nullable({"anyOf": [stop_str, {"type": "array", "items": stop_str, "maxItems": MAX_STOP_STRINGS}]}),
        "stop_token_ids": _nullable({"type": "array", "items": token, "maxItems": MAX_STOP_STRINGS}),
        "n": _nullable({"type": "integer", "enum": [1]}),
        "best_of": _nullable({"type": "integer", "enum": [1]}),
        "stream": _nullable({"type": "boolean"}),
        "stream_options": _nullable({"type": "object", "properties": {"include_usage": {"type": "boolean"}},
                                     "description": "only with stream: true"}),
        "ignore_eos": _nullable({"type": "boolean"}),
        "return_token_ids": _nullable({"type": "boolean", "description": "lumen extension: token ids per choice"}),
    }
    ids = {"type": "array", "items": token, "minItems": 1, "maxItems": max_model_len}
    completion_request = {
        "type": "object", "required": ["prompt"],
        "properties": {
            "prompt": {"anyOf": [{"type": "string", "minLength": 1}, ids,
                                 {"type": "array", "items": {"type": "string", "minLength": 1},
                                  "minItems": 1, "maxItems": 1},
                                 {"type": "array", "items": ids, "minItems": 1, "maxItems": 1}]},
            **common,
        },
    }
    part = {"type": "object", "required": ["type", "text"],
            "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}}}
    message = {"type": "object", "required": ["role", "content"],
               "properties": {"role": {"type": "string",
                                       "enum": ["system", "user", "assistant", "developer", "tool"]},
                              "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": part}]}}}
    chat_request = {
        "type": "object", "required": ["messages"],
        "properties": {
            "messages": {"type": "array", "items": message, "minItems": 1, "maxItems": 1024},
            "max_completion_tokens": common["max_tokens"],
            **common,
        },
    }
    error = {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
    completion = {"type": "object", "required": ["id", "object", "created", "model", "choices", "usage"],
                  "properties": {"id": {"type": "string"}, "object": {"type": "string"},
                                 "created": {"type": "integer"}, "model": {"type": "string"},
                                 "choices": {"type": "array", "minItems": 1, "maxItems": 1,
                                             "items": {"type": "object", "required": ["index", "finish_reason"]}},
                                 "usage": {"type": "object",
                                           "required": ["prompt_tokens", "completion_tokens", "total_tokens"]}}}
    return {"CompletionRequest": completion_request, "ChatCompletionRequest": chat_request,
            "ErrorResponse": error, "Completion": completion}


ERROR_STATUSES = {400: "Invalid request", 401: "Missing or wrong API key", 404: "Unknown model",
                  413: "Request body too large", 429: "Too many requests in flight",
                  503: "No worker can serve right now"}


def openapi_operation(request_schema: str) -> dict[str, Any]:
    """`openapi_extra` of a generation endpoint: its JSON body and every response it can give."""
    ref = {"$ref": f"#/components/schemas/{request_schema}"}
    err = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    responses: dict[str, Any] = {
        "200": {"description": "The completion (JSON), or with stream: true a stream of server-sent events",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Completion"}},
                            # one schema per server-sent event: data is a JSON chunk, then "[DONE]"
                            "text/event-stream": {"schema": {"type": "object", "required": ["data"],
                                                             "properties": {"data": {"type": "string"}}}}}},
    }
    responses.update({str(code): {"description": text, "content": err} for code, text in ERROR_STATUSES.items()})
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}},
            "responses": responses}
