"""specs.jitcache.stamp_dependencies: the callees' sources join a kernel's disk-cache
stamp (so a changed callee recompiles it); anything that is not a cached kernel is left
alone."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

from specs import costs, errors
from specs.jitcache import stamp_dependencies


def _kernel(stamp: object) -> SimpleNamespace:
    """The attributes of a numba dispatcher that the helper reads (_cache._cache_file)."""
    return SimpleNamespace(_cache=SimpleNamespace(_cache_file=SimpleNamespace(_source_stamp=stamp)))


def test_callees_sources_join_the_stamp_and_other_objects_are_skipped() -> None:
    k1, k2 = _kernel(("mtime", 10)), _kernel(("mtime", 11))
    plain = SimpleNamespace(x=1)
    stamp_dependencies([k1, plain, 3, k2], (costs, errors))
    h = hashlib.sha256()
    for mod in (costs, errors):
        with open(mod.__file__, "rb") as f:
            h.update(f.read())
    assert k1._cache._cache_file._source_stamp == (("mtime", 10), h.hexdigest())
    assert k2._cache._cache_file._source_stamp == (("mtime", 11), h.hexdigest())
    assert plain == SimpleNamespace(x=1)
    # another callee set gives another stamp: a changed callee changes the stamp
    k3 = _kernel(("mtime", 10))
    stamp_dependencies([k3], (costs,))
    assert k3._cache._cache_file._source_stamp != k1._cache._cache_file._source_stamp
