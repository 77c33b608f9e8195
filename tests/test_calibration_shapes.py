"""The bench's GPU-check flags on the CPU: the expert FFN timed for real shapes computes
what transformers' eager experts forward computes per expert; copy sizes; bad flags give
one line and exit 2."""

from __future__ import annotations

import pytest
import torch
import transformers

from calibration.bench_link import link_sizes as _link_sizes
from calibration.bench_shapes import expert_ffn, measure_shape
from fmoe_cli.main import main


def test_the_timed_expert_ffn_is_the_library_eager_expert():
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    cfg = transformers.Qwen3MoeConfig(
        hidden_size=32, moe_intermediate_size=16, num_experts=3, num_experts_per_tok=1
    )
    experts = Qwen3MoeExperts(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        x = torch.randn(5, 32, generator=g)
        idx = torch.full((5, 1), 2)
        lib = experts(x, idx, torch.ones(5, 1))
        ours = expert_ffn(x, experts.gate_up_proj[2], experts.down_proj[2])
    assert torch.equal(lib, ours)


def test_a_real_shape_is_timed_per_token_count_with_its_spread():
    got = measure_shape("qwen3-30b-a3b", torch.device("cpu"), "fp32", [1, 3], repeats=3)
    assert [(s.tokens, s.hidden, s.intermediate, s.top_k) for s in got] == [
        (1, 2048, 768, 8),
        (3, 2048, 768, 8),
    ]
    for s in got:
        assert 0 < s.seconds <= s.median_s and s.spread >= 0 and s.repeats == 3


def test_copy_sizes_are_cut_to_one_expert_row_on_the_cpu_only():
    assert _link_sizes([4096, 1 << 20, 1 << 30], 65536, cuda=False) == [4096, 65536]
    assert _link_sizes([1 << 30, 4096], 65536, cuda=True) == [4096, 1 << 30]
    assert _link_sizes(None, 65536, cuda=True)[-1] == 65536  # one row down by halves


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--link-sizes", "4X"], "byte counts"),
        (["--expert-shapes", "no-such-model"], "unknown model preset"),
        (["--shape-tokens", "0"], "positive integers"),
    ],
)
def test_bad_bench_flags_are_one_line(flags, says, tmp_path, capsys):
    argv = ["calibrate", "bench", "--model", "tiny-mixtral", "--out", str(tmp_path / "p.json")]
    with pytest.raises(SystemExit) as exc:  # argparse's own errors exit 2
        raise SystemExit(main([*argv, *flags]))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert says in err[-1] and len([ln for ln in err if "Traceback" in ln]) == 0
