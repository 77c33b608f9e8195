"""The admission's forecasts of the link time before a copy's layer, as a mixin of
:class:`policies.fmoe_deadline.FmoeDeadline`: the prefetch distance derived from copy
time over layer time, and (``forecast="gate"``) the first layer step's link time from the
gate's own demand loads (docs/fmoe.md, "The first layer step from the gate").

On several GPUs a layer step waits for the slowest device's demand loads and then
computes, and a device's own loads go before its prefetches: a device whose link idles
while another device loads has the whole step for prefetches, the loading device less
than the mean. The mean forecast (every step ``avail`` = measured interval - the device's
mean demand time) missed both; on one GPU the two forecasts are the same to the bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from policies.base import PolicyContext


def first_step_shift(
    avail: Sequence[float], interval: float, max_s: float, n: Sequence[int], copy: float
) -> list[float]:
    """Per device d: avail[d] - T1[d], T1[d] = max(interval - max_s, 0) + (max(n) - n[d]) x
    copy, the link time device d has for prefetches before the next gate when this gate
    demands ``n[d]`` loads of ``copy`` seconds there (FmoeDeadline._first_step_shift).
    Adding it to a link's queued seconds makes the first layer step of the mean forecast
    (``avail`` a step) that link time. All zeros with one device whose avail is
    interval - max_s (the mean forecast on one GPU)."""
    c = interval - max_s
    c = c if c > 0 else 0.0
    top = max(n)
    return [a - (c + (top - k) * copy) for a, k in zip(avail, n, strict=True)]


class FmoeForecast:
    """The distance and the first step's link time (module doc)."""

    def derived_distance(self, ctx: PolicyContext) -> int | None:
        """ceil(one copy / one decode layer step) from the executor view, in [1, L - 1]
        (None without a view)."""
        view = ctx.executor
        if view is None:
            return None
        copy_s = view.link_state(0).copy_s
        layer_s = view.layer_time_s(1)
        if not (layer_s > 0 and math.isfinite(copy_s)):
            return None
        L = ctx.spec.num_moe_layers
        return int(min(max(math.ceil(copy_s / layer_s), 1), max(L - 1, 1)))

    def _rederive_distance(self) -> None:
        """The distance again from the measured pace: one copy over the link time a layer
        step leaves for prefetches (mean over links), in [1, L - 1]. On one GPU whose link
        demand loads keep busy that is about the compute time (as at bind); where other
        links idle while one GPU waits (several GPUs), a copy fits in fewer layers."""
        L = len(self._pred)
        avail = sum(self._avail_per_layer(dev) for dev in range(self._n_dev)) / self._n_dev
        if avail <= 0 or L < 2:
            return
        d = int(min(max(math.ceil(self._copy_s / avail), 1), L - 1))
        if d != self.distance:
            self._set_distance(d, L)
            self._stats["distance_changes"] += 1

    def _first_step_shift(self, g: int, avail: list[float] | None = None) -> list[float] | None:
        """forecast="gate": per device, what to add to its link's queued seconds so that the
        admission's forecast (layer steps of the mean prefetch time ``avail`` before a
        copy's layer) gives the first step the link time this gate leaves it (None: the
        mean forecast; at hooks other than gate ``g``'s or before a measured pace).

        The next gate comes when the layer has waited for the slowest device's demand
        loads and computed; a device's own demand loads go first. Over the last
        iteration of this kind a step took ``interval`` = compute + M (M the mean over
        gates of the largest device's demand-load seconds, measured with the same count
        as ``demand_s``), so this step leaves device d, after its own n_d loads,
        T1 = max(interval - M, 0) + (max_d n_d - n_d) x copy, where the mean forecast
        gave avail = interval - demand_s[d]. The shift is avail - T1 (first_step_shift).
        On one GPU max_d n_d = n_0 and M = demand_s[0]: zero, the mean forecast.
        ``avail``: every device's ``_avail_per_layer``, where the caller has them."""
        dem = self._gate_dem
        if dem is None or dem[0] != g or self._interval is None:
            return None
        return first_step_shift(
            [self._avail_per_layer(d) for d in range(self._n_dev)] if avail is None else avail,
            self._interval,
            self._max_s,
            dem[1],
            self._copy_s,
        )
