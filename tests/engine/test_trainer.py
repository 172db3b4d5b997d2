"""MultiTaskTrainer, schedule, losses, model registry and PNG output on tiny problems."""
import json
import math
import struct
import zlib

import numpy as np
import pytest
import torch

from fastdense.data import SyntheticScenes
from fastdense.engine import (MultiTaskTrainer, ResumableSampler, TrainConfig, beats, constant_baseline,
                              evaluate_constant, warmup_cosine, write_png)
from fastdense.engine import losses as L
from fastdense.models import create_model, list_models

TASKS = ["semseg", "normal", "depth_euclidean", "saliency"]


def _tiny_model(tasks=TASKS, seed=0):
    torch.manual_seed(seed)
    return create_model("tiny_mtl_small", tasks=tasks)


def test_schedule_values_at_warmup_and_cosine_points():
    total, warm, lo = 110, 10, 0.1
    assert warmup_cosine(0, total, warm, lo) == pytest.approx(0.1)
    assert warmup_cosine(4, total, warm, lo) == pytest.approx(0.5)
    assert warmup_cosine(9, total, warm, lo) == pytest.approx(1.0)
    assert warmup_cosine(10, total, warm, lo) == pytest.approx(1.0)       # cosine starts at the peak
    assert warmup_cosine(60, total, warm, lo) == pytest.approx(lo + (1 - lo) * 0.5)  # half-way: cos(pi/2) = 0
    assert warmup_cosine(35, total, warm, lo) == pytest.approx(lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi / 4)))
    assert warmup_cosine(110, total, warm, lo) == pytest.approx(lo)
    assert warmup_cosine(500, total, warm, lo) == pytest.approx(lo)


def test_scheduler_drives_the_optimizer_lr():
    ds = SyntheticScenes(8, 64, seed=0, tasks=["saliency"])
    cfg = TrainConfig(steps=6, batch_size=2, lr=0.01, warmup_steps=2, min_lr_ratio=0.0, progress=False, log_every=0)
    tr = MultiTaskTrainer(_tiny_model(["saliency"]), ["saliency"], ds, config=cfg, device="cpu")
    lrs = [tr.train_step()["lr"] for _ in range(6)]
    expected = [0.01 * warmup_cosine(s, 6, 2, 0.0) for s in range(6)]
    assert lrs == pytest.approx(expected)
    assert lrs[:3] == pytest.approx([0.005, 0.01, 0.01])


def test_loss_decreases_on_a_tiny_problem(tmp_path):
    ds = SyntheticScenes(4, 64, seed=0, tasks=TASKS)
    cfg = TrainConfig(steps=25, batch_size=4, lr=5e-3, warmup_steps=3, progress=False, log_every=1)
    tr = MultiTaskTrainer(_tiny_model(), TASKS, ds, ds, config=cfg, run_dir=tmp_path, device="cpu")
    tr.fit()
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 26))
    first, last = train[0], train[-1]
    assert last["loss"] < 0.6 * first["loss"]
    for t in TASKS:
        assert last[f"loss_{t}"] < first[f"loss_{t}"], t
    # The logged total is the weighted sum of the task losses (weights 1).
    assert first["loss"] == pytest.approx(sum(first[f"loss_{t}"] for t in TASKS), rel=1e-5)
    evals = [r for r in records if "eval" in r]
    assert len(evals) == 1 and evals[0]["step"] == 25 and set(evals[0]["eval"]) == set(TASKS)
    assert (tmp_path / "predictions_step25.png").is_file()


def test_grad_accumulation_equals_one_big_batch():
    ds = SyntheticScenes(8, 64, seed=3, tasks=["semseg", "depth_euclidean"])
    params = []
    for accum in (1, 2):
        cfg = TrainConfig(steps=2, batch_size=4, grad_accum=accum, lr=1e-2, warmup_steps=1, progress=False,
                          log_every=0)
        tr = MultiTaskTrainer(_tiny_model(["semseg", "depth_euclidean"]), ["semseg", "depth_euclidean"], ds,
                              config=cfg, device="cpu")
        tr.fit()
        params.append(torch.cat([p.detach().flatten() for p in tr.model.parameters()]))
    torch.testing.assert_close(params[0], params[1], rtol=1e-4, atol=1e-5)


def test_eval_every_logs_intermediate_evaluations(tmp_path):
    ds = SyntheticScenes(4, 64, seed=0, tasks=["saliency"])
    cfg = TrainConfig(steps=4, batch_size=2, eval_every=2, progress=False, log_every=2)
    tr = MultiTaskTrainer(_tiny_model(["saliency"]), ["saliency"], ds, ds, config=cfg, run_dir=tmp_path,
                          device="cpu")
    tr.fit()
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval" in r] == [2, 4]
    assert [r["step"] for r in records if "loss" in r] == [2, 4]
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["predictions_step2.png", "predictions_step4.png"]


def test_losses_ignore_invalid_pixels_and_normalise_predictions():
    target = torch.zeros(1, 3, 2, 2)
    target[0, 2] = 1.0
    target[0, :, 1, 1] = 0.0  # no normal here: not counted
    pred = torch.zeros(1, 3, 2, 2)
    pred[0, 2] = 5.0          # right direction, wrong length: zero loss after normalising
    pred[0, 0, 1, 1] = 7.0
    assert float(L.normal_loss(pred, target)) == 0.0
    depth_t = torch.tensor([[[[0.0, 2.0], [3.0, 4.0]]]])
    depth_p = torch.tensor([[[[9.0, 1.0], [3.0, 6.0]]]])
    assert float(L.depth_loss(depth_p, depth_t)) == pytest.approx((1 + 0 + 2) / 4)
    seg_t = torch.tensor([[[0, 255], [1, 1]]])
    logits = torch.zeros(1, 6, 2, 2)
    assert float(L.semseg_loss(logits, seg_t)) == pytest.approx(3 * math.log(6) / 4)


def test_predict_and_constant_baseline_are_beaten_by_truth():
    ds = SyntheticScenes(6, 64, seed=5, tasks=TASKS)
    const = constant_baseline(ds, TASKS)
    assert int(const["semseg"]) in range(6) and float(const["normal"].norm()) == pytest.approx(1.0)
    base = evaluate_constant(const, ds, TASKS)
    items = [ds[i] for i in range(6)]
    perfect = {}
    for t in TASKS:
        m = L.make_metric(t)
        y = torch.stack([it[t] for it in items])
        m.update(y, y)
        perfect[t] = L.summarize(t, m.compute())
    assert beats(perfect, base) == {t: True for t in TASKS}
    assert beats(base, perfect) == {t: False for t in TASKS}


def test_sampler_is_a_seeded_permutation_per_epoch_and_resumable():
    s = ResumableSampler(5, seed=7)
    first = s.next(5)
    assert sorted(first) == list(range(5))
    s2 = ResumableSampler(5, seed=7)
    s2.next(3)
    state = s2.state_dict()
    s3 = ResumableSampler(5, seed=7)
    s3.load_state_dict(state)
    s4 = ResumableSampler(5, seed=7)
    s4.next(3)
    assert s3.next(9) == s4.next(9)
    assert sorted(s.next(5)) == list(range(5))


def test_create_model_registry_and_errors():
    assert {"tiny_mtl", "tiny_mtl_small"} <= set(list_models(kind="multitask"))
    with pytest.raises(ValueError, match="unknown model 'swin_tt'.*Did you mean 'swin_t'"):
        create_model("swin_tt", tasks=TASKS)
    with pytest.raises(ValueError, match="unknown task"):
        create_model("tiny_mtl", tasks=["semseg", "edges"])
    model = create_model("tiny_mtl_small", tasks=["semseg", "normal"])
    out = model(torch.rand(2, 3, 64, 64))
    assert out["semseg"].shape == (2, 6, 64, 64) and out["normal"].shape == (2, 3, 64, 64)
    from fastdense.nn import LoRALinear, MultiTaskLoRALinear

    assert any(isinstance(m, MultiTaskLoRALinear) and m.tasks == ["semseg", "normal"] for m in model.modules())
    assert any(isinstance(m, LoRALinear) for m in model.modules())
    with pytest.raises(ValueError, match="multiples of 4"):
        model(torch.rand(1, 3, 66, 64))


def test_write_png_round_trips_through_zlib(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    write_png(path, rgb)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        assert crc == zlib.crc32(tag + body) & 0xFFFFFFFF
        chunks[tag] = body
        pos += 12 + n
    w, h, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (w, h, depth, colour) == (7, 5, 8, 2)
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(5, 1 + 7 * 3)
    assert (raw[:, 0] == 0).all()
    np.testing.assert_array_equal(raw[:, 1:].reshape(5, 7, 3), rgb)
    try:
        from PIL import Image
    except ImportError:
        return
    np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")), rgb)
