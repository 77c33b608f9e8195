"""numba kernel of a planned one-row decode gate's observation in one call (issue 21,
speed only): :func:`gate_row` runs, in the order the Python calls them, the eviction's
bookkeeping (:func:`policies.fmoe_jit.gate_step`), the token-to-token transitions
(:func:`policies.fmoe_trans_jit.transition_count` and ``transition_bins`` at the
layer's first gate of the iteration) and the lookahead's measurement, picks and measured
orders (:func:`policies.fmoe_look_jit.look_gate_row`). The same kernels on the same
arrays: the results are those of the separate calls, bit for bit (tests/test_fmoe_row_jit.py
holds the kernel to them on random inputs; tests/test_fmoe_gate_one.py the whole run to the
Python).

The state is arrays only (no Python object), so that a kernel of the engine can call
this one later. The lookahead's counts travel as two arrays (what
:class:`policies.fmoe_lookahead.FmoeLookahead` keeps its counts as views of):

- ``la_cell`` float64 [8, L, k] (per layer and rank): 0 picks n, 1 hits h, 2 chance hits
  e, 3 the cells' p, 4-5 picks and 6-7 hits split by whether the map's top-K named the
  pick (0: no, 1: yes);
- ``la_layer`` float64 [7, L] (per layer): 0 rows seen, 1-2 the map's top-K picks and
  hits, 3-4 and 5-6 the map's picks and hits split by whether the lookahead ordered them
  at the gate before (0: no, 1: yes).

A kernel that compiles in kernels of other modules keeps a stale copy in numba's disk
cache when only they change: :func:`specs.jitcache.stamp_dependencies` at the end joins
their files to this module's stamp.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from policies import fmoe_jit, fmoe_look_jit, fmoe_trans_jit
from policies.fmoe_jit import gate_step
from policies.fmoe_look_jit import look_gate_row
from policies.fmoe_trans_jit import transition_bins, transition_count
from specs.jitcache import stamp_dependencies

# gate_row's answers other than look_gate_row's (how many orders, -1 none on, -2 NaN)
BAD_IDS = -3  # an id outside [0, J): nothing changed (the caller raises)
NO_LOOK = -4  # no lookahead row given: the observation alone ran


@njit(cache=True)
def gate_row(  # noqa: ANN201, PLR0913 - numba
    ist,
    fl,
    prot,
    etnu,
    g,
    it,
    ids,
    fc_rows,
    eager,
    rc,
    rn,
    row_slot,
    slots,
    base,
    bins,
    pop,
    ev_rows,
    tr_on,
    tc,
    tn,
    tm,
    tau,
    tprev,
    tr_it,
    la,
    row64,
    la_cell,
    la_layer,
    chosen,
    on,
    la_base,
    pk_prev,
    scored,
    bnd,
    top,
    map_it,
    split,
    named_ids,
    pk,
    top_n,
    have_top,
    out_j,
    out_pq,
):  # noqa: ANN001 - numba
    """One planned decode gate ``g`` of iteration ``it`` choosing ``ids`` [1, K]:

    1. ``gate_step(ist, fl, prot, etnu, g, it, ids, fc_rows, -1, eager, rc, rn, row_slot,
       slots, base, bins, pop, ev_rows)``; an id outside [0, J): :data:`BAD_IDS`, nothing
       changed;
    2. where ``tr_on`` and the layer was not counted in this iteration (``tr_it[g]``):
       ``tr_it[g] = it``, ``transition_count(tc, tn, tm, tprev, g, ids, row_slot)`` and
       ``transition_bins(..., g)`` (with ``rc``, ``rn``, ``slots``, ``pop``, ``base``,
       ``bins``);
    3. with a lookahead row ``la`` [J] (empty: :data:`NO_LOOK`), copied into ``row64``
       as float64: ``look_gate_row`` on layer g's cells (module doc: ``la_cell``,
       ``la_layer``; ``chosen`` [L, J], ``on`` [L, k]; the other arguments as there, the
       orders in ``out_j`` and ``out_pq`` [2, k]: p, chance of use), and the layer's rows
       seen + 1 unless it returned -2 (a NaN: nothing of the lookahead written).

    Returns (look_gate_row's answer or the codes above, whether step 2 ran)."""
    if not gate_step(
        ist, fl, prot, etnu, g, it, ids, fc_rows, -1, eager, rc, rn, row_slot, slots, base,
        bins, pop, ev_rows,
    ):  # fmt: skip
        return BAD_IDS, False
    counted = False
    if tr_on and tr_it[g] != it:
        tr_it[g] = it
        transition_count(tc, tn, tm, tprev, g, ids, row_slot)
        transition_bins(ist, tc, tn, tm, tau, tprev, rc, rn, slots, pop, base, bins, g)
        counted = True
    if la.shape[0] == 0:
        return NO_LOOK, counted
    for j in range(la.shape[0]):
        row64[j] = la[j]
    nxt = g + 1
    m = look_gate_row(
        chosen[g], la_layer[0, g], la_base, pk_prev, ids[0], la_cell[0, g], la_cell[1, g],
        la_cell[2, g], scored, bnd, on[g], la_cell[3, g], top, map_it, la_layer[1],
        la_layer[2], la_cell[4:6], la_cell[6:8], g, split, named_ids, la_layer[3:5],
        la_layer[5:7], row64, pk, on[nxt], la_cell[3, nxt], top_n, have_top, prot, etnu,
        out_j, out_pq[0], out_pq[1],
    )  # fmt: skip
    if m != -2:
        la_layer[0, g] += 1.0
    return m, counted


NO_ROW = np.zeros(0)  # ``la`` when the gate has no lookahead row

stamp_dependencies(globals().values(), (fmoe_jit, fmoe_look_jit, fmoe_trans_jit))
