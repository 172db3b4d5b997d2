"""fastdense.nn LoRA modules against the LoRA / MTLoRA equations, peft and eager mode.

The oracles are hand-written loops in MTLoRA's and peft's style that use the
module's own Parameters, so forward values and the gradient of every LoRA
parameter are compared with torch autograd on plain tensor algebra.
"""
from __future__ import annotations

import copy
import math
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastdense.nn.lora as lora_mod
from fastdense.nn import LoRALinear, MultiTaskLoRALinear, inject_lora, lora_parameters, mark_only_lora_trainable
from fastdense.ops import reference

F64 = dict(rtol=1e-10, atol=1e-10)
TASKS = ["semseg", "depth", "normals"]
TASK_RANKS = {"semseg": 2, "depth": 3, "normals": 1}
TASK_SCALES = {"semseg": 4.0, "depth": 0.5, "normals": 2.0}


def randomise_lora(module: nn.Module) -> None:
    """B starts at zero, which would hide every LoRA term; give all adapters values."""
    with torch.no_grad():
        for p in lora_parameters(module):
            p.normal_(0.0, 0.5)


# ----------------------------------------------------------------------------- oracles
def mtlora_loop(layer: MultiTaskLoRALinear, x, u, x_tasks=None):
    """MTLoRA's MTLoRALinear.forward, written out (Eqs. 2-5 of fastdense.nn.lora); trainable
    scales enter as the Parameters themselves, so their gradients are autograd's."""
    pretrained = F.linear(x, layer.weight, layer.bias)
    s0 = layer.lora_shared_scale if layer.trainable_shared_scale else layer.shared_scale
    if layer.shared_mode != "addition":
        shared = (u @ layer.lora_shared_A.t() @ layer.lora_shared_B.t()) * s0
    if not layer.tasks:
        return pretrained + shared, None
    tasks = {}
    for t in layer.tasks:
        xt = x_tasks[t] if x_tasks is not None and t in x_tasks else u
        st = layer.lora_task_scale[t] if layer.trainable_task_scale else layer.task_scales[t]
        lt = xt @ layer.lora_tasks_A[t].t() @ layer.lora_tasks_B[t].t() * st
        tasks[t] = pretrained + lt + (shared if layer.shared_mode == "matrixv2" else 0)
    if layer.shared_mode == "addition":
        shared = layer.lora_norm(torch.stack(list(tasks.values())).sum(0))
    return pretrained + shared, tasks


def peft_style_loop(layer: LoRALinear, x, draw_dropout: bool):
    """peft's Linear.forward: base plus each active adapter in order, each with
    its own dropout draw (p = 0 draws nothing, like peft's nn.Identity)."""
    y = F.linear(x, layer.weight, layer.bias)
    for n in layer.active_adapters:
        p = layer.lora_dropout[n].p
        u = F.dropout(x, p, training=True) if (draw_dropout and p > 0) else x
        y = y + (u @ layer.lora_A[n].t() @ layer.lora_B[n].t()) * layer.scaling[n]
    return y


def flatten_outputs(shared, tasks):
    return [shared] + ([tasks[t] for t in sorted(tasks)] if tasks is not None else [])


def weighted_loss(outputs, cotangents):
    return sum((o * c).sum() for o, c in zip(outputs, cotangents))


# ----------------------------------------------------------------------------- MultiTaskLoRALinear
def make_mt(shared_mode="matrix", dropout=0.0, tasks=TASKS, dtype=torch.float64, trainable_scales=False):
    layer = MultiTaskLoRALinear(12, 10, tasks, shared_rank=5, task_ranks=TASK_RANKS if tasks else 4,
                                shared_scale=1.5, task_scale=TASK_SCALES if tasks else 4.0, dropout=dropout,
                                shared_mode=shared_mode, trainable_shared_scale=trainable_scales,
                                trainable_task_scale=trainable_scales, dtype=dtype)
    randomise_lora(layer)
    if trainable_scales:  # the scale Parameters are float32 like MTLoRA's; the test runs in the layer's dtype
        layer.to(dtype)
    return layer


@pytest.mark.parametrize("shared_mode", ["matrix", "matrixv2"])
@pytest.mark.parametrize("x_tasks_kind", ["none", "all", "partial"])
@pytest.mark.parametrize("train_dropout", [False, True], ids=["nodrop", "dropout"])
def test_mt_lora_matches_mtlora_forward_and_grads(shared_mode, x_tasks_kind, train_dropout):
    p = 0.3 if train_dropout else 0.0
    layer = make_mt(shared_mode, dropout=p).train()
    x = torch.randn(2, 7, 12, dtype=torch.float64, requires_grad=True)
    task_subset = {"none": [], "all": TASKS, "partial": ["depth"]}[x_tasks_kind]
    x_tasks = {t: torch.randn(2, 7, 12, dtype=torch.float64, requires_grad=True) for t in task_subset} or None

    torch.manual_seed(123)
    shared, tasks = layer(x, x_tasks)
    torch.manual_seed(123)
    u = F.dropout(x, p, training=True) if p > 0 else x
    ref_shared, ref_tasks = mtlora_loop(layer, x, u, x_tasks)

    assert list(tasks) == TASKS
    outputs, ref_outputs = flatten_outputs(shared, tasks), flatten_outputs(ref_shared, ref_tasks)
    for o, r in zip(outputs, ref_outputs):
        torch.testing.assert_close(o, r, **F64)

    cot = [torch.randn_like(o) for o in outputs]
    wrt = [x, *list(lora_parameters(layer)), *(x_tasks or {}).values()]
    got = torch.autograd.grad(weighted_loss(outputs, cot), wrt)
    want = torch.autograd.grad(weighted_loss(ref_outputs, cot), wrt)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **F64)
    # The frozen base receives no gradient.
    assert not layer.weight.requires_grad and not layer.bias.requires_grad


@pytest.mark.parametrize("shared_mode", ["matrix", "matrixv2"])
def test_mt_lora_matches_functional_reference_float32(shared_mode):
    layer = make_mt(shared_mode, dtype=torch.float32).eval()
    x = torch.randn(3, 5, 12)
    shared, tasks = layer(x)
    lora_a = torch.cat([layer.lora_shared_A] + [layer.lora_tasks_A[t] for t in TASKS]).detach()
    lora_b = torch.cat([layer.lora_shared_B] + [layer.lora_tasks_B[t] for t in TASKS], dim=1).detach()
    ref = reference.mt_lora_linear(x, layer.weight, layer.bias, lora_a, lora_b,
                                   [5, *(TASK_RANKS[t] for t in TASKS)], [1.5, *(TASK_SCALES[t] for t in TASKS)],
                                   shared_in_tasks=shared_mode == "matrixv2")
    torch.testing.assert_close(shared, ref[0])
    for i, t in enumerate(TASKS):
        torch.testing.assert_close(tasks[t], ref[i + 1])


def test_mt_lora_is_one_fused_call(monkeypatch):
    calls = []
    real = lora_mod.mt_lora_linear

    def counting(*args, **kwargs):
        calls.append(kwargs.get("x_tasks") is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(lora_mod, "mt_lora_linear", counting)
    layer = make_mt()
    x = torch.randn(4, 12, dtype=torch.float64)
    layer(x)
    layer(x, {"semseg": torch.randn_like(x)})
    assert calls == [False, True]


@pytest.mark.parametrize("tasks", [None, []])
def test_mt_lora_shared_only(tasks):
    layer = make_mt(tasks=tasks).eval()
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    out, task_out = layer(x)
    assert task_out is None and layer.tasks == []
    ref, _ = mtlora_loop(layer, x, x)
    torch.testing.assert_close(out, ref, **F64)
    g = torch.autograd.grad(out.sum(), [layer.lora_shared_A, layer.lora_shared_B])
    r = torch.autograd.grad(ref.sum(), [layer.lora_shared_A, layer.lora_shared_B])
    for a, b in zip(g, r):
        torch.testing.assert_close(a, b, **F64)
    assert not any(k.startswith("lora_tasks") for k in layer.state_dict())
    with pytest.raises(ValueError, match="no tasks"):
        layer(x, {"semseg": x})


def test_mt_lora_init_and_from_linear():
    linear = nn.Linear(16, 8)
    layer = MultiTaskLoRALinear.from_linear(linear, TASKS, shared_rank=64, task_ranks=4)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert not linear.weight.requires_grad
    bound = 1.0 / math.sqrt(16)  # kaiming_uniform(a=√5): gain·√(3/fan_in) = 1/√fan_in
    for a, b in [(layer.lora_shared_A, layer.lora_shared_B)] + [(layer.lora_tasks_A[t], layer.lora_tasks_B[t])
                                                                  for t in TASKS]:
        assert a.abs().max() <= bound and a.abs().max() > bound / 2
        assert torch.count_nonzero(b) == 0
    assert layer.lora_tasks_A["depth"].shape == (4, 16) and layer.lora_shared_B.shape == (8, 64)
    assert layer.lora_dropout.p == 0.05 and layer.shared_scale == 4.0
    x = torch.randn(5, 16)
    shared, tasks = layer.eval()(x)
    for o in [shared, *tasks.values()]:
        torch.testing.assert_close(o, linear(x))


def test_mt_lora_loads_mtlora_checkpoint():
    src = make_mt("matrixv2")
    mtlora_style = {("linear." + k if k in ("weight", "bias") else k): v.clone() for k, v in src.state_dict().items()}
    assert "linear.weight" in mtlora_style and "lora_tasks_A.depth" in mtlora_style
    dst = MultiTaskLoRALinear(12, 10, TASKS, shared_rank=5, task_ranks=TASK_RANKS, shared_scale=1.5,
                              task_scale=TASK_SCALES, shared_mode="matrixv2", dtype=torch.float64)
    dst.load_state_dict(mtlora_style, strict=True)
    x = torch.randn(3, 12, dtype=torch.float64)
    for a, b in zip(flatten_outputs(*src.eval()(x)), flatten_outputs(*dst.eval()(x))):
        torch.testing.assert_close(a, b, **F64)


@pytest.mark.parametrize("shared_mode", ["matrix", "matrixv2"])
def test_mt_lora_to_linear(shared_mode):
    layer = make_mt(shared_mode).eval()
    x = torch.randn(4, 12, dtype=torch.float64)
    shared, tasks = layer(x)
    torch.testing.assert_close(layer.to_linear()(x), shared, **F64)
    for t in TASKS:
        torch.testing.assert_close(layer.to_linear(t)(x), tasks[t], **F64)
    with pytest.raises(ValueError, match="unknown task"):
        layer.to_linear("edges")


def test_mt_lora_errors():
    with pytest.raises(ValueError, match="shared_mode"):
        MultiTaskLoRALinear(4, 4, TASKS, shared_mode="lora_only")
    with pytest.raises(ValueError, match="shared_rank"):
        MultiTaskLoRALinear(4, 4, TASKS, shared_rank=0)
    with pytest.raises(ValueError, match="task_ranks"):
        MultiTaskLoRALinear(4, 4, TASKS, task_ranks=-1)
    with pytest.raises(ValueError, match=r"task_ranks\['depth'\]"):
        MultiTaskLoRALinear(4, 4, TASKS, task_ranks={"semseg": 2, "depth": 0, "normals": 1})
    with pytest.raises(ValueError, match="missing"):
        MultiTaskLoRALinear(4, 4, TASKS, task_ranks={"semseg": 2})
    with pytest.raises(ValueError, match="unique"):
        MultiTaskLoRALinear(4, 4, ["a", "a"])
    with pytest.raises(ValueError, match="task name"):
        MultiTaskLoRALinear(4, 4, ["a.b"])
    with pytest.raises(ValueError, match="dropout"):
        MultiTaskLoRALinear(4, 4, TASKS, dropout=1.0)
    layer = MultiTaskLoRALinear(4, 4, TASKS)
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['edges'\]"):
        layer(x, {"edges": x})
    with pytest.raises(ValueError, match=r"x_tasks\['depth'\] must be a tensor of x's shape"):
        layer(x, {"depth": torch.randn(3, 4)})


# ----------------------------------------------------------------------------- 'addition' and trainable scales
@pytest.mark.parametrize("shared_mode", ["matrix", "matrixv2", "addition"])
@pytest.mark.parametrize("trainable_scales", [False, True], ids=["fixed", "trainable"])
@pytest.mark.parametrize("x_tasks_kind", ["none", "partial"])
def test_mt_lora_modes_and_trainable_scales_match_mtlora(shared_mode, trainable_scales, x_tasks_kind):
    p = 0.3
    layer = make_mt(shared_mode, dropout=p, trainable_scales=trainable_scales).train()
    assert hasattr(layer, "lora_norm") == (shared_mode == "addition")
    assert hasattr(layer, "lora_shared_A") == (shared_mode != "addition")
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    x_tasks = ({"normals": torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)}
               if x_tasks_kind == "partial" else None)
    torch.manual_seed(7)
    shared, tasks = layer(x, x_tasks)
    torch.manual_seed(7)
    ref_shared, ref_tasks = mtlora_loop(layer, x, F.dropout(x, p, training=True), x_tasks)
    outputs, ref_outputs = flatten_outputs(shared, tasks), flatten_outputs(ref_shared, ref_tasks)
    for o, r in zip(outputs, ref_outputs):
        torch.testing.assert_close(o, r, **F64)
    cot = [torch.randn_like(o) for o in outputs]
    wrt = [x, *lora_parameters(layer), *(x_tasks or {}).values()]
    got = torch.autograd.grad(weighted_loss(outputs, cot), wrt)
    want = torch.autograd.grad(weighted_loss(ref_outputs, cot), wrt)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **F64)
    names = [n for n, _ in layer.named_parameters() if n.startswith("lora_")]
    scale_names = [n for n in names if "scale" in n]
    if trainable_scales:
        expected = (["lora_task_scale." + t for t in TASKS] if shared_mode == "addition"
                    else ["lora_shared_scale", *("lora_task_scale." + t for t in TASKS)])
        assert sorted(scale_names) == sorted(expected)
        grads = dict(zip(names, got[1:1 + len(names)]))
        assert all(float(grads[n].abs()) > 0 for n in scale_names)
    else:
        assert scale_names == []


@pytest.mark.parametrize("shared_mode", ["matrixv2", "addition"])
def test_mt_lora_trainable_scales_fused_equals_torch_backend(shared_mode):
    """The fused (cpp) backend against the torch backend, float32, trainable scales and
    'addition': outputs and the gradient of every LoRA parameter and input."""
    from fastdense.ops import backend

    layer = make_mt(shared_mode, dtype=torch.float32, trainable_scales=True).eval()
    x = torch.randn(3, 4, 12, requires_grad=True)
    x_tasks = torch.randn(len(TASKS), 3, 4, 12, requires_grad=True)
    wrt = [x, x_tasks, *lora_parameters(layer)]

    def run():
        out = layer.forward_stacked(x, x_tasks)
        cot = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
        return [out, *torch.autograd.grad((out * cot).sum(), wrt)]

    fused = run()
    with backend("torch"):
        ref = run()
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_mt_lora_stacked_forward_equals_mapping_forward():
    layer = make_mt("matrixv2").eval()
    x = torch.randn(2, 3, 12, dtype=torch.float64)
    xt = {t: torch.randn_like(x) for t in TASKS}
    stacked = layer.forward_stacked(x, torch.stack([xt[t] for t in TASKS]))
    shared, tasks = layer(x, xt)
    assert stacked.shape == (1 + len(TASKS), 2, 3, 10)
    torch.testing.assert_close(stacked, torch.stack([shared, *(tasks[t] for t in TASKS)]), **F64)
    with pytest.raises(ValueError, match=r"stacked x_tasks must have shape \(T=3"):
        layer.forward_stacked(x, torch.randn(2, 2, 3, 12, dtype=torch.float64))
    shared_only = make_mt(tasks=None).eval()
    torch.testing.assert_close(shared_only.forward_stacked(x)[0], shared_only(x)[0], **F64)


def test_mt_lora_loads_mtlora_addition_checkpoint_with_trainable_scales():
    """The released layer's keys for shared_mode='addition' with trainable scales: no shared
    A/B, ``lora_norm``, one-element ``lora_task_scale.<task>`` and an unused ``lora_shared_scale``."""
    n_out, n_in = 10, 12
    official = {"linear.weight": torch.randn(n_out, n_in, dtype=torch.float64),
                "linear.bias": torch.randn(n_out, dtype=torch.float64),
                "lora_norm.weight": torch.rand(n_out, dtype=torch.float64) + 0.5,
                "lora_norm.bias": torch.randn(n_out, dtype=torch.float64),
                "lora_shared_scale": torch.tensor([4.0])}
    for t in TASKS:
        official[f"lora_tasks_A.{t}"] = torch.randn(TASK_RANKS[t], n_in, dtype=torch.float64)
        official[f"lora_tasks_B.{t}"] = torch.randn(n_out, TASK_RANKS[t], dtype=torch.float64)
        official[f"lora_task_scale.{t}"] = torch.tensor([TASK_SCALES[t] * 0.5])
    layer = MultiTaskLoRALinear(n_in, n_out, TASKS, shared_rank=5, task_ranks=TASK_RANKS, task_scale=TASK_SCALES,
                                shared_mode="add", trainable_shared_scale=True, trainable_task_scale=True,
                                dropout=0.0, dtype=torch.float64)
    assert layer.shared_mode == "addition" and not layer.trainable_shared_scale
    layer.load_state_dict(dict(official), strict=True)
    assert layer.task_scales == {t: TASK_SCALES[t] * 0.5 for t in TASKS}
    x = torch.randn(4, n_in, dtype=torch.float64)
    shared, tasks = layer.eval()(x)
    base = x @ official["linear.weight"].t() + official["linear.bias"]
    want = {t: base + TASK_SCALES[t] * 0.5 * (x @ official[f"lora_tasks_A.{t}"].t()
                                               @ official[f"lora_tasks_B.{t}"].t()) for t in TASKS}
    summed = sum(want.values())
    want_shared = base + F.layer_norm(summed, (n_out,), official["lora_norm.weight"], official["lora_norm.bias"])
    torch.testing.assert_close(shared, want_shared, **F64)
    for t in TASKS:
        torch.testing.assert_close(tasks[t], want[t], **F64)
        torch.testing.assert_close(layer.to_linear(t)(x), want[t], **F64)
    with pytest.raises(ValueError, match="not a linear function"):
        layer.to_linear()
    # Without tasks, 'addition' is 'matrix' (the released layer's fallback).
    assert MultiTaskLoRALinear(4, 4, None, shared_mode="addition").shared_mode == "matrix"


# ----------------------------------------------------------------------------- LoRALinear
def make_lora(dtype=torch.float64, **kw):
    layer = LoRALinear(12, 10, dtype=dtype, **{"r": 4, "alpha": 8.0, **kw})
    randomise_lora(layer)
    return layer


def test_lora_linear_matches_equation_forward_and_grads():
    layer = make_lora()
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    ref = F.linear(x, layer.weight, layer.bias) + 2.0 * (x @ layer.lora_A["default"].t() @ layer.lora_B["default"].t())
    torch.testing.assert_close(y, ref, **F64)
    cot = torch.randn_like(y)
    wrt = [x, layer.lora_A["default"], layer.lora_B["default"]]
    for g, w in zip(torch.autograd.grad((y * cot).sum(), wrt), torch.autograd.grad((ref * cot).sum(), wrt)):
        torch.testing.assert_close(g, w, **F64)


def test_lora_linear_init_state_dict_and_from_linear():
    linear = nn.Linear(12, 10)
    layer = LoRALinear(12, 10, r=4)
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A.default", "lora_B.default"}
    result = layer.load_state_dict(linear.state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["lora_A.default", "lora_B.default"] and not result.unexpected_keys
    assert not layer.weight.requires_grad and layer.lora_A["default"].requires_grad
    x = torch.randn(3, 12)
    torch.testing.assert_close(layer(x), linear(x))  # B = 0 at init
    # The reverse direction: a LoRA checkpoint's base loads into a plain Linear.
    plain = nn.Linear(12, 10)
    assert sorted(plain.load_state_dict(layer.state_dict(), strict=False).unexpected_keys) == [
        "lora_A.default", "lora_B.default"]

    wrapped = LoRALinear.from_linear(linear, r=2, alpha=4.0)
    assert wrapped.weight is linear.weight and wrapped.bias is linear.bias and not linear.weight.requires_grad
    assert wrapped.scaling["default"] == 2.0 and torch.count_nonzero(wrapped.lora_B["default"]) == 0
    no_bias = LoRALinear.from_linear(nn.Linear(12, 10, bias=False), r=2)
    assert no_bias.bias is None and set(no_bias.state_dict()) == {"weight", "lora_A.default", "lora_B.default"}
    with pytest.raises(TypeError, match="nn.Linear"):
        LoRALinear.from_linear(nn.Conv2d(3, 3, 1))


def test_lora_linear_merge_unmerge_round_trip():
    layer = make_lora(dtype=torch.float32)
    layer.add_adapter("extra", r=3, alpha=3.0)
    randomise_lora(layer)
    layer.set_adapter(["default", "extra"])
    w0 = layer.weight.detach().clone()
    x = torch.randn(6, 12)
    y0 = layer(x)
    layer.merge()
    assert layer.merged and layer.merged_adapters == ["default", "extra"]
    assert not torch.allclose(layer.weight, w0)
    torch.testing.assert_close(layer.weight, w0 + sum(layer.get_delta_weight(n) for n in ("default", "extra")))
    torch.testing.assert_close(layer(x), y0, rtol=1e-5, atol=1e-5)
    layer.merge()  # merging again is a no-op
    assert layer.merged_adapters == ["default", "extra"]
    with pytest.raises(ValueError, match="unmerge"):
        layer.delete_adapter("extra")
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.weight, w0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer(x), y0, rtol=1e-5, atol=1e-5)
    # Partially merged: the merged adapter is in W, the other still runs as LoRA.
    layer.merge(["extra"])
    torch.testing.assert_close(layer(x), y0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.to_linear()(x), y0, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.to_linear()(x), y0, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown adapter"):
        layer.merge(["nope"])


def test_lora_linear_named_adapters():
    layer = make_lora()
    layer.add_adapter("b", r=2, alpha=1.0)
    layer.add_adapter("c", r=5, alpha=10.0)
    randomise_lora(layer)
    assert layer.adapters == ["default", "b", "c"] and layer.active_adapters == ["default"]
    assert layer.scaling == {"default": 2.0, "b": 0.5, "c": 2.0}
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    base = F.linear(x, layer.weight, layer.bias)

    def term(n):
        return layer.scaling[n] * (x @ layer.lora_A[n].t() @ layer.lora_B[n].t())

    layer.set_adapter("b")
    torch.testing.assert_close(layer(x), base + term("b"), **F64)
    layer.set_adapter(["c", "default", "b"])
    y, ref = layer(x), base + term("c") + term("default") + term("b")
    torch.testing.assert_close(y, ref, **F64)
    params = [x, *lora_parameters(layer)]
    for g, w in zip(torch.autograd.grad(y.square().sum(), params), torch.autograd.grad(ref.square().sum(), params)):
        torch.testing.assert_close(g, w, **F64)
    layer.set_adapter([])
    torch.testing.assert_close(layer(x), base, **F64)

    layer.set_adapter(["default", "b"])
    layer.delete_adapter("b")
    assert layer.adapters == ["default", "c"] and layer.active_adapters == ["default"]
    assert "lora_A.b" not in layer.state_dict()
    with pytest.raises(ValueError, match="already exists"):
        layer.add_adapter("c", r=2)
    with pytest.raises(ValueError, match="unknown adapter"):
        layer.set_adapter(["default", "b"])
    with pytest.raises(ValueError, match="unknown adapter"):
        layer.delete_adapter("b")
    with pytest.raises(ValueError, match="positive int"):
        layer.add_adapter("d", r=0)
    with pytest.raises(ValueError, match="clashes"):
        layer.add_adapter("training", r=2)


def test_lora_linear_dropout_train_only():
    layer = make_lora(dropout=0.5)
    x = torch.randn(8, 12, dtype=torch.float64)
    layer.train()
    torch.manual_seed(7)
    y1 = layer(x)
    torch.manual_seed(7)
    y2 = layer(x)
    torch.manual_seed(7)
    ref = peft_style_loop(layer, x, draw_dropout=True)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    torch.testing.assert_close(y1, ref, **F64)

    no_dropout = make_lora(dropout=0.0)
    no_dropout.load_state_dict(layer.state_dict())
    y_eval = layer.eval()(x)
    assert not torch.allclose(y1, y_eval)
    torch.testing.assert_close(y_eval, no_dropout.eval()(x), rtol=0, atol=0)
    torch.testing.assert_close(y_eval, no_dropout.train()(x), rtol=0, atol=0)


def test_lora_linear_several_adapters_with_dropout_match_peft_semantics():
    layer = make_lora(dropout=0.3)
    layer.add_adapter("plain", r=2, alpha=2.0, dropout=0.0)
    layer.add_adapter("drop", r=3, alpha=6.0, dropout=0.6)
    randomise_lora(layer)
    layer.set_adapter(["default", "plain", "drop"])
    x = torch.randn(2, 6, 12, dtype=torch.float64, requires_grad=True)
    for mode in (True, False):
        layer.train(mode)
        torch.manual_seed(11)
        y = layer(x)
        torch.manual_seed(11)
        ref = peft_style_loop(layer, x, draw_dropout=mode)
        torch.testing.assert_close(y, ref, **F64)
        params = [x, *lora_parameters(layer)]
        for g, w in zip(torch.autograd.grad(y.sum(), params), torch.autograd.grad(ref.sum(), params)):
            torch.testing.assert_close(g, w, **F64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mt_and_lora_dtypes(dtype):
    layer = make_lora(dtype=dtype).eval()
    mt = make_mt(dtype=dtype).eval()
    x = torch.randn(3, 12, dtype=dtype)
    tol = dict(rtol=2e-2, atol=5e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    x64 = x.double()
    ref = F.linear(x64, layer.weight.double(), layer.bias.double()) + layer.scaling["default"] * (
        x64 @ layer.lora_A["default"].double().t() @ layer.lora_B["default"].double().t())
    assert layer(x).dtype == dtype
    torch.testing.assert_close(layer(x).double(), ref, **tol)
    shared, tasks = mt(x)
    ref_shared, ref_tasks = mtlora_loop(mt.double(), x64, x64)
    torch.testing.assert_close(shared.double(), ref_shared, **tol)
    for t in TASKS:
        torch.testing.assert_close(tasks[t].double(), ref_tasks[t], **tol)


# ----------------------------------------------------------------------------- inject_lora
class Attention(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        return self.proj(a @ v)


class Mlp(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(dim)
        self.mlp = Mlp(dim)

    def forward(self, x):
        x = x + self.attn(self.norm(x))
        return x + self.mlp(self.norm(x))


class ToyNet(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.blocks = nn.Sequential(Block(dim), Block(dim))
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        return self.head(self.blocks(x))


def test_inject_lora_names_freezing_and_identity_at_init():
    model = ToyNet()
    original = copy.deepcopy(model)
    x = torch.randn(2, 5, 8)
    names = inject_lora(model, ["qkv", "attn.proj", "fc1"], r=4, alpha=8.0)
    assert names == ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1",
                     "blocks.1.attn.qkv", "blocks.1.attn.proj", "blocks.1.mlp.fc1"]
    assert all(isinstance(model.get_submodule(n), LoRALinear) for n in names)
    assert isinstance(model.blocks[0].mlp.fc2, nn.Linear) and isinstance(model.head, nn.Linear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}.default" for n in names for ab in "AB"}
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in lora_parameters(model)}
    torch.testing.assert_close(model(x), original(x))
    # Base keys are unchanged, so the pretrained checkpoint still loads.
    result = model.load_state_dict(original.state_dict(), strict=False)
    assert not result.unexpected_keys and all(".lora_" in k for k in result.missing_keys)

    model.blocks[0].attn.qkv.lora_B["default"].data.normal_()
    model(x).sum().backward()
    assert model.blocks[0].attn.qkv.lora_A["default"].grad is not None
    assert model.blocks[0].attn.qkv.weight.grad is None and model.head.weight.grad is None


def test_inject_lora_matching_rules_and_errors():
    model = ToyNet()
    names = inject_lora(copy.deepcopy(model), [re.compile(r"blocks\.1\.mlp\.fc\d")], r=2, alpha=2)
    assert names == ["blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]
    assert inject_lora(copy.deepcopy(model), "head", r=2, alpha=2) == ["head"]
    assert inject_lora(copy.deepcopy(model), "blocks.0.attn.qkv", r=2, alpha=2) == ["blocks.0.attn.qkv"]
    for bad in ["kv", "0.attn", "nothing"]:
        with pytest.raises(ValueError, match=r"matches no nn.Linear.*'blocks.0.attn.qkv'"):
            inject_lora(copy.deepcopy(model), ["qkv", bad], r=2, alpha=2)
    with pytest.raises(ValueError, match="no nn.Linear"):
        inject_lora(copy.deepcopy(model), re.compile("fc"), r=2, alpha=2)  # fullmatch, not search
    injected = copy.deepcopy(model)
    inject_lora(injected, "qkv", r=2, alpha=2)
    with pytest.raises(ValueError, match="already has LoRA"):
        inject_lora(injected, "qkv", r=2, alpha=2)
    with pytest.raises(ValueError, match="targets is empty"):
        inject_lora(copy.deepcopy(model), [], r=2, alpha=2)
    mha = nn.Sequential(nn.MultiheadAttention(8, 2), nn.Linear(8, 8))
    with pytest.raises(ValueError, match="MultiheadAttention"):
        inject_lora(mha, "out_proj", r=2, alpha=2)
    with pytest.raises(ValueError, match="itself"):
        inject_lora(nn.Linear(4, 4), re.compile(".*"), r=2, alpha=2)


def test_inject_lora_replaces_aliases_and_keeps_trainability_when_asked():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    assert inject_lora(model, "0", r=2, alpha=2, freeze_base=False) == ["0"]
    assert model[0] is model[2] and isinstance(model[0], LoRALinear)
    assert model[0].weight.requires_grad
    mark_only_lora_trainable(model)
    assert [p.requires_grad for p in model.parameters()] == [False, False, True, True]


class MTBlock(nn.Module):
    """MTLoRA-style caller: every adapted Linear returns (shared, {task: out})."""

    def __init__(self, dim=8):
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x):
        h, h_tasks = self.fc1(x)
        h_tasks = {t: F.gelu(v) for t, v in h_tasks.items()}
        return self.fc2(F.gelu(h), h_tasks)


def test_inject_multitask_lora():
    model = MTBlock()
    plain = copy.deepcopy(model)
    names = inject_lora(model, ["fc1", "fc2"], r=8, alpha=32.0, dropout=0.1, tasks=TASKS,
                        task_r={"semseg": 2, "depth": 4, "normals": 2}, task_alpha=8.0, shared_mode="matrixv2")
    assert names == ["fc1", "fc2"]
    fc1 = model.fc1
    assert isinstance(fc1, MultiTaskLoRALinear) and fc1.shared_mode == "matrixv2"
    assert fc1.shared_rank == 8 and fc1.shared_scale == 4.0 and fc1.lora_dropout.p == 0.1
    assert fc1.task_ranks == {"semseg": 2, "depth": 4, "normals": 2}
    assert fc1.task_scales == {"semseg": 4.0, "depth": 2.0, "normals": 4.0}
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in lora_parameters(model)}
    x = torch.randn(3, 8)
    shared, tasks = model.eval()(x)
    want = plain.fc2(F.gelu(plain.fc1(x)))
    for o in [shared, *tasks.values()]:
        torch.testing.assert_close(o, want)
    default_scale = inject_lora(copy.deepcopy(plain), "fc1", r=8, alpha=32.0, tasks=["a"])
    assert default_scale == ["fc1"]


# ----------------------------------------------------------------------------- peft
class PeftToy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(10, 16)
        self.fc2 = nn.Linear(16, 6)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


@pytest.mark.parametrize("lora_dropout", [0.0, 0.25])
def test_matches_peft_lora(lora_dropout):
    peft = pytest.importorskip("peft", reason="peft is an optional dependency (pip install fastdense[peft])")
    base = PeftToy().double()
    config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["fc1", "fc2"], lora_dropout=lora_dropout)
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.3)

    ours = copy.deepcopy(base)
    assert inject_lora(ours, ["fc1", "fc2"], r=4, alpha=12, dropout=lora_dropout) == ["fc1", "fc2"]
    with torch.no_grad():
        for n in ("fc1", "fc2"):
            pl = theirs.base_model.model.get_submodule(n)
            ours.get_submodule(n).lora_A["default"].copy_(pl.lora_A["default"].weight)
            ours.get_submodule(n).lora_B["default"].copy_(pl.lora_B["default"].weight)

    # peft's state dict (prefix stripped) loads straight into the injected model as well.
    from_sd = copy.deepcopy(base)
    inject_lora(from_sd, ["fc1", "fc2"], r=4, alpha=12, dropout=lora_dropout)
    prefix = "base_model.model."
    from_sd.load_state_dict({k[len(prefix):]: v for k, v in theirs.state_dict().items()}, strict=True)

    x = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    for training in (False, True):
        for m in (theirs, ours, from_sd):
            m.train(training)
        outs = []
        for m in (theirs, ours, from_sd):
            torch.manual_seed(5)
            outs.append(m(x))
        torch.testing.assert_close(outs[1], outs[0], **F64)
        torch.testing.assert_close(outs[2], outs[0], **F64)
        g_theirs = torch.autograd.grad(outs[0].sum(), [x] + [p for n, p in theirs.named_parameters() if "lora_" in n])
        g_ours = torch.autograd.grad(outs[1].sum(), [x, *lora_parameters(ours)])
        # peft orders parameters fc1.A, fc1.B, fc2.A, fc2.B like lora_parameters does.
        for a, b in zip(g_ours, g_theirs):
            torch.testing.assert_close(a, b, **F64)


# ----------------------------------------------------------------------------- torch.compile
class CompileToy(nn.Module):
    def __init__(self):
        super().__init__()
        self.mt = MultiTaskLoRALinear(8, 8, ["seg", "depth"], shared_rank=4, task_ranks={"seg": 2, "depth": 3},
                                      dropout=0.0, shared_mode="matrixv2")
        self.lora = LoRALinear(8, 4, r=2, alpha=4.0)
        self.lora.add_adapter("second", r=3, alpha=3.0)
        self.lora.set_adapter(["default", "second"])

    def forward(self, x, x_seg):
        shared, tasks = self.mt(x, {"seg": x_seg})
        return self.lora(shared) + self.lora(tasks["seg"]) * self.lora(tasks["depth"])


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    eager = CompileToy()
    randomise_lora(eager)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    x = torch.randn(2, 3, 8)
    x_seg = torch.randn(2, 3, 8)
    y_eager = eager(x, x_seg)
    y_compiled = compiled(x, x_seg)
    torch.testing.assert_close(y_compiled, y_eager, rtol=1e-5, atol=1e-5)
    y_eager.square().sum().backward()
    y_compiled.square().sum().backward()
    eager_grads = [p.grad for p in lora_parameters(eager)]
    compiled_grads = [p.grad for p in lora_parameters(compiled_model)]
    assert all(g is not None for g in eager_grads + compiled_grads)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_multitask_lora_returns_a_dict_or_the_stacked_tensor():
    """The keyword every multi-task module takes: stacked=True gives the (T, ..., N) tensor."""
    layer = MultiTaskLoRALinear(8, 6, tasks=["seg", "depth"], shared_rank=4, task_ranks=2)
    torch.nn.init.normal_(layer.lora_tasks_B["depth"])
    x = torch.randn(2, 5, 8)
    shared, tasks = layer.eval()(x)
    shared_s, stacked = layer(x, stacked=True)
    assert list(tasks) == ["seg", "depth"] and stacked.shape == (2, 2, 5, 6)
    torch.testing.assert_close(shared_s, shared)
    for i, name in enumerate(("seg", "depth")):
        torch.testing.assert_close(stacked[i], tasks[name])
