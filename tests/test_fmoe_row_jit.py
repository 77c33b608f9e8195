"""policies.fmoe_row_jit.gate_row against the separate kernel calls it replaces
(gate_step; transition_count and transition_bins at a layer's first gate of the
iteration; look_gate_row and the rows seen + 1), on random state: the same answers and
every array the same to the bit. (tests/test_fmoe_gate_one.py runs the whole policy
with the one-call gate against the Python.)"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from policies import fmoe_jit, fmoe_look_jit, fmoe_row_jit, fmoe_trans_jit
from policies.fmoe_eviction import AGE_BUCKETS, CAL_BINS

L, S = 4, 2


def _state(seed: int, J: int, K: int, flags: dict) -> dict:
    """Random policy state of L layers, J experts, top-K, S request slots."""
    rng = np.random.default_rng(seed)
    k = min(K, J)
    it = 7
    ist = np.zeros((4, L, J), np.int64)
    ist[0] = rng.integers(-1, it + 1, (L, J))
    if flags["first"]:  # the gate's layer not chosen yet in this iteration
        ist[0, flags["g"]] = np.minimum(ist[0, flags["g"]], it - 1)
    ist[1] = rng.integers(CAL_BINS, 3 * CAL_BINS, (L, J))
    ist[2, :, 0] = rng.integers(it - 1, it + 1, L)
    ist[3] = rng.integers(0, CAL_BINS, (L, J))
    ids = np.stack([rng.choice(J, K, replace=False)]).astype(flags["ids_dtype"])
    if flags["bad"]:
        ids[0, -1] = J
    tprev = rng.integers(-1, J, (S, L, K))
    tprev[rng.random((S, L)) < 0.3] = -1
    la = rng.random(J).astype(flags["la_dtype"])
    if flags["nan"]:
        la[rng.integers(J)] = np.nan
    return {
        "ist": ist,
        "fl": rng.random((3, 3 * CAL_BINS, AGE_BUCKETS)) * 5,
        "prot": rng.random((L, J)) < 0.3,
        "etnu": rng.random((L, J)),
        "g": flags["g"],
        "it": it,
        "ids": ids,
        "fc_rows": rng.integers(0, 3 * CAL_BINS, (L, J)),
        "eager": flags["eager"],
        "rc": rng.integers(0, 5, (S, L, J)).astype(float),
        "rn": rng.integers(1, 9, (S, L)).astype(float),
        "row_slot": np.array([1], np.int64),
        "slots": np.array([1], np.int64),
        "base": K / J,
        "bins": CAL_BINS,
        "pop": np.concatenate(
            (rng.integers(0, 9, (L, J + 1)).astype(float), rng.random((L, 1)) * 3), axis=1
        ),
        "ev_rows": 1,
        "tr_on": flags["tr_on"],
        "tc": rng.integers(0, 6, (L, J, J)).astype(np.float32),
        "tn": rng.integers(1, 30, (L, J + 1)).astype(float),
        "tm": rng.integers(0, 20, (L, J)).astype(float),
        "tau": rng.random(L) * 0.02 - 0.005,
        "tprev": tprev,
        "tr_it": np.where(rng.random(L) < 0.5, it, it - 1).astype(np.int64),
        "la": la if flags["look"] else fmoe_row_jit.NO_ROW,
        "la_cell": rng.integers(0, 30, (8, L, k)).astype(float) + rng.random((8, L, k)),
        "la_layer": rng.integers(0, 30, (7, L)).astype(float),
        "chosen": rng.integers(0, 9, (L, J)).astype(float),
        "on": rng.random((L, k)) < 0.6,
        "la_base": K / J,
        "pk_prev": rng.choice(J, k, replace=False).astype(np.int64),
        "scored": flags["scored"],
        "bnd": rng.random(k) * 3,
        "top": rng.choice(J, k, replace=False).astype(np.int64),
        "map_it": flags["map_it"],
        "split": flags["split"],
        "named_ids": rng.choice(J, min(3, J), replace=False).astype(np.int64),
        "top_n": rng.choice(J, k, replace=False).astype(np.int64),
        "have_top": flags["have_top"],
        "k": k,
        "J": J,
    }


def _fused(s: dict) -> tuple:
    pk = np.zeros(s["k"], np.int64)
    out_j, out_pq = np.zeros(s["k"], np.int64), np.zeros((2, s["k"]))
    r = fmoe_row_jit.gate_row(
        s["ist"], s["fl"], s["prot"], s["etnu"], s["g"], s["it"], s["ids"], s["fc_rows"],
        s["eager"], s["rc"], s["rn"], s["row_slot"], s["slots"], s["base"], s["bins"],
        s["pop"], s["ev_rows"], s["tr_on"], s["tc"], s["tn"], s["tm"], s["tau"], s["tprev"],
        s["tr_it"], s["la"], np.zeros(s["J"]), s["la_cell"], s["la_layer"], s["chosen"],
        s["on"], s["la_base"], s["pk_prev"], s["scored"], s["bnd"], s["top"], s["map_it"],
        s["split"], s["named_ids"], pk, s["top_n"], s["have_top"], out_j, out_pq,
    )  # fmt: skip
    return r, pk, out_j, out_pq


def _separate(s: dict) -> tuple:
    """The calls as the step-by-step path makes them (policies.fmoe, fmoe_transition,
    fmoe_look_row)."""
    pk = np.zeros(s["k"], np.int64)
    out_j, out_pq = np.zeros(s["k"], np.int64), np.zeros((2, s["k"]))
    g, it = s["g"], s["it"]
    if not fmoe_jit.gate_step(
        s["ist"], s["fl"], s["prot"], s["etnu"], g, it, s["ids"], s["fc_rows"], -1, s["eager"],
        s["rc"], s["rn"], s["row_slot"], s["slots"], s["base"], s["bins"], s["pop"],
        s["ev_rows"],
    ):  # fmt: skip
        return (fmoe_row_jit.BAD_IDS, False), pk, out_j, out_pq
    counted = False
    if s["tr_on"] and int(s["tr_it"][g]) != it:
        s["tr_it"][g] = it
        ids = np.asarray(s["ids"], np.int64)
        fmoe_trans_jit.transition_count(
            s["tc"], s["tn"], s["tm"], s["tprev"], g, ids, s["row_slot"]
        )
        fmoe_trans_jit.transition_bins(
            s["ist"], s["tc"], s["tn"], s["tm"], s["tau"], s["tprev"], s["rc"], s["rn"],
            s["slots"], s["pop"], s["base"], CAL_BINS, g,
        )  # fmt: skip
        counted = True
    if len(s["la"]) == 0:
        return (fmoe_row_jit.NO_LOOK, counted), pk, out_j, out_pq
    c, lay = s["la_cell"], s["la_layer"]
    m = fmoe_look_jit.look_gate_row(
        s["chosen"][g], lay[0, g], s["la_base"], s["pk_prev"], s["ids"][0], c[0, g], c[1, g],
        c[2, g], s["scored"], s["bnd"], s["on"][g], c[3, g], s["top"], s["map_it"], lay[1],
        lay[2], c[4:6], c[6:8], g, s["split"], s["named_ids"], lay[3:5], lay[5:7],
        np.asarray(s["la"], np.float64), pk, s["on"][g + 1], c[3, g + 1], s["top_n"],
        s["have_top"], s["prot"], s["etnu"], out_j, out_pq[0], out_pq[1],
    )  # fmt: skip
    if m != -2:
        lay[0, g] += 1
    return (m, counted), pk, out_j, out_pq


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    J=st.sampled_from([3, 8, 16]),
    K=st.sampled_from([1, 2, 4]),
    g=st.integers(0, L - 2),
    bools=st.lists(st.booleans(), min_size=10, max_size=10),
    ids_dtype=st.sampled_from([np.int64, np.int16, np.uint8]),
    la_dtype=st.sampled_from([np.float32, np.float64]),
)
def test_gate_row_is_the_separate_calls(
    seed: int, J: int, K: int, g: int, bools: list, ids_dtype: type, la_dtype: type
) -> None:
    K = min(K, J)
    names = ("first", "eager", "tr_on", "look", "scored", "map_it", "split", "have_top")
    flags = dict(zip(names, bools[:8], strict=True))
    flags.update(g=g, ids_dtype=ids_dtype, la_dtype=la_dtype)
    flags["bad"] = bools[8] and bools[9] and seed % 3 == 0  # a bad id now and then
    flags["nan"] = bools[9] and seed % 4 == 0  # a NaN in the lookahead row now and then
    a = _state(seed, J, K, flags)
    b = _state(seed, J, K, flags)
    got, want = _fused(a), _separate(b)
    assert got[0] == want[0]
    for x, y in zip(got[1:], want[1:], strict=True):
        np.testing.assert_array_equal(x, y)
    for key, x in a.items():
        if isinstance(x, np.ndarray):
            assert x.tobytes() == b[key].tobytes(), key
