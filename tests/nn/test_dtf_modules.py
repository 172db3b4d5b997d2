"""FilterNorm, DynamicTaskFilter, StaticTaskFilter and TaskAwareLoRALinear against TADFormer-style oracles.

The oracles are written like the released TADFormer code (models/lora.py):
NCHW maps, the 1×1 conv φ on the pooled map, FilterNorm, the grouped-conv
trick, a Python loop over the tasks, separate GEMMs.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastdense.nn import DynamicTaskFilter, FilterNorm, StaticTaskFilter, TaskAwareLoRALinear, lora_parameters
from fastdense.ops import reference

F64 = dict(rtol=1e-9, atol=1e-9)


def tadformer_dtf(module: DynamicTaskFilter, x: torch.Tensor) -> torch.Tensor:
    """TADFormer's ``DTF.forward`` on maps (B, r, H, W), whole map."""
    b, c, h, w = x.shape
    k = module.kernel_size
    weight = module.phi(F.adaptive_avg_pool2d(x, 1))          # (B, r·k², 1, 1)
    weight = module.filter_norm(weight).reshape(b * c, 1, k, k)
    return F.conv2d(x.reshape(1, b * c, h, w), weight, padding=k // 2, groups=b * c).reshape(b, c, h, w)


def test_filter_norm_matches_reference_and_ddf_init():
    torch.manual_seed(0)
    fn = FilterNorm(64, 3).double()
    # DDF / TADFormer: std ~ randn · gain('relu') / k, mean ~ randn.
    assert abs(fn.std.std().item() - 2 ** 0.5 / 3) < 0.08
    assert abs(fn.mean.std().item() - 1.0) < 0.15
    theta = torch.randn(5, 64 * 9, dtype=torch.float64)
    expected = reference.filter_norm(theta.reshape(5, 64, 9), fn.std, fn.mean).reshape(5, -1)
    torch.testing.assert_close(fn(theta), expected, **F64)
    torch.testing.assert_close(fn(theta[..., None, None]), expected[..., None, None], **F64)
    with pytest.raises(ValueError, match="FilterNorm expects"):
        fn(torch.randn(5, 10))


def test_dynamic_task_filter_is_tadformers_dtf_on_maps_and_tokens():
    torch.manual_seed(0)
    dtf = DynamicTaskFilter(4).double()
    x = torch.randn(3, 4, 7, 9, dtype=torch.float64, requires_grad=True)
    ours = dtf(x)
    expected = tadformer_dtf(dtf, x)
    torch.testing.assert_close(ours, expected, **F64)
    tokens = x.detach().permute(0, 2, 3, 1).reshape(3, 63, 4)
    torch.testing.assert_close(dtf(tokens, (7, 9)), expected.detach().permute(0, 2, 3, 1).reshape(3, 63, 4), **F64)
    # Gradients of every DTF parameter agree with autograd through the oracle.
    g = torch.randn_like(expected)
    got = torch.autograd.grad((ours * g).sum(), [x, *dtf.parameters()])
    want = torch.autograd.grad((expected * g).sum(), [x, *dtf.parameters()])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **F64)


def test_dynamic_task_filter_windows_match_reference_and_theta_is_grouped_conv():
    torch.manual_seed(0)
    dtf = DynamicTaskFilter(4, window=7).double()
    h = torch.randn(2, 90, 4, dtype=torch.float64)
    out, theta = dtf(h, (9, 10), return_theta=True)
    ref_out, ref_theta = reference.dynamic_task_filter(h, (9, 10), dtf.phi_weight, dtf.phi.bias, dtf.filter_norm.std,
                                                       dtf.filter_norm.mean, window=7)
    torch.testing.assert_close(out, ref_out, **F64)
    torch.testing.assert_close(theta, ref_theta, **F64)
    assert theta.shape == (2, 4, 4, 3, 3)  # 2x2 windows (the last row/column clipped)


def test_static_task_filter_is_naive_conv_filter():
    torch.manual_seed(0)
    st = StaticTaskFilter(4).double()
    x = torch.randn(2, 4, 7, 9, dtype=torch.float64)
    torch.testing.assert_close(st(x), st.conv2d(x), **F64)  # NaiveConvFilter.forward
    win = StaticTaskFilter(4, window=7).double()
    h = torch.randn(2, 90, 4, dtype=torch.float64)
    expected = reference.static_task_filter(h, (9, 10), win.filter_weight, win.conv2d.bias, window=7)
    torch.testing.assert_close(win(h, (9, 10)), expected, **F64)


# ----------------------------------------------------------------------------- TA-module
def tadformer_ta_module(layer: TaskAwareLoRALinear, x, x_tasks, hw):
    """TAModuleLinear.forward of the released code (dropout 0), for any T and both filters."""
    h_, w_ = hw
    pretrained = F.linear(x, layer.weight, layer.bias)
    shared = pretrained + (x @ layer.lora_shared_A.t() @ layer.lora_shared_B.t()) * layer.scale
    outs = []
    for t in range(layer.num_tasks):
        f = x if x_tasks is None else x_tasks[t]
        b, n, _ = f.shape
        z = (f @ layer.lora_shared_A.t()).reshape(b, h_, w_, -1).permute(0, 3, 1, 2)
        if layer.filter == "dynamic":
            if layer.window:
                z_tok = z.permute(0, 2, 3, 1).reshape(b, n, -1)
                z = reference.dynamic_task_filter(z_tok, hw, layer.lora_filter.phi_weight, layer.lora_filter.phi.bias,
                                                  layer.lora_filter.filter_norm.std, layer.lora_filter.filter_norm.mean,
                                                  layer.window)[0]
                z = z.reshape(b, h_, w_, -1).permute(0, 3, 1, 2)
            else:
                z = tadformer_dtf(layer.lora_filter, z)
        else:
            z = layer.lora_filter[str(t)].conv2d(z)
        z = z.permute(0, 2, 3, 1).reshape(b, n, -1)
        base = F.linear(f, layer.weight, layer.bias) if layer.task_base == "task" else pretrained
        outs.append(base + z @ layer.lora_shared_B.t() * layer.scale)
    return shared, torch.stack(outs)


def _layer(cin, cout, **kw):
    torch.manual_seed(0)
    layer = TaskAwareLoRALinear(nn.Linear(cin, cout), **kw).double()
    with torch.no_grad():
        layer.lora_shared_B.normal_(0, 0.5)  # B starts at zero, which would hide the task filter
    return layer


@pytest.mark.parametrize("kw,task_inputs", [
    (dict(rank=4, tasks=1), True),
    (dict(rank=4, tasks=3, scale=2.0), True),
    (dict(rank=4, tasks=5, alpha=8.0, task_base="shared"), True),
    (dict(rank=4, tasks=2), False),
    (dict(rank=4, tasks=3, filter="static"), True),
    (dict(rank=4, tasks=2, filter="static", task_base="shared"), False),
], ids=["T1", "T3", "T5-sharedbase", "T2-noxtasks", "T3-static", "T2-static-sharedbase"])
def test_ta_module_matches_the_released_code(kw, task_inputs):
    layer = _layer(10, 6, **kw)
    hw = (7, 9)
    x = torch.randn(2, 63, 10, dtype=torch.float64, requires_grad=True)
    x_tasks = torch.randn(layer.num_tasks, 2, 63, 10, dtype=torch.float64, requires_grad=True) if task_inputs else None
    shared, tasks = layer(x, x_tasks, hw, stacked=True)
    ref_shared, ref_tasks = tadformer_ta_module(layer, x, x_tasks, hw)
    torch.testing.assert_close(shared, ref_shared, **F64)
    torch.testing.assert_close(tasks, ref_tasks, **F64)
    g1, g2 = torch.randn_like(shared), torch.randn_like(tasks)
    params = [p for p in layer.parameters() if p.requires_grad]
    leaves = [x] + ([x_tasks] if task_inputs else []) + params
    got = torch.autograd.grad((shared * g1).sum() + (tasks * g2).sum(), leaves)
    want = torch.autograd.grad((ref_shared * g1).sum() + (ref_tasks * g2).sum(), leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **F64)


def test_ta_module_windows_and_list_inputs():
    layer = _layer(8, 5, rank=4, tasks=2, window=7)
    hw = (9, 10)
    x = torch.randn(1, 90, 8, dtype=torch.float64)
    x_tasks = [torch.randn(1, 90, 8, dtype=torch.float64) for _ in range(2)]
    shared, tasks = layer(x, x_tasks, hw, stacked=True)
    ref_shared, ref_tasks = tadformer_ta_module(layer, x, torch.stack(x_tasks), hw)
    torch.testing.assert_close(tasks, ref_tasks, **F64)
    torch.testing.assert_close(shared, ref_shared, **F64)


def test_frozen_base_and_trainable_adapter():
    layer = TaskAwareLoRALinear(nn.Linear(8, 6), rank=4, tasks=3)
    with torch.no_grad():
        layer.lora_shared_B.normal_()  # at B = 0, A and the filter get no gradient
    x = torch.randn(2, 30, 8)
    shared, tasks = layer(x, torch.randn(3, 2, 30, 8), (5, 6), stacked=True)
    (shared.sum() + tasks.square().sum()).backward()
    assert layer.weight.grad is None and layer.bias.grad is None
    assert not layer.weight.requires_grad
    lora = dict(layer.named_parameters())
    for name in ("lora_shared_A", "lora_shared_B", "lora_filter.phi.weight", "lora_filter.phi.bias",
                 "lora_filter.filter_norm.std", "lora_filter.filter_norm.mean"):
        assert lora[name].grad is not None and lora[name].grad.abs().sum() > 0, name
    assert {n for n, _ in layer.named_parameters()} == {
        "weight", "bias", "lora_shared_A", "lora_shared_B", "lora_filter.phi.weight", "lora_filter.phi.bias",
        "lora_filter.filter_norm.std", "lora_filter.filter_norm.mean"}
    assert len(list(layer.lora_parameters())) == 6


def test_state_dict_names_static_and_linear_loading():
    base = nn.Linear(8, 6)
    layer = TaskAwareLoRALinear(base, rank=4, tasks=2, filter="static")
    assert set(layer.state_dict()) == {
        "weight", "bias", "lora_shared_A", "lora_shared_B",
        "lora_filter.0.conv2d.weight", "lora_filter.0.conv2d.bias",
        "lora_filter.1.conv2d.weight", "lora_filter.1.conv2d.bias"}
    # A plain Linear's state dict loads into the layer (LoRA keys are extra).
    fresh = TaskAwareLoRALinear(nn.Linear(8, 6), rank=4, tasks=2, filter="static")
    missing, unexpected = fresh.load_state_dict(nn.Linear(8, 6).state_dict(), strict=False)
    assert not unexpected and all(k.startswith("lora_") for k in missing)
    # At init B = 0: every output is the frozen layer's.
    x = torch.randn(1, 30, 8)
    shared, tasks = layer(x, None, (5, 6), stacked=True)
    torch.testing.assert_close(shared, base(x))
    torch.testing.assert_close(tasks, base(x).expand(2, -1, -1, -1))


def test_tasks_by_name_give_a_dict_and_the_released_filter_names():
    layer = TaskAwareLoRALinear(nn.Linear(8, 6), rank=4, tasks=["semseg", "normals"], filter="static")
    assert {k for k in layer.state_dict() if k.startswith("lora_filter.")} == {
        f"lora_filter.{t}.conv2d.{p}" for t in ("semseg", "normals") for p in ("weight", "bias")}
    with torch.no_grad():
        layer.lora_shared_B.normal_()
    x = torch.randn(2, 30, 8)
    x_tasks = {"normals": torch.randn(2, 30, 8), "semseg": torch.randn(2, 30, 8)}
    shared, tasks = layer(x, x_tasks, (5, 6))
    assert list(tasks) == ["semseg", "normals"]
    _, stacked = layer(x, [x_tasks["semseg"], x_tasks["normals"]], (5, 6), stacked=True)
    for i, name in enumerate(("semseg", "normals")):
        torch.testing.assert_close(tasks[name], stacked[i])
    with pytest.raises(ValueError, match="one entry per task"):
        layer(x, {"semseg": x}, (5, 6))


def test_num_tasks_keyword_still_works_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="num_tasks"):
        layer = TaskAwareLoRALinear(nn.Linear(4, 4), rank=2, num_tasks=3)
    assert layer.tasks == (0, 1, 2) and layer.num_tasks == 3


def test_bad_arguments():
    with pytest.raises(ValueError, match="filter must be one of"):
        TaskAwareLoRALinear(nn.Linear(4, 4), rank=2, tasks=2, filter="conv")
    with pytest.raises(ValueError, match="scale or alpha"):
        TaskAwareLoRALinear(nn.Linear(4, 4), rank=2, tasks=2, scale=1.0, alpha=2.0)
    layer = TaskAwareLoRALinear(nn.Linear(4, 4), rank=2, tasks=2)
    with pytest.raises(ValueError, match="x_tasks must"):
        layer(torch.randn(1, 6, 4), [torch.randn(1, 6, 4)], (2, 3))
    with pytest.raises(ValueError, match="hw"):
        layer(torch.randn(1, 6, 4), None)
    with pytest.raises(ValueError, match="kernel_size"):
        DynamicTaskFilter(4, kernel_size=2)


def test_lora_parameters_and_mark_only_lora_trainable_see_the_ta_module():
    from fastdense.nn import mark_only_lora_trainable

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), TaskAwareLoRALinear(torch.nn.Linear(8, 12), rank=4, tasks=3))
    mark_only_lora_trainable(model)
    ta = model[1]
    expected = {name for name, _ in ta.named_parameters() if name.startswith("lora_")}
    assert expected >= {"lora_shared_A", "lora_shared_B"} and any(n.startswith("lora_filter.") for n in expected)
    trainable = {name for name, p in ta.named_parameters() if p.requires_grad}
    assert trainable == expected
    assert not any(p.requires_grad for p in model[0].parameters())
    assert {id(p) for p in lora_parameters(model)} == {id(p) for n, p in ta.named_parameters() if n in expected}
