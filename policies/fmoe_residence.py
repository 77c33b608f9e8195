"""How long an unused prefetched copy stays resident, measured online, as a mixin of
:class:`policies.fmoe.FmoePolicy` (``victim="residence"``, policies/fmoe_victim.py).

A prefetch evicts its victim when its copy starts. If its expert is used at its layer,
that layer's demand load would have evicted something anyway, so the victim is lost only
until then (the window ``W`` of policies/fmoe_victim.py). If it is not used, nothing would
have evicted the victim: the cache holds one entry fewer of what it would have held for
as long as the unused copy stays, until it is evicted (or used after all, in a later
iteration). So the victim of an unused copy is priced over W plus that residence R.

R is measured, never set. The policy follows the copies it admitted: at the gate of a
copy's layer, a copy resident (or loading) as a prefetch and not chosen there starts to
count; it leaves when its cache entry is gone (evicted) or has been used. Layer steps are
the clock (``iteration x L + layer``, the gates the policy sees), the entries are checked
at every gate. The estimate is the exposure over the departures: (the completed stays +
the ages of the copies still resident) / (copies that left), the maximum-likelihood mean
of memoryless stays observed with censoring (a copy still resident has stayed at least
its age). It counts the long stays as they happen, where the mean of completed stays only
would be biased short early in a run. Before any copy has left it is 0 (no measurement:
W alone, the ``priced`` rule).
"""

from __future__ import annotations

from collections.abc import Sequence

from policies.cache import CacheEntry, ExpertKey


class FmoeResidence:
    """Online mean residence (layer steps after its layer's gate) of unused prefetched
    copies, per source: 0 map picks, 1 lookahead picks (the ones with a lookahead chance
    when admitted)."""

    def _setup_residence(self, on: bool, L: int) -> None:
        """Start measuring (``on``) for a model of ``L`` MoE layers."""
        self._res_on = on
        self._res_L = L
        # keys admitted for each layer in this iteration -> source (1: a lookahead pick)
        self._res_sent: dict[int, dict[ExpertKey, int]] = {}
        # unused copies still resident: key -> (its entry, the step it started to count,
        # its source)
        self._res_track: dict[ExpertKey, tuple[CacheEntry, int, int]] = {}
        # per source: sum of the tracked copies' start steps, tracked, layer steps of the
        # stays completed, copies that left (evicted or used), of them by a use, counted in
        self._res_sum_t0 = [0, 0]
        self._res_n = [0, 0]
        self._res_exposure = [0, 0]
        self._res_left = [0, 0]
        self._res_used_later = [0, 0]
        self._res_seen = [0, 0]

    def _residence_admitted(self, pending: dict[ExpertKey, float]) -> None:
        """An admission pass ordered ``pending``: note them under their layers, a lookahead
        pick (a key with this gate's lookahead chance) as such."""
        sent, look = self._res_sent, self._look_q  # type: ignore[attr-defined]
        for key in pending:
            s = sent.get(key[0])
            if s is None:
                s = sent[key[0]] = {}
            if key in look:
                s[key] = 1
            elif key not in s:
                s[key] = 0

    def _residence_new_iteration(self) -> None:
        """Orders of the last iteration not yet at their layer's gate are not followed."""
        self._res_sent = {}

    def _residence_gate(self, layer: int, ids: Sequence[int]) -> None:
        """Layer ``layer``'s gate chose ``ids``: copies that left since the last gate are
        counted out; this layer's admitted copies present as unused prefetches count in."""
        step = self._cur_it * self._res_L + layer  # type: ignore[attr-defined]
        track = self._res_track
        ents_of = self._ents_of  # type: ignore[attr-defined]
        if track:
            gone = [
                key
                for key, (e, _, _) in track.items()
                if e.uses or ents_of[key[0]][key[1]].get(key) is not e
            ]
            for key in gone:
                e, t0, src = track.pop(key)
                self._res_exposure[src] += step - t0
                self._res_sum_t0[src] -= t0
                self._res_n[src] -= 1
                self._res_left[src] += 1
                self._res_used_later[src] += bool(e.uses)
        sent = self._res_sent.pop(layer, None)
        if not sent:
            return
        chosen = set(ids)
        for key, src in sent.items():
            if key[1] in chosen or key in track:
                continue
            e = ents_of[key[0]][key[1]].get(key)
            if e is not None and e.by_prefetch and not e.uses:
                track[key] = (e, step, src)
                self._res_sum_t0[src] += step
                self._res_n[src] += 1
                self._res_seen[src] += 1

    def _residence_steps(self, src: int) -> float:
        """The measured mean residence, in layer steps after its layer's gate, of an unused
        prefetched copy of source ``src`` (module doc); 0.0 before any has left."""
        left = self._res_left[src]
        if not left:
            return 0.0
        step = self._cur_it * self._res_L + self._g  # type: ignore[attr-defined]
        ages = self._res_n[src] * step - self._res_sum_t0[src]
        return (self._res_exposure[src] + max(ages, 0)) / left

    def _residence_both(self) -> tuple[float, float]:
        """``(_residence_steps(0), _residence_steps(1))``, the same operations with the
        shared reads once (the admission reads both at every pass)."""
        left = self._res_left
        step = self._cur_it * self._res_L + self._g  # type: ignore[attr-defined]
        n, t0, ex = self._res_n, self._res_sum_t0, self._res_exposure
        out = [0.0, 0.0]
        for src in (0, 1):
            if left[src]:
                ages = n[src] * step - t0[src]
                out[src] = (ex[src] + max(ages, 0)) / left[src]
        return out[0], out[1]

    def _residence_used_later(self, src: int) -> float:
        """The share of the unused copies of source ``src`` that left by a use (in a later
        visit of their layer) rather than by eviction; 0.0 before any has left."""
        left = self._res_left[src]
        return self._res_used_later[src] / left if left else 0.0

    def residence_metadata(self) -> dict[str, float | int]:
        """What the measurement saw (for the run's policy metadata)."""
        out: dict[str, float | int] = {}
        for src, name in ((0, "map"), (1, "lookahead")):
            out[f"unused_{name}_copies_followed"] = self._res_seen[src]
            out[f"unused_{name}_copies_left"] = self._res_left[src]
            out[f"unused_{name}_copies_used_later"] = self._res_used_later[src]
            out[f"unused_{name}_copy_residence_steps"] = self._residence_steps(src)
        return out
