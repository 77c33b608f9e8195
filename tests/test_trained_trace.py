"""The shipped decode trace of the tiny MoE trained here (tests/fixtures), and the
training script that made it (three steps of its model, then a capture)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
# the shipped traces and their training records: Mixtral-shaped, Qwen1.5-MoE-shaped
SHIPPED = [
    (FIXTURES / "tiny_byte_moe_decode.trace", FIXTURES / "tiny_byte_moe_training.json"),
    (FIXTURES / "tiny_byte_qwen_moe_decode.trace", FIXTURES / "tiny_byte_qwen_moe_training.json"),
]
TRACE = SHIPPED[0][0]
sys.path.insert(0, str(ROOT))


@pytest.mark.parametrize(("trace", "training"), SHIPPED, ids=["mixtral", "qwen2-moe"])
def test_shipped_trace_loads_with_its_training_record(trace: Path, training: Path) -> None:
    from traces.io import file_version, load_workload

    assert file_version(trace) == 2
    w = load_workload(trace)  # checks every chunk's CRC and every value first
    summary = json.loads(training.read_text())
    spec = w.spec
    shape = summary["shape"]
    assert (spec.num_moe_layers, spec.num_experts, spec.top_k) == (
        shape["num_hidden_layers"],
        shape.get("num_local_experts", shape.get("num_experts")),
        shape["num_experts_per_tok"],
    )
    prov = w.provenance["training"]
    assert prov["heldout_bpb_end"] == summary["heldout_bpb_end"]
    assert summary["heldout_bpb_end"] < summary["heldout_bpb_start"]  # it learned
    max_new = w.provenance["max_new_tokens"]
    ids = set()
    for r in w.requests:
        ids.add(r.request_id.split("-")[0])
        assert r.output_len == max_new  # fixed-length greedy decode, no EOS stop
        rt = r.routing
        n = r.prompt_len + r.output_len - 1
        assert rt.topk_ids.shape == (n, spec.num_moe_layers, spec.top_k)
        assert rt.gate_probs is not None and rt.lookahead is not None
        assert rt.embeddings is not None and rt.embeddings.shape == (n, spec.hidden_size)
        # a token's K experts at a layer are distinct
        s = np.sort(rt.topk_ids, axis=2)
        assert (s[:, :, 1:] != s[:, :, :-1]).all()
    assert ids == {"mt", "gsm8k"}  # held-out MT-Bench and GSM8K prompts


@pytest.mark.parametrize("trace", [t for t, _ in SHIPPED], ids=["mixtral", "qwen2-moe"])
def test_shipped_trace_simulates_with_lru_under_the_min_bound(trace: Path) -> None:
    from sim.config import SimConfig
    from sim.run import simulate
    from specs.presets import load_hardware
    from traces.io import load_workload

    w = load_workload(trace)
    cache = w.spec.num_moe_layers * w.spec.num_experts // 4
    for policy in ("lru", "fmoe"):
        cfg = SimConfig(
            model=w.spec,
            hardware=load_hardware("a100-80gb-pcie4"),
            policy=policy,
            cache_experts=cache,
            train_fraction=0.7,
        )
        m = simulate(w, cfg).metrics
        assert 0.0 <= m["hit_rate_routed"] <= 1.0 and m["tpot_mean_s"] > 0
        if policy == "lru":  # demand-only paging: MIN on the same demands is optimal
            assert 0.0 < m["hit_rate_routed"] <= m["bound_hit_belady"] + 1e-12


def _tiny_shapes() -> dict[str, object]:
    from experiments import train_tiny_moe as t

    small = dict(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    return {
        "mixtral": t.TinyMoEShape(intermediate_size=16, num_local_experts=4, **small),
        "qwen2-moe": t.TinyQwenMoEShape(
            moe_intermediate_size=8,
            shared_expert_intermediate_size=16,
            num_experts=6,
            num_experts_per_tok=3,
            **small,
        ),
    }


@pytest.mark.parametrize(
    ("name", "experts", "top_k", "arch"),
    [("mixtral", 4, 2, "MixtralForCausalLM"), ("qwen2-moe", 6, 3, "Qwen2MoeForCausalLM")],
)
def test_three_training_steps_then_capture(
    tmp_path: Path, name: str, experts: int, top_k: int, arch: str
) -> None:
    import torch

    from experiments import train_tiny_moe as t
    from traces.io import load_workload

    shape = _tiny_shapes()[name]
    cfg = t.TrainConfig(steps=3, batch=2, seq_len=16, warmup=1, sharegpt=0, log_every=1)
    before = {k: v.clone() for k, v in t.build_model(shape, cfg.seed).state_dict().items()}
    model, summary = t.train(cfg, shape, log=lambda _msg: None)
    assert type(model).__name__ == arch
    assert [p["step"] for p in summary["curve"]] == [1, 2, 3]
    assert all(np.isfinite(p["train_bpb"]) and p["aux_loss"] > 0 for p in summary["curve"])
    assert summary["corpus_bytes"]["gsm8k"] > 0 and summary["corpus_bytes"]["sharegpt"] == 0
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    ckpt = tmp_path / "ckpt"
    t.save_checkpoint(model, summary, ckpt)
    assert (ckpt / "model.safetensors").is_file() and not list(ckpt.glob("*.bin"))
    out = tmp_path / "cap.trace"
    t.capture_trace(ckpt, str(out), mt_bench=2, gsm8k=1, max_prompt_tokens=8, max_new_tokens=3)
    w = load_workload(out)
    assert [r.request_id for r in w.requests] == ["mt-bench-81", "mt-bench-82", "gsm8k-0"]
    assert all(r.prompt_len == 8 and r.output_len == 3 for r in w.requests)
    assert (w.spec.num_experts, w.spec.top_k) == (experts, top_k)
    assert w.provenance["training"]["steps_done"] == 3
    assert shape.what in w.provenance["training"]["what"]


def test_capture_refuses_prompts_that_were_trained_on(tmp_path: Path) -> None:
    from experiments import train_tiny_moe as t

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "training.json").write_text(json.dumps({"train": {"holdout_gsm8k": 5}}))
    with pytest.raises(SystemExit, match="held out"):
        t.capture_trace(ckpt, str(tmp_path / "x.trace"), mt_bench=2, gsm8k=6)


def _capture_tiny(tmp_path: Path, name: str, temperature: float):
    from realrun.capture import CaptureConfig, capture

    cfg = CaptureConfig(
        model="tiny-mixtral",
        out=str(tmp_path / f"{name}.trace"),
        prompt_texts=["The capital of France is"],
        num_prompts=1,
        max_new_tokens=6,
        temperature=temperature,
    )
    return capture(cfg, progress=lambda _msg: None).requests[0]


def test_sampled_capture_changes_the_tokens_not_the_prefill(tmp_path: Path) -> None:
    greedy = _capture_tiny(tmp_path, "greedy", 0.0)
    cold = _capture_tiny(tmp_path, "cold", 1e-9)  # noise far below any logit gap
    hot = _capture_tiny(tmp_path, "hot", 1e3)  # noise swamps the logits
    p = greedy.prompt_len
    np.testing.assert_array_equal(cold.routing.topk_ids, greedy.routing.topk_ids)
    np.testing.assert_array_equal(hot.routing.topk_ids[:p], greedy.routing.topk_ids[:p])
    assert not np.array_equal(hot.routing.topk_ids[p:], greedy.routing.topk_ids[p:])


def test_sampling_refuses_a_temperature_that_is_not_positive(tmp_path: Path) -> None:
    from specs.errors import InputError

    with pytest.raises(InputError, match="temperature"):
        _capture_tiny(tmp_path, "bad", -1.0)


def test_trace_dims_prices_the_routing_as_another_models_experts() -> None:
    from experiments.fmoe_vs_baselines import trace_workload
    from specs.errors import InputError
    from specs.presets import load_model

    own = trace_workload(str(TRACE))
    mix = trace_workload(str(TRACE), "mixtral-8x7b")
    ref = load_model("mixtral-8x7b")
    assert mix.spec.num_moe_layers == own.spec.num_moe_layers == 6
    assert mix.spec.expert_bytes == ref.expert_bytes != own.spec.expert_bytes
    np.testing.assert_array_equal(
        mix.requests[0].routing.topk_ids, own.requests[0].routing.topk_ids
    )
    with pytest.raises(InputError, match="experts"):
        trace_workload(str(TRACE), "qwen1.5-moe-a2.7b")  # 60 experts top-4
