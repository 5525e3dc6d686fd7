"""The registries: capability flags are asked of the registry (``names_where``), not rebuilt inline."""

import pytest

import routelab  # noqa: F401  (assembles the registries)
from routelab.registry import ATTENTION, ROUTERS, Registry


@pytest.mark.parametrize(
    "flag, names",
    [
        ("supports_selection_bias", ["gshard", "switch", "topk"]),
        ("learned", ["base", "expert_choice", "gshard", "soft", "switch", "topk", "topp"]),
        ("whole_batch", ["expert_choice", "soft"]),
        ("needs_token_ids", ["hash"]),
        ("needs_task_ids", ["task"]),
        ("own_capacity", ["expert_choice"]),
        ("soft", ["soft"]),
    ],
)
def test_routers_with_a_capability(flag, names):
    assert ROUTERS.names_where(flag) == names


def test_names_without_a_property_are_the_rest():
    """``value=False``: the routers a causal model or expert parallelism accepts (per-token routing)."""
    per_token = ROUTERS.names_where("whole_batch", value=False)
    assert per_token == sorted(set(ROUTERS.names()) - {"expert_choice", "soft"})
    assert "switch" in per_token and "hash" in per_token


def test_a_refusal_for_a_property_lists_the_routers_without_it():
    from routelab.errors import ConfigError
    from routelab.moe import MoE

    with pytest.raises(ConfigError, match=r"refused in a causal model \(use it in an encoder\); allowed with: .*switch"):
        MoE(d_model=8, num_experts=2, hidden=8, router="expert_choice", causal=True)
    MoE(d_model=8, num_experts=2, hidden=8, router="switch", causal=True)  # per-token: accepted


def test_attention_kinds_without_the_attribute_lack_the_capability():
    assert ATTENTION.names_where("task_conditionable") == ["synthesizer"]  # dense does not define it


def test_names_where_reads_class_attributes_and_refuses_a_flag_nobody_defines():
    reg = Registry("toy")

    @reg.register("b", object)
    class B:
        fast = True

    @reg.register("a", object)
    class A:
        fast = 1

    @reg.register("c", object)
    class C:
        fast = False

    @reg.register("d", object)
    class D:
        pass

    assert reg.names_where("fast") == ["a", "b"]
    with pytest.raises(AttributeError, match="no toy kind defines the flag 'fats'"):
        reg.names_where("fats")
    assert Registry("empty").names_where("fast") == []
