"""Expert stores: packing is lossless for every tested architecture, the file store is a
real safetensors file, and the fused parameters are gone once their layer is stored."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open

from realrun.layout import ALIGN, ExpertLayout
from realrun.models import ARCHS, load
from realrun.store import FileStore, RamStore, build_store
from specs.errors import InputError

TINY = {
    "mixtral": "tiny-mixtral",
    "qwen2_moe": "tiny-qwen2-moe",
    "phimoe": "tiny-phimoe",
    "olmoe": "tiny-olmoe",
    "qwen3_moe": "tiny-qwen3-moe",
    "deepseek_v3": "tiny-deepseek-v3",
    "glm4_moe": "tiny-glm4-moe",
    "gpt_oss": "tiny-gpt-oss",
}


def _fused(loaded):
    return [
        {n: p.detach().clone() for n, p in b.experts.named_parameters(recurse=False)}
        for b in loaded.blocks
    ]


def test_every_tested_architecture_has_a_tiny_preset():
    assert set(TINY) == set(ARCHS)


@pytest.mark.parametrize("family", sorted(TINY))
@pytest.mark.parametrize("packed", [False, True])
def test_ram_store_rows_view_back_to_the_fused_weights(family, packed):
    loaded = load(TINY[family])
    before = _fused(loaded)
    experts = [b.experts for b in loaded.blocks]
    store = RamStore(experts, packed=packed)
    for layer, lay in enumerate(store.layouts):
        assert lay.row_bytes % ALIGN == 0 and all(s.offset % ALIGN == 0 for s in lay.params)
        assert (store.host_row(layer, 0) is not None) == packed
        rows = torch.stack([store.read_row(layer, e) for e in range(lay.num_experts)])
        views = lay.views(rows)
        assert set(views) == set(before[layer])
        for name, v in views.items():
            assert torch.equal(v, before[layer][name])
        # the fused parameters are gone from the module
        assert not list(experts[layer].named_parameters(recurse=False))


def test_file_store_is_a_safetensors_file_with_the_packed_rows(tmp_path):
    loaded = load("tiny-olmoe")
    before = _fused(loaded)
    experts = [b.experts for b in loaded.blocks]
    store = FileStore(experts, directory=tmp_path, keep=True)
    try:
        assert store.path.exists()
        with safe_open(str(store.path), framework="pt") as f:
            assert len(list(f.keys())) == loaded.spec.total_experts
            for layer, lay in enumerate(store.layouts):
                rows = torch.stack(
                    [f.get_tensor(f"layers.{layer}.experts.{e}") for e in range(lay.num_experts)]
                )
                for name, v in lay.views(rows).items():
                    assert torch.equal(v, before[layer][name])
        # chunked reads, including a chunk that starts mid-row
        lay = store.layouts[1]
        dst = torch.zeros(lay.row_bytes, dtype=torch.uint8)
        cut = 1000
        store.read_into(1, 3, 0, cut, dst[:cut])
        store.read_into(1, 3, cut, lay.row_bytes, dst[cut:])
        for name, v in lay.views(dst[None]).items():
            assert torch.equal(v[0], before[1][name][3])
        assert not any(list(m.named_parameters(recurse=False)) for m in experts)
    finally:
        store.close()


def test_file_store_leaves_no_file_behind(tmp_path):
    loaded = load("tiny-mixtral")
    store = build_store("file", [b.experts for b in loaded.blocks], directory=tmp_path)
    assert os.listdir(tmp_path) == []  # unlinked once open
    dst = torch.zeros(store.row_bytes, dtype=torch.uint8)
    store.read_into(0, 0, 0, store.row_bytes, dst)
    store.close()
    with pytest.raises(RuntimeError, match="closed"):
        store.read_into(0, 0, 0, 8, dst[:8])


def test_bad_store_requests_are_input_errors(tmp_path):
    loaded = load("tiny-mixtral")
    experts = [b.experts for b in loaded.blocks]
    with pytest.raises(InputError, match="unknown expert store"):
        build_store("tape", experts)
    with pytest.raises(InputError, match="does not exist"):
        build_store("file", experts, directory=tmp_path / "missing")
    with pytest.raises(InputError, match="num_experts"):
        ExpertLayout.of_module(torch.nn.Linear(2, 2))
