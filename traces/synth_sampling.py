"""The sampling core shared by the knob-driven generator and the fitted one.

Request-level draws (lengths, arrivals, the flat token index), the layer-by-layer routing
sampler (vectorized over a range of tokens) and the assembly of Request objects.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from specs.model_spec import ModelSpec
from traces.topk import top_k_values, use_jit
from traces.types import Request, Routing


@dataclass
class _Skeleton:
    """Request-level draws: lengths, arrivals, and the flat token index."""

    prompt_len: np.ndarray
    output_len: np.ndarray
    arrival_s: np.ndarray
    offsets: np.ndarray
    req_of_token: np.ndarray
    first: np.ndarray  # token is its request's first row

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])


def _skeleton(prompt_len: np.ndarray, output_len: np.ndarray, arrival_s: np.ndarray) -> _Skeleton:
    counts = prompt_len + output_len - 1
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    req = np.repeat(np.arange(len(counts)), counts)
    first = np.zeros(int(offsets[-1]), dtype=bool)
    first[offsets[:-1]] = True
    return _Skeleton(prompt_len, output_len, arrival_s, offsets, req, first)


def _lognormal_lengths(
    rng: np.random.Generator, n: int, mean: float, sigma: float, cap: int
) -> np.ndarray:
    if sigma == 0:
        return np.full(n, int(np.clip(round(mean), 1, cap)), dtype=np.int64)
    mu = math.log(mean) - sigma**2 / 2  # so that E[exp(N(mu, sigma))] = mean
    return np.clip(np.rint(rng.lognormal(mu, sigma, n)), 1, cap).astype(np.int64)


def _arrivals(rng: np.random.Generator, n: int, kind: str, rate: float) -> np.ndarray:
    if rate == 0:
        return np.zeros(n)
    if kind == "fixed":
        return np.arange(n) / rate
    gaps = rng.exponential(1.0 / rate, n)
    gaps[0] = 0.0
    return np.cumsum(gaps)


def _softmax(z: np.ndarray, temperature: float, out: np.ndarray | None = None) -> np.ndarray:
    """Row softmax of ``z / temperature`` in float32 (into ``out`` when given; it may be ``z``)."""
    e = np.subtract(z, z.max(axis=-1, keepdims=True), out=out)
    np.divide(e, np.float32(temperature), out=e)
    np.exp(e, out=e)
    e /= e.sum(axis=-1, keepdims=True)
    return e


# Bytes of one token block of the lookahead draw: its arrays (noise, logits, softmax)
# stay in the CPU caches instead of one [N, L, J] pass per operation.
LOOKAHEAD_BLOCK_BYTES = 2 * 2**20


def _sample_routing(
    sk: _Skeleton,
    spec: ModelSpec,
    rng: np.random.Generator,
    base_logits,  # (layer, prev_ids [N, K] | None) -> logits [N, J]
    reuse: np.ndarray,  # [L] probability of copying the previous token's row
    noise: float,
    temperature: float,
    normalize_topk: bool,
    lookahead_noise: float,
    with_probs: bool,
    with_lookahead: bool,
    jit: bool | None = None,
    scratch: dict[str, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Sample top-K routing for every token, layer by layer (vectorized over tokens).

    The draws and the float32 arithmetic are fixed, so one seed gives one result: per
    layer one float32 uniform [N, J] for the Gumbel noise, then one float32 normal
    [N, L-1, J] for the lookahead rows (drawn in token blocks of the same stream).
    ``jit``: the numba kernels of :mod:`traces.topk_jit` (True), numpy alone (False), or
    numba for large inputs (None); both give the same arrays bit for bit. ``scratch``:
    arrays kept between calls: working arrays, and the memory of the returned gate and
    lookahead rows once nothing holds the previous call's (see :func:`_scratch`)."""
    N, L, J, K = sk.num_tokens, spec.num_moe_layers, spec.num_experts, spec.top_k
    if jit is None:
        jit = use_jit(N * L * J)
    ids = np.empty((N, L, K), dtype=np.int16)
    weights = np.empty((N, L, K), dtype=np.float32)
    probs_all = _scratch(scratch, "probs", (N, L, J), unshared=True) if with_probs else None
    logits_all = _scratch(scratch, "logits", (N, L, J)) if with_lookahead else None
    arange = np.arange(N)
    # one draw per token for all layers: copies nest across layers (a token that copies at
    # a layer with low re-use copies at every layer with higher re-use), so a copied
    # token keeps a consistent layer-to-layer path instead of mixing two tokens' paths
    copy_draw = rng.random(N)
    gumbel = _scratch(scratch, "gumbel", (N if noise > 0 else 0, J))
    p = _scratch(scratch, "p", (N, J))
    z_buf = _scratch(scratch, "z", (N, J))
    prev: np.ndarray | None = None
    for layer in range(L):
        z = base_logits(layer, prev)
        if noise > 0:  # Gumbel(0, noise) = -noise * log(-log(u)); here log(-log(u))
            rng.random(dtype=np.float32, out=gumbel)
            np.maximum(gumbel, np.float32(1e-12), out=gumbel)
            np.log(gumbel, out=gumbel)
            np.negative(gumbel, out=gumbel)
            np.log(gumbel, out=gumbel)
        # temporal locality: copy the row of the nearest earlier token that did not copy
        copy = (copy_draw < reuse[layer]) & ~sk.first
        src = np.maximum.accumulate(np.where(copy, 0, arange)) if copy.any() else arange
        if jit:
            from traces.topk_jit import finish_logits

            zb = np.ascontiguousarray(z, dtype=np.float32)
            finish_logits(zb, gumbel, noise, src, temperature, z_buf, p)
            z = z_buf
            _softmax_from_exponents(p)
        else:
            z = np.asarray(z, dtype=np.float32)
            if noise > 0:
                z = z - np.float32(noise) * gumbel
            if src is not arange:
                z = z[src]
            _softmax(z, temperature, out=p)
        # top-K read off the stored float32 gate row, so the two always agree
        top, w = top_k_values(p, K, jit=jit)
        if normalize_topk:
            w = w / w.sum(axis=-1, keepdims=True)
        ids[:, layer], weights[:, layer] = top, w
        if probs_all is not None:
            probs_all[:, layer] = p
        if logits_all is not None:
            logits_all[:, layer] = z
        prev = top
    look = None
    if logits_all is not None:
        look = _scratch(scratch, "look", (N, L, J), unshared=True)
        look[:, -1] = 0.0
        if L > 1:
            block = max(1, LOOKAHEAD_BLOCK_BYTES // (4 * (L - 1) * J))
            for a in range(0, N, block):
                b = min(N, a + block)
                nxt = _scratch(scratch, "noise", (b - a, L - 1, J))
                rng.standard_normal(dtype=np.float32, out=nxt)
                if jit:
                    from traces.topk_jit import lookahead_exponents

                    rows = look[a:b]  # contiguous; its last layer's rows are zeroed again
                    lookahead_exponents(nxt, logits_all[a:b], lookahead_noise, temperature, rows)
                    _softmax_from_exponents(rows)
                    rows[:, -1] = 0.0
                else:
                    nxt *= np.float32(lookahead_noise)
                    nxt += logits_all[a:b, 1:]
                    look[a:b, :-1] = _softmax(nxt, temperature, out=nxt)
    return ids, weights, probs_all, look


def _scratch(
    store: dict[str, np.ndarray] | None, name: str, shape: tuple[int, ...], unshared: bool = False
) -> np.ndarray:
    """An uninitialized float32 array of ``shape``, in ``store[name]``'s memory when that
    is large enough (fresh memory costs the kernel a page clearing per use, about a tenth
    of a DeepSeek-V3 synthesis). ``unshared``: for arrays handed out, reuse the memory
    only when no array made from it is still alive anywhere (a view holds a reference to
    it; a caller that keeps the previous chunk's requests gets new memory instead)."""
    n = math.prod(shape)
    if store is None:
        return np.empty(shape, dtype=np.float32)
    buf = store.get(name)
    # references to buf here: the store, the local name and getrefcount's argument
    if buf is None or buf.size < n or (unshared and sys.getrefcount(buf) > 3):
        buf = store[name] = np.empty(n, dtype=np.float32)
    return buf[:n].reshape(shape)


def _softmax_from_exponents(e: np.ndarray) -> np.ndarray:
    """The rest of :func:`_softmax` on ``(z - max) / temperature``, in place."""
    np.exp(e, out=e)
    e /= e.sum(axis=-1, keepdims=True)
    return e


def _assemble(
    sk: _Skeleton,
    routing: tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None],
    embeddings: np.ndarray | None,
    tags: list[dict[str, Any]],
    prefix: str,
    first: int = 0,
) -> list[Request]:
    """Requests of a skeleton's rows; request i is named ``prefix + str(first + i)``."""
    ids, weights, probs, look = routing
    reqs = []
    off = sk.offsets.tolist()
    for i in range(len(sk.prompt_len)):
        sl = slice(off[i], off[i + 1])
        reqs.append(
            Request(
                request_id=f"{prefix}{first + i}",
                arrival_s=float(sk.arrival_s[i]),
                prompt_len=int(sk.prompt_len[i]),
                output_len=int(sk.output_len[i]),
                routing=Routing(
                    topk_ids=ids[sl],
                    topk_weights=weights[sl],
                    gate_probs=None if probs is None else probs[sl],
                    embeddings=None if embeddings is None else embeddings[sl],
                    lookahead=None if look is None else look[sl],
                ),
                tags=tags[i],
            )
        )
    return reqs


def chunk_bounds(counts: np.ndarray, max_tokens: int) -> list[tuple[int, int]]:
    """Consecutive request ranges [a, b) of at most ``max_tokens`` rows (at least one request)."""
    bounds, a, acc = [], 0, 0
    for i, c in enumerate(counts.tolist()):
        if i > a and acc + c > max_tokens:
            bounds.append((a, i))
            a, acc = i, 0
        acc += c
    if len(counts):
        bounds.append((a, len(counts)))
    return bounds


def chunk_tokens(spec: ModelSpec, with_probs: bool, with_lookahead: bool, budget: int) -> int:
    """Token rows per generation chunk so its float32 working arrays stay near ``budget``."""
    L, J = spec.num_moe_layers, spec.num_experts
    per = 4 * J * 6 + 4 * L * J * (int(with_probs) + 2 * int(with_lookahead))
    return max(1, budget // per)


def _sub_skeleton(sk: _Skeleton, a: int, b: int) -> _Skeleton:
    return _skeleton(sk.prompt_len[a:b], sk.output_len[a:b], sk.arrival_s[a:b])


def chunk_rng(rng: np.random.Generator, seed: list[int], index: int) -> np.random.Generator:
    """The first chunk continues ``rng`` (so one chunk draws exactly what the whole-workload
    generator draws); chunk c > 0 draws from its own stream ``seed + [c]``."""
    return rng if index == 0 else np.random.default_rng([*seed, index])


def _unit(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    v = rng.standard_normal(shape)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)
