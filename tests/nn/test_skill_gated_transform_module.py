"""TaskDynamicSkillAdapter (TDSS TDSA module)."""
from __future__ import annotations

import pytest
import torch

from fastdense.nn import TaskDynamicSkillAdapter
from fastdense.nn.skill_gated_transform import SWIN_T_DEPTHS, SWIN_T_EMBED_DIM, swin_tdsa_parameters
from fastdense.ops import reference


def _randomise(module: TaskDynamicSkillAdapter) -> None:
    """Non-zero W_u and peaked gates, so outputs and every gradient are informative."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p is not module.skills else 1.0))


def test_forward_dict_and_stacked_match_reference():
    tasks = ("semseg", "parts", "sal", "normals")
    m = TaskDynamicSkillAdapter(24, tasks=tasks)
    _randomise(m)
    assert (m.rank, m.num_skills, m.num_tasks) == (6, 10, 4)
    x = torch.randn(2, 9, 24)
    out = m(x)
    assert list(out) == list(tasks)
    expected = reference.skill_gated_transform(x, m.w_down, m.w_up, m.skills, m.w_gamma, m.w_beta)
    for i, t in enumerate(tasks):
        assert out[t].shape == x.shape
        torch.testing.assert_close(out[t], expected[i], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m(x, stacked=True), expected, atol=1e-5, rtol=1e-5)


def test_gradients_reach_every_parameter_and_match_reference():
    m = TaskDynamicSkillAdapter(16, rank=8, num_skills=5, tasks=3)
    _randomise(m)
    x = torch.randn(3, 4, 4, 16)  # a 4-D (B, H, W, C) feature map
    m(x, stacked=True).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    reference.skill_gated_transform(x, m.w_down, m.w_up, m.skills, m.w_gamma, m.w_beta).square().sum().backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-4, rtol=1e-4, msg=n)


def test_init_starts_at_zero_output_and_trains_w_up_first():
    """W_u = 0: the lateral outputs start at zero, only W_u gets a gradient at step 0."""
    m = TaskDynamicSkillAdapter(32, tasks=2)
    assert torch.count_nonzero(m.w_up) == 0
    bound = 32 ** -0.5
    assert m.w_down.abs().max() <= bound and m.w_down.abs().max() > 0.5 * bound
    assert (m.skills - 1).abs().mean() < 0.2 and m.skills.std() > 0.01
    assert m.w_gamma.std() < 0.05 and m.w_beta.std() < 0.05
    x = torch.randn(2, 7, 32)
    out = m(x, stacked=True)
    assert torch.count_nonzero(out) == 0
    out.sum().backward()
    assert m.w_up.grad.abs().sum() > 0
    assert torch.count_nonzero(m.w_down.grad) == 0


def test_swin_t_parameter_count_matches_the_papers_figure():
    """TDSA on attention and FFN of all 12 Swin-T blocks ≈ 2.36 M at T = 4, R = C/4, M = 10."""
    total = 0
    for stage, depth in enumerate(SWIN_T_DEPTHS):
        c = SWIN_T_EMBED_DIM * 2 ** stage
        for _ in range(2 * depth):  # attention and FFN of each block
            total += sum(p.numel() for p in TaskDynamicSkillAdapter(c, tasks=4, device="meta").parameters())
    assert total == swin_tdsa_parameters() == 2_355_264
    assert abs(total / 1e6 - 2.36) < 0.01
    assert TaskDynamicSkillAdapter.count_parameters(96) == sum(
        p.numel() for p in TaskDynamicSkillAdapter(96, device="meta").parameters())


def test_int_tasks_and_repr():
    m = TaskDynamicSkillAdapter(8, rank=4, num_skills=20, tasks=5)
    assert m.tasks == (0, 1, 2, 3, 4)
    assert set(m(torch.randn(3, 8))) == set(range(5))
    assert "num_skills=20" in repr(m) and "rank=4" in repr(m)


@pytest.mark.parametrize("kwargs, words", [
    (dict(dim=0), "dim"),
    (dict(dim=8, rank=0), "rank"),
    (dict(dim=8, num_skills=True), "num_skills"),
    (dict(dim=8, tasks=0), "tasks"),
    (dict(dim=8, tasks="seg"), "tasks"),
    (dict(dim=8, tasks=["a", "a"]), "unique"),
])
def test_bad_arguments(kwargs, words):
    with pytest.raises(ValueError, match=words):
        TaskDynamicSkillAdapter(**kwargs)


def test_wrong_input_width_names_x():
    m = TaskDynamicSkillAdapter(8, tasks=2)
    with pytest.raises(ValueError, match="x"):
        m(torch.randn(3, 9))
