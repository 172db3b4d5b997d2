"""Plain-PyTorch references: the ground truth every kernel is tested against.

These functions read like the papers' equations and are differentiated by
torch autograd in the tests. Do not optimise them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def mt_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    ranks: list[int],
    scales: list[float],
    shared_in_tasks: bool = False,
    x_lora: torch.Tensor | None = None,
    x_tasks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-task LoRA linear (MTLoRA's ``MTLoRALinear``), outputs stacked.

    Adapter 0 is the shared LoRA, adapters 1..T the task LoRAs; adapter ``a``
    owns rows ``ranks[a]`` of ``lora_a`` (r_a x K) and columns of ``lora_b``
    (N x r_a). With base = x W0ᵀ + b and LoRA_a(u) = s_a · u A_aᵀ B_aᵀ
    (LoRA, Eq. 4 of the timestep paper):

        out[0] = base + LoRA_0(x_lora)
        out[t] = base + LoRA_t(x_tasks[t-1] or x_lora)       ('matrix')
        out[t] = base + LoRA_0(x_lora) + LoRA_t(...)         ('matrixv2', shared_in_tasks)

    ``x_lora`` is the (dropped-out) LoRA input; None means ``x``.
    Returns a tensor of shape (1 + T, *x.shape[:-1], N).
    """
    if x_lora is None:
        x_lora = x
    a_blocks = lora_a.split(list(ranks), dim=0)
    b_blocks = lora_b.split(list(ranks), dim=1)

    def lora(a: int, u: torch.Tensor) -> torch.Tensor:
        return scales[a] * (u @ a_blocks[a].t() @ b_blocks[a].t())

    base = F.linear(x, weight, bias)
    shared = lora(0, x_lora)
    outputs = [base + shared]
    for t in range(1, len(ranks)):
        u = x_lora if x_tasks is None else x_tasks[t - 1]
        task_out = base + lora(t, u)
        if shared_in_tasks:
            task_out = task_out + shared
        outputs.append(task_out)
    return torch.stack(outputs)


# ----------------------------------------------------------------------------- attention-mask aggregation
def attn_mask_aggregate(
    q: torch.Tensor,
    k: torch.Tensor,
    m_ca: torch.Tensor,
    scale: float,
    head_reduce: str = "mean",
) -> torch.Tensor:
    """M_attn = M_saᵀ M_ca (concept-codebook paper, §3.3), materialising M_sa.

    q, k: (B, H, L, d); m_ca: (B, L, N) shared by the heads, or (B, H, L, N).
    M_sa,h = softmax_j(q_h k_hᵀ · scale) is (L × L) per head, rows i sum to 1;
    out_h[j, n] = Σ_i M_sa,h[i, j] · m_ca[i, n]. ``head_reduce``: "mean" or
    "sum" over heads -> (B, L, N); "none" -> (B, H, L, N).
    """
    m_sa = torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1)  # (B, H, L, L)
    if m_ca.dim() == 3:
        m_ca = m_ca.unsqueeze(1)  # one map for every head
    m_attn = m_sa.transpose(-1, -2) @ m_ca.to(m_sa.dtype)  # (B, H, L, N)
    if head_reduce == "mean":
        return m_attn.mean(dim=1)
    if head_reduce == "sum":
        return m_attn.sum(dim=1)
    if head_reduce == "none":
        return m_attn
    raise ValueError(f"head_reduce must be 'mean', 'sum' or 'none', got {head_reduce!r}")


# ----------------------------------------------------------------------------- multi-timestep noising
def q_sample_multi(
    z0: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    layout: str = "timestep",
) -> torch.Tensor:
    """k noised copies z_t = √ᾱ_t z0 + √(1 − ᾱ_t) ε of one latent batch (DDPM's q_sample).

    z0: (B, C, h, w); noise: (B, C, h, w) shared by the timesteps, or
    (k, B, C, h, w), one draw per timestep; timesteps: (k,) integer indices
    into alphas_cumprod (T_train,). Returns (k·B, C, h, w): row i·B + b is
    timestep i of sample b ("timestep", the order a per-sample timestep tensor
    ``timesteps.repeat_interleave(B)`` matches) or row b·k + i ("sample").
    """
    # The coefficients in the schedule's precision: in bf16, ᾱ_1 = 0.99915 would
    # round to 1 and the t = 1 copy would get no noise at all.
    abar = alphas_cumprod[timesteps.long()]  # (k,)
    per_step = (-1,) + (1,) * z0.dim()  # broadcast over (B, C, h, w), or any latent shape
    coef_signal = abar.sqrt().to(z0.dtype).view(per_step)
    coef_noise = (1 - abar).sqrt().to(z0.dtype).view(per_step)
    eps = noise if noise.dim() == z0.dim() + 1 else noise.unsqueeze(0)
    z_t = coef_signal * z0.unsqueeze(0) + coef_noise * eps  # (k, B, C, h, w)
    if layout == "sample":
        z_t = z_t.transpose(0, 1)
    elif layout != "timestep":
        raise ValueError(f"layout must be 'timestep' or 'sample', got {layout!r}")
    # k·B rows spelled out: with a zero-size latent, reshape(-1, ...) cannot infer them.
    return z_t.reshape(z_t.shape[0] * z_t.shape[1], *z0.shape[1:])


# ----------------------------------------------------------------------------- TADFormer Dynamic Task Filter
def filter_norm(theta: torch.Tensor, std: torch.Tensor, mean: torch.Tensor | None, eps: float = 1e-10) -> torch.Tensor:
    """DDF's 'channel' FilterNorm: each (sample, channel) filter of k² taps is
    made zero-mean and unit-(unbiased-)std, then scaled by the learnable
    ``std`` and shifted by the learnable ``mean`` (both (r·k²,)).

    theta: (..., r, k²) -> same shape.
    """
    centred = theta - theta.mean(dim=-1, keepdim=True)
    normed = centred / (theta.std(dim=-1, keepdim=True) + eps)
    normed = normed * std.view(theta.shape[-2:])
    if mean is not None:
        normed = normed + mean.view(theta.shape[-2:])
    return normed


def _windows(size: int, window: int) -> list[slice]:
    """Non-overlapping windows along one axis; the last one is clipped to the map."""
    step = window if window > 0 else size
    return [slice(start, min(start + step, size)) for start in range(0, size, step)]


def _depthwise_same(h: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Per-sample, per-channel k×k cross-correlation with zero padding (stride 1).

    h: (S, c, Hh, Ww); theta: (S, c, k, k) -> (S, c, Hh, Ww).
    y[s, c, y, x] = Σ_{a, b} theta[s, c, a, b] · h[s, c, y + a − k//2, x + b − k//2].
    """
    k = theta.shape[-1]
    pad = k // 2
    hp = F.pad(h, (pad, pad, pad, pad))
    rows, cols = h.shape[-2:]
    out = torch.zeros_like(h)
    for a in range(k):
        for b in range(k):
            out = out + theta[..., a, b, None, None] * hp[..., a:a + rows, b:b + cols]
    return out


def dynamic_task_filter(
    h: torch.Tensor,
    hw: tuple[int, int],
    phi_weight: torch.Tensor,
    phi_bias: torch.Tensor | None,
    fn_std: torch.Tensor,
    fn_mean: torch.Tensor | None,
    window: int = 0,
    kernel_size: int = 3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TADFormer's Dynamic Task Filter (Eq. 3): θ = FilterNorm(φ(GAP(h))), out = θ ⊛ h.

    h: (S, N, r) tokens of an H × W map in raster order (N = H·W, S samples);
    φ = 1×1 conv r -> r·k²: phi_weight (r·k², r), phi_bias (r·k²,).
    window = 0: one filter per sample from the GAP of the whole map, the
    depthwise conv zero-padded at the map border. window = w > 0: the map is
    cut into non-overlapping w × w windows (the last row/column of windows
    clipped when H or W is not a multiple of w); each window gets its own
    filter from the GAP of its own tokens and is convolved on its own, zero
    padding at the window border -- Swin's attention-proj layer, where every
    window is a sample.
    Returns (out (S, N, r), theta (S, n_windows, r, k, k)), windows in raster order.
    """
    s, n, r = h.shape
    height, width = hw
    if n != height * width:
        raise ValueError(f"h has {n} tokens but hw = {hw}")
    k = kernel_size
    grid = h.transpose(1, 2).reshape(s, r, height, width)
    out = torch.zeros_like(grid)
    thetas = []
    for rows in _windows(height, window):
        for cols in _windows(width, window):
            region = grid[:, :, rows, cols]
            pooled = region.mean(dim=(-2, -1))  # GAP: (S, r)
            raw = F.linear(pooled, phi_weight, phi_bias).view(s, r, k * k)  # φ
            theta = filter_norm(raw, fn_std, fn_mean).view(s, r, k, k)
            out[:, :, rows, cols] = _depthwise_same(region, theta)
            thetas.append(theta)
    return out.reshape(s, r, n).transpose(1, 2), torch.stack(thetas, dim=1)


def static_task_filter(
    h: torch.Tensor,
    hw: tuple[int, int],
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    window: int = 0,
) -> torch.Tensor:
    """The static per-task depthwise k×k conv of TADFormer's released code
    (``NaiveConvFilter``): the same learned filter for every sample.

    h: (S, N, r); weight (r, k, k); bias (r,) or None; windows as in
    :func:`dynamic_task_filter`. Returns (S, N, r).
    """
    s, n, r = h.shape
    height, width = hw
    grid = h.transpose(1, 2).reshape(s, r, height, width)
    out = torch.zeros_like(grid)
    theta = weight.unsqueeze(0).expand(s, -1, -1, -1)
    for rows in _windows(height, window):
        for cols in _windows(width, window):
            out[:, :, rows, cols] = _depthwise_same(grid[:, :, rows, cols], theta)
    if bias is not None:
        out = out + bias.view(1, r, 1, 1)
    return out.reshape(s, r, n).transpose(1, 2)


def ta_lora_dtf(
    f: torch.Tensor,
    base_out: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    hw: tuple[int, int],
    phi_weight: torch.Tensor,
    phi_bias: torch.Tensor | None,
    fn_std: torch.Tensor,
    fn_mean: torch.Tensor | None,
    window: int = 0,
) -> torch.Tensor:
    """TADFormer's TA-module for all tasks (Eq. 3–4):
    F̃_t = Φ(f_t) + s · (θ_t ⊛ (f_t Aᵀ)) Bᵀ,  θ_t = FilterNorm(φ(GAP(f_t Aᵀ))).

    f: (T, B, N, C) task inputs; base_out: (T, B, N, C_out) = Φ(f_t), the
    frozen layer's output; lora_a (r, C) = W_down; lora_b (C_out, r) = W_up;
    the DTF (φ, FilterNorm) is shared by the tasks. Returns (T, B, N, C_out).
    """
    t, b, n, _ = f.shape
    r = lora_a.shape[0]
    h = f @ lora_a.t()  # (T, B, N, r)
    filtered, _ = dynamic_task_filter(h.reshape(t * b, n, r), hw, phi_weight, phi_bias,
                                      fn_std, fn_mean, window)
    return base_out + scale * (filtered.reshape(t, b, n, r) @ lora_b.t())


# ----------------------------------------------------------------------------- TDSS skill-gated transform
def skill_gated_transform(
    x: torch.Tensor,
    w_down: torch.Tensor,
    w_up: torch.Tensor,
    skills: torch.Tensor,
    w_gamma: torch.Tensor,
    w_beta: torch.Tensor,
) -> torch.Tensor:
    """TDSS's Task-Dynamic Skill Adapter for all tasks (Eq. 3–7):

        h   = x W_d                                  (C -> R, shared)
        γ̂_t = softmax(h W_γ^t),  β̂_t = softmax(h W_β^t)   over the M skills
        γ_t = γ̂_t S,  β_t = β̂_t S                   (S: M × R, shared)
        x^t = GELU(γ_t ⊙ h + β_t) W_u                (R -> C, shared)

    x: (..., C); w_down (C, R); w_up (R, C); skills (M, R);
    w_gamma, w_beta (T, R, M). Returns (T, ..., C). GELU is the exact (erf) one.
    """
    h = x @ w_down
    outputs = []
    for t in range(w_gamma.shape[0]):
        gamma = torch.softmax(h @ w_gamma[t], dim=-1) @ skills
        beta = torch.softmax(h @ w_beta[t], dim=-1) @ skills
        outputs.append(F.gelu(gamma * h + beta) @ w_up)
    return torch.stack(outputs)
