"""How many tokens each request of a real run generates (``--output-lens``).

``fixed``: every request generates ``--max-new-tokens``. ``reference``: each request
generates as many tokens as its prompt's reference answer has (the model's tokenizer, no
special tokens), capped by ``--max-new-tokens`` and at least 1, the way serving
benchmarks replay a dataset's output lengths. Runs never stop at EOS, so without this
every request admitted together also finishes together and continuous batching has
nobody to admit mid-run.

:func:`check_output_lens` runs with the other input checks, before any model work;
:func:`new_token_limits` needs the tokenizer and runs after the model is loaded.
"""

from __future__ import annotations

from collections.abc import Sequence

from realrun.prompting import PromptText
from realrun.tokenizer import Tokenizer
from specs.errors import InputError

OUTPUT_LENS = ("fixed", "reference")


def check_output_lens(name: str, prompts: Sequence[PromptText], explicit: bool) -> str:
    """``name`` if it is known and every prompt can use it, else InputError naming the
    first prompt without a reference (``explicit``: the prompts are ``--prompt`` texts,
    which never have one)."""
    if name not in OUTPUT_LENS:
        raise InputError(f"unknown --output-lens {name!r} (known: {', '.join(OUTPUT_LENS)})")
    if name == "reference":
        for p in prompts:
            if explicit:
                raise InputError(
                    f"--output-lens reference: prompt {p.request_id} is a --prompt text, "
                    "which has no reference answer (use a prompt set, e.g. --prompts gsm8k)"
                )
            if p.reference is None:
                raise InputError(
                    f"--output-lens reference: prompt {p.request_id} has no reference answer"
                )
    return name


def new_token_limits(
    tokenizer: Tokenizer, prompts: Sequence[PromptText], output_lens: str, max_new_tokens: int
) -> list[int]:
    """One limit per prompt, in order: ``max_new_tokens`` each (``fixed``), or each
    reference's token count clamped to [1, ``max_new_tokens``] (``reference``; the
    prompts must have passed :func:`check_output_lens`)."""
    if output_lens == "fixed":
        return [max_new_tokens] * len(prompts)
    counts = [tokenizer.count(p.reference or "") for p in prompts]
    return [max(1, min(max_new_tokens, n)) for n in counts]
