"""Which fault next, and whom it hits: chosen from the cluster's own view (``/lumen/cluster``)."""

from __future__ import annotations

import random
from collections import Counter

__all__ = ["FAULT_KINDS", "RECOVERING_STATES", "FaultPlanner"]

FAULT_KINDS = ("kill-executor", "kill-holder", "kill-executor-and-holder", "kill-restoring", "kill-recovering",
               "kill-partner", "kill-many", "hang")
RECOVERING_STATES = ("down", "loading", "loading_draft", "assisting", "switching")


def _running(cluster: dict) -> Counter:
    return Counter(r["executor"] for r in cluster.get("requests", []) if r.get("executor") is not None)


def _holders(cluster: dict) -> Counter:
    return Counter(r["holder"] for r in cluster.get("requests", []) if r.get("holder") is not None)


class FaultPlanner:
    """Chooses each fault from the cluster's view; leaves ``min_serving`` (>= 1) serving workers
    untouched, so the cluster is hurt, never wiped out (and is not kept down by kill after kill).

    Kinds come round in a seeded shuffled order, so a short run still covers all of them: the
    first kind in that order that has a target now is taken and goes to the back; kinds without
    a target (no holder yet, nobody recovering) keep their place and are tried at the next fault.
    """

    def __init__(self, kinds: tuple[str, ...], seed: int, min_serving: int = 1) -> None:
        bad = [k for k in kinds if k not in FAULT_KINDS]
        if bad or not kinds:
            raise ValueError(f"unknown fault kinds {bad}; choose from {', '.join(FAULT_KINDS)}")
        self.rng = random.Random(seed)
        self.order = list(dict.fromkeys(kinds))
        self.rng.shuffle(self.order)
        self.min_serving = max(1, min_serving)
        self.stopped: set[int] = set()  # worker ids SIGSTOPped right now
        self.hit_recovering: set[int] = set()  # hit while recovering, not serving since: left alone

    def spare_ok(self, cluster: dict, victims: list[int]) -> bool:
        """After hitting ``victims``, at least ``min_serving`` workers still serve untouched."""
        untouched = [w for w in cluster["workers"] if w["state"] == "serving" and w["alive"]
                     and w["id"] not in victims and w["id"] not in self.stopped]
        return len(untouched) >= self.min_serving

    def _victims(self, kind: str, cluster: dict) -> list[int]:
        workers = {w["id"]: w for w in cluster["workers"] if w["id"] not in self.stopped}
        serving = [i for i, w in workers.items() if w["state"] == "serving" and w["alive"]]
        if kind in ("kill-executor", "kill-restoring"):
            busy = [i for i, _ in _running(cluster).most_common() if i in serving]
            return busy[:1]
        if kind == "kill-holder":
            return [i for i, _ in _holders(cluster).most_common() if i in serving][:1]
        if kind == "kill-executor-and-holder":
            # a request's executor with its first holder: its checkpoint survives only in a later copy
            # (--ckpt-replicas >= 2); the request with the most copies, then the most checkpointed, first
            pairs = sorted((-len(r.get("holders") or ()), -(r.get("valid_ckpt_tokens") or 0), r["executor"], r["holder"])
                           for r in cluster.get("requests", [])
                           if r.get("executor") in serving and r.get("holder") in serving
                           and r["executor"] != r["holder"])
            return list(pairs[0][2:]) if pairs else []
        if kind == "kill-recovering":
            rec = [i for i, w in workers.items() if w["state"] in RECOVERING_STATES and w.get("pid")
                   and i not in self.hit_recovering]
            return [self.rng.choice(rec)] if rec else []
        if kind == "kill-partner":
            partners = [w["partner"] for w in workers.values()
                        if w["state"] in RECOVERING_STATES and w.get("partner") is not None]
            return [p for p in partners if p in serving][:1]
        if kind == "kill-many":
            return self.rng.sample(serving, 2) if len(serving) >= 3 else []
        if kind == "hang":
            return [self.rng.choice(serving)] if serving else []
        raise AssertionError(kind)

    def choose(self, cluster: dict) -> tuple[str, list[int]] | None:
        # a recovering worker is hit at most once per recovery: kill after kill would only keep it down
        self.hit_recovering -= {w["id"] for w in cluster["workers"] if w["state"] == "serving"}
        for kind in list(self.order):
            victims = self._victims(kind, cluster)
            if victims and self.spare_ok(cluster, victims):
                self.order.remove(kind)
                self.order.append(kind)
                if kind == "kill-recovering":
                    self.hit_recovering.update(victims)
                return kind, victims
        return None
