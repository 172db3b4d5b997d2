"""MTLoRA's losses against the released code's formulas, and the task table (channels, losses,
predictions, metrics) of every data set."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastdense.data import SyntheticScenes
from fastdense.engine import losses as L
from fastdense.engine import tasks as T
from fastdense.models import tiny_mtl


# ----------------------------------------------------------------------------- the released formulas
def released_balanced_bce(output, label, pos_weight=None):
    """MTLoRA's BalancedCrossEntropyLoss(size_average=True).forward, as written there."""
    labels = torch.ge(label, 0.5).float()
    if pos_weight is None:
        num_pos = torch.sum(labels)
        num_neg = torch.sum(1.0 - labels)
        w = num_neg / (num_pos + num_neg)
    else:
        w = pos_weight
    gt_zero = torch.ge(output, 0).float()
    loss_val = torch.mul(output, (labels - gt_zero)) - torch.log(1 + torch.exp(output - 2 * torch.mul(output, gt_zero)))
    loss_pos = torch.sum(-torch.mul(labels, loss_val))
    loss_neg = torch.sum(-torch.mul(1.0 - labels, loss_val))
    return (w * loss_pos + (1 - w) * loss_neg) / float(math.prod(label.size()))


def released_normals_loss(out, label):
    """NormalsLoss(normalize=True, size_average=True, norm=1)."""
    mask = label != 255
    out = out / (torch.norm(out, p=2, dim=1).unsqueeze(1) + 1e-12)
    loss = F.l1_loss(torch.masked_select(out, mask), torch.masked_select(label, mask), reduction="sum")
    return loss / max(int(mask.sum()), 1e-6)


def test_balanced_bce_matches_the_released_loss():
    g = torch.Generator().manual_seed(0)
    out = torch.randn(2, 1, 9, 7, generator=g) * 4
    label = (torch.rand(2, 9, 7, generator=g) > 0.7).float()  # a (B, H, W) map, as the loaders give
    want_sal = released_balanced_bce(out, label.unsqueeze(1))
    torch.testing.assert_close(L.balanced_bce_loss(out, label), want_sal)
    torch.testing.assert_close(L.balanced_bce_loss(out, label, pos_weight=0.95),
                               released_balanced_bce(out, label.unsqueeze(1), 0.95))
    # Saliency's weight is the batch's fraction of negatives, so a different batch weighs differently.
    assert float(L.task_loss("sal", out, label, "pascal")) == pytest.approx(float(want_sal))
    assert float(L.task_loss("edge", out, label, "nyud")) == pytest.approx(
        float(released_balanced_bce(out, label.unsqueeze(1), 0.95)))


def test_cross_entropy_averages_over_valid_pixels_only():
    logits = torch.zeros(1, 7, 2, 2)
    target = torch.tensor([[[0, 255], [3, 255]]])
    assert float(L.cross_entropy_loss(logits, target)) == pytest.approx(math.log(7))  # 2 valid pixels
    assert float(L.semseg_loss(logits, target)) == pytest.approx(2 * math.log(7) / 4)  # synthetic: all pixels
    assert float(L.cross_entropy_loss(logits, torch.full((1, 2, 2), 255))) == 0.0  # no person in the batch


def test_normals_and_depth_l1_match_the_released_losses():
    g = torch.Generator().manual_seed(1)
    out = torch.randn(2, 3, 5, 4, generator=g)
    label = F.normalize(torch.randn(2, 3, 5, 4, generator=g), dim=1)
    label[:, :, 0, :] = 255.0
    torch.testing.assert_close(L.normals_l1_loss(out, label), released_normals_loss(out, label))
    depth_out = torch.rand(2, 1, 5, 4, generator=g) * 3
    depth = torch.rand(2, 1, 5, 4, generator=g) * 3
    depth[0, 0, :2] = 255.0
    mask = depth != 255
    want = F.l1_loss(torch.masked_select(depth_out, mask), torch.masked_select(depth, mask))
    torch.testing.assert_close(L.depth_l1_loss(depth_out, depth), want)


def test_mtlora_loss_weights_and_total():
    assert L.MTLORA_LOSS_WEIGHTS == {"semseg": 1.0, "human_parts": 2.0, "sal": 5.0, "edge": 50.0, "normals": 10.0,
                                     "depth": 1.0}
    losses = {"semseg": torch.tensor(1.0), "sal": torch.tensor(2.0), "normals": torch.tensor(0.5)}
    assert float(L.total_loss(losses, L.MTLORA_LOSS_WEIGHTS)) == pytest.approx(1 + 10 + 5)


# ----------------------------------------------------------------------------- the task table
def test_channels_per_data_set():
    assert T.task_channels(["semseg", "human_parts", "sal", "normals", "edge"], "pascal") == {
        "semseg": 21, "human_parts": 7, "sal": 1, "normals": 3, "edge": 1}
    assert T.task_channels(["semseg", "depth", "normals", "edge"], "nyud") == {
        "semseg": 40, "depth": 1, "normals": 3, "edge": 1}
    assert T.task_channels(list(tiny_mtl.TASK_CHANNELS), "synthetic") == tiny_mtl.TASK_CHANNELS
    assert T.SYNTHETIC_SEMSEG_CLASSES == len(SyntheticScenes.CLASSES) == L.NUM_SEMSEG_CLASSES
    assert T.SYNTHETIC_PARTS == len(SyntheticScenes.PARTS)
    assert T.dataset_of(["semseg", "sal"]) == "pascal" and T.dataset_of(["depth"]) == "nyud"
    assert T.dataset_of(["semseg", "normal"]) == "synthetic"
    assert T.task_spec("semseg").channels == 6  # no data set given: the synthetic scenes' first
    with pytest.raises(ValueError, match="is not a task of 'nyud'"):
        T.task_spec("sal", "nyud")
    with pytest.raises(ValueError, match="unknown data set"):
        T.task_spec("semseg", "cityscapes")
    with pytest.raises(ValueError, match="unknown task"):
        T.task_spec("optical_flow")


def test_primary_metrics_agree_across_data_sets():
    assert L.PRIMARY["semseg"] == ("miou", True) and L.PRIMARY["normals"] == ("mean", False)
    assert L.PRIMARY["sal"] == ("miou", True) and L.PRIMARY["saliency"] == ("maxf", True)
    assert L.PRIMARY["depth"] == ("rmse", False) and L.PRIMARY["edge"] == ("ods_f", True)
    for specs in T.TASKS.values():
        for name, spec in specs.items():
            assert L.PRIMARY[name] == (spec.primary, spec.higher_is_better)


def _fake_label(dataset, task, spec, g, b=2, h=16, w=16):
    """A label in the layout the data set's loader returns, with some ignored pixels."""
    if spec.prediction == "argmax":
        y = torch.randint(0, spec.channels, (b, h, w), generator=g)
        y[:, 0] = 255
        return y
    if spec.prediction == "unit":
        y = F.normalize(torch.randn(b, 3, h, w, generator=g), dim=1)
        if dataset == "synthetic":
            y[:, :, 0] = 0.0  # background: no normal
        else:
            y[:, :, 0] = 255.0
        return y
    if spec.prediction == "sigmoid":
        y = (torch.rand(b, h, w, generator=g) > 0.8).float()
        return y if spec.map_label else y.unsqueeze(1)
    y = torch.rand(b, 1, h, w, generator=g) * 5 + 0.5  # depth
    y[:, :, 0] = 0.0 if dataset == "synthetic" else 255.0
    return y


@pytest.mark.parametrize("dataset", T.DATASETS)
def test_every_task_trains_predicts_and_scores(dataset):
    """For every task: the loss is finite with a gradient, the prediction fits the metric,
    and the true label scores better than a constant prediction."""
    g = torch.Generator().manual_seed(2)
    for task, spec in T.TASKS[dataset].items():
        label = _fake_label(dataset, task, spec, g)
        out = torch.randn(2, spec.channels, 16, 16, generator=g, requires_grad=True)
        loss = L.task_losses({task: out}, {task: label}, dataset)[task]
        assert loss.ndim == 0 and torch.isfinite(loss), task
        loss.backward()
        assert out.grad is not None and float(out.grad.abs().sum()) > 0, task

        def score(pred, task=task, label=label, spec=spec):
            metric = T.make_metric(task, dataset)
            metric.update(pred, label)
            return T.summarize(task, metric.compute(), dataset)[spec.primary]

        pred = T.predict(task, out.detach(), dataset)
        score(pred)  # the prediction has the layout the metric takes
        if spec.prediction == "argmax":
            perfect, const = label, torch.zeros_like(label)
        elif spec.prediction == "unit":
            perfect = torch.where(label == 255, torch.zeros_like(label), label)
            const = F.normalize(torch.ones_like(label), dim=1)
        elif spec.prediction == "sigmoid":
            perfect, const = label, torch.full_like(label, 0.5)
        else:
            perfect, const = label, torch.full_like(label, 2.0)
        good, bad = score(perfect), score(const)
        assert (good > bad) if spec.higher_is_better else (good < bad), (task, good, bad)
