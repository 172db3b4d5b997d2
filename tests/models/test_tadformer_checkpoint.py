"""Checkpoints of the released TADFormer code load into tadformer_swin_t and compute the same outputs.

The released model is not importable here (it needs timm, einops and its yacs config), so this
file writes it down independently from reading ``models/swin_transformer_tadformer.py``,
``models/lora.py`` (``TAModuleLinear``, ``NaiveConvFilter``, ``DTF``, ``FilterNorm``),
``models/swin_mtl.py`` and ``models/seg_hrnet.py`` of punpunzaz10/TADFormer:
:func:`official_state_dict` builds every key with the shapes and buffers the released modules
register, and :func:`official_forward` evaluates it the way the released modules do, in
plain tensor code (eval mode) — including the released reading of the gate's skip term
(stored per window channels-first, viewed tokens-first).
"""
import pytest
import torch
import torch.nn.functional as F

from fastdense.models import create_model
from fastdense.models.tadformer_checkpoint import convert_tadformer_checkpoint, is_tadformer_layout, load_pretrained

TASKS = {"semseg": 21, "sal": 1, "normals": 3}  # PASCAL-Context channels; three tasks, not the released four
# 128x128 input: 32, 16, 8, 4 token maps; window 4: three shifted stages and one window equal to the map
# (a released model built for a map smaller than its window has a smaller bias table).
CFG = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=4, img_size=128, rank=4,
           scale=1.5, decoder_channels=(4, 4, 4, 4))


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    pass


# ----------------------------------------------------------------------------- the released model, written out
def _window_partition(x, w):
    b, h, wd, c = x.shape
    return x.view(b, h // w, w, wd // w, w, c).permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, w, w, c)


def _window_reverse(windows, w, h, wd):
    b = int(windows.shape[0] / (h * wd / w / w))
    x = windows.view(b, h // w, wd // w, w, w, -1)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(b, h, wd, -1)


def _relative_position_index(w):
    coords = torch.stack(torch.meshgrid([torch.arange(w), torch.arange(w)], indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += w - 1
    rel[:, :, 1] += w - 1
    rel[:, :, 0] *= 2 * w - 1
    return rel.sum(-1)


def _shift_mask(h, wd, w, shift):
    img = torch.zeros((1, h, wd, 1))
    cnt = 0
    for hs in (slice(0, -w), slice(-w, -shift), slice(-shift, None)):
        for ws in (slice(0, -w), slice(-w, -shift), slice(-shift, None)):
            img[:, hs, ws, :] = cnt
            cnt += 1
    mw = _window_partition(img, w).view(-1, w * w)
    mask = mw.unsqueeze(1) - mw.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


def _stages(cfg):
    res = cfg["img_size"] // 4
    out = []
    for i, heads in enumerate(cfg["num_heads"]):
        r = res // 2 ** i
        w, shift = cfg["window_size"], cfg["window_size"] // 2
        if r <= w:
            w, shift = r, 0
        out.append((cfg["embed_dim"] * 2 ** i, heads, r, w, shift))
    return out


def official_state_dict(cfg, tasks, dtf=False, seed=0):
    """Every key of MultiTaskSwin(SwinTransformerTADFormer) with random values; ``dtf``: the
    released TAModuleLinear with its commented-out DTF line restored instead of NaiveConvFilter."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.2):
        return torch.randn(*shape, generator=g) * std

    e, r = cfg["embed_dim"], cfg["rank"]
    sd = {"backbone.task_prompts": 1 + rnd(len(tasks), e, std=0.5),
          "backbone.patch_embed.proj.weight": rnd(e, 3, 4, 4), "backbone.patch_embed.proj.bias": rnd(e),
          "backbone.patch_embed.norm.weight": 1 + rnd(e), "backbone.patch_embed.norm.bias": rnd(e)}

    def ta_linear(prefix, n_in, n_out, with_tasks, proj=False):
        sd[prefix + "linear.weight"] = rnd(n_out, n_in)
        sd[prefix + "linear.bias"] = rnd(n_out)
        sd[prefix + "lora_shared_A"] = rnd(r, n_in)
        sd[prefix + "lora_shared_B"] = rnd(n_out, r)
        if proj:  # built in every block's projection, read only where there are tasks
            sd[prefix + "prompt_layernorm.weight"] = 1 + rnd(n_in)
            sd[prefix + "prompt_layernorm.bias"] = rnd(n_in)
        if with_tasks and dtf:
            sd[prefix + "lora_filter.conv.weight"] = rnd(9 * r, r, 1, 1, std=0.5)
            sd[prefix + "lora_filter.conv.bias"] = rnd(9 * r)
            sd[prefix + "lora_filter.chan_FilterNorm.std"] = rnd(9 * r, std=0.3)
            sd[prefix + "lora_filter.chan_FilterNorm.mean"] = rnd(9 * r, std=0.3)
        elif with_tasks:
            for t in tasks:
                sd[prefix + f"lora_filter.{t}.conv2d.weight"] = rnd(r, 1, 3, 3, std=0.5)
                sd[prefix + f"lora_filter.{t}.conv2d.bias"] = rnd(r)

    stages = _stages(cfg)
    for i, (c, heads, res, w, shift) in enumerate(stages):
        depth = cfg["depths"][i]
        for j in range(depth):
            p = f"backbone.layers.{i}.blocks.{j}."
            last = j == depth - 1
            sd[p + "norm1.weight"], sd[p + "norm1.bias"] = 1 + rnd(c), rnd(c)
            sd[p + "attn.relative_position_bias_table"] = rnd((2 * w - 1) ** 2, heads)
            sd[p + "attn.relative_position_index"] = _relative_position_index(w)
            ta_linear(p + "attn.qkv.", c, 3 * c, False)
            ta_linear(p + "attn.proj.", c, c, last, proj=True)
            sd[p + "norm2.weight"], sd[p + "norm2.bias"] = 1 + rnd(c), rnd(c)
            ta_linear(p + "mlp.fc1.", c, 4 * c, last)
            ta_linear(p + "mlp.fc2.", 4 * c, c, last)
            if j % 2 and shift:
                sd[p + "attn_mask"] = _shift_mask(res, res, w, shift)
        sd[f"backbone.layers.{i}.prompt_gate"] = rnd(1, std=1.0)
        if i < len(stages) - 1:
            p = f"backbone.layers.{i}.downsample."
            sd[p + "reduction.weight"] = rnd(2 * c, 4 * c)
            sd[p + "task_prompts_up.weight"] = rnd(2 * c, c)
            sd[p + "norm.weight"], sd[p + "norm.bias"] = 1 + rnd(4 * c), rnd(4 * c)
    dims = [e * 2 ** (i + 1) if i < len(stages) - 1 else e * 2 ** i for i in range(len(stages))]
    chans = cfg["decoder_channels"]
    width = sum(chans)
    for t, n_out in tasks.items():
        for k, (d, ch) in enumerate(zip(dims, chans)):
            sd[f"downsampler.{t}.downsample_{k}.weight"] = rnd(ch, d, 1, 1)
        p = f"decoders.decoders.{t}.last_layer."
        sd[p + "0.weight"], sd[p + "0.bias"] = rnd(4 * width, width, 1, 1), rnd(4 * width)
        sd[p + "1.weight"], sd[p + "1.bias"] = 1 + rnd(4 * width), rnd(4 * width)
        sd[p + "1.running_mean"], sd[p + "1.running_var"] = rnd(4 * width), 0.5 + torch.rand(4 * width, generator=g)
        sd[p + "1.num_batches_tracked"] = torch.tensor(7)
        sd[p + "3.weight"], sd[p + "3.bias"] = rnd(n_out, 4 * width, 1, 1), rnd(n_out)
    return sd


def official_forward(sd, x, cfg, tasks):
    """MultiTaskSwin.forward in eval mode (dropout and drop-path off), key by key."""
    task_names = list(tasks)
    n_prompts = len(task_names)  # PERTASK_LEN = 1
    s = cfg["scale"]

    def ln(t, p):
        return F.layer_norm(t, t.shape[-1:], sd[p + "weight"], sd[p + "bias"])

    def task_filter(p, h):  # h (B, r, H, W)
        if p + "lora_filter.conv.weight" in sd:  # DTF: pool, 1x1 conv, channel FilterNorm, per-sample conv
            b, c, hh, ww = h.shape
            weight = F.conv2d(F.adaptive_avg_pool2d(h, 1), sd[p + "lora_filter.conv.weight"],
                              sd[p + "lora_filter.conv.bias"]).reshape(b, c, -1)
            weight = weight - weight.mean(dim=2, keepdim=True)
            weight = weight / (weight.std(dim=2, keepdim=True) + 1e-10)
            weight = weight.reshape(b, -1) * sd[p + "lora_filter.chan_FilterNorm.std"][None] \
                + sd[p + "lora_filter.chan_FilterNorm.mean"][None]
            out = F.conv2d(h.reshape(1, -1, hh, ww), weight.view(b * c, 1, 3, 3), padding=1, groups=b * c)
            return out.view(b, c, hh, ww)
        return None

    def ta_linear(p, x, x_tasks=None, hw=None, attn_weight=None, with_tasks=False, layer=None, prompt_flag=False):
        """TAModuleLinear.forward ('matrix', eval). Returns (shared, task outputs, skip features)."""
        pretrained = F.linear(x, sd[p + "linear.weight"], sd[p + "linear.bias"])
        lora = (x @ sd[p + "lora_shared_A"].t() @ sd[p + "lora_shared_B"].t()) * s
        if prompt_flag or not with_tasks:
            return pretrained + lora, None, None
        x_tasks = {t: x for t in task_names} if x_tasks is None else dict(x_tasks)
        skips = {}
        if layer == "proj":
            for t_idx, t in enumerate(task_names):
                xt = x_tasks[t][:, n_prompts:, :].transpose(1, 2).contiguous()         # (b, C, n)
                a = attn_weight[:, :, t_idx:t_idx + 1, :]                               # (b, heads, 1, n)
                heads = a.shape[1]
                d = xt.shape[1] // heads
                fea = torch.cat([a[:, hh] * xt[:, d * hh:d * (hh + 1)] for hh in range(heads)], dim=1)
                skips[t] = fea                                                          # (b, C, n), kept as is
                x_tasks[t] = ln((fea + xt).transpose(2, 1), p + "prompt_layernorm.")
        hh, ww = hw
        out = {}
        for t in task_names:
            h = x_tasks[t] @ sd[p + "lora_shared_A"].t()                                # (B, N, r)
            b, n, c = h.shape
            hm = h.reshape(b, hh, ww, c).permute(0, 3, 1, 2)
            filtered = task_filter(p, hm)
            if filtered is None:
                filtered = F.conv2d(hm, sd[p + f"lora_filter.{t}.conv2d.weight"],
                                    sd[p + f"lora_filter.{t}.conv2d.bias"], padding=1, groups=c)
            h = filtered.permute(0, 2, 3, 1).reshape(b, n, c)
            base = pretrained[:, n_prompts:, :] if layer == "proj" else pretrained
            out[t] = base + h @ sd[p + "lora_shared_B"].t() * s
        return pretrained + lora, out, skips

    def block(p, x, prompts, res, heads, w, shift, last, network_last):
        b, length, c = x.shape
        shortcut, ori_prompts = x, prompts
        sp = ln(prompts, p + "norm1.")
        y = ln(x, p + "norm1.").view(b, res, res, c)
        if shift:
            y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))
        xw = _window_partition(y, w).view(-1, w * w, c)
        nw = xw.shape[0] // b
        sp = sp[:, None].expand(-1, nw, -1, -1).clone().reshape(-1, n_prompts, c)
        t = torch.cat([sp, xw], dim=1)
        bn, n, _ = t.shape
        qkv, _, _ = ta_linear(p + "attn.qkv.", t)
        q, k, v = qkv.reshape(bn, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        attn_weight = q @ k.transpose(-2, -1)
        attn = attn_weight * (c // heads) ** -0.5
        table, index = sd[p + "attn.relative_position_bias_table"], sd[p + "attn.relative_position_index"]
        bias = table[index.view(-1)].view(w * w, w * w, -1).permute(2, 0, 1)
        attn[:, :, n_prompts:, n_prompts:] = attn[:, :, n_prompts:, n_prompts:] + bias.unsqueeze(0)
        mask = sd.get(p + "attn_mask")
        if mask is not None:
            attn = attn.view(bn // nw, nw, heads, n, n)
            patches = attn[:, :, :, n_prompts:, n_prompts:]
            attn[:, :, :, n_prompts:, n_prompts:] = patches + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, heads, n, n)
        o = (attn.softmax(-1) @ v).transpose(1, 2).reshape(bn, n, c)
        gelu_weight = F.gelu(attn_weight[:, :, :n_prompts, n_prompts:])
        o, o_t, skips = ta_linear(p + "attn.proj.", o, hw=(w, w), attn_weight=gelu_weight, with_tasks=last,
                                  layer="proj")
        new_prompts = o[:, :n_prompts].reshape(b, nw, n_prompts, c).mean(1)
        o = o[:, n_prompts:]

        def unwindow(t):
            t = _window_reverse(t.view(-1, w, w, c), w, res, res)  # .view: the released reading, also of skips
            if shift:
                t = torch.roll(t, shifts=(shift, shift), dims=(1, 2))
            return t.view(b, res * res, c)

        x = shortcut + unwindow(o)
        a_t = {t: shortcut + unwindow(v) for t, v in o_t.items()} if o_t else None
        skips = {t: unwindow(v) for t, v in skips.items()} if skips else None
        h1, h1_t, _ = ta_linear(p + "mlp.fc1.", ln(x, p + "norm2."),
                                {t: ln(v, p + "norm2.") for t, v in a_t.items()} if a_t else None, hw=(res, res),
                                with_tasks=last, layer="fc1")
        h1 = F.gelu(h1)
        h1_t = {t: F.gelu(v) for t, v in h1_t.items()} if h1_t else None
        m, m_t, _ = ta_linear(p + "mlp.fc2.", h1, h1_t, hw=(res, res), with_tasks=last, layer="fc2")
        if network_last:
            prompts = new_prompts
        else:
            pm, _, _ = ta_linear(p + "mlp.fc1.", ln(new_prompts, p + "norm2."), prompt_flag=True)
            pm, _, _ = ta_linear(p + "mlp.fc2.", F.gelu(pm), prompt_flag=True)
            prompts = ori_prompts + pm
        return x + m, ({t: a_t[t] + m_t[t] for t in task_names} if m_t else None), prompts, skips

    def merge(p, x, res):
        b, _, c = x.shape
        x = x.view(b, res, res, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1).view(b, -1, 4 * c)
        return F.linear(ln(x, p + "norm."), sd[p + "reduction.weight"])

    x_img = x
    x = F.conv2d(x, sd["backbone.patch_embed.proj.weight"], sd["backbone.patch_embed.proj.bias"], stride=4)
    x = ln(x.flatten(2).transpose(1, 2), "backbone.patch_embed.norm.")
    prompts = sd["backbone.task_prompts"][None].expand(x.shape[0], -1, -1)
    stages = _stages(cfg)
    feats, shapes = [], []
    for i, (_, heads, res, w, shift) in enumerate(stages):
        depth = cfg["depths"][i]
        for j in range(depth):
            x, x_t, prompts, skips = block(f"backbone.layers.{i}.blocks.{j}.", x, prompts, res, heads, w,
                                           shift if j % 2 else 0, j == depth - 1,
                                           j == depth - 1 and i == len(stages) - 1)
        gate = torch.sigmoid(sd[f"backbone.layers.{i}.prompt_gate"])
        x_t = {t: skips[t] * gate + (1 - gate) * x_t[t] for t in task_names}
        if i < len(stages) - 1:
            p = f"backbone.layers.{i}.downsample."
            x, x_t = merge(p, x, res), {t: merge(p, v, res) for t, v in x_t.items()}
            prompts = F.linear(prompts, sd[p + "task_prompts_up.weight"])
        feats.append(x_t)
        shapes.append(res // 2 if i < len(stages) - 1 else res)
    out = {}
    for t in task_names:
        levels = []
        for k, (f, res) in enumerate(zip(feats, shapes)):
            lv = f[t].view(-1, res, res, f[t].shape[-1]).permute(0, 3, 1, 2)
            levels.append(F.conv2d(lv, sd[f"downsampler.{t}.downsample_{k}.weight"]))
        size = levels[0].shape[-2:]
        y = torch.cat([levels[0]] + [F.interpolate(v, size, mode="bilinear") for v in levels[1:]], 1)
        p = f"decoders.decoders.{t}.last_layer."
        y = F.conv2d(y, sd[p + "0.weight"], sd[p + "0.bias"])
        y = F.batch_norm(y, sd[p + "1.running_mean"], sd[p + "1.running_var"], sd[p + "1.weight"], sd[p + "1.bias"])
        y = F.conv2d(F.relu(y), sd[p + "3.weight"], sd[p + "3.bias"])
        out[t] = F.interpolate(y, x_img.shape[-2:], mode="bilinear")
    return out


def our_model(**kw):
    torch.manual_seed(1)
    return create_model("tadformer_swin_t", tasks=list(TASKS), dataset="pascal", **{"filter": "static", **CFG, **kw})


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("dtf", [False, True], ids=["released", "released-with-dtf"])
def test_released_checkpoint_loads_strictly_and_gives_the_same_outputs(dtf):
    official = official_state_dict(CFG, TASKS, dtf=dtf)
    assert is_tadformer_layout(official)
    converted = convert_tadformer_checkpoint({"model": official, "epoch": 3})
    dropped = {k for k in official if k.endswith(("relative_position_index", "attn_mask"))}
    gates = {k for k in official if k.endswith("prompt_gate")}
    assert len(converted) == len(official) - len(dropped) - len(gates) + 1  # the gates become one tensor
    # The DTF-restored released code still reads the skip term the released way.
    model = our_model(filter="dynamic", gate_skip="released") if dtf else our_model()
    assert set(converted) == set(model.state_dict())
    model.load_state_dict(converted, strict=True)
    # float64: the two computations must agree to rounding, which fp32 would blur (outputs ~100).
    model = model.double().eval()
    official64 = {k: v.double() if v.is_floating_point() else v for k, v in official.items()}
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        got = model(x)
        want = official_forward(official64, x, CFG, TASKS)
    for t, c in TASKS.items():
        assert got[t].shape == (2, c, 128, 128)
        torch.testing.assert_close(got[t], want[t], rtol=1e-9, atol=1e-9)
    # The skip term's layout matters: read in its own layout, the outputs differ.
    other = our_model(filter=model.filter, gate_skip="reweighting")
    other.load_state_dict(converted, strict=True)
    with torch.no_grad():
        assert not torch.allclose(other.double().eval()(x)["semseg"], want["semseg"], rtol=1e-3, atol=1e-3)


def test_load_pretrained_reads_a_released_checkpoint_file(tmp_path):
    official = official_state_dict(CFG, TASKS)
    path = tmp_path / "tadformer.pth"
    torch.save({"model": {f"module.{k}": v for k, v in official.items()}, "epoch": 299}, path)
    model = our_model()
    report = load_pretrained(model, path)
    assert report.ok and report.converted_from == ["tadformer"]
    torch.testing.assert_close(model.backbone.layers[1].downsample.reduction.weight,
                               official["backbone.layers.0.downsample.reduction.weight"])
    torch.testing.assert_close(model.prompt_up[2].weight,
                               official["backbone.layers.2.downsample.task_prompts_up.weight"])
    torch.testing.assert_close(model.stage_gate, torch.cat([official[f"backbone.layers.{i}.prompt_gate"]
                                                            for i in range(4)]))
    torch.testing.assert_close(model.backbone.layers[3].blocks[1].attn.prompt_norm.bias,
                               official["backbone.layers.3.blocks.1.attn.proj.prompt_layernorm.bias"])

    # Without the unused prompt norms the loader drops the released ones of the other blocks.
    lean = our_model(prompt_norm_every_block=False)
    report = load_pretrained(lean, path)
    assert report.ok and len([k for k in report.dropped if ".prompt_norm." in k]) == 2 * 4
    with pytest.raises(ValueError, match="filter='static'"):
        load_pretrained(our_model(filter="dynamic"), path)


def test_load_pretrained_swin_backbone_weights(tmp_path):
    from fastdense.models.swin import SwinTransformer

    torch.manual_seed(3)
    swin = SwinTransformer(num_classes=10, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=4)
    path = tmp_path / "swin.pt"
    torch.save(swin.state_dict(), path)
    model = our_model(pretrained=str(path))
    ours = model.backbone.state_dict()
    for key, value in swin.state_dict().items():
        if not key.startswith(("head.", "norm.")):
            torch.testing.assert_close(ours[key], value, rtol=0, atol=0)
    report = load_pretrained(model, path)
    assert report.ok and "norm.weight" in report.dropped and "head.fc.weight" in report.dropped


def test_unsupported_or_foreign_keys_raise():
    official = official_state_dict(CFG, TASKS)
    with pytest.raises(ValueError, match="not a key of the released TADFormer model"):
        convert_tadformer_checkpoint({**official, "teacher.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="DOWNSAMPLER_ENABLED"):
        convert_tadformer_checkpoint({"backbone.layers.0.downsample.reduction.lora_shared_A": torch.zeros(1)})
    with pytest.raises(ValueError, match="no final norm or classifier"):
        convert_tadformer_checkpoint({"backbone.head.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="prompt gates of stages"):
        convert_tadformer_checkpoint({"backbone.layers.1.prompt_gate": torch.zeros(1)})
