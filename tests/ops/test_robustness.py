"""Regression tests for inputs that once gave silently wrong results or errors that named nothing.

Each test names the defect it pins down; every available backend runs it.
"""
from __future__ import annotations

import pytest
import torch

import fastdense
from fastdense.ops import reference

from _backends import backend_params, device_for

T_TRAIN = 1000


def _schedule(device="cpu"):
    return torch.linspace(0.9999, 0.01, T_TRAIN, dtype=torch.float32, device=device)


# ----------------------------------------------------------------------------- strided inputs
@pytest.mark.parametrize("backend", backend_params("mt_lora_linear"))
@pytest.mark.parametrize("bias_kind", ["column-slice", "stride-0"])
def test_mt_lora_linear_honours_the_stride_of_bias(backend, bias_kind):
    """Triton once read bias_ptr + col: a column slice gave wrong values, an expanded bias read out of bounds."""
    device = device_for(backend)
    x, w, a, b = (torch.randn(*s, device=device) for s in ((3, 8), (16, 8), (4, 8), (16, 4)))
    bias = torch.randn(16, 2, device=device)[:, 0] if bias_kind == "column-slice" else \
        torch.tensor([0.5], device=device).expand(16)
    assert not bias.is_contiguous()
    ref = reference.mt_lora_linear(x, w, bias, a, b, [2, 2], [1.0, 1.0])
    with fastdense.ops.backend(backend):
        out = fastdense.ops.mt_lora_linear(x, w, bias, a, b, [2, 2], [1.0, 1.0])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", backend_params("q_sample_multi"))
@pytest.mark.parametrize("kind", ["column-slice", "stride-0"])
def test_q_sample_multi_honours_the_stride_of_timesteps(backend, kind):
    """Triton once read ts_ptr + i of a strided int64 timesteps tensor (wrong rows, or NaN past the storage)."""
    device = device_for(backend)
    ts = torch.tensor([[10, 500], [900, 7]])[:, 0] if kind == "column-slice" else torch.tensor([500]).expand(3)
    ts = ts.to(device)
    assert not ts.is_contiguous()
    z0, noise = torch.randn(3, 2, 2, device=device), torch.randn(3, 2, 2, device=device)
    ref = reference.q_sample_multi(z0, noise, ts, _schedule(device))
    with fastdense.ops.backend(backend):
        out = fastdense.ops.q_sample_multi(z0, noise, ts, _schedule(device))
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- Dynamic Task Filter statistics
def _dtf_params(r, k, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(r * k * k, r, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    std = torch.rand(r * k * k, generator=g, dtype=torch.float64).add(0.5).to(dtype=dtype, device=device)
    return w, std


@pytest.mark.parametrize("backend", backend_params("dynamic_task_filter"))
def test_dtf_gradients_are_finite_when_a_filter_has_equal_taps(backend):
    """FilterNorm's std is 0 for a filter whose k² taps are equal; the backward once divided 0 by 0.

    The issue's case: zero tokens, so φ gives all-zero filters, and the gradient
    reaching θ is zero too. Every gradient must be finite and equal autograd
    through the reference.
    """
    device = device_for(backend)
    dtype = torch.float64 if backend in ("cpp", "torch") else torch.float32
    h = torch.zeros(1, 9, 2, dtype=dtype, device=device, requires_grad=True)
    w = torch.randn(18, 2, dtype=dtype, device=device, requires_grad=True)
    std = torch.ones(18, dtype=dtype, device=device)
    with fastdense.ops.backend(backend):
        out = fastdense.ops.dynamic_task_filter(h, (3, 3), w, None, std, None)
    grads = torch.autograd.grad(out.sum(), (h, w))
    ref_grads = torch.autograd.grad(reference.dynamic_task_filter(h, (3, 3), w, None, std, None)[0].sum(), (h, w))
    for g, rg in zip(grads, ref_grads):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, rg)


@pytest.mark.parametrize("backend", backend_params("ta_lora_dtf"))
def test_ta_lora_dtf_gradients_are_finite_when_a_filter_has_equal_taps(backend):
    device = device_for(backend)
    dtype = torch.float64 if backend in ("cpp", "torch") else torch.float32
    r, c, k = 2, 4, 3
    f = torch.zeros(2, 1, 9, c, dtype=dtype, device=device, requires_grad=True)
    base = torch.randn(2, 1, 9, c, dtype=dtype, device=device)
    a = torch.randn(r, c, dtype=dtype, device=device, requires_grad=True)
    b = torch.randn(c, r, dtype=dtype, device=device, requires_grad=True)
    w, std = _dtf_params(r, k, dtype, device)
    w.requires_grad_(True)
    with fastdense.ops.backend(backend):
        out = fastdense.ops.ta_lora_dtf(f, base, a, b, 1.0, (3, 3), w, None, std, None)
    grads = torch.autograd.grad(out.square().sum(), (f, a, b, w))
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("backend", [p for p in backend_params("dynamic_task_filter") if p.values[0] != "cpp"])
def test_dtf_statistics_do_not_overflow_in_fp16(backend):
    """fp16 squares of filter logits of a few hundred overflowed: std = inf gave θ = 0 silently."""
    device = device_for(backend)  # cpp runs float32/float64 only
    r, k = 2, 3
    g = torch.Generator().manual_seed(0)
    h = torch.randn(1, 9, r, generator=g) * 300
    w, std = _dtf_params(r, k, torch.float32)
    ref = reference.dynamic_task_filter(h.double(), (3, 3), w.double(), None, std.double(), None)[0]
    with fastdense.ops.backend(backend):
        out = fastdense.ops.dynamic_task_filter(h.half().to(device), (3, 3), w.half().to(device), None,
                                                std.half().to(device), None)
    assert torch.isfinite(out).all()
    rel = (out.double().cpu() - ref).abs().max() / ref.abs().max()
    assert rel < 5e-3, rel


# ----------------------------------------------------------------------------- degenerate shapes
@pytest.mark.parametrize("head_reduce", ["mean", "sum", "none"])
def test_attn_mask_aggregate_rejects_zero_heads(head_reduce):
    """cpp gave 0, torch NaN, Triton NaN and a ZeroDivisionError backward: H = 0 is now an error."""
    q = torch.randn(1, 0, 5, 4)
    with pytest.raises(ValueError, match="H >= 1"):
        fastdense.ops.attn_mask_aggregate(q, q, torch.rand(1, 5, 3), 0.5, head_reduce=head_reduce)


@pytest.mark.parametrize("backend", backend_params("ta_lora_dtf"))
def test_dtf_ops_map_empty_batches_to_empty_results(backend):
    """The torch backend once failed in conv2d ("non-positive groups") on S = 0 / B = 0."""
    device = device_for(backend)
    r, c, k = 4, 6, 3
    w, std = _dtf_params(r, k, torch.float32, device)
    w.requires_grad_(True)
    with fastdense.ops.backend(backend):
        h = torch.zeros(0, 9, r, device=device, requires_grad=True)
        out = fastdense.ops.dynamic_task_filter(h, (3, 3), w, None, std, None)
        assert out.shape == (0, 9, r)
        gh, gw = torch.autograd.grad(out.sum(), (h, w))
        assert gh.shape == h.shape and torch.equal(gw, torch.zeros_like(gw))
        f = torch.zeros(2, 0, 9, c, device=device, requires_grad=True)
        a, b = torch.randn(r, c, device=device), torch.randn(c, r, device=device)
        out = fastdense.ops.ta_lora_dtf(f, torch.zeros(2, 0, 9, c, device=device), a, b, 1.0, (3, 3), w, None,
                                        std, None)
        assert out.shape == (2, 0, 9, c)
        assert torch.autograd.grad(out.sum(), f)[0].shape == f.shape


# ----------------------------------------------------------------------------- arguments that were silently truncated
@pytest.mark.parametrize("ranks, scales, error, match", [
    (None, [1.0, 1.0], TypeError, "ranks"),
    (3, [1.0, 1.0], TypeError, "ranks"),
    ([3.7], [1.0], TypeError, r"ranks\[0\]"),
    ([True, 2], [1.0, 1.0], TypeError, r"ranks\[0\]"),
    ([2, 0], [1.0, 1.0], ValueError, r"ranks\[1\]"),
    ([2, 2], ["a", "b"], TypeError, r"scales\[0\]"),
    ([2, 2], None, TypeError, "scales"),
])
def test_mt_lora_linear_names_bad_ranks_and_scales(ranks, scales, error, match):
    x, w, a, b = torch.randn(3, 8), torch.randn(16, 8), torch.randn(4, 8), torch.randn(16, 4)
    with pytest.raises(error, match=match):
        fastdense.ops.mt_lora_linear(x, w, None, a, b, ranks, scales)


def test_q_sample_multi_refuses_float_timesteps_in_a_list():
    """[1.5, 7.9] was truncated to [1, 7] while a float tensor was refused."""
    z0 = torch.randn(2, 4)
    with pytest.raises(TypeError, match=r"timesteps\[0\]"):
        fastdense.ops.q_sample_multi(z0, torch.randn(2, 4), [1.5, 7.9], _schedule())


def test_meta_tensors_propagate_shapes():
    """A meta first argument failed in the autocast cast ("unknown device type for autocast")."""
    m = torch.device("meta")
    out = fastdense.ops.mt_lora_linear(torch.randn(3, 8, device=m), torch.randn(16, 8, device=m), None,
                                       torch.randn(4, 8, device=m), torch.randn(16, 4, device=m), [2, 2], [1.0, 1.0])
    assert out.shape == (2, 3, 16) and out.device.type == "meta"
    out = fastdense.ops.q_sample_multi(torch.randn(2, 4, device=m), torch.randn(2, 4, device=m), [1, 2],
                                       _schedule().to(m))
    assert out.shape == (4, 4) and out.device.type == "meta"
    q = torch.randn(1, 2, 5, 4, device=m)
    assert fastdense.ops.attn_mask_aggregate(q, q, torch.rand(1, 5, 3, device=m), 0.5).shape == (1, 5, 3)
    x = torch.randn(2, 5, 8, device=m)
    out = fastdense.ops.skill_gated_transform(x, torch.randn(8, 2, device=m), torch.randn(2, 8, device=m),
                                              torch.randn(3, 2, device=m), torch.randn(4, 2, 3, device=m),
                                              torch.randn(4, 2, 3, device=m))
    assert out.shape == (4, 2, 5, 8)
