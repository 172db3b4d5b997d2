"""The timestep paper's token matcher (fastdense.models.tts_token_matcher) and its
few-shot protocol (fastdense.engine.token_matcher, fastdense.engine.adapt_tts), on tiny random diffusers models.

What is checked against what:

* structure and parameter counts against the paper (§3.4's LoRA placement and
  ranks, Table 5's TFC size, the ≈ 305 K fine-tuned parameters), the SD 1.4
  U-Net built on the meta device;
* the fused path (k timesteps in one U-Net call, the fused LoRA op on its
  automatic backend) against the reference path (one U-Net call per timestep,
  every op on the torch backend): outputs and the gradient of every trainable
  parameter, fp32;
* ``torch.compile(fullgraph=True)`` of the fine-tuning step, U-Net included;
* the TTS callback in meta-training and fine-tuning: rounds in log.jsonl, the
  selected set in the checkpoint, exact resume;
* the seed trap (latents and cache noise from one seed) refused;
* local Stable Diffusion folders: loading and the layout errors;
* the few-shot claim on the synthetic scenes runs in tests/docs via the
  worked example of docs/models/tts_token_matcher.md (test_docs_example_*).
"""
from __future__ import annotations

import argparse
import copy
import json
import re

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import fastdense.ops  # noqa: E402
from fastdense.diffusion import TimestepFeatureCache, sd_alphas_cumprod  # noqa: E402
from fastdense.engine.fewshot import EpisodicConfig, synthetic_sampler  # noqa: E402
from fastdense.engine.adapt_tts import OptionsError, TTSAdaptOptions, run_adapt_tts  # noqa: E402
from fastdense.engine.token_matcher import (TimestepSelectionCallback, TokenMatcherTrainer,  # noqa: E402
                                            augment_labels, support_mean_prediction, vtm_scores)
from fastdense.models import create_model, list_models  # noqa: E402
from fastdense.models.tts_token_matcher import (PRESETS, TTSTokenMatcher, build_unet_vae,  # noqa: E402
                                                check_noise_independent, tiny_unet_vae, tts_token_matcher)
from fastdense.nn import LoRALinear, TimestepFeatureConsolidation  # noqa: E402
from fastdense.ops import _dispatch  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

TASKS = ["normal", "saliency", "depth_euclidean"]
SD14_UNET = dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                 layers_per_block=2, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768,
                 attention_head_dim=8, norm_num_groups=32)


def tiny(**kw) -> TTSTokenMatcher:
    return tts_token_matcher(tasks=TASKS, label_space="synthetic", **kw)


def episode(seed: int = 0, s: int = 3, q: int = 2, channels: int = 3, size: int = 64):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(s, 3, size, size, generator=g), torch.rand(s, channels, size, size, generator=g),
            torch.rand(q, 3, size, size, generator=g), torch.rand(q, channels, size, size, generator=g))


# ----------------------------------------------------------------------------- structure
def test_registered_and_built_as_the_paper_says():
    assert "tts_token_matcher" in list_models()
    model = create_model("tts_token_matcher", tasks=TASKS, label_space="synthetic")
    assert model.timesteps == [1, 100, 200, 300]
    # four levels from the U-Net's decoder blocks, finest first (DPT's level 1)
    assert model.levels == ("up_blocks.3", "up_blocks.2", "up_blocks.1", "up_blocks.0")
    # LoRA on query and value of every self-attention of the U-Net: r = 2, α = 4, dropout 0.2
    unet_lora = {n: m for n, m in model.unet.named_modules() if isinstance(m, LoRALinear)}
    attn1 = [n for n, m in model.unet.named_modules() if re.fullmatch(r".*attn1\.to_(q|v)", n)]
    assert sorted(unet_lora) == sorted(attn1) and len(attn1) == 2 * 10   # 10 transformer blocks in the tiny U-Net
    for m in unet_lora.values():
        assert (m.r["default"], m.lora_alpha["default"], m.lora_dropout["default"].p) == (2, 4.0, 0.2)
    # TFC and matching: query and value, r = 8, α = 16; TFC with the output projection of Table 5
    for tfc, match in zip(model.tfc, model.matching):
        assert isinstance(tfc, TimestepFeatureConsolidation) and tfc.out_proj is not None
        for layer in (tfc.q_proj, tfc.v_proj, match.q_proj, match.v_proj):
            assert (layer.r["default"], layer.lora_alpha["default"], layer.lora_dropout["default"].p) == (8, 16.0, 0.2)
        assert not isinstance(tfc.k_proj, LoRALinear) and not isinstance(match.k_proj, LoRALinear)
    # Eq. 4's initialisation: A Kaiming-uniform (non-zero), B zero
    for m in model.modules():
        if isinstance(m, LoRALinear):
            assert m.lora_A["default"].abs().sum() > 0 and m.lora_B["default"].abs().sum() == 0
    sx, sy, qx, _ = episode()
    out = model("normal", sx, sy, qx)
    assert out.shape == (2, 3, 64, 64) and bool(((out > 0) & (out < 1)).all())


def test_trainable_sets_by_stage():
    model = tiny()
    frozen_unet = [p for n, p in model.unet.named_parameters() if ".lora_" not in n]
    model.mark_trainable("meta")
    train = {id(p) for p in model.parameters() if p.requires_grad}
    assert not model.lora_active
    assert not any(id(p) in train for p in model.lora_parameters())
    assert not any(id(p) in train for p in frozen_unet) and not any(p.requires_grad for p in model.vae.parameters())
    assert all(id(p) in train for p in model.tfc[0].k_proj.parameters())           # scratch modules train
    model.mark_trainable("adapt", "normal")
    train = {id(p) for p in model.parameters() if p.requires_grad}
    assert model.lora_active
    assert train == {id(p) for p in model.lora_parameters()} | {id(model.image_bias["normal"])}
    with pytest.raises(ValueError, match="needs the task"):
        model.mark_trainable("adapt")


def test_parameter_counts_match_the_paper():
    # The SD 1.4 U-Net and the VTM-sized head, on the meta device (no memory, no init).
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**SD14_UNET)
        model = TTSTokenMatcher(unet, None, ["normal", "segment_semantic"], **PRESETS["vtm"])
    groups = model.parameter_groups()
    # Table 5: TFC holds 9.449 M parameters = 4 levels x (w_Q, w_K, w_V, w_O) of 768 x 768 with biases.
    assert groups["tfc"] == 4 * 4 * (768 * 768 + 768) == 9_449_472
    # §3.4: LoRA r = 2 on q, v of the 16 self-attentions; r = 8 in TFC and matching.
    assert groups["unet_lora"] == 2 * 2 * sum(2 * c for c in (320, 320, 640, 640, 1280, 1280, 1280,
                                                              1280, 1280, 1280, 640, 640, 640, 320, 320, 320))
    assert groups["tfc_lora"] == groups["matching_lora"] == 4 * 2 * 8 * (768 + 768)
    # "approximately 305 KB" fine-tuned: adapters + the task's biases (normals: 3 channels)
    model.mark_trainable("adapt", "normal")
    tuned = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert tuned == 305_664 and abs(tuned - 305_000) / 305_000 < 0.01


# ----------------------------------------------------------------------------- fused vs reference
def _adapt_mode_model(seed=0, **kw) -> TTSTokenMatcher:
    model = tts_token_matcher(tasks=TASKS, label_space="synthetic", lora_dropout=0.0, attn_dropout=0.0, **kw)
    model.mark_trainable("adapt", "normal")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():   # non-zero B and biases: every adapter and bias reaches the loss
        for name, p in model.named_parameters():
            if ".lora_B" in name or name.startswith("image_bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model.train()


def _loss_and_grads(model, latents, noise, labels, s):
    params = [p for p in model.parameters() if p.requires_grad]
    logits = model.forward_latents("normal", latents[:s], labels[:s], latents[s:], noise)
    loss = model.loss("normal", logits, labels[s:])
    return logits.detach(), loss.detach(), torch.autograd.grad(loss, params), params


def test_fused_path_equals_reference_path_fp32(monkeypatch):
    fused = _adapt_mode_model()
    reference = copy.deepcopy(fused)
    reference.feature_pass = "per_timestep"
    sx, sy, qx, _ = episode(1)
    latents = fused.encode(torch.cat([sx, qx]))
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(5))
    labels = torch.cat([sy, torch.rand_like(sy[:2])])

    ran, unet_calls = [], []
    select = _dispatch.select
    monkeypatch.setattr(_dispatch, "select", lambda op, dev, *a: ran.append(select(op, dev, *a)) or ran[-1])
    hook = fused.unet.time_proj.register_forward_pre_hook(lambda m, a: unet_calls.append(a[0].numel()))
    logits_f, loss_f, grads_f, params = _loss_and_grads(fused, latents, noise, labels, 3)
    hook.remove()
    fused_backends = {impl.backend for impl in ran}
    ran.clear()
    hook = reference.unet.time_proj.register_forward_pre_hook(lambda m, a: unet_calls.append(a[0].numel()))
    with fastdense.ops.backend("torch"):
        logits_r, loss_r, grads_r, _ = _loss_and_grads(reference, latents, noise, labels, 3)
    hook.remove()
    # one U-Net call over k·B rows against k calls over B rows
    assert unet_calls == [4 * 5] + [5] * 4
    assert {impl.backend for impl in ran} == {"torch"}
    if _cpp_available():     # the fused path ran the C++ kernels (LoRA and q_sample_multi), nothing on torch
        assert "cpp" in fused_backends and "torch" not in fused_backends, fused_backends
    torch.testing.assert_close(logits_f, logits_r, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(loss_f, loss_r, atol=1e-5, rtol=1e-5)
    names = [n for n, p in fused.named_parameters() if p.requires_grad]
    assert len(grads_f) == len(names) > 40
    for name, gf, gr in zip(names, grads_f, grads_r):
        scale = max(float(gr.abs().max()), 1e-3)
        torch.testing.assert_close(gf, gr, atol=1e-4 * scale, rtol=1e-3, msg=lambda m: f"{name}: {m}")
        assert float(gr.abs().max()) > 0, f"{name} gets no gradient"


def _cpp_available() -> bool:
    from fastdense.testing.backends import unavailable

    return not unavailable("mt_lora_linear", "cpp")


# ----------------------------------------------------------------------------- torch.compile
# Tracing time grows with the number of modules: a two-level U-Net (four
# transformer blocks) keeps every kind of block the SD U-Net has.
TWO_LEVEL_UNET = dict(block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def test_compile_fullgraph_adaptation_step():
    unet, vae = tiny_unet_vae(1, unet_config=TWO_LEVEL_UNET)
    model = _adapt_mode_model(seed=1, unet=unet, vae=vae, preset="tiny",
                              levels=("up_blocks.1", "up_blocks.0", "mid_block", "down_blocks.1"))
    sx, sy, qx, qy = episode(2, s=2, q=1)
    latents = model.encode(torch.cat([sx, qx]))
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(3))
    params = [p for p in model.parameters() if p.requires_grad]

    def step(latents, noise, sy, qy):   # the fine-tuning step's forward: U-Net, TFC, matching, decoder, loss
        logits = model.forward_latents("normal", latents[:2], sy, latents[2:], noise)
        return model.loss("normal", logits, qy)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    want = step(latents, noise, sy, qy)
    want_grads = torch.autograd.grad(want, params)
    got = compiled(latents, noise, sy, qy)
    got_grads = torch.autograd.grad(got, params)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- noise streams
def test_tts_seed_trap_cannot_happen_through_the_model():
    unet, _ = tiny_unet_vae(0)
    model = tts_token_matcher(unet, None, tasks=["normal"], label_space="synthetic", preset="tiny", seed=0)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    # The trap, by hand: the cache's ε from the latents' own seed is the latents themselves.
    naive = TimestepFeatureCache(model.extractor, latents, seed=0)
    assert torch.equal(naive.noise, latents)
    with pytest.raises(ValueError, match="parallel to the latents"):
        check_noise_independent(naive.latents, naive.noise)
    # Through the model: the cache's ε comes from another stream, and each new cache from a new one.
    first, second = model.feature_cache(latents), model.feature_cache(latents)
    for cache in (first, second):
        cos = torch.nn.functional.cosine_similarity(cache.noise.flatten(1), latents.flatten(1), dim=1)
        assert float(cos.abs().max()) < 0.5
    assert not torch.equal(first.noise, second.noise)
    # The forward noise never touches the global RNG and repeats after reseeding.
    state = torch.get_rng_state()
    a = model.draw_noise(latents)
    assert torch.equal(torch.get_rng_state(), state)
    model.reseed_noise(0)
    assert torch.equal(model.draw_noise(latents), a)


# ----------------------------------------------------------------------------- checkpoints and TTS callback
def test_tts_callback_logs_rounds_and_checkpoint_holds_the_set(tmp_path):
    sampler = synthetic_sampler(fold=4, shots=2, queries=2, train_samples=8, test_samples=6, seed=0)
    tasks = [*sampler.train_tasks, *sampler.test_tasks]

    def trainer(run_dir, seed=0):
        model = tts_token_matcher(tasks=tasks, label_space="synthetic", seed=seed, unet_lora="none")
        cb = TimestepSelectionCallback(every=2, adapt_every=2, max_candidates=3, seed=0)
        return TokenMatcherTrainer(model, sampler, config=EpisodicConfig(steps=4, lr=3e-4, warmup_steps=1),
                                   callbacks=[cb], run_dir=run_dir, device="cpu"), cb

    tr, cb = trainer(tmp_path / "a")
    tr.fit()
    path = tr.save()
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    rounds = [r for r in log if r.get("event") == "tts"]
    assert [r["step"] for r in rounds] == [2, 4] and all(r["stage"] == "meta" for r in rounds)
    assert rounds[-1]["after"] == tr.model.timesteps == cb.selector.timesteps
    assert rounds[0]["before"] == [1, 100, 200, 300] and len(rounds[0]["leave_one_out"]) == 4
    # the checkpoint holds the set (a buffer of the model) and the selector, not the frozen backbone
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["model"]["extractor.timestep_tensor"].tolist() == tr.model.timesteps
    assert not any(k.startswith("extractor.unet.") or k.startswith("extractor.vae.") for k in ckpt["model"])
    assert ckpt["config"]["callbacks"][0]["selector"]["timesteps"] == tr.model.timesteps
    # resume: another initialisation, the same set, head weights and selector RNG
    other, cb2 = trainer(tmp_path / "b", seed=7)
    other.model.set_timesteps([5, 6, 7, 8])
    other.resume(path)
    assert other.model.timesteps == tr.model.timesteps
    for (n, p), q in zip(tr.model.state_dict().items(), other.model.state_dict().values()):
        assert torch.equal(p, q), n
    sel = TimestepSelectionCallback(every=2)
    sel.load_state_dict(ckpt["config"]["callbacks"][0])
    assert cb2._pending_state["rng_state"] == ckpt["config"]["callbacks"][0]["selector"]["rng_state"]

    # fine-tuning rounds: every 2 steps on the shots, logged with the run; the set is restored after
    before = tr.model.timesteps
    support = tr.load(sampler.episode(0, "test", task="normal", shots=4))["support"]
    tr.adapt("normal", support, steps=4, run=0)
    entries = cb.adapt_history[("normal", 0)]
    assert [e["step"] for e in entries] == [1, 3] and entries[-1]["after"] == tr.model.timesteps
    assert entries[0]["before"] == before
    tr.model.set_timesteps(before)
    tr.model.mark_trainable("meta")

    # evaluation: deterministic under its seed, and it leaves the model as it found it
    state = {k: v.clone() for k, v in tr.model.state_dict().items()}
    first = tr.evaluate(tasks=["normal"], runs=1, shots=3, adapt_steps=2, queries=2, seed=3)
    again = tr.evaluate(tasks=["normal"], runs=1, shots=3, adapt_steps=2, queries=2, seed=3)
    assert first["normal"]["merr"].values == again["normal"]["merr"].values
    assert first["normal"]["l1"].values == again["normal"]["l1"].values
    for k, v in tr.model.state_dict().items():
        assert torch.equal(v, state[k]), k


# ----------------------------------------------------------------------------- local weights
def test_meta_training_is_deterministic_under_its_seed_whatever_the_global_rng():
    """The matching attention's dropout draws from the global RNG: each meta-training step seeds it
    from (sampler seed, step), so two runs agree exactly even when the caller's RNG differs
    (it used to be left as the caller had it, and runs of `fastdense adapt` drifted apart)."""
    sampler = synthetic_sampler(fold=4, shots=2, queries=2, train_samples=8, test_samples=6, seed=0)
    tasks = [*sampler.train_tasks, *sampler.test_tasks]
    states = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        model = tts_token_matcher(tasks=tasks, label_space="synthetic", seed=0, unet_lora="none")
        assert model.matching[0].attn_dropout > 0
        TokenMatcherTrainer(model, sampler, config=EpisodicConfig(steps=2, lr=3e-4, warmup_steps=1),
                            device="cpu").fit()
        after = torch.rand(1)   # the caller's stream continues where it was
        torch.manual_seed(global_seed)
        assert torch.equal(after, torch.rand(1))
        states.append(model.state_dict())
    for name, value in states[0].items():
        assert torch.equal(value, states[1][name]), name


def test_build_unet_vae_from_a_local_folder_and_layout_errors(tmp_path):
    unet, vae = tiny_unet_vae(3)
    root = tmp_path / "sd"
    unet.save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae")
    diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(
        root / "scheduler")
    parts = build_unet_vae(root)
    for (n, a), b in zip(unet.state_dict().items(), parts.unet.state_dict().values()):
        assert torch.equal(a, b), n
    assert torch.allclose(parts.alphas_cumprod, sd_alphas_cumprod())
    assert parts.conditioning is None and not any(p.requires_grad for p in parts.unet.parameters())
    model = tts_token_matcher(tasks=["normal"], sd_dir=root, label_space="synthetic", preset="tiny")
    assert torch.equal(model.unet.conv_in.weight, unet.conv_in.weight)

    with pytest.raises(FileNotFoundError, match=r"does not exist(.|\n)*unet/config\.json"):
        build_unet_vae(tmp_path / "nowhere")
    for f in (root / "vae").glob("diffusion_pytorch_model*"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match=r"no weights in .*vae(.|\n)*scheduler/scheduler_config\.json"):
        build_unet_vae(root)


# ----------------------------------------------------------------------------- metrics, baseline, options
def test_scores_baseline_and_augmentation():
    target = torch.zeros(2, 1, 8, 8)
    target[:, :, :4] = 1.0
    assert vtm_scores("saliency", target, target)["miou"] == 1.0
    pred = support_mean_prediction(target.shape, target)
    assert torch.allclose(pred, torch.full_like(target, 0.5))
    assert vtm_scores("saliency", pred, target)["miou"] == pytest.approx(0.5)   # 0.5 > 0.2: all foreground
    assert vtm_scores("depth_euclidean", pred, target)["rmse"] == pytest.approx(0.5)
    n = torch.zeros(1, 3, 2, 2)
    n[:, 2] = 1.0
    assert vtm_scores("normal", n, n)["merr"] == pytest.approx(0.0, abs=1e-3)
    labels = torch.rand(4, 1, 8, 8)
    a = augment_labels(labels, torch.Generator().manual_seed(0))
    b = augment_labels(labels, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and float(a.min()) == 0.0 and float(a.max()) == 1.0
    # a monotone (non-decreasing, clipped) transform of the whole episode
    ordered = a.flatten()[labels.flatten().argsort()]
    assert bool((ordered[1:] >= ordered[:-1]).all()) and not torch.allclose(a, labels)


def test_run_adapt_tts_options():
    o = TTSAdaptOptions.from_any(argparse.Namespace(command="adapt", shots=3, fold=None, model="tts_token_matcher"))
    assert (o.shots, o.fold, o.data, o.timesteps, o.accept_against) == (3, 0, "synthetic", (1, 100, 200, 300), "kept")
    with pytest.raises(OptionsError, match="unknown option"):
        run_adapt_tts({"shot": 3})
    with pytest.raises(OptionsError, match="needs data_root"):
        run_adapt_tts({"data": "taskonomy"})
    with pytest.raises(OptionsError, match="accept_against"):
        run_adapt_tts({"accept_against": "new"})
    with pytest.raises(OptionsError, match="leaves no query"):
        run_adapt_tts({"shots": 10, "test_samples": 10})


def test_run_adapt_tts_end_to_end_tiny(tmp_path):
    out = tmp_path / "summary.json"
    import io

    text = io.StringIO()
    summary = run_adapt_tts({"fold": 4, "shots": 2, "runs": 1, "meta_steps": 2, "meta_shots": 2, "queries": 1,
                             "adapt_steps": 2, "train_samples": 4, "test_samples": 4, "eval_queries": 1,
                             "tts_every": 1, "tts_adapt_every": 1, "tts_candidates": 1, "compare_fixed": True,
                             "run_dir": str(tmp_path / "run"), "json": str(out),
                             "model_kwargs": {"unet_lora": "none"}}, out=text)
    assert json.loads(out.read_text()) == json.loads(json.dumps(summary))
    assert summary["test_tasks"] == ["saliency", "normal"] and summary["meta_steps"] == 2
    for key in ("tasks", "fixed", "baseline"):
        assert set(summary[key]) == {"saliency", "normal"}
        assert set(summary[key]["saliency"]) == {"miou", "l1"} and set(summary[key]["normal"]) == {"merr", "l1"}
    assert len(summary["adapt_timesteps"]["normal"]) == 1 and len(summary["meta_timesteps"]) == 4
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    stages = {(r["stage"], r.get("task")) for r in log if r.get("event") == "tts"}
    assert ("adapt", "normal") in stages and any(s == "meta" for s, _ in stages)
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    assert "trivial baseline (support mean)" in text.getvalue()
