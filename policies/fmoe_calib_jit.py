"""numba kernels of fMoE's measured candidate chance (:mod:`policies.fmoe_calib`): noting
a pass's map candidates' chance-table cells and counting them at their layer's gate, one
call each where a Python loop per candidate with dict writes was (a DeepSeek-V3 pass
judges ~35 candidates). Counts are whole numbers added as 1.0 to float arrays, so the
order of the additions never changes a result; tests/test_fmoe_calib_jit.py checks both
kernels against the dict form they replace.

Imported when an fMoE policy is bound (with :mod:`policies.fmoe_jit`).
"""

from __future__ import annotations

from numba import njit

AGE_BUCKETS = 16  # as policies.fmoe_eviction.AGE_BUCKETS (the cell is row x 16 + bucket)


@njit(cache=True)
def calib_note(lay, jj, look, n, ist, it, pend, noted):  # noqa: ANN001, ANN201 - numba
    """Note the cells of a pass's map candidates (``look[i] < 0``; lookahead picks are
    left out) among its first ``n``: ``pend[layer, j]`` = row x AGE_BUCKETS + age bucket,
    the chance-table cell ``FmoeCalib._calib_cell`` reads now (a later note of the same
    candidate replaces it), and ``noted[layer]`` set. ``ist``: the eviction's [4, L, J]
    state (last choice's iteration, forecast row, forecast's iteration, frequency row);
    ``it`` the current iteration."""
    for i in range(n):
        if not look[i] < 0.0:
            continue
        layer = lay[i]
        j = jj[i]
        age = it - ist[0, layer, j]
        row = ist[1, layer, j] if ist[2, layer, 0] == it else ist[3, layer, j]
        if age <= 1:
            b = 0
        else:
            # min((age - 1).bit_length(), AGE_BUCKETS - 1)
            x = age - 1
            b = 0
            while x > 0 and b < AGE_BUCKETS - 1:
                x >>= 1
                b += 1
        pend[layer, j] = row * AGE_BUCKETS + b
        noted[layer] = True


@njit(cache=True)
def calib_gate(layer, ids, pend, noted, h, cnt):  # noqa: ANN001, ANN201 - numba
    """Layer ``layer``'s gate chose ``ids``: each candidate noted there counts once in its
    cell, judged (``cnt`` += 1) and, if chosen, used (``h`` += 1); the layer's notes are
    cleared."""
    row_of = pend[layer]
    J = row_of.shape[0]
    for k in range(ids.shape[0]):
        j = ids[k]
        if j < 0 or j >= J:
            continue  # not an expert: never noted
        c = row_of[j]
        if c >= 0:  # chosen (a repeated id finds it cleared)
            r, b = c // AGE_BUCKETS, c % AGE_BUCKETS
            h[r, b] += 1.0
            cnt[r, b] += 1.0
            row_of[j] = -1
    for j in range(J):
        c = row_of[j]
        if c >= 0:
            cnt[c // AGE_BUCKETS, c % AGE_BUCKETS] += 1.0
            row_of[j] = -1
    noted[layer] = False
