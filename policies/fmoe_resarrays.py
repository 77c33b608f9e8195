"""fMoE's reads of cache membership from the executor's arrays
(:meth:`policies.base.ExecutorView.residency`; issue 21, speed only): where the executor
keeps them (the simulator's prefetching compiled path), a gate's demand counting reads
state codes instead of entry objects; elsewhere the callers read the caches' dicts as
before. tests/test_fmoe_resarrays.py checks both reads agree during random runs."""

from __future__ import annotations

from collections.abc import Sequence

from policies.cache import ExpertKey


def count_demand(
    mv: memoryview,
    layer: int,
    ids: Sequence[int],
    devs: Sequence[int],
    now_n: list[int],
    blocking: bool,
    absent: dict[int, list[ExpertKey]],
    late: set[int],
) -> None:
    """:meth:`policies.fmoe_deadline.FmoeDeadline._deadline_gate`'s loop on the state
    codes ``mv`` [L, J] (0 absent, 1 loading, 2 resident): each of ``ids`` (layer
    ``layer``'s chosen experts, on GPUs ``devs[j]``) not resident counts one demand load
    of its GPU in ``now_n``; with ``blocking``, an absent key is listed in ``absent``
    under its GPU, a loading one's GPU added to ``late``."""
    for j in ids:
        st = mv[layer, j]
        if st == 2:
            continue
        dev = devs[j]
        now_n[dev] += 1
        if not blocking:
            continue
        if st:
            late.add(dev)  # a late prefetch, now this gate's demand load
        else:
            got = absent.get(dev)
            if got is None:
                absent[dev] = [(layer, j)]
            else:
                got.append((layer, j))
