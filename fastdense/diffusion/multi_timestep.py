"""Diffusion features at k timesteps from ONE batched U-Net pass, and a
per-timestep feature cache for timestep selection.

Paper: the timestep paper §3 (docs/papers.md, 'Timestep selection and consolidation'; TTS/TFC on Visual Token
Matching). The image encoder there is the Stable Diffusion U-Net fed the
image's latent noised at k timesteps; for each timestep t the latent is

    z_t = √ᾱ_t z_0 + √(1 − ᾱ_t) ε          (DDPM's forward process q(z_t | z_0))

and the features are the outputs of U-Net decoder blocks (§3.1; the
timestep features 𝓕_𝒯 = 𝒟(𝒯) of Alg. 1, lines 2, 9 and 10). The usual way
(ddpm-segmentation's) runs the U-Net once per timestep; here the k noised
copies are one (k·B) batch built by :func:`fastdense.ops.q_sample_multi`, and
the U-Net runs once with a per-row timestep tensor. GroupNorm, attention and
the time embedding act per sample, so this equals the k separate passes.

Decisions the paper leaves open (see also the docstrings):

* Images go through the VAE once per batch, never once per timestep. The
  latent is the *mean* of the VAE posterior by default (deterministic, so the
  features of an image do not change between calls and the cache is exact);
  ``latent="sample"`` draws from it instead. Images are expected in [−1, 1],
  the range the SD VAE was trained on; latents are multiplied by
  ``vae.config.scaling_factor`` (after subtracting ``shift_factor`` when the
  VAE has one).
* Noising runs in fp32 whatever the U-Net dtype: in bf16, ᾱ_1 = 0.99915
  rounds to 1 and the t = 1 copy would get no noise at all. The noised latents
  are cast to the U-Net dtype afterwards (they are tiny next to the U-Net).
* The default conditioning is an all-zero "prompt" of
  :data:`DEFAULT_CONTEXT_LENGTH` = 77 tokens (CLIP's context length, what SD
  sees for a text prompt) of ``cross_attention_dim`` channels. Pass the real
  empty-prompt embedding of your text encoder as a (1, n, D) tensor, or an
  ``nn.Parameter`` for learned tokens.
"""
from __future__ import annotations

import hashlib
import operator
from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn as nn

from fastdense.diffusion._unet_features import block_names, unet_block_features, unsupported_reasons
from fastdense.ops import q_sample_multi

DEFAULT_CONTEXT_LENGTH = 77
DEFAULT_TIMESTEPS = (1, 100, 200, 300)
NOISE_MODES = ("shared", "per_timestep")
LATENT_MODES = ("mean", "sample")


def sd_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                      beta_end: float = 0.012) -> torch.Tensor:
    """ᾱ_t of Stable Diffusion's training schedule ("scaled_linear" betas, 1000
    steps): the schedule diffusers' ``DDPMScheduler`` builds from SD's
    scheduler config. Returns (num_train_timesteps,) float32."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def _alphas_cumprod_from(scheduler) -> torch.Tensor:
    if scheduler is None:
        return sd_alphas_cumprod()
    abar = scheduler if isinstance(scheduler, torch.Tensor) else getattr(scheduler, "alphas_cumprod", None)
    if abar is None:
        raise TypeError(
            "scheduler must be None, a diffusers scheduler (with .alphas_cumprod) or an alphas_cumprod tensor, "
            f"got {type(scheduler).__name__}"
        )
    abar = torch.as_tensor(abar).detach()
    if abar.dim() != 1 or not abar.is_floating_point() or abar.numel() == 0:
        raise ValueError(f"alphas_cumprod must be a non-empty 1-D float tensor (T_train,), "
                         f"got shape {tuple(abar.shape)} "
                         f"dtype {abar.dtype}")
    if not bool(((abar > 0) & (abar <= 1)).all()):
        raise ValueError("alphas_cumprod values must lie in (0, 1]")
    return abar.to(torch.float32).cpu()


def batch_fingerprint(images: torch.Tensor) -> tuple:
    """A cheap identity of an image batch, used by :class:`TimestepFeatureCache`
    when no ``key`` is given: shape, dtype, the float64 sum of all values and a
    hash of up to 4096 values at evenly spaced positions. Two different batches
    collide only if they agree at every sampled position and in their sum;
    pass an explicit ``key`` (e.g. the episode's image ids) to rule that out."""
    flat = images.detach().reshape(-1)
    n = flat.numel()
    idx = torch.linspace(0, max(n - 1, 0), min(n, 4096), device=flat.device).long()
    sample = flat[idx].double().cpu().numpy()
    total = float(flat.double().sum())
    return (tuple(images.shape), str(images.dtype), total, hashlib.sha1(sample.tobytes()).hexdigest())


class MultiTimestepFeatures(nn.Module):
    """U-Net decoder features of an image (or latent) batch at k timesteps, in one U-Net pass.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (SD 1.x/2.x-style config;
            others are refused with the reasons).
        vae: an ``AutoencoderKL`` or None. With a VAE, :meth:`forward` takes
            images (B, 3, H, W) in [−1, 1]; without, it takes latents (B, C, h, w).
        timesteps: the k timesteps, integers in [0, T_train). The order is kept:
            output index i along dim 1 is ``timesteps[i]``.
        layers: block outputs to return, by name (see :meth:`available_layers`):
            ``"down_blocks.i"``, ``"mid_block"``, ``"up_blocks.i"``. Default:
            every up block (the decoder features of the paper). The U-Net stops
            after the deepest requested block.
        scheduler: None (SD's schedule, :func:`sd_alphas_cumprod`), a diffusers
            scheduler, or an ``alphas_cumprod`` tensor.
        conditioning: None (zeros, (1, 77, cross_attention_dim)), a (1, n, D)
            or (n, D) tensor (e.g. the empty-prompt embedding), or an
            ``nn.Parameter`` of that shape for learned tokens (trained with the
            module). Broadcast over the k·B rows without copies.
        noise: ``"shared"`` (one ε per sample, used at every timestep) or
            ``"per_timestep"`` (an independent ε per timestep).
        latent: ``"mean"`` (default) or ``"sample"`` of the VAE posterior.
        keep_grad: False (default) runs the U-Net under ``torch.no_grad``;
            True records the graph (LoRA fine-tuning of the U-Net). The VAE
            always runs without gradients.
        channels_last: convert the U-Net and its input to channels_last.
        attention: None keeps the U-Net's attention processors (diffusers'
            default is ``AttnProcessor2_0``, i.e. SDPA); ``"sdpa"`` sets
            ``AttnProcessor2_0`` on every attention layer.

    Output of :meth:`forward` / :meth:`features`: ``{layer: (B, k, C_l, h_l, w_l)}``
    (a strided view of the (k·B) batch; call ``.contiguous()`` if needed).

    Compilation: everything runs in this module's forward (no hooks), so
    ``torch.compile(extractor, fullgraph=True)`` traces it whole. For CUDA-graph
    replay at fixed shapes use ``torch.compile(extractor,
    mode="reduce-overhead")`` and clone outputs that must outlive the next call.
    """

    def __init__(
        self,
        unet: nn.Module,
        vae: nn.Module | None = None,
        timesteps: Sequence[int] = DEFAULT_TIMESTEPS,
        layers: Sequence[str] | None = None,
        scheduler=None,
        conditioning: torch.Tensor | None = None,
        noise: str = "shared",
        latent: str = "mean",
        keep_grad: bool = False,
        channels_last: bool = False,
        attention: str | None = None,
    ):
        super().__init__()
        reasons = unsupported_reasons(unet)
        if reasons:
            raise ValueError("unet is not supported: " + "; ".join(reasons))
        if noise not in NOISE_MODES:
            raise ValueError(f"noise must be one of {NOISE_MODES}, got {noise!r}")
        if latent not in LATENT_MODES:
            raise ValueError(f"latent must be one of {LATENT_MODES}, got {latent!r}")
        if attention not in (None, "sdpa"):
            raise ValueError(f"attention must be None or 'sdpa', got {attention!r}")
        self.unet = unet
        self.vae = vae
        self.noise_mode = noise
        self.latent_mode = latent
        self.keep_grad = keep_grad
        self.channels_last = channels_last

        self.register_buffer("alphas_cumprod", _alphas_cumprod_from(scheduler), persistent=False)
        self.register_buffer("timestep_tensor", self._check_timesteps(timesteps))
        self._set_layers(layers)
        self._set_conditioning(conditioning)

        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
        if attention == "sdpa":
            from diffusers.models.attention_processor import AttnProcessor2_0

            self.unet.set_attn_processor(AttnProcessor2_0())

    def _apply(self, fn, recurse=True):
        # ᾱ follows device moves but never dtype casts: in bf16, ᾱ_1 = 0.99915
        # rounds to 1 and √(1 − ᾱ_1) to 0, so extractor.to(torch.bfloat16)
        # must leave the schedule in fp32.
        abar = self._buffers["alphas_cumprod"]
        super()._apply(fn, recurse)
        self._buffers["alphas_cumprod"] = abar.to(self._buffers["alphas_cumprod"].device)
        return self

    # ------------------------------------------------------------------ configuration
    def available_layers(self) -> list[str]:
        """Names accepted by ``layers``, in execution order."""
        return block_names(self.unet)

    @property
    def layers(self) -> tuple[str, ...]:
        return self._layers

    @property
    def timesteps(self) -> tuple[int, ...]:
        """The current timesteps, in the order of the output's dim 1."""
        return tuple(int(t) for t in self.timestep_tensor.tolist())

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    def set_timesteps(self, timesteps: Sequence[int]) -> None:
        """Replace the timesteps (e.g. after a selection step). With the same k
        the buffer is updated in place, so a compiled extractor does not recompile."""
        new = self._check_timesteps(timesteps).to(self.timestep_tensor.device)
        if new.shape == self.timestep_tensor.shape:
            self.timestep_tensor.copy_(new)
        else:
            self.timestep_tensor = new

    def _check_timesteps(self, timesteps) -> torch.Tensor:
        if isinstance(timesteps, torch.Tensor):
            if timesteps.is_floating_point() or timesteps.is_complex() or timesteps.dtype == torch.bool:
                raise TypeError(f"timesteps must be an integer tensor, got dtype {timesteps.dtype}")
            values = timesteps.reshape(-1).tolist()
        else:
            if isinstance(timesteps, (int, str, bytes)):
                raise TypeError(f"timesteps must be a sequence of ints, got {type(timesteps).__name__}")
            values = []
            for t in timesteps:
                try:  # ints, numpy integers and 0-d integer tensors; not floats or bools
                    if isinstance(t, bool):
                        raise TypeError
                    values.append(operator.index(t))
                except TypeError:
                    raise TypeError(f"timesteps must be ints, got {t!r} ({type(t).__name__})") from None
        if not values:
            raise ValueError("timesteps must not be empty")
        t_train = self.num_train_timesteps
        bad = [t for t in values if not 0 <= t < t_train]
        if bad:
            raise ValueError(f"timesteps must lie in [0, {t_train}) (the scheduler's training steps), got {bad}")
        return torch.tensor(values, dtype=torch.long)

    def _set_layers(self, layers) -> None:
        valid = block_names(self.unet)
        if layers is None:
            layers = [n for n in valid if n.startswith("up_blocks.")]
        if isinstance(layers, str):
            layers = [layers]
        layers = list(layers)
        if not layers:
            raise ValueError(f"layers must name at least one block; valid names: {valid}")
        unknown = [n for n in layers if n not in valid]
        if unknown:
            raise ValueError(f"unknown layer name(s) {unknown}; valid names: {valid}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers has duplicates: {layers}")
        self._layers = tuple(layers)
        self._wanted = frozenset(layers)
        self._last = max(layers, key=valid.index)

    def _set_conditioning(self, conditioning) -> None:
        dim = self.unet.config.cross_attention_dim
        if not isinstance(dim, int):
            raise ValueError(f"per-block cross_attention_dim {dim} is not supported")
        if conditioning is None:
            conditioning = torch.zeros(1, DEFAULT_CONTEXT_LENGTH, dim)
        if not isinstance(conditioning, torch.Tensor):
            raise TypeError(f"conditioning must be a tensor (1, n, {dim}) or (n, {dim}), "
                            f"got {type(conditioning).__name__}")
        shape = tuple(conditioning.shape)
        ok = (len(shape) == 3 and shape[0] == 1 or len(shape) == 2) and shape[-1] == dim and shape[-2] > 0
        if not ok or not conditioning.is_floating_point():
            raise ValueError(f"conditioning must be a float tensor (1, n, {dim}) or (n, {dim}) "
                             f"(cross_attention_dim = {dim}), got shape {shape} dtype {conditioning.dtype}")
        if isinstance(conditioning, nn.Parameter):
            self.conditioning = conditioning  # learned tokens: trained with the module
        else:
            self.register_buffer("conditioning", conditioning.detach().clone())

    # ------------------------------------------------------------------ computation
    def _unet_dtype(self) -> torch.dtype:
        # Not ModelMixin.dtype: that walks the parameters, which tracing need not see.
        return self.unet.conv_in.weight.dtype

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Latents z_0 (B, C, h, w), float32, of images (B, 3, H, W) in [−1, 1]:
        one VAE call for the whole batch. Without a VAE the input is returned
        as the latents."""
        if self.vae is None:
            return images
        if images.dim() != 4:
            raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
        vae_dtype = next(self.vae.parameters()).dtype
        dist = self.vae.encode(images.to(vae_dtype)).latent_dist
        z = dist.mean if self.latent_mode == "mean" else dist.sample(generator)
        config = self.vae.config
        shift = getattr(config, "shift_factor", None)
        if shift is not None:
            z = z - shift
        return (z * config.scaling_factor).float()

    def _timesteps_on(self, timesteps, device) -> torch.Tensor:
        if timesteps is None:
            return self.timestep_tensor.to(device)
        if isinstance(timesteps, torch.Tensor) and (torch.compiler.is_compiling() or timesteps.device.type != "cpu"):
            # Checking a device tensor's values would synchronise with the
            # device on every call (and break a compiled graph): trusted.
            return timesteps.to(device=device, dtype=torch.long)
        return self._check_timesteps(timesteps).to(device)

    def draw_noise(self, latents: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """ε for :meth:`features`: (B, C, h, w) when noise is shared, (k, B, C, h, w) per timestep; float32."""
        shape = tuple(latents.shape) if self.noise_mode == "shared" else (k, *latents.shape)
        return torch.randn(shape, generator=generator, device=latents.device, dtype=torch.float32)

    def features(
        self,
        latents: torch.Tensor,
        timesteps: Sequence[int] | torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Features of latents z_0 (B, C, h, w) at ``timesteps`` (default: the
        module's) from one U-Net call. Timesteps given as ints or a CPU tensor
        are range-checked; a CUDA tensor is used as is (checking it would
        synchronise), as is any tensor under ``torch.compile``. ``noise``: (B, C, h, w), shared by the
        timesteps, or (k, B, C, h, w); drawn (see ``noise``) when None."""
        in_channels = self.unet.config.in_channels
        if latents.dim() != 4 or latents.shape[1] != in_channels:
            raise ValueError(f"latents must be (B, {in_channels}, h, w), got shape {tuple(latents.shape)}")
        ts = self._timesteps_on(timesteps, latents.device)
        k, batch = ts.shape[0], latents.shape[0]
        if noise is None:
            noise = self.draw_noise(latents, k, generator)
        elif tuple(noise.shape) not in (tuple(latents.shape), (k, *latents.shape)):
            raise ValueError(f"noise must be {tuple(latents.shape)} (shared) or {(k, *latents.shape)} "
                             f"(per timestep), got {tuple(noise.shape)}")

        # Eq. of §3.1 for all k timesteps at once; rows i·B + b (timestep-major).
        z_t = q_sample_multi(latents.float().contiguous(), noise.float().contiguous(), ts,
                             self.alphas_cumprod, layout="timestep")
        z_t = z_t.to(self._unet_dtype())
        if self.channels_last:
            z_t = z_t.contiguous(memory_format=torch.channels_last)
        row_t = ts[:, None].expand(k, batch).reshape(-1)  # row i·B + b has timestep i
        cond = self.conditioning if self.conditioning.dim() == 3 else self.conditioning.unsqueeze(0)
        cond = cond.to(self._unet_dtype()).expand(k * batch, -1, -1)

        with torch.set_grad_enabled(self.keep_grad and torch.is_grad_enabled()):
            feats = unet_block_features(self.unet, z_t, row_t, cond, self._wanted, self._last)
        return {name: feats[name].unflatten(0, (k, batch)).transpose(0, 1) for name in self._layers}

    def forward(
        self,
        x: torch.Tensor,
        timesteps: Sequence[int] | torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """``{layer: (B, k, C_l, h_l, w_l)}`` for images (with a VAE) or latents (without)."""
        latents = self.encode(x, generator) if self.vae is not None else x
        return self.features(latents, timesteps, noise, generator)


class TimestepFeatureCache:
    """Features of one image batch, cached per timestep.

    ``cache(timesteps)`` returns ``{layer: (B, k', C_l, h_l, w_l)}`` for the
    given timesteps in the given order; the U-Net runs once, batched, on the
    timesteps not cached yet, and not at all when every one is cached. This is
    what lets Task-aware Timestep Selection (Alg. 1) evaluate leave-one-out sets
    and candidates without re-running the U-Net for timesteps it has seen.

    The image batch is encoded (VAE) once, and one ε is drawn from ``seed`` and
    shared by every timestep, so features computed in different calls are
    exactly those one call with all the timesteps would give. Entries belong to
    one image batch, identified by ``key`` (or by :func:`batch_fingerprint`
    when key is None); :meth:`set_images` with another batch (or
    ``cache(ts, images=...)``) drops them. ``max_entries`` bounds the number of
    cached timesteps, evicting the least recently used.

    The returned dict lists the layers in U-Net execution order (``layers``),
    not in the order given to the extractor, so its last key is the deepest
    requested block: the last decoder block with the default layers. That is
    the layer :class:`fastdense.nn.TaskAwareTimestepSelector` compares
    features on by default (it takes the source's last key; paper §3.2, "the
    last block of the U-Net decoder").

    Attributes: ``unet_calls`` (U-Net forward calls made), ``encode_calls``
    (VAE calls made), ``layers`` (the output's keys, in execution order).
    """

    def __init__(self, extractor: MultiTimestepFeatures, images: torch.Tensor, key=None, seed: int = 0,
                 max_entries: int | None = None):
        if not isinstance(extractor, MultiTimestepFeatures):
            raise TypeError(f"extractor must be a MultiTimestepFeatures, got {type(extractor).__name__}")
        if max_entries is not None and (isinstance(max_entries, bool) or not isinstance(max_entries, int)
                                        or max_entries < 1):
            raise ValueError(f"max_entries must be None or a positive int, got {max_entries!r}")
        self.extractor = extractor
        self.seed = seed
        self.max_entries = max_entries
        self.unet_calls = 0
        self.encode_calls = 0
        self._entries: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        execution = extractor.available_layers()
        self.layers: tuple[str, ...] = tuple(sorted(extractor.layers, key=execution.index))
        self._key = None
        self.latents: torch.Tensor | None = None
        self.noise: torch.Tensor | None = None
        self.set_images(images, key)

    @property
    def key(self):
        """The identity of the cached image batch."""
        return self._key

    def set_images(self, images: torch.Tensor, key=None) -> bool:
        """Make ``images`` the cached batch; returns True (and drops every
        entry) when it differs from the current one."""
        new_key = key if key is not None else batch_fingerprint(images)
        if self.latents is not None and new_key == self._key:
            return False
        self.clear()
        self._key = new_key
        self.latents = self.extractor.encode(images).detach()
        if self.extractor.vae is not None:
            self.encode_calls += 1
        # Drawn on the CPU so the same seed gives the same ε on every device.
        generator = torch.Generator().manual_seed(self.seed)
        self.noise = torch.randn(tuple(self.latents.shape), generator=generator).to(self.latents.device)
        return True

    def __call__(self, timesteps: Sequence[int], images: torch.Tensor | None = None, key=None
                 ) -> dict[str, torch.Tensor]:
        if images is not None:
            self.set_images(images, key)
        wanted = self.extractor._check_timesteps(timesteps).tolist()
        missing = list(dict.fromkeys(t for t in wanted if t not in self._entries))
        if missing:
            with torch.no_grad():
                feats = self.extractor.features(self.latents, missing, noise=self.noise)
            self.unet_calls += 1
            for j, t in enumerate(missing):
                # Own storage per entry, so evicting one frees its memory.
                self._entries[t] = {name: f[:, j].clone() for name, f in feats.items()}
        for t in wanted:
            self._entries.move_to_end(t)
        out = {name: torch.stack([self._entries[t][name] for t in wanted], dim=1) for name in self.layers}
        if self.max_entries is not None:
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return out

    def cached_timesteps(self) -> set[int]:
        return set(self._entries)

    def clear(self) -> None:
        """Drop every cached feature (the batch's latents and ε are kept)."""
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, timestep: int) -> bool:
        return timestep in self._entries
