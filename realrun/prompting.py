"""Prompts for real runs: a named set (traces.prompts) or explicit texts, tokenized and cut.

Prompt texts are resolved (and bad names rejected) before any model work; tokenizing
needs the model's tokenizer and happens after. Prompts longer than
``max_prompt_tokens`` keep their first tokens.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from specs.errors import InputError


@dataclass(frozen=True)
class PromptText:
    """A request's prompt text and, when its set has one, the reference answer's text
    (what ``--output-lens reference`` takes the request's output length from)."""

    request_id: str
    text: str
    reference: str | None = None


@dataclass(frozen=True)
class Prompt:
    """One request's prompt token ids (and its text, when it has one): what a run, a
    capture or a batch of :func:`realrun.generate.generate_batch` takes."""

    request_id: str
    ids: list[int]
    text: str | None = None


def prompt_texts(name: str | None, texts: Sequence[str] | None, n: int) -> list[PromptText]:
    """Explicit ``texts`` (ids p0, p1, ...) or the first ``n`` prompts of set ``name``."""
    if n < 1:
        raise InputError(f"--num-prompts must be >= 1, got {n}")
    if texts:
        return [PromptText(f"p{i}", t) for i, t in enumerate(texts[:n])]
    if not name:
        raise InputError("give --prompts NAME or --prompt TEXT")
    from traces.prompts import load_prompts

    return [PromptText(str(p.prompt_id), p.text, p.reference) for p in load_prompts(name, n)]


def check_lengths(config: Any, max_prompt_tokens: int, max_new_tokens: int) -> int:
    """The prompt cut that fits the model's positions; InputError when nothing fits."""
    if max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if max_prompt_tokens < 1:
        raise InputError(f"--max-prompt-tokens must be >= 1, got {max_prompt_tokens}")
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and max_new_tokens >= limit:
        raise InputError(
            f"--max-new-tokens {max_new_tokens} leaves no room for a prompt (the model has {limit} positions)"
        )
    return (
        min(max_prompt_tokens, limit - max_new_tokens) if limit is not None else max_prompt_tokens
    )


def encode(tokenizer: Any, prompts: Sequence[PromptText], max_prompt_tokens: int) -> list[Prompt]:
    return [
        Prompt(p.request_id, tokenizer.encode(p.text)[:max_prompt_tokens], p.text) for p in prompts
    ]


T = TypeVar("T")


def batches(items: Sequence[T], batch_size: int) -> Iterator[list[T]]:
    """Consecutive batches of ``batch_size`` (the last may be smaller): FCFS static batching,
    as the simulator's StaticBatcher admits a closed loop's requests."""
    if batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {batch_size}")
    for i in range(0, len(items), batch_size):
        yield list(items[i : i + batch_size])
