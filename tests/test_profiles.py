"""ModelSpec / HardwareProfile: validation, presets, JSON round trips."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from specs.costs import expert_time_s, transfer_time_s
from specs.errors import InputError
from specs.hardware import HardwareProfile
from specs.model_spec import ModelSpec
from specs.presets import hardware_preset_names, load_hardware, load_model, model_preset_names

BASE = dict(
    name="m",
    family="test",
    num_layers=4,
    num_experts=8,
    top_k=2,
    hidden_size=64,
    expert_intermediate_size=128,
    vocab_size=100,
    num_attention_heads=4,
    num_kv_heads=2,
    head_dim=16,
)


def test_mixtral_expert_is_352321536_bytes_in_bf16() -> None:
    spec = load_model("mixtral-8x7b")
    assert spec.dtype == "bf16"
    assert spec.expert_bytes == 352_321_536
    assert (spec.num_moe_layers, spec.num_experts, spec.top_k) == (32, 8, 2)


def test_every_preset_cites_sources() -> None:
    for name in model_preset_names():
        assert load_model(name).sources, name
    for name in hardware_preset_names():
        assert load_hardware(name).sources, name


def test_required_presets_exist() -> None:
    models = set(model_preset_names())
    assert {
        "mixtral-8x7b",
        "qwen1.5-moe-a2.7b",
        "phi-3.5-moe",
        "olmoe-1b-7b",
        "qwen3-30b-a3b",
        "deepseek-v2-lite",
        "deepseek-v3",
        "switch-base-8",
        "tiny-mixtral",
        "tiny-qwen2-moe",
        "tiny-phimoe",
        "tiny-olmoe",
        "tiny-deepseek-v3",
    } <= models
    assert {"paper-6x3090", "rtx3090-pcie4", "a100-80gb-pcie4", "h100-pcie5", "cpu-local"} <= set(
        hardware_preset_names()
    )
    assert load_hardware("paper-6x3090").num_gpus == 6


@pytest.mark.parametrize(
    ("name", "moe_layers", "experts", "top_k", "hidden", "expert_inter", "twin"),
    [
        ("kimi-k2", 60, 384, 8, 7168, 2048, "tiny-deepseek-v3"),
        ("qwen3-235b-a22b", 94, 128, 8, 4096, 1536, "tiny-qwen3-moe"),
        ("gpt-oss-120b", 36, 128, 4, 2880, 2880, "tiny-gpt-oss"),
        ("gpt-oss-20b", 24, 32, 4, 2880, 2880, "tiny-gpt-oss"),
        ("glm-4.5-air", 45, 128, 8, 4096, 1408, "tiny-glm4-moe"),
    ],
)
def test_fine_grained_presets_have_their_published_dimensions(
    name: str, moe_layers: int, experts: int, top_k: int, hidden: int, expert_inter: int, twin: str
) -> None:
    """Figures of each model's config.json (cited in the preset), and a tiny CPU twin of the
    same transformers family with a recipe."""
    spec = load_model(name)
    assert (spec.num_moe_layers, spec.num_experts, spec.top_k) == (moe_layers, experts, top_k)
    assert (spec.hidden_size, spec.expert_intermediate_size) == (hidden, expert_inter)
    assert any("config.json" in s for s in spec.sources)
    tiny = load_model(twin)
    assert tiny.family == spec.family and tiny.hf_recipe is not None


def test_tiny_variant_has_experts_of_tens_of_mb() -> None:
    sizes = [load_model(n).expert_bytes for n in model_preset_names() if n.startswith("tiny-")]
    assert any(10e6 <= s <= 100e6 for s in sizes)


def test_tiny_presets_match_their_transformers_config() -> None:
    import transformers

    for name in model_preset_names():
        spec = load_model(name)
        if spec.hf_recipe is None:
            continue
        cfg = getattr(transformers, spec.hf_recipe.config_class)(**spec.hf_recipe.kwargs)
        rebuilt = ModelSpec.from_transformers_config(cfg, name=name, dtype=spec.dtype)
        assert (
            rebuilt.num_moe_layers,
            rebuilt.num_experts,
            rebuilt.top_k,
            rebuilt.expert_bytes,
        ) == (
            spec.num_moe_layers,
            spec.num_experts,
            spec.top_k,
            spec.expert_bytes,
        )


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"top_k": 9}, "top_k"),
        ({"num_experts": -1}, "num_experts"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"expert_bytes": -5}, "expert_bytes"),
        ({"dense_layers": [7]}, "dense_layers"),
    ],
)
def test_model_spec_rejects_bad_values(change: dict, needle: str) -> None:
    with pytest.raises(ValidationError, match=needle):
        ModelSpec(**{**BASE, **change})


def test_hardware_rejects_negative_bandwidth_and_unknown_version() -> None:
    raw = load_hardware("rtx3090-pcie4").model_dump()
    raw["link"]["pinned_bandwidth_Bps"] = -1
    with pytest.raises(ValidationError, match="pinned_bandwidth_Bps"):
        HardwareProfile.model_validate(raw)
    raw = load_hardware("rtx3090-pcie4").model_dump()
    raw["schema_version"] = 99
    with pytest.raises(ValidationError, match="schema_version"):
        HardwareProfile.model_validate(raw)


def test_unknown_preset_names_the_known_ones() -> None:
    with pytest.raises(InputError, match="unknown model preset 'nope'.*mixtral-8x7b"):
        load_model("nope")
    with pytest.raises(InputError, match="unknown hardware preset"):
        load_hardware("nope")


def test_bad_json_file_names_file_and_field(tmp_path) -> None:
    p = tmp_path / "hw.json"
    raw = load_hardware("rtx3090-pcie4").model_dump(mode="json")
    del raw["gpu"]["memory_bytes"]
    p.write_text(json.dumps(raw))
    with pytest.raises(InputError, match=r"hw\.json: field gpu\.memory_bytes"):
        load_hardware(str(p))
    p.write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        load_hardware(str(p))


@given(
    layers=st.integers(1, 64),
    experts=st.integers(1, 256),
    k=st.integers(1, 16),
    h=st.integers(1, 8192),
    inter=st.integers(1, 20000),
    dtype=st.sampled_from(["fp32", "bf16", "fp16", "fp8"]),
)
def test_model_spec_json_round_trip(tmp_path_factory, layers, experts, k, h, inter, dtype) -> None:
    if k > experts:
        with pytest.raises(ValidationError):
            ModelSpec(**{**BASE, "num_layers": layers, "num_experts": experts, "top_k": k})
        return
    spec = ModelSpec(
        **{
            **BASE,
            "num_layers": layers,
            "num_experts": experts,
            "top_k": k,
            "hidden_size": h,
            "expert_intermediate_size": inter,
            "dtype": dtype,
        }
    )
    path = tmp_path_factory.mktemp("spec") / "spec.json"
    spec.to_json(path)
    assert ModelSpec.from_json(path) == spec


@pytest.mark.parametrize("name", ["paper-6x3090", "cpu-local", "h100-pcie5"])
def test_hardware_json_round_trip(tmp_path, name: str) -> None:
    hw = load_hardware(name)
    hw.to_json(tmp_path / "p.json")
    assert HardwareProfile.from_json(tmp_path / "p.json") == hw


def test_costs_follow_the_profile() -> None:
    hw, spec = load_hardware("rtx3090-pcie4"), load_model("mixtral-8x7b")
    t = transfer_time_s(hw, spec.expert_bytes)
    assert t == pytest.approx(hw.link.latency_s + spec.expert_bytes / hw.link.pinned_bandwidth_Bps)
    # decode reads an expert once: memory-bound, so about bytes / bandwidth
    assert expert_time_s(hw, spec, 1) > spec.expert_bytes / hw.gpu.memory_bandwidth_Bps
    assert expert_time_s(hw, spec, 4096) > expert_time_s(hw, spec, 1)
