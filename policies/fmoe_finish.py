"""What a demand load avoided is worth to the layer's finish time, measured online
(``saving="finish"``), as a mixin of :class:`policies.fmoe_deadline.FmoeDeadline`.

The admission values a copy used at its layer as one demand load saved (its copy time)
and charges it the link time it pushes onto demand loads (the unused rest, ``rho``; the
wait of demand loads behind it, ``beta``). A layer step waits for the last of its demand
loads, over every device. On one GPU every demand load is on the one link, so avoiding
one shortens the step by its copy time. With several GPUs the loads of one layer run on
their devices' links in parallel: avoiding a load on device d shortens the step only by
how much d's loads finish after every other device's (its margin m_d), and not at all
where another device also loads. A wait pushed onto d's loads, though, delays the step
whenever d is the last (the common case for a device that a wait makes late). So on
several links a saved load is worth less than the link time it costs, in the units that
matter (TPOT), and the admission over-sends copies.

Measured, never set: at every gate the policy notes each device's demand loads (experts
absent at the gate, and late prefetches, promoted to demand loads); at the next hook
(the layer waited for them: they have landed) it reads each device's finish T_d (the
last ``loaded_at`` after the gate) and, for each device with at least one load absent at
the gate (a whole copy), the saving of avoiding one: min(copy, max(T_d - max of the
other devices' T, 0)). ``kappa`` (per device and iteration kind, prompt or decode step)
is the mean saving over one copy time, with one pseudo-observation at 1 (the earlier
rule's assumption). On one link T_d >= copy and no other device loads, so kappa is
about 1 (to rounding) and the admission the earlier one.

The admission (policies/fmoe_deadline.py, fmoe_admit_jit.py) divides its link-time costs
(rho's unused rest and beta's waits) by kappa: q x saving x kappa > victim x kappa +
link cost is the same test as q x saving > victim + link cost / kappa (a victim's use is a
demand load too, worth kappa of a copy).

Measured and NOT the default (docs/fmoe.md, "The layer's finish time"): on Qwen1.5-MoE on
the six-GPU testbed kappa is about 0.41 in decode, while a wait behind a copy delays the
step by 0.87 of itself; dividing the costs by kappa sends fewer copies and TPOT rises
(50%: 20.62 -> 20.83 ms, 25%: 25.41 -> 25.86). A marginal of one load with the others
fixed misses that the value of a layer's copies is joint (the step is a max: a copy saves
the step only when the layer's other loads are covered too), so measured under a policy
that sends few copies it says each is worth little, and sending fewer makes it smaller.
The metadata also reports the worth of one load added where a prefetched copy or a
cached expert was used (the counterfactual of a hit), and the share of the waits behind
copies the step waited for.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from policies.cache import ExpertState

_RESIDENT, _LOADING = ExpertState.RESIDENT, ExpertState.LOADING


def finish_savings(ends: Sequence[float], whole: Sequence[bool], copy: float) -> list[float]:
    """Per device, the layer time saved by avoiding one of its demand loads: ``ends`` the
    devices' finish times after the gate (0.0 for a device without loads), ``whole``
    whether the device has a load of a whole copy (else -1.0: not measured there).
    min(copy, max(ends[d] - max of the others, 0)), in [0, copy]."""
    n = len(ends)
    top = second = 0.0
    arg = -1
    for d, t in enumerate(ends):
        if t > top:
            top, second, arg = t, top, d
        elif t > second:
            second = t
    out = []
    for d in range(n):
        if not whole[d]:
            out.append(-1.0)
            continue
        other = second if d == arg else top
        m = ends[d] - other
        out.append(min(copy, m) if m > 0 else 0.0)
    return out


def finish_added(ends: Sequence[float], flag: Sequence[bool], copy: float) -> list[float]:
    """Per device with ``flag`` (it had an expert resident at the gate), the layer time one
    more load there would have cost: max(ends[d] + copy, O) - max(ends[d], O), O the
    latest of the other devices' finishes, in [0, copy]; -1.0 elsewhere."""
    out = []
    for d, e in enumerate(ends):
        if not flag[d]:
            out.append(-1.0)
            continue
        o = max((x for k, x in enumerate(ends) if k != d), default=0.0)
        out.append(max(e + copy, o) - max(e, o))
    return out


def finish_waits(
    ends: Sequence[float], firsts: Sequence[float], busy: Sequence[bool], copy: float
) -> list[tuple[float, float]]:
    """Per device whose demand loads found a copy on its link (``busy``): (the wait
    behind it, first landing - copy, at least 0; the part of it the layer step waited:
    min(wait, max(ends[d] - max of the others, 0))); (-1.0, 0.0) elsewhere."""
    out = []
    for d, e in enumerate(ends):
        if not busy[d]:
            out.append((-1.0, 0.0))
            continue
        w = max(firsts[d] - copy, 0.0)
        other = max((x for k, x in enumerate(ends) if k != d), default=0.0)
        m = e - other
        out.append((w, min(w, m) if m > 0 else 0.0))
    return out


class FmoeFinish:
    """The measured worth, to the layer step, of a demand load avoided or added and of a
    wait behind a copy (module doc)."""

    def _setup_finish(self, on: bool, n_dev: int) -> None:
        """Start measuring (``on``) for ``n_dev`` devices."""
        self._fin_on = on
        # per kind (prefill?) and device, each [sum of layer seconds / copy, count]:
        # 0 a demand load avoided (at gates with one), 1 a load added where a prefetched
        # copy was used, 2 a load added where a cached expert was used; and 3 [seconds
        # demand loads waited behind a copy, seconds of them the layer step waited]
        self._fin: dict[bool, list[list[list[float]]]] = {
            k: [[[0.0, 0.0] for _ in range(4)] for _ in range(n_dev)] for k in (False, True)
        }
        self._fin_pend: tuple | None = None
        self._kap = [1.0] * n_dev  # link-time costs' divisor (1.0: the earlier rule)

    def _finish_gate(self, layer: int, ids: Sequence[int], now: float) -> None:
        """Layer ``layer``'s gate at ``now`` chose ``ids`` (before its demand loads are
        queued): settle the last gate, note this one's loads and hits per device."""
        self._finish_resolve()
        cache_of, dev_of = self._cache_of, self._dev_of  # type: ignore[attr-defined]
        if not cache_of:
            return
        nd = len(self._kap)
        loads: list[list] = [[] for _ in range(nd)]
        whole = [False] * nd
        late = [False] * nd
        pf = [False] * nd
        hit = [False] * nd
        for j in ids:
            e = cache_of[layer][j].entries.get((layer, j))
            dev = dev_of[layer][j]
            if e is None:
                whole[dev] = True
                loads[dev].append((layer, j))
            elif e.state is _LOADING:
                late[dev] = True
                loads[dev].append(e)
            elif e.by_prefetch and not e.uses:
                pf[dev] = True
            else:
                hit[dev] = True
        view = self._view  # type: ignore[attr-defined]
        busy = [whole[d] and not late[d] and view.link_state(d).queued_s > 0 for d in range(nd)]
        self._fin_pend = (now, loads, whole, busy, pf, hit)

    def _finish_resolve(self) -> None:
        """Add the gate noted last (its loads have landed) to the current kind's totals."""
        pend, self._fin_pend = self._fin_pend, None
        if pend is None:
            return
        t, loads, whole, busy, pf, hit = pend
        cache_of = self._cache_of  # type: ignore[attr-defined]
        ends = []
        firsts = []
        for dl in loads:
            end = 0.0
            first = math.inf
            for x in dl:
                e = cache_of[x[0]][x[1]].entries.get(x) if isinstance(x, tuple) else x
                if e is None or e.state is not _RESIDENT:
                    return  # evicted or cancelled since: not measured
                end = max(end, e.loaded_at - t)
                first = min(first, e.loaded_at - t)
            ends.append(end)
            firsts.append(first)
        copy = self._copy_s  # type: ignore[attr-defined]
        if not copy > 0:
            return
        tot = self._fin[self._kind]  # type: ignore[attr-defined]
        for c, vals in (
            (0, finish_savings(ends, whole, copy)),
            (1, finish_added(ends, pf, copy)),
            (2, finish_added(ends, hit, copy)),
        ):
            for d, v in enumerate(vals):
                if v >= 0:
                    tot[d][c][0] += v / copy
                    tot[d][c][1] += 1.0
        for d, (w, lw) in enumerate(finish_waits(ends, firsts, busy, copy)):
            if w >= 0:
                tot[d][3][0] += w
                tot[d][3][1] += lw
        self._kap = self._finish_estimates(self._kind)  # type: ignore[attr-defined]

    def _finish_means(self, kind: bool, d: int) -> list[float]:
        """Device ``d``'s four measured means for ``kind`` (module doc), each with one
        pseudo-observation at 1 (a whole copy; a wait the step waits for in full)."""
        t = self._fin[kind][d]
        copy = self._copy_s  # type: ignore[attr-defined]
        out = [(s + 1.0) / (n + 1.0) for s, n in t[:3]]
        w, lw = t[3]
        out.append((lw + copy) / (w + copy) if copy > 0 else 1.0)
        return out

    def _finish_estimates(self, kind: bool) -> list[float]:
        """kappa per device for iterations of ``kind``: the measured worth of an avoided
        demand load over one copy time (ones when not measuring)."""
        nd = len(self._kap)
        if not self._fin_on:
            return [1.0] * nd
        return [self._finish_means(kind, d)[0] for d in range(nd)]

    def finish_metadata(self) -> dict[str, float]:
        """The measured means over devices per kind (for a run's metadata)."""
        out: dict[str, float] = {}
        for kind, name in ((False, "decode"), (True, "prefill")):
            nd = len(self._kap)
            ms = [self._finish_means(kind, d) for d in range(nd)]
            for c, label in enumerate(("avoided", "added_prefetched", "added_cached", "wait")):
                out[f"finish_{label}_{name}"] = sum(m[c] for m in ms) / nd if nd else 1.0
            out[f"finish_gates_{name}"] = int(sum(t[0][1] for t in self._fin[kind]))
        return out
