"""MultiTimestepFeatures and TimestepFeatureCache on tiny random diffusers models.

The reference for the batched extractor is the diffusers U-Net itself, run
once per timestep (the way ddpm-segmentation and the paper's Alg. 1 do it)
with forward hooks reading the block outputs, on latents noised with the
DDPM formula written out here, so neither the block walk nor the noising op
is checked against itself.
"""
from __future__ import annotations

import pytest
import torch

from fastdense.diffusion import MultiTimestepFeatures, TimestepFeatureCache, batch_fingerprint, sd_alphas_cumprod

diffusers = pytest.importorskip("diffusers")

from _tiny_unet import CROSS_DIM, tiny_unet  # noqa: E402  (after the diffusers check)

ATOL = RTOL = 1e-4


def tiny_vae(seed: int = 1):
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=32,
    )
    return vae.eval()


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


def sequential_features(unet, latents, timesteps, noise, layers, cond=None):
    """{layer: (B, k, C, h, w)} from k separate diffusers forwards, one timestep each."""
    abar = sd_alphas_cumprod()
    captured: dict[str, torch.Tensor] = {}
    handles = [unet.get_submodule(name).register_forward_hook(
        lambda mod, args, out, name=name: captured.__setitem__(name, out[0] if isinstance(out, tuple) else out))
        for name in layers]
    batch = latents.shape[0]
    if cond is None:
        cond = torch.zeros(1, 77, CROSS_DIM)
    per_t = {name: [] for name in layers}
    try:
        with torch.no_grad():
            for i, t in enumerate(timesteps):
                eps = noise[i] if noise.dim() == 5 else noise
                z_t = abar[t].sqrt() * latents + (1 - abar[t]).sqrt() * eps
                unet(z_t, torch.tensor(t), encoder_hidden_states=cond.expand(batch, -1, -1))
                for name in layers:
                    per_t[name].append(captured[name])
    finally:
        for h in handles:
            h.remove()
    return {name: torch.stack(v, dim=1) for name, v in per_t.items()}


def assert_features_close(got, want):
    assert list(got) == list(want)
    for name in want:
        assert got[name].shape == want[name].shape, name
        torch.testing.assert_close(got[name], want[name], atol=ATOL, rtol=RTOL, msg=name)


# ----------------------------------------------------------------------------- extractor == k sequential passes
@pytest.mark.parametrize("batch,timesteps,size", [
    (1, (1,), (16, 16)),
    (3, (1, 100, 200, 300), (16, 16)),
    (1, (999, 0, 500, 42), (16, 16)),
    (3, (7, 640), (9, 11)),  # odd latent sizes: the U-Net forwards the skip sizes to its upsamplers
])
def test_equals_sequential_passes(unet, batch, timesteps, size):
    latents = torch.randn(batch, 4, *size)
    noise = torch.randn(batch, 4, *size)
    ext = MultiTimestepFeatures(unet, timesteps=timesteps)
    got = ext(latents, noise=noise)
    want = sequential_features(unet, latents, timesteps, noise, ext.layers)
    assert ext.layers == ("up_blocks.0", "up_blocks.1")
    assert got["up_blocks.1"].shape == (batch, len(timesteps), 32, *size)
    assert_features_close(got, want)
    # the timesteps matter: features differ between timesteps
    if len(timesteps) > 1:
        assert (got["up_blocks.1"][:, 0] - got["up_blocks.1"][:, 1]).abs().max() > 1e-3


def test_per_timestep_noise_equals_sequential(unet):
    timesteps = (1, 300, 900)
    latents, noise = torch.randn(2, 4, 16, 16), torch.randn(3, 2, 4, 16, 16)
    ext = MultiTimestepFeatures(unet, timesteps=timesteps, noise="per_timestep")
    assert_features_close(ext(latents, noise=noise), sequential_features(unet, latents, timesteps, noise, ext.layers))
    # drawn noise has the per-timestep shape and is reproducible under a generator
    a = ext(latents, generator=torch.Generator().manual_seed(3))
    b = ext(latents, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a["up_blocks.1"], b["up_blocks.1"], atol=0, rtol=0)
    assert ext.draw_noise(latents, 3).shape == (3, 2, 4, 16, 16)


def test_conditioning_tensor_and_options(unet):
    timesteps = (50, 400)
    latents, noise = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    cond = torch.randn(1, 5, CROSS_DIM)
    want = sequential_features(unet, latents, timesteps, noise, ["up_blocks.1"], cond=cond)
    for kwargs in ({}, {"channels_last": True}):
        ext = MultiTimestepFeatures(tiny_unet(), timesteps=timesteps, layers=["up_blocks.1"], conditioning=cond[0],
                                    attention="sdpa", **kwargs)
        assert_features_close(ext(latents, noise=noise), want)


def test_layer_selection_stops_early(unet):
    timesteps = (10, 700)
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    layers = ["mid_block", "down_blocks.0"]
    ext = MultiTimestepFeatures(unet, timesteps=timesteps, layers=layers)
    assert ext.available_layers() == ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"]
    calls = []
    handle = unet.up_blocks[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        got = ext(latents, noise=noise)
    finally:
        handle.remove()
    assert calls == []  # nothing after the mid block ran
    assert list(got) == layers  # the user's order
    assert_features_close(got, sequential_features(unet, latents, timesteps, noise, layers))


def test_vae_runs_once_per_batch(unet):
    vae = tiny_vae()
    encode_calls = []
    original = vae.encode
    vae.encode = lambda x, *a, **kw: (encode_calls.append(x.shape[0]), original(x, *a, **kw))[1]
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    noise = torch.randn(3, 4, 16, 16)
    ext = MultiTimestepFeatures(unet, vae=vae, timesteps=(1, 100, 200, 300))
    got = ext(images, noise=noise)
    assert encode_calls == [3]  # one call for the batch, not one per timestep or image
    with torch.no_grad():
        latents = original(images).latent_dist.mean * vae.config.scaling_factor
    assert_features_close(got, sequential_features(unet, latents, ext.timesteps, noise, ext.layers))
    # latent="sample" draws from the posterior: different from the mean, reproducible with a generator
    ext_s = MultiTimestepFeatures(unet, vae=vae, latent="sample")
    z1 = ext_s.encode(images, torch.Generator().manual_seed(0))
    z2 = ext_s.encode(images, torch.Generator().manual_seed(0))
    torch.testing.assert_close(z1, z2, atol=0, rtol=0)
    assert (z1 - latents).abs().max() > 1e-4


def test_grad_option(unet):
    latents = torch.randn(1, 4, 8, 8)
    ext = MultiTimestepFeatures(unet, timesteps=(5, 50), layers=["up_blocks.1"])
    assert not ext(latents)["up_blocks.1"].requires_grad
    tokens = torch.nn.Parameter(torch.randn(4, CROSS_DIM))
    ext_g = MultiTimestepFeatures(tiny_unet(), timesteps=(5, 50), layers=["up_blocks.1"], keep_grad=True,
                                  conditioning=tokens)
    assert any(p is tokens for p in ext_g.parameters())
    ext_g(latents)["up_blocks.1"].square().sum().backward()
    assert tokens.grad is not None and tokens.grad.abs().sum() > 0
    assert ext_g.unet.conv_in.weight.grad.abs().sum() > 0


def test_timesteps_order_and_schedule(unet):
    ext = MultiTimestepFeatures(unet, timesteps=(300, 1, 200, 100))
    assert ext.timesteps == (300, 1, 200, 100)
    ext.set_timesteps([4, 3, 2, 1])
    assert ext.timesteps == (4, 3, 2, 1)
    ext.set_timesteps([9])
    assert ext.timesteps == (9,)
    sched = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    torch.testing.assert_close(sd_alphas_cumprod(), sched.alphas_cumprod, atol=1e-7, rtol=0)
    short = MultiTimestepFeatures(unet, timesteps=(0, 9), scheduler=torch.linspace(0.99, 0.5, 10))
    assert short.num_train_timesteps == 10
    latents, noise = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    # the timestep enters through the schedule: at ᾱ = 1 the U-Net sees the clean latent
    ones = MultiTimestepFeatures(unet, timesteps=(3,), scheduler=torch.ones(10), layers=["down_blocks.0"])
    got = ones(latents, noise=noise)["down_blocks.0"][:, 0]
    with torch.no_grad():
        captured = []
        h = unet.down_blocks[0].register_forward_hook(lambda m, a, o: captured.append(o[0]))
        unet(latents, 3, encoder_hidden_states=torch.zeros(1, 77, CROSS_DIM))
        h.remove()
    torch.testing.assert_close(got, captured[0], atol=ATOL, rtol=RTOL)


def test_low_precision_keeps_fp32_schedule():
    ext = MultiTimestepFeatures(tiny_unet(), timesteps=(1, 100), layers=["up_blocks.1"])
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    want = ext(latents, noise=noise)["up_blocks.1"]
    ext.to(torch.bfloat16)
    assert ext.alphas_cumprod.dtype == torch.float32 and ext.conditioning.dtype == torch.bfloat16
    assert ext.unet.conv_in.weight.dtype == torch.bfloat16
    got = ext(latents, noise=noise)["up_blocks.1"]
    assert got.dtype == torch.bfloat16
    # bf16 weights and activations: a few percent of the features' scale
    assert (got.float() - want).norm() / want.norm() < 5e-2
    # numpy and 0-d tensor integers are timesteps too
    np = pytest.importorskip("numpy")
    ext.set_timesteps([np.int64(3), torch.tensor(4)])
    assert ext.timesteps == (3, 4)


def test_validation_errors(unet):
    with pytest.raises(ValueError, match=r"unknown layer.*'up_blocks.7'.*valid names.*up_blocks.1"):
        MultiTimestepFeatures(unet, layers=["up_blocks.7"])
    with pytest.raises(ValueError, match=r"\[0, 1000\).*\[1000\]"):
        MultiTimestepFeatures(unet, timesteps=(1, 1000))
    with pytest.raises(ValueError, match=r"\[-1\]"):
        MultiTimestepFeatures(unet, timesteps=(-1,))
    with pytest.raises(ValueError, match="empty"):
        MultiTimestepFeatures(unet, timesteps=())
    with pytest.raises(TypeError, match="ints"):
        MultiTimestepFeatures(unet, timesteps=(1.5, 2))
    with pytest.raises(TypeError, match="ints"):
        MultiTimestepFeatures(unet, timesteps=(True, 2))
    with pytest.raises(TypeError, match="integer tensor"):
        MultiTimestepFeatures(unet, timesteps=torch.tensor([1.0]))
    with pytest.raises(ValueError, match=r"conditioning.*\(1, n, 32\)"):
        MultiTimestepFeatures(unet, conditioning=torch.zeros(1, 77, 16))
    with pytest.raises(ValueError, match="noise must be one of"):
        MultiTimestepFeatures(unet, noise="fresh")
    with pytest.raises(ValueError, match="alphas_cumprod"):
        MultiTimestepFeatures(unet, scheduler=torch.zeros(3, 3))
    ext = MultiTimestepFeatures(unet, timesteps=(1, 2))
    with pytest.raises(ValueError, match=r"latents must be \(B, 4, h, w\)"):
        ext(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"noise must be \(1, 4, 8, 8\)"):
        ext(torch.randn(1, 4, 8, 8), noise=torch.randn(3, 1, 4, 8, 8))
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        ext(torch.randn(1, 4, 8, 8), timesteps=[5000])
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        ext.set_timesteps([1, 1000])
    odd = diffusers.UNet2DConditionModel(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4,
                                         down_block_types=("DownBlock2D", "DownBlock2D"),
                                         up_block_types=("UpBlock2D", "UpBlock2D"),
                                         cross_attention_dim=8, attention_head_dim=2, class_embed_type="timestep")
    with pytest.raises(ValueError, match="class embeddings"):
        MultiTimestepFeatures(odd)


# ----------------------------------------------------------------------------- cache
class CountingRows:
    """Counts U-Net calls and the rows each saw, through a hook on conv_in."""

    def __init__(self, unet):
        self.rows: list[int] = []
        self.handle = unet.conv_in.register_forward_hook(lambda m, a, o: self.rows.append(a[0].shape[0]))


def test_cache_runs_unet_only_for_new_timesteps(unet):
    latents = torch.randn(2, 4, 8, 8)
    ext = MultiTimestepFeatures(unet, timesteps=(1, 100, 200, 300))
    cache = TimestepFeatureCache(ext, latents, seed=7)
    counter = CountingRows(unet)
    try:
        first = cache([1, 100, 200, 300])
        assert cache.unet_calls == 1 and counter.rows == [2 * 4]
        second = cache([200, 555, 1, 777])
        assert cache.unet_calls == 2 and counter.rows == [8, 2 * 2]  # only 555 and 777 ran
        third = cache([777, 100])
        assert cache.unet_calls == 2 and counter.rows == [8, 4]  # all cached: no U-Net call
    finally:
        counter.handle.remove()
    assert cache.cached_timesteps() == {1, 100, 200, 300, 555, 777}
    # values equal the uncached path with the same ε (drawn from the seed)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(cache.noise, noise, atol=0, rtol=0)
    for got, ts in ((first, [1, 100, 200, 300]), (second, [200, 555, 1, 777]), (third, [777, 100])):
        assert_features_close(got, ext.features(latents, ts, noise=noise))
    assert second["up_blocks.1"].shape == (2, 4, 32, 8, 8)
    cache.clear()
    assert cache.cached_timesteps() == set() and len(cache) == 0


def test_cache_keyed_by_batch(unet):
    vae = tiny_vae()
    ext = MultiTimestepFeatures(unet, vae=vae, timesteps=(1, 2), layers=["up_blocks.1"])
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    cache = TimestepFeatureCache(ext, images)
    a = cache([10, 20])
    assert cache.encode_calls == 1 and cache.unet_calls == 1
    cache([10], images=images.clone())  # same values: same fingerprint, still cached
    assert cache.encode_calls == 1 and cache.unet_calls == 1
    other = images.flip(0)
    b = cache([10, 20], images=other)  # new batch: entries dropped, re-encoded
    assert cache.encode_calls == 2 and cache.unet_calls == 2 and cache.cached_timesteps() == {10, 20}
    assert (b["up_blocks.1"] - a["up_blocks.1"]).abs().max() > 1e-4
    assert batch_fingerprint(images) != batch_fingerprint(other)
    # an explicit key wins over the fingerprint
    cache.set_images(images, key="episode-1")
    assert cache.encode_calls == 3 and cache.key == "episode-1"
    cache([10])
    cache([10], images=other, key="episode-1")
    assert cache.unet_calls == 3 and cache.encode_calls == 3


def test_cache_lru_bound(unet):
    ext = MultiTimestepFeatures(unet, timesteps=(1,), layers=["down_blocks.0"])
    cache = TimestepFeatureCache(ext, torch.randn(1, 4, 8, 8), max_entries=3)
    cache([1, 2, 3])
    cache([1])  # 1 becomes most recent
    cache([4])  # evicts 2, the least recently used
    assert cache.cached_timesteps() == {1, 3, 4}
    out = cache([5, 6, 7, 8])  # more than the bound in one call: all returned, then trimmed
    assert out["down_blocks.0"].shape[1] == 4 and cache.cached_timesteps() == {6, 7, 8}
    with pytest.raises(ValueError, match="max_entries"):
        TimestepFeatureCache(ext, torch.randn(1, 4, 8, 8), max_entries=0)
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        cache([1, 2000])


# ----------------------------------------------------------------------------- torch.compile
def test_compile_fullgraph_no_graph_break():
    unet = tiny_unet()
    ext = MultiTimestepFeatures(unet, timesteps=(1, 100, 200, 300))
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    want = ext(latents, noise=noise)
    torch._dynamo.reset()
    # fullgraph=True raises on any graph break; the "eager" backend (Dynamo's
    # tracing without Inductor's code generation) keeps the test quick.
    compiled = torch.compile(ext, fullgraph=True, backend="eager")
    assert_features_close(compiled(latents, noise=noise), want)
    # new timesteps of the same k: an in-place buffer update, same graph, new values
    ext.set_timesteps([5, 6, 7, 8])
    assert_features_close(compiled(latents, noise=noise), ext(latents, noise=noise))
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- GPU (bf16, CUDA graphs)
@pytest.mark.gpu
def test_gpu_bf16_equals_sequential_passes():
    device = torch.device("cuda")
    unet = tiny_unet().to(device, torch.bfloat16)
    latents, noise = torch.randn(3, 4, 16, 16, device=device), torch.randn(3, 4, 16, 16, device=device)
    ext = MultiTimestepFeatures(unet, timesteps=(1, 100, 200, 300), channels_last=True).to(device)
    got = ext(latents, noise=noise)
    # the same k passes in fp32: bf16 error of the batched pass stays within 2x that of the sequential bf16 passes
    fp32 = sequential_features(tiny_unet().to(device), latents, ext.timesteps, noise, ext.layers,
                               cond=torch.zeros(1, 77, CROSS_DIM, device=device))
    seq_bf16 = {}
    for _i, t in enumerate(ext.timesteps):
        one = ext(latents, timesteps=[t], noise=noise)
        for name in ext.layers:
            seq_bf16.setdefault(name, []).append(one[name])
    for name in ext.layers:
        ref_err = (torch.cat(seq_bf16[name], dim=1).float() - fp32[name]).abs().max()
        err = (got[name].float() - fp32[name]).abs().max()
        assert err <= 2 * ref_err + 1e-3, name


@pytest.mark.gpu
def test_gpu_cuda_graph_replay_matches_eager():
    device = torch.device("cuda")
    ext = MultiTimestepFeatures(tiny_unet().to(device), timesteps=(1, 100, 200, 300)).to(device)
    latents, noise = torch.randn(2, 4, 16, 16, device=device), torch.randn(2, 4, 16, 16, device=device)
    want = ext(latents, noise=noise)
    torch._dynamo.reset()
    graphed = torch.compile(ext, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # warm-up, capture, replay
        torch.compiler.cudagraph_mark_step_begin()
        got = {k: v.clone() for k, v in graphed(latents, noise=noise).items()}
    for name in ext.layers:
        torch.testing.assert_close(got[name], want[name], atol=1e-3, rtol=1e-3)
    torch._dynamo.reset()
