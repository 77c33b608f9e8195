"""Offloaded experts under the library's own ``generate``: the Python API for serving.

:func:`offload` loads a model (a tiny preset or a local checkpoint directory) or takes
one already built, moves its experts to host memory behind a device cache of a given
budget, attaches a policy, and returns an :class:`OffloadedLM`. Its ``model`` is the
transformers model itself: ``model.generate(...)`` (greedy, sampling, any logits
processor or streamer) and plain ``model(...)`` forwards run as before, with every
expert load, prefetch and eviction done by the policy, and with outputs equal to the
unmodified model's (eager experts).

How forwards become the policy's iterations. A forward pre-hook on the model turns each
forward into an iteration (:class:`realrun.generate.IterationRows`): a forward on an
empty KV cache starts new requests, one per batch row, whose prompt is the row's
attended tokens (``attention_mask``; a row's left padding is not a token of it); a
forward on a non-empty cache continues the running requests, one token per row. An
iteration ends when the next forward begins, or when ``generate`` returns (its requests
then finish: ``IterationEnd.finished``), or at :meth:`OffloadedLM.close`; so the
policy hears of a forward's end after the library's sampling step, not before it.

Pad rows are computed like the unmodified model computes them (their experts are loaded
and run: the library's ``generate`` does that), but the policy and the cache counters'
callers see real rows only. Requests are recorded (TTFT, per-token times, tokens) for
``generate`` calls: TTFT from the call to its first forward's end, each later token from
one forward's end to the next; a row's tokens stop at its first EOS (the library pads a
finished row until the batch ends). Forwards outside ``generate`` drive the policy and
the cache but record no request. ``generate`` calls from several threads run one at a
time (the session serves one batch at a time); plain forwards must come from one thread
at a time.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from types import MethodType
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from policies.base import Policy
from realrun.generate import Generation, IterationRows
from realrun.models import LoadedModel, from_module, load, resolve_model, spec_of_module
from realrun.offload import OffloadedModel, offload_model
from realrun.prompting import Prompt
from realrun.runner import plan_serving
from realrun.session import RunSession, SessionOptions, refuse_future_readers
from specs.errors import InputError


@dataclass
class _Running:
    """The requests of the current batch, in batch-row order."""

    gens: list[Generation]
    seen: list[int]  # tokens of each request the model has run (prompt, then one per step)
    recorded: bool  # started inside generate: kept as Generations
    t_last: float  # end of the last forward (wall clock)
    arrival_s: float  # the session's clock when they arrived


class _ForwardRequests:
    """Hooks on the model's forward that turn forwards into the session's iterations."""

    def __init__(self, session: RunSession, model: nn.Module) -> None:
        self.session = session
        self.model = model
        self.running: _Running | None = None
        self.open = False  # an iteration began and has not been ended yet
        self.call_t0: float | None = None  # the current generate call's start
        self.generations: list[Generation] = []
        self.count = 0
        self._one_call = threading.Lock()  # generate calls from several threads: one at a time
        self._handles = [
            model.register_forward_pre_hook(self._before, with_kwargs=True),
            model.register_forward_hook(self._after),
        ]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # -- forward hooks ----------------------------------------------------------------------
    def _before(self, _mod: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise InputError("an offloaded model's forward needs input_ids (not inputs_embeds)")
        ids = ids.detach()
        B, S = ids.shape
        mask = kwargs.get("attention_mask")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = 0 if cache is None else int(cache.get_seq_length())
        # a 2D mask covers past and new tokens; a row's new tokens are its last S columns
        real = None if mask is None or mask.dim() != 2 else mask[:, -S:].detach().bool()
        run = self.running
        if past == 0 or run is None or len(run.gens) != B:
            self.end(finish=True)
            run = self._start(ids, real)
        else:
            self.end(finish=False)
        self.session.begin_iteration(self._rows(run, S, real, prefill=past == 0))
        self.open = True

    def _after(self, _mod: nn.Module, _args: tuple, _out: Any) -> None:
        run = self.running
        if run is None or not run.recorded:
            return
        t = time.perf_counter()
        for g in run.gens:
            if g.output_ids:
                g.decode_s.append(t - run.t_last)
            else:  # the first token: from the generate call
                g.ttft_s = t - run.t_last
            g.output_ids.append(-1)  # sampled after the forward: filled in when generate returns
        run.t_last = t

    # -- requests ---------------------------------------------------------------------------
    def _start(self, ids: torch.Tensor, real: torch.Tensor | None) -> _Running:
        rows = ids.cpu().tolist()
        keep = real.cpu().tolist() if real is not None else [[True] * ids.shape[1]] * len(rows)
        prompts = []
        for row, kept in zip(rows, keep, strict=True):
            self.count += 1
            prompts.append(
                Prompt(f"hf-{self.count}", [t for t, k in zip(row, kept, strict=True) if k])
            )
        B = len(prompts)
        self.session.admit(prompts)
        recorded = self.call_t0 is not None
        gens = [Generation(p.request_id, list(p.ids), [], 0.0, [], None, B) for p in prompts]
        if recorded:
            self.generations.extend(gens)
        t0 = self.call_t0 if self.call_t0 is not None else time.perf_counter()
        arrival = self.session.now()
        self.running = _Running(gens, [0] * B, recorded, t0, arrival)
        return self.running

    def _rows(
        self, run: _Running, S: int, real: torch.Tensor | None, prefill: bool
    ) -> IterationRows:
        """This forward's real rows: each row's attended new tokens, in row-major order."""
        real_np = None if real is None else real.cpu().numpy()
        rids: list[str] = []
        pos: list[int] = []
        for b, g in enumerate(run.gens):
            n = S if real_np is None else int(real_np[b].sum())
            rids += [g.request_id] * n
            pos += range(run.seen[b], run.seen[b] + n)
            run.seen[b] += n
        flat = None if real is None or bool(real.all()) else real.reshape(-1)
        return IterationRows(
            tuple(rids),
            np.asarray(pos, dtype=np.int64),
            np.full(len(rids), prefill, dtype=bool),
            flat,
            tuple(g.request_id for g in run.gens),
        )

    def end(self, finish: bool) -> None:
        """End the open iteration; with ``finish`` the running requests finish with it."""
        run = self.running
        if not self.open:
            if finish:
                self.running = None
            return
        done = tuple(g.request_id for g in run.gens) if finish and run is not None else ()
        self.open = False
        self.session.end_iteration(done)
        if finish:
            self.running = None
            if run is not None:
                self._record(run)

    def _record(self, run: _Running) -> None:
        """Hand finished requests to the session's recorder (when recording): those of a
        generate call as trace requests, cut after their last token; others dropped."""
        rec = self.session.recorder
        if rec is None:
            return
        for g in run.gens:
            if run.recorded:
                rec.finish_request(g.request_id, len(g.output_ids), run.arrival_s, trim=True)
            else:
                rec.drop_request(g.request_id)

    # -- generate ---------------------------------------------------------------------------
    def generate(self, inner: Any, *args: Any, **kwargs: Any) -> Any:
        """``inner(*args, **kwargs)`` (the library's generate) with its requests recorded;
        calls from several threads run one after another."""
        with self._one_call:
            return self._generate(inner, *args, **kwargs)

    def _generate(self, inner: Any, *args: Any, **kwargs: Any) -> Any:
        self.end(finish=True)
        cfg = kwargs.get("generation_config") or getattr(self.model, "generation_config", None)
        eos = kwargs.get("eos_token_id", getattr(cfg, "eos_token_id", None))
        eos_ids = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        self.call_t0 = t0 = time.perf_counter()
        try:
            out = inner(*args, **kwargs)
        except BaseException:
            self.call_t0 = None
            self.end(finish=True)
            raise
        run = self.running
        if run is not None and run.recorded:
            seqs = out if isinstance(out, torch.Tensor) else getattr(out, "sequences", None)
            _fill_tokens(run, seqs, eos_ids)
        self.end(finish=True)
        self.call_t0 = None
        self.session.add_wall_time(time.perf_counter() - t0)
        return out


def _fill_tokens(run: _Running, seqs: torch.Tensor | None, eos: set[int]) -> None:
    """Put the returned tokens into the requests: the last ``len(output_ids)`` columns of
    each row, cut after the row's first EOS (with its per-token times)."""
    if seqs is None or seqs.shape[0] != len(run.gens):
        return  # beam search: rows are beams, not returned sequences; tokens stay unknown (-1)
    for g, row in zip(run.gens, seqs.tolist(), strict=True):
        n = len(g.output_ids)
        toks = row[len(row) - n :] if n else []
        for i, t in enumerate(toks):
            if t in eos:
                toks = toks[: i + 1]
                break
        g.output_ids[:] = toks
        del g.decode_s[max(len(toks) - 1, 0) :]


class OffloadedLM:
    """A transformers MoE model with offloaded experts and a policy; see the module docstring.

    ``model`` is the library's model (its ``generate`` records requests); ``tokenizer`` is
    the preset's or checkpoint's tokenizer (None for a model passed in); ``session`` the
    :class:`~realrun.session.RunSession`. Close it (or use ``with``) to stop the copy and
    searcher threads and put ``model.generate`` back; the model stays offloaded."""

    def __init__(self, om: OffloadedModel, session: RunSession) -> None:
        self.om = om
        self.session = session
        self.model: nn.Module = om.loaded.model
        self.tokenizer = om.loaded.tokenizer
        self.spec = om.loaded.spec
        self._forwards = _ForwardRequests(session, self.model)
        inner = self.model.generate  # the class's bound method

        def generate(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
            return self._forwards.generate(inner, *args, **kwargs)

        generate.__doc__ = inner.__doc__
        self.model.generate = MethodType(generate, self.model)
        self._closed = False

    @property
    def generations(self) -> list[Generation]:
        """Every request generated so far (``generate`` calls), in order."""
        return self._forwards.generations

    def metrics(self) -> dict[str, Any]:
        """The session's metrics (the names of ``fmoe run`` and ``fmoe sim``) over the
        requests generated so far; cache counters cover every forward."""
        self.session.generations = list(self._forwards.generations)
        self.session.batch_size = max((g.batch_size for g in self.generations), default=0)
        out = self.session.metrics()
        if any(-1 in g.output_ids for g in self.generations):
            out["tokens_sha256"] = None  # some rows' tokens could not be told (beam search)
        out.update(
            executor="realrun.api",
            model=self.spec.name,
            policy=self.session.policy.name,
            policy_metadata=self.session.policy.metadata(),
            expert_store=self.om.store.kind,
        )
        return out

    def workload(self) -> Any:
        """The routing of every ``generate`` request so far, as a trace (traces.types
        Workload: rows of real tokens, cut after each request's last token; arrivals on
        the session's clock). ``offload(record=True)`` only."""
        rec = self.session.recorder
        if rec is None:
            raise InputError("no routing was recorded: offload(..., record=True)")
        from realrun.capture import make_workload

        link = self.session.opts.link
        described = link.describe() if link is not None else {"emulated_link": False}
        extra = {"policy": self.session.policy.name, **described}
        return make_workload(
            self.spec, list(rec.requests), self.session.opts.seed, "realrun.api", extra
        )

    def save_trace(self, path: str) -> None:
        """Write :meth:`workload` to ``path`` (the traces format, atomic)."""
        from realrun.capture import write_workload

        write_workload(self.workload(), path)

    def close(self) -> None:
        """End the last iteration, detach the policy, restore ``model.generate``, free the store."""
        if self._closed:
            return
        self._closed = True
        try:
            self._forwards.end(finish=True)
        finally:
            self._forwards.remove()
            self.model.__dict__.pop("generate", None)
            try:
                self.session.close()
            finally:
                self.om.close()

    def __enter__(self) -> OffloadedLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def offload(
    model: str | nn.Module,
    *,
    policy: str | Policy = "lru",
    policy_options: dict[str, Any] | None = None,
    cache_experts: int | None = None,
    cache_gb: float | Literal["auto"] | None = None,
    reserve_gb: float = 2.0,
    device: str = "cpu",
    num_devices: int | None = None,
    link_gbps: float | None = None,
    link_latency_us: float | None = None,
    store: str = "auto",
    store_dir: str | None = None,
    chunk_bytes: int = 1 << 20,
    record: bool = False,
    seed: int = 0,
    cache_scope: str = "global",
    allow_lossy: bool = False,
) -> OffloadedLM:
    """Offload ``model``'s experts under a cache budget and attach ``policy``.

    ``model``: a tiny preset name or a local checkpoint directory (loaded as ``fmoe run``
    does), or a transformers MoE model already built (moved to ``device``; its experts
    module is switched to the eager implementation, which makes outputs exact). The budget
    is ``cache_experts`` or ``cache_gb`` in total over the devices (default: every
    expert), at least top-K; ``cache_gb="auto"`` (CUDA) takes as many experts as the
    devices' free memory holds once the dense weights are on, less ``reserve_gb`` per
    device for the KV cache and activations. ``link_gbps`` emulates a host->GPU link on the CPU. A policy
    instance must be unbound. ``record`` keeps the routing of every ``generate`` request
    (:meth:`OffloadedLM.workload`, :meth:`OffloadedLM.save_trace`). ``cache_scope``
    "per-layer" gives each MoE layer an equal share of the slots. A policy that overrides
    ``miss_action`` may serve absent experts on the CPU (docs/hybrid.md). Raises InputError for
    bad input, before offloading.
    """
    from policies.registry import make_policy, policy_class

    if isinstance(policy, str):
        refuse_future_readers(policy_class(policy))
        pol = make_policy(policy, **(policy_options or {}))
    else:
        if policy_options:
            raise InputError("policy_options apply to a policy given by name, not an instance")
        refuse_future_readers(type(policy))
        pol = policy
    spec = resolve_model(model)[0] if isinstance(model, str) else spec_of_module(model)
    plan = plan_serving(
        spec,
        pol,
        cache_experts=cache_experts,
        cache_gb=cache_gb,
        reserve_gb=reserve_gb,
        device=device,
        num_devices=num_devices,
        store=store,
        link_gbps=link_gbps,
        link_latency_us=link_latency_us,
    )
    loaded: LoadedModel = load(model, seed=seed) if isinstance(model, str) else from_module(model)
    om = offload_model(loaded, store=store, store_dir=store_dir, dense_device=plan.devices[0])
    try:
        # 'auto': the dense weights are on their device now; a slot is a store row
        budget = plan.sized(spec, om.store.row_bytes)
        opts = SessionOptions(
            budget,
            plan.devices,
            plan.link,
            chunk_bytes,
            record=record,
            seed=seed,
            cache_scope=cache_scope,
            allow_lossy=allow_lossy,
        )
        session = RunSession(om, pol, opts)
    except BaseException:
        om.close()
        raise
    return OffloadedLM(om, session)
