"""Worker state machine (DESIGN.md section 3, "Assisted recovery").

    DOWN --RESTART--> LOADING_DRAFT --PAIRED--> ASSISTING --HOST_LOADED--> SWITCHING --READY--> SERVING
      |                     |  ^                   |                          ^
      |                     |  +----UNPAIRED-------+                          |
      |                     +------------------HOST_LOADED-------------------+   (skip: no partner)
      +--RESTART_PLAIN--------------------------------------------------------+   (no speculation)
    any --FAIL--> DOWN

Meaning of each state:
- DOWN: declared dead (killed, device lost, or hung: a hung process may still be up, which is why
  WorkerView carries `alive` separately). Owns no requests, holds no checkpoints.
- LOADING_DRAFT: restarted process loading the draft model, or holding a loaded draft with no
  partner (none was free, or the partner died: UNPAIRED). Target weights load disk -> host
  in the background throughout LOADING_DRAFT and ASSISTING.
- ASSISTING: drafting for the requests of its partner (see `pairing.pick_partner`).
- SWITCHING: target weights in host memory; draft released; copying host -> device and warming
  up. Policies without speculation go DOWN -> SWITCHING directly (RESTART_PLAIN) and spend the
  whole reload (disk -> host -> device) here; a cluster's initial start is also RESTART_PLAIN.
- SERVING: in the routing pool. Only SERVING workers execute requests and hold checkpoints:
  a holder must be able to restore on its own device, which needs the target model.

FAIL is accepted in every state, including DOWN (the sentinel and the heartbeat monitor may both
report the same death; the second report is a no-op). Every other undefined pair raises
IllegalTransition.
"""

from __future__ import annotations

from enum import StrEnum


class WorkerState(StrEnum):
    DOWN = "down"
    LOADING_DRAFT = "loading_draft"
    ASSISTING = "assisting"
    SWITCHING = "switching"
    SERVING = "serving"



class WorkerEvent(StrEnum):
    FAIL = "fail"                    # declared dead (any state)
    RESTART = "restart"              # process restarted, speculation on: load the draft first
    RESTART_PLAIN = "restart_plain"  # process restarted (or first start), no speculation
    PAIRED = "paired"                # draft loaded and a partner assigned
    UNPAIRED = "unpaired"            # partner died or left SERVING
    HOST_LOADED = "host_loaded"      # target weights are in host memory: release draft, switch
    READY = "ready"                  # target on device and warmed up



class IllegalTransition(ValueError):
    pass


_S, _E = WorkerState, WorkerEvent
_TRANSITIONS: dict[tuple[WorkerState, WorkerEvent], WorkerState] = {
    (_S.DOWN, _E.RESTART): _S.LOADING_DRAFT,
    (_S.DOWN, _E.RESTART_PLAIN): _S.SWITCHING,
    (_S.LOADING_DRAFT, _E.PAIRED): _S.ASSISTING,
    (_S.LOADING_DRAFT, _E.HOST_LOADED): _S.SWITCHING,
    (_S.ASSISTING, _E.UNPAIRED): _S.LOADING_DRAFT,
    (_S.ASSISTING, _E.HOST_LOADED): _S.SWITCHING,
    (_S.SWITCHING, _E.READY): _S.SERVING,
}
for _st in WorkerState:
    _TRANSITIONS[(_st, _E.FAIL)] = _S.DOWN


def next_state(state: WorkerState | str, event: WorkerEvent | str) -> WorkerState:
    """The state after `event`; raises IllegalTransition for an undefined pair."""
    st, ev = WorkerState(state), WorkerEvent(event)
    try:
        return _TRANSITIONS[(st, ev)]
    except KeyError:
        raise IllegalTransition(f"no transition from {st.name} on {ev.name}") from None


def legal_events(state: WorkerState | str) -> tuple[WorkerEvent, ...]:
    st = WorkerState(state)
    return tuple(ev for (s, ev) in _TRANSITIONS if s is st)
