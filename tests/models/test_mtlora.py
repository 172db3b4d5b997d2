"""MTLoRA on Swin (fastdense.models.mtlora): the released configuration's placement and
trainable set, the paper's parameter counts, the fused path against the reference path,
torch.compile, trainable-only checkpoints, and a short training run."""
import copy
import re

import pytest
import torch

from fastdense.models import create_model
from fastdense.models.mtlora import FanOutLoRALinear, MTLoRASwin, SharedLoRALinear, StackedLoRALinear
from fastdense.models.swin import SwinTransformer
from fastdense.ops import _dispatch, backend

PASCAL = ["semseg", "human_parts", "sal", "normals"]
TWO = ["semseg", "normal"]
# A tiny Swin: 64x64 input gives 16, 8, 4, 2 token maps, so the window-4 stages see a shifted
# window, an unshifted one, a window equal to the map and one shrunk to it.
TINY = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=4, shared_rank=4, task_rank=2,
            decoder_channels=(4, 4, 4, 4), img_size=64)
LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    pass


def tiny_model(tasks=TWO, **kw) -> MTLoRASwin:
    torch.manual_seed(0)
    return create_model("mtlora_swin_t", tasks=tasks, dataset="synthetic", **{**TINY, **kw})


def randomise_adapters(model, std=0.2):
    """B starts at zero, which hides every LoRA; give all adapters values."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.normal_(0.0, std)


def meta_swin_t(**kw) -> MTLoRASwin:
    with torch.device("meta"):
        return create_model("mtlora_swin_t", tasks=PASCAL, dataset="pascal", **kw)


# ----------------------------------------------------------------------------- configuration
@pytest.mark.parametrize("rank,exact,paper", [(16, 4_953_146, 4.953), (32, 6_083_642, 6.084), (64, 8_344_634, 8.345)])
def test_trainable_parameters_match_the_paper(rank, exact, paper):
    """PASCAL-Context, 4 tasks, task rank 4 (the released *_pertask configurations):
    decoders 1,946,624 + LoRA 70,656 r + 276,480 + 1,599,546 others (docs/papers.md)."""
    report = meta_swin_t(shared_rank=rank).trainable_parameter_report()
    assert report.total == exact
    assert abs(report.total / 1e6 - paper) / paper < 1e-3
    g = report.groups
    assert g["decoders"] == 1_946_624
    assert g["adapters"] == 70_656 * rank + 276_480
    assert g["patch_merging"] == 1_548_288  # Σ 4C·2C over the three mergings
    assert g["position_bias"] == 169 * (2 * 3 + 2 * 6 + 6 * 12 + 2 * 24)
    assert g["patch_embed"] == 3 * 96 * 16 + 96
    assert g["norms"] == 4 * 4_416 + 8 * (96 + 192 + 384) + 2 * 96  # blocks, mergings, patch-embed norm
    assert g["other"] == 0
    assert "trainable total" in str(report) and f"{exact:,}" in str(report)


def test_lora_placement_follows_the_released_code():
    model = meta_swin_t(shared_rank=32)
    bb = model.backbone
    assert [len(s.blocks) for s in bb.layers] == [2, 2, 6, 2] and bb.dims == (96, 192, 384, 768)
    assert not any(k.startswith("backbone.norm.") or k.startswith("backbone.head.") for k in model.state_dict())
    for i, stage in enumerate(bb.layers):
        for j, block in enumerate(stage.blocks):
            last = j == len(stage.blocks) - 1
            layers = [block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2]
            assert type(layers[0]) is SharedLoRALinear and layers[0].tasks == []  # qkv: shared LoRA only
            want = (FanOutLoRALinear, StackedLoRALinear, StackedLoRALinear) if last else (SharedLoRALinear,) * 3
            assert tuple(type(m) for m in layers[1:]) == want, (i, j)
            for m in layers:
                assert m.tasks == (PASCAL if last and m is not layers[0] else [])
                assert (m.shared_rank, m.shared_scale, m.lora_dropout.p, m.shared_mode) == (32, 4.0, 0.05, "matrix")
                assert all(r == 4 for r in m.task_ranks.values()) and all(s == 4.0 for s in m.task_scales.values())
    # Stochastic depth 0.2, linear over the 12 blocks (the released DROP_PATH_RATE).
    rates = [b.drop_path1.p for s in bb.layers for b in s.blocks[1:] if hasattr(b.drop_path1, "p")]
    assert rates[-1] == pytest.approx(0.2)
    assert model.feature_channels == (192, 384, 768, 768)
    names = set(model.state_dict())
    for key in ("backbone.layers.3.blocks.1.attn.proj.lora_tasks_A.sal", "backbone.layers.0.blocks.0.attn.qkv.weight",
                "backbone.layers.1.downsample.reduction.weight", "decoders.normals.head.last_layer.1.running_var",
                "decoders.semseg.downsampler.proj.3.weight"):
        assert key in names
    assert not any("blocks.0.mlp.fc1.lora_tasks" in k for k in names)


def _frozen_by_rule(name: str) -> bool:
    """The pretrained weight and bias of the adapted linears; everything else trains."""
    return re.fullmatch(r"backbone\.layers\.\d+\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))\.(weight|bias)",
                        name) is not None


def test_mark_trainable_freezes_exactly_the_released_set():
    model = meta_swin_t(shared_rank=16)
    params = dict(model.named_parameters())
    frozen = {n for n, p in params.items() if not p.requires_grad}
    assert frozen == {n for n in params if _frozen_by_rule(n)}
    assert len(frozen) == 12 * 8
    # The groups hold what their names say.
    groups = {}
    for name, module, p in model._owned_parameters():
        if p.requires_grad:
            groups.setdefault(model.parameter_group(name, module), []).append(name)
    assert all(".lora_" in n for n in groups["adapters"])
    assert all(n.startswith("decoders.") for n in groups["decoders"])
    assert all(re.search(r"(norm\d?|downsample\.norm|patch_embed\.norm)\.(weight|bias)$", n) for n in groups["norms"])
    assert all(n.endswith("relative_position_bias_table") for n in groups["position_bias"])
    assert all(n.endswith("downsample.reduction.weight") for n in groups["patch_merging"])
    assert groups["patch_embed"] == ["backbone.patch_embed.proj.weight", "backbone.patch_embed.proj.bias"]

    # The released TRAIN.FREEZE_* switches, and training everything.
    m = meta_swin_t(shared_rank=16, freeze_norm=True, freeze_patch_merging=True)
    g = m.trainable_parameter_report().groups
    # The patch embedding's LayerNorm stays trainable: the released filters OR the rules, and
    # "patch_embed" matches it.
    assert g["norms"] == 192 and g["patch_merging"] == 0 and g["patch_embed"] == 4_704
    assert m.mark_trainable(train_base=True) is m
    assert all(p.requires_grad for p in m.parameters()) and m.trainable_parameter_report().frozen == 0
    m.mark_trainable(train_base=False)
    assert m.trainable_parameter_report().frozen > 0


def test_at_initialisation_every_task_sees_the_plain_swin_features():
    """B = 0 at start, so each task's stage feature is the pretrained Swin's stage output
    passed through the next patch merging (the released BasicLayer), and the shared stream
    is Swin's."""
    model = tiny_model(dropout=0.0).eval()
    plain = SwinTransformer(num_classes=0, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4),
                            window_size=4).eval()
    backbone = {k: v for k, v in model.backbone.state_dict().items() if ".lora_" not in k}
    missing, unexpected = plain.load_state_dict(backbone, strict=False)
    assert missing == ["norm.weight", "norm.bias"] and unexpected == []
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        stages = plain.forward_stages(x)
        want = [plain.layers[i + 1].downsample(s) for i, s in enumerate(stages[:-1])] + [stages[-1]]
        feats = model.forward_features(x)
    for t in TWO:
        assert [tuple(f.shape) for f in feats[t]] == [(2, 32, 8, 8), (2, 64, 4, 4), (2, 128, 2, 2), (2, 128, 2, 2)]
        for got, w in zip(feats[t], want):
            torch.testing.assert_close(got.permute(0, 2, 3, 1), w, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- fused path
def _loss_and_grads(model, x, cot_seed=1):
    torch.manual_seed(123)  # the same dropout and drop-path draws on both paths
    out = model(x)
    g = torch.Generator().manual_seed(cot_seed)
    loss = sum((o * torch.randn(o.shape, generator=g)).sum() for o in out.values())
    params = [p for p in model.parameters() if p.requires_grad]
    return out, torch.autograd.grad(loss, params)


def test_fused_path_equals_reference_path_outputs_and_all_gradients():
    model = tiny_model(dropout=0.05, drop_path_rate=0.1).train()
    # Batch statistics would cancel the gradient of the conv bias in front of each BatchNorm
    # (leaving rounding noise to compare); running statistics keep it a real gradient.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    randomise_adapters(model)
    x = torch.randn(2, 3, 64, 64)
    lead = model.backbone.layers[0].blocks[-1].mlp.fc1
    probe = (x.new_zeros(8, lead.in_features), lead.weight, lead.bias, x.new_zeros(6, lead.in_features),
             x.new_zeros(lead.out_features, 6), [2, 2, 2], [1.0, 1.0, 1.0], False, None, None)
    fused_backend = _dispatch.select("mt_lora_linear", "cpu", *probe).name
    if fused_backend == "torch":
        pytest.skip("no fused CPU backend was built (fastdense._C missing)")
    out_f, grads_f = _loss_and_grads(model, x)
    with backend("torch"):
        out_r, grads_r = _loss_and_grads(model, x)
    for t in TWO:
        torch.testing.assert_close(out_f[t], out_r[t], rtol=1e-4, atol=1e-4)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(".lora_tasks_B." in n for n in names) and any(n.startswith("decoders.") for n in names)
    for n, a, b in zip(names, grads_f, grads_r):
        scale = float(b.abs().max()) + 1e-6
        torch.testing.assert_close(a / scale, b / scale, rtol=1e-4, atol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_model(dropout=0.0, drop_path_rate=0.0, depths=(2, 1, 1), num_heads=(1, 2, 4))
    randomise_adapters(model)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    x = torch.randn(2, 3, 32, 32)
    out, grads = _loss_and_grads(model, x)
    model.set_grad_checkpointing(True)
    out_c, grads_c = _loss_and_grads(model, x)
    for t in TWO:
        torch.testing.assert_close(out_c[t], out[t], rtol=0, atol=0)
    for a, b in zip(grads_c, grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- torch.compile
def test_torch_compile_fullgraph_training_step_matches_eager():
    """One fullgraph compile of forward + losses (aot_eager: Dynamo and AOT autograd, so the
    backward runs the compiled joint graph): outputs, loss, every gradient and the decoders'
    BatchNorm statistics equal eager mode's."""
    from fastdense.engine.losses import task_losses

    torch._dynamo.reset()
    # Three stages keep the compile time down and still hold a shifted window (8x8 map), a
    # window equal to the map (4x4) and a shrunk one (2x2).
    eager = tiny_model(dropout=0.0, drop_path_rate=0.0, depths=(2, 1, 1), num_heads=(1, 2, 4)).train()
    randomise_adapters(eager)
    compiled_model = copy.deepcopy(eager)
    x = torch.randn(2, 3, 32, 32)
    batch = {"semseg": torch.randint(0, 6, (2, 32, 32)),
             "normal": torch.nn.functional.normalize(torch.randn(2, 3, 32, 32), dim=1)}

    def step(model, image, targets):
        out = model(image)
        return out, sum(task_losses(out, targets).values())

    compiled_step = torch.compile(step, fullgraph=True, backend="aot_eager")
    out_e, loss_e = step(eager, x, batch)
    out_c, loss_c = compiled_step(compiled_model, x, batch)
    for t in TWO:
        torch.testing.assert_close(out_c[t], out_e[t], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    loss_e.backward()
    loss_c.backward()
    pairs = [(n, p.grad, q.grad) for (n, p), q in zip(eager.named_parameters(), compiled_model.parameters())
             if p.requires_grad]
    assert all(a is not None and b is not None for _, a, b in pairs)
    largest = max(float(a.abs().max()) for _, a, _ in pairs)
    for n, a, b in pairs:
        # Batch statistics cancel the gradient of the conv bias in front of each BatchNorm: it is
        # rounding noise, so its scale is floored by the largest gradient of the model.
        scale = max(float(a.abs().max()), 1e-3 * largest)
        torch.testing.assert_close(b / scale, a / scale, rtol=1e-4, atol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
    for (n, a), b in zip(eager.named_buffers(), compiled_model.buffers()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- checkpoints
def test_trainable_state_dict_round_trip():
    model = tiny_model()
    randomise_adapters(model)
    model.train()(torch.randn(2, 3, 64, 64))  # moves the decoders' BatchNorm statistics
    sd = model.trainable_state_dict()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    buffers = {k for k in sd if k not in trainable}
    assert trainable <= set(sd)
    assert buffers == {f"decoders.{t}.head.last_layer.1.{b}" for t in TWO
                       for b in ("running_mean", "running_var", "num_batches_tracked")}
    assert not any(_frozen_by_rule(k) for k in sd)

    # A fresh model with the same pretrained backbone but other adapters and decoders.
    fresh = tiny_model()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if k not in sd}, strict=False)
    x = torch.randn(2, 3, 64, 64)
    model.eval(), fresh.eval()
    with torch.no_grad():
        before = fresh(x)["semseg"]
        result = fresh.load_trainable_state_dict(sd)
        after = fresh(x)
        want = model(x)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert not torch.allclose(before, want["semseg"])
    for t in TWO:
        torch.testing.assert_close(after[t], want[t], rtol=0, atol=0)

    with pytest.raises(RuntimeError, match="missing"):
        fresh.load_trainable_state_dict({k: v for k, v in sd.items() if "lora_shared_A" not in k})
    with pytest.raises(RuntimeError, match="unexpected"):
        fresh.load_trainable_state_dict({**sd, "backbone.layers.0.blocks.0.attn.qkv.weight": torch.zeros(48, 16)})


# ----------------------------------------------------------------------------- construction
def test_constructor_tasks_datasets_and_errors():
    with torch.device("meta"):
        pascal = create_model("mtlora_swin_t", tasks="semseg,human_parts,sal,normals,edge", **TINY)
        nyud = create_model("mtlora_swin_t", tasks=["semseg", "depth", "normals", "edge"], **TINY)
        custom = create_model("mtlora_swin_t", tasks=["a", "b"], num_outputs={"a": 5, "b": 2}, **TINY)
    assert pascal.num_outputs == {"semseg": 21, "human_parts": 7, "sal": 1, "normals": 3, "edge": 1}
    assert nyud.num_outputs == {"semseg": 40, "depth": 1, "normals": 3, "edge": 1}
    assert custom.num_outputs == {"a": 5, "b": 2}
    assert tiny_model().num_outputs == {"semseg": 6, "normal": 3}
    with pytest.raises(ValueError, match="no data set has all of the tasks"):
        create_model("mtlora_swin_t", tasks=["sal", "depth"], **TINY)
    with pytest.raises(ValueError, match="unknown pascal task"):
        create_model("mtlora_swin_t", tasks=["semseg", "normal"], dataset="pascal", **TINY)
    with pytest.raises(ValueError, match="unique"):
        create_model("mtlora_swin_t", tasks=["a", "a"], num_outputs={"a": 1}, **TINY)


def test_addition_mode_and_trainable_scales_train():
    model = tiny_model(shared_mode="addition", trainable_shared_scale=True, trainable_task_scale=True)
    proj = model.backbone.layers[0].blocks[-1].attn.proj
    qkv = model.backbone.layers[0].blocks[-1].attn.qkv
    assert hasattr(proj, "lora_norm") and not hasattr(proj, "lora_shared_A")
    assert qkv.shared_mode == "matrix" and qkv.lora_shared_scale.requires_grad  # no tasks: 'matrix'
    assert all(p.requires_grad for p in proj.lora_task_scale.values())
    randomise_adapters(model)
    out = model.train()(torch.randn(2, 3, 64, 64))
    sum(o.square().mean() for o in out.values()).backward()
    assert float(proj.lora_task_scale["semseg"].grad.abs()) > 0
    assert float(proj.lora_norm.weight.grad.abs().sum()) > 0


# ----------------------------------------------------------------------------- training
def test_training_from_scratch_beats_the_trivial_baseline():
    """Random-initialised tiny Swin with train_base (nothing pretrained to adapt), 64x64
    synthetic scenes, the engine's trainer: better than the constant prediction on every task."""
    from fastdense.data import SyntheticScenes
    from fastdense.engine import MultiTaskTrainer, TrainConfig, beats, constant_baseline, evaluate_constant

    tasks = ["semseg", "normal", "depth_euclidean", "saliency"]
    train = SyntheticScenes(64, 64, seed=0, tasks=tasks)
    val = SyntheticScenes(16, 64, seed=1, tasks=tasks)
    torch.manual_seed(0)
    model = create_model("mtlora_swin_t", tasks=tasks, dataset="synthetic", train_base=True, embed_dim=24,
                         depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), window_size=4, shared_rank=4, task_rank=2,
                         dropout=0.0, drop_path_rate=0.0, decoder_channels=(8, 8, 8, 8), img_size=64)
    assert model.trainable_parameter_report().frozen == 0
    cfg = TrainConfig(steps=50, batch_size=8, lr=3e-3, warmup_steps=5, progress=False, log_every=0)
    result = MultiTaskTrainer(model, tasks, train, val, config=cfg, device="cpu").fit()
    baseline = evaluate_constant(constant_baseline(train, tasks), val, tasks)
    assert beats(result, baseline) == {t: True for t in tasks}, (result, baseline)
