"""The few-shot protocol of concept_fewshot: synthetic scenes with tiny random networks, and the
NYUD-v2 and Taskonomy-tiny paths on small fixture folders with tiny local weights."""
from __future__ import annotations

import argparse
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from fastdense.engine.fewshot_concept import ConceptAdaptOptions, fine_tune, run_adapt_concept, trivial_prediction  # noqa: E402
from fastdense.models._concept_backbones import tiny_backbones  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

#: The few-shot test's settings: 10 shots, 60 steps, 8 concepts, α = 10 (see the report in
#: docs/models/concept_fewshot.md for the numbers and larger runs).
SYNTHETIC = dict(tasks="depth_zbuffer,normal,edge_texture", shots=10, runs=1, steps=60, batch_size=4,
                 queries=8, support_pool=16, num_concepts=8, seed=0)


def test_synthetic_fewshot_beats_trivial_baseline_on_depth_normals_and_edges():
    out = io.StringIO()
    summary = run_adapt_concept(SYNTHETIC, out=out)
    print("\n" + out.getvalue())
    got = {}
    for task, metric in (("depth_zbuffer", "rmse"), ("normal", "mean_angle"), ("edge_texture", "rmse")):
        r = summary["tasks"][task]
        assert r["metric"] == metric
        model, base = r["values"][metric]["mean"], r["values"]["baseline_" + metric]["mean"]
        got[task] = (model, base)
        assert model < base, f"{task}: {metric} {model:.4f} is not below the trivial baseline {base:.4f}"
    # Margins measured when this test was written: depth -13 %, normals -13 %, edges -2.6 %.
    assert got["depth_zbuffer"][0] < 0.95 * got["depth_zbuffer"][1]
    assert got["normal"][0] < 0.95 * got["normal"][1]
    assert summary["backbones"] == "tiny random networks" and summary["shots"] == 10


def test_protocol_is_deterministic_under_a_seed(tmp_path):
    opts = dict(tasks="saliency,depth_zbuffer", shots=2, runs=2, steps=2, queries=2, support_pool=4,
                num_concepts=4, seed=3)
    a = run_adapt_concept(dict(opts, json=str(tmp_path / "a.json")), out=io.StringIO())
    b = run_adapt_concept(opts, out=io.StringIO())
    assert a["tasks"] == b["tasks"]
    assert json.loads((tmp_path / "a.json").read_text())["tasks"] == json.loads(json.dumps(a["tasks"]))
    assert a["tasks"]["saliency"]["kind"] == "segmentation" and "iou" in a["tasks"]["saliency"]["values"]
    assert len(a["tasks"]["depth_zbuffer"]["values"]["rmse"]["values"]) == 2  # one value per support set
    c = run_adapt_concept(dict(opts, seed=4), out=io.StringIO())
    assert c["tasks"]["depth_zbuffer"]["values"]["rmse"] != a["tasks"]["depth_zbuffer"]["values"]["rmse"]


def test_fine_tune_moves_only_the_trainable_set_and_repeats():
    bb = tiny_backbones(seed=0, width=16)
    from fastdense.models import create_model

    model = create_model("concept_fewshot", unet=bb.unet, vae=bb.vae, image_encoder=bb.image_encoder,
                         task="depth_zbuffer", num_concepts=4)
    g = torch.Generator().manual_seed(0)
    images, labels = torch.rand(3, 3, 32, 32, generator=g), torch.rand(3, 1, 32, 32, generator=g)
    model.fit_buckets(labels)
    encoded, targets = model.encode(images), model.prepare_targets(labels)
    start = model.trainable_state_dict()
    first = fine_tune(model, encoded, targets, steps=4, lr=0.1, batch_size=2, seed=5)
    model.load_trainable_state_dict(start)
    second = fine_tune(model, encoded, targets, steps=4, lr=0.1, batch_size=2, seed=5)
    assert first == second and len(first) == 4
    assert first[-1] < first[0]


def test_trivial_prediction_is_the_support_mean():
    labels = torch.tensor([[[[1.0, 3.0]]], [[[5.0, 100.0]]]])
    mask = torch.tensor([[[[True, True]]], [[[True, False]]]])
    pred = trivial_prediction("regression", labels, mask, torch.zeros(1, 1, 2, 2))
    assert torch.equal(pred, torch.full((1, 1, 2, 2), 3.0))


def test_options_from_namespace_and_validation():
    ns = argparse.Namespace(model="concept_fewshot", data="synthetic", shots=None, runs=2, checkpoint=None,
                            data_root=None, steps=5)
    opts = ConceptAdaptOptions.from_mapping(ns)
    assert (opts.runs, opts.steps, opts.shots) == (2, 5, None)
    assert ConceptAdaptOptions.from_mapping({"adapt_steps": 7}).steps == 7
    bad = [({"data": "pascal"}, "data must be one of"),
           ({"data": "nyud", "data_root": "/nowhere"}, "needs local weights"),
           ({"tasks": "depth_zbuffer,semseg"}, "not supported on synthetic"),
           ({"shots": 50}, "exceed the support_pool"),
           ({"runs": 0}, "runs must be an integer"),
           ({"sd_dir": "/x"}, "give both sd_dir and clip_dir"),
           ({"attention": "flash", "steps": 0, "runs": 1, "queries": 1, "support_pool": 2, "shots": 1,
             "tasks": "depth_zbuffer"}, "attention must be one of")]
    for options, message in bad:
        with pytest.raises(ValueError, match=message):
            run_adapt_concept(options, out=io.StringIO())


# ----------------------------------------------------------------------------- real-data paths
def _save_tiny_weights(root: Path) -> tuple[Path, Path]:
    bb = tiny_backbones(seed=0, width=16)
    bb.unet.save_pretrained(root / "sd" / "unet")
    bb.vae.save_pretrained(root / "sd" / "vae")
    bb.image_encoder.save_pretrained(root / "clip")
    return root / "sd", root / "clip"


def _png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_nyud_path_with_local_weights(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "NYUD_MT"
    ids = {"train": ["a", "b", "c"], "val": ["d", "e"]}
    for split, names in ids.items():
        (root / "gt_sets").mkdir(parents=True, exist_ok=True)
        (root / "gt_sets" / f"{split}.txt").write_text("\n".join(names))
        for name in names:
            _png(root / "images" / f"{name}.jpg", rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
            depth = rng.uniform(0.5, 9.0, (24, 32)).astype(np.float32)
            depth[:2] = 0  # no measurement -> 255 -> masked
            (root / "depth").mkdir(exist_ok=True)
            np.save(root / "depth" / f"{name}.npy", depth)
            normals = rng.normal(size=(24, 32, 3)).astype(np.float32)
            normals /= np.linalg.norm(normals, axis=2, keepdims=True)
            (root / "normals").mkdir(exist_ok=True)
            np.save(root / "normals" / f"{name}.npy", normals)
    sd, clip = _save_tiny_weights(tmp_path)
    out = io.StringIO()
    summary = run_adapt_concept(dict(data="nyud", data_root=str(root), sd_dir=str(sd), clip_dir=str(clip),
                                     shots=2, runs=1, steps=2, queries=2, resolution=32, num_concepts=4),
                                out=out)
    assert summary["backbones"] == "local weights"
    assert set(summary["tasks"]) == {"depth", "normals"}
    assert summary["tasks"]["depth"]["metric"] == "rmse" and summary["tasks"]["normals"]["metric"] == "mean_angle"
    for r in summary["tasks"].values():
        assert all(np.isfinite(v["mean"]) for v in r["values"].values())
    # The ignore marker (255) never reaches the errors: depths are below 10 m.
    assert summary["tasks"]["depth"]["values"]["rmse"]["mean"] < 10
    assert re.search(r"depth\s+rmse", out.getvalue())


def test_taskonomy_path_with_local_weights(tmp_path):
    from fastdense.data.taskonomy import label_name

    rng = np.random.default_rng(1)
    root = tmp_path / "tiny_merged"
    for building in ("allensville", "ihlen"):  # one train and one test building
        for k in range(3):
            name = f"{building}_point_{k}_view_0_domain_rgb.png"
            _png(root / "rgb" / name, rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
            depth = rng.integers(100, 60000, (16, 16)).astype(np.uint16)
            depth[0, :4] = 65535  # no depth -> masked
            _png(root / "depth_euclidean" / label_name("depth_euclidean", name), depth)
            _png(root / "depth_zbuffer" / label_name("depth_zbuffer", name), (depth // 2).astype(np.uint16))
            _png(root / "normal" / label_name("normal", name), rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    sd, clip = _save_tiny_weights(tmp_path)
    with pytest.warns(UserWarning, match="using the 1 present"):
        summary = run_adapt_concept(dict(data="taskonomy", data_root=str(root), sd_dir=str(sd), clip_dir=str(clip),
                                         tasks="depth_zbuffer,normal", shots=2, runs=1, steps=1, queries=2,
                                         resolution=32, num_concepts=4), out=io.StringIO())
    assert summary["tasks"]["depth_zbuffer"]["metric"] == "mae"  # VTM's "RMSE" on Taskonomy
    assert summary["tasks"]["normal"]["metric"] == "mean_angle"
    for r in summary["tasks"].values():
        assert all(np.isfinite(v["mean"]) for v in r["values"].values())


def test_missing_weights_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Stable Diffusion folder not found: .*nowhere"):
        run_adapt_concept(dict(sd_dir=str(tmp_path / "nowhere"), clip_dir=str(tmp_path), steps=0, runs=1,
                               queries=1, support_pool=2, shots=1, tasks="depth_zbuffer"), out=io.StringIO())


# ----------------------------------------------------------------------------- the docs' example
def test_docs_example_runs():
    """Every ```python block of docs/models/concept_fewshot.md, in order, in one namespace."""
    doc = Path(__file__).resolve().parents[2] / "docs" / "models" / "concept_fewshot.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    assert blocks
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(doc), "exec"), namespace)
