"""Choosing each request's next token from its logits row: greedy or sampled.

``temperature == 0`` is greedy (argmax, the first index on a tie, as the executor's own
greedy step); otherwise softmax(logits / temperature) (in float64, the largest logit
shifted to 0, so any temperature > 0 gives a distribution) restricted to the smallest set of
most likely tokens whose probability reaches ``top_p``, drawn with the request's own
``torch.Generator`` (seeded by the request's ``seed``, else at random), on the CPU so a
seed draws the same on every device.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """One request's decoding settings (validated by realrun.serve.schemas)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generator(self) -> torch.Generator | None:
        """The request's random stream (None when greedy)."""
        if self.greedy:
            return None
        g = torch.Generator(device="cpu")
        g.manual_seed(self.seed if self.seed is not None else secrets.randbits(63))
        return g


def sample_row(row: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> int:
    """One token drawn from logits ``row`` [V] under temperature and top-p."""
    x = row.detach().double().cpu()
    # shifted so the largest logit is 0: a tiny temperature gives -inf elsewhere, not NaN
    probs = torch.softmax((x - x.max()) / params.temperature, dim=-1)
    if not bool(torch.isfinite(probs).all()):
        return int(x.argmax())
    if params.top_p < 1.0:
        p, idx = probs.sort(descending=True)
        keep = (p.cumsum(0) - p) < params.top_p  # tokens before the cut reach < top_p
        keep[0] = True
        probs = torch.zeros_like(probs).index_put_((idx[keep],), p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


def next_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    gens: Sequence[torch.Generator | None],
) -> list[int]:
    """Row i's next token under ``params[i]`` (``gens[i]`` its generator); logits [n, V]."""
    greedy = logits.argmax(dim=-1).tolist()
    return [
        greedy[i] if p.greedy or g is None else sample_row(logits[i], p, g)
        for i, (p, g) in enumerate(zip(params, gens, strict=True))
    ]
