"""Prometheus metrics of the gateway, with vLLM's names where vLLM has the quantity."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry()

_LAT = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)

RUNNING = Gauge("vllm:num_requests_running", "Requests executing on a worker", registry=REGISTRY)
WAITING = Gauge("vllm:num_requests_waiting", "Requests queued, not yet producing tokens", registry=REGISTRY)
KV_USAGE = Gauge("vllm:kv_cache_usage_perc", "Mean KV-cache usage of serving workers (0..1)", registry=REGISTRY)
TTFT = Histogram("vllm:time_to_first_token_seconds", "Time to first token", buckets=_LAT, registry=REGISTRY)
ITL = Histogram("vllm:inter_token_latency_seconds", "Inter-token latency", buckets=_LAT, registry=REGISTRY)
E2E = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency", buckets=_LAT,
                registry=REGISTRY)
PROMPT_TOKENS = Counter("vllm:prompt_tokens", "Prompt tokens processed", registry=REGISTRY)
GEN_TOKENS = Counter("vllm:generation_tokens", "Generated tokens", registry=REGISTRY)
SUCCESS = Counter("vllm:request_success", "Finished requests", ["finished_reason"], registry=REGISTRY)
SPEC_DRAFTS = Counter("vllm:spec_decode_num_drafts", "Speculative drafts verified", registry=REGISTRY)
SPEC_DRAFT_TOKENS = Counter("vllm:spec_decode_num_draft_tokens", "Draft tokens verified", registry=REGISTRY)
SPEC_ACCEPTED = Counter("vllm:spec_decode_num_accepted_tokens", "Draft tokens accepted", registry=REGISTRY)

FAILURES = Counter("lumen:worker_failures", "Workers declared dead", ["worker"], registry=REGISTRY)
RESTARTS = Counter("lumen:worker_restarts", "Worker incarnations started after a failure", ["worker"],
                   registry=REGISTRY)
WORKER_STATE = Gauge("lumen:worker_state", "Worker state (0 down, 1 loading_draft, 2 assisting, 3 switching, "
                     "4 serving)", ["worker"], registry=REGISTRY)
RECOVERY_SECONDS = Histogram("lumen:worker_recovery_seconds", "From declared dead to serving again",
                             buckets=(0.5, 1, 2, 5, 10, 20, 40, 80, 160), registry=REGISTRY)
INTERRUPTED = Counter("lumen:interrupted_requests", "Requests interrupted by a worker failure", registry=REGISTRY)
RESTORES = Counter("lumen:checkpoint_restores", "Interrupted requests sent to their holder to restore",
                   registry=REGISTRY)
RECOMPUTE_TOKENS = Counter("lumen:recompute_tokens", "Tokens re-prefilled from scratch after a failure",
                           registry=REGISTRY)
UNPROTECTED = Counter("lumen:unprotected_requests", "Requests that found no checkpoint holder with room",
                      registry=REGISTRY)
REPROTECTED = Counter("lumen:reprotected_requests", "Requests given a new holder after theirs died",
                      registry=REGISTRY)
CKPT_RESERVED = Gauge("lumen:checkpoint_reserved_bytes", "Host bytes reserved for checkpoints", registry=REGISTRY)
CKPT_STORED = Gauge("lumen:checkpoint_stored_bytes", "Host bytes of valid checkpoint pages", registry=REGISTRY)
STALE_MESSAGES = Counter("lumen:stale_messages", "Messages from fenced incarnations, ignored", registry=REGISTRY)
REJECTED = Counter("lumen:rejected_requests", "Requests refused by back-pressure", ["reason"], registry=REGISTRY)
REQUEST_ERRORS = Counter("lumen:request_errors", "Requests ended with an error", ["status"], registry=REGISTRY)
SPEC_ACCEPTANCE = Gauge("lumen:assist_acceptance_rate", "Accepted / proposed draft tokens verified by a partner "
                        "during assisted recovery", ["worker"], registry=REGISTRY)
RECOVERY_PHASE = Histogram("lumen:recovery_phase_seconds", "Duration of each phase of a worker's recovery "
                           "(draft_load, assist, disk_to_host, host_to_device, warmup)", ["phase"],
                           buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80), registry=REGISTRY)
HB_LATE_MAX = Gauge("lumen:heartbeat_late_max_seconds", "Largest lateness of a worker's heartbeat (gap between "
                    "beats minus the interval) over the last 30 s, as its latest heartbeat reports it; a serving "
                    "worker is declared dead once interval + lateness passes the deadline (0 before the first beat)",
                    ["worker"], registry=REGISTRY)
TRANSPORT_DROPS = Gauge("lumen:transport_dropped_messages", "Internal messages dropped by the transport (bad MAC, "
                        "replay, stale epoch, malformed, oversize, unknown type, schema), per process and reason; a "
                        "worker's count restarts with each incarnation", ["process", "reason"], registry=REGISTRY)
SLOT_OVERRUNS = Gauge("lumen:device_slot_overruns", "Engine steps of a time-sliced worker (--device-share slots) "
                      "that ran past the end of its slot into the next worker's, as its latest heartbeat reports "
                      "them; a worker's count restarts with each incarnation", ["worker"], registry=REGISTRY)
SLOT_OVERRUN_SECONDS = Gauge("lumen:device_slot_overrun_seconds", "Seconds by which a time-sliced worker's steps ran "
                             "past the end of its slot, summed (per incarnation)", ["worker"], registry=REGISTRY)
