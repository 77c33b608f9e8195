"""Policy plugins: modules named in FMOE_POLICY_MODULES and entry points of group
``fmoe.policies`` register their policies on first lookup; the example plugin in
examples/ runs in the simulator and in the real executor unchanged."""

from __future__ import annotations

import json
import sys
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import torch

from fmoe_cli.main import main
from policies import registry
from specs.errors import InputError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

PLUGIN = """
from policies.base import Policy
from policies.registry import register_policy


@register_policy
class {cls}(Policy):
    name = "{name}"
    description = "a test plugin"
"""


@pytest.fixture
def fresh_registry(monkeypatch: pytest.MonkeyPatch):
    """The built-in policies, with plugins not looked up yet (all put back afterwards)."""
    registry.policy_names()  # the builtins, registered once per process
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_loaded", False)
    monkeypatch.delenv(registry.ENV_MODULES, raising=False)
    monkeypatch.delitem(sys.modules, "next_layer_popular", raising=False)
    return registry


def _plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str, name: str) -> None:
    (tmp_path / f"{module}.py").write_text(PLUGIN.format(cls=module.title(), name=name))
    monkeypatch.syspath_prepend(str(tmp_path))


def test_modules_in_the_environment_register_their_policies(
    fresh_registry, tmp_path, monkeypatch, capsys
) -> None:
    _plugin(tmp_path, monkeypatch, "plugin_a", "plugin-a")
    _plugin(tmp_path, monkeypatch, "plugin_b", "plugin-b")
    monkeypatch.setenv(registry.ENV_MODULES, "plugin_a, plugin_b")
    assert {"plugin-a", "plugin-b", "fmoe", "lru"} <= set(registry.policy_names())
    assert main(["policies", "--json"]) == 0
    names = {p["name"] for p in json.loads(capsys.readouterr().out)}
    assert {"plugin-a", "plugin-b"} <= names


def test_entry_points_register_their_policies(fresh_registry, tmp_path, monkeypatch) -> None:
    _plugin(tmp_path, monkeypatch, "plugin_c", "plugin-c")
    ep = EntryPoint("c", "plugin_c", registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "entry_points", lambda group: [ep] if group == ep.group else [])
    assert registry.policy_class("plugin-c").name == "plugin-c"


def test_a_plugin_that_cannot_be_imported_is_one_line(fresh_registry, monkeypatch, capsys) -> None:
    monkeypatch.setenv(registry.ENV_MODULES, "no_such_policy_module")
    with pytest.raises(InputError, match="no_such_policy_module.*ModuleNotFoundError"):
        registry.policy_names()
    ep = EntryPoint("broken", "no_such_module_either", registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "_loaded", False)
    monkeypatch.delenv(registry.ENV_MODULES)
    monkeypatch.setattr(registry, "entry_points", lambda group: [ep])
    assert main(["policies"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "policy plugin 'broken'" in err


def test_the_example_plugin_runs_in_both_executors(fresh_registry, monkeypatch, capsys) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.setenv(registry.ENV_MODULES, "next_layer_popular")
    argv = ["sim", "--model", "mixtral-8x7b", "--hardware", "paper-6x3090", "--synth"]
    argv += ["--synth-requests", "4", "--cache-gb", "24", "--policy", "next-layer-popular"]
    assert main([*argv, "--policy-opt", "top=3", "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["policy"] == "next-layer-popular" and m["prefetches_issued"] > 0
    assert m["hits"] + m["misses"] == m["demands"]

    from realrun.api import offload
    from realrun.models import load

    ids = torch.tensor([[5, 6, 7, 8, 9]])
    kw = dict(input_ids=ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    want = load("tiny-mixtral").model.generate(**kw)
    with offload("tiny-mixtral", policy="next-layer-popular", cache_experts=6) as lm:
        got = lm.model.generate(**kw)
        real = lm.metrics()
    assert torch.equal(got, want)  # offloading under the plugin changes nothing computed
    assert real["prefetches_issued"] > 0
