"""Random-weight checkpoints shaped like a preset: the directory loads as a checkpoint
whose spec has the preset's expert shape (or the overrides), the asked layers and dtype;
unknown families and overwrites are one-line errors."""

from __future__ import annotations

import pytest

from realrun.checkpoints import config_like, write_random_checkpoint
from realrun.models import load
from specs.errors import InputError
from specs.presets import load_model


def test_a_mixtral_shaped_checkpoint_loads_with_the_presets_expert_shape(tmp_path):
    tiny = {"hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 2,
            "num_key_value_heads": 1, "head_dim": 16, "num_local_experts": 4}  # fmt: skip
    path = write_random_checkpoint("mixtral-8x7b", tmp_path / "mx", layers=2, vocab=64, **tiny)
    spec = load(str(path)).spec
    assert (spec.family, spec.num_layers, spec.num_experts, spec.top_k) == ("mixtral", 2, 4, 2)
    assert (spec.hidden_size, spec.expert_intermediate_size, spec.dtype) == (32, 48, "bf16")
    assert spec.vocab_size == 64 and spec.name == "mx"
    with pytest.raises(InputError, match="holds a checkpoint already"):
        write_random_checkpoint("mixtral-8x7b", path, layers=2, vocab=64, **tiny)


def test_the_real_dimensions_are_the_presets():
    real = load_model("qwen3-30b-a3b")
    cfg = config_like(real, layers=2, vocab=1024)
    assert (cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts) == (2048, 768, 128)
    assert (cfg.num_experts_per_tok, cfg.num_hidden_layers, cfg.vocab_size) == (8, 2, 1024)


def test_families_without_a_builder_and_bad_layers_are_refused():
    with pytest.raises(InputError, match="no random-checkpoint builder"):
        config_like(load_model("deepseek-v3"), layers=2)
    with pytest.raises(InputError, match="--layers"):
        config_like(load_model("mixtral-8x7b"), layers=0)


def test_transformers_older_than_5_18_is_refused_in_one_line():
    from realrun.offload import check_transformers

    for ok in ("5.18.0", "5.25.0", "5.18.0.dev0", "6.0"):
        check_transformers(ok)
    with pytest.raises(InputError, match=r"transformers 5\.17\.0: .* >= 5\.18"):
        check_transformers("5.17.0")
