"""The messages of lumen's control and data planes, with their schemas.

Control plane (controller ROUTER <-> worker DEALER):
  worker -> controller
    HELLO   a new incarnation is up: pid, data address (its PULL socket), device
    HB      heartbeat with load stats (sent from the worker's heartbeat thread, src "w<i>.hb")
    STATE   lifecycle: loading phases done, serving, assisting, ...
    OUT     tokens produced by the last engine step(s): [[req, n_tokens, finish], ...] + ids frame
    CKPT    holder's report of valid checkpoint pages per request
    RESERVED  holder's answer to RESERVE (ok or refused); the executor is told its holder only after ok
  controller -> worker (every body carries `to_ep`: a worker ignores commands for another epoch)
    ADD     run a request (new, resumed by recompute, or restored from this worker's ckpt store)
    ABORT   stop a request
    HOLDER  the holders a request's completed KV pages stream to, first copy first (the full list)
    RESERVE / RELEASE   reserve / free host bytes for a request's checkpoint (on the holder)
    ASSIST  assisted recovery: pair / unpair a recovering worker and its partner
    SHUTDOWN
Data plane (worker PUSH -> worker PULL; pages have their own socket and threads, see kv_stream.py):
    PAGE    one KV page: req, index, end position, tag; frame = page bytes
    MIRROR  partner -> recovering worker: token ids of decoding requests (assisted recovery)
    PROPOSE recovering worker -> partner: K draft tokens per request

Token ids travel in payload frames (int32), never as long msgpack lists.
"""

from __future__ import annotations

from .transport import Schema

MAX_ID = 128          # request ids are ours (short) but bound them anyway
MAX_BATCH = 4096      # items per OUT / CKPT / MIRROR / PROPOSE message
MAX_CKPT_COPIES = 8   # checkpoint copies of one request (--ckpt-replicas)
MAX_MIRRORED = 64     # requests a partner mirrors to its drafter at once (one small draft model on one device)
MAX_TOKENS = 1 << 20  # tokens of one request's context
HB_MAX_STATS = 160  # keys per heartbeat; a worker publishes ~97 (engine, store, transport, loop, assist counters, load)
# what the controller decides with (routing load, stall detection, spec metrics): never trimmed
HB_DECISION_KEYS = ("num_waiting", "num_running", "q_wait_s", "kv_usage", "loop_age_s", "spec_drafts",
                    "spec_draft_tokens", "spec_accepted_tokens", "spec_acceptance", "ckpt_stored_bytes",
                    # pairing by gain (runtime.assist_pricing): the next step's load and the step-time model
                    "load_decoding", "load_context_tokens", "load_queued_tokens", "load_queued_requests",
                    "chunk_tokens", "step_c0", "step_c1", "step_c2", "step_c3", "step_c4", "step_c5")
MAX_CKPT_REPORT = 1000  # requests per CKPT report (keeps the header well under its 64 KiB bound)
I64 = (-(2**63), 2**63 - 1)
U31 = (0, 2**31 - 1)

_params = (dict, 16)


def build_schema() -> Schema:
    s = Schema()
    # worker -> controller
    s.register("HELLO", {"worker": (int, U31), "pid": (int, U31), "data_addr": (str, 256), "kv_addr": (str, 256),
                         "device": (str, 64), "host": (str, 256)}, frames=0)
    s.register("HB", {"stats": (dict, HB_MAX_STATS)}, frames=0)
    s.register("STATE", {"state": (str, 32), "info": (dict, 64)}, optional=("info",), frames=0)
    # items: [req_id, number of new tokens in the ids frame, finish reason or ""]
    s.register("OUT", {"items": (list, MAX_BATCH, (list, (3, 3)))}, frames=1)
    s.register("CKPT", {"valid": (dict, MAX_CKPT_REPORT)}, frames=0)
    s.register("RESERVED", {"req": (str, MAX_ID), "gen": (int, U31), "ok": (int, (0, 1))}, frames=0)
    # controller -> worker
    # frames: context token ids (int32), then the expected page tags (16 bytes each, concatenated)
    s.register("ADD", {"to_ep": (int, U31), "req": (str, MAX_ID), "n_prompt": (int, (1, MAX_TOKENS)),
                       "params": _params, "restore_pages": (int, (0, MAX_TOKENS))}, frames=2)
    s.register("ABORT", {"to_ep": (int, U31), "req": (str, MAX_ID)}, frames=0)
    # holders: [[holder id, KV address], ...], the request's confirmed copies, first copy first
    s.register("HOLDER", {"to_ep": (int, U31), "req": (str, MAX_ID),
                          "holders": (list, MAX_CKPT_COPIES, (list, (2, 2)))}, frames=0)
    s.register("RESERVE", {"to_ep": (int, U31), "req": (str, MAX_ID), "bytes": (int, (0, 2**48)),
                           "owner": (int, U31), "gen": (int, U31)}, frames=0)
    s.register("RELEASE", {"to_ep": (int, U31), "req": (str, MAX_ID)}, frames=0)
    s.register("ASSIST", {"to_ep": (int, U31), "role": (str, 16), "peer": (int, (-1, 2**31 - 1)),
                          "addr": (str, 256), "k": (int, (1, 16))}, frames=0)
    s.register("SHUTDOWN", {"to_ep": (int, U31)}, frames=0)
    # data plane
    s.register("PAGE", {"req": (str, MAX_ID), "index": (int, (0, MAX_TOKENS)),
                        "end": (int, (1, MAX_TOKENS)), "tag": (bytes, 64)}, frames=1)
    # MIRROR: per request [req_id, context length, n ids in frame]; ids frame = the new tail
    s.register("MIRROR", {"items": (list, MAX_BATCH, (list, (3, 3))), "drop": (list, MAX_BATCH, (str, MAX_ID))},
               frames=1)
    # PROPOSE: per request [req_id, base length, k]; ids frame = concatenated proposals
    s.register("PROPOSE", {"items": (list, MAX_BATCH, (list, (3, 3)))}, frames=1)
    return s


SCHEMA = build_schema()


def sampling_params_to_wire(p) -> dict:
    return {"max_tokens": int(p.max_tokens), "temperature": float(p.temperature), "top_p": float(p.top_p),
            "top_k": int(p.top_k), "seed": p.seed, "ignore_eos": bool(p.ignore_eos),
            "stop_token_ids": [int(t) for t in p.stop_token_ids][:16]}
