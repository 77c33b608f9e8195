"""Importers on the real fixtures (tests/fixtures/README.md) and on their damaged copies."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from specs.errors import InputError
from traces.importers import IMPORTERS, import_trace
from traces.io import load_workload, save_workload

FIX = Path(__file__).parent / "fixtures"
SWITCH = FIX / "switch_base_8_router_trace.json"
VLLM = FIX / "vllm_qwen1.5_moe_routes_excerpt.jsonl"


@pytest.fixture(scope="module")
def switch_raw() -> dict:
    return json.loads(SWITCH.read_text())


@pytest.fixture(scope="module")
def switch_meta() -> dict:
    return json.loads((FIX / "switch_base_8_capture_metadata.json").read_text())


def test_registry_lists_both_formats() -> None:
    assert {"switch-json", "routing-jsonl"} <= set(IMPORTERS)
    with pytest.raises(InputError, match="unknown trace format 'nope'"):
        import_trace("nope", SWITCH)


# -- switch-json ------------------------------------------------------------------------------
def test_switch_json_real_trace(switch_raw: dict, switch_meta: dict, tmp_path: Path) -> None:
    w = import_trace("switch-json", SWITCH)
    assert w.spec.name == "switch-base-8"
    assert (w.spec.num_moe_layers, w.spec.num_experts, w.spec.top_k) == (6, 8, 1)
    spans = switch_meta["prompt_spans"]
    assert [r.request_id for r in w.requests] == [s["id"] for s in spans]
    assert [r.prompt_len for r in w.requests] == [s["non_padding_tokens"] for s in spans]
    assert all(r.output_len == 1 for r in w.requests)
    assert w.num_tokens == switch_raw["tokens"] == 215
    flat = np.concatenate([r.routing.topk_ids for r in w.requests])
    np.testing.assert_array_equal(flat, np.asarray(switch_raw["selections"]))
    manifest = {
        p["id"]: p["text"]
        for p in json.loads((FIX / "switch_base_8_prompt_manifest.json").read_text())["prompts"]
    }
    assert all(r.prompt_text == manifest[r.request_id] for r in w.requests)
    assert w.requests[3].tags == {"topic": "electronics"}
    prov = w.provenance
    assert prov["model"] == "google/switch-base-8"
    assert prov["model_revision"] == switch_raw["source"]["model"]["revision"]
    assert prov["software"]["transformersVersion"] == "4.57.1"
    assert prov["trace_sha256_verified"] is True
    save_workload(w, tmp_path / "s.trace")
    back = load_workload(tmp_path / "s.trace")
    assert back.provenance == prov and back.num_tokens == 215


def test_switch_json_without_metadata_is_one_request(tmp_path: Path) -> None:
    lone = tmp_path / "trace.json"
    shutil.copy(SWITCH, lone)
    w = import_trace("switch-json", lone)
    assert [(r.request_id, r.prompt_len, r.output_len) for r in w.requests] == [("trace", 215, 1)]
    assert w.requests[0].prompt_text is None


def _damaged(tmp_path: Path, raw: dict, edit) -> Path:
    raw = json.loads(json.dumps(raw))
    edit(raw)
    p = tmp_path / "damaged.json"
    p.write_text(json.dumps(raw))
    return p


def test_switch_json_ragged_row(tmp_path: Path, switch_raw: dict) -> None:
    p = _damaged(tmp_path, switch_raw, lambda r: r["selections"][5].pop())
    with pytest.raises(
        InputError,
        match=r"damaged\.json: field selections row 5: has 5 layers, expected 6 \(ragged rows\)",
    ):
        import_trace("switch-json", p)


def test_switch_json_expert_out_of_range(tmp_path: Path, switch_raw: dict) -> None:
    def edit(r):
        r["selections"][7][2] = [8]

    p = _damaged(tmp_path, switch_raw, edit)
    with pytest.raises(
        InputError, match=r"field selections row 7 layer 2: expert 8 not in \[0, 8\)"
    ):
        import_trace("switch-json", p)


def test_switch_json_wrong_k(tmp_path: Path, switch_raw: dict) -> None:
    def edit(r):
        r["topK"] = 2

    p = _damaged(tmp_path, switch_raw, edit)
    with pytest.raises(InputError, match=r"field topK is 2 but model 'switch-base-8' has 1"):
        import_trace("switch-json", p)


def test_switch_json_spans_must_cover_trace(
    tmp_path: Path, switch_raw: dict, switch_meta: dict
) -> None:
    meta = json.loads(json.dumps(switch_meta))
    meta["prompt_spans"] = meta["prompt_spans"][:-1]
    mp = tmp_path / "m.json"
    mp.write_text(json.dumps(meta))
    with pytest.raises(
        InputError, match=r"m\.json: field prompt_spans covers 192 tokens but .* has 215"
    ):
        import_trace("switch-json", SWITCH, metadata=mp)


def test_switch_json_truncated_file(tmp_path: Path) -> None:
    p = tmp_path / "cut.json"
    p.write_bytes(SWITCH.read_bytes()[:5000])
    with pytest.raises(InputError, match=r"cut\.json: not valid JSON"):
        import_trace("switch-json", p)


# -- routing-jsonl: the real vLLM log ------------------------------------------------------------
def test_routing_jsonl_real_vllm_log() -> None:
    w = import_trace("routing-jsonl", VLLM)
    assert w.spec.num_moe_layers == 1 and w.spec.num_experts == 60 and w.spec.top_k == 4
    assert w.spec.name == "qwen1.5-moe-a2.7b[moe layers 0]"
    assert w.provenance["model"] == "Qwen/Qwen1.5-MoE-A2.7B-Chat"
    assert w.provenance["software"]["vllm_version"].startswith("0.1.dev12210")
    assert w.provenance["layers_logged"] == [0]
    [r] = w.requests
    assert (r.request_id, r.prompt_len, r.output_len) == ("r0", 1, 111)
    lines = [json.loads(x) for x in VLLM.read_text().splitlines()[1:]]
    np.testing.assert_array_equal(r.routing.topk_ids[:, 0], [x["topk_ids"] for x in lines])
    np.testing.assert_allclose(
        r.routing.topk_weights[:, 0], [x["topk_weights"] for x in lines], rtol=1e-6
    )
    assert w.provenance["import_report"] == {
        "lines_read": 111, "rows_missing": 0, "tokens_dropped": 0, "token_index_gaps": 0,
        "truncated_last_line": 0, "rows_skipped_other_type": 0, "requests_dropped": 0,
    }  # fmt: skip


def test_routing_jsonl_prompt_len_option() -> None:
    w = import_trace("routing-jsonl", VLLM, prompt_len=11)
    assert (w.requests[0].prompt_len, w.requests[0].output_len) == (11, 101)


# -- routing-jsonl: the real switch routing written as a log with other spellings ----------------
def _switch_as_jsonl(raw: dict, meta: dict, names: dict[str, str]) -> list[dict]:
    rows = []
    for span_i, s in enumerate(meta["prompt_spans"]):
        for t in range(s["token_start"], s["token_end_exclusive"]):
            for layer, ex in enumerate(raw["selections"][t]):
                rows.append(
                    {
                        names["request"]: span_i,
                        names["layer"]: layer,
                        names["token"]: t - s["token_start"],
                        names["ids"]: ex,
                        names["weights"]: [1.0],
                    }
                )
    return rows


def _write_jsonl(path: Path, rows: list[dict], tail: str = "") -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return path


ALIASES = {
    "request": "problem_id",
    "layer": "layer",
    "token": "token_pos",
    "ids": "experts",
    "weights": "gating_probs",
}


def test_routing_jsonl_aliases_match_switch_import(
    tmp_path: Path, switch_raw: dict, switch_meta: dict
) -> None:
    rows = _switch_as_jsonl(switch_raw, switch_meta, ALIASES)
    random.Random(0).shuffle(rows)  # order of lines does not matter
    w = import_trace(
        "routing-jsonl", _write_jsonl(tmp_path / "log.jsonl", rows), model="switch-base-8"
    )
    ref = import_trace("switch-json", SWITCH)
    assert [r.routing.num_tokens for r in w.requests] == [
        r.routing.num_tokens for r in ref.requests
    ]
    for a, b in zip(w.requests, ref.requests, strict=True):
        np.testing.assert_array_equal(a.routing.topk_ids, b.routing.topk_ids)
    assert w.provenance["import_report"]["rows_missing"] == 0


def test_routing_jsonl_missing_rows_are_reported_not_invented(
    tmp_path: Path, switch_raw: dict, switch_meta: dict
) -> None:
    rows = _switch_as_jsonl(switch_raw, switch_meta, ALIASES)
    # drop layer 3 of request 0 token 4, and all layers of request 1 token 2
    keep = [
        r for r in rows if not (r["problem_id"] == 0 and r["token_pos"] == 4 and r["layer"] == 3)
    ]
    keep = [r for r in keep if not (r["problem_id"] == 1 and r["token_pos"] == 2)]
    truncated_tail = '{"problem_id": 9, "layer": 0, "tok'
    w = import_trace(
        "routing-jsonl",
        _write_jsonl(tmp_path / "log.jsonl", keep, truncated_tail),
        model="switch-base-8",
    )
    rep = w.provenance["import_report"]
    assert rep["rows_missing"] == 1 and rep["tokens_dropped"] == 1
    assert rep["token_index_gaps"] == 2  # request 0 token 4, request 1 token 2
    assert rep["truncated_last_line"] == 1
    ref = import_trace("switch-json", SWITCH)
    a0, r0 = w.requests[0].routing.topk_ids, ref.requests[0].routing.topk_ids
    np.testing.assert_array_equal(a0, np.delete(r0, 4, axis=0))
    a1, r1 = w.requests[1].routing.topk_ids, ref.requests[1].routing.topk_ids
    np.testing.assert_array_equal(a1, np.delete(r1, 2, axis=0))
    assert w.num_tokens == 215 - 2


def test_routing_jsonl_explicit_field_names(
    tmp_path: Path, switch_raw: dict, switch_meta: dict
) -> None:
    names = {"request": "conv", "layer": "blk", "token": "step", "ids": "sel", "weights": "gate_w"}
    rows = _switch_as_jsonl(switch_raw, switch_meta, names)
    p = _write_jsonl(tmp_path / "log.jsonl", rows)
    with pytest.raises(InputError, match=r"line 1: no request field \(looked for req_id"):
        import_trace("routing-jsonl", p, model="switch-base-8")
    w = import_trace("routing-jsonl", p, model="switch-base-8", fields=names)
    assert w.num_tokens == 215 and len(w.requests) == 10


def _small_log(tmp_path: Path, lines: list[str]) -> Path:
    p = tmp_path / "small.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def _row(req=0, layer=0, tok=0, ids=(1,), w=(1.0,)) -> str:
    return json.dumps(
        {
            "req_id": req,
            "layer": layer,
            "token_idx": tok,
            "topk_ids": list(ids),
            "topk_weights": list(w),
        }
    )


@pytest.mark.parametrize(
    ("lines", "pattern"),
    [
        ([_row(), _row(tok=1, ids=(9,))], r"small\.jsonl: line 2: expert id 9 not in \[0, 8\)"),
        (
            [_row(), _row(tok=1, ids=(1, 2), w=(0.5, 0.5))],
            r"line 2: 2 expert ids, but earlier rows have top_k 1",
        ),
        (
            [_row(ids=(1, 2), w=(0.5, 0.5))],
            r"rows hold top_k 2 expert ids but model 'switch-base-8' has top_k 1",
        ),
        ([_row(), _row()], r"line 2: duplicate row for request '0' layer 0 token 0"),
        ([_row(), "{not json", _row(tok=1)], r"line 2: not valid JSON"),
        ([_row(w=(0.5, 0.5))], r"line 1: weights have 2 entries for 1 expert ids"),
        ([_row(layer=7)], r"layer\(s\) \[7\] outside the model's MoE layers \[0, 6\)"),
    ],
)
def test_routing_jsonl_bad_rows_name_the_line(
    tmp_path: Path, lines: list[str], pattern: str
) -> None:
    with pytest.raises(InputError, match=pattern):
        import_trace("routing-jsonl", _small_log(tmp_path, lines), model="switch-base-8")


def test_routing_jsonl_needs_a_model_when_unnamed(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"does not name a known model; pass model="):
        import_trace("routing-jsonl", _small_log(tmp_path, [_row()]))


def test_routing_jsonl_all_rows_incomplete(tmp_path: Path) -> None:
    p = _small_log(tmp_path, [_row(layer=0), _row(layer=1, tok=1)])
    with pytest.raises(
        InputError, match=r"no request has a complete token row \(2 layer rows missing\)"
    ):
        import_trace("routing-jsonl", p, model="switch-base-8", layers=[0, 1])
