"""Trace format version 1 (still read): exact round trips, clear errors for bad files, atomic
writes. Format version 2 has its own tests (test_traces_v2.py, test_traces_corrupt.py)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import save_file

import traces.io as tio
from specs.errors import InputError
from tests.strategies import random_workload, small_spec, workloads
from traces.io import load_workload, save_workload
from traces.io_v1 import save_v1
from traces.types import Workload


def assert_same(a: Workload, b: Workload) -> None:
    """Every stored field equal: scalars, strings, tags, and arrays by value at stored dtype."""
    assert a.spec == b.spec
    assert a.provenance == b.provenance
    assert len(a.requests) == len(b.requests)
    for x, y in zip(a.requests, b.requests, strict=True):
        assert (x.request_id, x.arrival_s, x.prompt_len, x.output_len) == (
            y.request_id,
            y.arrival_s,
            y.prompt_len,
            y.output_len,
        )
        assert x.prompt_text == y.prompt_text
        assert x.tags == y.tags
        assert y.routing.topk_ids.dtype == np.int16 and y.routing.topk_weights.dtype == np.float32
        np.testing.assert_array_equal(x.routing.topk_ids, y.routing.topk_ids)
        np.testing.assert_array_equal(x.routing.topk_weights, y.routing.topk_weights)
        for name in ("gate_probs", "embeddings", "lookahead"):
            u, v = getattr(x.routing, name), getattr(y.routing, name)
            assert (u is None) == (v is None), name
            if u is not None:
                assert v.dtype in (np.float16, np.float32)
                np.testing.assert_array_equal(u, v)
        assert (x.prompt_embedding is None) == (y.prompt_embedding is None)
        if x.prompt_embedding is not None:
            np.testing.assert_array_equal(x.prompt_embedding, y.prompt_embedding)


@st.composite
def rich_workloads(draw: st.DrawFn) -> Workload:
    """Random workloads with texts, tags, arrivals, float16 parts and partly-present fields."""
    w = draw(workloads())
    texts = st.one_of(st.none(), st.text(max_size=30))
    tag = st.dictionaries(
        st.text(min_size=1, max_size=5),
        st.one_of(st.integers(-5, 5), st.text(max_size=5), st.booleans()),
        max_size=2,
    )
    for r in w.requests:
        r.prompt_text = draw(texts)
        r.tags = draw(tag)
        r.arrival_s = draw(st.floats(0, 1e6, allow_nan=False))
        if draw(st.booleans()):
            r.prompt_embedding = np.arange(3, dtype=np.float32) * draw(st.floats(-2, 2, width=32))
        if r.routing.gate_probs is not None and draw(st.booleans()):
            r.routing.gate_probs = r.routing.gate_probs.astype(np.float16)
        if draw(st.booleans()):  # some requests lack a field the others have
            r.routing.lookahead = None
    w.requests.sort(key=lambda r: r.arrival_s)  # unsorted ones are sorted on load (a note)
    w.provenance = {"source": "hypothesis", "n": len(w.requests)}
    return w


@settings(max_examples=25, deadline=None)
@given(rich_workloads())
def test_random_workloads_round_trip_exactly(w: Workload) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "w.trace"
        save_v1(w, path)
        back = load_workload(path)
        assert_same(w, back)
        assert sorted(p.name for p in Path(tmp).iterdir()) == ["w.trace"]  # no temp files left


def test_empty_workload_round_trips(tmp_path: Path) -> None:
    w = Workload(small_spec(), [], {"source": "empty"})
    save_v1(w, tmp_path / "e.trace")
    back = load_workload(tmp_path / "e.trace")
    assert back.requests == [] and back.spec == w.spec


def test_float64_is_narrowed_to_float32(tmp_path: Path) -> None:
    w = random_workload(small_spec(), num_requests=2, seed=3)
    for r in w.requests:
        r.routing.gate_probs = r.routing.gate_probs.astype(np.float64) + 1e-12
    save_v1(w, tmp_path / "w.trace")
    back = load_workload(tmp_path / "w.trace")
    for x, y in zip(w.requests, back.requests, strict=True):
        assert y.routing.gate_probs.dtype == np.float32
        np.testing.assert_array_equal(x.routing.gate_probs.astype(np.float32), y.routing.gate_probs)


def test_loaded_requests_are_views_of_flat_arrays(tmp_path: Path) -> None:
    save_v1(random_workload(small_spec(), num_requests=3, seed=1), tmp_path / "w.trace")
    back = load_workload(tmp_path / "w.trace")
    base = back.requests[0].routing.topk_ids.base
    assert base is not None
    assert all(r.routing.topk_ids.base is base for r in back.requests)


def test_spec_mismatch_on_load_is_named(tmp_path: Path) -> None:
    save_v1(random_workload(small_spec(top_k=2), seed=1), tmp_path / "w.trace")
    with pytest.raises(InputError, match=r"w\.trace.*top_k is 2.*has 3"):
        load_workload(tmp_path / "w.trace", small_spec(top_k=3))
    same = small_spec(top_k=2).model_copy(update={"name": "other-name"})
    assert load_workload(tmp_path / "w.trace", same).spec.name == "other-name"


# -- bad files ------------------------------------------------------------------------------
def _raw(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    with safe_open(str(path), framework="numpy") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        meta = json.loads(fh.metadata()[tio.META_KEY])
    return tensors, meta


def _rewrite(path: Path, tensors: dict[str, np.ndarray], meta: dict) -> None:
    save_file(
        {k: np.ascontiguousarray(v) for k, v in tensors.items()},
        str(path),
        metadata={tio.META_KEY: json.dumps(meta)},
    )


@pytest.fixture
def good(tmp_path: Path) -> Path:
    path = tmp_path / "good.trace"
    save_v1(random_workload(small_spec(layers=3, experts=6, top_k=2), num_requests=4, seed=7), path)
    return path


def test_truncated_file(good: Path) -> None:
    data = good.read_bytes()
    good.write_bytes(data[: len(data) - 100])
    with pytest.raises(
        InputError, match=r"good\.trace: not a readable trace file, truncated or corrupt"
    ):
        load_workload(good)


def test_not_a_trace_file(tmp_path: Path) -> None:
    p = tmp_path / "x.json"
    p.write_text('{"selections": []}')
    with pytest.raises(InputError, match=r"x\.json: not an fmoe trace file.*fmoe trace import"):
        load_workload(p)
    q = tmp_path / "plain.safetensors"
    save_file({"a": np.zeros(3)}, str(q))
    with pytest.raises(InputError, match=r"plain\.safetensors: not an fmoe trace file") as err:
        load_workload(q)
    assert "trace import" not in str(err.value)  # the JSON hint only for JSON
    with pytest.raises(InputError, match="no such file"):
        load_workload(tmp_path / "missing.trace")


def test_unknown_schema_version(good: Path) -> None:
    t, meta = _raw(good)
    meta["schema_version"] = 99
    _rewrite(good, t, meta)
    with pytest.raises(
        InputError, match=r"good\.trace: field schema_version: unknown schema version 99"
    ):
        load_workload(good)


def test_wrong_k(good: Path) -> None:
    t, meta = _raw(good)
    t["topk_ids"] = t["topk_ids"][..., :1]
    t["topk_weights"] = t["topk_weights"][..., :1]
    _rewrite(good, t, meta)
    with pytest.raises(
        InputError, match=r"good\.trace: field topk_ids: has top_k 1, the model .* has top_k 2"
    ):
        load_workload(good)


def test_expert_id_out_of_range_names_row_and_request(good: Path) -> None:
    t, meta = _raw(good)
    ids = t["topk_ids"].copy()
    row = int(t["offsets"][2]) + 1  # request 2, token 1
    ids[row, 1, 0] = 6  # J = 6
    ids[row, 1, 1] = 0 if ids[row, 1, 1] != 0 else 1
    t["topk_ids"] = ids
    _rewrite(good, t, meta)
    rid = meta["request_ids"][2]
    with pytest.raises(
        InputError,
        match=rf"field topk_ids: row {row} \(request '{rid}' token 1\) layer 1 holds expert 6, not in \[0, 6\)",
    ):
        load_workload(good)


def test_repeated_expert_in_row(good: Path) -> None:
    t, meta = _raw(good)
    ids = t["topk_ids"].copy()
    ids[0, 2, 1] = ids[0, 2, 0]
    t["topk_ids"] = ids
    _rewrite(good, t, meta)
    with pytest.raises(InputError, match=r"field topk_ids: row 0 .* layer 2 repeats expert"):
        load_workload(good)


def test_ragged_rows(good: Path) -> None:
    t, meta = _raw(good)
    t["prompt_len"] = t["prompt_len"].copy()
    t["prompt_len"][1] += 1  # lengths no longer match request 1's rows
    _rewrite(good, t, meta)
    with pytest.raises(
        InputError,
        match=r"field offsets: row 1 \(request 'r1'\): has \d+ token rows, expected prompt_len \+ output_len - 1 = \d+ \(ragged rows\)",
    ):
        load_workload(good)


def test_offsets_not_matching_rows(good: Path) -> None:
    t, meta = _raw(good)
    t["topk_ids"], t["topk_weights"] = t["topk_ids"][:-1], t["topk_weights"][:-1]
    for k in ("gate_probs", "embeddings"):
        t.pop(k, None)
    _rewrite(good, t, meta)
    with pytest.raises(InputError, match=r"field offsets: must run from 0 to the \d+ token rows"):
        load_workload(good)


def test_optional_field_with_wrong_row_count(good: Path) -> None:
    t, meta = _raw(good)
    t["gate_probs"] = t["gate_probs"][:-2]
    _rewrite(good, t, meta)
    with pytest.raises(
        InputError, match=r"field gate_probs: has \d+ rows, but the requests holding it need"
    ):
        load_workload(good)


def test_non_finite_probability_names_row(good: Path) -> None:
    t, meta = _raw(good)
    g = t["gate_probs"].copy()
    g[5, 0, 0] = np.nan
    t["gate_probs"] = g
    _rewrite(good, t, meta)
    with pytest.raises(
        InputError,
        match=r"field gate_probs: row 5 \(request .* token \d+\) holds a non-finite value",
    ):
        load_workload(good)


# -- atomic writes --------------------------------------------------------------------------
def test_failed_write_leaves_nothing_and_keeps_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "w.trace"
    save_v1(random_workload(small_spec(), num_requests=1, seed=1), path)
    before = path.read_bytes()

    def half_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    import safetensors.numpy

    monkeypatch.setattr(safetensors.numpy, "save_file", half_write)
    with pytest.raises(OSError, match="disk full"):
        save_v1(random_workload(small_spec(), num_requests=3, seed=2), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["w.trace"]
    with pytest.raises(OSError):
        save_v1(random_workload(small_spec(), num_requests=3, seed=2), tmp_path / "new.trace")
    assert not (tmp_path / "new.trace").exists()


def test_invalid_workload_is_not_written(tmp_path: Path) -> None:
    w = random_workload(small_spec(experts=6), num_requests=2, seed=1)
    w.requests[1].routing.topk_ids[0, 0, 0] = 9
    with pytest.raises(InputError, match=r"request 'r1': topk_ids row 0 layer 0 holds expert 9"):
        save_workload(w, tmp_path / "bad.trace")
    assert list(tmp_path.iterdir()) == []


def test_unserializable_tags_are_refused(tmp_path: Path) -> None:
    w = random_workload(small_spec(), num_requests=1, seed=1)
    w.requests[0].tags = {"x": object()}
    with pytest.raises(InputError, match=r"request 'r0': tags is not JSON-serializable"):
        save_workload(w, tmp_path / "w.trace")
    assert list(tmp_path.iterdir()) == []
