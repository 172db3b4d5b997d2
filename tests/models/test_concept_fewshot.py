"""concept_fewshot (the concept-codebook paper's model) on tiny random networks.

What is checked: the registered constructor and the paper's trainable set
(counts at SD 2.1 sizes on the meta device), frozen networks that get no
gradient and stay bit-identical, the fused path against the materialised
reference (M_label, losses, every trainable gradient), torch.compile with
fullgraph, the buckets and the codebook initialisation, timesteps, and
loading the three networks from local folders.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import fastdense  # noqa: E402
from fastdense.models import create_model, list_models  # noqa: E402
from fastdense.models._concept_backbones import SD2_UNET_CONFIG, load_backbones, tiny_backbones, tiny_clip  # noqa: E402
from fastdense.models._concept_buckets import ClassBuckets, KMeansBuckets, LogBuckets, kmeans  # noqa: E402
from fastdense.models.concept_fewshot import CONCEPT_TASKS, ConceptFewShot, concept_fewshot  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def make(task="depth_zbuffer", num_concepts=6, seed=0, **kw):
    bb = tiny_backbones(seed=seed, width=16)
    return create_model("concept_fewshot", unet=bb.unet, vae=bb.vae, image_encoder=bb.image_encoder, task=task,
                        num_concepts=num_concepts, **kw)


def batch(task="depth_zbuffer", b=2, side=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(b, 3, side, side, generator=g)
    if task == "normal":
        labels = F.normalize(torch.randn(b, 3, side, side, generator=g), dim=1)
    elif task == "saliency":
        labels = (torch.rand(b, 1, side, side, generator=g) > 0.6).float()
    else:
        labels = torch.rand(b, 1, side, side, generator=g) * 2
    return images, labels


def prepared(model, task, b=2, side=32, seed=1):
    images, labels = batch(task, b, side, seed)
    mask = torch.ones(b, 1, side, side, dtype=torch.bool)
    mask[0, 0, :3] = False  # some ignored pixels
    model.fit_buckets(labels, mask)
    g = torch.Generator().manual_seed(seed + 1)
    encoded = model.encode(images)
    t, noise = model.sample_step_inputs(encoded.latents, g)
    return encoded, model.prepare_targets(labels, mask), t, noise


def fine_tune(model, encoded, targets, steps=3, lr=0.1):
    params = model.mark_trainable().trainable_parameters()
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        t, noise = model.sample_step_inputs(encoded.latents, g)
        loss, _, _ = model.loss(encoded, targets, t, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()


# ----------------------------------------------------------------------------- construction, trainable set
def test_registered_with_paper_defaults_per_task():
    assert "concept_fewshot" in list_models()
    depth, normal, edge, sal = (make(t, num_concepts=None) for t in ("depth_zbuffer", "normal", "edge_texture",
                                                                      "saliency"))
    assert (depth.num_concepts, depth.value_dim, depth.bucket_kind) == (40, 1, "log")
    assert (normal.num_concepts, normal.value_dim, normal.bucket_kind) == (40, 3, "kmeans")
    assert (edge.num_concepts, edge.value_dim, edge.bucket_kind) == (20, 1, "log")
    assert (sal.kind, sal.num_concepts, sal.codebook, sal.mixer) == ("segmentation", 2, None, None)
    assert CONCEPT_TASKS["depth"][2] == CONCEPT_TASKS["normals"][2] == 50  # NYUv2
    with pytest.raises(ValueError, match="unknown task"):
        make("semseg_typo")
    with pytest.raises(ValueError, match="log buckets are for 1-D"):
        make("normal", buckets="log")


def test_mark_trainable_is_the_papers_set_and_report_counts():
    model = make("normal", num_concepts=5, codebook_size=4)
    params = model.mark_trainable().trainable_parameters()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"concepts", "codebook", "mixer.weight"}
    assert len(params) == 3
    report = model.trainable_parameter_report()  # fastdense.models.peft.ParameterReport
    cross, proj = model.unet.config.cross_attention_dim, model.image_encoder.config.projection_dim
    groups = {g: n for g, n in report.groups.items() if n}
    assert groups == {"concept_embeddings": 5 * cross, "codebook": 4 * 5 * 3,
                      "codebook_mixer": proj * 4}  # Linear D' -> K, no bias ("of size D' x K")
    assert report.total == 5 * cross + 60 + proj * 4
    assert report.frozen == sum(model.frozen_parameter_counts().values())
    assert model.frozen_parameter_counts()["unet"] == sum(p.numel() for p in model.unet.parameters())
    # The few-shot checkpoint: the three tensors and the buckets.
    model.fit_buckets(F.normalize(torch.randn(1, 3, 8, 8), dim=1))
    state = model.trainable_state_dict()
    assert set(state) == {"concepts", "codebook", "mixer.weight", "buckets"}
    other = make("normal", num_concepts=5, codebook_size=4, seed=7)
    other.mark_trainable().load_trainable_state_dict(state)
    assert torch.equal(other.concepts, model.concepts) and torch.equal(other.codebook, model.codebook)
    assert torch.equal(other.buckets.centers, model.buckets.centers)


def test_trainable_counts_at_stable_diffusion_21_sizes():
    """SD 2.1 (cross-attention 1024) with a ViT-L/14-sized CLIP projection (768), depth: N = 40, K = 10, D = 1."""
    import diffusers

    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**SD2_UNET_CONFIG)
        model = concept_fewshot(unet, _tiny_vae_meta(),
                                tiny_clip(projection_dim=768), task="depth_zbuffer")
    report = model.mark_trainable().trainable_parameter_report()
    assert report.groups["concept_embeddings"] == 40 * 1024
    assert report.groups["codebook"] == 10 * 40 * 1
    assert report.groups["codebook_mixer"] == 768 * 10
    assert report.total == 49_040
    assert model.frozen_parameter_counts()["unet"] == 865_910_724  # SD 2.x's U-Net
    # The paper's layers: 8th-12th and the last three transformer blocks.
    assert [n.rsplit(".transformer_blocks", 1)[0] for n in model.recorder.layers] == [
        "up_blocks.1.attentions.0", "up_blocks.1.attentions.1", "up_blocks.1.attentions.2",
        "up_blocks.2.attentions.0", "up_blocks.2.attentions.1",
        "up_blocks.3.attentions.0", "up_blocks.3.attentions.1", "up_blocks.3.attentions.2"]


def _tiny_vae_meta():
    import diffusers

    return diffusers.AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8)


def test_frozen_networks_get_no_gradient_and_stay_bit_identical():
    model = make("normal")
    encoded, targets, _, _ = prepared(model, "normal")
    frozen = {name: copy.deepcopy(getattr(model, name).state_dict()) for name in ("unet", "vae", "image_encoder")}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n in ("concepts", "codebook",
                                                                                   "mixer.weight")}
    fine_tune(model, encoded, targets, steps=3)
    for name, state in frozen.items():
        net = getattr(model, name)
        assert all(p.grad is None and not p.requires_grad for p in net.parameters()), name
        after = net.state_dict()
        assert all(torch.equal(state[k], after[k]) for k in state), name
        assert not net.training
    for n, p in model.named_parameters():
        if n in before:
            assert p.grad is not None and not torch.equal(p.detach(), before[n]), n


# ----------------------------------------------------------------------------- fidelity
@pytest.mark.parametrize("task", ["normal", "saliency"])
@pytest.mark.parametrize("backend", [None, "torch"])
def test_fused_path_equals_materialised_reference(task, backend):
    """M_label, L, L_cls, L_reg and the gradient of every trainable parameter, fp32."""
    model = make(task, num_concepts=5)
    encoded, targets, t, noise = prepared(model, task)
    params = model.mark_trainable().trainable_parameters()
    results = {}
    for path in ("fused", "reference"):
        model.set_attention(path)
        with (fastdense.ops.backend(backend) if backend and path == "fused" else _nothing()):
            out = model.forward(encoded, t, noise, targets.ids.shape[-2:])
            losses = model.loss(encoded, targets, t, noise)
        grads = torch.autograd.grad(losses[0], params)
        results[path] = (out["label"].detach(), [x.detach() for x in losses], grads)
    (m_f, l_f, g_f), (m_r, l_r, g_r) = results["fused"], results["reference"]
    torch.testing.assert_close(m_f, m_r, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(m_f.sum(1), torch.ones_like(m_f[:, 0]))
    for a, b in zip(l_f, l_r):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for p, a, b in zip(params, g_f, g_r):
        assert a.abs().max() > 0, p.shape
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_compiled_fine_tuning_step_has_no_graph_break():
    """torch.compile(fullgraph=True) of the step's forward and loss (aot_eager: its backward too)."""
    model = make("normal", num_concepts=4)
    encoded, targets, t, noise = prepared(model, "normal")
    params = model.mark_trainable().trainable_parameters()
    eager = model.loss(encoded, targets, t, noise)
    g_eager = torch.autograd.grad(eager[0], params)
    torch._dynamo.reset()
    compiled = torch.compile(model.loss, backend="aot_eager", fullgraph=True)
    out = compiled(encoded, targets, t, noise)  # fullgraph: any graph break raises
    g_comp = torch.autograd.grad(out[0], params)
    for a, b in zip(out, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    # A second step with other timesteps and noise reuses the graph.
    t2, n2 = model.sample_step_inputs(encoded.latents, torch.Generator().manual_seed(9))
    torch.testing.assert_close(compiled(encoded, targets, t2, n2)[0], model.loss(encoded, targets, t2, n2)[0],
                               rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- buckets and codebook
def test_log_buckets_uniform_in_shifted_log_space():
    b = LogBuckets(0.0, 2.0, 8)
    edges = b.edges
    assert edges[0].item() == pytest.approx(0.0, abs=1e-12) and edges[-1].item() == pytest.approx(2.0)
    steps = torch.diff(torch.log(edges - b.lo + b.offset))
    torch.testing.assert_close(steps, torch.full_like(steps, steps[0].item()))
    assert b.offset == pytest.approx(0.25)
    values = torch.tensor([0.0, 1e-4, 0.5, 1.999, 2.0, 5.0, -1.0]).view(1, 1, 1, -1)
    ids = b.assign(values).flatten().tolist()
    assert ids[0] == ids[1] == 0 and ids[3] == ids[4] == ids[5] == 7 and ids[6] == 0
    assert ids[2] == int(torch.searchsorted(edges, torch.tensor(0.5, dtype=torch.float64), right=True)) - 1
    centres = b.centers.flatten().double()
    assert bool(((centres > edges[:-1]) & (centres < edges[1:])).all())
    # Each centre falls in its own bucket.
    assert b.assign(b.centers.view(1, 1, 1, -1)).flatten().tolist() == list(range(8))


def test_log_buckets_fit_on_valid_support_pixels_only():
    labels = torch.tensor([[[[0.5, 3.0], [1.0, 100.0]]]])
    mask = torch.tensor([[[[True, True], [True, False]]]])
    b = LogBuckets.fit(labels, mask, 4)
    assert (b.lo, b.hi) == (0.5, 3.0)


def test_kmeans_buckets_seeded_and_recover_clusters():
    g = torch.Generator().manual_seed(0)
    true = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    points = true.repeat_interleave(50, 0) + 0.01 * torch.randn(150, 3, generator=g)
    c1, c2 = kmeans(points, 3, seed=4), kmeans(points, 3, seed=4)
    assert torch.equal(c1, c2)
    assert torch.cdist(c1.float(), true).min(0).values.max() < 0.01
    labels = points.T.reshape(1, 3, 10, 15)
    b = KMeansBuckets.fit(labels, None, 3, seed=4)
    ids = b.assign(labels).flatten()
    nearest = torch.cdist(points, b.centers).argmin(1)
    assert torch.equal(ids, nearest)


def test_delaunay_soft_targets_are_barycentric():
    b = KMeansBuckets(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), delaunay=True)
    values = torch.tensor([[0.25, 0.25], [0.9, 0.8], [3.0, 3.0]]).T.reshape(1, 2, 1, 3)
    soft = b.soft_assign(values)[0, :, 0]  # (N, 3)
    torch.testing.assert_close(soft.sum(0), torch.ones(3))
    recon = b.centers.T @ soft  # barycentric weights reproduce a value inside the hull
    torch.testing.assert_close(recon[:, :2], values[0, :, 0, :2])
    assert soft[:, 2].tolist() == [0.0, 0.0, 0.0, 1.0]  # outside: one-hot nearest centre


def test_class_buckets_for_segmentation():
    b = ClassBuckets(2)
    assert b.assign(torch.tensor([[[[0.0, 0.7], [1.0, 0.2]]]])).tolist() == [[[0, 1], [1, 0]]]


def test_codebook_starts_at_bucket_values_whatever_the_image():
    model = make("depth_zbuffer", num_concepts=6, codebook_size=10)
    encoded, targets, t, noise = prepared(model, "depth_zbuffer")
    centres = model.buckets.centers
    assert torch.equal(model.codebook.detach(), centres.unsqueeze(0).expand(10, -1, -1))
    out = model.forward(encoded, t, noise, (32, 32))
    expected = torch.einsum("bnhw,nd->bdhw", out["label"], centres)  # M_value = M_label C
    torch.testing.assert_close(out["value"], expected)
    # A new support set (fit_buckets) restarts the codebook at its own buckets.
    model.fit_buckets(torch.rand(1, 1, 8, 8) + 5)
    assert float(model.codebook.detach().min()) > 5


def test_loss_ignores_masked_pixels():
    model = make("depth_zbuffer", num_concepts=4)
    encoded, targets, t, noise = prepared(model, "depth_zbuffer")
    base = model.loss(encoded, targets, t, noise)
    garbage = targets._replace(values=torch.where(targets.valid.bool().unsqueeze(1), targets.values,
                                                  torch.full_like(targets.values, 1e6)))
    torch.testing.assert_close(model.loss(encoded, garbage, t, noise)[0], base[0])


# ----------------------------------------------------------------------------- timesteps and inference
def test_training_timesteps_in_5_200_and_inference_at_200(monkeypatch):
    model = make("depth_zbuffer", num_concepts=4)
    latents = torch.zeros(4000, 4, 1, 1)
    t, noise = model.sample_step_inputs(latents, torch.Generator().manual_seed(0))
    assert int(t.min()) == 5 and int(t.max()) == 200 and noise.shape == latents.shape
    seen = []
    real = model.unet.forward

    def spy(sample, timestep, *args, **kwargs):
        seen.append(timestep.clone())
        return real(sample, timestep, *args, **kwargs)

    monkeypatch.setattr(model.unet, "forward", spy)
    images, labels = batch("depth_zbuffer", 3)
    model.fit_buckets(labels)
    first = model.predict(images, batch_size=2)
    second = model.predict(images, batch_size=2)
    assert torch.equal(first, second)  # the inference noise comes from a fixed seed
    assert all(bool((s == 200).all()) for s in seen) and len(seen) == 4
    assert first.shape == (3, 1, 32, 32)


def test_predict_needs_buckets_and_checks_image_size():
    model = make("depth_zbuffer", num_concepts=4)
    with pytest.raises(RuntimeError, match="fit_buckets"):
        model.prepare_targets(torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="multiples of 4"):
        model.encode(torch.rand(1, 3, 30, 32))


# ----------------------------------------------------------------------------- local weights
def test_loads_local_folders_and_names_what_is_missing(tmp_path):
    bb = tiny_backbones(seed=0, width=16)
    sd, clip = tmp_path / "sd", tmp_path / "clip"
    with pytest.raises(FileNotFoundError, match="Stable Diffusion folder not found") as err:
        load_backbones(sd, clip)
    assert "<sd_dir>/unet/config.json" in str(err.value)
    bb.unet.save_pretrained(sd / "unet")
    with pytest.raises(FileNotFoundError, match=r"VAE folder not found: .*sd/vae"):
        load_backbones(sd, clip)
    bb.vae.save_pretrained(sd / "vae")
    with pytest.raises(FileNotFoundError, match="CLIP image encoder folder not found") as err:
        load_backbones(sd, clip)
    assert "<clip_dir>/config.json" in str(err.value)
    bb.image_encoder.save_pretrained(clip)
    loaded = load_backbones(sd, clip)
    assert loaded.alphas_cumprod is None  # no scheduler folder: SD's schedule
    for name in ("unet", "vae", "image_encoder"):
        a, b = getattr(bb, name).state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.vae.config.scaling_factor == bb.vae.config.scaling_factor
    (clip / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has no weights"):
        load_backbones(sd, clip)


def test_constructor_validates():
    bb = tiny_backbones(seed=0, width=16)
    with pytest.raises(ValueError, match="num_concepts"):
        ConceptFewShot(bb.unet, bb.vae, bb.image_encoder, num_concepts=0)
    with pytest.raises(ValueError, match="timesteps"):
        ConceptFewShot(bb.unet, bb.vae, bb.image_encoder, num_concepts=3, train_timesteps=(5, 2000))
    with pytest.raises(ValueError, match="give num_concepts"):
        concept_fewshot(bb.unet, bb.vae, bb.image_encoder)
