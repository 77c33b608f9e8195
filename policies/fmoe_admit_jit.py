"""numba kernel of fMoE's deadline admission (:meth:`policies.fmoe_deadline.FmoeDeadline._admit`)
for one-row iterations, where a fine-grained model's gate re-ranks about a hundred
candidates (DeepSeek-V3: the queued copies forecast to start after their layer are
judged again at every gate) and judging each in Python cost more than the rest of a
layer step.

The kernel ranks and judges; the caller sends the orders and cancellations it returns,
in rank order, so the executor sees the same calls in the same order. Every float
operation is the Python loop's, in its order (Python's ``min(a, b)`` is ``b if b < a
else a``, written out so a NaN goes the same way), so the decisions are bitwise the
same; tests/test_fmoe_admit_jit.py compares it with the Python loop.

Imported with :mod:`policies.fmoe_jit` when an fMoE policy is bound.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from policies.fmoe_jit import age_bucket1

# action codes written by admit_rows
CANCEL = 1  # rejected, and it was queued: cancel it
ORDER = 2  # (re)send at priority p / (layer - g); it stays a candidate


@njit(cache=True)
def admit_rows(  # noqa: ANN201, PLR0913 - numba
    lay,
    jj,
    p,
    was,
    look,
    g,
    dev_of,
    committed0,
    copy,
    avail,
    demand_s,
    interval,
    no_rho,
    ist,
    tab,
    have_tab,
    it,
    act,
    counts,
):  # noqa: ANN001 - numba
    """Rank candidates (``lay``, ``jj``, ``p``; ``was``: queued before; ``look``: the
    lookahead chance, -1.0 where none) by (-p / (lay - g), lay, jj) and judge them as
    ``_admit`` does for one row (module doc of policies.fmoe_deadline): ``committed0``,
    ``copy``, ``avail`` per device (the link's queued seconds, one copy's seconds, the
    prefetch link time per layer step), ``demand_s`` and ``interval`` for rho; ``ist``
    and the chance table ``tab`` for q.

    Writes, in rank order, (candidate index, CANCEL or ORDER) for each candidate that
    needs a call to ``act`` and [late rejected, queued none done, admitted late, issued,
    re-ranked] to ``counts``; returns how many actions, -1 when a late copy needs the
    chance table and ``have_tab`` is False (nothing else changed: call again with it),
    or -2 when a rank key is NaN (the caller's sort handles that its own way)."""
    n = lay.shape[0]
    key = np.empty(n)
    for i in range(n):
        key[i] = -p[i] / (lay[i] - g)
        if key[i] != key[i]:
            return -2
    order = np.empty(n, np.int64)
    for i in range(n):  # insertion sort by (key, lay, jj): keys are distinct pairs
        m = i
        while m > 0:
            o = order[m - 1]
            if key[i] < key[o] or (
                key[i] == key[o] and (lay[i] < lay[o] or (lay[i] == lay[o] and jj[i] < jj[o]))
            ):
                order[m] = o
                m -= 1
            else:
                break
        order[m] = i
    committed = committed0.copy()
    late_no = late_yes = issued = reranked = none_done = 0
    na = 0
    for r in range(n):
        i = order[r]
        layer = lay[i]
        j = jj[i]
        dev = dev_of[layer, j]
        copy_s = copy[dev]
        x = (layer - g) * avail[dev] - committed[dev]
        done = x if x < copy_s else copy_s  # min(copy_s, x)
        if done < copy_s:
            if not have_tab:
                return -1
            age = it - ist[0, layer, j]
            row = ist[1, layer, j] if ist[2, layer, 0] == it else ist[3, layer, j]
            q = tab[row, age_bucket1(age)]
            if look[i] > q:
                q = look[i]
            if no_rho:
                rho = 0.0
            else:
                rr = demand_s[dev] / interval
                rho = 1.0 if 1.0 < rr else rr  # min(rr, 1.0)
            av = avail[dev]
            mn = copy_s if copy_s < av else av  # min(avail, copy_s)
            if done <= 0 and q * mn > (1.0 - q) * copy_s * rho:
                act[na, 0] = i
                act[na, 1] = ORDER
                na += 1
                none_done += 1
                issued += 1
                reranked += was[i]
                continue
            if done <= 0 or q * done <= (1.0 - q) * (copy_s - done) * rho:
                late_no += 1
                if was[i]:
                    act[na, 0] = i
                    act[na, 1] = CANCEL
                    na += 1
                continue
            late_yes += 1
        committed[dev] += copy_s
        act[na, 0] = i
        act[na, 1] = ORDER
        na += 1
        issued += 1
        reranked += was[i]
    counts[0] = late_no
    counts[1] = none_done
    counts[2] = late_yes
    counts[3] = issued
    counts[4] = reranked
    return na
