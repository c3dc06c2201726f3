"""lumen.policy: LUMEN's decisions and the baselines as pure, deterministic functions.

Usage (the live controller and the simulator call exactly these):
    from lumen.policy import ClusterView, WorkerView, RequestView, WorkerState as S
    view = ClusterView(tuple(WorkerView(id=i, state=S.SERVING, epoch=0, alive=True, waiting=..,
                       running=.., q_wait_s=.., ckpt_reserved_bytes=.., ckpt_budget_bytes=..,
                       h2d_bytes_per_s=26e9) for i in ...), lam=1.0)
    s = checkpoint_reservation(prompt_tokens, max_tokens, kv_bytes_per_token, page_tokens=16)
    holder = place_checkpoint(view, "lumen", executor=2, reservation_bytes=s)   # None: unprotected
    holders = place_checkpoints(view, "lumen", executor=2, reservation_bytes=s, k=2)  # K copies, spread over nodes
    k = choose_replicas(recompute_s, copy_cost_s, p, q, k_max=3, domains=domain_count(view))  # `auto`
    h = restore_source(view, [(holder, valid_prefix, epoch), ...])               # longest valid live copy
    target = route_new(view)                                                     # new requests
    plan = dispatch_interrupted(view, "lumen", [RequestView(...), ...])          # [Assignment]
    partner = pick_partner(view, recovering_id=2); st = next_state(st, WorkerEvent.PAIRED)
    ks = choose_spec_lengths([0.6, 0.4], PartnerLoad(...), step_time, k_max=4)  # verify positions per request
Policies: lumen, lumen-no-spec, spec-only, fixed-ckpt, stop-restart (`features(name)` says what
each switches on). Nothing here does I/O or imports the rest of lumen; the functions only read
their arguments. Rules and tie-breaking are documented on each function. Decisions read a columnar
(numpy) form of the view; a caller with many decisions per second can keep a `ClusterTable`
current in place and pass `table.view(lam)` instead (the simulator does; see view.py).
"""

from .dispatch import dispatch_interrupted, route_new
from .names import POLICY_NAMES, Policy, PolicyFeatures, features, parse_policy
from .pairing import may_assist, pair_recovering, pick_partner, pick_partner_by_gain
from .placement import checkpoint_reservation, place_checkpoint, place_checkpoints
from .replicas import (
    CopyPrice,
    FailureModel,
    ReplicaRule,
    choose_replicas,
    co_failure_probability,
    domain_count,
    loss_probability,
    parse_replicas,
    restore_source,
    spread_occupancy,
)
from .speculation import (
    AcceptanceEstimate,
    LinearStepTime,
    PartnerLoad,
    assist_gain,
    choose_spec_lengths,
    draft_phase_pays,
    expected_tokens,
    fit_step_time,
    pairing_gain,
)
from .states import IllegalTransition, WorkerEvent, WorkerState, legal_events, next_state
from .view import Assignment, ClusterTable, ClusterView, Columns, NoServingWorker, RequestView, WorkerView

__all__ = [
    "Assignment", "ClusterTable", "ClusterView", "Columns", "IllegalTransition", "NoServingWorker", "POLICY_NAMES", "Policy",
    "PolicyFeatures", "RequestView", "WorkerEvent", "WorkerState", "WorkerView",
    "checkpoint_reservation", "dispatch_interrupted", "features", "legal_events", "next_state",
    "may_assist", "pair_recovering", "parse_policy", "pick_partner", "place_checkpoint", "route_new",
    "AcceptanceEstimate", "LinearStepTime", "PartnerLoad", "assist_gain", "choose_spec_lengths",
    "draft_phase_pays", "expected_tokens", "fit_step_time", "pairing_gain", "pick_partner_by_gain",
    "place_checkpoints", "CopyPrice", "FailureModel", "ReplicaRule", "parse_replicas", "choose_replicas", "co_failure_probability",
    "domain_count", "loss_probability", "restore_source", "spread_occupancy",
]
