"""Head-of-line blocking of demand loads behind prefetches (``blocking="measured"``), as a
mixin of :class:`policies.fmoe_deadline.FmoeDeadline`.

A demand load goes before every prefetch, but a link preempts a copy in flight only at
its next chunk boundary (the simulator's ``chunk_bytes``, 16 MiB by default; the real copy
engine's, 1 MiB by default): a gate whose demand loads find a prefetch on the link waits
for it to reach that boundary. Where an expert is about one chunk (Qwen1.5-MoE's 17.3 MB
experts against 16 MiB chunks) the wait is most of the copy, so a prefetch is not free
link time even when demand loads have priority. Measured on Qwen1.5-MoE, one A100, 50%
cache, 30 requests (decode steps only, docs/fmoe.md): demand loads waited 2.8 s behind
5,459 prefetch chunks (0.52 ms each, 7% of the decode time), more than the 1.3 s the
extra hits saved, so fMoE's TPOT was above LRU's although its hit rate was higher.

The policy cannot see the chunk size (``ExecutorView`` gives the link's queue, bandwidth
and copy time), so it measures the cost: at every gate it notes each device whose link
carries a copy (``link_state(dev).queued_s > 0`` before the gate's demand loads are
queued: every earlier demand load has landed, the layer waited for it), and at the next
hook it reads when that gate's first demand load landed (the cache entry's
``loaded_at``): the demand loads waited ``landed - gate - copy`` for the copy ahead of
them. ``beta`` = (share of gates that demand a load on the device) x (mean wait of such
a gate's loads behind a copy), per device and iteration kind (prompt or decode step),
over the run: the expected delay a copy causes demand loads for each gate it is on the
link at. The share comes from every gate, the wait from the gates that found a copy
(the two factors apart, so a few early waits of a rarely demanding device do not stand
for every gate). Gates whose demand loads include a late prefetch (promoted to a demand
load, its rest is needed anyway) give no wait. No constant is set: the chunk size, the
copy time and how often gates demand loads are all measured.

The admission (:mod:`policies.fmoe_deadline`) charges a copy ``beta`` for every gate
before its layer at which it is forecast to be on the link (its start and landing as the
admission counts them: after the copies ahead of it, at the link time a layer step
leaves prefetches), and ``(1 - q) x beta`` for its own layer's gate if it is forecast to
be in flight then (used, it is that gate's demand load; unused, that gate waits for it).
``blocking="ignored"`` (beta = 0) is the earlier rule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from policies.cache import ExpertKey, ExpertState

_RESIDENT, _LOADING = ExpertState.RESIDENT, ExpertState.LOADING


def gate_crossings(committed: float, copy: float, avail: float, ahead: int) -> tuple[int, int]:
    """Gates a copy is forecast to be on the link at: (gates before its layer, 1 when it
    is in flight at its own layer's gate, else 0). The copy starts after ``committed``
    seconds of copies ahead of it and moves ``avail`` seconds per layer step (the link
    time a step leaves prefetches); its layer's gate is ``ahead`` steps away and gate k
    (k = 1..ahead) comes k steps from now. It is on the link at gate k when it has
    started before it and lands after it. (0, 0) where ``avail`` <= 0: it never starts
    by the forecast (policies.fmoe_admit_jit has the same operations, compiled)."""
    if not avail > 0:
        return 0, 0
    start = committed / avail
    if not start < ahead:  # starts after its layer's gate (the link then drops it)
        return 0, 0
    end = (committed + copy) / avail
    # the last gate strictly before it lands, at most the one before its layer's
    last = ahead - 1 if end > ahead else math.ceil(end) - 1
    before = last - math.floor(start if start > 0 else 0.0)  # (a forecast may start it early)
    own = 1 if start < ahead < end else 0
    return (before if before > 0 else 0), own


class FmoeBlocking:
    """The measured wait of demand loads behind a prefetch (module doc)."""

    def _blocking_gate(self, layer: int, ids: Sequence[int], now: float) -> None:
        """Layer ``layer``'s gate at ``now`` chose ``ids`` (before its demand loads are
        queued): settle the last gate's wait, count the gate and whether it demands a
        load on each device, and note each device whose demand loads find a copy on its
        link, with the keys they bring."""
        self._blocking_resolve()
        cache_of, dev_of = self._cache_of, self._dev_of
        if self._view is None or not cache_of:
            return
        absent: dict[int, list[ExpertKey]] = {}
        late: set[int] = set()
        for j in ids:
            dev = dev_of[layer][j]
            e = cache_of[layer][j].entries.get((layer, j))
            if e is None:
                absent.setdefault(dev, []).append((layer, j))
            elif e.state is _LOADING:
                late.add(dev)  # a late prefetch, now this gate's demand load
        self._blocking_seen(absent, late, now)

    def _blocking_seen(
        self, absent: dict[int, list[ExpertKey]], late: set[int], now: float
    ) -> None:
        """The rest of :meth:`_blocking_gate` once its loop found the devices with absent
        experts (``absent``: device -> their keys, in the gate's order) and those with a
        copy still loading (``late``); FmoeDeadline._deadline_gate finds them in its own
        loop over the gate's experts and calls this after :meth:`_blocking_resolve`."""
        view = self._view
        if view is None or not self._cache_of:
            return
        tot = self._blk[self._kind]
        for dev, t in enumerate(tot):
            t[3] += 1.0
            if dev in absent or dev in late:
                t[2] += 1.0
        self._blk_pend = [
            (dev, keys, now)
            for dev, keys in absent.items()
            if dev not in late and view.link_state(dev).queued_s > 0
        ]

    def _blocking_resolve(self) -> None:
        """Add the waits of the gate noted last (its demand loads have landed: the layer
        waited for them) to the current kind's totals."""
        pend, self._blk_pend = self._blk_pend, []
        if not pend:
            return
        tot = self._blk[self._kind]
        for dev, keys, t in pend:
            cache = self._cache_of[keys[0][0]][keys[0][1]]
            landed = [
                e.loaded_at
                for e in map(cache.entries.get, keys)
                if e is not None and e.state is _RESIDENT
            ]
            if not landed:  # evicted since: not measured
                continue
            tot[dev][0] += max(min(landed) - t - self._copy_s, 0.0)
            tot[dev][1] += 1.0
        self._beta = self._blocking_estimates(self._kind)

    def _blocking_estimates(self, kind: bool) -> list[float]:
        """beta per device for iterations of ``kind``: the share of gates that demand a
        load there times the mean wait of such a gate's loads behind a copy on the link
        (0 before a measurement)."""
        return [w / n * gd / g if n > 0 and g > 0 else 0.0 for w, n, gd, g in self._blk[kind]]

    def blocking_metadata(self) -> dict[str, float]:
        """The measured waits (decode steps; prompts apart), for a run's metadata."""
        out: dict[str, float] = {}
        for kind, name in ((False, "decode"), (True, "prefill")):
            tot = self._blk[kind] if hasattr(self, "_blk") else []
            out[f"blocking_wait_s_{name}"] = sum(t[0] for t in tot)
            out[f"blocking_waits_{name}"] = int(sum(t[1] for t in tot))
            g = sum(t[3] for t in tot)
            out[f"gates_demanding_share_{name}"] = sum(t[2] for t in tot) / g if g else 0.0
        return out
