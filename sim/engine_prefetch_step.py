"""One iteration of a run on the prefetching compiled path (:mod:`sim.engine_prefetch`):
:meth:`sim.engine.Engine._iteration`'s steps, the layers in the kernel, the policy's hooks
(iteration start, gate, expert used, iteration end) and drains in Python at the same points
and in the same order as the Python engine calls them."""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import numpy as np

from policies.base import GateOutput
from sim.engine_fast import add_request_counts, batch_ids

if TYPE_CHECKING:
    from sim.engine import Engine
    from sim.engine_prefetch import PrefetchPath

Proc = Generator[Any, Any, Any]


def iteration_prefetch(eng: Engine, fp: PrefetchPath, t: float) -> Proc:
    """:meth:`sim.engine.Engine._iteration` of a run on the prefetching compiled path."""
    from sim.engine import _layer_views
    from sim.iteration import stack_field

    fk = fp.fk
    env, policy = eng.env, eng.policy
    batch = eng.running
    slices, rows, context = eng._batch_rows(batch)
    n = len(batch)
    ids, row_off, req_out = batch_ids(fp, batch, slices)
    ids64 = ids if ids.dtype == np.int64 else ids.astype(np.int64)
    eng.iterations += 1
    fsc, isc = fp.fsc, fp.isc
    ids_l = w_l = probs_l = look_l = None
    weights = probs = None
    gate = fp.gate  # the policy's compiled gate: no return at a gate (no GateOutput)
    if eng._h_gate and (gate is None or eng._pass_gates):
        weights = stack_field(batch, slices, "topk_weights")
        probs = stack_field(batch, slices, "gate_probs") if eng.has_probs else None
        look = stack_field(batch, slices, "lookahead") if eng.has_look else None
        ids_l, w_l, probs_l, look_l = map(_layer_views, (ids, weights, probs, look))
    if eng._h_start:
        nxt = env.peek()
        if nxt <= t:
            yield env.timeout(t - env.now)
            t = max(t, env.now)
        if fp.due <= t:
            fp.advance(t)
        gates = None
        if eng._pass_gates:
            from policies.base import IterationGates

            gates = IterationGates(ids, weights, probs)
        eng._iteration_start(_Rows(slices), batch, t, gates)
    fsc[fk.F_DENSE] = eng.timing.dense(rows, context)
    fsc[fk.F_HAND], fsc[fk.F_EXCH], fsc[fk.F_OVER], fsc[fk.F_HEAD] = fp.per_rows(rows, n)
    fsc[fk.F_T] = t
    # an async policy's gate search over this iteration's rows (Engine._iteration's)
    search_t = eng.compute_model.gate_search_s(rows) if eng.search_s > 0 else 0.0
    fsc[fk.F_SEARCH] = search_t  # (a compiled gate's on_gate orders wait for it)
    fsc[fk.F_NXT] = env.peek()
    fsc[fk.F_NOW] = env.now
    isc[fk.I_PHASE] = fk.PH_HEAD
    work, plan = fp.work, fp.plan  # (fp.state is read per call: call buffers may grow)
    et = fp.et if fp.et.shape[0] > rows else fp.expert_times(rows)
    disp, extra = fk.iteration, ()
    if gate is not None:
        disp, extra = fk.iteration_gate, (*gate, gate_look(eng, batch, slices))
        if not (ids64.flags.c_contiguous and ids64.flags.writeable):
            ids64 = np.array(ids64, order="C")  # the gate's signature: C order, writeable
    # the kernel's compiled entry for these argument types (no type resolution a call):
    # every argument's type is fixed for the run (int64 or float64 arrays the path makes,
    # C order, writeable) but the trace's rows' layout and write flag (a memory-mapped
    # trace's are read-only), which key the entries kept
    fl = ids64.flags
    key = (disp, fl.c_contiguous, fl.f_contiguous, fl.writeable)
    kernel = fp.entries.get(key)
    if kernel is None:
        args = (*fp.state, work, fp.ordk, fp.ordp, ids64, row_off, et, plan, req_out, *extra)
        kernel = entry_of(disp, args)
        if kernel is not disp:
            fp.entries[key] = kernel
    links = eng.links
    plain = eng._plain_decide
    h_now = eng._h_gate_now
    iteration = eng.iterations
    enter, flush = fp._enter, fp._flush
    iscm, fscm, planm = fp.iscm, fp.fscm, memoryview(plan)
    done, hook, hook_used = fk.DONE, fk.HOOK, fk.HOOK_USED
    I_STAMP, I_POS, I_NITEMS, F_T = fk.I_STAMP, fk.I_POS, fk.I_NITEMS, fk.F_T
    I_DELAYED = fk.I_DELAYED
    while True:
        enter()
        code = kernel(*fp.state, work, fp.ordk, fp.ordp, ids64, row_off, et, plan, req_out, *extra)
        flush()
        links.stamp = iscm[I_STAMP]  # what a drain (a hook's, an arrival's) reads
        if gate is not None and iscm[I_DELAYED]:  # the engine's count of delayed orders
            eng.delayed_orders += iscm[I_DELAYED]
            iscm[I_DELAYED] = 0
        if code == done:
            break
        if code == hook:  # the gate of MoE layer `layer`: on_gate_now, on_gate
            layer = planm[iscm[I_POS], 0]
            assert ids_l is not None and w_l is not None
            now = fscm[F_T]
            gev = GateOutput(
                iteration,
                layer,
                ids_l[layer],
                w_l[layer],
                None if probs_l is None else probs_l[layer],
                None if look_l is None else look_l[layer],
                now,
            )
            now_dec = None
            if h_now:  # orders that need no search: applied at once, after the demands
                policy.on_gate_now(gev)
                if not plain or policy._enqueue or policy._cancel:
                    now_dec = policy.decide_prefetch()
            policy.on_gate(gev)
            dec = None
            if not plain or policy._enqueue or policy._cancel:
                dec = policy.decide_prefetch()  # Engine._drain of the gate (see above)
                if dec and search_t > 0:  # after the search: a timed call at t + search_t
                    eng.delayed_orders += len(dec.enqueue)
                    fp.add_call(now + search_t, dec, links.stamp)
                    dec = None
            # the kernel applies them after the layer's demand loads, on_gate_now's first
            end = fp._orders(now_dec) if now_dec else 0
            if dec:
                fp._orders(dec, end) if end else fp._orders(dec)
            continue  # nothing yields between a gate and its demands
        if code == hook_used:  # the layer's end: on_expert_used per expert, drained
            now = fscm[F_T]
            keys = fp.keys[planm[iscm[I_POS], 0]]
            used = policy.on_expert_used
            for e, tok in work[: iscm[I_NITEMS], :2].tolist():
                used(keys[e], tok, now)
                if not plain or policy._enqueue or policy._cancel:
                    eng._drain(now)
            continue
        if code == fk.YIELD_T:
            t = fscm[F_T]
            yield env.timeout(t - env.now)
            fsc[F_T] = max(t, env.now)
        elif code == fk.WAIT:
            yield env.timeout(max(float(fsc[fk.F_NXT]) - env.now, 0.0))
        elif code == fk.GROW:  # a compiled gate's timed call needs room (as add_call)
            out = gate[3]
            fp._grow_calls(iscm[fk.I_BUFTOP] + out[2] + out[3])
            continue
        elif code == fk.BAD_GATE:
            raise RuntimeError(
                f"policy {policy.name!r}: its compiled gate failed or made malformed orders"
            )
        elif code == fk.NO_LINK:
            raise RuntimeError("waiting for loads that no link carries")
        else:
            raise RuntimeError("the compiled path met a state only the Python engine handles")
        fsc[fk.F_NXT] = env.peek()
        fsc[fk.F_NOW] = env.now
    t = float(fsc[fk.F_T])
    add_request_counts(batch, req_out)
    eng._finish_iteration(batch, t)
    return t


_NO_LOOK = np.zeros((0, 0, 0), np.float64)


def gate_look(eng: Any, batch: list, slices: list) -> np.ndarray:
    """A compiled gate's ``look`` (policies.compiled_gate): the iteration's lookahead
    rows as float64, C order, writeable, where the policy wants them and the workload
    has them (as ``GateOutput.lookahead``), else an array with no rows."""
    if not (eng.has_look and eng.policy.wants_lookahead):
        return _NO_LOOK
    from sim.iteration import stack_field

    look = stack_field(batch, slices, "lookahead")
    if look is None:
        return _NO_LOOK
    if look.dtype != np.float64 or not (look.flags.c_contiguous and look.flags.writeable):
        look = np.array(look, dtype=np.float64, order="C")
    return look


def entry_of(disp: Any, args: tuple) -> Any:
    """The compiled entry of numba dispatcher ``disp`` for ``args``' exact types (a call
    then skips the dispatcher's per-argument type resolution, ~0.5 us of ~25 arrays);
    the dispatcher itself when it has not compiled them yet (it will at the call). Slow
    (numba's Python typeof per argument, ~0.1 ms): once a run, not once a call."""
    from numba import typeof

    cres = disp.overloads.get(tuple(typeof(a) for a in args))
    return disp if cres is None else cres.entry_point


class _Rows:
    """What Engine._iteration_start reads of an Iteration: the rows' slices."""

    __slots__ = ("slices",)

    def __init__(self, slices: list[slice]) -> None:
        self.slices = slices
