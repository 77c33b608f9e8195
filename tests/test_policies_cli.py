"""`fmoe policies` lists every registered policy; the registry rejects unknown names and
bad options."""

from __future__ import annotations

import json

import pytest

from fmoe_cli.main import main
from policies.registry import make_policy, policy_class, policy_names
from specs.errors import InputError

BASELINES = {
    "no-offload",
    "lru",
    "lfu",
    "deepspeed",
    "mixtral-offloading",
    "moe-infinity",
    "promoe",
    "oracle",
}


def test_policies_json_lists_every_registered_policy(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policies", "--json"]) == 0
    out = capsys.readouterr().out
    rows = json.loads(out)  # exactly one JSON document
    assert [r["name"] for r in rows] == policy_names()
    assert BASELINES <= {r["name"] for r in rows}
    by_name = {r["name"]: r for r in rows}
    for r in rows:
        assert set(r) >= {
            "name",
            "description",
            "reads_future",
            "wants_lookahead",
            "needs_training",
            "options",
        }
        assert r["description"]
    assert by_name["oracle"]["reads_future"] is True
    assert by_name["mixtral-offloading"]["wants_lookahead"] is True
    assert not any(by_name[n]["reads_future"] for n in BASELINES - {"oracle"})
    assert "store_capacity" in by_name["moe-infinity"]["options"]
    assert "stride" in by_name["promoe"]["options"]


def test_policies_table_names_each_policy(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policies"]) == 0
    out = capsys.readouterr().out
    for name in BASELINES:
        assert name in out


def test_unknown_policy_name_is_a_clear_error() -> None:
    with pytest.raises(InputError, match=r"unknown policy 'belady'.*known: .*lru"):
        make_policy("belady")


def test_bad_policy_option_names_the_policy() -> None:
    with pytest.raises(InputError, match="policy 'promoe': bad option"):
        make_policy("promoe", stride=0)
    with pytest.raises(InputError, match="policy 'lru': bad option"):
        make_policy("lru", nonsense=1)
    # an unknown name is named, with the options the policy has
    with pytest.raises(InputError, match=r"unknown option 'nonsense'; known: .*stride"):
        make_policy("promoe", nonsense=1)
    # a bad value names the option and the value given
    with pytest.raises(InputError, match=r"stride: .*got 0"):
        make_policy("promoe", stride=0)


def test_every_name_maps_to_its_class() -> None:
    for name in policy_names():
        assert policy_class(name).name == name
