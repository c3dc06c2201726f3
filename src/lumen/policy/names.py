"""Policy names and the features each one switches on.

The names are the strings used on every CLI (`lumen serve --policy`, `lumen bench --policy`,
`lumen simulate --policy`), in reports and in metric labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal


class Policy(StrEnum):
    LUMEN = "lumen"                  # load-aware ckpt + locality-aware recovery + speculation
    LUMEN_NO_SPEC = "lumen-no-spec"  # ablation: ckpt + locality-aware recovery, no speculation
    SPEC_ONLY = "spec-only"          # ablation: speculation-assisted recovery, no checkpoints
    FIXED_CKPT = "fixed-ckpt"        # DejaVu-style: ring-neighbour checkpoint, restore there
    STOP_RESTART = "stop-restart"    # vLLM/SGLang default: recompute from scratch on survivors



POLICY_NAMES: tuple[str, ...] = tuple(p.value for p in Policy)

Checkpointing = Literal["load-aware", "ring"] | None


@dataclass(frozen=True, slots=True)
class PolicyFeatures:
    checkpointing: Checkpointing  # "load-aware" (LUMEN placement), "ring" (fixed neighbour), None
    shedding: bool                # step 3 of recovery dispatch (overflow shedding)
    locality_restore: bool        # interrupted requests go to their holder to restore
    speculation: bool             # recovering worker drafts for a partner while reloading


_FEATURES: dict[Policy, PolicyFeatures] = {
    Policy.LUMEN: PolicyFeatures("load-aware", True, True, True),
    Policy.LUMEN_NO_SPEC: PolicyFeatures("load-aware", True, True, False),
    Policy.SPEC_ONLY: PolicyFeatures(None, False, False, True),
    Policy.FIXED_CKPT: PolicyFeatures("ring", False, True, False),
    Policy.STOP_RESTART: PolicyFeatures(None, False, False, False),
}


def parse_policy(name: str | Policy) -> Policy:
    """`"lumen"` -> `Policy.LUMEN`; unknown names raise ValueError listing the valid ones."""
    if isinstance(name, Policy):
        return name
    try:
        return Policy(str(name).strip().lower())
    except ValueError:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICY_NAMES)}") from None


def features(policy: str | Policy) -> PolicyFeatures:
    return _FEATURES[parse_policy(policy)]
