"""The project's one error type for bad input.

Every package raises :class:`InputError` (or a subclass) when a user-supplied argument,
file or profile is wrong. The CLI turns it into one line on stderr and exit status 2.
The message must name the problem (and the file, field or row where there is one).
"""

from __future__ import annotations


class InputError(ValueError):
    """A user-facing input problem: bad argument, malformed file, unknown preset."""
