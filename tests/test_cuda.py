"""The real executor on a CUDA device (``pytest -m cuda``; skipped without one).

What only a GPU can show, with the CPU tests' assertions: pinned host buffers, the copy
stream, events and the slot fences must leave the offloaded model's outputs those of the
unmodified model, bit for bit:

- fp32, eager experts: every exact policy, small caches (copies, evictions, prefetches),
  both stores (pinned RAM rows; the file store through the pinned staging buffer), several
  architectures; tokens and every step's logits ``torch.equal`` to the unmodified model on
  the same GPU;
- bf16: the offloaded bf16 model equals the unmodified model's own bf16 run;
- under load: prefetches preempted at 4 KB chunk boundaries, the model run under a
  non-default stream while another stream keeps the GPU busy: outputs unchanged;
- a slot fence holds a copy back until kernels still reading the slot's previous expert
  are done (``torch.cuda._sleep`` keeps such a kernel running);
- ``cache_gb='auto'`` sizes the cache from free device memory less the reserve.

scripts/gpu_check.sh runs this module on a GPU machine; the CPU suite covers the logic.
``FMOE_CUDA_TESTS_DEVICE=cpu`` runs the tests that need no CUDA feature on the CPU, to
check this module's own code before device time is spent on it.
"""

from __future__ import annotations

import os
import threading

import pytest
import torch

from policies.registry import make_policy, policy_class, policy_names
from realrun.copy_engine import CopyEngine, CopyJob, CudaMover
from realrun.fences import fence_for
from realrun.generate import greedy_generate
from realrun.models import load
from realrun.offload import offload_model
from realrun.session import RunSession, SessionOptions
from realrun.store import RamStore
from tests.test_realrun_copy_engine import FakeExperts

ON = os.environ.get("FMOE_CUDA_TESTS_DEVICE", "cuda")  # 'cpu': a check of this module's code
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        ON == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"
    ),
]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA streams")

ARCHS = ["tiny-mixtral", "tiny-qwen3-moe", "tiny-olmoe", "tiny-deepseek-v3"]
PROMPT = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43]
NEW = 4


def exact_policies() -> list[str]:
    return [n for n in policy_names() if not policy_class(n).reads_future]


def _dev() -> torch.device:
    return torch.device("cuda", 0) if ON == "cuda" else torch.device(ON)


_REF: dict[tuple, object] = {}


def reference(arch: str, dtype: torch.dtype = torch.float32):
    """The unmodified model's greedy run on the GPU (tokens and per-step logits)."""
    key = (arch, dtype)
    if key not in _REF:
        m = load(arch).model.to(_dev(), dtype)
        _REF[key] = greedy_generate(m, "ref", PROMPT, NEW, keep_logits=True)
        del m
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return _REF[key]


def offloaded(arch: str, store: str = "auto", dtype: torch.dtype = torch.float32):
    loaded = load(arch)
    loaded.model.to(dtype)
    return offload_model(loaded, store=store, dense_device=_dev())


def assert_same(got, ref, what) -> None:
    assert got.output_ids == ref.output_ids, what
    assert len(got.logits) == len(ref.logits), what
    for a, b in zip(got.logits, ref.logits, strict=True):
        assert torch.equal(a, b), (what, float((a.float() - b.float()).abs().max()))


def small_cache(spec, policy: str) -> int:
    if policy_class(policy).preload_all:
        return spec.total_experts
    return max(spec.top_k, spec.total_experts // 3)


@pytest.mark.parametrize("arch", ARCHS)
def test_fp32_offloaded_equals_the_unmodified_model_for_every_exact_policy(arch):
    ref = reference(arch)
    om = offloaded(arch)
    try:
        for policy in exact_policies():
            cache = small_cache(om.loaded.spec, policy)
            with RunSession(om, make_policy(policy), SessionOptions(cache, [_dev()])) as s:
                got = s.generate("r", PROMPT, NEW, keep_logits=True)
                m = s.metrics()
            assert_same(got, ref, (arch, policy, cache))
            assert m["hits"] + m["misses"] == m["demands"]
            if cache < om.loaded.spec.total_experts:
                assert m["bytes_h2d"] > 0, (arch, policy)  # copies really ran
    finally:
        om.close()


def test_the_file_store_through_the_pinned_staging_buffer_is_exact():
    ref = reference("tiny-mixtral")
    om = offloaded("tiny-mixtral", store="file")
    try:
        opts = SessionOptions(2, [_dev()], chunk_bytes=4096)
        with RunSession(om, make_policy("lru"), opts) as s:
            assert_same(s.generate("r", PROMPT, NEW, keep_logits=True), ref, "file store")
    finally:
        om.close()


@pytest.mark.parametrize("arch", ["tiny-mixtral", "tiny-qwen3-moe"])
def test_bf16_offloaded_equals_the_unmodified_bf16_run(arch):
    ref = reference(arch, torch.bfloat16)
    om = offloaded(arch, dtype=torch.bfloat16)
    try:
        for policy in ("lru", "fmoe"):
            cache = small_cache(om.loaded.spec, policy)
            with RunSession(om, make_policy(policy), SessionOptions(cache, [_dev()])) as s:
                assert_same(s.generate("r", PROMPT, NEW, keep_logits=True), ref, (arch, policy))
    finally:
        om.close()


class _Busy:
    """Keeps the GPU busy on its own stream (matrix products) until stopped."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        stream = torch.cuda.Stream(_dev())
        a = torch.randn(2048, 2048, device=_dev())
        with torch.cuda.stream(stream):
            while not self.stop.is_set():
                for _ in range(8):
                    a = torch.tanh(a @ a)
                stream.synchronize()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


@needs_cuda
@pytest.mark.parametrize("policy", ["fmoe", "mixtral-offloading", "lru"])
def test_prefetch_and_eviction_under_load_never_change_outputs(policy):
    """4 KB chunks (prefetches preempted and resumed), the smallest cache, the model on a
    non-default stream (slot fences must follow it), another stream loading the GPU."""
    arch = "tiny-qwen3-moe"
    ref = reference(arch)
    om = offloaded(arch)
    busy = _Busy()
    try:
        spec = om.loaded.spec
        compute = torch.cuda.Stream(_dev())
        for cache in (spec.top_k, spec.total_experts // 2):
            opts = SessionOptions(cache, [_dev()], chunk_bytes=4096)
            with torch.cuda.stream(compute), RunSession(om, make_policy(policy), opts) as s:
                for i in range(3):
                    got = s.generate(f"r{i}", PROMPT, NEW, keep_logits=True)
                    assert_same(got, ref, (policy, cache, i))
                m = s.metrics()
            assert m["bytes_h2d"] > 0
    finally:
        busy.close()
        om.close()


@needs_cuda
def test_a_slot_fence_holds_the_copy_until_kernels_reading_the_slot_are_done():
    """A kernel still queued on the compute stream reads the slot's old bytes; the copy of
    a new expert into the slot, started on the copy thread, waits for it."""
    store = RamStore([FakeExperts(num_experts=2, inter=256, hidden=256)], pin=True)
    n = store.row_bytes
    slot = torch.zeros(n, dtype=torch.uint8, device=_dev())
    slot.copy_(store.host_row(0, 0))
    compute = torch.cuda.Stream(_dev())
    fence = fence_for(_dev())
    engine = CopyEngine(store, CudaMover(_dev(), 4096), chunk_bytes=4096)
    try:
        with torch.cuda.stream(compute):
            fence.observe()
            torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time before the read below
            seen = slot.clone()  # reads the old expert
        job = CopyJob((0, 1), slot, n, demand=True)
        job.after = fence.take()  # taken on this (another) stream's thread, as a starter would
        engine.submit(job)
        engine.wait((0, 1))
        torch.cuda.synchronize()
        assert torch.equal(seen.cpu(), store.host_row(0, 0))  # the copy did not overtake
        assert torch.equal(slot.cpu(), store.host_row(0, 1))
    finally:
        engine.close()


@needs_cuda
def test_cache_gb_auto_sizes_the_cache_from_free_memory():
    from realrun.api import offload
    from realrun.placement import GB, cuda_free_bytes
    from realrun.runner import ServingPlan

    arch = "tiny-mixtral"
    om = offloaded(arch)
    try:
        row = om.store.row_bytes
        free = cuda_free_bytes(_dev())
        want = 5  # experts the free memory less the reserve holds
        reserve_gb = (free - (want + 0.5) * row) / GB
        plan = ServingPlan(0, True, reserve_gb, [_dev()], None)
        assert plan.sized(om.loaded.spec, row) == want
    finally:
        om.close()
    ids = torch.tensor([PROMPT], device=_dev())
    unmodified = load(arch).model.to(_dev())
    want = unmodified.generate(ids, max_new_tokens=NEW, do_sample=False)
    del unmodified
    with offload(arch, device="cuda", cache_gb="auto", reserve_gb=1.0) as lm:
        budget = lm.session.opts.cache_experts
        assert lm.spec.top_k <= budget <= lm.spec.total_experts
        got = lm.model.generate(ids, max_new_tokens=NEW, do_sample=False)
        assert torch.equal(got, want)
