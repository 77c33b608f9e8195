"""The simpy discrete-event model of PCIe links, GPU memory and compute.

Python API::

    from sim import SimConfig, simulate
    result = simulate(workload, SimConfig(model=spec, hardware=hw, policy="fmoe", cache_gb=24))
    result.metrics      # flat dict: the `fmoe sim --json` object
    result.requests     # DataFrame: id, arrival_s, start_s, prompt_len, output_len,
                        #            ttft_s, tpot_s, e2e_s, hits, demands

    from sim.sweep import SweepGrid, run_sweep   # policies x budgets x traces (pool or Ray)
    from sim.plots import plot_all               # Pareto, hit rate, TTFT/TPOT bars

What is modelled (all costs from ``specs.costs`` and the HardwareProfile):

- Requests arrive at their trace times (or closed loop in offline mode: each request
  arrives when a batch slot frees). A batcher admits them FCFS: ``static`` batches of B
  run to completion; ``continuous`` fills free slots at every iteration (a newcomer's
  prefill runs in the same iteration as the others' decodes).
- An iteration runs the batch's token rows (a request's whole prompt in its first
  iteration, one row per decode iteration): the head (embedding + LM head, on the
  number of sequences), then each decoder layer: its dense part (``dense_layer_time_s``
  on the iteration's rows and their mean KV length; a dense decoder layer costs only
  this); with several GPUs, the decoder layers form pipeline stages (layer i on GPU
  i * G // layers) and a hand-off of the rows' hidden states crosses the interconnect
  between stages. An MoE layer then runs its gate, demands the routed experts on
  their GPUs (round-robin placement), computes ``expert_time_s`` of the rows routed to
  each expert, the GPUs in parallel, and exchanges the rows' activations with the
  expert GPUs (rows x hidden x dtype bytes x 2 / interconnect bandwidth + latency).
- Expert caches: one ``policies.ExpertCache`` per GPU, sized from ``cache_experts`` or
  ``cache_gb`` (a total split by the placement, or per GPU), which must fit next to the
  GPU's share of the dense weights and of the KV reserve. A hit is an expert resident
  when demanded. Misses are demand loads; a layer whose experts do not fit at once on a
  GPU runs there in waves.
- Links: one host->GPU link per GPU with bandwidth (pinned or pageable), latency per
  copy and concurrency, an optional host-side cap shared by all links, demand loads
  before prefetches (prefetches by priority), preemption of a prefetch at a chunk
  boundary, stale prefetches dropped (see :mod:`sim.links`).
- The policy observes every event (arrival, iteration start, gate, expert used, load
  finished, iteration end) and is drained of prefetch orders after each; an
  ``async_search`` policy's orders from iteration start and gate hooks become usable
  ``policy_search_s`` later.

Metrics (names shared with the real executor): TTFT = first token time - arrival; TPOT
= (last token - first token) / (output_len - 1), undefined for one-token outputs (left
out of means and percentiles); e2e = last token - arrival; hit_rate = hits / demands with
shared-expert uses counted as hits (the fMoE paper's convention), hit_rate_routed =
routed experts only; prefetch_accuracy = prefetches resident at their first demand /
prefetches started (None without prefetches; prefetch_late were still in flight then,
prefetch_wasted evicted or cancelled before any demand); bytes_h2d =
loads x expert bytes (a cancelled copy counts whole; ``bytes_transferred`` is what the
links actually moved); stall_s = how much the MoE layers were lengthened by waiting for
copies; link_busy_s per GPU; layer_steps = iterations x MoE layers; wall_s the wall
time of ``simulate``. Times are seconds, sizes bytes, rates 0..1.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sim.config import SimConfig
    from sim.run import SimResult, simulate

# Resolved on first use (PEP 562), so `import sim.batching` (the CLI's flag choices) does
# not pull simpy and pandas.
_LAZY = {"SimConfig": "sim.config", "SimResult": "sim.run", "simulate": "sim.run"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sim' has no attribute {name!r}")


__all__ = ["SimConfig", "SimResult", "simulate"]
