"""The CPU miss action in the real executor: experts computed on the host from their host
copies give logits bit-equal to the unmodified model's (eager, fp32), with the host
compute time recorded; policies that place experts before the run copy real weights."""

from __future__ import annotations

import pytest
import torch

from policies.base import MissAction, Policy, RecencyEviction
from policies.cache import ExpertKey
from policies.registry import make_policy
from realrun.generate import greedy_generate
from realrun.models import load
from realrun.offload import offload_model
from realrun.session import RunSession, SessionOptions

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class EveryOther(RecencyEviction, Policy):
    """CPU for odd experts, fetch for even ones: both paths in one layer."""

    name = "test-every-other"

    def miss_action(self, key: ExpertKey, tokens: int, now: float) -> MissAction:
        return MissAction.CPU if key[1] % 2 else MissAction.FETCH


def _reference(arch: str, prompt: list[int], new: int):
    ref = load(arch, seed=0)
    return greedy_generate(ref.model, "ref", prompt, new, keep_logits=True)


@pytest.mark.parametrize("arch", ["tiny-mixtral", "tiny-qwen3-moe", "tiny-deepseek-v3"])
@pytest.mark.parametrize("policy", ["every-other", "ktransformers", "llama-cpp", "fiddler"])
def test_cpu_served_experts_are_bit_equal_to_the_unmodified_model(arch, policy):
    prompt, new = [3, 17, 5, 9, 2], 5
    ref = _reference(arch, prompt, new)
    om = offload_model(load(arch, seed=0))
    pol = EveryOther() if policy == "every-other" else make_policy(policy)
    spec = om.loaded.spec
    cache = max(spec.top_k, spec.total_experts // 2)
    with RunSession(om, pol, SessionOptions(cache_experts=cache)) as session:
        gen = session.generate("r0", prompt, new, keep_logits=True)
        m = session.metrics()
    assert gen.output_ids == ref.output_ids
    assert len(gen.logits) == len(ref.logits)
    assert all(torch.equal(a, b) for a, b in zip(gen.logits, ref.logits, strict=True))
    assert m["hits"] + m["misses"] == m["demands"]
    if policy in ("every-other", "ktransformers"):
        assert m["actions_cpu"] > 0 and m["host_compute_s"] > 0
    om.close()


@pytest.mark.parametrize("arch", ["tiny-mixtral", "tiny-qwen3-moe"])
def test_per_layer_scope_is_exact_and_keeps_each_layer_within_its_share(arch):
    prompt, new = [3, 17, 5, 9, 2], 4
    ref = _reference(arch, prompt, new)
    om = offload_model(load(arch, seed=0))
    spec = om.loaded.spec
    cache = spec.num_moe_layers * spec.top_k + 1
    share = cache // spec.num_moe_layers
    seen: list[int] = []

    class Watch(RecencyEviction, Policy):
        name = "test-watch"

        def on_load_finished(self, key, by_prefetch, now):
            c = self.ctx.cache_of(key)
            seen.append(
                max(sum(1 for k in c.entries if k[0] == lay) for lay in range(spec.num_moe_layers))
            )

    opts = SessionOptions(cache_experts=cache, cache_scope="per-layer")
    with RunSession(om, Watch(), opts) as session:
        gen = session.generate("r0", prompt, new, keep_logits=True)
    assert gen.output_ids == ref.output_ids
    assert all(torch.equal(a, b) for a, b in zip(gen.logits, ref.logits, strict=True))
    assert seen and max(seen) <= share
    om.close()


def test_per_layer_scope_too_small_is_refused_in_one_line(capsys):
    from fmoe_cli.main import main

    rc = main(
        [
            "run",
            "--model",
            "tiny-mixtral",
            "--policy",
            "lru",
            "--cache-experts",
            "2",
            "--cache-scope",
            "per-layer",
            "--num-prompts",
            "1",
            "--max-new-tokens",
            "2",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "layers x top-K" in err and len(err.strip().splitlines()) == 1


def test_lossy_actions_run_only_when_allowed_and_say_so():
    from specs.errors import InputError

    arch, prompt = "tiny-qwen3-moe", [3, 17, 5, 9, 2]
    om = offload_model(load(arch, seed=0))
    spec = om.loaded.spec
    with pytest.raises(InputError, match="allow-lossy"):
        with RunSession(om, make_policy("hobbit", action="skip"), SessionOptions(8)) as s:
            s.generate("r0", prompt, 3)
    for action in ("lowbit", "skip"):
        pol = make_policy("hobbit", action=action, threshold=0.99)  # every miss is lossy
        with RunSession(om, pol, SessionOptions(spec.top_k, allow_lossy=True)) as s:
            s.generate("r0", prompt, 3)
            m = s.metrics()
        assert m[f"actions_{action}"] > 0 and m["exact"] is False
    om.close()


def test_renormalised_weights_keep_each_rows_sum():
    from realrun.host_experts import renormalised

    idx = torch.tensor([[0, 1, 2], [2, 3, 1], [1, 1, 1]])
    w = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.3, 0.1], [0.2, 0.2, 0.2]])
    out = renormalised(idx, w, [1])
    assert torch.allclose(out.sum(-1)[:2], w.sum(-1)[:2])
    assert (out[idx == 1] == 0).all() and (out[2] == 0).all()  # a row with no expert left


def test_lossy_policy_without_allow_lossy_is_refused_in_one_line_before_loading(capsys):
    from fmoe_cli.main import main

    rc = main(
        ["run", "--model", "tiny-qwen3-moe", "--policy", "hobbit", "--cache-experts", "8"]
        + ["--num-prompts", "1", "--max-new-tokens", "2"]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "--allow-lossy" in err and len(err.strip().splitlines()) == 1


def test_serve_refuses_a_lossy_policy_in_one_line(capsys):
    from fmoe_cli.main import main

    rc = main(["serve", "--model", "tiny-qwen3-moe", "--policy", "hobbit", "--cache-experts", "8"])
    err = capsys.readouterr().err
    assert rc == 2 and "exact policies only" in err and err.count("\n") == 1
