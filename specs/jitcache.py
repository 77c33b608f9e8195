"""numba's disk cache and kernels that call kernels of other modules.

numba keys a cached compiled function on its own source file only (docs/testing.md,
"numba's disk cache"): a kernel that compiles in a jitted function of another module
would load a stale machine-code copy after that module changes. :func:`stamp_dependencies`
adds the other modules' contents to the kernels' cache stamp, so a changed callee
recompiles them. It reads numba internals defensively: a numba without them keeps its
own stamp. numba itself is never imported here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from types import ModuleType


def stamp_dependencies(kernels: Iterable[object], callees: Iterable[ModuleType]) -> None:
    """Join the source files of ``callees`` to the disk-cache stamp of every numba
    dispatcher among ``kernels`` (anything else among them is skipped, so a module can
    pass ``globals().values()``). Call once, at the kernels' module import."""
    h = hashlib.sha256()
    for mod in callees:
        with open(mod.__file__, "rb") as f:  # type: ignore[arg-type]
            h.update(f.read())
    dep = h.hexdigest()
    for obj in list(kernels):
        cache_file = getattr(getattr(obj, "_cache", None), "_cache_file", None)
        if cache_file is not None and hasattr(cache_file, "_source_stamp"):
            cache_file._source_stamp = (cache_file._source_stamp, dep)
