"""TimestepFeatureConsolidation (Eq. 3) against a plainly written attention.

The oracle loops over samples, tokens and heads and applies an explicit
softmax over the k timestep scores, using the module's own Parameters (base
weight + s · B A for the LoRA projections), so values and gradients of the
module are compared with autograd on plain tensor algebra.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastdense.nn import TimestepFeatureConsolidation

F64 = dict(rtol=1e-10, atol=1e-10)


def _randomise_lora(module: TimestepFeatureConsolidation) -> None:
    """B starts at zero, which would hide the LoRA terms."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if ".lora_" in name:
                p.normal_(0.0, 0.3)


def _effective(layer) -> tuple[torch.Tensor, torch.Tensor | None]:
    """W0 + s·B·A of a LoRALinear (no dropout), or an nn.Linear's weight."""
    w = layer.weight
    if hasattr(layer, "lora_A"):
        for n in layer.active_adapters:
            w = w + layer.scaling[n] * layer.lora_B[n] @ layer.lora_A[n]
    return w, layer.bias


def reference_tfc(module: TimestepFeatureConsolidation, label: torch.Tensor, feats: torch.Tensor):
    """Eq. 3 per token and head with an explicit softmax over the k timesteps.

    label (B, N, d), feats (B, k, N, d) -> key (B, N, d), O_TS (B, heads, N, k).
    """
    wq, bq = _effective(module.q_proj)
    wk, bk = _effective(module.k_proj)
    wv, bv = _effective(module.v_proj)
    b, k, n, d = feats.shape
    h, dh = module.heads, module.head_dim
    keys_out, atts = [], []
    for i in range(b):
        tok_out, tok_att = [], []
        for j in range(n):
            q = F.linear(label[i, j], wq, bq)            # (d,)
            keys = F.linear(feats[i, :, j], wk, bk)      # (k, d)
            vals = F.linear(feats[i, :, j], wv, bv)      # (k, d)
            head_out, head_att = [], []
            for hh in range(h):
                sl = slice(hh * dh, (hh + 1) * dh)
                s = keys[:, sl] @ q[sl] / math.sqrt(dh)  # (k,)
                e = torch.exp(s - s.max())
                a = e / e.sum()
                head_att.append(a)
                head_out.append(a @ vals[:, sl])
            tok_out.append(torch.cat(head_out))
            tok_att.append(torch.stack(head_att))       # (heads, k)
        keys_out.append(torch.stack(tok_out))           # (N, d)
        atts.append(torch.stack(tok_att, dim=1))        # (heads, N, k)
    out, o_ts = torch.stack(keys_out), torch.stack(atts)
    if module.out_proj is not None:
        out = F.linear(out, module.out_proj.weight, module.out_proj.bias)
    return out, o_ts


def _make(dim=12, heads=3, k=4, b=2, n=5, dtype=torch.float64, out_proj=False, seed=0):
    torch.manual_seed(seed)
    m = TimestepFeatureConsolidation(dim, heads, lora_r=2, lora_alpha=4, lora_dropout=0.2,
                                     out_proj=out_proj, dtype=dtype)
    _randomise_lora(m)
    label = torch.randn(b, n, dim, dtype=dtype)
    feats = torch.randn(b, k, n, dim, dtype=dtype)
    return m, label, feats


@pytest.mark.parametrize("dim,heads,k,b,n,out_proj", [
    (12, 3, 4, 2, 5, False),
    (8, 1, 1, 1, 3, False),     # k = 1: the attention is exactly 1
    (10, 5, 3, 3, 7, True),     # odd widths, output projection
    (6, 2, 7, 1, 1, False),     # many timesteps, one token
])
def test_matches_reference_forward_and_backward(dim, heads, k, b, n, out_proj):
    m, label, feats = _make(dim, heads, k, b, n, out_proj=out_proj)
    m.eval()
    label.requires_grad_(True)
    feats.requires_grad_(True)
    key, att = m(label, feats)
    assert key.shape == (b, n, dim) and att.shape == (b, heads, n, k)
    ref_key, ref_att = reference_tfc(m, label, feats)
    torch.testing.assert_close(key, ref_key, **F64)
    torch.testing.assert_close(att, ref_att, **F64)
    torch.testing.assert_close(att.sum(-1), torch.ones(b, heads, n, dtype=att.dtype), **F64)

    g_key, g_att = torch.randn_like(key), torch.randn_like(att)
    params = [p for p in m.parameters() if p.requires_grad]
    got = torch.autograd.grad((key * g_key).sum() + (att * g_att).sum(), [label, feats, *params])
    want = torch.autograd.grad((ref_key * g_key).sum() + (ref_att * g_att).sum(), [label, feats, *params])
    for (name, _), g, w in zip([("label", 0), ("feats", 0), *m.named_parameters()], got, want):
        torch.testing.assert_close(g, w, **F64, msg=lambda s, name=name: f"grad of {name}: {s}")


def test_maps_equal_tokens():
    m, label, feats = _make(dim=8, heads=2, k=3, b=2, n=6)
    m.eval()
    hgt, wid = 2, 3
    label_map = label.transpose(1, 2).reshape(2, 8, hgt, wid)
    feats_map = feats.transpose(2, 3).reshape(2, 3, 8, hgt, wid)
    key, att = m(label, feats)
    for lab in (label, label_map):
        key_m, att_m = m(lab, feats_map)
        torch.testing.assert_close(key_m, key, **F64)
        torch.testing.assert_close(att_m, att, **F64)


def test_frozen_base_gets_no_gradient_only_lora_does():
    m, label, feats = _make(dim=8, heads=2, k=3, out_proj=True, dtype=torch.float32)
    m.train()
    trainable_before = {n for n, p in m.named_parameters() if p.requires_grad}
    # Created trainable: TFC is trained from scratch in meta-training.
    assert trainable_before == {n for n, _ in m.named_parameters()}
    m.freeze_base()
    key, att = m(label, feats)
    (key.square().sum() + att.square().sum()).backward()
    for name, p in m.named_parameters():
        if ".lora_" in name:
            assert name.startswith(("q_proj.", "v_proj."))
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    lora_names = sorted(n for n, p in m.named_parameters() if p.requires_grad)
    assert lora_names == ["q_proj.lora_A.default", "q_proj.lora_B.default",
                          "v_proj.lora_A.default", "v_proj.lora_B.default"]
    m.set_base_trainable(True)
    assert all(p.requires_grad for p in m.parameters())


def test_lora_zero_init_equals_base_attention():
    """With B = 0 (the Eq. 4 initialisation) the module is the plain attention."""
    torch.manual_seed(1)
    m = TimestepFeatureConsolidation(8, 2, dtype=torch.float64).eval()
    label, feats = torch.randn(1, 4, 8, dtype=torch.float64), torch.randn(1, 3, 4, 8, dtype=torch.float64)
    key, att = m(label, feats)
    q = F.linear(label, m.q_proj.weight, m.q_proj.bias).view(1, 4, 2, 4)
    k = F.linear(feats, m.k_proj.weight, m.k_proj.bias).view(1, 3, 4, 2, 4)
    v = F.linear(feats, m.v_proj.weight, m.v_proj.bias).view(1, 3, 4, 2, 4)
    s = (q.unsqueeze(1) * k).sum(-1).permute(0, 3, 2, 1) / 2.0    # (B, heads, N, k)
    a = s.softmax(-1)
    out = (a.permute(0, 3, 2, 1).unsqueeze(-1) * v).sum(1).reshape(1, 4, 8)
    torch.testing.assert_close(att, a, **F64)
    torch.testing.assert_close(key, out, **F64)


def test_dropout_only_in_training():
    m, label, feats = _make(dim=8, heads=2, k=3, dtype=torch.float32)
    m.eval()
    a1, a2 = m(label, feats)[0], m(label, feats)[0]
    torch.testing.assert_close(a1, a2, rtol=0, atol=0)
    m.train()
    torch.manual_seed(3)
    t1 = m(label, feats)[0]
    torch.manual_seed(4)
    t2 = m(label, feats)[0]
    assert not torch.allclose(t1, t2), "LoRA dropout (p = 0.2) should make training outputs differ"
    assert not torch.allclose(t1, a1)
    m.eval()
    torch.testing.assert_close(m(label, feats)[0], a1, rtol=0, atol=0)


def test_attention_follows_the_matching_timestep():
    """A label query equal to one timestep's key makes O_TS peak on that timestep."""
    torch.manual_seed(0)
    m = TimestepFeatureConsolidation(16, 1, dtype=torch.float64).eval()
    with torch.no_grad():
        for lin in (m.q_proj, m.k_proj, m.v_proj):
            lin.weight.copy_(torch.eye(16))
            lin.bias.zero_()
    feats = 8.0 * F.normalize(torch.randn(1, 5, 3, 16, dtype=torch.float64), dim=-1)
    label = feats[:, 2]                         # every token matches timestep 2
    key, att = m(label, feats)
    assert (att.argmax(-1) == 2).all()
    torch.testing.assert_close(key, (att.squeeze(1).unsqueeze(-1) * feats.transpose(1, 2)).sum(2), **F64)


@pytest.mark.parametrize("label_shape,feat_shape,match", [
    ((2, 5, 8), (2, 3, 5, 7), "timestep_features must have shape"),
    ((2, 5, 7), (2, 3, 5, 8), "label_features must have shape"),
    ((2, 4, 8), (2, 3, 5, 8), "must match"),
    ((1, 5, 8), (2, 3, 5, 8), "must match"),
    ((2, 8, 2, 3), (2, 3, 7, 2, 3), "timestep_features map"),
    ((2, 7, 2, 3), (2, 3, 8, 2, 3), "label_features map"),
    ((2, 5, 8), (2, 0, 5, 8), "no timesteps"),
])
def test_bad_shapes(label_shape, feat_shape, match):
    m = TimestepFeatureConsolidation(8, 2)
    with pytest.raises(ValueError, match=match):
        m(torch.randn(label_shape), torch.randn(feat_shape))


def test_bad_arguments():
    with pytest.raises(ValueError, match="heads must divide dim"):
        TimestepFeatureConsolidation(10, 3)
    with pytest.raises(ValueError, match="dim must be a positive int"):
        TimestepFeatureConsolidation(0, 1)
    with pytest.raises(TypeError, match="must be tensors"):
        TimestepFeatureConsolidation(8, 2)(torch.randn(1, 2, 8), [torch.randn(1, 2, 8)])
    m = TimestepFeatureConsolidation(8, 2)
    with pytest.raises(ValueError, match="share dtype"):
        m(torch.randn(1, 2, 8, dtype=torch.float64), torch.randn(1, 3, 2, 8))


def test_torch_compile_fullgraph():
    m, label, feats = _make(dim=8, heads=2, k=3, dtype=torch.float32)
    m.eval()
    want = m(label, feats)
    got = torch.compile(m, fullgraph=True, backend="eager")(label, feats)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


def plain_tfc(module: TimestepFeatureConsolidation, label: torch.Tensor, feats: torch.Tensor):
    """Vectorised Eq. 3 with an explicit exp / sum softmax, in the inputs' dtype."""
    wq, bq = _effective(module.q_proj)
    wk, bk = _effective(module.k_proj)
    wv, bv = _effective(module.v_proj)
    b, k, n, d = feats.shape
    h, dh = module.heads, module.head_dim
    q = F.linear(label, wq, bq).view(b, 1, n, h, dh)
    key = F.linear(feats, wk, bk).view(b, k, n, h, dh)
    val = F.linear(feats, wv, bv).view(b, k, n, h, dh)
    s = (q * key).sum(-1) / math.sqrt(dh)                       # (b, k, n, h)
    e = torch.exp(s - s.amax(dim=1, keepdim=True))
    a = e / e.sum(dim=1, keepdim=True)
    out = (a.unsqueeze(-1) * val).sum(1).reshape(b, n, d)
    return out, a.permute(0, 3, 2, 1)


def test_plain_vectorised_reference_matches_loop_reference():
    m, label, feats = _make(dim=12, heads=3, k=4, b=2, n=5)
    m.eval()
    for got, want in zip(plain_tfc(m, label, feats), reference_tfc(m, label, feats)):
        torch.testing.assert_close(got, want, **F64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA device (runs on the GPU machine: pytest -m gpu)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_low_precision_error_within_twice_the_reference_error(dtype):
    """flash-attn's rule: error vs an fp32 reference ≤ 2× that of the reference run in ``dtype``."""
    m, label, feats = _make(dim=64, heads=4, k=4, b=2, n=256, dtype=torch.float32)
    m = m.cuda().eval()
    label, feats = label.cuda(), feats.cuda()
    want_key, want_att = plain_tfc(m, label, feats)
    low = TimestepFeatureConsolidation(64, 4, lora_r=2, lora_alpha=4, lora_dropout=0.2).cuda().to(dtype).eval()
    low.load_state_dict(m.state_dict())
    got_key, got_att = low(label.to(dtype), feats.to(dtype))
    ref_key, ref_att = plain_tfc(low, label.to(dtype), feats.to(dtype))
    for got, ref, want in ((got_key, ref_key, want_key), (got_att, ref_att, want_att)):
        err = (got.float() - want).abs().max().item()
        ref_err = (ref.float() - want).abs().max().item()
        assert err <= 2 * ref_err + 1e-5, (err, ref_err)
