"""Policy hooks of the real executor: event order, embeddings, the experts actually chosen
(DeepSeek-V3's group-limited sigmoid router included), lookahead rows only for policies
that want them, prefetches that land, and a searcher thread for async policies."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from policies.base import GateOutput, IterationEnd, IterationStart, Policy, RequestArrival
from policies.cache import ExpertKey
from realrun.capture import CaptureConfig, capture
from realrun.models import load
from realrun.offload import offload_model
from realrun.session import RunSession, SessionOptions

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Recorder(Policy):
    """Logs every observe call."""

    name = "test-recorder"

    def bind(self, ctx):
        super().bind(ctx)
        self.log: list[tuple] = []
        self.gates: list[GateOutput] = []
        self.starts: list[IterationStart] = []
        self.threads: set[int] = set()

    def _note(self, *item):
        self.threads.add(threading.get_ident())
        self.log.append(item)

    def on_request_arrival(self, ev: RequestArrival) -> None:
        self._note("arrival", ev.request_id, ev.prompt_len)

    def on_iteration_start(self, ev: IterationStart) -> None:
        self.starts.append(ev)
        self._note("start", ev.iteration)

    def on_gate(self, ev: GateOutput) -> None:
        self.gates.append(ev)
        self._note("gate", ev.iteration, ev.layer)

    def on_expert_used(self, key: ExpertKey, tokens: int, now: float) -> None:
        self._note("used", key, tokens)

    def on_load_finished(self, key: ExpertKey, by_prefetch: bool, now: float) -> None:
        self._note("landed", key, by_prefetch)

    def on_iteration_end(self, ev: IterationEnd) -> None:
        self._note("end", ev.iteration, ev.finished)


class LookaheadRecorder(Recorder):
    name = "test-lookahead-recorder"
    wants_lookahead = True


class AsyncRecorder(Recorder):
    name = "test-async-recorder"
    async_search = True


class PrefetchAll(Recorder):
    """Prefetches every expert of the next layer: prefetches must land and be used."""

    name = "test-prefetch-all"

    def on_gate(self, ev: GateOutput) -> None:
        super().on_gate(ev)
        if ev.layer + 1 < self.ctx.spec.num_moe_layers:
            for e in range(self.ctx.spec.num_experts):
                self.prefetch(ev.layer + 1, e, priority=-e)


def _run(
    preset: str,
    policy: Policy,
    prompt_text: str = "What is MoE?",
    new: int = 3,
    cache=None,
    record=False,
):
    loaded = load(preset)
    om = offload_model(loaded, store="ram")
    ids = loaded.tokenizer.encode(prompt_text)
    with RunSession(om, policy, SessionOptions(cache, record=record)) as s:
        g = s.generate("req", ids, new, prompt_text=prompt_text)
        m = s.metrics()
        rec = s.recorder.requests if s.recorder else None
    return loaded, ids, g, m, rec


def test_events_arrive_in_the_documented_order():
    pol = Recorder()
    loaded, ids, g, m, _ = _run("tiny-qwen2-moe", pol, cache=6)
    L = loaded.spec.num_moe_layers
    log = [e for e in pol.log if e[0] != "landed"]  # copies land whenever they land
    assert log[0] == ("arrival", "req", len(ids))
    it = 0
    i = 1
    while i < len(log):
        assert log[i] == ("start", it)
        i += 1
        for layer in range(L):
            assert log[i] == ("gate", it, layer)
            gate = pol.gates[it * L + layer]
            i += 1
            used = []
            while i < len(log) and log[i][0] == "used":
                used.append(log[i][1:])
                i += 1
            ids_, counts = np.unique(gate.topk_ids, return_counts=True)
            assert used == [((layer, int(e)), int(c)) for e, c in zip(ids_, counts, strict=True)]
        assert log[i] == ("end", it, ("req",) if it == len(g.output_ids) - 1 else ())
        i += 1
        it += 1
    assert it == len(g.output_ids) == 3
    landed = [e for e in pol.log if e[0] == "landed"]
    assert len(landed) == m["loads"]  # every copy is reported once


def test_iteration_start_carries_the_embedding_layer_rows():
    pol = Recorder()
    loaded, ids, g, _, _ = _run("tiny-mixtral", pol)
    emb = loaded.model.get_input_embeddings().weight.detach()
    tokens = ids + g.output_ids[:-1]
    rows = np.concatenate([s.embeddings for s in pol.starts])
    np.testing.assert_array_equal(rows, emb[tokens].numpy())
    first = pol.starts[0]
    assert first.prefill.all() and list(first.positions) == list(range(len(ids)))
    assert not pol.starts[1].prefill.any() and list(pol.starts[1].positions) == [len(ids)]


def test_deepseek_v3_records_the_experts_it_ran_not_a_top_k_of_its_scores(tmp_path):
    pol = Recorder()
    text = "Group-limited routing picks experts from the best groups only."
    loaded, ids, g, _, _ = _run("tiny-deepseek-v3", pol, prompt_text=text, new=2)
    # what the experts modules of an unmodified model received (forward pre-hook)
    w = capture(
        CaptureConfig(
            "tiny-deepseek-v3",
            str(tmp_path / "t.fmoe"),
            prompt_texts=[text],
            num_prompts=1,
            max_new_tokens=2,
        )
    )
    r = w.requests[0].routing
    L = loaded.spec.num_moe_layers
    for it in range(2):
        rows = slice(0, len(ids)) if it == 0 else slice(len(ids) + it - 1, len(ids) + it)
        for layer in range(L):
            gate = pol.gates[it * L + layer]
            np.testing.assert_array_equal(
                np.sort(gate.topk_ids, -1), np.sort(r.topk_ids[rows, layer], -1)
            )
            np.testing.assert_allclose(gate.probs, r.gate_probs[rows, layer], rtol=1e-6)
    K = loaded.spec.top_k
    naive = np.sort(np.argsort(-r.gate_probs, axis=-1, kind="stable")[..., :K], -1)
    assert (naive != np.sort(r.topk_ids, -1)).any(), "group selection never mattered in this sample"
    np.testing.assert_allclose(r.gate_probs.sum(-1), 1.0, rtol=1e-5)


def test_lookahead_rows_only_for_policies_that_want_them():
    plain = Recorder()
    _run("tiny-olmoe", plain)
    assert all(gate.lookahead is None for gate in plain.gates)
    look = LookaheadRecorder()
    loaded, ids, _, _, _ = _run("tiny-olmoe", look)
    L, J = loaded.spec.num_moe_layers, loaded.spec.num_experts
    # recompute: next layer's router on the hidden state entering this layer's experts
    ref = load("tiny-olmoe")
    seen: dict[int, torch.Tensor] = {}
    hooks = [
        b.experts.register_forward_pre_hook(
            lambda m, a, lyr=b.moe_layer: seen.__setitem__(lyr, a[0])
        )
        for b in ref.blocks
    ]
    with torch.no_grad():
        ref.model(input_ids=torch.tensor([ids]))
    for h in hooks:
        h.remove()
    for layer in range(L):
        gate = look.gates[layer]  # prefill iteration
        assert gate.lookahead.shape == (len(ids), J)
        if layer + 1 < L:
            expect = (
                torch.softmax(ref.blocks[layer + 1].router(seen[layer])[0].float(), -1)
                .detach()
                .numpy()
            )
            np.testing.assert_allclose(gate.lookahead, expect, rtol=1e-5, atol=1e-7)
        else:
            assert not gate.lookahead.any()


def test_prefetches_land_protected_and_get_used():
    pol = PrefetchAll()
    loaded, _, _, m, _ = _run("tiny-mixtral", pol, new=4, cache=16)
    assert m["prefetches_issued"] > 0 and m["prefetches_used"] > 0
    assert 0 < m["prefetch_accuracy"] <= 1
    assert m["bytes_h2d"] == m["loads"] * loaded.spec.expert_bytes
    assert m["hits"] > 0
    assert any(e[0] == "landed" and e[2] for e in pol.log)


def test_async_policies_run_on_a_searcher_thread():
    pol = AsyncRecorder()
    _, _, g, _, _ = _run("tiny-mixtral", pol)
    assert threading.get_ident() not in pol.threads and len(pol.threads) == 1
    assert sum(1 for e in pol.log if e[0] == "end") == len(g.output_ids)


def test_a_recorded_run_matches_the_trace_contract():
    _, ids, g, _, reqs = _run("tiny-qwen3-moe", Recorder(), new=4, cache=8, record=True)
    (req,) = reqs
    T = len(ids) + len(g.output_ids) - 1
    r = req.routing
    assert (
        r.topk_ids.shape == (T, 4, 4)
        and r.gate_probs.shape == (T, 4, 16)
        and r.lookahead.shape == (T, 4, 16)
    )
    assert r.embeddings.shape == (T, 64) and not r.lookahead[:, -1].any()
    # the chosen experts are the top-K of the probability rows for a softmax router
    np.testing.assert_array_equal(
        np.sort(r.topk_ids, -1), np.sort(np.argsort(-r.gate_probs, -1, kind="stable")[..., :4], -1)
    )


class LateSearcher(AsyncRecorder):
    """An async policy whose search of each decode iteration's start returns only after the
    compute thread has run that iteration's layer-0 gate, and then orders layer 0's
    uncached experts: orders made for the iteration start, arriving late."""

    name = "test-late-searcher"

    def bind(self, ctx):
        super().bind(ctx)
        self.session: RunSession | None = None
        self.late_orders = 0

    def on_iteration_start(self, ev: IterationStart) -> None:
        super().on_iteration_start(ev)
        if ev.iteration == 0 or self.session is None:
            return
        res = self.session.res
        # one request: iteration i's gates are numbered i * L + 1 .. (i + 1) * L. Wait for
        # this iteration's layer-0 gate by its number (a searcher running behind may see
        # it has run already; reading last_gate here and waiting for a change would then
        # wait for a gate that never comes after the last iteration)
        layer0 = ev.iteration * self.ctx.spec.num_moe_layers + 1
        deadline = time.monotonic() + 30.0
        while res.last_gate[0] < layer0:
            assert time.monotonic() < deadline, "the compute thread never reached layer 0"
            time.sleep(0.001)
        for e in range(self.ctx.spec.num_experts):
            if not self.ctx.is_cached((0, e)):
                self.prefetch(0, e, priority=1.0)
                self.late_orders += 1


def test_a_late_async_order_keeps_the_stamp_of_the_event_it_answers():
    """The simulator stamps an async policy's orders when the policy is asked (and applies
    them ``policy_search_s`` later): orders answering an iteration start are stale once
    that iteration's layer-0 gate has run, however late the searcher delivers them. The
    real executor must not stamp them when they are collected (then they would look newer
    than that gate and start copies of a layer that has already run)."""
    pol = LateSearcher()
    loaded = load("tiny-mixtral")
    om = offload_model(loaded, store="ram")
    ids = loaded.tokenizer.encode("What is MoE?")
    with RunSession(om, pol, SessionOptions(12)) as s:
        pol.session = s
        s.generate("req", ids, 4)
        s.driver.flush()  # the last iteration's late orders, however late the searcher is
        m = s.metrics()
    assert pol.late_orders > 0
    assert m["prefetch_orders"] == pol.late_orders
    # every late order is stale or found its key cached; none started a copy
    assert m["prefetches_issued"] == 0
    assert m["prefetch_orders_stale"] + m["prefetch_orders_skipped_cached"] == pol.late_orders
    assert m["prefetch_orders_stale"] > 0


class EarlySearcher(AsyncRecorder):
    """An async policy that orders layer 0's uncached experts at each decode iteration's
    start."""

    name = "test-early-searcher"

    def bind(self, ctx):
        super().bind(ctx)
        self.ordered = 0
        self.started = -1  # the last iteration whose start this policy has handled

    def on_iteration_start(self, ev: IterationStart) -> None:
        super().on_iteration_start(ev)
        if ev.iteration > 0:
            for e in range(self.ctx.spec.num_experts):
                if not self.ctx.is_cached((0, e)):
                    self.prefetch(0, e, priority=1.0)
                    self.ordered += 1
        self.started = ev.iteration


def test_the_searcher_applies_its_orders_without_waiting_for_a_compute_hook():
    """Between an iteration's start and its layer-0 gate the compute thread runs no hook
    (embedding and layer 0's attention), so orders collected there would reach the copy
    engine only at that gate, when they are stale. The searcher applies them itself, as the
    simulator does ``policy_search_s`` after the event: every decode iteration's orders are
    in before its layer-0 gate runs (the gate waits for them here, up to 30 s)."""
    pol = EarlySearcher()
    loaded = load("tiny-mixtral")
    om = offload_model(loaded, store="ram")
    ids = loaded.tokenizer.encode("What is MoE?")
    seen_at_gate0: list[tuple[int, int]] = []
    with RunSession(om, pol, SessionOptions(12)) as s:
        res, run_layer = s.res, s.run_layer

        def layer_after_orders(mod, *args):  # type: ignore[no-untyped-def]
            # wait before the layer's gate starts holding new orders (from there on they
            # go after its demand loads, as in the simulator): until the searcher has
            # handled this iteration's start (its count of orders is then final for the
            # iteration) and every order it made is applied
            if mod.moe_layer == 0 and s.iteration > 0:
                deadline = time.monotonic() + 30.0
                while pol.started < s.iteration or res.stats.orders < pol.ordered:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.001)
                seen_at_gate0.append((res.stats.orders, pol.ordered))
            return run_layer(mod, *args)

        s.run_layer = layer_after_orders  # type: ignore[method-assign]
        s.generate("req", ids, 4)
        s.driver.flush()
    assert len(seen_at_gate0) == 3 and pol.ordered > 0
    assert all(applied == ordered for applied, ordered in seen_at_gate0), seen_at_gate0
