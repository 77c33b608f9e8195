"""The one Policy interface, the shared ExpertCache mechanism, placement, and every
policy (fMoE and the baselines), one module each."""

from policies.base import (
    GateOutput,
    IterationEnd,
    IterationGates,
    IterationStart,
    Policy,
    PolicyContext,
    PolicyOptions,
    PrefetchDecision,
    PrefetchOrder,
    RequestArrival,
)
from policies.cache import CacheCounters, CacheEntry, ExpertCache, ExpertKey, ExpertState
from policies.placement import Placement
from policies.registry import (
    describe_policies,
    make_policy,
    policy_class,
    policy_names,
    register_policy,
)

__all__ = [
    "CacheCounters",
    "CacheEntry",
    "ExpertCache",
    "ExpertKey",
    "ExpertState",
    "GateOutput",
    "IterationEnd",
    "IterationGates",
    "IterationStart",
    "Placement",
    "Policy",
    "PolicyContext",
    "PolicyOptions",
    "PrefetchDecision",
    "PrefetchOrder",
    "RequestArrival",
    "describe_policies",
    "make_policy",
    "policy_class",
    "policy_names",
    "register_policy",
]
