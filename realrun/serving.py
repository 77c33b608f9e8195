"""Serving a list of prompts in a closed loop, by either batching (the simulator's names).

``static``: consecutive batches of ``batch_size`` in prompt order, each run to completion
(:func:`realrun.generate.generate_batch`); ``continuous``: iteration-level admission up to
``batch_size`` running requests (:func:`realrun.continuous.generate_continuous`). Both
tell ``on_admit`` which prompts join, just before the iteration they join (static: the
batch's first), which is when the simulator's closed loop has them arrive.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from realrun.continuous import Admit, generate_continuous
from realrun.generate import (
    Generation,
    IterationObserver,
    NewTokens,
    generate_batch,
    token_limits,
)
from realrun.prompting import Prompt, batches
from specs.errors import InputError

Done = Callable[[Prompt, Generation], None]


def _serve_static(
    model: nn.Module,
    prompts: Sequence[Prompt],
    limits: list[int],
    batch_size: int,
    experts: Sequence[nn.Module],
    observer: IterationObserver | None,
    on_admit: Admit,
    on_done: Done,
    keep_logits: bool,
) -> list[Generation]:
    """Consecutive static batches of ``batch_size``; each request is done with its batch."""
    out: list[Generation] = []
    for idx in batches(range(len(prompts)), batch_size):
        group = [prompts[i] for i in idx]
        on_admit(group)
        gens = generate_batch(
            model,
            group,
            [limits[i] for i in idx],
            experts=experts,
            observer=observer,
            keep_logits=keep_logits,
        )
        for p, g in zip(group, gens, strict=True):
            on_done(p, g)
        out.extend(gens)
    return out


def _serve_continuous(
    model: nn.Module,
    prompts: Sequence[Prompt],
    limits: list[int],
    batch_size: int,
    experts: Sequence[nn.Module],
    observer: IterationObserver | None,
    on_admit: Admit,
    on_done: Done,
    keep_logits: bool,
) -> list[Generation]:
    """One continuous run (no padding, so no experts modules needed); requests are
    reported done after it."""
    gens = generate_continuous(
        model,
        prompts,
        limits,
        batch_size,
        observer=observer,
        on_admit=on_admit,
        keep_logits=keep_logits,
    )
    for p, g in zip(prompts, gens, strict=True):
        on_done(p, g)
    return gens


SERVERS = {"static": _serve_static, "continuous": _serve_continuous}
BATCHING = tuple(SERVERS)


def check_batching(name: str) -> str:
    """``name`` if it is a known batching, else InputError naming the known ones."""
    if name not in SERVERS:
        raise InputError(f"unknown --batching {name!r} (known: {', '.join(BATCHING)})")
    return name


def generate_all(
    model: nn.Module,
    prompts: Sequence[Prompt],
    max_new_tokens: NewTokens,
    batch_size: int,
    batching: str = "static",
    *,
    experts: Sequence[nn.Module] = (),
    observer: IterationObserver | None = None,
    on_admit: Admit | None = None,
    on_done: Done | None = None,
    keep_logits: bool = False,
) -> list[Generation]:
    """Every prompt, greedily, under ``batching``; results in prompt order. ``experts``
    as :func:`generate_batch` wants them (static batches of unequal prompts); ``on_done``
    hears each request after its static batch, or after the continuous run."""
    serve = SERVERS[check_batching(batching)]
    limits = token_limits(prompts, max_new_tokens)
    return serve(
        model,
        prompts,
        limits,
        batch_size,
        experts,
        observer,
        on_admit or _ignore,
        on_done or _ignore,
        keep_logits,
    )


def _ignore(*_: object) -> None:
    """No listener."""
