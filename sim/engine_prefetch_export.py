"""The end of a run on the prefetching compiled path (:mod:`sim.engine_prefetch`): the
kernel's arrays written back into the cache and link objects and the engine's counters,
so what a run reports afterwards is read from the same objects as on the Python engine."""

from __future__ import annotations

from typing import TYPE_CHECKING

from policies.cache import CacheCounters, CacheEntry, ExpertCache, ExpertState
from sim import engine_prefetch_view as V
from sim.engine_fast import write_back_device

if TYPE_CHECKING:
    from sim.engine import Engine
    from sim.engine_prefetch import PrefetchPath


def export(fp: PrefetchPath, eng: Engine) -> None:
    """Write ``fp``'s arrays back into ``eng``'s caches, links and counters (after the run)."""
    fk = fp.fk
    fp.sync()
    isc, fsc, ki, gi, gf = fp.isc, fp.fsc, fp.ki, fp.gi, fp.gf
    J = fp.J
    fp._flush()
    for g, cache in enumerate(eng.caches):
        entries = cache.entries
        for key, e in list(entries.items()):  # plain entries again, in the dict's order
            entries[key] = CacheEntry(
                key, e.state, e.loaded_at, e.last_used, e.uses, e.pins, e.protected,
                e.by_prefetch, e.prefetch_used,
            )  # fmt: skip
        del cache.candidate_arrays  # the class's again
        cache.__class__ = ExpertCache
        del cache.__dict__["_live_arr"]
        c0 = fk.G_C0
        cache.counters = CacheCounters(*gi[g, c0 : c0 + len(V.COUNTERS)].tolist())
        order = []
        k = int(gi[g, fk.G_HEAD])
        while k >= 0:
            order.append(eng.key_table[k // J][k % J])
            k = int(ki[k, fk.K_NEXT])
        cache._recency.clear()
        cache._recency.update((key, entries[key]) for key in order)
        cache._cands = {
            key: e
            for key, e in entries.items()
            if e.state is ExpertState.RESIDENT and not e.pins and not e.protected
        }
        cache._arr = None
        cache._protected = {key for key, e in entries.items() if e.protected}
        write_back_device(eng, g, fk, gi, gf)
        link = eng.links.links[g]
        for name, col in (
            ("orders", fk.S_ORDERS),
            ("skipped_cached", fk.S_SKIPPED),
            ("stale", fk.S_STALE),
            ("dropped_full", fk.S_DROPPED),
            ("preemptions", fk.S_PREEMPT),
        ):
            link.stats[name] = int(gi[g, col])
    if fp._view is not None:
        del fp._view.link_state  # the class's again: it reads the Link objects
        del fp._view.residency  # None again: the caches' dicts are the state
    del eng.links.call_at
    eng.gate_seq = int(isc[fk.I_GATESEQ])
    eng.links.stamp = int(isc[fk.I_STAMP])
    eng.layer_steps = int(isc[fk.I_STEPS])
    eng.stall_s = float(fsc[fk.F_STALL])
