"""Whole models: a training step and inference of ``mtlora_swin_t``, ``tadformer_swin_t`` and
``tdss_swin_t``, and the training step versus the number of tasks.

Implementations, on each model case:

* ``fused``               the model as built, its fastdense ops (``mt_lora_linear``,
                          ``ta_lora_dtf``, ``skill_gated_transform``) on automatic dispatch
* ``reference``           the same model with every op forced onto its ``torch`` backend
                          (``fastdense.ops.backend("torch")``): the reference path
* ``reference-compiled``  the reference path under ``torch.compile`` (Inductor; marked
                          ``compile`` and ``slow``: it compiles the whole Swin-T model)
* ``checkpointed``        ``fused`` with the model's ``set_grad_checkpointing(True)``
                          (train mode only): MTLoRA and TADFormer recompute their
                          blocks in the backward, TDSS its TSAI synergy layers (its
                          backbone keeps nothing for backward in the first place)

Modes: ``train`` is one optimiser step: forward, the weighted task losses
(MTLoRA's losses and weights for all three models), backward and AdamW over the
trainable parameters (gradients cleared untimed before each step); ``infer`` is
a forward under ``torch.inference_mode``. Both record ``images_per_s``.

The setting is the papers' on CUDA (TDSS Table 3 compares the three models;
its batch is not stated): PASCAL-Context's four tasks (semseg, human parts, saliency, normals),
batch 8 at 448², bf16 autocast over fp32 weights, MTLoRA r = 64 and TADFormer
r = 64 with the dynamic filter (the Table 3 rows: 8.34 M and 7.38 M trainable),
TDSS's defaults (3.52 M). On CPU it is scaled down to batch 2 at 224², fp32,
so that the suite can run on a 2-core machine. Weights are random (no
checkpoint is read); every trainable matrix that starts at zero (the LoRAs'
B, TDSA's W_u) gets small random values so every adapter computes.

``test_task_scaling``: the fused training step of each model with T = 1, 2, 4,
8 tasks of the synthetic scenes (semseg, normal, depth_euclidean, saliency,
edge_texture, edge_occlusion, parts, depth_zbuffer: the first T; real labels
from ``SyntheticScenes`` at the case's size), same batch and size as above.
For TDSS it also times the frozen backbone pass alone (``backbone_ms``), which
the design makes independent of T.

Memory: ``measure_call`` (bench/conftest.py) records ``memory_over_inputs_mb``,
the peak *above* what was allocated when the step started (weights and
optimiser state are not in it; activations, gradients and temporaries are):
from the allocator on CUDA, which also gives ``max_memory_allocated_mb``
(everything of one step), from torch's profiler on CPU.

Guard: before timing, each implementation's eval-mode outputs are compared
with the reference path's. TADFormer's cases skip, with the reason, while
``tadformer_swin_t`` is not registered.
"""
from __future__ import annotations

import gc
import statistics
import time

import pytest
import torch
from _cases import ON_GPU, assert_computes

import fastdense
from fastdense.engine.losses import MTLORA_LOSS_WEIGHTS, task_losses, total_loss
from fastdense.engine.trainer import make_optimizer
from fastdense.models import create_model, is_model

SUITE = "models"
SUITE_TASKS = "models_tasks"  # the training step against the number of tasks
TASKS = ["semseg", "human_parts", "sal", "normals"]
BATCH, SIZE = (8, 448) if ON_GPU else (2, 224)
MODELS = {
    "mtlora_swin_t": dict(shared_rank=64),
    "tadformer_swin_t": dict(rank=64, filter="dynamic"),
    "tdss_swin_t": dict(),
}
IMPLS = ["fused", "reference", "reference-compiled", "checkpointed"]
SYNTHETIC_TASKS = ["semseg", "normal", "depth_euclidean", "saliency", "edge_texture", "edge_occlusion", "parts",
                   "depth_zbuffer"]
TASK_COUNTS = [1, 2, 4, 8]


def _case_params():
    for name in MODELS:
        for impl in IMPLS:
            for mode in ("train", "infer"):
                if impl == "checkpointed" and mode == "infer":
                    continue  # recomputation only changes a training step
                marks = [pytest.mark.compile, pytest.mark.slow] if impl.endswith("-compiled") else []
                yield pytest.param(name, impl, mode, id=f"{name}-{impl}-{mode}", marks=marks)


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if ON_GPU else torch.device("cpu")


def _autocast(device):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def _require(name: str) -> None:
    if not is_model(name):
        pytest.skip(f"{name} is not registered (fastdense.models has no such model yet)")


def _release() -> None:
    gc.collect()
    if ON_GPU:
        torch.cuda.empty_cache()


def build(name: str, device, **kwargs):
    """The model on ``device`` with every all-zero trainable matrix given small random values."""
    torch.manual_seed(0)
    model = create_model(name, img_size=SIZE, **{**MODELS[name], **kwargs})
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.dim() >= 2 and not p.any():
                p.normal_(0.0, 0.02)
    return model.to(device)


# One model resident at a time, so that each case's memory is its own model's.
_current: dict = {}


def cached_model(name: str, device):
    if name not in _current:
        _current.clear()
        _release()
        _current[name] = build(name, device, tasks=TASKS, dataset="pascal")
    return _current[name]


@pytest.fixture(scope="module")
def pascal_batch():
    g = torch.Generator(device="cpu").manual_seed(1)
    image = torch.rand(BATCH, 3, SIZE, SIZE, generator=g)
    parts = torch.randint(0, 7, (BATCH, SIZE, SIZE), generator=g)
    parts[:, : SIZE // 4] = 255  # images without people are all 255 in PASCAL-Context
    targets = {"semseg": torch.randint(0, 21, (BATCH, SIZE, SIZE), generator=g), "human_parts": parts,
               "sal": (torch.rand(BATCH, SIZE, SIZE, generator=g) > 0.7).float(),
               "normals": torch.nn.functional.normalize(torch.randn(BATCH, 3, SIZE, SIZE, generator=g), dim=1)}
    device = _device()
    return image.to(device), {k: v.to(device) for k, v in targets.items()}


@pytest.fixture(scope="module")
def synthetic_batch():
    from fastdense.data import SyntheticScenes
    from fastdense.engine.trainer import collate

    data = SyntheticScenes(BATCH, SIZE, seed=0, tasks=SYNTHETIC_TASKS)
    batch = collate([data[i] for i in range(BATCH)], ["image", *SYNTHETIC_TASKS])
    device = _device()
    return {k: v.to(device) for k, v in batch.items()}


# ----------------------------------------------------------------------------- measuring helpers
def time_ms(fn, device, reps: int = 5) -> float:
    """Median time of ``fn`` in ms over ``reps`` calls after one warm-up (CUDA events on CUDA)."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def train_step(model, net, image, targets, device, dataset=None, weights=None):
    """(reset, step): clear gradients; one forward + weighted losses + backward + AdamW step."""
    optimizer = make_optimizer(model, lr=5e-4, weight_decay=0.05)

    def reset():
        optimizer.zero_grad(set_to_none=True)

    def step():
        with _autocast(device):
            out = net(image)
        loss = total_loss(task_losses(out, targets, dataset), weights)
        loss.backward()
        optimizer.step()

    return reset, step


# ----------------------------------------------------------------------------- the papers' setting
@pytest.mark.parametrize("name,impl,mode", list(_case_params()))
def test_model(benchmark, measure, pascal_batch, name, impl, mode):
    _require(name)
    device = _device()
    model = cached_model(name, device)
    image, targets = pascal_batch
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    info = {"suite": SUITE, "case": name, "impl": impl, "mode": mode, "model": name, "batch": BATCH, "image": SIZE,
            "tasks": len(TASKS), "trainable_params": model.trainable_parameter_report().total}
    model.set_grad_checkpointing(impl == "checkpointed")
    with fastdense.ops.backend(None if impl in ("fused", "checkpointed") else "torch"):
        net = model
        if impl.endswith("-compiled"):
            torch._dynamo.reset()
            net = torch.compile(model)

        # Guard: the measured path computes the model's outputs.
        model.eval()
        with torch.no_grad(), _autocast(device):
            got = net(image)
        with fastdense.ops.backend("torch"), torch.no_grad(), _autocast(device):
            want = model(image)
        for t in TASKS:
            assert_computes(f"{name} {impl} {t}", got[t].float(), want[t].float(), dtype)
        del got, want

        if mode == "train":
            model.train()
            reset, fn = train_step(model, net, image, targets, device, "pascal", MTLORA_LOSS_WEIGHTS)
        else:
            model.eval()
            reset = None

            def fn():
                with torch.inference_mode(), _autocast(device):
                    net(image)

        benchmark.group = f"{SUITE} {mode} {name}-b{BATCH}-{SIZE}"
        median_ms = measure(benchmark, fn, device=device, dtype=dtype, reset=reset, info=info,
                            first_call=impl.endswith("-compiled"))
    if median_ms is not None:
        benchmark.extra_info["images_per_s"] = BATCH / (median_ms / 1e3)
    if impl.endswith("-compiled"):
        torch._dynamo.reset()
    model.set_grad_checkpointing(False)


# ----------------------------------------------------------------------------- number of tasks
@pytest.mark.parametrize("num_tasks", TASK_COUNTS)
@pytest.mark.parametrize("name", list(MODELS))
def test_task_scaling(benchmark, measure, synthetic_batch, name, num_tasks):
    _require(name)
    _current.clear()
    _release()
    device = _device()
    tasks = SYNTHETIC_TASKS[:num_tasks]
    model = build(name, device, tasks=tasks, dataset="synthetic").train()
    image = synthetic_batch["image"]
    targets = {t: synthetic_batch[t] for t in tasks}
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    info = {"suite": SUITE_TASKS, "case": f"{name}, T = {num_tasks}", "impl": "fused", "mode": "train", "model": name,
            "batch": BATCH, "image": SIZE, "tasks": num_tasks,
            "trainable_params": model.trainable_parameter_report().total}
    reset, fn = train_step(model, model, image, targets, device)
    benchmark.group = f"{SUITE} tasks {name}-b{BATCH}-{SIZE}"
    median_ms = measure(benchmark, fn, device=device, dtype=dtype, reset=reset, info=info)
    if median_ms is not None:
        benchmark.extra_info["images_per_s"] = BATCH / (median_ms / 1e3)
        if hasattr(model, "backbone_pass"):
            def backbone():
                with _autocast(device):
                    model.backbone_pass(image)

            benchmark.extra_info["backbone_ms"] = time_ms(backbone, device)
