"""The timestep paper's few-shot learner: Visual Token Matching on Stable Diffusion
features at k timesteps, with Timestep Feature Consolidation (TFC) and LoRA.

Paper: the timestep paper §3 (docs/papers.md, 'Timestep selection and
consolidation'); base architecture: VTM (Kim et al., ICLR 2023). Every choice
the paper leaves open is in docs/paper-decisions.md, sections 'Token matcher
architecture', 'TFC form', 'TFC for query images', 'U-Net LoRA placement',
'Token matcher training stages', 'Extractor latents and noise' and
'U-Net conditioning'.

VTM predicts the label tokens of a query image as an attention-weighted mix of
the support images' label tokens, level by level (Eq. 1)::

    g(y_j^q) = Σ_{k ≤ M×N} σ(f(x_j^q), f(x_k^s)) g(y_k^s)                     (1)

Here f is the frozen Stable Diffusion U-Net, fed the image latent noised at k
timesteps in ONE batched pass (:class:`fastdense.diffusion.MultiTimestepFeatures`);
the outputs of its decoder blocks go through small conv projections to the
token grid of each level. A support token then has k features, one per
timestep, and TFC (Eq. 3) merges them into the key of Eq. 1 with the support
*label* token as the attention query::

    k' = Softmax(g(y^s) w_Q (f(x^s) w_K)ᵀ / √d) · f(x^s) w_V = O_TS · f(x^s) w_V   (3)

The query image has no label, so its k features are merged with the timestep
weights O_TS the support found (averaged over the support tokens), through the
same w_V (and output projection), which keeps the query of Eq. 1 in the space
of its keys. g is a ViT over one label channel and h ≈ g⁻¹ a DPT decoder, both
trained from scratch; σ is VTM's multi-head cross attention. Each label
channel is its own matching problem (VTM's T axis), so any channel count works.

Trainable sets (:meth:`TTSTokenMatcher.mark_trainable`):

* ``"meta"`` (episodic meta-training): everything built here — projections,
  label encoder and decoder, TFC and matching weights, the task biases. The
  U-Net and VAE stay frozen and the LoRA adapters stay at B = 0.
* ``"adapt"`` (few-shot fine-tuning, :meth:`adaptable_parameters`): the LoRA
  adapters on query and value of the U-Net's self-attention (r = 2, α = 4),
  of TFC and of the matching module (r = 8, α = 16), dropout 0.2 (Eq. 4), and
  the task's own biases (VTM's bias tuning). Nothing else moves.

The U-Net attention adapters are :class:`fastdense.nn.LoRALinear` layers
injected in place (:func:`fastdense.nn.inject_lora`), so fine-tuning runs the
fused LoRA op inside the U-Net; the reference path of the whole model is
``with fastdense.ops.backend("torch")`` plus ``feature_pass="per_timestep"``
(one U-Net pass per timestep, the way the paper's Alg. 1 is written).

Images go in as (B, 3, H, W) in [0, 1] (mapped to the VAE's [−1, 1] here) and
labels normalised to [0, 1] by :meth:`TTSTokenMatcher.normalize_label` (VTM's
convention: one sigmoid output per channel). Weights come from local folders
only (:func:`build_unet_vae`); tests and demos use :func:`tiny_unet_vae`.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastdense.diffusion.multi_timestep import DEFAULT_TIMESTEPS, MultiTimestepFeatures, TimestepFeatureCache
from fastdense.models._tasks import validate_tasks
from fastdense.models.registry import register_model
from fastdense.models.sd_weights import (TINY_UNET_CONFIG, TINY_VAE_CONFIG, StableDiffusionParts,  # noqa: F401
                                         build_unet_vae, tiny_unet_vae)
from fastdense.models.token_matcher_blocks import LEVELS, DPTDecoder, LabelEncoder, LevelProjection, MatchingAttention
from fastdense.models.tiny_fewshot import FEWSHOT_TASK_CHANNELS
from fastdense.nn import LoRALinear, TimestepFeatureConsolidation, inject_lora, lora_parameters

__all__ = ["TTSTokenMatcher", "MatchingAttention", "LabelEncoder", "DPTDecoder", "LabelSpace", "LABEL_SPACES",
           "PRESETS", "StableDiffusionParts", "build_unet_vae", "tiny_unet_vae", "tts_token_matcher",
           "derive_seed", "TINY_UNET_CONFIG", "TINY_VAE_CONFIG"]

VTM_MASK_VALUE = -1.0  # VTM writes this into masked support-label pixels
SEGMENTATION_TASKS = frozenset({"segment_semantic", "semseg", "saliency"})


def derive_seed(*key) -> int:
    """A 63-bit seed from a hash of ``key``: streams for different purposes
    (``("forward-noise", seed)``, ``("tts-cache", seed, round)``, ...) are
    unrelated even when the user's seeds are equal small integers."""
    digest = hashlib.sha256(":".join(str(k) for k in key).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# ============================================================================ label spaces
@dataclass(frozen=True)
class LabelSpace:
    """How a dataset's raw labels become VTM's [0, 1] targets (one channel per
    matching problem) and which pixels count. ``channels[task]``: the channels
    after normalisation."""

    name: str
    channels: Mapping[str, int]

    def normalize(self, task: str, label: torch.Tensor) -> torch.Tensor:
        label = label.float() if label.is_floating_point() else label
        if self.name == "unit":
            if task == "segment_semantic":
                # VTM: every class of SEMSEG_CLASSES is a binary task; here they are the channels.
                from fastdense.data.taskonomy import SEMSEG_CLASSES

                ids = label if label.dim() == 3 else label[:, 0]
                classes = torch.tensor(SEMSEG_CLASSES, device=ids.device)
                return (ids.long()[:, None] == classes[None, :, None, None]).float()
            label = label if label.dim() == 4 else label.unsqueeze(1)
            return label.float().clamp(0.0, 1.0)
        label = label if label.dim() == 4 else label.unsqueeze(1)
        label = label.float()
        if task == "normal":
            return ((label + 1.0) * 0.5).clamp(0.0, 1.0)
        if task.startswith("depth"):
            return (label / SYNTHETIC_DEPTH_RANGE).clamp(0.0, 1.0)
        if task == "principal_curvature":
            return (label / SYNTHETIC_CURVATURE_RANGE).clamp(0.0, 1.0)
        return label.clamp(0.0, 1.0)

    def mask(self, task: str, label: torch.Tensor) -> torch.Tensor | None:
        """(N, 1, H, W) bool where the raw label is defined; None where all of it is."""
        if self.name != "synthetic":
            return None
        label = label if label.dim() == 4 else label.unsqueeze(1)
        if task == "normal":
            return label.abs().sum(1, keepdim=True) > 0      # background has normal 0
        if task.startswith("depth"):
            return label > 0                                  # rays into the sky have depth 0
        return None


#: Depths of the synthetic rooms reach about 14 m; curvatures about 5 /m (radius 0.2 m).
SYNTHETIC_DEPTH_RANGE = 16.0
SYNTHETIC_CURVATURE_RANGE = 5.0
_TASKONOMY_CHANNELS = {"segment_semantic": 12, "normal": 3, "depth_euclidean": 1, "depth_zbuffer": 1,
                       "edge_texture": 1, "edge_occlusion": 1, "keypoints2d": 1, "keypoints3d": 1,
                       "reshading": 1, "principal_curvature": 2}
LABEL_SPACES = {
    "unit": LabelSpace("unit", _TASKONOMY_CHANNELS),           # Taskonomy-tiny as fastdense.data decodes it
    "synthetic": LabelSpace("synthetic", FEWSHOT_TASK_CHANNELS),  # fastdense.data.SyntheticScenes
}


# ============================================================================ the model
#: Sizes. "vtm": VTM's widths (ViT-B label encoder, 768-wide tokens, DPT with
#: 256 features, 4 matching heads) at 16 pixels per token on an 8× VAE, which
#: is VTM's 14 × 14 grid at 224 px. "tiny": for tests and demos on 64 px scenes.
PRESETS = {
    "vtm": dict(dim=768, heads=4, tfc_heads=1, label_depth=12, label_heads=12, mlp_ratio=4.0,
                decoder_features=256, token_stride=2),
    "tiny": dict(dim=32, heads=2, tfc_heads=1, label_depth=4, label_heads=2, mlp_ratio=2.0,
                 decoder_features=16, token_stride=1),
}
UNET_LORA_TARGETS = {"self": re.compile(r"(.*\.)?attn1\.to_(q|v)"), "all": re.compile(r"(.*\.)?attn[12]\.to_(q|v)")}
FEATURE_PASSES = ("batched", "per_timestep")


class TTSTokenMatcher(nn.Module):
    """VTM with a Stable Diffusion image encoder at k timesteps, TFC and LoRA.

    ``forward(task, support_image (S,3,H,W), support_label (S,C,H,W) in [0, 1],
    query_image (Q,3,H,W))`` -> (Q, C, H, W) probabilities (``logits=True``:
    before the sigmoid). See the module docstring for the architecture.

    Args:
        unet, vae: a diffusers ``UNet2DConditionModel`` (frozen here) and
            ``AutoencoderKL`` (or None: inputs are latents, labels at latent size).
        tasks: every task the model may see, held-out ones included (each gets
            its bias parameters, zero until trained).
        timesteps: the k initial timesteps (paper: 1, 100, 200, 300).
        levels: four U-Net block names, finest first (DPT's level 1 is the
            finest map); default the decoder's up blocks, last first.
        dim, heads, tfc_heads, label_depth, label_heads, mlp_ratio,
        decoder_features, token_stride: sizes (:data:`PRESETS`); ``token_stride``
            is latent pixels per token.
        label_space: ``"unit"`` (Taskonomy-tiny as decoded by fastdense.data) or
            ``"synthetic"`` (:class:`fastdense.data.SyntheticScenes`).
        unet_lora: ``"self"`` (self-attention query/value, the default) or
            ``"all"`` (cross-attention too) or ``"none"``.
        unet_lora_r/alpha, lora_r/alpha, lora_dropout: Eq. 4 (r = 2, α = 4 in the
            U-Net; r = 8, α = 16 in TFC and matching; dropout 0.2).
        attn_dropout: dropout on the matching attention (VTM: 0.1).
        scheduler, conditioning: passed to :class:`MultiTimestepFeatures` (SD's
            schedule; an all-zero 77-token context unless the empty-prompt embedding is given).
        noise_seed: seeds the model's own noise stream (:meth:`draw_noise`) and,
            through a different hash, the TTS caches' (:meth:`feature_cache`).
        feature_pass: ``"batched"`` (k timesteps in one U-Net call) or
            ``"per_timestep"`` (k calls: the reference path).
        save_backbone: keep the frozen U-Net/VAE weights in ``state_dict()``
            (default False: checkpoints hold what training changes; loading
            fills the backbone keys from the live model).
    """

    def __init__(self, unet: nn.Module, vae: nn.Module | None, tasks: Sequence[str] | None = None,
                 timesteps: Sequence[int] = DEFAULT_TIMESTEPS, *, levels: Sequence[str] | None = None,
                 dim: int = 768, heads: int = 4, tfc_heads: int = 1, label_depth: int = 12, label_heads: int = 12,
                 mlp_ratio: float = 4.0, decoder_features: int = 256, token_stride: int = 2,
                 label_space: str = "unit", unet_lora: str = "self", unet_lora_r: int = 2,
                 unet_lora_alpha: float = 4.0, lora_r: int = 8, lora_alpha: float = 16.0, lora_dropout: float = 0.2,
                 attn_dropout: float = 0.1, scheduler=None, conditioning: torch.Tensor | None = None,
                 noise_seed: int = 0, feature_pass: str = "batched", save_backbone: bool = False,
                 image_size: int | None = None) -> None:
        super().__init__()
        if label_space not in LABEL_SPACES:
            raise ValueError(f"label_space must be one of {sorted(LABEL_SPACES)}, got {label_space!r}")
        if unet_lora not in (*UNET_LORA_TARGETS, "none"):
            raise ValueError(f"unet_lora must be 'self', 'all' or 'none', got {unet_lora!r}")
        if feature_pass not in FEATURE_PASSES:
            raise ValueError(f"feature_pass must be one of {FEATURE_PASSES}, got {feature_pass!r}")
        if isinstance(token_stride, bool) or not isinstance(token_stride, int) or token_stride < 1:
            raise ValueError(f"token_stride must be a positive int, got {token_stride!r}")
        self.label_space = LABEL_SPACES[label_space]
        self.tasks = validate_tasks(list(self.label_space.channels) if tasks is None else tasks,
                                    self.label_space.channels, kind=f"task of label space {label_space!r}")
        self.dim, self.token_stride, self.feature_pass, self.save_backbone = (dim, token_stride, feature_pass,
                                                                              save_backbone)

        unet.requires_grad_(False)
        if vae is not None:
            vae.requires_grad_(False).eval()
        if levels is None:
            levels = [f"up_blocks.{i}" for i in reversed(range(len(unet.up_blocks)))][:LEVELS]
        levels = list(levels)
        if len(levels) != LEVELS:
            raise ValueError(f"levels must name {LEVELS} U-Net blocks (finest first), got {levels}")
        self.levels = tuple(levels)
        self.unet_lora_names: list[str] = []
        if unet_lora != "none":
            # Before the extractor wraps the U-Net, so its forward calls the LoRA layers.
            self.unet_lora_names = inject_lora(unet, UNET_LORA_TARGETS[unet_lora], r=unet_lora_r,
                                               alpha=unet_lora_alpha, dropout=lora_dropout, freeze_base=True)
        self.extractor = MultiTimestepFeatures(unet, vae, timesteps=timesteps, layers=self.levels,
                                               scheduler=scheduler, conditioning=conditioning, keep_grad=True)
        self.vae_factor = 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)
        self.patch = self.vae_factor * token_stride
        widths = _block_widths(unet)
        self.proj = nn.ModuleList(LevelProjection(widths[name], dim) for name in self.levels)
        sample = image_size if image_size is not None else unet.config.sample_size * self.vae_factor
        sample = sample[0] if isinstance(sample, (tuple, list)) else sample
        grid = max(1, int(sample) // self.patch)
        self.label_encoder = LabelEncoder(dim, label_depth, label_heads, mlp_ratio, self.patch, grid)
        self.tfc = nn.ModuleList(TimestepFeatureConsolidation(dim, tfc_heads, lora_r, lora_alpha, lora_dropout,
                                                              out_proj=True) for _ in range(LEVELS))
        self.matching = nn.ModuleList(MatchingAttention(dim, heads, lora_r, lora_alpha, lora_dropout, attn_dropout)
                                      for _ in range(LEVELS))
        self.decoder = DPTDecoder(dim, [max(1, dim // f) for f in (8, 4, 2, 1)], decoder_features)
        # VTM's bias tuning: per task and label channel, a bias on each level's image tokens.
        self.image_bias = nn.ParameterDict({t: nn.Parameter(torch.zeros(self.label_space.channels[t], LEVELS, dim))
                                            for t in self.tasks})
        self._init_weights()
        self.noise_seed = int(noise_seed)
        self._noise_generator = torch.Generator().manual_seed(derive_seed("forward-noise", self.noise_seed))
        self._cache_rounds = 0
        self.register_state_dict_post_hook(TTSTokenMatcher._drop_backbone)
        self.register_load_state_dict_pre_hook(TTSTokenMatcher._fill_backbone)
        self.mark_trainable("meta")

    def _init_weights(self) -> None:
        # timm's ViT initialisation for the label encoder (VTM builds it with timm);
        # the matching layers keep PyTorch's default, as VTM's CrossAttention does.
        for m in self.label_encoder.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ modules and parameters
    @property
    def unet(self) -> nn.Module:
        return self.extractor.unet

    @property
    def vae(self) -> nn.Module | None:
        return self.extractor.vae

    @property
    def timesteps(self) -> list[int]:
        """The current timestep set, in the order of the feature axis."""
        return list(self.extractor.timesteps)

    def set_timesteps(self, timesteps: Sequence[int]) -> None:
        """Replace the set (after a TTS round); same k updates the buffer in place."""
        self.extractor.set_timesteps(list(timesteps))

    def channels(self, task: str) -> int:
        self._check_task(task)
        return self.label_space.channels[task]

    def _check_task(self, task: str) -> None:
        if task not in self.image_bias:
            raise ValueError(f"task {task!r} is not one of this model's tasks {self.tasks}")

    def _head_modules(self) -> list[nn.Module]:
        return [self.proj, self.label_encoder, self.tfc, self.matching, self.decoder]

    def lora_parameters(self) -> list[nn.Parameter]:
        """Every LoRA A/B: U-Net attention, TFC and matching."""
        return list(lora_parameters(self))

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        self._check_task(task)
        return [self.image_bias[task]]

    def adaptable_parameters(self, task: str) -> list[nn.Parameter]:
        """What few-shot fine-tuning on ``task`` updates: every LoRA adapter and the task's biases."""
        return self.lora_parameters() + self.task_parameters(task)

    def meta_parameters(self) -> list[nn.Parameter]:
        """What meta-training updates: the modules built here, without the LoRA adapters."""
        lora = {id(p) for p in self.lora_parameters()}
        params = [p for m in self._head_modules() for p in m.parameters() if id(p) not in lora]
        return params + list(self.image_bias.parameters())

    def mark_trainable(self, stage: str = "meta", task: str | None = None) -> None:
        """requires_grad for a stage: ``"meta"`` (:meth:`meta_parameters`, LoRA
        switched off) or ``"adapt"`` (:meth:`adaptable_parameters` of ``task``,
        LoRA switched on); everything else frozen."""
        if stage == "meta":
            chosen = self.meta_parameters()
        elif stage == "adapt":
            if task is None:
                raise ValueError("mark_trainable('adapt') needs the task whose biases train")
            chosen = self.adaptable_parameters(task)
        else:
            raise ValueError(f"stage must be 'meta' or 'adapt', got {stage!r}")
        ids = {id(p) for p in chosen}
        for p in self.parameters():
            p.requires_grad_(id(p) in ids)
        self.set_lora_active(stage == "adapt")

    def set_lora_active(self, active: bool) -> None:
        """Switch every LoRA adapter on or off. Meta-training leaves them at
        B = 0 (a no-op), so it runs without them: no LoRA dropout draws, no
        extra GEMMs; fine-tuning switches them on."""
        for m in self.modules():
            if isinstance(m, LoRALinear):
                m.set_adapter(m.adapters if active else [])
        self.lora_active = bool(active)

    def parameter_groups(self) -> dict[str, int]:
        """Parameter counts by group (the paper's §3.4 and Table 5 figures are checked against these)."""
        def count(params):
            return sum(p.numel() for p in params)

        unet_lora = [p for n, p in self.unet.named_parameters() if ".lora_" in n]
        tfc_lora = [p for n, p in self.tfc.named_parameters() if ".lora_" in n]
        match_lora = [p for n, p in self.matching.named_parameters() if ".lora_" in n]
        return {
            "unet": count(p for n, p in self.unet.named_parameters() if ".lora_" not in n),
            "vae": count(self.vae.parameters()) if self.vae is not None else 0,
            "unet_lora": count(unet_lora),
            "tfc": count(p for n, p in self.tfc.named_parameters() if ".lora_" not in n),
            "tfc_lora": count(tfc_lora),
            "matching": count(p for n, p in self.matching.named_parameters() if ".lora_" not in n),
            "matching_lora": count(match_lora),
            "projections": count(self.proj.parameters()),
            "label_encoder": count(self.label_encoder.parameters()),
            "decoder": count(self.decoder.parameters()),
            "task_bias_per_channel": LEVELS * self.dim,
        }

    def train(self, mode: bool = True) -> "TTSTokenMatcher":
        super().train(mode)
        if self.vae is not None:
            self.vae.eval()   # frozen; no dropout or norm statistics of its own to train
        return self

    # ------------------------------------------------------------------ checkpoints without the backbone
    def _backbone_keys(self, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
        for root, module in (("extractor.unet.", self.unet), ("extractor.vae.", self.vae)):
            if module is None:
                continue
            for name, t in module.state_dict(keep_vars=True).items():
                if ".lora_" not in name:
                    yield prefix + root + name, t

    @staticmethod
    def _drop_backbone(module, state_dict, prefix, local_metadata) -> None:
        if module.save_backbone:
            return
        for key, _ in module._backbone_keys(prefix):
            state_dict.pop(key, None)

    @staticmethod
    def _fill_backbone(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
        for key, t in module._backbone_keys(prefix):
            if key not in state_dict:
                state_dict[key] = t.detach()

    # ------------------------------------------------------------------ labels
    def normalize_label(self, task: str, label: torch.Tensor) -> torch.Tensor:
        """Raw dataset label (N, C, H, W) or (N, H, W) -> VTM's [0, 1] target (N, C_task, H, W)."""
        self._check_task(task)
        return self.label_space.normalize(task, label)

    def label_mask(self, task: str, label: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """(N, 1, H, W) bool: where the label counts (the dataset's mask, and the label space's)."""
        own = self.label_space.mask(task, label)
        if mask is not None:
            mask = mask.bool() if mask.dim() == 4 else mask.bool().unsqueeze(1)
            own = mask if own is None else own & mask
        return own

    def denormalize(self, task: str, pred: torch.Tensor) -> torch.Tensor:
        return pred

    @staticmethod
    def is_segmentation(task: str) -> bool:
        return task in SEGMENTATION_TASKS

    def loss(self, task: str, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
             reduce_dims: Sequence[int] | None = None) -> torch.Tensor:
        """VTM's hybrid loss: BCE on the logits for segmentation, L1 of the sigmoid
        otherwise; masked elements count as 0 (VTM multiplies by the mask and
        averages over all elements). ``reduce_dims``: keep the other dims (TTS's
        per-subset losses); default a scalar."""
        logits, target = logits.float(), target.float().expand_as(logits)
        if self.is_segmentation(task):
            per = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        else:
            per = (logits.sigmoid() - target).abs()
        if mask is not None:
            per = per * mask.to(per.dtype)
        return per.mean() if reduce_dims is None else per.mean(dim=tuple(reduce_dims))

    # ------------------------------------------------------------------ image features
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Latents z_0 of images in [0, 1] (one VAE call); images are returned
        as they are when the model has no VAE (they are latents then)."""
        if self.vae is None:
            return images
        return self.extractor.encode(images * 2.0 - 1.0)

    def reseed_noise(self, seed: int) -> None:
        """Restart the model's noise stream (``derive_seed("forward-noise", seed)``)."""
        self._noise_generator.manual_seed(derive_seed("forward-noise", int(seed)))

    def draw_noise(self, latents: torch.Tensor) -> torch.Tensor:
        """ε for the k noised copies (one per image, shared by the timesteps),
        from the model's own generator: never the global RNG, never the stream
        the latents came from. Drawn on the CPU, so a seed gives the same ε on
        every device."""
        eps = torch.randn(tuple(latents.shape), generator=self._noise_generator)
        return eps.to(latents.device)

    def image_features(self, latents: torch.Tensor, noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{level: (B, k, C_l, h_l, w_l)}`` of latents z_0 at the current timesteps."""
        if self.feature_pass == "batched":
            return self.extractor.features(latents, noise=noise)
        ts = self.extractor.timestep_tensor
        per_t = [self.extractor.features(latents, ts[i:i + 1], noise=noise) for i in range(ts.shape[0])]
        return {name: torch.cat([f[name] for f in per_t], dim=1) for name in self.levels}

    def feature_cache(self, images: torch.Tensor, *, seed: int | None = None,
                      max_entries: int | None = None) -> TimestepFeatureCache:
        """A :class:`TimestepFeatureCache` of ``images`` (in [0, 1]; latents when
        the model has no VAE) for a TTS round, on the current U-Net (LoRA included).

        Its ε comes from ``derive_seed("tts-cache", noise_seed, n)`` (n counts the
        caches made), a stream apart from the model's forward noise and from
        whatever drew the latents; and latents whose ε would be (anti)parallel to
        them (the same seed used for both: every noised latent a multiple of the
        clean one, every candidate "too similar") are refused. Pass ``seed`` to
        choose the stream.
        """
        if seed is None:
            seed = derive_seed("tts-cache", self.noise_seed, self._cache_rounds)
            self._cache_rounds += 1
        source = images * 2.0 - 1.0 if self.vae is not None else images
        cache = TimestepFeatureCache(self.extractor, source, seed=seed, max_entries=max_entries)
        check_noise_independent(cache.latents, cache.noise)
        return cache

    # ------------------------------------------------------------------ the head (Eqs. 1 and 3)
    def head(self, task: str, support_features: Mapping[str, torch.Tensor], support_label: torch.Tensor,
             query_features: Mapping[str, torch.Tensor], support_mask: torch.Tensor | None = None,
             size=None) -> torch.Tensor:
        """Logits of the query images from U-Net features.

        ``support_features[level]``: (S, k, C_l, h, w), or (P, S, k, C_l, h, w)
        for P episodes that share the support labels (TTS scores its k
        leave-one-out sets this way in one call); ``query_features`` likewise
        with Q images; ``support_label`` (S, C, H, W) in [0, 1]. Returns
        (Q, C, H, W), or (P, Q, C, H, W).
        """
        self._check_task(task)
        first = support_features[self.levels[0]]
        batched = first.dim() == 6
        if not batched:
            support_features = {n: f.unsqueeze(0) for n, f in support_features.items()}
            query_features = {n: f.unsqueeze(0) for n, f in query_features.items()}
        p, s = support_features[self.levels[0]].shape[:2]
        q = query_features[self.levels[0]].shape[1]
        if support_label.dim() != 4:
            raise ValueError(f"support_label must be (S, C, H, W) in [0, 1], got shape {tuple(support_label.shape)}")
        c, height, width = support_label.shape[1], support_label.shape[2], support_label.shape[3]
        if support_label.shape[0] != s:
            raise ValueError(f"{s} support images but {support_label.shape[0]} support labels")
        if c != self.label_space.channels[task]:
            raise ValueError(f"task {task!r} has {self.label_space.channels[task]} label channels, got {c}")
        if height % self.patch or width % self.patch:
            raise ValueError(f"label size {height}x{width} must be a multiple of {self.patch} "
                             f"(VAE factor {self.vae_factor} x token_stride {self.token_stride})")
        grid = (height // self.patch, width // self.patch)
        size = (height, width) if size is None else tuple(size)
        e = p * c

        # g(y^s): every channel of every support label is its own one-channel map.
        dtype = self.label_encoder.patch_embed.weight.dtype
        y = support_label.to(dtype)
        if support_mask is not None:
            y = torch.where(support_mask.expand_as(y), y, torch.full_like(y, VTM_MASK_VALUE))
        label_tokens = self.label_encoder(y.transpose(0, 1).reshape(c * s, 1, height, width))

        bias = self.image_bias[task]                                     # (C, L, d)
        maps = []
        for level, name in enumerate(self.levels):
            fs, fq = support_features[name], query_features[name]
            k = fs.shape[2]
            both = torch.cat([fs, fq], dim=1)                            # (P, S+Q, k, C_l, h, w)
            tok = self.proj[level](both.flatten(0, 2), grid)             # (P·(S+Q)·k, N, d)
            n = tok.shape[1]
            tok = tok.view(p, 1, s + q, k, n, self.dim) + bias[:, level].view(1, c, 1, 1, 1, self.dim)
            sup = tok[:, :, :s].reshape(e * s, k, n, self.dim)
            qry = tok[:, :, s:].reshape(e * q, k, n, self.dim)
            lab = label_tokens[level].view(1, c, s, n, self.dim).expand(p, -1, -1, -1, -1).reshape(e * s, n, self.dim)

            tfc = self.tfc[level]
            key, attn = tfc(lab, sup)                                    # Eq. 3: (E·S, N, d), (E·S, h, N, k)
            # The query's k features, weighted by the support's timestep attention
            # (mean over its tokens), through the same w_V and output projection.
            weights = attn.view(e, s, tfc.heads, n, k).mean(dim=(1, 3))  # (E, h, k)
            value = tfc.v_proj(qry).view(e, q, k, n, tfc.heads, tfc.head_dim)
            query = torch.einsum("ehk,eqknhc->eqnhc", weights, value).reshape(e, q * n, self.dim)
            if tfc.out_proj is not None:
                query = tfc.out_proj(query)
            matched = self.matching[level](query, key.reshape(e, s * n, self.dim),
                                           lab.reshape(e, s * n, self.dim))  # Eq. 1
            maps.append(matched.view(e * q, grid[0], grid[1], self.dim).permute(0, 3, 1, 2))

        logits = self.decoder(maps, size)                                # (E·Q, 1, H, W)
        logits = logits.view(p, c, q, height, width).transpose(1, 2)
        return logits if batched else logits[0]

    # ------------------------------------------------------------------ end to end
    def forward_latents(self, task: str, support_latents: torch.Tensor, support_label: torch.Tensor,
                        query_latents: torch.Tensor, noise: torch.Tensor,
                        support_mask: torch.Tensor | None = None, size=None) -> torch.Tensor:
        """Logits (Q, C, H, W) from latents; ``noise`` (S+Q, c, h, w) for the
        concatenated latents. One U-Net pass over all S+Q images and k
        timesteps. This is the part ``torch.compile(fullgraph=True)`` traces."""
        s = support_latents.shape[0]
        feats = self.image_features(torch.cat([support_latents, query_latents]), noise)
        return self.head(task, {n: f[:s] for n, f in feats.items()}, support_label,
                         {n: f[s:] for n, f in feats.items()}, support_mask, size)

    def forward(self, task: str, support_image: torch.Tensor, support_label: torch.Tensor,
                query_image: torch.Tensor, support_mask: torch.Tensor | None = None, *,
                logits: bool = False) -> torch.Tensor:
        self._check_task(task)
        s = support_image.shape[0]
        latents = self.encode(torch.cat([support_image, query_image]))
        noise = self.draw_noise(latents)
        size = support_label.shape[-2:]
        out = self.forward_latents(task, latents[:s], support_label, latents[s:], noise, support_mask, size)
        return out if logits else out.sigmoid()

    def extra_repr(self) -> str:
        return (f"tasks={self.tasks}, timesteps={self.timesteps}, levels={list(self.levels)}, dim={self.dim}, "
                f"patch={self.patch}, feature_pass={self.feature_pass!r}")


def check_noise_independent(latents: torch.Tensor, noise: torch.Tensor, limit: float = 0.99) -> None:
    """Refuse a feature cache whose ε is (anti)parallel to its latents.

    With ε = c·z_0 every noised copy √ᾱ_t z_0 + √(1 − ᾱ_t) ε is a multiple of
    z_0, all timesteps' features look alike, and TTS rejects every candidate
    as too similar — what happens when the latents and the noise are drawn
    from the same seed (docs/paper-decisions.md, 'Extractor latents and noise').
    """
    a, b = latents.detach().flatten(1).float(), noise.detach().flatten(1).float().to(latents.device)
    cos = F.cosine_similarity(a, b, dim=1, eps=1e-12).abs()
    if bool((cos > limit).any()):
        raise ValueError(
            f"the TTS cache's noise is parallel to the latents (|cos| up to {float(cos.max()):.4f}): latents and "
            "noise were drawn from the same random stream, so every noised latent is a multiple of the clean one "
            "and every timestep looks alike. Draw the latents from another generator than the cache's seed "
            "(TTSTokenMatcher.feature_cache derives its seed from noise_seed through derive_seed).")


def _block_widths(unet: nn.Module) -> dict[str, int]:
    """Output channels of every block of a diffusers U-Net, by the extractor's names."""
    cfg = unet.config
    out = list(cfg.block_out_channels)
    widths = {f"down_blocks.{i}": c for i, c in enumerate(out)}
    widths["mid_block"] = out[-1]
    for i in range(len(unet.up_blocks)):
        widths[f"up_blocks.{i}"] = list(reversed(out))[i]
    return widths


# ============================================================================ constructor
@register_model(kind="fewshot")
def tts_token_matcher(unet: nn.Module | None = None, vae: nn.Module | None = None, tasks: Sequence[str] | None = None,
                      timesteps: Sequence[int] = DEFAULT_TIMESTEPS, *, sd_dir=None, preset: str | None = None,
                      seed: int = 0, **kwargs) -> TTSTokenMatcher:
    """The timestep paper's token matcher (:class:`TTSTokenMatcher`).

    Backbone: ``unet``/``vae`` as given; else ``sd_dir``, a local Stable
    Diffusion folder (:func:`build_unet_vae`, with its schedule and empty-prompt
    conditioning); else a tiny random pair (:func:`tiny_unet_vae` of ``seed``).
    ``preset``: :data:`PRESETS` sizes, default ``"tiny"`` for the tiny random
    backbone and ``"vtm"`` otherwise; ``kwargs`` override single sizes and
    every other :class:`TTSTokenMatcher` argument. The head's initialisation is
    drawn from ``seed`` too (the global RNG is left as it was).
    """
    tiny = unet is None and sd_dir is None
    if unet is None and sd_dir is not None:
        parts = build_unet_vae(sd_dir)
        unet, vae = parts.unet, parts.vae
        kwargs.setdefault("scheduler", parts.alphas_cumprod)
        kwargs.setdefault("conditioning", parts.conditioning)
    elif tiny:
        unet, vae = tiny_unet_vae(seed)
    name = preset or ("tiny" if tiny else "vtm")
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    options = {**PRESETS[name], "noise_seed": seed, **kwargs}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed("tts_token_matcher-init", seed))
        return TTSTokenMatcher(unet, vae, tasks, timesteps, **options)
