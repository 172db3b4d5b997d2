"""AttentionMaskRecorder on tiny random diffusers U-Nets.

M_label is checked against a map built from the full self- and cross-attention
probability matrices captured by a plainly written reference processor
(values and gradients), the U-Net output against the default processor, and
the processor bookkeeping (install/remove, layer selection) directly.
"""
from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

diffusers = pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0  # noqa: E402

from fastdense.diffusion import (  # noqa: E402
    AttentionMaskRecorder,
    default_layer_indices,
    transformer_block_names,
)
from fastdense.diffusion import attention_masks  # noqa: E402

# ----------------------------------------------------------------------------- tiny U-Nets
# A: one attention level (down 0 / up 1) and a cross-attention mid block: 4 blocks.
CONFIG_A = dict(
    block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=24, attention_head_dim=8,
)
# B: attention on both levels, per-level head dims (heads 4 then 2 of width 4 / 16): 7 blocks.
CONFIG_B = dict(
    block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=12, attention_head_dim=(4, 16),
)
# C: SDXL-like: attention on the low level only, two blocks per Transformer2DModel,
# linear projections: 2 + 2 + 6 = 10 blocks.
CONFIG_C = dict(
    block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=20, attention_head_dim=8, transformer_layers_per_block=2,
    use_linear_projection=True,
)
CONFIGS = {"A": CONFIG_A, "B": CONFIG_B, "C": CONFIG_C}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def make_unet(config: dict, dtype=torch.float32, seed: int = 0, **extra) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, **config, **extra)
    return unet.to(dtype).eval()


def make_inputs(unet, batch: int, hw: tuple[int, int], n_tokens: int, dtype, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, *hw, generator=g, dtype=dtype)
    emb = torch.randn(batch, n_tokens, unet.config.cross_attention_dim, generator=g, dtype=dtype)
    return sample, emb


def run(unet, sample, emb):
    return unet(sample, 7, encoder_hidden_states=emb).sample


# ----------------------------------------------------------------------------- reference
class ProbeProcessor:
    """Attention written out: explicit softmax, stores the full probability matrix (B, H, Lq, Lk)."""

    def __init__(self, store: dict, key: str):
        self.store, self.key = store, key

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        # The tiny configs never use these; the probe does not implement them.
        assert attn.spatial_norm is None and attn.group_norm is None and attention_mask is None
        assert not attn.residual_connection and not attn.norm_cross and hidden_states.ndim == 3
        b, length, _ = hidden_states.shape
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        heads = attn.heads

        def split(t):  # (B, S, heads·d) -> (B, heads, S, d)
            return t.reshape(b, t.shape[1], heads, t.shape[2] // heads).transpose(1, 2)

        q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(context)), split(attn.to_v(context))
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        self.store[self.key] = probs
        out = (probs @ v).transpose(1, 2).reshape(b, length, heads * q.shape[-1])
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


def expected_grid(unet, block_name: str, hw: tuple[int, int]) -> tuple[int, int]:
    """Spatial grid of a block from the U-Net topology: each stride-2 3×3 conv maps n -> ceil(n/2)."""
    levels = len(unet.config.block_out_channels)
    section, index = block_name.split(".")[:2]
    level = {"down_blocks": lambda i: i, "mid_block": lambda i: levels - 1,
             "up_blocks": lambda i: levels - 1 - i}[section](int(index) if index.isdigit() else 0)
    h, w = hw
    for _ in range(level):
        h, w = -(-h // 2), -(-w // 2)
    return h, w


def reference_label_map(unet, sample, emb, layers, size):
    """Run the U-Net with probe processors; M_label from the captured probabilities (§3.3)."""
    store: dict = {}
    originals = unet.attn_processors
    unet.set_attn_processor({name: ProbeProcessor(store, name.rsplit(".", 1)[0]) for name in originals})
    try:
        out = run(unet, sample, emb)
    finally:
        unet.set_attn_processor(originals)
    per_layer = {}
    for name in layers:
        p_sa, p_ca = store[name + ".attn1"], store[name + ".attn2"]  # (B,H,L,L), (B,H,L,N)
        m_ca = p_ca.mean(dim=1)
        m_ca = m_ca / m_ca.sum(dim=-1, keepdim=True)
        m_attn = (p_sa.transpose(-1, -2) @ m_ca.unsqueeze(1)).mean(dim=1)  # M_saᵀ M_ca, (B, L, N)
        h, w = expected_grid(unet, name, tuple(sample.shape[-2:]))
        per_layer[name] = m_attn.transpose(1, 2).reshape(m_attn.shape[0], -1, h, w)
    ups = [F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in per_layer.values()]
    mean = torch.stack(ups).mean(dim=0)
    return out, per_layer, mean / mean.sum(dim=1, keepdim=True)


# ----------------------------------------------------------------------------- 1. values and gradients
@pytest.mark.parametrize("config,batch,hw,n_tokens,layers", [
    ("A", 2, (12, 10), 3, None),                 # default = last three of 4 blocks
    ("B", 1, (8, 8), 7, [0, "up_blocks.1"]),     # two grids, index + prefix
    ("C", 3, (9, 7), 5, [1, 2, -1]),             # odd grid 5×4, two blocks share a Transformer2DModel
])
def test_label_map_matches_captured_probabilities(config, batch, hw, n_tokens, layers):
    unet = make_unet(CONFIGS[config], dtype=torch.float64)
    sample, emb = make_inputs(unet, batch, hw, n_tokens, torch.float64)
    size = (hw[0] * 2 + 1, hw[1] * 2 - 1)  # odd, non-integer upsampling factors
    weights = torch.randn(batch, n_tokens, *size, dtype=torch.float64)
    out_weights = torch.randn(batch, 4, *hw, dtype=torch.float64)

    with AttentionMaskRecorder(unet, layers) as rec:
        emb_rec = emb.clone().requires_grad_(True)
        out = run(unet, sample, emb_rec)
        m_label = rec.label_map(size=size)
        maps = rec.maps
        names = rec.layers
    emb_ref = emb.clone().requires_grad_(True)
    out_ref, maps_ref, m_label_ref = reference_label_map(unet, sample, emb_ref, names, size)

    assert m_label.shape == (batch, n_tokens, *size)
    assert list(maps) == names and list(maps_ref) == names
    for name in names:
        assert maps[name].shape == maps_ref[name].shape
        torch.testing.assert_close(maps[name], maps_ref[name], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(m_label, m_label_ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(m_label.sum(dim=1), torch.ones(batch, *size, dtype=torch.float64))
    torch.testing.assert_close(out, out_ref, rtol=1e-9, atol=1e-12)

    # Gradients reach the concept embeddings through M_label and the U-Net output.
    ((m_label * weights).sum() + (out * out_weights).sum()).backward()
    ((m_label_ref * weights).sum() + (out_ref * out_weights).sum()).backward()
    torch.testing.assert_close(emb_rec.grad, emb_ref.grad, rtol=1e-8, atol=1e-11)


def test_gradient_through_label_map_only():
    unet = make_unet(CONFIG_B, dtype=torch.float64)
    sample, emb = make_inputs(unet, 2, (8, 6), 4, torch.float64)
    weights = torch.randn(2, 4, 8, 6, dtype=torch.float64)
    layers = [1, 4, 6]
    emb_rec = emb.clone().requires_grad_(True)
    with AttentionMaskRecorder(unet, layers) as rec:
        run(unet, sample, emb_rec)
        g, = torch.autograd.grad((rec.label_map(size=(8, 6)) * weights).sum(), emb_rec)
    emb_ref = emb.clone().requires_grad_(True)
    _, _, m_ref = reference_label_map(unet, sample, emb_ref, rec.layers, (8, 6))
    g_ref, = torch.autograd.grad((m_ref * weights).sum(), emb_ref)
    assert g.abs().max() > 0
    torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-11)


def test_gradient_checkpointing_records_once(monkeypatch):
    """Checkpointed blocks rerun during the backward; the recorder keeps the forward's maps."""
    calls = []
    op = attention_masks.attn_mask_aggregate

    def counting_op(*args, **kwargs):
        calls.append(1)
        return op(*args, **kwargs)

    monkeypatch.setattr(attention_masks, "attn_mask_aggregate", counting_op)
    results = []
    for checkpointing in (False, True):
        unet = make_unet(CONFIG_B, dtype=torch.float64)
        if checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()  # diffusers checkpoints only in training mode
        sample, emb = make_inputs(unet, 2, (8, 6), 4, torch.float64)
        emb.requires_grad_(True)
        calls.clear()
        with AttentionMaskRecorder(unet, [1, 4, 6]) as rec:
            out = run(unet, sample, emb)
            maps = rec.maps
            m_label = rec.label_map()
            ((m_label * torch.arange(m_label.numel()).view_as(m_label)).sum() + out.sum()).backward()
            assert all(rec.maps[n] is maps[n] for n in maps)  # not replaced by the recomputation
        # The recomputation runs the op again (checkpoint needs its saved tensors).
        assert len(calls) == (6 if checkpointing else 3)
        results.append((m_label.detach(), emb.grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- 2. output unchanged
@pytest.mark.parametrize("config", ["A", "C"])
@pytest.mark.parametrize("grad", [False, True])
def test_unet_output_bit_for_bit(config, grad):
    """Default processors are AttnProcessor2_0; the tap processors run the same ops: torch.equal."""
    unet = make_unet(CONFIGS[config])
    assert all(type(p) is AttnProcessor2_0 for p in unet.attn_processors.values())
    sample, emb = make_inputs(unet, 2, (12, 10), 5, torch.float32)
    emb = emb.requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        expected = run(unet, sample, emb)
        with AttentionMaskRecorder(unet, list(range(len(transformer_block_names(unet))))) as rec:
            got = run(unet, sample, emb)
            assert len(rec.maps) == len(rec.layers)
    assert torch.equal(got, expected)


def test_output_close_when_replacing_a_non_sdpa_processor():
    """Replacing the math AttnProcessor by the SDPA path changes rounding only: tight allclose."""
    unet = make_unet(CONFIG_A)
    unet.set_attn_processor(AttnProcessor())
    sample, emb = make_inputs(unet, 1, (8, 8), 3, torch.float32)
    with torch.no_grad():
        expected = run(unet, sample, emb)
        with AttentionMaskRecorder(unet):
            got = run(unet, sample, emb)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_unet(dtype):
    """Output bit-for-bit; M_label error vs fp64 at most 2x that of the probe reference run in the same dtype."""
    unet = make_unet(CONFIG_C, dtype=dtype)
    sample, emb = make_inputs(unet, 2, (12, 10), 5, dtype)
    size = (24, 20)
    with torch.no_grad():
        expected = run(unet, sample, emb)
        with AttentionMaskRecorder(unet) as rec:
            got = run(unet, sample, emb)
            m_label = rec.label_map(size=size)
        _, _, m_low = reference_label_map(unet, sample, emb, rec.layers, size)
        unet64 = copy.deepcopy(unet).double()  # the same (rounded) weights in fp64
        _, _, m_64 = reference_label_map(unet64, sample.double(), emb.double(), rec.layers, size)
    assert torch.equal(got, expected)
    assert m_label.dtype == torch.float32
    err = (m_label.double() - m_64).abs().max()
    err_ref = (m_low.double() - m_64).abs().max()
    assert err <= 2 * err_ref + 1e-6, (err, err_ref)


# ----------------------------------------------------------------------------- 3. install / remove
def test_remove_restores_original_processor_objects():
    unet = make_unet(CONFIG_B)
    custom = AttnProcessor()  # a non-default processor on one chosen layer must come back too
    unet.get_submodule("up_blocks.1.attentions.0.transformer_blocks.0.attn2").set_processor(custom)
    before = unet.attn_processors
    rec = AttentionMaskRecorder(unet, ["up_blocks.1.attentions.0", 0])
    during = unet.attn_processors
    chosen = {"down_blocks.0.attentions.0.transformer_blocks.0", "up_blocks.1.attentions.0.transformer_blocks.0"}
    for name, proc in during.items():
        block, which = name.rsplit(".", 2)[0], name.rsplit(".", 2)[1]
        if block in chosen:
            expected_type = attention_masks.SelfAttentionTapProcessor if which == "attn1" \
                else attention_masks.CrossAttentionTapProcessor
            assert type(proc) is expected_type, name
        else:
            assert proc is before[name], name  # untouched layers keep their objects
    rec.remove()
    after = unet.attn_processors
    assert after.keys() == before.keys()
    assert all(after[n] is before[n] for n in before)
    rec.remove()  # idempotent
    assert all(unet.attn_processors[n] is before[n] for n in before)


class _ModuleProcessor(torch.nn.Module):
    """A processor with weights (like diffusers' IP-adapter processors): registered as a submodule."""

    def __init__(self):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.ones(()))

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        return AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, attention_mask, temb) * self.gain


def test_remove_restores_a_module_processor_and_its_registration():
    unet = make_unet(CONFIG_A)
    attn = unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn1")
    proc = _ModuleProcessor()
    attn.set_processor(proc)
    n_params = len(list(unet.parameters()))
    rec = AttentionMaskRecorder(unet, "mid_block")
    assert type(attn.processor) is attention_masks.SelfAttentionTapProcessor
    rec.remove()
    assert attn.processor is proc and attn._modules["processor"] is proc
    assert len(list(unet.parameters())) == n_params


def test_context_manager_and_reinstall():
    unet = make_unet(CONFIG_A)
    before = unet.attn_processors
    sample, emb = make_inputs(unet, 1, (8, 8), 3, torch.float32)
    with AttentionMaskRecorder(unet) as rec:
        assert rec.installed
        assert any(unet.attn_processors[n] is not before[n] for n in before)
        with torch.no_grad():
            run(unet, sample, emb)
    assert not rec.installed
    assert all(unet.attn_processors[n] is before[n] for n in before)
    first = rec.label_map()  # maps survive leaving the block
    assert first.shape == (1, 3, 8, 8)
    with torch.no_grad():
        run(unet, sample, emb * 2)  # not installed: nothing recorded
    torch.testing.assert_close(rec.label_map(), first, rtol=0, atol=0)
    with rec:  # re-install
        rec.reset()
        with torch.no_grad():
            run(unet, sample, emb * 2)
    assert not torch.allclose(rec.label_map(), first)
    assert all(unet.attn_processors[n] is before[n] for n in before)


def test_remove_on_exception_inside_with():
    unet = make_unet(CONFIG_A)
    before = unet.attn_processors
    with pytest.raises(ZeroDivisionError):
        with AttentionMaskRecorder(unet):
            raise ZeroDivisionError("inside the with block")
    assert all(unet.attn_processors[n] is before[n] for n in before)


# ----------------------------------------------------------------------------- 4. layer selection
def test_layer_selection_by_index_and_name():
    unet = make_unet(CONFIG_B)
    names = transformer_block_names(unet)
    assert names == [
        "down_blocks.0.attentions.0.transformer_blocks.0",
        "down_blocks.1.attentions.0.transformer_blocks.0",
        "mid_block.attentions.0.transformer_blocks.0",
        "up_blocks.0.attentions.0.transformer_blocks.0",
        "up_blocks.0.attentions.1.transformer_blocks.0",
        "up_blocks.1.attentions.0.transformer_blocks.0",
        "up_blocks.1.attentions.1.transformer_blocks.0",
    ]  # forward order: down, mid, up (registration order is down, up, mid)

    def chosen(layers):
        rec = AttentionMaskRecorder(unet, layers)
        rec.remove()
        return rec.layers

    assert chosen(None) == names[4:]                  # 7 blocks: ordinals 8–12 absent, last three
    assert chosen(2) == [names[2]]
    assert chosen([-1, 0]) == [names[0], names[6]]    # forward order, not request order
    assert chosen([3, names[3], "up_blocks.0.attentions.0."]) == [names[3]]  # duplicates merged
    assert chosen("up_blocks.0") == names[3:5]        # prefix selects a whole block
    assert chosen("mid_block") == [names[2]]
    assert chosen(["down_blocks", 6]) == names[:2] + [names[6]]

    for bad, kind in [(7, ValueError), (-8, ValueError), ("up_blocks.2", ValueError),
                      ("up_blocks.0.attentions.1.transformer_blocks.00", ValueError), ([], ValueError),
                      (1.5, TypeError), ([True], TypeError)]:
        with pytest.raises(kind) as err:
            AttentionMaskRecorder(unet, bad)
        if kind is ValueError:
            assert "up_blocks.1.attentions.1.transformer_blocks.0" in str(err.value)  # lists what exists
    assert all(type(p) is AttnProcessor2_0 for p in unet.attn_processors.values())  # nothing left installed


def test_block_without_cross_attention_is_rejected():
    # only_cross_attention reaches the down/up blocks (attn1 is a cross-attention
    # there) but not the mid block, whose block stays eligible.
    unet = make_unet(CONFIG_A, only_cross_attention=True)
    names = transformer_block_names(unet)
    with pytest.raises(ValueError, match="self-attention"):
        AttentionMaskRecorder(unet, 0)
    rec = AttentionMaskRecorder(unet)  # default: last three = mid, up.0, up.1; the up ones dropped
    rec.remove()
    assert rec.layers == ["mid_block.attentions.0.transformer_blocks.0"] and len(names) == 4
    unet = make_unet(CONFIG_A, only_cross_attention=True, mid_block_type=None)
    with pytest.raises(ValueError, match="default layers"):
        AttentionMaskRecorder(unet)


def test_default_layers_follow_the_paper_on_the_sd_topology():
    assert default_layer_indices(16) == [7, 8, 9, 10, 11, 13, 14, 15]
    assert default_layer_indices(12) == [7, 8, 9, 10, 11]
    assert default_layer_indices(9) == [6, 7, 8]
    assert default_layer_indices(2) == [0, 1]
    with pytest.raises(ValueError):
        default_layer_indices(0)
    # SD 1.x/2.x layout with tiny widths: 16 blocks.
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(8, 8, 8, 8), layers_per_block=2, norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=8, attention_head_dim=2,
    )
    assert len(transformer_block_names(unet)) == 16
    rec = AttentionMaskRecorder(unet)
    rec.remove()
    t = ".transformer_blocks.0"
    assert rec.layers == [f"up_blocks.1.attentions.{i}{t}" for i in range(3)] \
        + [f"up_blocks.2.attentions.{i}{t}" for i in range(2)] \
        + [f"up_blocks.3.attentions.{i}{t}" for i in range(3)]


# ----------------------------------------------------------------------------- label_map API
def test_label_map_errors_and_reset():
    unet = make_unet(CONFIG_A)
    sample, emb = make_inputs(unet, 2, (6, 6), 3, torch.float32)
    with AttentionMaskRecorder(unet, [0, 3]) as rec:
        with pytest.raises(RuntimeError, match="no maps recorded"):
            rec.label_map()
        with torch.no_grad():
            run(unet, sample, emb)
        assert [tuple(m.shape) for m in rec.maps.values()] == [(2, 3, 6, 6), (2, 3, 6, 6)]
        assert rec.label_map().shape == (2, 3, 6, 6)
        assert rec.label_map(size=5).shape == (2, 3, 5, 5)
        for bad in [(0, 4), (4,), "8x8", (4.0, 4)]:
            with pytest.raises(ValueError, match="size"):
                rec.label_map(size=bad)
        rec.reset()
        assert rec.maps == {}
        with pytest.raises(RuntimeError, match="no maps recorded"):
            rec.label_map()
        with torch.no_grad():  # a new forward with other N replaces the maps
            run(unet, sample, torch.randn(2, 5, 24))
        assert rec.label_map().shape == (2, 5, 6, 6)


# ----------------------------------------------------------------------------- 6. no L×L tensors
class _ShapeLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def test_recorder_keeps_no_square_attention_matrix(monkeypatch):
    """Outside the aggregation op, the recorder creates no L×L tensor and keeps only q/k-sized ones."""
    unet = make_unet(CONFIG_B)
    batch, hw, n_tokens = 2, (12, 10), 3
    sample, emb = make_inputs(unet, batch, hw, n_tokens, torch.float32)
    lengths = {h * w for h, w in (expected_grid(unet, n, hw) for n in transformer_block_names(unet))}

    def square_count(shapes):
        return sum(1 for s in shapes if len(s) >= 2 and s[-1] == s[-2] and s[-1] in lengths)

    calls = []

    def op_spy(q, k, m_ca, scale, lse=None, head_reduce="mean"):
        # The stash was already released when the op runs.
        calls.append((tuple(q.shape), tuple(k.shape), tuple(m_ca.shape), scale,
                      [tap.stash for tap in rec._taps.values()]))
        return m_ca.new_zeros(m_ca.shape) + q.sum() * 0  # (B, L, N) without any L×L work

    log_default = _ShapeLog()
    with torch.no_grad(), log_default:
        run(unet, sample, emb)
    monkeypatch.setattr(attention_masks, "attn_mask_aggregate", op_spy)
    rec = AttentionMaskRecorder(unet, list(range(7)))
    log_rec = _ShapeLog()
    with torch.no_grad(), log_rec:
        run(unet, sample, emb)
    assert square_count(log_rec.shapes) == square_count(log_default.shapes)

    assert len(calls) == 7
    for (q_shape, k_shape, m_shape, scale, stashes), name in zip(calls, rec.layers):
        h, w = expected_grid(unet, name, hw)
        heads = q_shape[1]
        assert q_shape == k_shape == (batch, heads, h * w, q_shape[-1])
        assert m_shape == (batch, h * w, n_tokens)
        assert scale == pytest.approx(q_shape[-1] ** -0.5)
        assert all(s is None for s in stashes)
    # After the forward: stashes empty, only (B, N, h, w) maps held.
    assert all(tap.stash is None for tap in rec._taps.values())
    assert all(m.shape[:2] == (batch, n_tokens) and m.shape[2] * m.shape[3] in lengths for m in rec.maps.values())
    rec.remove()


def test_stash_holds_query_key_between_attn1_and_attn2():
    unet = make_unet(CONFIG_A)
    sample, emb = make_inputs(unet, 2, (8, 6), 3, torch.float32)
    seen = {}
    rec = AttentionMaskRecorder(unet, [0])
    tap = rec._taps[rec.layers[0]]
    attn2 = unet.get_submodule(rec.layers[0]).attn2

    def peek(module, args):  # returns None: a pre-hook's return value would replace the args
        seen["stash"] = tap.stash

    handle = attn2.register_forward_pre_hook(peek)
    with torch.no_grad():
        run(unet, sample, emb)
    handle.remove()
    rec.remove()
    q, k, scale = seen["stash"]
    heads = unet.get_submodule(rec.layers[0]).attn1.heads
    assert q.shape == k.shape == (2, heads, 48, 16 // heads)
    assert scale == pytest.approx((16 // heads) ** -0.5)
    assert tap.stash is None


# ----------------------------------------------------------------------------- processors alone
class _Sink:
    """Stands in for the recorder: collects what the cross-attention processor records."""

    def __init__(self):
        self.recorded = []
        self._forward_id = 0

    def _record(self, tap, m_attn):
        self.recorded.append(m_attn)


def test_self_tap_processor_matches_sdpa_on_every_attention_option():
    """group_norm, spatial_norm, 4-D input, qk_norm, residual and rescale as in AttnProcessor2_0: torch.equal."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=32, heads=2, dim_head=8, bias=True, norm_num_groups=4, spatial_norm_dim=3,
                     qk_norm="layer_norm", residual_connection=True, rescale_output_factor=2.0).eval()
    x, temb = torch.randn(2, 32, 5, 3), torch.randn(2, 3, 2, 2)  # SpatialNorm needs 32 | channels
    expected = AttnProcessor2_0()(attn, x, temb=temb)
    tap = attention_masks._BlockTap(_Sink(), "blk", None)
    got = attention_masks.SelfAttentionTapProcessor(tap)(attn, x, temb=temb)
    assert torch.equal(got, expected)
    q, k, scale = tap.stash
    assert q.shape == k.shape == (2, 2, 15, 8) and scale == pytest.approx(8 ** -0.5)
    with pytest.raises(NotImplementedError, match="attention_mask"):
        attention_masks.SelfAttentionTapProcessor(tap)(attn, x, attention_mask=torch.zeros(2, 15), temb=temb)


@pytest.mark.parametrize("mask_kind", [None, "bias", "bool"])
def test_cross_tap_processor_map_and_output(mask_kind):
    """attn2 with norm_cross and an encoder mask: output equal to AttnProcessor2_0, M_attn from the masked M_ca."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    b, length, n, heads, d = 2, 7, 5, 3, 4
    attn = Attention(query_dim=12, cross_attention_dim=6, heads=heads, dim_head=d,
                     cross_attention_norm="layer_norm").eval()
    x, ctx = torch.randn(b, length, 12), torch.randn(b, n, 6)
    keep = torch.ones(b, n, dtype=torch.bool)
    keep[0, -2:] = False
    mask = {None: None, "bias": (~keep).float()[:, None, :] * -10000.0, "bool": keep[:, None, :]}[mask_kind]
    q_self, k_self = torch.randn(b, 2, length, 8), torch.randn(b, 2, length, 8)

    sink = _Sink()
    tap = attention_masks._BlockTap(sink, "blk", None)
    tap.stash = (q_self, k_self, 0.3)
    got = attention_masks.CrossAttentionTapProcessor(tap)(attn, x, ctx, attention_mask=mask)
    expected = AttnProcessor2_0()(attn, x, ctx, attention_mask=mask)
    assert torch.equal(got, expected)
    assert tap.stash is None

    # Explicit M_ca: per-head probabilities over the tokens, masked tokens get none.
    q = attn.to_q(x).reshape(b, length, heads, d).transpose(1, 2)
    k = attn.to_k(attn.norm_encoder_hidden_states(ctx)).reshape(b, n, heads, d).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    if mask_kind is not None:
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    m_ca = scores.softmax(-1).mean(1)
    m_ca = m_ca / m_ca.sum(-1, keepdim=True)
    p_sa = torch.softmax(q_self @ k_self.transpose(-1, -2) * 0.3, dim=-1)
    expected_map = (p_sa.transpose(-1, -2) @ m_ca[:, None]).mean(1)
    (m_attn,) = sink.recorded
    torch.testing.assert_close(m_attn, expected_map, rtol=1e-5, atol=1e-6)
    if mask_kind is not None:
        assert m_attn[0, :, -2:].abs().max() < 1e-6

    with pytest.raises(RuntimeError, match="before its self-attention"):
        attention_masks.CrossAttentionTapProcessor(tap)(attn, x, ctx)


# ----------------------------------------------------------------------------- real weights
@pytest.mark.skipif(not os.environ.get("FASTDENSE_SD_DIR"),
                    reason="set FASTDENSE_SD_DIR to a local Stable Diffusion directory (with unet/) to run")
def test_real_stable_diffusion_unet():
    unet = UNet2DConditionModel.from_pretrained(os.environ["FASTDENSE_SD_DIR"], subfolder="unet").eval()
    sample, emb = make_inputs(unet, 1, (16, 16), 8, torch.float32)
    with torch.no_grad():
        expected = run(unet, sample, emb)
        with AttentionMaskRecorder(unet) as rec:
            got = run(unet, sample, emb)
            m_label = rec.label_map(size=(64, 64))
        _, _, m_ref = reference_label_map(unet, sample, emb, rec.layers, (64, 64))
    assert torch.equal(got, expected)
    assert m_label.shape == (1, 8, 64, 64)
    torch.testing.assert_close(m_label, m_ref, rtol=1e-4, atol=1e-6)
