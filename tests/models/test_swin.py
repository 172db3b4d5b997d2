"""Swin backbone: timm key layout, Microsoft conversion, forward against a plain
loop-over-windows implementation, checkpoint loading, torch.compile, channels_last,
and (GPU machine only) numerical agreement with timm."""
import math

import pytest
import torch

from fastdense.models.swin import SwinTransformer, drop_path, relative_position_index, swin_b, swin_s, swin_t
from fastdense.models.swin_checkpoint import LoadReport, convert_microsoft_swin, load_pretrained

# ---------------------------------------------------------------------------------------
# key layout
# ---------------------------------------------------------------------------------------


def timm_swin_keys(embed, depths, heads, window=7, patch=4, in_chans=3, num_classes=1000):
    """(name, shape) of timm's swin_*_patch4_window7_224 state dict, in timm's order,
    written from timm's module structure (not from fastdense's)."""
    keys = [("patch_embed.proj.weight", (embed, in_chans, patch, patch)), ("patch_embed.proj.bias", (embed,)),
            ("patch_embed.norm.weight", (embed,)), ("patch_embed.norm.bias", (embed,))]
    table = ((2 * window - 1) ** 2)
    for i, (depth, h) in enumerate(zip(depths, heads)):
        d = embed * 2 ** i
        if i > 0:  # timm >= 0.9: the merging that feeds stage i is layers.i.downsample
            prev = d // 2
            keys += [(f"layers.{i}.downsample.norm.weight", (4 * prev,)),
                     (f"layers.{i}.downsample.norm.bias", (4 * prev,)),
                     (f"layers.{i}.downsample.reduction.weight", (d, 4 * prev))]
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            keys += [(p + "norm1.weight", (d,)), (p + "norm1.bias", (d,)),
                     (p + "attn.relative_position_bias_table", (table, h)),
                     (p + "attn.qkv.weight", (3 * d, d)), (p + "attn.qkv.bias", (3 * d,)),
                     (p + "attn.proj.weight", (d, d)), (p + "attn.proj.bias", (d,)),
                     (p + "norm2.weight", (d,)), (p + "norm2.bias", (d,)),
                     (p + "mlp.fc1.weight", (4 * d, d)), (p + "mlp.fc1.bias", (4 * d,)),
                     (p + "mlp.fc2.weight", (d, 4 * d)), (p + "mlp.fc2.bias", (d,))]
    last = embed * 2 ** (len(depths) - 1)
    keys += [("norm.weight", (last,)), ("norm.bias", (last,))]
    if num_classes:
        keys += [("head.fc.weight", (num_classes, last)), ("head.fc.bias", (num_classes,))]
    return keys


def _keys(model):
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def test_swin_t_state_dict_matches_timm_layout():
    model = swin_t()
    assert _keys(model) == timm_swin_keys(96, (2, 2, 6, 2), (3, 6, 12, 24))
    assert sum(v.numel() for v in model.state_dict().values()) == 28_288_354  # Swin-T, 28.3M
    # Buffers exist but are not saved, as in timm.
    names = [n for n, _ in model.named_buffers()]
    assert "layers.0.blocks.0.attn.relative_position_index" in names
    assert not any("relative_position_index" in k or "attn_mask" in k for k in model.state_dict())


@pytest.mark.parametrize("ctor, embed, depths, heads", [
    (swin_s, 96, (2, 2, 18, 2), (3, 6, 12, 24)),
    (swin_b, 128, (2, 2, 18, 2), (4, 8, 16, 32)),
])
def test_swin_s_b_state_dicts_match_timm_layout(ctor, embed, depths, heads):
    with torch.device("meta"):  # shapes only: no 50-90M parameter init on the CPU
        model = ctor()
    assert _keys(model) == timm_swin_keys(embed, depths, heads)


def test_no_classifier_without_classes():
    with torch.device("meta"):
        model = swin_t(num_classes=0)
    assert _keys(model) == timm_swin_keys(96, (2, 2, 6, 2), (3, 6, 12, 24), num_classes=0)


# ---------------------------------------------------------------------------------------
# tiny model and the plain reference implementation
# ---------------------------------------------------------------------------------------

TINY = dict(patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4, num_classes=5)


def tiny_model(dtype=torch.float64, **kw):
    torch.manual_seed(0)
    model = SwinTransformer(**{**TINY, "drop_path_rate": 0.1, **kw}).to(dtype).eval()
    with torch.no_grad():  # move every parameter off its init (LN = 1/0, tables ~0) so all matter
        for name, p in model.named_parameters():
            scale = 0.5 if "relative_position_bias_table" in name else 0.1
            p.add_(torch.randn_like(p) * scale)
    return model


def _ln(x, sd, name, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * sd[name + ".weight"] + sd[name + ".bias"]


def _linear(x, sd, name):
    y = x @ sd[name + ".weight"].t()
    return y + sd[name + ".bias"] if name + ".bias" in sd else y


def _axis(size, window, shifted):
    """Window and shift along one axis: a map not larger than the window is one window, unshifted."""
    if size <= window:
        return size, 0
    return window, (window // 2 if shifted else 0)


def ref_block(x, sd, p, heads, window, shifted):
    """One Swin block, one window and one head at a time, with the cyclic shift written as
    index arithmetic: rolled position r holds the padded map's position (r + shift) mod size."""
    b, h, w, c = x.shape
    (wh, sh), (ww, sw) = _axis(h, window, shifted), _axis(w, window, shifted)
    hp, wp = math.ceil(h / wh) * wh, math.ceil(w / ww) * ww
    normed = torch.zeros(b, hp, wp, c, dtype=x.dtype)
    normed[:, :h, :w] = _ln(x, sd, p + "norm1")
    table = sd[p + "attn.relative_position_bias_table"]
    d = c // heads
    attn_out = torch.zeros_like(normed)
    for a in range(hp // wh):
        for e in range(wp // ww):
            pos = [((a * wh + i + sh) % hp, (e * ww + j + sw) % wp) for i in range(wh) for j in range(ww)]
            n = len(pos)
            bias = torch.zeros(heads, n, n, dtype=x.dtype)
            for qi, (yq, xq) in enumerate(pos):
                for ki, (yk, xk) in enumerate(pos):
                    dy, dx = yq - yk, xq - xk
                    if abs(dy) >= wh or abs(dx) >= ww:  # neighbours only through the wrap-around
                        bias[:, qi, ki] = -math.inf
                    else:
                        bias[:, qi, ki] = table[(dy + window - 1) * (2 * window - 1) + (dx + window - 1)]
            for bi in range(b):
                tokens = torch.stack([normed[bi, y, xx] for y, xx in pos])
                qkv = _linear(tokens, sd, p + "attn.qkv")
                q, k, v = qkv[:, :c], qkv[:, c:2 * c], qkv[:, 2 * c:]
                outs = []
                for hd in range(heads):
                    sl = slice(hd * d, (hd + 1) * d)
                    logits = q[:, sl] @ k[:, sl].t() / math.sqrt(d) + bias[hd]
                    e_ = torch.exp(logits - logits.max(-1, keepdim=True).values)
                    outs.append((e_ / e_.sum(-1, keepdim=True)) @ v[:, sl])
                res = _linear(torch.cat(outs, -1), sd, p + "attn.proj")
                for t, (y, xx) in enumerate(pos):
                    attn_out[bi, y, xx] = res[t]
    x = x + attn_out[:, :h, :w]
    hidden = _linear(_ln(x, sd, p + "norm2"), sd, p + "mlp.fc1")
    hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))
    return x + _linear(hidden, sd, p + "mlp.fc2")


def ref_merge(x, sd, p):
    b, h, w, c = x.shape
    pad = torch.zeros(b, h + h % 2, w + w % 2, c, dtype=x.dtype)
    pad[:, :h, :w] = x
    ho, wo = pad.shape[1] // 2, pad.shape[2] // 2
    out = torch.zeros(b, ho, wo, 4 * c, dtype=x.dtype)
    for i in range(ho):
        for j in range(wo):
            # the original Swin concatenation order: (row, col) offsets (0,0), (1,0), (0,1), (1,1)
            out[:, i, j] = torch.cat([pad[:, 2 * i + di, 2 * j + dj] for di, dj in ((0, 0), (1, 0), (0, 1), (1, 1))],
                                     -1)
    return _linear(_ln(out, sd, p + "norm"), sd, p + "reduction")


def ref_forward(sd, img, patch, depths, heads, window):
    b, cin, h, w = img.shape
    hp, wp = math.ceil(h / patch) * patch, math.ceil(w / patch) * patch
    padded = torch.zeros(b, cin, hp, wp, dtype=img.dtype)
    padded[:, :, :h, :w] = img
    patches = padded.reshape(b, cin, hp // patch, patch, wp // patch, patch).permute(0, 2, 4, 1, 3, 5)
    weight = sd["patch_embed.proj.weight"]
    x = patches.reshape(b, hp // patch, wp // patch, -1) @ weight.reshape(weight.shape[0], -1).t()
    x = _ln(x + sd["patch_embed.proj.bias"], sd, "patch_embed.norm")
    feats = []
    for i, (depth, nh) in enumerate(zip(depths, heads)):
        if i > 0:
            x = ref_merge(x, sd, f"layers.{i}.downsample.")
        for j in range(depth):
            x = ref_block(x, sd, f"layers.{i}.blocks.{j}.", nh, window, shifted=j % 2 == 1)
        feats.append(x.permute(0, 3, 1, 2))
    return feats


@pytest.mark.parametrize("size", [(32, 32), (36, 44), (20, 44)])
def test_forward_matches_plain_implementation(size):
    # 32x32: no padding, last stage = one window (shift off); 36x44: padded maps with
    # shifts; 20x44: stage 1 is 3x6 -> window (3, 4), shift only along W.
    model = tiny_model()
    img = torch.randn(2, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        got = model(img)
    want = ref_forward(model.state_dict(), img, 4, TINY["depths"], TINY["num_heads"], TINY["window_size"])
    assert len(got) == 2
    for g, w_ in zip(got, want):
        assert g.shape == w_.shape
        torch.testing.assert_close(g, w_, rtol=0, atol=1e-10)
    assert got[0].shape[-2:] == (math.ceil(size[0] / 4), math.ceil(size[1] / 4))


def test_shift_mask_matters():
    # Guard for the reference test: dropping the mask changes the output on a shifted, padded map.
    model = tiny_model()
    img = torch.randn(1, 3, 36, 44, dtype=torch.float64)
    with torch.no_grad():
        ref = model(img)[0]
        blk = model.layers[0].blocks[1]
        blk.shift_mask = lambda *a, **k: None
        assert not torch.allclose(model(img)[0], ref, atol=1e-6)


def test_relative_position_index_reads_table_centre():
    full = relative_position_index(4, 4)
    assert full.shape == (16, 16) and full.min() == 0 and full.max() == 48 and full[0, 0] == 24
    small = relative_position_index(2, 3, table_window=(4, 4))
    # query (0,0), key (1,2): offset (-1, -2) -> row (-1 + 3) * 7 + (-2 + 3)
    assert small[0, 5] == 2 * 7 + 1


def test_forward_head_and_out_indices():
    model = tiny_model(dtype=torch.float32)
    img = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model.forward_head(model.forward_features(img))
        feats = model(img)
        last = model.norm(feats[-1].permute(0, 2, 3, 1)).mean((1, 2))
    torch.testing.assert_close(logits, model.head.fc(last))
    assert logits.shape == (2, 5)
    only_first = SwinTransformer(**{**TINY, "out_indices": (0,)}).eval()
    only_first.load_state_dict(model.state_dict())
    with torch.no_grad():
        (first,) = only_first(img)
    torch.testing.assert_close(first, feats[0])
    assert model.feature_channels == (16, 32) and model.feature_strides == (4, 8)


# ---------------------------------------------------------------------------------------
# Microsoft layout and load_pretrained
# ---------------------------------------------------------------------------------------


def to_microsoft(sd, depths):
    """The original release's layout, written out: merging at the end of the previous
    stage, a bare ``head``, and the persistent index/mask buffers it saved."""
    out = {}
    for k, v in sd.items():
        if ".downsample." in k:
            i = int(k.split(".")[1])
            k = k.replace(f"layers.{i}.downsample.", f"layers.{i - 1}.downsample.")
        k = k.replace("head.fc.", "head.")
        out[k] = v.clone()
    for i, depth in enumerate(depths):
        for j in range(depth):
            out[f"layers.{i}.blocks.{j}.attn.relative_position_index"] = torch.zeros(16, 16, dtype=torch.long)
            if j % 2:
                out[f"layers.{i}.blocks.{j}.attn_mask"] = torch.zeros(4, 16, 16)
    return out


def _assert_same_weights(model, sd):
    got = model.state_dict()
    assert set(got) == set(sd)
    for k in sd:
        assert torch.equal(got[k], sd[k]), k


def test_convert_microsoft_round_trip():
    src = tiny_model(dtype=torch.float32).state_dict()
    ms = to_microsoft(src, TINY["depths"])
    assert "layers.0.downsample.reduction.weight" in ms and "head.weight" in ms
    converted = convert_microsoft_swin({"model": ms})
    assert set(converted) == set(src)
    fresh = SwinTransformer(**TINY)
    result = fresh.load_state_dict(converted, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    _assert_same_weights(fresh, src)


@pytest.mark.parametrize("fmt", ["safetensors", "pt-timm", "pt-microsoft", "pt-state_dict"])
def test_load_pretrained_files(tmp_path, fmt):
    src = tiny_model(dtype=torch.float32).state_dict()
    if fmt == "safetensors":
        from safetensors.torch import save_file
        path = tmp_path / "swin.safetensors"
        save_file({k: v.contiguous() for k, v in src.items()}, str(path))
    else:
        path = tmp_path / "swin.pth"
        payload = {"pt-timm": src, "pt-microsoft": {"model": to_microsoft(src, TINY["depths"])},
                   "pt-state_dict": {"state_dict": {"module." + k: v for k, v in src.items()}}}[fmt]
        torch.save(payload, path)
    model = SwinTransformer(**TINY)
    report = load_pretrained(model, path)
    assert isinstance(report, LoadReport) and report.ok, str(report)
    assert report.missing == [] and report.unexpected == [] and report.interpolated == []
    assert report.converted_from == {"safetensors": [], "pt-timm": [], "pt-microsoft": ["microsoft"],
                                     "pt-state_dict": ["prefix 'module.'"]}[fmt]
    _assert_same_weights(model, src)
    assert str(path) in str(report)


def test_load_pretrained_drops_head_it_cannot_use(tmp_path):
    src = tiny_model(dtype=torch.float32).state_dict()
    path = tmp_path / "swin.pth"
    torch.save({"model": to_microsoft(src, TINY["depths"])}, path)
    for num_classes, reason in ((0, "no classifier"), (7, "class count differs")):
        model = SwinTransformer(**{**TINY, "num_classes": num_classes})
        report = load_pretrained(model, path)
        assert {"head.fc.weight", "head.fc.bias"} <= set(report.dropped)
        assert any(reason in n for n in report.notes)
        if num_classes == 0:
            assert report.ok
        else:  # the model's new classifier keeps its init and is reported missing
            assert sorted(report.missing) == ["head.fc.bias", "head.fc.weight"] and not report.unexpected
        sd = model.state_dict()
        assert torch.equal(sd["layers.1.downsample.reduction.weight"], src["layers.1.downsample.reduction.weight"])


def test_load_pretrained_interpolates_bias_tables(tmp_path):
    src = tiny_model(dtype=torch.float32).state_dict()
    key = "layers.0.blocks.1.attn.relative_position_bias_table"
    src["layers.1.blocks.0.attn.relative_position_bias_table"].fill_(0.25)  # a constant table stays constant
    path = tmp_path / "swin.pth"
    torch.save(src, path)
    model = SwinTransformer(**{**TINY, "window_size": 6})
    report = load_pretrained(model, path)
    assert report.ok and len(report.interpolated) == 4 and key in report.interpolated
    new = model.state_dict()
    assert new[key].shape == (11 * 11, 2)
    # bicubic with align_corners=False maps the zero-offset centre onto itself
    torch.testing.assert_close(new[key].reshape(11, 11, 2)[5, 5], src[key].reshape(7, 7, 2)[3, 3])
    torch.testing.assert_close(new["layers.1.blocks.0.attn.relative_position_bias_table"],
                               torch.full((121, 4), 0.25))
    torch.testing.assert_close(new["layers.0.blocks.0.attn.qkv.weight"], src["layers.0.blocks.0.attn.qkv.weight"])
    with torch.no_grad():
        feats = model.eval()(torch.randn(1, 3, 48, 48))
    assert [tuple(f.shape) for f in feats] == [(1, 16, 12, 12), (1, 32, 6, 6)]
    assert all(torch.isfinite(f).all() for f in feats)


def test_load_pretrained_errors(tmp_path):
    model = SwinTransformer(**TINY)
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_pretrained(model, missing)

    not_swin = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(2, 3, 1, 1), "fc.weight": torch.zeros(2, 2)}, not_swin)
    with pytest.raises(ValueError, match="resnet.pth.*not a Swin checkpoint"):
        load_pretrained(model, not_swin)

    pickled = tmp_path / "object.pth"
    torch.save({"model": LoadReport(path="x")}, pickled)  # an arbitrary object: refused by weights_only
    with pytest.raises(ValueError, match="object.pth.*not a Swin checkpoint"):
        load_pretrained(model, pickled)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 32)
    with pytest.raises(ValueError, match="garbage.safetensors"):
        load_pretrained(model, garbage)

    other = tmp_path / "wider.pth"
    torch.save(SwinTransformer(**{**TINY, "embed_dim": 8}).state_dict(), other)
    with pytest.raises(ValueError, match="wider.pth.*shapes do not match"):
        load_pretrained(model, other)

    with pytest.raises(ValueError, match="source"):
        load_pretrained(model, other, source="hf")


def test_load_pretrained_strict_raises_on_missing(tmp_path):
    src = tiny_model(dtype=torch.float32).state_dict()
    del src["norm.weight"]
    path = tmp_path / "partial.pth"
    torch.save(src, path)
    report = load_pretrained(SwinTransformer(**TINY), path)
    assert report.missing == ["norm.weight"] and not report.ok and "missing 1" in str(report)
    with pytest.raises(RuntimeError, match="norm.weight"):
        load_pretrained(SwinTransformer(**TINY), path, strict=True)


# ---------------------------------------------------------------------------------------
# compile, memory format, training pieces
# ---------------------------------------------------------------------------------------


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = tiny_model(dtype=torch.float32)
    img = torch.randn(2, 3, 20, 44)  # padding, a shrunk window and a one-axis shift in one graph
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        want = model(img)
        got = compiled(img)
    for g, w_ in zip(got, want):
        torch.testing.assert_close(g, w_, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_channels_last_input_gives_same_features():
    model = tiny_model()
    img = torch.randn(2, 3, 36, 44, dtype=torch.float64)
    with torch.no_grad():
        want = model(img)
        got = model(img.contiguous(memory_format=torch.channels_last))
    for g, w_ in zip(got, want):
        torch.testing.assert_close(g, w_, rtol=0, atol=1e-12)
        assert g.is_contiguous(memory_format=torch.channels_last)


def test_drop_path_zeroes_whole_samples_and_rescales():
    x = torch.ones(64, 3, 5)
    y = drop_path(x, 0.25, training=True)
    per_sample = y.reshape(64, -1)
    kept = per_sample[:, 0] != 0
    assert torch.equal(per_sample[kept], torch.full_like(per_sample[kept], 1 / 0.75))
    assert torch.equal(per_sample[~kept], torch.zeros_like(per_sample[~kept]))
    assert 0 < kept.sum() < 64
    assert drop_path(x, 0.25, training=False) is x


def test_grad_checkpointing_same_gradients():
    model = tiny_model(dtype=torch.float64, drop_path_rate=0.0).train()
    img = torch.randn(1, 3, 32, 32, dtype=torch.float64)

    def grads():
        model.zero_grad()
        sum(f.square().mean() for f in model(img)).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.set_grad_checkpointing(True)
    ckpt = grads()
    assert plain.keys() == ckpt.keys() and "layers.0.blocks.1.attn.relative_position_bias_table" in plain
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------
# timm agreement (GPU machine: timm is not importable on the CPU machines)
# ---------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("size", [224, 448])
def test_matches_timm_swin_tiny_on_cuda(size):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ref = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=size).cuda().eval()
    ours = swin_t().cuda().eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    img = torch.randn(2, 3, size, size, device="cuda")
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            x = ref.patch_embed(img)  # timm >= 0.9 keeps NHWC tokens between stages
            want = []
            for stage in ref.layers:
                x = stage(x)
                want.append(x.permute(0, 3, 1, 2))
            want_logits = ref(img)
            got = ours(img)
            got_logits = ours.forward_head(ours.forward_features(img))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    stride = 4
    for i, (g, w_) in enumerate(zip(got, want)):
        assert g.shape == (2, 96 * 2 ** i, size // stride, size // stride)
        torch.testing.assert_close(g, w_, rtol=1e-4, atol=1e-4)
        stride *= 2
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)


def test_load_pretrained_refuses_a_peft_checkpoint_naming_the_loader(tmp_path):
    """An MTLoRA/TADFormer checkpoint wraps the backbone's linears: loading it as Swin would half-fit."""
    sd = {f"backbone.{k}": v for k, v in SwinTransformer(**TINY).state_dict().items()}
    sd["backbone.layers.0.blocks.0.attn.qkv.lora_shared_A"] = torch.zeros(4, 16)
    path = tmp_path / "mtlora.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"mtlora\.pth holds a parameter-efficient model.*mtlora_checkpoint"):
        load_pretrained(SwinTransformer(**TINY), path)
