"""Issue 5 end to end: MultiTimestepFeatures -> TimestepFeatureCache ->
TaskAwareTimestepSelector with a TFC head, on a tiny random diffusers U-Net.

The pieces are tested alone in test_multi_timestep.py and
tests/nn/test_timestep_selection.py (there with synthetic feature sources);
here they run together as a user would wire them, and the U-Net is watched
from the outside (a hook on ``time_proj`` records the timestep of every row
it embeds), so the cache's own ``unet_calls`` counter is checked too, not
trusted.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastdense.diffusion import MultiTimestepFeatures, TimestepFeatureCache
from fastdense.nn import TaskAwareTimestepSelector, TimestepFeatureConsolidation
from fastdense.nn.timestep_selection import feature_similarity

diffusers = pytest.importorskip("diffusers")

from _tiny_unet import tiny_unet  # noqa: E402  (after the diffusers check)

BATCH, LATENT, DIM, HEADS = 2, 16, 32, 4
INITIAL = (1, 100, 200, 300)
# The tiny U-Net's last-block features of far-apart timesteps have cosine
# similarity ~0.5-0.97; this threshold lets some candidates through and
# rejects others, so both branches of Alg. 1 line 12 run.
TAU = 0.9


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def unet():
    return tiny_unet().requires_grad_(False)


class TTSHead(nn.Module):
    """The few-shot head the selector scores: a 1×1 projection of each selected
    layer to ``DIM`` channels (resized to the last layer's grid and summed),
    TFC (Eq. 3) with the label map's features as queries, a linear readout of
    the consolidated key; per-sample MSE to the label map."""

    def __init__(self, channels: dict[str, int], label_channels: int = 3):
        super().__init__()
        self.names = list(channels)
        self.proj = nn.ModuleList(nn.Conv2d(c, DIM, 1) for c in channels.values())
        self.label_proj = nn.Conv2d(label_channels, DIM, 1)
        self.tfc = TimestepFeatureConsolidation(DIM, HEADS, lora_dropout=0.0)
        self.readout = nn.Linear(DIM, label_channels)

    def per_sample_loss(self, feats: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        n, k, _, h, w = feats[self.names[-1]].shape
        x = 0
        for name, proj in zip(self.names, self.proj):
            f = proj(feats[name].flatten(0, 1))
            if f.shape[-2:] != (h, w):
                f = F.interpolate(f, size=(h, w), mode="bilinear", align_corners=False)
            x = x + f
        key, _ = self.tfc(self.label_proj(labels), x.view(n, k, DIM, h, w))   # (n, h·w, DIM)
        pred = self.readout(key)
        return (pred - labels.flatten(2).transpose(1, 2)).square().mean(dim=(1, 2))


def make_pipeline(unet, seed: int = 0, layers=None):
    """Extractor, cache, head and the two loss functions, all seeded."""
    # Another stream than the cache's ε (drawn from Generator().manual_seed(seed)):
    # with ε = z_0 every z_t is a multiple of z_0 and all timesteps look alike.
    g = torch.Generator().manual_seed(10_000 + seed)
    latents = torch.randn(BATCH, 4, LATENT, LATENT, generator=g)
    labels = torch.rand(BATCH, 3, LATENT, LATENT, generator=g)
    extractor = MultiTimestepFeatures(unet, timesteps=INITIAL, layers=layers)
    cache = TimestepFeatureCache(extractor, latents, seed=seed)
    channels = {name: f.shape[2] for name, f in cache(list(INITIAL)).items()}
    torch.manual_seed(seed)
    head = TTSHead(channels).eval()

    def loss_fn(feats, timesteps):
        return head.per_sample_loss(feats, labels).mean()

    def batched_loss_fn(stacked, subsets):
        per = head.per_sample_loss(stacked, labels.repeat(len(subsets), 1, 1, 1))
        return per.view(len(subsets), BATCH).mean(1)            # subset-major rows

    return extractor, cache, head, loss_fn, batched_loss_fn


class UNetWatch:
    """Every U-Net call, as the list of per-row timesteps it embedded."""

    def __init__(self, unet):
        self.calls: list[list[int]] = []
        self.handle = unet.time_proj.register_forward_pre_hook(
            lambda m, args: self.calls.append(args[0].reshape(-1).tolist()))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# ----------------------------------------------------------------------------- (a) the cache saves U-Net calls
def test_second_round_runs_unet_only_for_new_candidates(unet):
    extractor, cache, head, loss_fn, _ = make_pipeline(unet)
    # the never-worse rule: with it this seed's second round meets all three outcomes
    sel = TaskAwareTimestepSelector(k=4, initial=INITIAL, tau_sim=TAU, max_candidates=6, seed=0,
                                    accept_against="current")
    first = sel.step(cache, loss_fn)
    assert first.unet_calls == len(first.candidates)  # the initial set was cached by make_pipeline
    seen = cache.cached_timesteps()
    assert seen == set(INITIAL) | {c.timestep for c in first.candidates}

    # Record the cache's U-Net counter at every loss evaluation of round 2.
    calls_at_loss: list[tuple[list[int], int]] = []

    def watched_loss(feats, timesteps):
        calls_at_loss.append((list(timesteps), cache.unet_calls))
        return loss_fn(feats, timesteps)

    calls0 = cache.unet_calls
    with UNetWatch(unet) as watch:
        second = sel.step(cache, watched_loss)
    current = second.before
    assert current == sel.history[0].after
    # this seed's round 2 meets all three outcomes of a candidate
    assert {c.reason for c in second.candidates} == {"similar", "loss", "accepted"}
    # L(T) and the k leave-one-out losses come first, without any U-Net call
    assert [ts for ts, _ in calls_at_loss[:5]] == [current] + [[t for t in current if t != r] for r in current]
    assert all(n == calls0 for _, n in calls_at_loss[:5])
    assert second.leave_one_out.keys() == set(current)
    # each candidate not seen before costs exactly one U-Net call, batched over
    # the B samples, on that timestep alone; seen ones cost nothing
    fresh = [c.timestep for c in second.candidates if c.timestep not in seen]
    assert fresh, "seeded search drew no new timestep; pick another seed"
    assert watch.calls == [[t] * BATCH for t in fresh]
    assert cache.unet_calls - calls0 == len(fresh) == second.unet_calls
    # a candidate's loss is evaluated on the kept timesteps plus itself, still from the cache
    kept = [t for t in current if t != second.removed]
    for ts, _ in calls_at_loss[5:]:
        assert len(ts) == 4 and set(kept) < set(ts)
    assert len(calls_at_loss) - 5 == sum(c.loss is not None for c in second.candidates)

    # the leave-one-out losses equal the head run on features fetched afresh for each subset
    for t in current:
        rest = [u for u in current if u != t]
        with torch.no_grad():
            want = loss_fn(cache(rest), rest).item()
        assert second.leave_one_out[t] == pytest.approx(want, rel=1e-6, abs=1e-7)


# ----------------------------------------------------------------------------- (b) similarity on the last decoder block
def test_default_similarity_layer_is_last_decoder_block(unet):
    extractor, cache, head, loss_fn, _ = make_pipeline(unet)
    assert extractor.layers == ("up_blocks.0", "up_blocks.1")
    assert list(cache(list(INITIAL)))[-1] == extractor.layers[-1]
    sel = TaskAwareTimestepSelector(k=4, initial=INITIAL, tau_sim=TAU, max_candidates=4, seed=1)
    rec = sel.step(cache, loss_fn)
    assert rec.candidates
    # the recorded similarities are those of the last decoder block, not of up_blocks.0
    kept = [t for t in INITIAL if t != rec.removed]
    for c in rec.candidates:
        feats = cache(kept + [c.timestep])
        want = {t: feature_similarity(feats["up_blocks.1"][:, -1], feats["up_blocks.1"][:, i])
                for i, t in enumerate(kept)}
        other = {t: feature_similarity(feats["up_blocks.0"][:, -1], feats["up_blocks.0"][:, i])
                 for i, t in enumerate(kept)}
        assert c.similarities == pytest.approx(want, abs=1e-6)
        assert max(abs(c.similarities[t] - other[t]) for t in kept) > 1e-3  # the layers are distinguishable


def test_similarity_layer_follows_unet_order_not_request_order(unet):
    # Layers requested deepest first: the cache still lists them in U-Net
    # execution order, so the selector's default (the last key) is the last
    # decoder block whatever order the user wrote.
    layers = ["up_blocks.1", "mid_block", "up_blocks.0"]
    extractor, cache, head, loss_fn, _ = make_pipeline(unet, layers=layers)
    assert extractor.layers == tuple(layers)
    feats = cache([1, 500])
    assert list(feats) == ["mid_block", "up_blocks.0", "up_blocks.1"]
    sel = TaskAwareTimestepSelector(k=2, initial=(1, 500), tau_sim=2.0, max_candidates=1, seed=0)
    rec = sel.step(cache, loss_fn)
    (c,) = rec.candidates
    (kept,) = [t for t in (1, 500) if t != rec.removed]
    f = cache([kept, c.timestep])["up_blocks.1"]
    assert c.similarities[kept] == pytest.approx(feature_similarity(f[:, 1], f[:, 0]), abs=1e-6)


# ----------------------------------------------------------------------------- (c) candidates are valid timesteps
def test_candidates_valid_for_extractor(unet):
    extractor, cache, *_ = make_pipeline(unet)
    assert extractor.num_train_timesteps == 1000
    initial_feats = cache(list(INITIAL))
    drawn: list[int] = []

    def source(ts):
        # Relabels the cached features of the initial set: every candidate is
        # then "similar", so each round draws all max_candidates timesteps.
        drawn.extend(t for t in ts if t not in INITIAL)
        return {name: f[:, [0] * len(ts)] for name, f in initial_feats.items()}

    for seed in range(60):
        sel = TaskAwareTimestepSelector(k=4, initial=INITIAL, seed=seed, max_candidates=20)
        rec = sel.step(source, lambda feats, ts: torch.tensor(0.0))
        assert len(rec.candidates) == 20 and all(c.reason == "similar" for c in rec.candidates)
    assert len(drawn) == 60 * 20
    assert min(drawn) >= 1 and max(drawn) <= extractor.num_train_timesteps - 1
    assert max(drawn) > 990  # the draws reach the top of the range
    extractor._check_timesteps(drawn)  # every draw is a timestep the extractor accepts

    # The top of the range through the real cache: only 997, 998, 999 can be drawn.
    sel = TaskAwareTimestepSelector(k=2, initial=(995, 996), t_min=995, tau_sim=2.0, seed=0, max_candidates=5)
    rec = sel.step(cache, lambda feats, ts: torch.tensor(float(sum(ts))))  # larger t -> larger loss: all rejected
    assert sorted(c.timestep for c in rec.candidates) == [997, 998, 999]
    assert {997, 998, 999} <= cache.cached_timesteps()


# ----------------------------------------------------------------------------- (d) determinism
def _run(unet, seed, rounds=2):
    _, cache, _, loss_fn, batched = make_pipeline(unet)
    sel = TaskAwareTimestepSelector(k=4, initial=INITIAL, tau_sim=TAU, max_candidates=5, seed=seed)
    sel.select(cache, loss_fn, n_iter=rounds, batched_loss_fn=batched)
    return sel


def test_deterministic_under_seed(unet):
    a, b = _run(unet, seed=11), _run(unet, seed=11)
    assert a.history_dicts() == b.history_dicts()  # same draws, similarities and losses, bit for bit
    assert a.timesteps == b.timesteps and a.timesteps != list(INITIAL)
    c = _run(unet, seed=12)
    drawn = lambda s: [c.timestep for r in s.history for c in r.candidates]  # noqa: E731
    assert drawn(c) != drawn(a)


# ----------------------------------------------------------------------------- (e) batched leave-one-out
def test_batched_leave_one_out_matches_one_by_one(unet):
    _, cache, _, loss_fn, batched = make_pipeline(unet)
    one = TaskAwareTimestepSelector(k=4, initial=INITIAL, tau_sim=TAU, max_candidates=6, seed=0)
    many = TaskAwareTimestepSelector(k=4, initial=INITIAL, tau_sim=TAU, max_candidates=6, seed=0)
    for _ in range(2):
        r1 = one.step(cache, loss_fn)
        r2 = many.step(cache, loss_fn, batched_loss_fn=batched)
        assert r1.leave_one_out.keys() == r2.leave_one_out.keys()
        for t in r1.leave_one_out:
            assert r2.leave_one_out[t] == pytest.approx(r1.leave_one_out[t], rel=1e-5, abs=1e-6)
        # the losses differ between subsets, so a permuted stacking would be caught
        assert len({round(v, 6) for v in r1.leave_one_out.values()}) == 4
        assert r1.removed == r2.removed and r1.after == r2.after
        assert [(c.timestep, c.reason) for c in r1.candidates] == [(c.timestep, c.reason) for c in r2.candidates]
    assert one.timesteps != list(INITIAL)  # candidates were accepted along the way


# ----------------------------------------------------------------------------- the documented example runs
def test_module_docstring_example_runs(capsys):
    import textwrap

    import fastdense.nn.timestep_selection as module

    code = textwrap.dedent(module.__doc__.split("instead of latents::\n", 1)[1].split("\nIn a training loop", 1)[0])
    namespace: dict = {}
    exec(compile(code, "timestep_selection example", "exec"), namespace)
    selector, extractor = namespace["selector"], namespace["extractor"]
    assert len(selector.history) == 2 and extractor.timesteps == tuple(selector.timesteps)
    assert "round 1:" in capsys.readouterr().out
