"""Checkpoints of the released MTLoRA code load into mtlora_swin_t and compute the same outputs.

The released model is not importable here (it needs timm and its yacs config), so this file
writes it down independently from reading ``models/swin_transformer_mtlora.py``,
``models/swin_mtl.py``, ``models/seg_hrnet.py`` and ``models/lora.py`` of scale-lab/MTLoRA:
:func:`official_state_dict` builds every key (with the shapes and buffers the released
modules register) and :func:`official_forward` evaluates that state dict the way the released
modules do, in plain tensor code. The converted checkpoint must load strictly into our model,
and both must give the same outputs.
"""
import pytest
import torch
import torch.nn.functional as F

from fastdense.models import create_model
from fastdense.models.mtlora_checkpoint import convert_mtlora_checkpoint, is_mtlora_layout, load_pretrained
from fastdense.models.swin import SwinTransformer

TASKS = {"semseg": 21, "sal": 1}  # PASCAL-Context channels
CFG = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=2, img_size=64, shared_rank=4,
           task_rank=2, shared_scale=1.5, task_scale=2.0, decoder_channels=(4, 4, 4, 4))


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
    """(dim, heads, resolution, window, shift of odd blocks) per stage, as BasicLayer and
    SwinTransformerBlock set them (the window shrinks to the map when the map is not larger)."""
    res = cfg["img_size"] // 4
    out = []
    for i, heads in enumerate(cfg["num_heads"]):
        r = res // 2 ** i
        w, shift = cfg["window_size"], cfg["window_size"] // 2
        if r <= w:
            w, shift = r, 0
        out.append((cfg["embed_dim"] * 2 ** i, heads, r, w, shift))
    return out


def official_state_dict(cfg, tasks, shared_mode="matrix", trainable_scales=False, seed=0):
    """Every key of MultiTaskSwin(SwinTransformerMTLoRA) with random values."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.2):
        return torch.randn(*shape, generator=g) * std

    e, r0, rt = cfg["embed_dim"], cfg["shared_rank"], cfg["task_rank"]
    sd = {"backbone.patch_embed.proj.weight": rnd(e, 3, 4, 4), "backbone.patch_embed.proj.bias": rnd(e),
          "backbone.patch_embed.norm.weight": 1 + rnd(e), "backbone.patch_embed.norm.bias": rnd(e)}

    def mtlora(prefix, n_in, n_out, with_tasks, bias=True):
        sd[prefix + "linear.weight"] = rnd(n_out, n_in)
        if bias:
            sd[prefix + "linear.bias"] = rnd(n_out)
        addition = shared_mode == "addition" and with_tasks  # without tasks the layer falls back to 'matrix'
        if addition:
            sd[prefix + "lora_norm.weight"] = 1 + rnd(n_out)
            sd[prefix + "lora_norm.bias"] = rnd(n_out)
        else:
            sd[prefix + "lora_shared_A"] = rnd(r0, n_in)
            sd[prefix + "lora_shared_B"] = rnd(n_out, r0)
        if trainable_scales:  # created in every mode, read only where there is a shared LoRA
            sd[prefix + "lora_shared_scale"] = torch.tensor([cfg["shared_scale"] + 0.25])
        if with_tasks:
            for t in tasks:
                sd[prefix + f"lora_tasks_A.{t}"] = rnd(rt, n_in)
                sd[prefix + f"lora_tasks_B.{t}"] = rnd(n_out, rt)
                if trainable_scales:
                    sd[prefix + f"lora_task_scale.{t}"] = torch.tensor([cfg["task_scale"] - 0.5])

    stages = _stages(cfg)
    for i, (c, heads, res, w, shift) in enumerate(stages):
        depth = cfg["depths"][i]
        for j in range(depth):
            p = f"backbone.layers.{i}.blocks.{j}."
            last = j == depth - 1
            sd[p + "norm1.weight"], sd[p + "norm1.bias"] = 1 + rnd(c), rnd(c)
            sd[p + "attn.relative_position_bias_table"] = rnd((2 * w - 1) ** 2, heads)
            sd[p + "attn.relative_position_index"] = _relative_position_index(w)
            mtlora(p + "attn.qkv.", c, 3 * c, False)
            mtlora(p + "attn.proj.", c, c, last)
            sd[p + "norm2.weight"], sd[p + "norm2.bias"] = 1 + rnd(c), rnd(c)
            mtlora(p + "mlp.fc1.", c, 4 * c, last)
            mtlora(p + "mlp.fc2.", 4 * c, c, last)
            if j % 2 and shift:
                sd[p + "attn_mask"] = _shift_mask(res, res, w, shift)
        if i < len(stages) - 1:
            p = f"backbone.layers.{i}.downsample."
            sd[p + "reduction.weight"] = rnd(2 * c, 4 * c)
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


def official_forward(sd, x, cfg, tasks, shared_mode="matrix"):
    """MultiTaskSwin.forward in eval mode (dropout and drop-path off), key by key."""
    def ln(t, p):
        return F.layer_norm(t, t.shape[-1:], sd[p + "weight"], sd[p + "bias"])

    def mtlora(p, x, with_tasks=False, x_tasks=None):
        pretrained = F.linear(x, sd[p + "linear.weight"], sd.get(p + "linear.bias"))
        addition = shared_mode == "addition" and with_tasks
        if not addition:
            s0 = sd.get(p + "lora_shared_scale", torch.tensor([cfg["shared_scale"]]))
            lora = (x @ sd[p + "lora_shared_A"].t() @ sd[p + "lora_shared_B"].t()) * s0
        out_t = None
        if with_tasks:
            out_t = {}
            for t in tasks:
                st = sd.get(p + f"lora_task_scale.{t}", torch.tensor([cfg["task_scale"]]))
                u = x if x_tasks is None else x_tasks[t]
                base = pretrained + lora if shared_mode == "matrixv2" else pretrained
                out_t[t] = base + (u @ sd[p + f"lora_tasks_A.{t}"].t() @ sd[p + f"lora_tasks_B.{t}"].t() * st)
        if addition:
            lora = F.layer_norm(torch.stack(list(out_t.values())).sum(0), pretrained.shape[-1:],
                                sd[p + "lora_norm.weight"], sd[p + "lora_norm.bias"])
        return pretrained + lora, out_t

    def block(p, x, h, wd, heads, w, shift, last):
        b, _, c = x.shape
        shortcut = x
        y = ln(x, p + "norm1.").view(b, h, wd, c)
        if shift:
            y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))
        xw = _window_partition(y, w).view(-1, w * w, c)
        bn, n, _ = xw.shape
        qkv, _ = mtlora(p + "attn.qkv.", xw)
        q, k, v = qkv.reshape(bn, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        attn = (q * (c // heads) ** -0.5) @ k.transpose(-2, -1)
        table, index = sd[p + "attn.relative_position_bias_table"], sd[p + "attn.relative_position_index"]
        attn = attn + table[index.view(-1)].view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
        mask = sd.get(p + "attn_mask")
        if mask is not None:
            nw = mask.shape[0]
            attn = (attn.view(bn // nw, nw, heads, n, n) + mask.unsqueeze(1).unsqueeze(0)).view(-1, heads, n, n)
        out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(bn, n, c)
        a, a_t = mtlora(p + "attn.proj.", out, last)

        def unwindow(t):
            t = _window_reverse(t.view(-1, w, w, c), w, h, wd)
            if shift:
                t = torch.roll(t, shifts=(shift, shift), dims=(1, 2))
            return t.view(b, h * wd, c)

        x = shortcut + unwindow(a)
        if a_t is not None:
            a_t = {t: shortcut + unwindow(v) for t, v in a_t.items()}
        h1, h1_t = mtlora(p + "mlp.fc1.", ln(x, p + "norm2."), last,
                          {t: ln(v, p + "norm2.") for t, v in a_t.items()} if a_t else None)
        h1 = F.gelu(h1)
        h1_t = {t: F.gelu(v) for t, v in h1_t.items()} if h1_t else None
        m, m_t = mtlora(p + "mlp.fc2.", h1, last, h1_t)
        return x + m, ({t: a_t[t] + m_t[t] for t in tasks} if m_t else None)

    def merge(p, x, h, wd):
        b, _, c = x.shape
        x = x.view(b, h, wd, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1).view(b, -1, 4 * c)
        return F.linear(ln(x, p + "norm."), sd[p + "reduction.weight"])

    x_img = x
    x = F.conv2d(x, sd["backbone.patch_embed.proj.weight"], sd["backbone.patch_embed.proj.bias"], stride=4)
    x = ln(x.flatten(2).transpose(1, 2), "backbone.patch_embed.norm.")
    stages = _stages(cfg)
    feats, shapes = [], []
    for i, (_, heads, res, w, shift) in enumerate(stages):
        depth = cfg["depths"][i]
        for j in range(depth):
            x, x_t = block(f"backbone.layers.{i}.blocks.{j}.", x, res, res, heads, w, shift if j % 2 else 0,
                           j == depth - 1)
        if i < len(stages) - 1:
            p = f"backbone.layers.{i}.downsample."
            x, x_t = merge(p, x, res, res), {t: merge(p, v, res, res) for t, v in x_t.items()}
        feats.append(x_t)
        shapes.append(res // 2 if i < len(stages) - 1 else res)
    out = {}
    for t in tasks:
        levels = []
        for k, (f, res) in enumerate(zip(feats, shapes)):
            s = f[t].view(-1, res, res, f[t].shape[-1]).permute(0, 3, 1, 2)
            levels.append(F.conv2d(s, sd[f"downsampler.{t}.downsample_{k}.weight"]))
        size = levels[0].shape[-2:]
        y = torch.cat([levels[0]] + [F.interpolate(v, size, mode="bilinear") for v in levels[1:]], 1)
        p = f"decoders.decoders.{t}.last_layer."
        y = F.conv2d(y, sd[p + "0.weight"], sd[p + "0.bias"])
        y = F.batch_norm(y, sd[p + "1.running_mean"], sd[p + "1.running_var"], sd[p + "1.weight"], sd[p + "1.bias"])
        y = F.conv2d(F.relu(y), sd[p + "3.weight"], sd[p + "3.bias"])
        out[t] = F.interpolate(y, x_img.shape[-2:], mode="bilinear")
    return out


def our_model(shared_mode="matrix", trainable_scales=False):
    torch.manual_seed(1)
    return create_model("mtlora_swin_t", tasks=list(TASKS), dataset="pascal", shared_mode=shared_mode,
                        trainable_shared_scale=trainable_scales, trainable_task_scale=trainable_scales, **CFG)


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("shared_mode,trainable_scales", [("matrix", False), ("addition", True), ("matrixv2", True)])
def test_released_checkpoint_loads_strictly_and_gives_the_same_outputs(shared_mode, trainable_scales):
    official = official_state_dict(CFG, TASKS, shared_mode, trainable_scales)
    assert is_mtlora_layout(official)
    converted = convert_mtlora_checkpoint({"model": official, "epoch": 3})
    dropped = {k for k in official if k.endswith(("relative_position_index", "attn_mask"))}
    assert len(converted) == len(official) - len(dropped)
    model = our_model(shared_mode, trainable_scales)
    if shared_mode == "addition":  # the unused shared scales of the 'addition' layers are dropped on load
        converted_keys = {k for k in converted if not (k.endswith("lora_shared_scale") and k.replace(
            "lora_shared_scale", "lora_norm.weight") in converted)}
        assert converted_keys == set(model.state_dict())
    else:
        assert set(converted) == set(model.state_dict())
    model.load_state_dict(converted, strict=True)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = model.eval()(x)
        want = official_forward(official, x, CFG, TASKS, shared_mode)
    for t, c in TASKS.items():
        assert got[t].shape == (2, c, 64, 64)
        torch.testing.assert_close(got[t], want[t], rtol=1e-4, atol=1e-4)


def test_load_pretrained_reads_a_released_checkpoint_file(tmp_path):
    official = official_state_dict(CFG, TASKS)
    path = tmp_path / "mtlora.pth"
    torch.save({"model": {f"module.{k}": v for k, v in official.items()}, "epoch": 299}, path)
    model = our_model()
    report = load_pretrained(model, path)
    assert report.ok and report.converted_from == ["mtlora"]
    masks = [k for k in official if k.endswith("attn_mask")]
    assert len(masks) == 3  # the shifted second block of stages 0-2 (stage 3's 2x2 map is one window)
    assert sorted(k for k in report.dropped if k.endswith("attn_mask")) == sorted("module." + k for k in masks)
    torch.testing.assert_close(model.backbone.layers[1].downsample.reduction.weight,
                               official["backbone.layers.0.downsample.reduction.weight"])
    torch.testing.assert_close(model.decoders["sal"].downsampler.proj[2].weight,
                               official["downsampler.sal.downsample_2.weight"])


def test_load_pretrained_swin_backbone_weights(tmp_path):
    swin_cfg = {k: CFG[k] for k in ("embed_dim", "depths", "num_heads", "window_size")}
    torch.manual_seed(3)
    swin = SwinTransformer(num_classes=10, **swin_cfg)  # an ImageNet-style checkpoint: head and final norm
    path = tmp_path / "swin.pt"
    torch.save(swin.state_dict(), path)
    model = create_model("mtlora_swin_t", tasks=list(TASKS), dataset="pascal", pretrained=str(path), **CFG)
    ours = model.backbone.state_dict()
    for key, value in swin.state_dict().items():
        if key.startswith(("head.", "norm.")):
            continue
        torch.testing.assert_close(ours[key], value, rtol=0, atol=0)
    report = load_pretrained(model, path)
    assert report.ok and "norm.weight" in report.dropped and "head.fc.weight" in report.dropped
    assert any("keep their initialisation" in n for n in report.notes)
    other = SwinTransformer(num_classes=0, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4),
                            window_size=2)
    del other.layers[3].blocks[1]
    torch.save(other.state_dict(), tmp_path / "short.pt")
    with pytest.raises(ValueError, match="does not fit the MTLoRA backbone"):
        load_pretrained(model, tmp_path / "short.pt")


def test_unsupported_or_foreign_keys_raise():
    official = official_state_dict(CFG, TASKS)
    with pytest.raises(ValueError, match="not a key of the released MTLoRA model"):
        convert_mtlora_checkpoint({**official, "teacher.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="SPLIT_QKV"):
        convert_mtlora_checkpoint({"backbone.layers.0.blocks.0.attn.qkv.q.linear.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="DOWNSAMPLER_ENABLED"):
        convert_mtlora_checkpoint({"backbone.layers.0.downsample.reduction.lora_shared_A": torch.zeros(1)})
    with pytest.raises(ValueError, match="no final norm or classifier"):
        convert_mtlora_checkpoint({"backbone.head.weight": torch.zeros(1)})


class Config(dict):
    """Stands in for the yacs CfgNode that the released training checkpoints pickle."""


def test_weights_only_refusal_explains_how_to_extract_the_weights(tmp_path):
    path = tmp_path / "ckpt_epoch_0.pth"
    torch.save({"model": {"backbone.patch_embed.proj.weight": torch.zeros(1)}, "config": Config(a=1)}, path)
    with pytest.raises(ValueError, match=r"weights_only=False\)\['model'\]"):
        load_pretrained(our_model(), path, source="mtlora")
