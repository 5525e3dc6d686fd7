"""Task-aware routing: the task router (task-level MoE, Kudugunta et al. 2021), task-conditioned
routers, and their plumbing through RoutedTransformer."""

import pytest
import torch

from routelab import ConfigError, RoutedTransformer
from routelab.moe import MoE
from routelab.moe.routers import ROUTERS
from routelab.moe.routers.task import TaskRouter, task_table
from tests.conftest import tiny_config

TASKS = ["qa", "code", "math"]


def _model(task_names=TASKS, seed=0, **ffn):
    torch.manual_seed(seed)
    return RoutedTransformer(tiny_config(task_names=task_names, ffn={"kind": "moe", "num_experts": 4, **ffn}))


def test_task_table_deals_tasks_round_robin_over_experts():
    assert task_table(3, 4, 1).tolist() == [[0], [1], [2]]
    assert task_table(3, 4, 2).tolist() == [[0, 1], [2, 3], [0, 1]]  # wraps around: task 2 shares task 0's
    assert task_table(2, 6, 3).tolist() == [[0, 1, 2], [3, 4, 5]]
    assert task_table(3, 4, 3).tolist() == [[0, 1, 2], [0, 1, 3], [0, 2, 3]]  # (t*k + j) mod E, sorted


def test_task_router_sends_every_token_of_a_task_to_its_experts_whatever_the_token():
    router = TaskRouter(16, 4, top_k=2, num_tasks=3)
    x = torch.randn(9, 16)
    tasks = torch.tensor([0, 1, 2, 0, 1, 2, 2, 2, 0])
    r = router(x, task_ids=tasks)
    assert r.expert_idx.tolist() == [[0, 1], [2, 3], [0, 1], [0, 1], [2, 3], [0, 1], [0, 1], [0, 1], [0, 1]]
    assert torch.equal(r.gates, torch.full((9, 2), 0.5))
    r2 = router(torch.randn(9, 16) * 100, task_ids=tasks)  # other tokens, same decisions
    assert torch.equal(r2.expert_idx, r.expert_idx) and torch.equal(r2.gates, r.gates)


def test_learned_task_gates_start_equal_and_learn():
    router = TaskRouter(8, 4, top_k=2, gates="learned", num_tasks=2)
    r = router(torch.randn(3, 8), task_ids=torch.tensor([0, 1, 1]))
    assert torch.allclose(r.gates, torch.full((3, 2), 0.5))
    with torch.no_grad():
        router.gate_logits[1] = torch.tensor([0.0, torch.log(torch.tensor(3.0))])
    r = router(torch.randn(3, 8), task_ids=torch.tensor([0, 1, 1]))
    assert r.gates[1].tolist() == pytest.approx([0.25, 0.75])
    assert r.gates[0].tolist() == pytest.approx([0.5, 0.5])
    (r.gates[:, 1] * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert router.gate_logits.grad[1].abs().sum() > 0 and router.gate_logits.grad[0].abs().sum() > 0


def test_task_router_layer_output_is_the_gated_sum_of_the_task_experts():
    torch.manual_seed(0)
    moe = MoE(d_model=16, num_experts=4, hidden=8, router="task", top_k=2, num_tasks=2)
    x, tasks = torch.randn(2, 5, 16), torch.tensor([[0] * 5, [1] * 5])
    y = moe(x, task_ids=tasks).hidden
    every = moe.experts.forward_all(x.reshape(-1, 16))  # (E, T, D)
    want = torch.cat([(every[0, :5] + every[1, :5]) / 2, (every[2, 5:] + every[3, 5:]) / 2]).reshape(2, 5, 16)
    torch.testing.assert_close(y, want, atol=1e-6, rtol=1e-5)
    assert moe(x, task_ids=tasks).stats["tokens_per_expert"].tolist() == [5, 5, 5, 5]


def test_task_router_without_task_ids_routes_a_one_task_model_as_task_0_and_refuses_several():
    one = TaskRouter(8, 4, top_k=2, num_tasks=1)
    assert one(torch.randn(3, 8)).expert_idx.tolist() == [[0, 1]] * 3
    model = _model(router={"kind": "task", "top_k": 1})
    with pytest.raises(ValueError, match="the task router needs task ids: this model has 3 tasks"):
        model(torch.randint(0, 61, (1, 4)))
    with pytest.raises(ValueError, match=r"task id 3 is out of range; allowed: 0..2"):
        model(torch.randint(0, 61, (1, 4)), task_ids=torch.tensor([3]))


def test_task_router_without_task_names_is_refused_with_one_line():
    with pytest.raises(ConfigError, match="routes by task id and needs model.task_names") as e:
        _model(task_names=None, router="task")
    assert "\n" not in str(e.value)


def test_model_routes_each_sequence_by_its_task():
    model = _model(router={"kind": "task", "top_k": 1}).eval()
    x = torch.randint(0, 61, (3, 6))
    out = model(x, task_ids=torch.tensor([2, 0, 2]))
    assert out.routing["layers.0.ffn"]["tokens_per_expert"].tolist() == [6, 0, 12, 0]
    assert float(out.aux_loss) == 0.0


# ---------------------------------------------------------------------------------------------
# task conditioning


def test_task_conditioned_model_starts_as_the_unconditioned_one():
    plain = _model(router="topk", seed=3).eval()
    cond = _model(router="topk", task_conditioned=True, seed=3).eval()
    cond.load_state_dict(plain.state_dict(), strict=False)  # same weights; the embeddings stay zero
    assert all(layer.ffn.task_embedding.abs().sum() == 0 for layer in cond.layers)
    x = torch.randint(0, 61, (2, 7))
    a, b = plain(x), cond(x, task_ids=torch.tensor([1, 2]))
    torch.testing.assert_close(b.logits, a.logits, atol=1e-6, rtol=0)  # each row through its (tied) task head
    for name in a.routing:
        assert torch.equal(a.routing[name]["tokens_per_expert"], b.routing[name]["tokens_per_expert"])


def test_task_embedding_gets_gradient_and_changes_a_tokens_routing():
    model = _model(router="switch", task_conditioned=True).train()
    x = torch.randint(0, 61, (2, 7))
    out = model(x, labels=x, task_ids=torch.tensor([0, 2]))
    out.loss.backward()
    emb = model.layers[0].ffn.task_embedding
    assert emb.shape == (3, 32)
    assert emb.grad[0].abs().sum() > 0 and emb.grad[2].abs().sum() > 0
    assert emb.grad[1].abs().sum() == 0  # task 1 had no tokens
    moe = model.layers[0].ffn.eval()
    with torch.no_grad():
        moe.task_embedding[1] = 10 * moe.router.weight[3]  # push task 1 towards expert 3
    h = torch.randn(1, 5, 32) * 0.01
    g0 = moe.gate_matrix(h, task_ids=torch.zeros(1, 5, dtype=torch.long))
    g1 = moe.gate_matrix(h, task_ids=torch.ones(1, 5, dtype=torch.long))
    assert (g1.argmax(-1) == 3).all() and not torch.equal(g0.argmax(-1), g1.argmax(-1))


def test_task_conditioning_is_refused_for_a_router_without_learned_input():
    with pytest.raises(ConfigError, match="task_conditioned=True is invalid for router 'hash'"):
        _model(router="hash", task_conditioned=True)


def test_task_conditioned_model_without_task_ids_uses_task_0():
    model = _model(router="topk", task_conditioned=True).eval()
    with torch.no_grad():
        for layer in model.layers:
            layer.ffn.task_embedding.normal_()
    x = torch.randint(0, 61, (2, 5))
    torch.testing.assert_close(model(x).logits, model(x, task_ids=torch.tensor([0, 0])).logits)


def test_dense_layers_accept_task_ids():
    model = _model(router="topk", moe_every=2, task_conditioned=True)
    out = model(torch.randint(0, 61, (2, 5)), task_ids=torch.tensor([1, 0]))
    assert set(out.routing) == {"layers.1.ffn"}


# ---------------------------------------------------------------------------------------------
# extracting one task's model


@pytest.mark.parametrize(
    "ffn",
    [
        {"router": {"kind": "task", "top_k": 2, "gates": "learned"}, "num_experts": 6},
        {"router": {"kind": "task", "top_k": 1}, "moe_every": 2, "num_shared_experts": 1, "activation": "swiglu"},
    ],
)
def test_extracted_task_model_equals_the_multi_task_model_on_its_task(ffn, tmp_path):
    from routelab.pretrained.extract import extract_task

    model = _model(**ffn)
    with torch.no_grad():
        for layer in model.layers:
            if getattr(layer.ffn, "router", None) is not None and layer.ffn.router.gate_logits is not None:
                layer.ffn.router.gate_logits.normal_()  # unequal learned gates
    model.eval()
    x = torch.randint(0, 61, (2, 7))
    for t, name in enumerate(TASKS):
        small = extract_task(model, name)
        assert small.cfg.task_names == [name] and small.cfg.ffn.num_experts == small.cfg.ffn.router.top_k
        assert small.num_parameters() < model.num_parameters()
        want = model(x, task_ids=torch.full((2,), t)).logits
        torch.testing.assert_close(small(x).logits, want, atol=1e-5, rtol=0)
        small.save_pretrained(tmp_path / name)
        again = RoutedTransformer.from_pretrained(tmp_path / name)
        torch.testing.assert_close(again(x).logits, want, atol=1e-5, rtol=0)


def test_extract_keeps_the_task_experts_weights():
    from routelab.pretrained.extract import extract_task

    model = _model(router={"kind": "task", "top_k": 2}, num_experts=4)
    small = extract_task(model, 1)  # task 1: experts 2, 3
    assert torch.equal(small.layers[0].ffn.experts.w_in, model.layers[0].ffn.experts.w_in[2:4])
    assert small.layers[0].ffn.router.table.tolist() == [[0, 1]]
    assert small.task_head(0)[1].weight is small.tok_emb.weight  # tied embeddings stay tied


def test_extract_refuses_an_unknown_task_and_a_model_not_routed_by_task():
    from routelab.pretrained.extract import extract_task

    with pytest.raises(ConfigError, match="unknown task 'poetry'; the model's tasks are: qa, code, math"):
        extract_task(_model(router="task"), "poetry")
    with pytest.raises(ConfigError, match="extract needs every MoE layer to route by task .* this model uses topk"):
        extract_task(_model(router="topk"), "qa")
    with pytest.raises(ConfigError, match="the model has no MoE layers"):
        extract_task(RoutedTransformer(tiny_config(task_names=TASKS)), "qa")


@pytest.mark.parametrize("router", [n for n in ROUTERS.names() if ROUTERS.get(n).module_class.learned])
def test_every_learned_router_starts_unconditioned_and_takes_the_task_embedding(router):
    x, tasks = torch.randn(2, 6, 16), torch.tensor([[0] * 6, [1] * 6])
    torch.manual_seed(0)
    plain = MoE(d_model=16, num_experts=4, hidden=8, router=router).eval()
    torch.manual_seed(0)
    cond = MoE(d_model=16, num_experts=4, hidden=8, router=router, num_tasks=2, task_conditioned=True).eval()
    torch.testing.assert_close(cond(x, task_ids=tasks).hidden, plain(x).hidden, atol=0, rtol=0)
    with torch.no_grad():
        cond.task_embedding[1] = 3 * torch.randn(16)
    moved = cond.gate_matrix(x, task_ids=tasks)[1] - plain.gate_matrix(x)[1]
    assert moved.abs().max() > 1e-3  # task 1's tokens are routed differently
    if not cond.router.whole_batch:  # expert choice ranks the whole batch: task 0's tokens move too
        torch.testing.assert_close(cond.gate_matrix(x, task_ids=tasks)[0], plain.gate_matrix(x)[0])


def test_model_refuses_task_ids_of_the_wrong_shape():
    model = _model(router="topk", task_conditioned=True)
    with pytest.raises(ValueError, match=r"task_ids must be \(batch,\) = \(2,\)"):
        model(torch.randint(0, 61, (2, 5)), task_ids=torch.zeros(2, 5, dtype=torch.long))


def test_a_given_table_routes_each_task_to_its_row_and_extracts():
    from routelab.pretrained.extract import extract_task

    table = [[3, 0], [0, 1], [2, 3]]  # qa and code share expert 0, qa and math expert 3
    model = _model(router={"kind": "task", "top_k": 2, "gates": "learned", "table": table}).eval()
    with torch.no_grad():
        model.layers[0].ffn.router.gate_logits.normal_()
    x = torch.randint(0, 61, (3, 5))
    out = model(x, task_ids=torch.tensor([0, 1, 2]))
    assert out.routing["layers.0.ffn"]["tokens_per_expert"].tolist() == [10, 5, 5, 10]
    small = extract_task(model, "qa")
    assert torch.equal(small.layers[0].ffn.experts.w_in, model.layers[0].ffn.experts.w_in[[3, 0]])
    torch.testing.assert_close(small(x).logits, model(x, task_ids=torch.zeros(3, dtype=torch.long)).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("table", [[[0, 1], [2, 3]], [[0, 0], [1, 2], [2, 3]], [[0, 4], [1, 2], [2, 3]], [[0], [1], [2]]])
def test_a_bad_table_is_refused_with_one_line(table):
    with pytest.raises(ConfigError, match=r"table=.* is invalid; allowed: 3 rows \(one per task\) of top_k=2 distinct experts in 0..3"):
        _model(router={"kind": "task", "top_k": 2, "table": table})
