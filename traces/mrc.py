"""Miss-ratio curves: hit rate against every cache size, in one pass per policy.

The demand sequence is the trace run one request at a time in file order (batch 1,
:func:`traces.demand.demand_sequence`), on one cache. Curves (see
:mod:`traces.cachesim` for the cache model):

- ``global`` scope: one cache over all L x J experts, sizes top-K .. L x J;
- ``per-layer`` scope: each MoE layer its own cache of an equal share k of the slots,
  sizes L x k for k = top-K .. J (each layer's curve from its own pass, summed).

For each scope, LRU (recency stack), LFU (run-wide use counts, ties by recency) and MIN
(Belady's OPT stack; the fewest misses of any eviction choice at every size).

:func:`miss_ratio_curves` never holds the whole sequence: it spills the requests' demands
to anonymous temporary files (:class:`traces.demand_file.DemandFile`, whose backward pass
gives MIN its next uses) and runs every stack pass in one read of the chunks
(:func:`traces.cachesim_stream.stack_histograms`), so its memory is the stacks and one
chunk, whatever the trace's length. :func:`global_curves` and :func:`per_layer_curves`
are the same curves from a sequence in memory (the tests compare both).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from specs.jsonio import atomic_output, save_png
from traces.cachesim import hits_by_capacity
from traces.demand import DemandSequence, next_use, request_demands
from traces.types import Workload

POLICIES = ("lru", "lfu", "min")
SCOPES = ("global", "per-layer")
COLUMNS = ["scope", "policy", "cache_experts", "hit_rate", "hits", "demands"]


@dataclass(frozen=True)
class Curve:
    """One curve: ``cache_experts`` (total slots) and the ``hits`` at each, of ``demands``."""

    scope: str
    policy: str
    cache_experts: np.ndarray
    hits: np.ndarray
    demands: int

    @property
    def hit_rate(self) -> np.ndarray:
        return self.hits / self.demands if self.demands else np.zeros(self.hits.size)


def global_curves(seq: DemandSequence, top_k: int) -> list[Curve]:
    """LRU, LFU and MIN on one cache, sizes top-K .. every key."""
    nxt = next_use(seq)
    sizes = np.arange(top_k, seq.num_keys + 1)
    return [
        Curve("global", p, sizes, hits_by_capacity(seq, p, nxt)[sizes], seq.num_demands)
        for p in POLICIES
    ]


def per_layer_curves(seq: DemandSequence, num_layers: int, top_k: int) -> list[Curve]:
    """LRU, LFU and MIN with each layer caching its own experts in k slots (k = top-K .. J):
    one pass with a stack per layer."""
    J = seq.num_keys // num_layers
    k = np.arange(top_k, J + 1)
    nxt = next_use(seq)
    return [
        Curve("per-layer", p, k * num_layers, hits_by_capacity(seq, p, nxt, J)[k], seq.num_demands)
        for p in POLICIES
    ]


def miss_ratio_curves(
    workload: Workload,
    scopes: tuple[str, ...] = SCOPES,
    folder: str | None = None,
    chunk_demands: int | None = None,
) -> list[Curve]:
    """Every curve of ``scopes`` for ``workload`` (see the module doc), out of core:
    ``folder`` holds the temporary files (default ``TMPDIR``); ``chunk_demands``: demands
    per chunk read back (default :data:`traces.demand_file.CHUNK_DEMANDS`)."""
    from traces.cachesim_stream import stack_histograms
    from traces.demand_file import CHUNK_DEMANDS, DemandFile

    spec = workload.spec
    L, J, K = spec.num_moe_layers, spec.num_experts, spec.top_k
    runs = [(scope, p) for scope in SCOPES if scope in scopes for p in POLICIES]
    group = {"global": L * J, "per-layer": J}  # keys sharing one cache: all, or a layer's
    with DemandFile(L * J, folder, chunk_demands or CHUNK_DEMANDS) as dfile:
        for keys, sizes in request_demands(workload):
            dfile.append(keys, sizes)
        dfile.finish()
        hists = stack_histograms(dfile, [(p, group[scope]) for scope, p in runs])
        demands = dfile.num_demands
    out: list[Curve] = []
    for (scope, policy), hist in zip(runs, hists, strict=True):
        hits = np.cumsum(hist)
        slots = np.arange(K, group[scope] + 1)  # per cache; per-layer: each layer's k
        total = slots if scope == "global" else slots * L
        out.append(Curve(scope, policy, total, hits[slots], demands))
    return out


def rows(curves: list[Curve]) -> list[dict]:
    """One dict per (curve, size) with :data:`COLUMNS`."""
    out = []
    for c in curves:
        rate = c.hit_rate
        for i in range(c.cache_experts.size):
            out.append(
                {
                    "scope": c.scope,
                    "policy": c.policy,
                    "cache_experts": int(c.cache_experts[i]),
                    "hit_rate": float(rate[i]),
                    "hits": int(c.hits[i]),
                    "demands": c.demands,
                }
            )
    return out


def write_csv(curves: list[Curve], path: str | Path) -> Path:
    """The curves as CSV (:data:`COLUMNS`), written atomically."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows(curves))
    path = Path(path)
    with atomic_output(path, ".csv") as tmp:
        Path(tmp).write_text(buf.getvalue())
    return path


def write_png(curves: list[Curve], path: str | Path, title: str = "") -> Path:
    """Hit rate vs cache size, one line per (scope, policy), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"global": "-", "per-layer": "--"}
    colors = {"lru": "tab:blue", "lfu": "tab:orange", "min": "black"}
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for c in curves:
        label = f"{c.policy.upper() if c.policy != 'min' else 'MIN (bound)'}, {c.scope}"
        ax.plot(c.cache_experts, c.hit_rate, styles[c.scope], color=colors[c.policy], label=label)
    ax.set_xlabel("expert cache (experts, total)")
    ax.set_ylabel("hit rate")
    ax.set_ylim(0, 1.02)
    ax.set_title(title or "hit rate vs cache size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_png(fig, path)
