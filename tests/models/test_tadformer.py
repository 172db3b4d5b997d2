"""TADFormer on Swin (fastdense.models.tadformer): the paper's and the released code's parameter
counts, the trainable set, any number of tasks, the fused path against the reference path,
torch.compile, and a short training run."""
import copy
import re

import pytest
import torch

from fastdense.models import create_model
from fastdense.models._tadformer_blocks import TAModule, released_skip_layout, task_prompt_conditioning
from fastdense.models.mtlora import SharedLoRALinear
from fastdense.models.tadformer import TADFormerSwin
from fastdense.ops import _dispatch, backend

PASCAL = ["semseg", "human_parts", "sal", "normals"]
TWO = ["semseg", "normal"]
# A tiny Swin: 64x64 input gives 16, 8, 4, 2 token maps, so the window-4 stages see shifted windows
# (the task-adapting blocks are the shifted ones), a window equal to the map and one shrunk to it.
TINY = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=4, rank=4,
            decoder_channels=(4, 4, 4, 4), img_size=64)
LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    pass


def tiny_model(tasks=TWO, **kw) -> TADFormerSwin:
    torch.manual_seed(0)
    return create_model("tadformer_swin_t", tasks=tasks, dataset="synthetic", **{**TINY, **kw})


def randomise(model, std=0.2):
    """B starts at zero and the gates at 0.5, which hides the filters and LoRA A; give every
    adapter, filter and gate a value."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name or name == "stage_gate":
                p.normal_(0.0, std if name != "stage_gate" else 1.0)


def eval_batchnorm(model):
    # Batch statistics would cancel the gradient of the conv bias in front of each BatchNorm
    # (leaving rounding noise to compare); running statistics keep it a real gradient.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()


def meta_swin_t(**kw) -> TADFormerSwin:
    with torch.device("meta"):
        return create_model("tadformer_swin_t", tasks=PASCAL, dataset="pascal", **kw)


# ----------------------------------------------------------------------------- parameter counts
OTHER = 384 + 387_072 + 4 + 32_064 + 23_322 + 4_704  # prompts, up-sampling, gates, norms, position bias, patch embed


@pytest.mark.parametrize("filter,rank,target", [
    ("dynamic", 16, 3.557), ("dynamic", 32, 4.777), ("dynamic", 64, 7.380),   # the paper's Table 1
    ("static", 16, 3.532), ("static", 32, 4.671), ("static", 64, 6.947),      # the released code
])
def test_trainable_parameters_match_the_paper_and_the_released_code(filter, rank, target):
    """PASCAL-Context, 4 tasks, 448² (docs/papers.md, 'Trainable parameter counts')."""
    report = meta_swin_t(rank=rank, filter=filter).trainable_parameter_report()
    g = report.groups
    assert g["decoders"] == 1_946_624
    assert g["adapters"] == 70_656 * rank                        # TS LoRA on qkv, proj, fc1, fc2 of 12 blocks
    filters = 12 * (9 * rank ** 2 + 27 * rank) if filter == "dynamic" else 12 * 4 * (9 * rank + rank)
    assert g["filters"] == filters
    assert g["prompts"] == 4 * 96 + sum(c * 2 * c for c in (96, 192, 384))   # prompts + prompt up-sampling
    assert g["gates"] == 4
    # Block norms, merging norms, patch-embedding norm, one prompt norm per block (released).
    assert g["norms"] == 4 * 4_416 + 8 * (96 + 192 + 384) + 2 * 96 + 2 * 4_416
    assert g["position_bias"] == 169 * (2 * 3 + 2 * 6 + 6 * 12 + 2 * 24)
    assert g["patch_embed"] == 3 * 96 * 16 + 96
    assert g["patch_merging"] == 0 and g["other"] == 0
    assert report.total == 1_946_624 + 70_656 * rank + filters + OTHER
    assert abs(report.total / 1e6 - target) / target < 1e-3
    assert "trainable total" in str(report)


def test_prompt_norms_only_where_used():
    lean = meta_swin_t(rank=32, prompt_norm_every_block=False).trainable_parameter_report()
    full = meta_swin_t(rank=32).trainable_parameter_report()
    assert full.total - lean.total == 2 * (4_416 - (96 + 192 + 384 + 768))  # the 8 blocks that never read one


# ----------------------------------------------------------------------------- structure and trainable set
def test_module_placement_follows_the_released_code():
    model = meta_swin_t(rank=32)
    bb = model.backbone
    assert not any(k.startswith(("backbone.norm.", "backbone.head.")) for k in model.state_dict())
    for stage in bb.layers:
        for j, block in enumerate(stage.blocks):
            last = j == len(stage.blocks) - 1
            layers = [block.get_submodule(n) for n in LINEARS]
            assert type(layers[0]) is SharedLoRALinear and layers[0].shared_rank == 32
            want = TAModule if last else SharedLoRALinear
            assert all(type(m) is want for m in layers[1:])
            if last:
                assert [m.window for m in layers[1:]] == [7, 0, 0]           # proj filters per 7x7 window
                assert all(m.tasks == tuple(PASCAL) and m.rank == 32 and m.scale == 4.0 for m in layers[1:])
                assert all(m.filter == "dynamic" and m.task_base == "shared" for m in layers[1:])
            assert isinstance(block.attn.prompt_norm, torch.nn.LayerNorm)
    assert model.task_prompts.shape == (4, 96) and model.stage_gate.shape == (4,)
    assert [tuple(m.weight.shape) for m in model.prompt_up] == [(192, 96), (384, 192), (768, 384)]
    assert model.feature_channels == (192, 384, 768, 768)
    assert model.gate_skip == "reweighting" and meta_swin_t(filter="static").gate_skip == "released"


def _frozen_by_rule(name: str) -> bool:
    """The pretrained weight and bias of the adapted linears and the patch-merging reductions."""
    return re.fullmatch(r"backbone\.layers\.\d+\.(blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))\.(weight|bias)"
                        r"|downsample\.reduction\.weight)", name) is not None


def test_mark_trainable_freezes_exactly_the_released_set():
    model = meta_swin_t(rank=16, filter="static")
    params = dict(model.named_parameters())
    frozen = {n for n, p in params.items() if not p.requires_grad}
    assert frozen == {n for n in params if _frozen_by_rule(n)}
    assert len(frozen) == 12 * 8 + 3
    groups = {}
    for name, module, p in model._owned_parameters():
        if p.requires_grad:
            groups.setdefault(model.parameter_group(name, module), []).append(name)
    assert all(re.search(r"\.lora_shared_[AB]$", n) for n in groups["adapters"])
    assert all(".lora_filter." in n for n in groups["filters"])
    assert sorted(groups["prompts"]) == ["prompt_up.0.weight", "prompt_up.1.weight", "prompt_up.2.weight",
                                         "task_prompts"]
    assert groups["gates"] == ["stage_gate"]
    assert sum(".prompt_norm." in n for n in groups["norms"]) == 2 * 12
    m = meta_swin_t(rank=16, freeze_patch_merging=False)
    assert m.trainable_parameter_report().groups["patch_merging"] == 1_548_288
    assert m.mark_trainable(train_base=True) is m and m.trainable_parameter_report().frozen == 0


# ----------------------------------------------------------------------------- the TPC operator
def test_task_prompt_conditioning_reweights_each_heads_channels():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, generator=g)          # (S, heads, P = 2 tasks x 2 rows, n)
    u = torch.randn(2, 5, 6, generator=g)                  # C = 6: 2 channels per head
    out = task_prompt_conditioning(logits, u, num_tasks=2)
    a = torch.nn.functional.gelu(logits)
    for t in range(2):
        for h in range(3):
            weight = a[:, h, 2 * t:2 * t + 2].mean(1)       # (S, n): the mean of the task's two rows
            torch.testing.assert_close(out[t][..., 2 * h:2 * h + 2], weight[..., None] * u[..., 2 * h:2 * h + 2])
    # The released reading: per window, the (n, C) term's memory read channels-first.
    skip = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    assert released_skip_layout(skip)[0].flatten().tolist() == skip[0].t().flatten().tolist()


# ----------------------------------------------------------------------------- any number of tasks
@pytest.mark.parametrize("tasks", [["semseg"], ["semseg", "normal", "depth_euclidean", "saliency", "parts"]])
def test_one_and_five_tasks(tasks):
    model = tiny_model(tasks, depths=(2, 1, 1), num_heads=(1, 2, 4))
    randomise(model)
    out = model.train()(torch.randn(2, 3, 32, 32))
    assert list(out) == tasks and all(torch.isfinite(o).all() for o in out.values())
    sum(o.square().mean() for o in out.values()).backward()
    assert model.task_prompts.grad.shape == (len(tasks), 16) and model.task_prompts.grad.abs().sum() > 0


@pytest.mark.parametrize("filter", ["dynamic", "static"])
def test_three_tasks_are_equivariant_to_their_order(filter):
    """Reordering the tasks (with their prompts) reorders the outputs: every task reads its
    own prompt row, TPC map, filter and decoder."""
    tasks, order = ["semseg", "normal", "saliency"], [2, 0, 1]
    model = tiny_model(tasks, filter=filter).eval()
    randomise(model)
    perm = tiny_model([tasks[i] for i in order], filter=filter).eval()
    sd = model.state_dict()
    sd["task_prompts"] = sd["task_prompts"][order]
    perm.load_state_dict(sd)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = model(x), perm(x)
    for t in tasks:
        torch.testing.assert_close(b[t], a[t], rtol=1e-5, atol=1e-5)
    # ... and the prompts matter: swapping two tasks' prompts changes their outputs.
    with torch.no_grad():
        perm.task_prompts.copy_(model.task_prompts[[1, 0, 2]][order])
        c = perm(x)
    assert not torch.allclose(c["semseg"], a["semseg"], atol=1e-4)


# ----------------------------------------------------------------------------- fused path
def _cpp_backend_built(*ops) -> bool:
    return all(not _dispatch.implementations(op)["cpp"].machine_reasons() for op in ops)


def _loss_and_grads(model, x, names, cot_seed=1):
    torch.manual_seed(123)  # the same dropout and drop-path draws on both paths
    out = model(x)
    g = torch.Generator().manual_seed(cot_seed)
    loss = sum((o * torch.randn(o.shape, generator=g)).sum() for o in out.values())
    params = [dict(model.named_parameters())[n] for n in names]
    return out, torch.autograd.grad(loss, params, allow_unused=True)


@pytest.mark.parametrize("filter,task_base,gate_skip", [("dynamic", "shared", None), ("static", "task", "adapted")])
def test_fused_path_equals_reference_path_outputs_and_all_gradients(filter, task_base, gate_skip):
    if not _cpp_backend_built("ta_lora_dtf", "mt_lora_linear"):
        pytest.skip("no fused CPU backend was built (fastdense._C missing)")
    model = tiny_model(filter=filter, task_base=task_base, gate_skip=gate_skip, dropout=0.05,
                       drop_path_rate=0.1).train()
    eval_batchnorm(model)
    randomise(model)
    x = torch.randn(2, 3, 64, 64)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    out_f, grads_f = _loss_and_grads(model, x, names)
    with backend("torch"):
        out_r, grads_r = _loss_and_grads(model, x, names)
    for t in TWO:
        torch.testing.assert_close(out_f[t], out_r[t], rtol=1e-4, atol=1e-4)
    # Only the prompt norms of the blocks that never read them get no gradient.
    unused = {n for n, g in zip(names, grads_r) if g is None}
    assert unused == {f"backbone.layers.{i}.blocks.0.attn.prompt_norm.{w}"
                      for i in range(4) for w in ("weight", "bias")}
    assert any(".lora_filter." in n for n in names) and "stage_gate" in names and "task_prompts" in names
    for n, a, b in zip(names, grads_f, grads_r):
        if b is None:
            assert a is None
            continue
        scale = float(b.abs().max()) + 1e-6
        torch.testing.assert_close(a / scale, b / scale, rtol=1e-4, atol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_model(dropout=0.0, drop_path_rate=0.0, depths=(2, 1, 1), num_heads=(1, 2, 4))
    randomise(model)
    eval_batchnorm(model)
    x = torch.randn(2, 3, 32, 32)
    names = [n for n, p in model.named_parameters() if p.requires_grad and ".prompt_norm." not in n]
    out, grads = _loss_and_grads(model, x, names)
    model.set_grad_checkpointing(True)
    out_c, grads_c = _loss_and_grads(model, x, names)
    for t in TWO:
        torch.testing.assert_close(out_c[t], out[t], rtol=0, atol=0)
    for a, b in zip(grads_c, grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- torch.compile
def test_torch_compile_fullgraph_forward_and_training_step_match_eager():
    """Fullgraph compiles (aot_eager: Dynamo and AOT autograd, so the backward runs the compiled
    joint graph) of the forward and of forward + losses: outputs, loss, every gradient and the
    decoders' BatchNorm statistics equal eager mode's."""
    from fastdense.engine.losses import task_losses

    torch._dynamo.reset()
    # Three stages: a shifted window (8x8 map), a window equal to the map (4x4), a shrunk one (2x2).
    eager = tiny_model(dropout=0.0, drop_path_rate=0.0, depths=(2, 1, 1), num_heads=(1, 2, 4)).train()
    randomise(eager)
    compiled_model = copy.deepcopy(eager)
    x = torch.randn(2, 3, 32, 32)
    batch = {"semseg": torch.randint(0, 6, (2, 32, 32)),
             "normal": torch.nn.functional.normalize(torch.randn(2, 3, 32, 32), dim=1)}

    with torch.no_grad():
        want = eager.eval()(x)
        got = torch.compile(compiled_model.eval(), fullgraph=True, backend="aot_eager")(x)
    for t in TWO:
        torch.testing.assert_close(got[t], want[t], rtol=1e-5, atol=1e-5)
    eager.train(), compiled_model.train()

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
    # Only the prompt norm of the one block that never reads it has no gradient, in both.
    assert [n for n, a, b in pairs if a is None or b is None] == ["backbone.layers.0.blocks.0.attn.prompt_norm.weight",
                                                                  "backbone.layers.0.blocks.0.attn.prompt_norm.bias"]
    pairs = [(n, a, b) for n, a, b in pairs if a is not None and b is not None]
    assert any(".lora_filter." in n for n, _, _ in pairs) and any(n == "stage_gate" for n, _, _ in pairs)
    largest = max(float(a.abs().max()) for _, a, _ in pairs)
    for n, a, b in pairs:
        # Batch statistics cancel the gradient of the conv bias in front of each BatchNorm: it is
        # rounding noise, so its scale is floored by the largest gradient of the model.
        scale = max(float(a.abs().max()), 1e-3 * largest)
        torch.testing.assert_close(b / scale, a / scale, rtol=1e-4, atol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
    for (n, a), b in zip(eager.named_buffers(), compiled_model.buffers()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- checkpoints and construction
def test_trainable_state_dict_round_trip():
    model = tiny_model(depths=(2, 1, 1), num_heads=(1, 2, 4))
    randomise(model)
    model.train()(torch.randn(2, 3, 32, 32))  # moves the decoders' BatchNorm statistics
    sd = model.trainable_state_dict()
    assert {"task_prompts", "stage_gate", "prompt_up.0.weight"} <= set(sd)
    assert not any(_frozen_by_rule(k) for k in sd)
    fresh = tiny_model(depths=(2, 1, 1), num_heads=(1, 2, 4))
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if k not in sd}, strict=False)
    result = fresh.load_trainable_state_dict(sd)
    assert result.missing_keys == [] and result.unexpected_keys == []
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got, want = fresh.eval()(x), model.eval()(x)
    for t in TWO:
        torch.testing.assert_close(got[t], want[t], rtol=0, atol=0)


def test_constructor_options_and_errors():
    with torch.device("meta"):
        model = create_model("tadformer_swin_t", tasks="semseg,sal", prompt_len=2, **TINY)
    assert model.task_prompts.shape == (4, 16) and model.num_outputs == {"semseg": 21, "sal": 1}
    with pytest.raises(ValueError, match="filter"):
        tiny_model(filter="naive")
    with pytest.raises(ValueError, match="gate_skip"):
        tiny_model(gate_skip="paper")
    with pytest.raises(ValueError, match="prompt_len"):
        tiny_model(prompt_len=0)


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
    model = create_model("tadformer_swin_t", tasks=tasks, dataset="synthetic", train_base=True, embed_dim=24,
                         depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), window_size=4, rank=4, dropout=0.0,
                         drop_path_rate=0.0, decoder_channels=(8, 8, 8, 8), img_size=64)
    assert model.trainable_parameter_report().frozen == 0
    cfg = TrainConfig(steps=50, batch_size=8, lr=3e-3, warmup_steps=5, progress=False, log_every=0)
    result = MultiTaskTrainer(model, tasks, train, val, config=cfg, device="cpu").fit()
    baseline = evaluate_constant(constant_baseline(train, tasks), val, tasks)
    assert beats(result, baseline) == {t: True for t in tasks}, (result, baseline)
