"""What a user of each paper's code runs without fastdense: per-task Python loops.

The demo, the benchmarks and the tests measure the fused ops against these.
Each is plain PyTorch laid out like the code it stands for (MTLoRA's
``MTLoRALinear``, TADFormer's TA-module with its ``DTF`` class, TDSS's
equations), with one leaf tensor per task where that code holds one module
per task, so that eager autograd does the work it does there.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------- MTLoRA
def mtlora_loop(x, weight, bias, a_list, b_list, scales):
    """Multi-task LoRA as MTLoRA's code computes it: one base linear, then a
    Python loop of per-adapter ``x Aᵀ Bᵀ s`` GEMMs added to it.

    ``a_list[0]``/``b_list[0]`` are the shared adapter, the rest one per task.
    Returns ``(shared_out, {task_index: task_out})`` like ``MTLoRALinear``.
    """
    pretrained = F.linear(x, weight, bias)
    shared = pretrained + (x @ a_list[0].t() @ b_list[0].t()) * scales[0]
    tasks = {}
    for t in range(1, len(a_list)):
        tasks[t] = pretrained + (x @ a_list[t].t() @ b_list[t].t()) * scales[t]
    return shared, tasks


def mtlora_inputs(randn, *, batch: int, tokens: int, in_features: int, out_features: int, ranks, bias_std: float):
    """Inputs of one multi-task LoRA layer as the demo and the benchmarks draw them.

    ``randn(*size, std=1.0)`` draws (it fixes device, dtype and generator).
    Returns x, W0, b, the stacked A (sum(ranks), K) and B (N, sum(ranks)), and
    ``grad``, one output gradient per adapter. B is random rather than LoRA's
    zero init: with B = 0 the adapter paths contribute nothing, so a wrong
    kernel could pass a check and a timing could gain from zeros.
    """
    k, n, r = in_features, out_features, sum(ranks)
    return {
        "x": randn(batch, tokens, k),
        "weight": randn(n, k, std=k ** -0.5),
        "bias": randn(n, std=bias_std),
        "lora_a": randn(r, k, std=k ** -0.5),
        "lora_b": randn(n, r, std=r ** -0.5),
        "grad": randn(len(ranks), batch, tokens, n),
    }


# ----------------------------------------------------------------------------- TADFormer
def _filter_norm(weight, std, mean, r):
    """TADFormer's FilterNorm('channel', running_std=True, running_mean=True)."""
    b = weight.shape[0]
    x = weight.reshape(b, r, -1)
    x = x - x.mean(dim=2).reshape(b, r, 1)
    x = x / (x.std(dim=2).reshape(b, r, 1) + 1e-10)
    return x.reshape(b, -1) * std[None, :] + mean[None, :]


def _dtf(x, phi_weight, phi_bias, std, mean, kernel_size):
    """TADFormer's ``DTF.forward`` on (b, r, h, w) maps: the grouped-conv trick."""
    b, c, h, w = x.shape
    weight = F.conv2d(F.adaptive_avg_pool2d(x, 1), phi_weight[:, :, None, None], phi_bias)
    weight = _filter_norm(weight, std, mean, c).reshape(b * c, 1, kernel_size, kernel_size)
    return F.conv2d(x.reshape(1, -1, h, w), weight, padding=kernel_size // 2, groups=b * c).reshape(b, c, h, w)


def tadformer_loop(f, base_out, lora_a, lora_b, phi_weight, phi_bias, fn_std, fn_mean, hw, window,
                   kernel_size: int = 3, scale: float = 1.0):
    """The TA-module for every task as TADFormer's released ``TAModuleLinear`` runs it.

    The task inputs ``f`` (T, B, N, C) are concatenated and down-projected in
    one GEMM; then a Python loop over the tasks: NCHW permute, (for a windowed
    layer, Swin's window_partition, so the windows become samples) the Dynamic
    Task Filter, permute back; the filtered maps are concatenated, up-projected
    in one GEMM and added to each task's frozen output ``base_out`` (T, B, N, C_out).
    Returns one (B, N, C_out) output per task.
    """
    tasks, b, n, c = f.shape
    h_, w_ = hw
    concat = torch.cat(list(f.unbind(0)), dim=1) @ lora_a.t()  # (B, T·N, r)
    parts = concat.split(n, dim=1)
    filtered = []
    for t in range(tasks):
        x = parts[t].reshape(b, h_, w_, -1).permute(0, 3, 1, 2)
        r = x.shape[1]
        if window:
            x = x.reshape(b, r, h_ // window, window, w_ // window, window).permute(0, 2, 4, 1, 3, 5)
            x = x.reshape(-1, r, window, window)
        x = _dtf(x, phi_weight, phi_bias, fn_std, fn_mean, kernel_size)
        if window:
            x = x.reshape(b, h_ // window, w_ // window, r, window, window).permute(0, 3, 1, 4, 2, 5)
            x = x.reshape(b, r, h_, w_)
        filtered.append(x.permute(0, 2, 3, 1).reshape(b, n, r))
    up = torch.cat(filtered, dim=1) @ lora_b.t() * scale
    return [base_out[t] + up[:, t * n:(t + 1) * n] for t in range(tasks)]


# ----------------------------------------------------------------------------- TDSS
def _tdsa_task(h, skills, w_up, w_gamma_t, w_beta_t):
    """One task's branch of TDSA: skill gates, the gated transform, the shared up-projection."""
    gamma = torch.softmax(h @ w_gamma_t, dim=-1) @ skills  # γ_t = softmax(h W_γ^t) S
    beta = torch.softmax(h @ w_beta_t, dim=-1) @ skills
    return F.gelu(gamma * h + beta) @ w_up  # x^t = GELU(γ_t ⊙ h + β_t) W_u


def tdss_loop(x, w_down, w_up, skills, w_gamma, w_beta):
    """TDSS's Task-Dynamic Skill Adapter for every task (Eq. 3–7) as eager code runs it:
    the shared down-projection ``h = x W_d`` once, then one branch per task.

    TDSS has released no code; this follows the paper's equations in the order
    it states them. ``x`` (..., C), ``w_gamma``/``w_beta`` (T, R, M). Returns
    one (..., C) output per task.
    """
    h = x @ w_down
    return [_tdsa_task(h, skills, w_up, w_gamma[t], w_beta[t]) for t in range(w_gamma.shape[0])]
