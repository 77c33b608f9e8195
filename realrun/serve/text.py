"""A request's answer text, one token at a time: what may be sent, and where it stops.

Tokens are decoded together (a token can be part of a UTF-8 character or of a word that
a tokenizer spells with the next one), so each step decodes every output token and sends
the text past what was sent before, holding back (a) trailing U+FFFD, which may be an
incomplete UTF-8 character, and (b) the longest tail that is a prefix of a stop string.
The first occurrence of a stop string ends the answer just before it. Streamed pieces
add up to exactly the text a non-streamed answer returns.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"


class TextAssembler:
    """Feed the answer's tokens with :meth:`add`; :meth:`flush` gives the rest at the end."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()) -> None:
        self.decode = decode
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.sent = 0  # characters of the text already handed out
        self.stopped = False
        self._text = ""

    def add(self, token: int) -> str:
        """Add a generated token; return the text now safe to send (may be empty). After a
        stop string was found (:attr:`stopped`) nothing more is added."""
        if self.stopped:
            return ""
        self.ids.append(int(token))
        text = self.decode(self.ids)
        cut = self._first_stop(text)
        if cut is not None:
            self.stopped = True
            self._text = text[:cut]
            return self._take(len(self._text))
        self._text = text
        return self._take(len(text) - self._held(text))

    def flush(self) -> str:
        """The text not sent yet (the answer is over)."""
        return self._take(len(self._text))

    @property
    def text(self) -> str:
        """The answer so far (up to the stop string, when one was found)."""
        return self._text

    def _take(self, end: int) -> str:
        if end <= self.sent:
            return ""
        out = self._text[self.sent : end]
        self.sent = end
        return out

    def _first_stop(self, text: str) -> int | None:
        # a stop string can only begin in text that was held back or is new
        start = max(0, self.sent - max((len(s) for s in self.stop), default=0))
        found = [i for s in self.stop if (i := text.find(s, start)) >= 0]
        return min(found) if found else None

    def _held(self, text: str) -> int:
        """Characters at the end of ``text`` not to send yet."""
        n = len(text) - len(text.rstrip(REPLACEMENT))
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    n = max(n, k)
                    break
        return n
