"""The concept-embedding few-shot learner with a value codebook on a frozen Stable Diffusion U-Net.

Paper: the concept-codebook paper (docs/papers.md, 'Concept embeddings and
codebook'; every choice the paper leaves open: docs/paper-decisions.md,
'# The concept-codebook paper'). A dense task becomes per-pixel
classification over N buckets, read from the attention maps of a frozen
U-Net whose text tokens are replaced by N learned concept embeddings:

    z_t    = √ᾱ_t z_0 + √(1 − ᾱ_t) ε,  z_0 = VAE(I)      t ~ U{5..200} in training, t = 200 at inference
    M_attn = M_saᵀ M_ca                                  per recorded layer (§3.3), fused: no L × L matrix
    M_label = norm_N(mean_layers(upsample(M_attn)))      (B, N, H, W)
    F      = softmax(Linear_{D'→K}(CLIP(I)))             (B, K)            (§3.4)
    C'     = Σ_k F_k C_k                                 (B, N, D), C ∈ R^{K×N×D}
    M_value = Σ_n M_label[n] C'[n]                        (B, D, H, W)
    L = CE(M_label, GT_label) + α · L2(M_value, GT_value)                  (Eq. 1, 2)

Segmentation-type tasks output M_label and train with L_cls only (no codebook).
Only the concept embeddings, the codebook and the Linear train
(:meth:`ConceptFewShot.mark_trainable`); the U-Net, VAE and CLIP stay frozen.

Build one with ``create_model("concept_fewshot", unet=..., vae=..., image_encoder=..., task=...)``;
:func:`~fastdense.models._concept_backbones.load_backbones` reads the three
networks from local folders, :func:`tiny_backbones` builds random tiny ones.
The few-shot protocol (fine-tune on N shots, evaluate, repeat over R support
sets) is :mod:`fastdense.engine.fewshot_concept`.
"""
from __future__ import annotations

import math
from typing import Dict, List, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastdense.diffusion.attention_masks import AttentionMaskRecorder
from fastdense.diffusion.multi_timestep import sd_alphas_cumprod
from fastdense.models._concept_backbones import SD2_UNET_CONFIG, Backbones, load_backbones, tiny_backbones
from fastdense.models._concept_buckets import ClassBuckets, KMeansBuckets, LogBuckets, buckets_from_state
from fastdense.models.peft import PEFTModel
from fastdense.models.registry import register_model

# ----------------------------------------------------------------------------- task table
#: task -> (kind, value dimension D, the paper's bucket count N) (§4.1). Taskonomy
#: names (VTM's; the synthetic scenes use the same ones) and NYUD-v2's.
CONCEPT_TASKS: Dict[str, tuple] = {
    "edge_texture": ("regression", 1, 20),
    "edge_occlusion": ("regression", 1, 20),
    "keypoints2d": ("regression", 1, 20),
    "keypoints3d": ("regression", 1, 20),
    "reshading": ("regression", 1, 20),
    "principal_curvature": ("regression", 2, 40),
    "depth_euclidean": ("regression", 1, 40),
    "depth_zbuffer": ("regression", 1, 40),
    "normal": ("regression", 3, 40),
    "segment_semantic": ("segmentation", 0, 2),   # VTM's one-class-at-a-time binary tasks
    "saliency": ("segmentation", 0, 2),           # the synthetic scenes' object mask
    "depth": ("regression", 1, 50),               # NYUD-v2: "For NYUv2, we use 50 buckets"
    "normals": ("regression", 3, 50),
}
KINDS = ("regression", "segmentation")
ATTENTION = ("fused", "reference")
#: The paper's value codebook size (Table 4: "a codebook size of around 10 tends to offer near-optimal performance").
CODEBOOK_SIZE = 10
TRAIN_TIMESTEPS = (5, 200)   # "we randomly select a timestep between 5 and 200"
INFERENCE_TIMESTEP = 200     # "During the inference phase, we consistently set this timestep to 200"
LOG_CLAMP = 1e-8             # docs/paper-decisions.md, 'Label map and classification loss'
# OpenAI CLIP's pixel normalisation (CLIPImageProcessor's image_mean / image_std).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class EncodedImages(NamedTuple):
    """What the frozen encoders make of an image batch; constant while fine-tuning on fixed shots."""

    latents: torch.Tensor   # (B, 4, h, w) float32: VAE posterior mean × scaling factor
    features: torch.Tensor  # (B, D') float32: CLIP image embedding

    def select(self, index) -> "EncodedImages":
        return EncodedImages(self.latents[index], self.features[index])


class Targets(NamedTuple):
    """Training targets of a label batch (from :meth:`ConceptFewShot.prepare_targets`)."""

    ids: torch.Tensor              # (B, H, W) int64 bucket ids (0 where invalid)
    values: torch.Tensor           # (B, D, H, W) float32 (D = 0 for segmentation)
    valid: torch.Tensor            # (B, H, W) float32, 1 where the label counts
    soft: Optional[torch.Tensor]   # (B, N, H, W) soft bucket targets (Delaunay), else None

    def select(self, index) -> "Targets":
        return Targets(self.ids[index], self.values[index], self.valid[index],
                       None if self.soft is None else self.soft[index])


def _task_spec(task: Optional[str]):
    if task is None:
        return None
    if task not in CONCEPT_TASKS:
        raise ValueError(f"unknown task {task!r} for concept_fewshot; known tasks: {', '.join(CONCEPT_TASKS)} "
                         "(or give kind, num_concepts and value_dim)")
    return CONCEPT_TASKS[task]


# ----------------------------------------------------------------------------- the model
class ConceptFewShot(PEFTModel, nn.Module):
    """N concept embeddings + a K × N × D value codebook on a frozen SD U-Net, VAE and CLIP encoder.

    The trainable set and its checkpoints follow :class:`~fastdense.models.peft.PEFTModel`:
    :meth:`mark_trainable` (the paper's set: ``concepts``, ``codebook``, ``mixer.weight``),
    ``trainable_parameter_report()`` (groups ``concept_embeddings``, ``codebook``,
    ``codebook_mixer``), ``trainable_state_dict()`` (plus the fitted buckets).

    Args:
        unet, vae, image_encoder: diffusers ``UNet2DConditionModel`` and
            ``AutoencoderKL``, transformers ``CLIPVisionModelWithProjection``;
            frozen here (requires_grad False, eval mode). The U-Net gets the
            recorder's attention processors on the recorded blocks: one model
            per U-Net at a time (``model.recorder.remove()`` gives it back, as
            the few-shot protocol does before building the next task's model).
        num_concepts: N, the buckets (classes) and concept tokens.
        value_dim: D, channels of the label (0 for segmentation).
        kind: ``"regression"`` (buckets + codebook) or ``"segmentation"`` (M_label is the output).
        buckets: ``"log"`` (1-D), ``"kmeans"`` (D-dim) or ``"classes"``
            (segmentation), fitted on the support labels by :meth:`fit_buckets`;
            or a fitted bucket object (:mod:`fastdense.models._concept_buckets`).
        codebook_size: K (10 in the paper).
        alpha: α of Eq. 2 (docs/paper-decisions.md, 'Regression weight alpha').
        layers: recorded transformer blocks (default: the paper's, see
            :class:`~fastdense.diffusion.AttentionMaskRecorder`).
        attention: ``"fused"`` (``fastdense.ops.attn_mask_aggregate``: never an
            L × L matrix) or ``"reference"`` (softmax(QKᵀ) materialised, then
            M_saᵀ M_ca) — same values; the second is the fidelity and memory baseline.
        train_timesteps: inclusive integer range of the training timestep.
        inference_timestep: the timestep of :meth:`predict`.
        alphas_cumprod: the U-Net's training schedule ᾱ (default SD's).
        concept_init_std: the concept embeddings start as N(0, std²) (the
            paper: "randomly initialize"; 1 is the scale of SD's text-encoder outputs).
        delaunay: soft bucket targets from a triangulation of the k-means
            centres (Wang et al. 2015; off by default, docs/paper-decisions.md, 'Buckets').
        seed: seeds the trainable parameters' initialisation and k-means.
        eval_noise_seed: the noise of :meth:`predict` comes from this seed.
    """

    def __init__(self, unet: nn.Module, vae: nn.Module, image_encoder: nn.Module, *, num_concepts: int,
                 value_dim: int = 1, kind: str = "regression", buckets: Union[str, object, None] = None,
                 codebook_size: int = CODEBOOK_SIZE, alpha: float = 1.0,
                 layers: Union[int, str, Sequence[Union[int, str]], None] = None, attention: str = "fused",
                 train_timesteps: Sequence[int] = TRAIN_TIMESTEPS, inference_timestep: int = INFERENCE_TIMESTEP,
                 alphas_cumprod: Optional[torch.Tensor] = None, concept_init_std: float = 1.0,
                 delaunay: bool = False, seed: int = 0, eval_noise_seed: int = 0) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        least = 2 if kind == "segmentation" else 1
        if not isinstance(num_concepts, int) or num_concepts < least:
            raise ValueError(f"num_concepts must be an int >= {least}, got {num_concepts!r}")
        if kind == "regression" and (not isinstance(value_dim, int) or value_dim < 1):
            raise ValueError(f"value_dim must be an int >= 1 for regression, got {value_dim!r}")
        if not isinstance(codebook_size, int) or codebook_size < 1:
            raise ValueError(f"codebook_size must be an int >= 1, got {codebook_size!r}")
        lo, hi = (int(t) for t in train_timesteps)
        self.unet, self.vae, self.image_encoder = unet, vae, image_encoder
        abar = sd_alphas_cumprod() if alphas_cumprod is None else torch.as_tensor(alphas_cumprod).float()
        if not 0 <= lo <= hi < abar.numel() or not 0 <= int(inference_timestep) < abar.numel():
            raise ValueError(f"timesteps must lie in [0, {abar.numel()}); got train {train_timesteps}, "
                             f"inference {inference_timestep}")
        self.register_buffer("alphas_cumprod", abar.clone(), persistent=False)
        self.kind = kind
        self.num_concepts = num_concepts
        self.value_dim = 0 if kind == "segmentation" else value_dim
        self.codebook_size = codebook_size
        self.alpha = float(alpha)
        self.train_timesteps = (lo, hi)
        self.inference_timestep = int(inference_timestep)
        self.concept_init_std = float(concept_init_std)
        self.delaunay = bool(delaunay)
        self.seed, self.eval_noise_seed = int(seed), int(eval_noise_seed)
        for net in (unet, vae, image_encoder):
            net.requires_grad_(False).eval()

        cross_dim = unet.config.cross_attention_dim
        self.concepts = nn.Parameter(torch.zeros(num_concepts, cross_dim))
        if kind == "regression":
            feature_dim = image_encoder.config.projection_dim
            self.codebook = nn.Parameter(torch.zeros(codebook_size, num_concepts, value_dim))
            # "a learnable linear mapping L of size D' × K": no bias.
            self.mixer = nn.Linear(feature_dim, codebook_size, bias=False)
        else:
            self.codebook, self.mixer = None, None
        self.buckets = None
        self.bucket_kind = self._bucket_kind(buckets)
        if not isinstance(buckets, (str, type(None))):
            self.set_buckets(buckets)
        self.recorder = AttentionMaskRecorder(unet, layers)
        self.attention = None
        self.set_attention(attention)
        self.reset_trainable(self.seed)

    # ------------------------------------------------------------------ configuration
    def _bucket_kind(self, buckets) -> str:
        default = "classes" if self.kind == "segmentation" else ("log" if self.value_dim == 1 else "kmeans")
        if buckets is None:
            return default
        if isinstance(buckets, str):
            if buckets not in ("log", "kmeans", "classes"):
                raise ValueError(f"buckets must be 'log', 'kmeans', 'classes' or a fitted bucket set, got {buckets!r}")
            if (buckets == "classes") != (self.kind == "segmentation"):
                raise ValueError(f"buckets={buckets!r} does not fit kind={self.kind!r}")
            if buckets == "log" and self.value_dim != 1:
                raise ValueError(f"log buckets are for 1-D values; value_dim is {self.value_dim} (use 'kmeans')")
            return buckets
        return buckets.kind

    def set_attention(self, attention: str) -> None:
        """Switch between the fused aggregation and the materialised reference (same values)."""
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
        from fastdense.ops import reference

        self.recorder.aggregate = None if attention == "fused" else reference.attn_mask_aggregate
        self.attention = attention

    def set_buckets(self, buckets) -> None:
        """Use a fitted bucket set; the codebook restarts at its values (every one of the K entries)."""
        if buckets.num != self.num_concepts:
            raise ValueError(f"the bucket set has {buckets.num} buckets, the model {self.num_concepts} concepts")
        if buckets.value_dim != self.value_dim:
            raise ValueError(f"the bucket set has {buckets.value_dim}-D values, the model value_dim={self.value_dim}")
        self.buckets = buckets
        self.bucket_kind = buckets.kind
        self.reset_codebook()

    def fit_buckets(self, labels: torch.Tensor, mask: Optional[torch.Tensor] = None, seed: Optional[int] = None):
        """Fit the buckets on the support labels (B, D, H, W) and restart the codebook from them."""
        labels = _as_4d(labels)
        n = self.num_concepts
        if self.bucket_kind == "log":
            buckets = LogBuckets.fit(labels, mask, n)
        elif self.bucket_kind == "kmeans":
            buckets = KMeansBuckets.fit(labels, mask, n, seed=self.seed if seed is None else seed,
                                        delaunay=self.delaunay)
        else:
            buckets = ClassBuckets(n)
        self.set_buckets(buckets)
        return buckets

    # ------------------------------------------------------------------ parameters (PEFTModel)
    #: parameter name -> report group: the paper's trainable set (§3.5).
    PAPER_TRAINABLE = {"concepts": "concept_embeddings", "codebook": "codebook", "mixer.weight": "codebook_mixer"}

    def is_paper_trainable(self, name: str) -> bool:
        return name in self.PAPER_TRAINABLE

    def parameter_group(self, name: str, module: nn.Module) -> str:
        return self.PAPER_TRAINABLE.get(name) or super().parameter_group(name, module)

    def trainable_parameters(self) -> List[nn.Parameter]:
        """The paper's trainable parameters (what :meth:`mark_trainable` unfreezes), for an optimiser."""
        return [p for n, p in self.named_parameters() if self.is_paper_trainable(n)]

    def frozen_parameter_counts(self) -> Dict[str, int]:
        """Parameters of each frozen network."""
        return {name: sum(p.numel() for p in getattr(self, name).parameters())
                for name in ("unet", "vae", "image_encoder")}

    @torch.no_grad()
    def reset_codebook(self) -> None:
        """Every one of the K entries at the bucket values, so C' = the bucket values whatever F is."""
        if self.codebook is None:
            return
        if self.buckets is None:
            self.codebook.zero_()
            return
        centres = self.buckets.centers.to(self.codebook)
        self.codebook.copy_(centres.unsqueeze(0).expand_as(self.codebook))

    @torch.no_grad()
    def reset_trainable(self, seed: Optional[int] = None) -> None:
        """Fresh concept embeddings N(0, std²) and Linear (nn.Linear's uniform bound), codebook at the buckets."""
        g = torch.Generator().manual_seed(self.seed if seed is None else int(seed))
        concepts = torch.randn(self.concepts.shape, generator=g) * self.concept_init_std
        self.concepts.copy_(concepts.to(self.concepts))
        if self.mixer is not None:
            bound = 1.0 / math.sqrt(self.mixer.in_features)
            w = torch.rand(self.mixer.weight.shape, generator=g) * (2 * bound) - bound
            self.mixer.weight.copy_(w.to(self.mixer.weight))
        self.reset_codebook()

    def trainable_state_dict(self) -> dict:
        """PEFTModel's trainable tensors (of the parameters with requires_grad) plus ``"buckets"``,
        the fitted bucket set as primitives: together the whole few-shot state."""
        state = {k: v.clone() for k, v in super().trainable_state_dict().items()}
        state["buckets"] = None if self.buckets is None else self.buckets.state()
        return state

    def load_trainable_state_dict(self, state_dict, strict: bool = True):
        state = dict(state_dict)
        buckets = state.pop("buckets", None)
        if buckets is not None:
            self.buckets = buckets_from_state(buckets)
            self.bucket_kind = self.buckets.kind
        return super().load_trainable_state_dict(state, strict=strict)

    def train(self, mode: bool = True) -> "ConceptFewShot":
        super().train(mode)
        for net in (self.unet, self.vae, self.image_encoder):
            net.eval()  # frozen networks never switch to training behaviour
        return self

    # ------------------------------------------------------------------ encoders (frozen)
    @property
    def vae_downsample(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def _unet_dtype(self) -> torch.dtype:
        return self.unet.conv_in.weight.dtype

    @torch.no_grad()
    def encode(self, images: torch.Tensor, batch_size: int = 8) -> EncodedImages:
        """Latents (posterior mean × scaling factor) and CLIP embeddings of images (B, 3, H, W) in [0, 1],
        ``batch_size`` images per encoder call."""
        if images.dim() == 4 and images.shape[0] > batch_size:
            parts = [self.encode(images[s:s + batch_size], batch_size) for s in range(0, images.shape[0], batch_size)]
            return EncodedImages(torch.cat([p.latents for p in parts]), torch.cat([p.features for p in parts]))
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) RGB in [0, 1], got shape {tuple(images.shape)}")
        f = self.vae_downsample
        if images.shape[-2] % f or images.shape[-1] % f:
            raise ValueError(f"image height and width must be multiples of {f} (the VAE's downsampling), "
                             f"got {tuple(images.shape[-2:])}")
        vae_dtype = self.vae.encoder.conv_in.weight.dtype
        posterior = self.vae.encode(images.to(vae_dtype) * 2 - 1).latent_dist
        latents = posterior.mean
        shift = getattr(self.vae.config, "shift_factor", None)
        if shift is not None:
            latents = latents - shift
        latents = (latents * self.vae.config.scaling_factor).float()
        features = torch.zeros(images.shape[0], 0, device=images.device)
        if self.mixer is not None:
            features = self.image_embedding(images)
        return EncodedImages(latents, features)

    @torch.no_grad()
    def image_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP's projected image embedding (B, D'): shortest side resized, centre crop, CLIP normalisation."""
        size = self.image_encoder.config.image_size
        h, w = images.shape[-2:]
        scale = size / min(h, w)
        x = images.float()
        if (h, w) != (size, size):
            x = F.interpolate(x, size=(max(size, round(h * scale)), max(size, round(w * scale))), mode="bicubic",
                              align_corners=False, antialias=True)
            top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
            x = x[..., top:top + size, left:left + size]
        mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
        x = ((x.clamp(0, 1) - mean) / std).to(self.image_encoder.dtype)
        return self.image_encoder(pixel_values=x).image_embeds.float()

    # ------------------------------------------------------------------ targets
    @torch.no_grad()
    def prepare_targets(self, labels: torch.Tensor, mask: Optional[torch.Tensor] = None) -> Targets:
        """Bucket ids (and soft targets) of labels (B, D, H, W) or (B, H, W), with a validity mask."""
        if self.buckets is None:
            raise RuntimeError("the model has no buckets yet: call fit_buckets(support_labels) first")
        labels = _as_4d(labels)
        b, _, h, w = labels.shape
        valid = torch.ones(b, h, w, dtype=torch.bool, device=labels.device)
        if mask is not None:
            valid &= (mask.squeeze(1) if mask.dim() == 4 else mask).to(device=labels.device, dtype=torch.bool)
        if self.kind == "regression":
            if labels.shape[1] != self.value_dim:
                raise ValueError(f"labels have {labels.shape[1]} channels, the model value_dim={self.value_dim}")
            valid &= torch.isfinite(labels).all(dim=1)
        ids = self.buckets.assign(labels).to(labels.device)
        ids = torch.where(valid, ids, torch.zeros_like(ids))
        values = torch.nan_to_num(labels.float()) if self.kind == "regression" else labels.new_zeros(b, 0, h, w).float()
        soft = self.buckets.soft_assign(labels) if getattr(self.buckets, "soft", False) else None
        return Targets(ids, values, valid.float(), soft)

    # ------------------------------------------------------------------ forward
    def noised(self, latents: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """z_t = √ᾱ_t z_0 + √(1 − ᾱ_t) ε (DDPM's q_sample) in float32, cast to the U-Net's dtype."""
        abar = self.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        z = abar.sqrt() * latents.float() + (1 - abar).sqrt() * noise.float()
        return z.to(self._unet_dtype())

    def label_map(self, latents: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor,
                  size: Sequence[int]) -> torch.Tensor:
        """M_label (B, N, H, W) float32 for clean latents noised at ``timesteps`` (B,) with ``noise``."""
        b = latents.shape[0]
        context = self.concepts.to(self._unet_dtype()).unsqueeze(0).expand(b, -1, -1)
        self.unet(self.noised(latents, timesteps, noise), timesteps, encoder_hidden_states=context,
                  return_dict=False)
        m_label = self.recorder.label_map(size=(int(size[0]), int(size[1])))
        self.recorder.reset()  # the map holds the graph now; the recorder keeps no reference
        return m_label

    def value_map(self, m_label: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """M_value (B, D, H, W): the expectation of C' = Σ_k F_k C_k under M_label (§3.4)."""
        weights = torch.softmax(self.mixer(features.to(self.mixer.weight.dtype)), dim=-1)    # F (B, K)
        mapping = torch.einsum("bk,knd->bnd", weights, self.codebook)                          # C' (B, N, D)
        return torch.einsum("bnhw,bnd->bdhw", m_label, mapping.to(m_label.dtype))

    def forward(self, encoded: EncodedImages, timesteps: torch.Tensor, noise: torch.Tensor,
                size: Sequence[int]) -> Dict[str, torch.Tensor]:
        """``{"label": M_label (B, N, H, W), "value": M_value (B, D, H, W) (regression only)}``."""
        m_label = self.label_map(encoded.latents, timesteps, noise, size)
        out = {"label": m_label}
        if self.kind == "regression":
            out["value"] = self.value_map(m_label, encoded.features)
        return out

    def loss(self, encoded: EncodedImages, targets: Targets, timesteps: torch.Tensor,
             noise: torch.Tensor) -> tuple:
        """(L, L_cls, L_reg) of Eq. 1–2; means over valid pixels (L_reg also over the D channels)."""
        out = self.forward(encoded, timesteps, noise, targets.ids.shape[-2:])
        log_p = out["label"].clamp_min(LOG_CLAMP).log()
        if targets.soft is not None:
            per_pixel = -(targets.soft * log_p).sum(dim=1)
        else:
            per_pixel = -log_p.gather(1, targets.ids.unsqueeze(1)).squeeze(1)
        count = targets.valid.sum().clamp_min(1.0)
        l_cls = (per_pixel * targets.valid).sum() / count
        if self.kind == "segmentation":
            return l_cls, l_cls, torch.zeros_like(l_cls)
        sq = (out["value"] - targets.values).pow(2) * targets.valid.unsqueeze(1)
        l_reg = sq.sum() / (count * self.value_dim)
        return l_cls + self.alpha * l_reg, l_cls, l_reg

    def sample_step_inputs(self, latents: torch.Tensor, generator: Optional[torch.Generator] = None) -> tuple:
        """A training step's random draws: timesteps (B,) uniform in the training range, noise like the latents."""
        lo, hi = self.train_timesteps
        t = torch.randint(lo, hi + 1, (latents.shape[0],), generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        return t.to(latents.device), noise.to(latents.device)

    @torch.no_grad()
    def predict(self, images: Union[torch.Tensor, EncodedImages], batch_size: int = 8,
                size: Optional[Sequence[int]] = None) -> torch.Tensor:
        """M_value (B, D, H, W) for regression, M_label (B, N, H, W) for segmentation, at t = 200.

        ``size`` defaults to the images' size (latent size × the VAE's downsampling for
        encoded inputs). The noise comes from ``eval_noise_seed``, drawn for the whole
        call at once: the same images in the same call order give the same output.
        """
        encoded = images if isinstance(images, EncodedImages) else self.encode(images)
        latents = encoded.latents
        if size is None:
            size = tuple(s * self.vae_downsample for s in latents.shape[-2:])
        g = torch.Generator().manual_seed(self.eval_noise_seed)
        noise = torch.randn(latents.shape, generator=g).to(latents.device)
        outs = []
        for s in range(0, latents.shape[0], batch_size):
            part = encoded.select(slice(s, s + batch_size))
            t = torch.full((part.latents.shape[0],), self.inference_timestep, dtype=torch.long, device=latents.device)
            out = self.forward(part, t, noise[s:s + batch_size], size)
            outs.append(out["value"] if self.kind == "regression" else out["label"])
        return torch.cat(outs)


def _as_4d(labels: torch.Tensor) -> torch.Tensor:
    return labels.unsqueeze(1) if labels.dim() == 3 else labels


# ----------------------------------------------------------------------------- constructors
@register_model(kind="fewshot")
def concept_fewshot(unet: nn.Module, vae: nn.Module, image_encoder: nn.Module, task: Optional[str] = None,
                    num_concepts: Optional[int] = None, buckets: Union[str, object, None] = None,
                    value_dim: Optional[int] = None, kind: Optional[str] = None, **kwargs) -> ConceptFewShot:
    """The concept-codebook few-shot learner on the given frozen networks.

    ``task`` (a key of :data:`CONCEPT_TASKS`) supplies the paper's defaults:
    kind, value dimension and bucket count (20 / 40 / 50). ``num_concepts``,
    ``value_dim``, ``kind`` override them; ``buckets`` is a kind
    (``"log"``/``"kmeans"``/``"classes"``, fitted later on the support labels
    by :meth:`ConceptFewShot.fit_buckets`) or a fitted bucket set. Other
    keyword arguments go to :class:`ConceptFewShot`.
    """
    spec = _task_spec(task)
    kind = kind or (spec[0] if spec else "regression")
    if value_dim is None:
        value_dim = spec[1] if spec else (0 if kind == "segmentation" else 1)
    if num_concepts is None:
        if buckets is not None and not isinstance(buckets, str):
            num_concepts = buckets.num
        elif spec is not None:
            num_concepts = spec[2]
        else:
            raise ValueError("give num_concepts, a task with a known bucket count, or fitted buckets")
    return ConceptFewShot(unet, vae, image_encoder, num_concepts=num_concepts, value_dim=value_dim, kind=kind,
                          buckets=buckets, **kwargs)


__all__ = ["CONCEPT_TASKS", "Backbones", "ConceptFewShot", "EncodedImages", "SD2_UNET_CONFIG", "Targets",
           "concept_fewshot", "load_backbones", "tiny_backbones"]
