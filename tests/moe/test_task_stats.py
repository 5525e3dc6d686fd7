"""Per-task routing statistics against a hand-computed example."""

import pytest
import torch

from routelab.moe.task_stats import routed_matrix, task_expert_load, task_overlap


def test_per_task_load_and_overlap_by_hand():
    # 5 tokens, top-2 over 4 experts; token 3's second slot was dropped by capacity
    expert_idx = torch.tensor([[0, 1], [1, 2], [0, 1], [3, 2], [2, 3]])
    active = torch.tensor([[1, 1], [1, 1], [1, 1], [1, 0], [1, 1]], dtype=torch.bool)
    tasks = torch.tensor([0, 0, 1, 1, 2])
    routed = routed_matrix(expert_idx, 4, active)
    assert routed.tolist() == [[1, 1, 0, 0], [0, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 1], [0, 0, 1, 1]]
    load = task_expert_load(routed, tasks, 4)  # task 3 has no tokens
    assert load.tolist() == [[1, 2, 1, 0], [1, 1, 0, 1], [0, 0, 1, 1], [0, 0, 0, 0]]
    jac = task_overlap(load, "jaccard")
    # S0={0,1,2} S1={0,1,3} S2={2,3} S3={}
    want = [[1, 2 / 4, 1 / 4, 0], [2 / 4, 1, 1 / 4, 0], [1 / 4, 1 / 4, 1, 0], [0, 0, 0, 1]]
    torch.testing.assert_close(jac, torch.tensor(want, dtype=torch.float64))
    cos = task_overlap(load, "cosine")
    assert cos[0, 1].item() == pytest.approx(3 / (6**0.5 * 3**0.5))  # (1,2,1,0).(1,1,0,1)
    assert cos[0, 2].item() == pytest.approx(1 / (6**0.5 * 2**0.5))
    assert cos[3].tolist() == [0, 0, 0, 0]


def test_a_repeated_expert_counts_once_and_bad_input_is_refused():
    assert routed_matrix(torch.tensor([[1, 1]]), 3).tolist() == [[0, 1, 0]]
    with pytest.raises(ValueError, match="routed must be"):
        task_expert_load(torch.ones(3, 2), torch.zeros(2, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="metric='l2' is invalid"):
        task_overlap(torch.ones(2, 2), "l2")
