"""fastdense.testing: the per-task baselines compute what the references do, and the
tolerance rule and backend forcing behave as the op tests, the demo and the benchmarks rely on."""
from __future__ import annotations

import pytest
import torch

import fastdense
from fastdense.ops import reference
from fastdense.testing import (Expected, assert_within_twice_the_reference_error, forced, max_error, mtlora_loop,
                               tadformer_loop, tdss_loop, tolerance, unavailable)


def _randn(g, *shape, std=1.0):
    return torch.randn(*shape, generator=g, dtype=torch.float64) * std


def test_mtlora_loop_matches_the_reference():
    g = torch.Generator().manual_seed(0)
    ranks, scales = [3, 2, 1], [2.0, 0.5, 4.0]
    x, weight, bias = _randn(g, 2, 5, 6), _randn(g, 7, 6), _randn(g, 7)
    lora_a, lora_b = _randn(g, sum(ranks), 6), _randn(g, 7, sum(ranks))
    shared, tasks = mtlora_loop(x, weight, bias, list(lora_a.split(ranks, 0)), list(lora_b.split(ranks, 1)), scales)
    want = reference.mt_lora_linear(x, weight, bias, lora_a, lora_b, ranks, scales)
    assert list(tasks) == [1, 2]
    torch.testing.assert_close(torch.stack([shared, *tasks.values()]), want)


@pytest.mark.parametrize("window", [0, 2])
def test_tadformer_loop_matches_the_reference(window):
    g = torch.Generator().manual_seed(1)
    t, b, hw, c, c_out, r, k = 3, 2, (4, 6), 5, 7, 2, 3
    f, base_out = _randn(g, t, b, hw[0] * hw[1], c), _randn(g, t, b, hw[0] * hw[1], c_out)
    lora_a, lora_b = _randn(g, r, c), _randn(g, c_out, r)
    phi_weight, phi_bias = _randn(g, r * k * k, r), _randn(g, r * k * k)
    fn_std, fn_mean = _randn(g, r * k * k), _randn(g, r * k * k)
    got = tadformer_loop(f, base_out, lora_a, lora_b, phi_weight, phi_bias, fn_std, fn_mean, hw, window,
                         kernel_size=k, scale=0.5)
    want = reference.ta_lora_dtf(f, base_out, lora_a, lora_b, 0.5, hw, phi_weight, phi_bias, fn_std, fn_mean, window)
    assert len(got) == t
    torch.testing.assert_close(torch.stack(got), want)


def test_tdss_loop_matches_the_reference():
    g = torch.Generator().manual_seed(2)
    c, r, m, t = 8, 3, 5, 4
    args = (_randn(g, 2, 7, c), _randn(g, c, r), _randn(g, r, c), _randn(g, m, r), _randn(g, t, r, m),
            _randn(g, t, r, m))
    got = tdss_loop(*args)
    assert len(got) == t
    torch.testing.assert_close(torch.stack(got), reference.skill_gated_transform(*args))


def test_max_error_and_tolerance():
    a = torch.tensor([1.0, 2.0, 3.0])
    assert max_error(a, a + torch.tensor([0.0, -0.25, 0.125])) == 0.25
    # Twice the reference's error, plus a floor relative to the largest value (1e-5 for float32).
    assert tolerance(1e-3, 10.0, torch.float32) == pytest.approx(2e-3 + 1e-4)
    assert tolerance(0.0, 0.5, torch.bfloat16) == pytest.approx(1e-2)


def test_twice_the_reference_error_rule():
    g = torch.Generator().manual_seed(3)
    x32, w32 = _randn(g, 16, 32).float(), _randn(g, 32, 8).float()
    ref32 = (x32 @ w32, {"w": x32.t() @ torch.ones(16, 8)})
    low = (x32.bfloat16() @ w32.bfloat16(), {"w": x32.t().bfloat16() @ torch.ones(16, 8, dtype=torch.bfloat16)})
    assert_within_twice_the_reference_error(low, ref32, low, floor=0.0)
    off = (low[0] + 0.5, low[1])
    with pytest.raises(AssertionError):
        assert_within_twice_the_reference_error(off, ref32, low, floor=1e-3)


def test_expected_judges_a_wrong_result():
    g = torch.Generator().manual_seed(4)
    inputs = {"q": _randn(g, 1, 2, 9, 4), "k": _randn(g, 1, 2, 9, 4), "m_ca": torch.softmax(_randn(g, 1, 9, 3), -1)}

    def ref(q, k, m_ca):
        return reference.attn_mask_aggregate(q, k, m_ca, 0.5)

    want = Expected.of(ref, inputs, ("q", "k"), torch.float32, "cpu")
    assert set(want.truth) == set(want.tolerance) == {"out", "q", "k"}
    assert want.passes(want.errors(ref, inputs, torch.float32, "cpu"))
    assert not want.passes(want.errors(lambda q, k, m_ca: ref(q, k, m_ca) * 1.001, inputs, torch.float32, "cpu"))


def test_forced_sets_the_backend_and_checks_it_first(monkeypatch):
    monkeypatch.setenv("FASTDENSE_BACKEND", "cpp")
    with forced("torch"):
        assert fastdense.ops.forced_backend() == "torch"
    with forced(None):  # automatic dispatch, whatever the environment says
        assert fastdense.ops.forced_backend() is None
    assert fastdense.ops.forced_backend() == "cpp"
    assert unavailable("q_sample_multi", "nonesuch") == ["q_sample_multi has no nonesuch backend"]
    if torch.cuda.is_available():
        pytest.skip("the refusal below needs a machine without CUDA")
    z0, noise = torch.zeros(2, 3), torch.zeros(1, 2, 3)
    args = (z0, noise, torch.tensor([1]), torch.linspace(0.9, 0.1, 10), False)
    assert unavailable("q_sample_multi", "cuda", *args)
    with pytest.raises(fastdense.ops.BackendNotSupportedError, match="^cuda: "):
        with forced("cuda", "q_sample_multi", *args):
            pass
