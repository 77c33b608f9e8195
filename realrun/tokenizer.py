"""Tokenizers for the real executor.

Tiny random-weight presets have no trained tokenizer, so prompts are tokenized with a
deterministic byte-level scheme: the UTF-8 bytes of the text, each mapped to
``byte % vocab_size``. It is reproducible everywhere and needs no download; the tokens
mean nothing to a random model anyway. Local checkpoint directories use their own
tokenizer (``AutoTokenizer``) when they ship one, else the byte scheme.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from specs.model_spec import ModelSpec


class Tokenizer(Protocol):
    name: str

    def encode(self, text: str) -> list[int]: ...

    def count(self, text: str) -> int:
        """Tokens of ``text`` without special tokens (an answer's length, not a prompt's)."""
        ...

    def decode(self, ids: list[int]) -> str:
        """The text of generated ``ids`` (special tokens left out; invalid UTF-8 as U+FFFD)."""
        ...

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int] | None:
        """``messages`` ({role, content}) through the tokenizer's chat template, with the
        assistant's turn opened; None when the tokenizer has no chat template."""
        ...


@dataclass(frozen=True)
class ByteTokenizer:
    """token = UTF-8 byte % vocab_size (empty text -> one token 0)."""

    vocab_size: int
    name: str = "bytes-mod-vocab"

    def encode(self, text: str) -> list[int]:
        return [b % self.vocab_size for b in text.encode("utf-8")] or [0]

    def count(self, text: str) -> int:
        """One token per UTF-8 byte (0 for empty text: no placeholder token)."""
        return len(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        """Token t is byte ``t % 256`` (the inverse of :meth:`encode` when vocab >= 256)."""
        return bytes(t % 256 for t in ids).decode("utf-8", errors="replace")

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int] | None:
        """None: bytes have no chat template."""
        return None


@dataclass
class HFTokenizer:
    """A checkpoint's own tokenizer."""

    inner: Any
    name: str = "checkpoint"

    def encode(self, text: str) -> list[int]:
        return list(self.inner.encode(text)) or [0]

    def count(self, text: str) -> int:
        """The checkpoint's tokens of ``text`` without BOS/EOS or other special tokens."""
        return len(self.inner.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return str(self.inner.decode(ids, skip_special_tokens=True))

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int] | None:
        if not getattr(self.inner, "chat_template", None):
            return None
        out = self.inner.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(out, dict) or hasattr(out, "keys"):  # a BatchEncoding in some versions
            out = out["input_ids"]
        return [int(t) for t in out]


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def tokenizer_for(ref: str, spec: ModelSpec, source: str) -> Tokenizer:
    """The checkpoint's tokenizer when it has one, else :class:`ByteTokenizer`."""
    if source == "checkpoint" and any((Path(ref) / f).is_file() for f in _TOKENIZER_FILES):
        from transformers import AutoTokenizer

        return HFTokenizer(AutoTokenizer.from_pretrained(ref))
    return ByteTokenizer(spec.vocab_size)
