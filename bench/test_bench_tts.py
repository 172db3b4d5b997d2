"""Task-aware Timestep Selection: the cost of one selection round next to a training step.

The issue's goal: with the per-timestep feature cache, a TTS round (Alg. 1)
costs at most 10% of a training step on GPU. A round with every timestep it
touches already cached runs only the head: the current set once, the k
leave-one-out sets in one batched call, and each candidate that passes the
similarity test once (on the k − 1 kept features plus the candidate's).

Setup (random weights; timings only):

* Features: :class:`fastdense.diffusion.MultiTimestepFeatures` on a diffusers
  ``UNet2DConditionModel`` (frozen, random weights), the outputs of its last
  two up blocks, all k timesteps in one U-Net pass with a broadcast
  conditioning, behind a :class:`fastdense.diffusion.TimestepFeatureCache`
  (the selector's feature source: one U-Net pass for the timesteps of a call
  that are not cached, none otherwise). Latents are given directly (no VAE).
  CPU: a tiny U-Net (widths 32/64, 16×16 latents, B = 2); GPU: SD 1.x widths
  (320/640/1280/1280) at 64×64 latents, B = 8, bf16.
* Head: per layer a 1×1 projection to ``dim`` channels, resized to the last
  layer's grid, summed over layers; :class:`TimestepFeatureConsolidation`
  with label-map features as queries; a linear decoder to the label; MSE.
* Training step: U-Net forward on the current k timesteps (no grad: the
  backbone is frozen — the paper's U-Net LoRA would add a backward pass, which
  only makes the step longer and the ratio smaller), head forward, backward
  and an AdamW step.
* TTS round: a fresh selector with a fixed seed each call, so every call draws
  the same candidates. Cases: ``cached-*`` fill the cache in the warm-up calls
  and check afterwards that the timed rounds ran no U-Net pass;
  ``uncached-*`` empty the cache of everything but the current set before
  every call, so each candidate costs a U-Net pass (what the cache saves).
  ``*-first-accept`` is the round the seeded search runs with this random
  head; ``*-all-rejected`` makes every candidate lose the loss test, so all
  ``MAX_CANDIDATES`` draws are evaluated (the most a round costs).

``extra_info``: ``train_step_ms`` (median of a training step run, on a copy
of the head, before each timed round), ``round_over_step_pct`` (the median of
the paired round / step ratios; the goal: ≤ 10 on GPU), candidates drawn and
candidate losses evaluated in the round.
"""
from __future__ import annotations

import copy
import statistics
import time

import pytest
import torch
from _cases import wall_ms
import torch.nn as nn
import torch.nn.functional as F

from fastdense.diffusion import MultiTimestepFeatures, TimestepFeatureCache
from fastdense.nn import TaskAwareTimestepSelector, TimestepFeatureConsolidation

diffusers = pytest.importorskip("diffusers")

ON_GPU = torch.cuda.is_available()
K = 4
INITIAL = (1, 100, 200, 300)
MAX_CANDIDATES = 8
GOAL_PCT = 10.0

CPU_CONFIG = dict(widths=(32, 64), layers_per_block=1, latent=16, batch=2, heads=8, cross_dim=32, dim=32)
GPU_CONFIG = dict(widths=(320, 640, 1280, 1280), layers_per_block=2, latent=64, batch=8, heads=8, cross_dim=768,
                  dim=128)


def make_unet(cfg, device, dtype):
    widths = cfg["widths"]
    down = ["CrossAttnDownBlock2D"] * (len(widths) - 1) + ["DownBlock2D"]
    up = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (len(widths) - 1)
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=cfg["latent"], in_channels=4, out_channels=4, block_out_channels=widths,
        down_block_types=tuple(down), up_block_types=tuple(up), layers_per_block=cfg["layers_per_block"],
        cross_attention_dim=cfg["cross_dim"], attention_head_dim=cfg["heads"], norm_num_groups=32)
    return unet.to(device=device, dtype=dtype).eval().requires_grad_(False)


class TinyHead(nn.Module):
    """Projection + TFC (Eq. 3) + decoder, with a per-sample loss for batched leave-one-out."""

    def __init__(self, channels: dict[str, int], dim: int, heads: int, label_channels: int = 3):
        super().__init__()
        self.proj = nn.ModuleDict({n.replace(".", "_"): nn.Conv2d(c, dim, 1) for n, c in channels.items()})
        self.label_enc = nn.Conv2d(label_channels, dim, 3, padding=1)
        self.tfc = TimestepFeatureConsolidation(dim, heads, lora_dropout=0.0)
        self.dec = nn.Linear(dim, label_channels)

    def per_sample_loss(self, feats: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        names = list(feats)
        last = feats[names[-1]]
        n, k, _, h, w = last.shape
        x = 0
        for name in names:
            f = feats[name]
            f = self.proj[name.replace(".", "_")](f.flatten(0, 1))
            if f.shape[-2:] != (h, w):
                f = F.interpolate(f, size=(h, w), mode="bilinear", align_corners=False)
            x = x + f
        x = x.view(n, k, -1, h, w)
        lab = F.interpolate(labels, size=(h, w), mode="bilinear", align_corners=False)
        key, _ = self.tfc(self.label_enc(lab), x)                      # (n, h·w, dim)
        pred = self.dec(key)
        return (pred - lab.flatten(2).transpose(1, 2)).square().mean(dim=(1, 2))


def _setup(device, dtype, cfg):
    """U-Net, extractor of its last two up blocks, the cache (filled with the
    initial set), a head sized from the features, and label maps."""
    unet = make_unet(cfg, device, dtype)
    g = torch.Generator(device="cpu").manual_seed(1)
    latents = torch.randn(cfg["batch"], 4, cfg["latent"], cfg["latent"], generator=g).to(device)
    cond = torch.randn(1, 77, cfg["cross_dim"], generator=g).to(device, dtype)
    labels = torch.rand(cfg["batch"], 3, 8 * cfg["latent"], 8 * cfg["latent"], generator=g).to(device, dtype)
    n_up = len(unet.up_blocks)
    extractor = MultiTimestepFeatures(unet, timesteps=INITIAL,
                                      layers=[f"up_blocks.{n_up - 2}", f"up_blocks.{n_up - 1}"],
                                      conditioning=cond).to(device)
    # Latents (no VAE): the cache encodes nothing and draws one ε from its seed.
    cache = TimestepFeatureCache(extractor, latents, seed=0)
    feats = cache(list(INITIAL))
    head = TinyHead({n: f.shape[2] for n, f in feats.items()}, cfg["dim"], 4).to(device, dtype)
    return extractor, cache, head, labels


def _loss_fns(head, labels):
    def loss_fn(feats, timesteps):
        return head.per_sample_loss(feats, labels).mean()

    def batched_loss_fn(stacked, subsets):
        s = len(subsets)
        per = head.per_sample_loss(stacked, labels.repeat(s, 1, 1, 1))
        return per.view(s, -1).mean(1)

    return loss_fn, batched_loss_fn


def _train_step_fn(cache, head, labels):
    opt = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=1e-4)
    extractor = cache.extractor

    def step():
        # the frozen U-Net on the current k timesteps, uncached (a training
        # step sees a new episode every time), then the head's forward,
        # backward and update
        with torch.no_grad():
            feats = extractor.features(cache.latents, list(INITIAL), noise=cache.noise)
        head.train()
        loss = head.per_sample_loss(feats, labels).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _keep_only_initial(cache) -> None:
    """Empty the cache but for the current set (refilled here, untimed)."""
    cache.clear()
    cache(list(INITIAL))


def _case(device):
    if device.type == "cuda":
        return GPU_CONFIG, torch.bfloat16
    return CPU_CONFIG, torch.float32


def _info(cfg, dtype):
    return {"suite": "tts", "k": K, "batch": cfg["batch"], "latent": cfg["latent"], "widths": list(cfg["widths"]),
            "max_candidates": MAX_CANDIDATES, "goal_pct": GOAL_PCT}


@pytest.mark.parametrize("target", [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")]),
])
def test_bench_tts_train_step(benchmark, measure, device, target):
    if device.type != target:
        pytest.skip(f"case for {target}; this run is on {device.type}")
    cfg, dtype = _case(device)
    _, cache, head, labels = _setup(device, dtype, cfg)
    benchmark.group = "tts"
    measure(benchmark, _train_step_fn(cache, head, labels), device=device, dtype=dtype,
            info={**_info(cfg, dtype), "case": "train-step"})


@pytest.mark.parametrize("case", ["cached-first-accept", "cached-all-rejected", "uncached-all-rejected"])
@pytest.mark.parametrize("target", [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")]),
])
def test_bench_tts_round(benchmark, measure, device, target, case):
    """``first-accept``: the round as the seeded search runs it with this random
    head; ``all-rejected``: every candidate's loss is made to lose (a constant
    added after the head ran), so all MAX_CANDIDATES candidates that pass the
    similarity test cost a head evaluation — the most a round can cost."""
    if device.type != target:
        pytest.skip(f"case for {target}; this run is on {device.type}")
    cfg, dtype = _case(device)
    _, cache, head, labels = _setup(device, dtype, cfg)
    # The training step trains a copy, so every round sees the same head and draws the same way.
    train_step = _train_step_fn(cache, copy.deepcopy(head), labels)
    head.eval()
    loss_fn, batched_loss_fn = _loss_fns(head, labels)
    if case.endswith("all-rejected"):
        head_loss = loss_fn

        def loss_fn(feats, timesteps):
            return head_loss(feats, timesteps) + (0.0 if tuple(timesteps) == INITIAL else 1e6)
    records, round_ms, step_ms = [], [], []

    def tts_round():
        t0 = time.perf_counter()
        sel = TaskAwareTimestepSelector(k=K, initial=INITIAL, max_candidates=MAX_CANDIDATES, seed=0)
        records.append(sel.step(cache, loss_fn, batched_loss_fn=batched_loss_fn))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        round_ms.append(1e3 * (time.perf_counter() - t0))

    def reset():
        # A training step before every round (untimed by measure, timed here): on a
        # shared machine whose load drifts, paired step/round times give a steadier ratio.
        if case.startswith("uncached"):
            _keep_only_initial(cache)
        step_ms.append(wall_ms(train_step, device))

    benchmark.group = "tts"
    median_ms = measure(benchmark, tts_round, device=device, dtype=dtype, reset=reset,
                        info={**_info(cfg, dtype), "case": f"tts-round-{case}"})
    rec = records[-1]
    if case.startswith("cached"):
        # the timed rounds found every timestep in the cache
        assert all(r.unet_calls == 0 for r in records[3:]), [r.unet_calls for r in records]
    else:
        assert rec.unet_calls == len(rec.candidates)
    if case.endswith("all-rejected"):
        assert len(rec.candidates) == MAX_CANDIDATES and rec.added is None
    n = benchmark.extra_info.get("rounds", 1)
    pairs = list(zip(round_ms, step_ms))[-n:]
    benchmark.extra_info.update({
        "train_step_ms": statistics.median(s for _, s in pairs),
        "round_wall_ms": statistics.median(r for r, _ in pairs),
        # median over rounds of (round time / the training step timed just before it)
        "round_over_step_pct": None if median_ms is None else 100 * statistics.median(r / s for r, s in pairs),
        "candidates_drawn": len(rec.candidates),
        "candidate_losses": sum(c.loss is not None for c in rec.candidates),
        "unet_calls_in_round": rec.unet_calls,
    })
