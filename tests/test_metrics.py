"""fastdense.metrics: hand-computed values, ignore labels, streaming, distributed sync, Δm.

Expected numbers in the hand tests were worked out on paper from the
definitions in the docstrings (the comments show the working), never by
running the code under test.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastdense.metrics import (
    PASCAL_LOWER_IS_BETTER,
    PASCAL_SWIN_T_SINGLE_TASK,
    DepthError,
    EdgeODSF,
    MeanIoU,
    NormalsError,
    SaliencyMetrics,
    VTMTaskonomyError,
    count_above,
    delta_m,
    disk_max_filter,
    vtm_taskonomy_error,
)

approx = pytest.approx


# ----------------------------------------------------------------- helpers
def test_count_above_counts_strict_and_inclusive():
    v = torch.tensor([0.1, 0.5, 0.5, 0.9])
    t = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)
    # > 0.2: {0.5, 0.5, 0.9}; > 0.5: {0.9}; > 0.8: {0.9}
    assert count_above(v, t, inclusive=False).tolist() == [[3, 1, 1]]
    # >= 0.5 also takes both 0.5s
    assert count_above(v, t, inclusive=True).tolist() == [[3, 3, 1]]
    g = torch.tensor([0, 1, 0, 1])
    assert count_above(v, t, inclusive=True, groups=g, num_groups=2).tolist() == [[1, 1, 0], [2, 2, 1]]


def test_disk_max_filter_uses_euclidean_disk():
    x = torch.zeros(1, 5, 5)
    x[0, 2, 2] = 1.0
    out = disk_max_filter(x, 1.0, fill=0.0)
    # radius 1: the centre and its 4-neighbours, not the diagonals (distance sqrt 2)
    expect = torch.zeros(1, 5, 5)
    for i, j in [(2, 2), (1, 2), (3, 2), (2, 1), (2, 3)]:
        expect[0, i, j] = 1.0
    assert torch.equal(out, expect)
    out = disk_max_filter(x, 1.5, fill=0.0)  # sqrt 2 <= 1.5: the full 3x3 block
    assert out[0, 1:4, 1:4].eq(1).all() and out.sum() == 9


# ----------------------------------------------------------------- MeanIoU
def _seg_example():
    # valid (target, pred) pairs: (0,0) (0,1) (1,1) (1,1) (2,2); the 255 pixel is ignored
    target = torch.tensor([[[0, 0, 1], [1, 2, 255]]])
    pred = torch.tensor([[[0, 1, 1], [1, 2, 0]]])
    return pred, target


def test_meaniou_hand_values_and_ignore():
    pred, target = _seg_example()
    m = MeanIoU(3)
    m.update(pred, target)
    r = m.compute()
    # class 0: TP 1, FN 1 -> 1/2; class 1: TP 2, FP 1 -> 2/3; class 2: TP 1 -> 1
    assert r["iou"].tolist() == approx([0.5, 2 / 3, 1.0])
    assert r["miou"] == approx((0.5 + 2 / 3 + 1.0) / 3)
    assert r["tp"].tolist() == [1, 2, 1] and r["fp"].tolist() == [0, 1, 0] and r["fn"].tolist() == [1, 0, 0]
    assert r["pixel_acc"] == approx(4 / 5)  # the ignored pixel (predicted 0) counts nowhere


def test_meaniou_absent_class_excluded_or_zero():
    pred, target = _seg_example()
    ex = MeanIoU(4)
    ex.update(pred, target)
    r = ex.compute()
    assert math.isnan(r["iou"][3]) and r["miou"] == approx((0.5 + 2 / 3 + 1.0) / 3)
    zero = MeanIoU(4, absent="zero")
    zero.update(pred, target)
    assert zero.compute()["miou"] == approx((0.5 + 2 / 3 + 1.0 + 0.0) / 4)


def test_meaniou_logits_out_of_range_and_bad_labels():
    pred, target = _seg_example()
    logits = torch.nn.functional.one_hot(pred, 3).permute(0, 3, 1, 2).float()
    m = MeanIoU(3)
    m.update(logits, target)
    assert m.compute()["miou"] == approx((0.5 + 2 / 3 + 1.0) / 3)
    # a prediction of 7 on a class-2 pixel: FN of class 2, FP of nobody -> IoU_2 = 0
    m = MeanIoU(3)
    m.update(torch.tensor([7, 0]), torch.tensor([2, 0]))
    r = m.compute()
    assert r["iou"][2] == 0 and r["iou"][0] == 1 and r["fp"].sum() == 0
    with pytest.raises(ValueError, match="outside"):
        MeanIoU(3).update(torch.tensor([0]), torch.tensor([5]))


# ------------------------------------------------------------ NormalsError
def _normals_example():
    s20, c20 = math.sin(math.radians(20)), math.cos(math.radians(20))
    target = torch.tensor([[0, 0, 1]] * 5 + [[255, 255, 255], [0, 0, 0]], dtype=torch.float32)
    pred = torch.tensor([
        [0, 0, 2],                   # 0 deg (length does not matter)
        [3 * s20, 0, 3 * c20],       # 20 deg
        [1, 0, 1],                   # 45 deg
        [math.sqrt(3), 0, 1],        # 60 deg (tan 60 = sqrt 3)
        [0, 1, 0],                   # 90 deg
        [0, 0, 1],                   # target 255: invalid
        [0, 0, 1],                   # target zero vector: invalid
    ], dtype=torch.float32)
    as_map = lambda v: v.t().reshape(1, 3, 1, 7)  # noqa: E731
    return as_map(pred), as_map(target)


def test_normals_hand_values():
    pred, target = _normals_example()
    m = NormalsError()
    m.update(pred, target)
    r = m.compute()
    # angles {0, 20, 45, 60, 90}
    assert r["count"] == 5
    assert r["mean"] == approx(43.0, abs=1e-4)
    assert r["mtl_rmse"] == r["mean"]
    assert r["rmse_angle"] == approx(math.sqrt((0 + 400 + 2025 + 3600 + 8100) / 5), abs=1e-4)
    assert r["median"] == approx(45.0, abs=0.006)  # 0.01-degree bins: within half a bin
    assert r["within_11.25"] == approx(1 / 5)
    assert r["within_22.5"] == approx(2 / 5)
    assert r["within_30"] == approx(2 / 5)


def test_normals_even_median_mask_and_zero_prediction():
    pred, target = _normals_example()
    mask = torch.tensor([1, 1, 1, 1, 0, 1, 1], dtype=torch.bool).reshape(1, 1, 7)
    m = NormalsError()
    m.update(pred, target, mask=mask)
    r = m.compute()
    # angles {0, 20, 45, 60}: median (20 + 45) / 2, mean 125 / 4
    assert r["count"] == 4 and r["mean"] == approx(31.25, abs=1e-4)
    assert r["median"] == approx(32.5, abs=0.006)
    pred = pred.clone()
    pred[0, :, 0, 0] = 0.0  # no direction: scored 90 deg -> {90, 20, 45, 60, 90}
    m = NormalsError()
    m.update(pred, target)
    assert m.compute()["mean"] == approx(305 / 5, abs=1e-4)


# --------------------------------------------------------------- DepthError
def test_depth_hand_values_mask_and_ignore():
    pred = torch.tensor([[[2.0, 3.0, 9.0], [1.5, 5.0, 7.0]]])
    target = torch.tensor([[[1.0, 3.0, 255.0], [2.0, 0.0, 4.0]]])
    mask = torch.tensor([[[1, 1, 1], [1, 1, 0]]], dtype=torch.bool)
    m = DepthError()
    m.update(pred, target, mask=mask)
    r = m.compute()
    # valid: (2 vs 1), (3 vs 3), (1.5 vs 2); 255 ignored, 0 invalid, (7 vs 4) masked
    assert r["count"] == 3
    assert r["rmse"] == approx(math.sqrt((1 + 0 + 0.25) / 3))
    assert r["abs_rel"] == approx((1 / 1 + 0 + 0.5 / 2) / 3)
    assert r["log_rmse"] == approx(math.sqrt((math.log(2) ** 2 + math.log(4 / 3) ** 2) / 3))
    # ratios 2, 1, 4/3: < 1.25 -> 1; < 1.5625 -> 2; < 1.953125 -> 2
    assert (r["delta1"], r["delta2"], r["delta3"]) == approx((1 / 3, 2 / 3, 2 / 3))
    m = DepthError()
    m.update(pred, target)  # now (7 vs 4) counts too
    assert m.compute()["rmse"] == approx(math.sqrt((1.25 + 9) / 4))
    m = DepthError()
    m.update(torch.tensor([-1.0]), torch.tensor([1.0]))  # clamped to 1e-9
    assert m.compute()["rmse"] == approx(1 - 1e-9, abs=1e-12)


# ----------------------------------------------------------- SaliencyMetrics
def _sal_example():
    pred = torch.tensor([[0.93, 0.42, 0.62, 0.03], [0.12, 0.32, 0.99, 0.68]]).reshape(2, 1, 2, 2)
    target = torch.tensor([[1, 1, 0, 0], [0, 0, 255, 0]], dtype=torch.float32).reshape(2, 1, 2, 2)
    return pred, target


def test_saliency_hand_values():
    pred, target = _sal_example()
    m = SaliencyMetrics()
    m.update(pred, target)
    r = m.compute()
    # Image A (fg 0.93, 0.42; bg 0.62, 0.03), salient when p > t:
    #   t in 0.20..0.40 -> TP2 FP1 FN0 = 2/3; 0.45..0.60 -> 1/3; 0.65..0.90 -> 1/2
    # Image B (all bg 0.12, 0.32, 0.68; 0.99 ignored):
    #   t <= 0.65 -> something predicted -> 0; t >= 0.70 -> both empty -> 1
    third, sixth = 1 / 3, 1 / 6
    expect = [third] * 5 + [sixth] * 4 + [0.25] + [0.75] * 5
    assert r["miou_per_threshold"].tolist() == approx(expect)
    assert r["miou"] == approx(0.75) and r["miou_threshold"] == approx(0.7)
    # pooled TP/FP/FN: t<=0.30 (2,3,0); 0.35,0.40 (2,2,0); 0.45..0.60 (1,2,1); 0.65 (1,1,1); >=0.70 (1,0,1)
    pooled = [2 / 5] * 3 + [0.5] * 2 + [0.25] * 4 + [1 / 3] + [0.5] * 5
    assert r["miou_pooled_per_threshold"].tolist() == approx(pooled)
    assert r["miou_pooled"] == approx(0.5)
    # maxF, p >= t over 0.05..0.95, 2 fg pixels, bg {0.03, 0.12, 0.32, 0.62, 0.68}:
    #   t in 0.70..0.90: TP1 FP0 -> P 1, R 1/2 -> F = 1.3 * 0.5 / (0.3 + 0.5) = 0.8125
    assert r["maxf"] == approx(0.8125) and r["maxf_threshold"] == approx(0.7)
    f = r["f_per_threshold"]
    assert f[0] == approx(1.3 * (1 / 3) / (0.3 / 3 + 1))  # t=0.05: TP2 FP4
    assert f[7] == approx(1.3 * 0.5 / (0.15 + 1))  # t=0.40: TP2 FP2 -> P 1/2, R 1
    assert f[8] == approx(1.3 * (1 / 6) / (0.1 + 0.5))  # t=0.45: TP1 FP2 FN1 -> P 1/3, R 1/2
    assert f[12] == approx(0.5)  # t=0.65: TP1 FP1 FN1
    assert f[18] == 0.0  # t=0.95: nothing predicted


# ----------------------------------------------------------------- EdgeODSF
def _edge_example():
    target = torch.zeros(1, 5, 5)
    target[0, :, 2] = 1  # vertical GT edge, 5 pixels
    pred = torch.zeros(1, 5, 5)
    pred[0, 0:3, 3] = 0.9  # one pixel off the edge
    pred[0, 4, 0] = 0.6  # two pixels off: too far for r = 1
    pred[0, 4, 2] = 0.4  # on the edge
    return pred, target


def test_edge_odsf_hand_values():
    pred, target = _edge_example()
    m = EdgeODSF(tolerance_px=1)
    m.update(pred, target)
    r = m.compute()
    # t <= 0.4: 5 predicted, 4 matched -> P 4/5; every GT pixel has a prediction
    #   within 1 px -> R 1; F = 2 * 0.8 / 1.8 = 8/9
    assert r["ods_f"] == approx(8 / 9) and r["ods_threshold"] == approx(0.01)
    # t = 0.5: P 3/4, R 3/5 (rows 3, 4 lost the 0.4 pixel); t = 0.95: nothing
    assert (r["precision"][49], r["recall"][49]) == approx((0.75, 0.6))
    assert r["f"][49] == approx(2 * 0.75 * 0.6 / 1.35)
    assert r["f"][69] == approx(0.75)  # t = 0.70: P 1, R 3/5
    assert r["f"][94] == 0.0
    # no tolerance: only the 0.4 pixel matches -> P 1/5, R 1/5
    m = EdgeODSF(tolerance_px=0)
    m.update(pred, target)
    assert m.compute()["ods_f"] == approx(0.2)


def test_edge_ignore_and_default_tolerance():
    pred, target = _edge_example()
    target[0, 4, 0] = 255  # the far false positive now counts nowhere
    m = EdgeODSF(tolerance_px=1)
    m.update(pred.unsqueeze(1), target.unsqueeze(1))
    assert m.compute()["ods_f"] == approx(1.0)  # t <= 0.4: P 4/4, R 5/5
    # seism's rule: 0.0075 * image diagonal, 0.0075 * 500 for 300 x 400
    assert EdgeODSF().radius_for(300, 400) == approx(3.75)


# ---------------------------------------------------------------------- VTM
def test_vtm_continuous_is_masked_mean_abs_over_all_pixels():
    pred = torch.tensor([[0.5, 0.2], [0.3, 0.9]]).reshape(2, 1, 1, 2)
    target = torch.tensor([[0.1, 0.2], [0.6, 0.1]]).reshape(2, 1, 1, 2)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]]).reshape(2, 1, 1, 2)
    # image 1: (0.4 + 0) / 2 = 0.2; image 2: (0.3 + 0 * 0.8) / 2 = 0.15 (masked pixel stays in
    # the denominator); mean over images 0.175
    assert vtm_taskonomy_error(pred, target, mask, task="depth_euclidean") == approx(0.175)
    assert vtm_taskonomy_error(pred, target, task="reshading") == approx((0.2 + (0.3 + 0.8) / 2) / 2)
    with pytest.raises(ValueError, match="unknown Taskonomy task"):
        vtm_taskonomy_error(pred, target, task="depth")


def test_vtm_normal_and_semseg():
    pred = torch.tensor([[1.0, 0.0, 0.0], [2.0, 2.0, 0.0]]).t().reshape(1, 3, 1, 2)
    target = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]).t().reshape(1, 3, 1, 2)
    # angles 90 and 45 degrees
    assert vtm_taskonomy_error(pred, target, task="normal") == approx(67.5, abs=1e-4)
    mask = torch.tensor([1.0, 0.0]).reshape(1, 1, 1, 2).expand(1, 3, 1, 2)
    assert vtm_taskonomy_error(pred, target, mask, task="normal") == approx(45.0, abs=1e-4)  # (90 + 0) / 2

    # semseg: image 1 pred > 0.2 -> [1, 0, 1] vs [1, 1, 0]: inter 1, union 3;
    # image 2: nothing predicted or present. Pooled IoU = 1/3.
    p = torch.tensor([[0.5, 0.1, 0.3], [0.1, 0.1, 0.1]]).reshape(2, 1, 1, 3)
    g = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]).reshape(2, 1, 1, 3)
    assert vtm_taskonomy_error(p, g, task="segment_semantic") == approx(1 / 3)
    # a second class never predicted nor present scores 0 in VTM's mean
    p2, g2 = torch.cat([p, torch.zeros_like(p)], 1), torch.cat([g, torch.zeros_like(g)], 1)
    assert vtm_taskonomy_error(p2, g2, task="segment_semantic") == approx(1 / 6)


# ------------------------------------------------------------------- Δm
TADFORMER_R64 = {"semseg": 70.82, "parts": 60.45, "sal": 65.88, "normals": 16.48}


def test_delta_m_tadformer_r64():
    dm = delta_m(TADFORMER_R64, PASCAL_SWIN_T_SINGLE_TASK, PASCAL_LOWER_IS_BETTER)
    # (3.5709 - 2.3898 + 5.6616 + 8.2916) / 4 = 4.2336 (docs/papers.md: +4.23; the paper prints +4.24)
    assert round(dm, 2) == 4.23
    assert dm == approx(4.24, abs=0.02)


@pytest.mark.parametrize("row, printed", [
    ((67.9, 59.84, 65.40, 16.60), 2.55),    # MTLoRA r=64
    ((68.19, 58.99, 64.48, 17.03), 1.35),   # MTLoRA r=16
    ((70.2, 60.0, 65.71, 16.57), 3.63),     # TADFormer r=32
    ((65.09, 53.48, 57.46, 20.69), -9.95),  # MTL, decoders only
])
def test_delta_m_matches_tadformer_table1(row, printed):
    multi = dict(zip(("semseg", "parts", "sal", "normals"), row))
    assert delta_m(multi, PASCAL_SWIN_T_SINGLE_TASK, PASCAL_LOWER_IS_BETTER) == approx(printed, abs=0.02)


def test_delta_m_conventions_and_errors():
    # +10% on a, -10% on a lower-is-better b -> both improvements of 10%
    assert delta_m({"a": 11.0, "b": 9.0}, {"a": 10.0, "b": 10.0}, {"b": True, "a": False}) == approx(10.0)
    assert delta_m({"a": 11.0, "b": 9.0}, {"a": 10.0, "b": 10.0}, set()) == approx(0.0)
    with pytest.raises(KeyError, match="baseline"):
        delta_m({"x": 1.0}, PASCAL_SWIN_T_SINGLE_TASK, PASCAL_LOWER_IS_BETTER)
    with pytest.raises(KeyError, match="unknown"):
        delta_m(TADFORMER_R64, PASCAL_SWIN_T_SINGLE_TASK, {"normal"})
    # a task subset keeps working with the full lower-is-better set
    assert delta_m({"semseg": 67.21}, PASCAL_SWIN_T_SINGLE_TASK, PASCAL_LOWER_IS_BETTER) == 0.0


# ----------------------------------------------- streaming / state / distributed
def _cases():
    """name -> (factory, batches): 4 batches of 2 images, deterministic."""
    g = torch.Generator().manual_seed(1234)
    rand = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    b, h, w = 2, 12, 16
    cases = {}

    seg = []
    for _ in range(4):
        t = torch.randint(0, 5, (b, h, w), generator=g)
        t[rand(b, h, w) < 0.1] = 255
        p = torch.where(rand(b, h, w) < 0.6, t.clamp(max=4), torch.randint(0, 5, (b, h, w), generator=g))
        seg.append((p, t))
    cases["miou"] = (lambda: MeanIoU(5), seg)

    nrm = []
    for _ in range(4):
        t = torch.nn.functional.normalize(torch.randn(b, 3, h, w, generator=g), dim=1)
        bad = rand(b, 1, h, w) < 0.1
        t = torch.where(bad.expand_as(t), torch.full_like(t, 255.0), t)
        nrm.append((t + 0.5 * torch.randn(b, 3, h, w, generator=g), t))
    cases["normals"] = (lambda: NormalsError(), nrm)

    dep = []
    for _ in range(4):
        t = 0.5 + 5 * rand(b, 1, h, w)
        t[rand(b, 1, h, w) < 0.1] = 0
        dep.append((t * (0.8 + 0.4 * rand(b, 1, h, w)), t))
    cases["depth"] = (lambda: DepthError(), dep)

    sal = []
    for _ in range(4):
        t = (rand(b, 1, h, w) < 0.3).float()
        t[rand(b, 1, h, w) < 0.05] = 255
        sal.append(((0.6 * (t == 1) + 0.5 * rand(b, 1, h, w)).clamp(0, 1), t))
    cases["saliency"] = (lambda: SaliencyMetrics(), sal)

    edg = []
    for _ in range(4):
        t = (rand(b, 1, h, w) < 0.1).float()
        edg.append((rand(b, 1, h, w) * (0.5 + t), t))
    cases["edges"] = (lambda: EdgeODSF(tolerance_px=2), edg)

    vtm = []
    for _ in range(4):
        t = rand(b, 1, h, w)
        vtm.append((rand(b, 1, h, w), t, (rand(b, 1, h, w) > 0.2).float()))
    cases["vtm_depth"] = (lambda: VTMTaskonomyError("depth_zbuffer"), vtm)
    vss = [((rand(b, 3, h, w)), (rand(b, 3, h, w) < 0.3).float()) for _ in range(4)]
    cases["vtm_semseg"] = (lambda: VTMTaskonomyError("segment_semantic", num_classes=3), vss)
    return cases


def _concat(batches):
    return tuple(torch.cat(parts, 0) for parts in zip(*batches))


def _plain(result):
    if isinstance(result, dict):
        return {k: (v.tolist() if torch.is_tensor(v) else v) for k, v in result.items()}
    return result


def _assert_same(a, b):
    a, b = _plain(a), _plain(b)
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == approx(b[k], rel=1e-9, abs=1e-12, nan_ok=True), k
    else:
        assert a == approx(b, rel=1e-9, abs=1e-12, nan_ok=True)


@pytest.mark.parametrize("name", list(_cases()))
def test_streaming_equals_one_shot(name):
    factory, batches = _cases()[name]
    streamed, once = factory(), factory()
    for batch in batches:
        streamed.update(*batch)
    once.update(*_concat(batches))
    for k, v in streamed.state_dict().items():
        w = once.state_dict()[k]
        if v.is_floating_point():
            torch.testing.assert_close(v, w, rtol=1e-12, atol=1e-9)
        else:
            assert torch.equal(v, w), k
    _assert_same(streamed.compute(), once.compute())


def test_state_dict_reset_merge_and_sync_without_dist():
    factory, batches = _cases()["saliency"]
    full = factory()
    for batch in batches:
        full.update(*batch)
    left, right = factory(), factory()
    for batch in batches[:2]:
        left.update(*batch)
    for batch in batches[2:]:
        right.update(*batch)
    _assert_same(left.merge(right).compute(), full.compute())

    restored = factory()
    restored.load_state_dict(full.state_dict())
    _assert_same(restored.compute(), full.compute())
    with pytest.raises(KeyError):
        restored.load_state_dict({"nope": torch.zeros(1)})

    assert not dist.is_initialized()
    _assert_same(full.sync().compute(), restored.compute())  # no process group: no-op
    full.reset()
    assert all(int(v.abs().sum()) == 0 for v in full.state_dict().values())


def _dist_worker(rank, world, init_file, out_dir):
    # One intra-op thread: a forked child must not enter the OpenMP pool it
    # inherited from the parent, and two ranks share the machine's cores anyway.
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        for name, (factory, batches) in _cases().items():
            m = factory()
            for batch in batches[rank::world]:  # each rank sees half the data
                m.update(*batch)
            m.sync()
            m.sync()  # idempotent: the other ranks are not counted twice
            results[name] = _plain(m.compute())
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_sync_equals_single_process(tmp_path):
    world = 2
    # fork where the platform has it: each spawned child would re-import torch
    # (seconds per rank on a 2-core runner); the ranks still are separate
    # processes joined only through the gloo process group.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_dist_worker, args=(world, str(tmp_path / "rendezvous"), str(tmp_path)),
                       nprocs=world, join=True, start_method=method)
    for name, (factory, batches) in _cases().items():
        single = factory()
        for batch in batches:
            single.update(*batch)
        for rank in range(world):
            got = torch.load(tmp_path / f"rank{rank}.pt")[name]
            _assert_same(got, single.compute())


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(_cases()))
def test_cuda_matches_cpu(name):
    factory, batches = _cases()[name]
    cpu, gpu = factory(), factory()
    for batch in batches:
        cpu.update(*batch)
        gpu.update(*(x.cuda() for x in batch))
    assert gpu.device.type == "cuda"
    a, b = _plain(cpu.compute()), _plain(gpu.compute())
    if isinstance(a, dict):
        for k in a:
            # float32 angles may differ in the last bits on the GPU, which can
            # move one angle across a 0.01-degree histogram bin of the median
            tol = 0.011 if k == "median" else 1e-4
            assert b[k] == approx(a[k], rel=1e-5, abs=tol, nan_ok=True), k
    else:
        assert b == approx(a, rel=1e-5, abs=1e-5)
