"""On-disk loaders (PASCAL-Context MT, NYUD-v2 MT, Taskonomy-tiny) and the joint
transforms, on tiny fixture trees written in the community layouts."""
from pathlib import Path

import re

import numpy as np
import pytest
import torch

PIL = pytest.importorskip("PIL")
sio = pytest.importorskip("scipy.io")
from PIL import Image  # noqa: E402

from fastdense.data._io import CorruptFileError, DatasetNotFoundError  # noqa: E402
from fastdense.data.nyud import NYUDMT  # noqa: E402
from fastdense.data.pascal import PERSON_PART_GROUPS, PascalContextMT, label_boundaries  # noqa: E402
from fastdense.data.taskonomy import TASKONOMY_FOLDS, TaskonomyTiny, label_name  # noqa: E402
from fastdense.data import transforms as T  # noqa: E402

H, W = 8, 10


def _rng(seed):
    return np.random.default_rng(seed)


def _png(path: Path, arr: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _jpg(path: Path, seed: int):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)).save(path, quality=95)


def _decoded_jpg(path: Path) -> torch.Tensor:
    arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


# --------------------------------------------------------------------------- PASCAL
PASCAL_TRAIN, PASCAL_VAL = ["2008_000001", "2008_000002"], ["2008_000003"]


def _struct_array(rows, fields):
    arr = np.zeros((1, len(rows)), dtype=[(f, "O") for f in fields])
    for k, row in enumerate(rows):
        arr[0, k] = row
    return arr


def _anno(objects):
    """Pascal-Part 'anno': objects(k).{class, class_ind, mask, parts(j).{part_name, mask}}."""
    rows = []
    for cls_name, cls_ind, mask, parts in objects:
        p = (_struct_array([(n, m.astype(np.uint8)) for n, m in parts], ("part_name", "mask"))
             if parts else np.zeros((0, 0)))
        rows.append((cls_name, np.array([[cls_ind]], dtype=np.uint8), mask.astype(np.uint8), p))
    return {"imname": "x", "objects": _struct_array(rows, ("class", "class_ind", "mask", "parts"))}


def _box(r0, r1, c0, c1):
    m = np.zeros((H, W), dtype=bool)
    m[r0:r1, c0:c1] = True
    return m


SEMSEG = np.arange(H * W, dtype=np.uint8).reshape(H, W) % 21
SEMSEG[0, :] = 255
LABELMAP = np.full((H, W), 7, dtype=np.uint16)
LABELMAP[:, 5:] = 9
LABELMAP[6:, :] = 3
NORMALS_RAW = _rng(5).integers(0, 256, (H, W, 3), dtype=np.uint8)
SAL_RAW = np.tile(np.array([0, 127, 128, 255, 200, 10, 129, 126, 255, 0], dtype=np.uint8), (H, 1))


@pytest.fixture
def pascal_root(tmp_path):
    root = tmp_path / "PASCAL_MT"
    (root / "ImageSets" / "Context").mkdir(parents=True)
    (root / "ImageSets" / "Context" / "train.txt").write_text("\n".join(PASCAL_TRAIN) + "\n\n")
    (root / "ImageSets" / "Context" / "val.txt").write_text("\n".join(PASCAL_VAL) + "\n")
    for k, name in enumerate(PASCAL_TRAIN + PASCAL_VAL):
        _jpg(root / "JPEGImages" / f"{name}.jpg", k)
        # The first image's semseg is in VOC12, the others only in the fallback folder.
        sub = "VOC12" if k == 0 else "pascal-context"
        _png(root / "semseg" / sub / f"{name}.png", (SEMSEG + k) % 21 if k else SEMSEG)
        _png(root / "normals_distill" / f"{name}.png", NORMALS_RAW)
        _png(root / "sal_distill" / f"{name}.png", SAL_RAW)
        (root / "pascal-context" / "trainval").mkdir(parents=True, exist_ok=True)
        sio.savemat(root / "pascal-context" / "trainval" / f"{name}.mat", {"LabelMap": LABELMAP})
    (root / "human_parts").mkdir()
    person = [("person", 15, _box(1, 7, 1, 6), [("head", _box(1, 3, 2, 4)), ("luarm", _box(3, 5, 1, 2)),
                                               ("rfoot", _box(6, 7, 3, 5)), ("torso", _box(2, 5, 2, 5))]),
              ("cat", 8, _box(0, 4, 6, 10), []),
              ("person", 15, _box(4, 8, 7, 10), [("llleg", _box(5, 8, 8, 9))])]
    sio.savemat(root / "human_parts" / f"{PASCAL_TRAIN[0]}.mat", {"anno": _anno(person)})
    sio.savemat(root / "human_parts" / f"{PASCAL_TRAIN[1]}.mat",
                {"anno": _anno([("cat", 8, _box(0, 4, 6, 10), [])])})
    # A person without part annotations: still no labelled parts -> ignored.
    sio.savemat(root / "human_parts" / f"{PASCAL_VAL[0]}.mat",
                {"anno": _anno([("person", 15, _box(0, 8, 0, 10), [])])})
    return root


def test_pascal_loads_splits_shapes_and_meta(pascal_root):
    train = PascalContextMT(pascal_root, "train")
    val = PascalContextMT(pascal_root, "val")
    assert len(train) == 2 and len(val) == 1 and train.ids == PASCAL_TRAIN
    s = train[0]
    assert set(s) == {"image", "semseg", "human_parts", "sal", "normals", "edge", "meta"}
    assert s["image"].shape == (3, H, W) and s["image"].dtype == torch.float32
    assert torch.equal(s["image"], _decoded_jpg(pascal_root / "JPEGImages" / f"{PASCAL_TRAIN[0]}.jpg"))
    assert s["semseg"].dtype == torch.int64 and s["semseg"].shape == (H, W)
    assert s["human_parts"].dtype == torch.int64
    assert s["normals"].shape == (3, H, W) and s["edge"].shape == (H, W) and s["sal"].dtype == torch.float32
    assert s["meta"]["name"] == PASCAL_TRAIN[0] and s["meta"]["size"].tolist() == [H, W]
    assert val[0]["meta"]["name"] == PASCAL_VAL[0]
    only = PascalContextMT(pascal_root, "train", tasks=("sal",))[1]
    assert set(only) == {"image", "sal", "meta"}


def test_pascal_semseg_values_and_fallback_folder(pascal_root):
    ds = PascalContextMT(pascal_root, "train", tasks=("semseg",))
    assert torch.equal(ds[0]["semseg"], torch.from_numpy(SEMSEG.astype(np.int64)))
    assert int((ds[0]["semseg"] == 255).sum()) == W  # ignore row kept
    # Image 2 has no VOC12 file: read from semseg/pascal-context.
    assert torch.equal(ds[1]["semseg"], torch.from_numpy(((SEMSEG + 1) % 21).astype(np.int64)))


def test_pascal_semseg_palette_png_gives_indices(pascal_root):
    img = Image.fromarray(SEMSEG).convert("P")  # same indices, palette-encoded like VOC
    img.putpalette([v for i in range(256) for v in ((i * 7) % 256, (i * 3) % 256, i)])
    img.save(pascal_root / "semseg" / "VOC12" / f"{PASCAL_TRAIN[0]}.png")
    ds = PascalContextMT(pascal_root, "train", tasks=("semseg",))
    assert torch.equal(ds[0]["semseg"], torch.from_numpy(SEMSEG.astype(np.int64)))


def test_pascal_human_parts_decoding(pascal_root):
    ds = PascalContextMT(pascal_root, "train", tasks=("human_parts",))
    expect = np.zeros((H, W), dtype=np.int64)
    expect[1:3, 2:4] = PERSON_PART_GROUPS["head"]   # 1
    expect[3:5, 1:2] = PERSON_PART_GROUPS["luarm"]  # 3
    expect[6:7, 3:5] = PERSON_PART_GROUPS["rfoot"]  # 6
    expect[2:5, 2:5] = PERSON_PART_GROUPS["torso"]  # 2, painted after (over) the head
    expect[5:8, 8:9] = PERSON_PART_GROUPS["llleg"]  # 6, second person
    assert torch.equal(ds[0]["human_parts"], torch.from_numpy(expect))
    assert (PERSON_PART_GROUPS["head"], PERSON_PART_GROUPS["torso"], PERSON_PART_GROUPS["luarm"],
            PERSON_PART_GROUPS["llarm"], PERSON_PART_GROUPS["ruleg"], PERSON_PART_GROUPS["rlleg"]) == (1, 2, 3, 4, 5, 6)
    # No person -> all ignore; a person without parts -> all ignore.
    assert torch.equal(ds[1]["human_parts"], torch.full((H, W), 255, dtype=torch.int64))
    val = PascalContextMT(pascal_root, "val", tasks=("human_parts",))
    assert torch.equal(val[0]["human_parts"], torch.full((H, W), 255, dtype=torch.int64))


def test_pascal_edges_from_labelmap_boundaries(pascal_root):
    e = PascalContextMT(pascal_root, "train", tasks=("edge",))[0]["edge"]
    expect = np.zeros((H, W), dtype=np.float32)
    expect[:6, 4] = 1   # 7 | 9 vertical boundary, drawn on the left side
    expect[5, :] = 1    # 7/9 over 3, drawn on the upper side
    assert torch.equal(e, torch.from_numpy(expect))
    assert np.array_equal(label_boundaries(np.ones((3, 3))), np.zeros((3, 3), np.float32))


def test_pascal_normals_decode_and_class_masking(pascal_root):
    n = PascalContextMT(pascal_root, "train", tasks=("normals",))[0]["normals"]
    expect = torch.from_numpy((2.0 * NORMALS_RAW.astype(np.float32) / 255.0 - 1.0).transpose(2, 0, 1).copy())
    assert torch.equal(n, expect)
    assert n[:, 0, 0].tolist() == pytest.approx([2 * float(v) / 255 - 1 for v in NORMALS_RAW[0, 0]])
    masked = PascalContextMT(pascal_root, "train", tasks=("normals",), normals_valid_classes=[9])[0]["normals"]
    keep = torch.from_numpy(LABELMAP == 9)
    assert torch.equal(masked[:, keep], expect[:, keep])
    assert bool((masked[:, ~keep] == 255).all())  # zero norm -> ignore in every channel


def test_pascal_saliency_threshold(pascal_root):
    sal = PascalContextMT(pascal_root, "train", tasks=("sal",))[0]["sal"]
    row = [0, 0, 1, 1, 1, 0, 1, 0, 1, 0]  # v / 255 > 0.5  <=>  v >= 128
    assert torch.equal(sal, torch.tensor([row] * H, dtype=torch.float32))


def test_pascal_errors_name_paths(pascal_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        PascalContextMT(tmp_path / "nope")
    with pytest.raises(ValueError, match=r"valid tasks: \['semseg', 'human_parts', 'sal', 'normals', 'edge'\]"):
        PascalContextMT(pascal_root, tasks=("semseg", "depth"))
    with pytest.raises(ValueError, match="'test'"):
        PascalContextMT(pascal_root, split="test")
    (pascal_root / "ImageSets" / "Context" / "val.txt").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"split file not found: .*val\.txt"):
        PascalContextMT(pascal_root, split="val")
    (pascal_root / "sal_distill" / f"{PASCAL_TRAIN[1]}.png").unlink()
    with pytest.raises(FileNotFoundError, match=rf"sal_distill/{PASCAL_TRAIN[1]}\.png"):
        PascalContextMT(pascal_root, tasks=("sal",))
    PascalContextMT(pascal_root, tasks=("semseg",))  # other tasks do not need the file
    import shutil
    shutil.rmtree(pascal_root / "normals_distill")
    with pytest.raises(FileNotFoundError, match=r"normals folder not found: .*normals_distill"):
        PascalContextMT(pascal_root, tasks=("normals",))


def test_pascal_corrupt_and_out_of_range_files(pascal_root):
    bad = pascal_root / "semseg" / "VOC12" / f"{PASCAL_TRAIN[0]}.png"
    bad.write_bytes(b"\x89PNG not really")
    ds = PascalContextMT(pascal_root, tasks=("semseg",))
    with pytest.raises(CorruptFileError, match=str(bad)) as info:
        ds[0]
    assert isinstance(info.value, ValueError) and info.value.path == str(bad)
    bad2 = pascal_root / "semseg" / "pascal-context" / f"{PASCAL_TRAIN[1]}.png"
    _png(bad2, np.full((H, W), 40, dtype=np.uint8))
    with pytest.raises(CorruptFileError, match=r"values \[40\]"):
        ds[1]
    mat = pascal_root / "human_parts" / f"{PASCAL_TRAIN[0]}.mat"
    sio.savemat(mat, {"other": np.ones(3)})
    with pytest.raises(CorruptFileError, match=r"no variable 'anno'"):
        PascalContextMT(pascal_root, tasks=("human_parts",))[0]
    _png(pascal_root / "normals_distill" / f"{PASCAL_TRAIN[0]}.png", np.zeros((H, W), np.uint8))
    with pytest.raises(CorruptFileError, match="1 channel"):
        PascalContextMT(pascal_root, tasks=("normals",))[0]


def test_decompression_bomb_is_a_corrupt_file_naming_it(pascal_root, monkeypatch):
    # PIL refuses images of more than 2 x MAX_IMAGE_PIXELS pixels with DecompressionBombError (not an
    # OSError); a lower limit makes the tiny fixture image one.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", H * W // 4)
    ds = PascalContextMT(pascal_root, tasks=("semseg",))
    with pytest.raises(CorruptFileError, match=rf"cannot decode image .*{PASCAL_TRAIN[0]}\.jpg: Image size") as info:
        ds[0]
    assert info.value.path.endswith(f"{PASCAL_TRAIN[0]}.jpg")


# --------------------------------------------------------------------------- NYUD
NYU_TRAIN, NYU_VAL = ["0003", "0004"], ["0005"]
SEG_RAW = (np.arange(H * W, dtype=np.uint8).reshape(H, W) % 41)


@pytest.fixture
def nyud_root(tmp_path):
    root = tmp_path / "NYUD_MT"
    (root / "gt_sets").mkdir(parents=True)
    (root / "gt_sets" / "train.txt").write_text("\n".join(NYU_TRAIN))
    (root / "gt_sets" / "val.txt").write_text("\n".join(NYU_VAL))
    for sub in ("depth", "normals", "edge"):
        (root / sub).mkdir()
    for k, name in enumerate(NYU_TRAIN + NYU_VAL):
        _jpg(root / "images" / f"{name}.jpg", 10 + k)
        _png(root / "segmentation" / f"{name}.png", SEG_RAW)
        depth = _rng(k).uniform(0.5, 9.0, (H, W)).astype(np.float32)
        depth[0, :3] = 0
        np.save(root / "depth" / f"{name}.npy", depth)
        normals = _rng(20 + k).uniform(-1, 1, (H, W, 3)).astype(np.float32)
        normals[2, 2] = 0
        np.save(root / "normals" / f"{name}.npy", normals)
        np.save(root / "edge" / f"{name}.npy", (_rng(30 + k).random((H, W)) > 0.7).astype(np.float32))
    return root


def test_nyud_decoding(nyud_root):
    ds = NYUDMT(nyud_root, "train")
    assert len(ds) == 2 and len(NYUDMT(nyud_root, "val")) == 1
    s = ds[1]
    seg = np.where(SEG_RAW == 0, 255, SEG_RAW.astype(np.int64) - 1)
    assert torch.equal(s["semseg"], torch.from_numpy(seg))
    assert s["semseg"][0, 1].item() == 0 and s["semseg"][0, 0].item() == 255  # raw 1 -> 0, raw 0 -> ignore
    assert int(s["semseg"][s["semseg"] != 255].max()) == 39
    depth = np.load(nyud_root / "depth" / "0004.npy")
    assert s["depth"].shape == (1, H, W)
    assert torch.equal(s["depth"][0, 1:], torch.from_numpy(depth[1:]))
    assert s["depth"][0, 0, :3].tolist() == [255.0] * 3
    normals = np.load(nyud_root / "normals" / "0004.npy").transpose(2, 0, 1)
    assert s["normals"][:, 2, 2].tolist() == [255.0] * 3
    keep = torch.ones(H, W, dtype=torch.bool)
    keep[2, 2] = False
    assert torch.equal(s["normals"][:, keep], torch.from_numpy(normals.copy())[:, keep])
    assert torch.equal(s["edge"], torch.from_numpy(np.load(nyud_root / "edge" / "0004.npy")))
    assert torch.equal(s["image"], _decoded_jpg(nyud_root / "images" / "0004.jpg"))


def test_nyud_errors(nyud_root):
    with pytest.raises(ValueError, match=r"valid tasks: \['semseg', 'depth', 'normals', 'edge'\]"):
        NYUDMT(nyud_root, tasks=("sal",))
    (nyud_root / "depth" / "0003.npy").write_bytes(b"garbage")
    with pytest.raises(CorruptFileError, match=r"depth/0003\.npy"):
        NYUDMT(nyud_root, tasks=("depth",))[0]
    np.save(nyud_root / "normals" / "0003.npy", np.zeros((H, W), np.float32))
    with pytest.raises(CorruptFileError, match=r"normals/0003\.npy has shape \(8, 10\)"):
        NYUDMT(nyud_root, tasks=("normals",))[0]
    np.save(nyud_root / "edge" / "0003.npy", np.zeros((H + 1, W), np.float32))
    with pytest.raises(CorruptFileError, match="expected the image size 8x10"):
        NYUDMT(nyud_root, tasks=("edge",))[0]
    (nyud_root / "edge" / "0004.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"edge/0004\.npy"):
        NYUDMT(nyud_root, tasks=("edge",))


# --------------------------------------------------------------------------- Taskonomy
S = 8  # fixture images are S x S; base_size 8, crop 6 -> offset 1


def _tk_name(building, k):
    return f"{building}_point_{k}_view_0_domain_rgb.png"


@pytest.fixture
def taskonomy_root(tmp_path):
    root = tmp_path / "tiny_merged"
    rng = _rng(0)
    for _b_i, building in enumerate(("allensville", "ihlen")):
        for k in range(2):
            name = _tk_name(building, k)
            _png(root / "rgb" / name, rng.integers(0, 256, (S, S, 3), dtype=np.uint8))
            seg = (np.arange(S * S).reshape(S, S) % 18).astype(np.uint8)
            _png(root / "segment_semantic" / label_name("segment_semantic", name), seg)
            depth = rng.integers(0, 60000, (S, S)).astype(np.uint16)
            depth[0, 0] = 65535
            depth[3, 4] = 64500
            _png(root / "depth_euclidean" / label_name("depth_euclidean", name), depth)
            _png(root / "depth_zbuffer" / label_name("depth_zbuffer", name), (depth // 2).astype(np.uint16))
            for t in ("edge_texture", "edge_occlusion", "keypoints2d", "keypoints3d"):
                _png(root / t / label_name(t, name), rng.integers(0, 65536, (S, S)).astype(np.uint16))
            for t in ("normal", "reshading", "principal_curvature"):
                _png(root / t / label_name(t, name), rng.integers(0, 256, (S, S, 3), dtype=np.uint8))
    return root


def _raw(root, task, name):
    return np.asarray(Image.open(root / task / label_name(task, name))).astype(np.float64)


def test_taskonomy_label_encodings_and_masks(taskonomy_root):
    ds = TaskonomyTiny(taskonomy_root, base_size=S, crop_size=S - 2)
    assert len(ds) == 4 and ds.tasks[0] == "segment_semantic"
    s = ds[0]
    name = ds.files[0]
    assert name == _tk_name("allensville", 0) and s["meta"]["building"] == "allensville"
    c = slice(1, S - 1)  # centre crop offset (8 - 6) // 2
    raw_img = np.asarray(Image.open(taskonomy_root / "rgb" / name), dtype=np.float32) / 255
    assert torch.equal(s["image"], torch.from_numpy(raw_img.transpose(2, 0, 1)[:, c, c].copy()))
    seg = _raw(taskonomy_root, "segment_semantic", name).astype(np.int64)
    assert torch.equal(s["segment_semantic"], torch.from_numpy((np.maximum(seg, 1) - 1)[c, c]))
    d = _raw(taskonomy_root, "depth_euclidean", name)
    exp = (np.log1p(d) / np.log(2.0 ** 16)).astype(np.float32)
    assert torch.equal(s["depth_euclidean"][0], torch.from_numpy(exp[c, c]))
    dz = _raw(taskonomy_root, "depth_zbuffer", name)
    assert torch.equal(s["depth_zbuffer"][0],
                       torch.from_numpy((np.log1p(dz) / np.log(2.0 ** 16)).astype(np.float32)[c, c]))
    valid = d < 64500
    for t in ("depth_euclidean", "depth_zbuffer", "edge_occlusion", "keypoints3d", "principal_curvature"):
        assert torch.equal(s["mask"][t][0], torch.from_numpy(valid[c, c])), t
    assert not bool(s["mask"]["depth_zbuffer"][0, 2, 3])  # raw 64500 at (3, 4) is invalid
    for t in ("segment_semantic", "normal", "edge_texture", "keypoints2d", "reshading"):
        assert bool(s["mask"][t].all()), t
    for t in ("edge_texture", "edge_occlusion", "keypoints3d"):
        assert torch.equal(s[t][0],
                           torch.from_numpy((_raw(taskonomy_root, t, name) / 2 ** 16).astype(np.float32)[c, c]))
    k2 = np.clip(_raw(taskonomy_root, "keypoints2d", name) / 2 ** 16, 0, 0.005) / 0.005
    assert torch.equal(s["keypoints2d"][0], torch.from_numpy(k2.astype(np.float32)[c, c]))
    n = _raw(taskonomy_root, "normal", name) / 255
    assert torch.equal(s["normal"], torch.from_numpy(n.astype(np.float32).transpose(2, 0, 1)[:, c, c].copy()))
    rs = _raw(taskonomy_root, "reshading", name)[..., 0] / 255
    assert s["reshading"].shape == (1, S - 2, S - 2)
    assert torch.equal(s["reshading"][0], torch.from_numpy(rs.astype(np.float32)[c, c]))
    pc = _raw(taskonomy_root, "principal_curvature", name)[..., :2] / 255
    assert s["principal_curvature"].shape == (2, S - 2, S - 2)
    assert torch.equal(s["principal_curvature"],
                       torch.from_numpy(pc.astype(np.float32).transpose(2, 0, 1)[:, c, c].copy()))


def test_taskonomy_buildings_splits_resize_and_random_crop(taskonomy_root):
    with pytest.warns(UserWarning, match="'mcdade', 'muleshoe', 'noxapater', 'uvalda'"):
        test = TaskonomyTiny(taskonomy_root, tasks=("segment_semantic",), split="test", base_size=S, crop_size=S)
    assert test.missing_buildings == ("mcdade", "muleshoe", "noxapater", "uvalda")
    assert [f.split("_")[0] for f in test.files] == ["ihlen", "ihlen"]
    only = TaskonomyTiny(taskonomy_root, tasks=("normal",), buildings=["allensville"], base_size=S, crop_size=S)
    assert len(only) == 2
    with pytest.raises(FileNotFoundError, match="collierville"):
        TaskonomyTiny(taskonomy_root, split="val")
    with pytest.raises(FileNotFoundError, match="'beechwood'"):
        TaskonomyTiny(taskonomy_root, buildings=["allensville", "beechwood"])
    # Resize to base 4 first: semseg by nearest (pixel centres 1, 3, 5, 7), no crop.
    small = TaskonomyTiny(taskonomy_root, tasks=("segment_semantic",), base_size=4, crop_size=4)[0]
    seg = np.maximum(_raw(taskonomy_root, "segment_semantic", small["meta"]["name"]).astype(np.int64), 1) - 1
    assert torch.equal(small["segment_semantic"], torch.from_numpy(seg[1::2, 1::2].copy()))
    # Seeded random crops: reproducible, within range, vary with the epoch.
    a = TaskonomyTiny(taskonomy_root, tasks=("normal",), base_size=S, crop_size=4, crop="random", seed=3)
    b = TaskonomyTiny(taskonomy_root, tasks=("normal",), base_size=S, crop_size=4, crop="random", seed=3)
    offs = [a._offsets(i) for i in range(4)]
    assert offs == [b._offsets(i) for i in range(4)]
    assert all(0 <= o <= S - 4 for off in offs for o in off)
    per_epoch = []
    for epoch in range(5):
        a.set_epoch(epoch)
        per_epoch.append([a._offsets(i) for i in range(4)])
    assert per_epoch[0] == offs and any(e != offs for e in per_epoch[1:])
    top, left = b._offsets(2)
    full = TaskonomyTiny(taskonomy_root, tasks=("normal",), base_size=S, crop_size=S)[2]
    assert torch.equal(b[2]["normal"], full["normal"][:, top:top + 4, left:left + 4])


def test_taskonomy_errors_and_folds(taskonomy_root):
    assert TASKONOMY_FOLDS[0] == ("reshading", "principal_curvature")
    assert TASKONOMY_FOLDS[4] == ("segment_semantic", "normal")
    assert sorted(t for f in TASKONOMY_FOLDS for t in f) == sorted(TaskonomyTiny.TASKS)
    with pytest.raises(ValueError, match="valid tasks: .*'segment_semantic'"):
        TaskonomyTiny(taskonomy_root, tasks=("semseg",))
    name = _tk_name("ihlen", 1)
    (taskonomy_root / "keypoints3d" / label_name("keypoints3d", name)).unlink()
    with pytest.raises(FileNotFoundError, match="keypoints3d/ihlen_point_1_view_0_domain_keypoints3d.png"):
        TaskonomyTiny(taskonomy_root, tasks=("keypoints3d",))
    # 8-bit where 16-bit is expected: an error, not a silently tiny label.
    p = taskonomy_root / "edge_texture" / label_name("edge_texture", name)
    _png(p, np.zeros((S, S), np.uint8))
    with pytest.raises(CorruptFileError, match="expected 16-bit"):
        TaskonomyTiny(taskonomy_root, tasks=("edge_texture",), base_size=S, crop_size=S)[3]
    import shutil
    shutil.rmtree(taskonomy_root / "depth_euclidean")
    # Depth-masked tasks need depth_euclidean even when it is not requested.
    with pytest.raises(FileNotFoundError, match="depth_euclidean folder not found"):
        TaskonomyTiny(taskonomy_root, tasks=("edge_occlusion",))


# --------------------------------------------------------------------------- transforms
def _sample(h=H, w=W, seed=0):
    g = torch.Generator().manual_seed(seed)
    normals = torch.rand(3, h, w, generator=g) * 2 - 1
    normals[:, 0, 0] = 255.0
    return {
        "image": torch.rand(3, h, w, generator=g),
        "semseg": torch.randint(0, 21, (h, w), generator=g),
        "edge": (torch.rand(h, w, generator=g) > 0.5).float(),
        "normals": normals,
        "depth": torch.rand(1, h, w, generator=g) + 1,
        "mask": {"depth": torch.rand(1, h, w, generator=g) > 0.2},
        "meta": {"name": "x", "size": torch.tensor([h, w])},
    }


def test_flip_mirrors_everything_and_negates_normal_x():
    s = _sample()
    out = T.RandomHorizontalFlip(p=1.0)(s)
    for k in ("image", "semseg", "edge", "depth"):
        assert torch.equal(out[k], s[k].flip(-1)), k
    assert torch.equal(out["mask"]["depth"], s["mask"]["depth"].flip(-1))
    n = s["normals"].flip(-1)
    assert torch.equal(out["normals"][1:], n[1:])
    valid = ~(n == 255).any(0)
    assert torch.equal(out["normals"][0][valid], -n[0][valid])
    assert out["normals"][:, 0, W - 1].tolist() == [255.0] * 3  # ignored pixel stays ignored
    assert out["meta"] is s["meta"]
    # Taskonomy-encoded normals (n + 1) / 2: x -> 1 - x.
    t = {"image": s["image"], "normal": torch.rand(3, H, W)}
    tout = T.RandomHorizontalFlip(p=1.0, normals={"normal": "unit01"})(t)
    assert torch.allclose(tout["normal"][0], 1 - t["normal"][0].flip(-1))
    assert torch.equal(T.RandomHorizontalFlip(p=0.0)(s)["normals"], s["normals"])


def test_transforms_deterministic_given_generator():
    s = _sample(seed=1)
    pipe = T.train_transforms(size=6, scales=(0.5, 1.5))
    a = pipe(s, generator=torch.Generator().manual_seed(7))
    b = pipe(s, generator=torch.Generator().manual_seed(7))
    for k in ("image", "semseg", "edge", "normals", "depth"):
        assert torch.equal(a[k], b[k]), k
        assert a[k].shape[-2:] == (6, 6)
    assert torch.equal(a["mask"]["depth"], b["mask"]["depth"])
    outs = {tuple(pipe(s, generator=torch.Generator().manual_seed(i))["semseg"].flatten().tolist()) for i in range(6)}
    assert len(outs) > 1


def test_random_crop_pads_labels_with_ignore_and_image_with_mean():
    s = _sample(h=4, w=5)
    out = T.RandomCrop((6, 7))(s, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out["semseg"][:4, :5], s["semseg"])  # no room to move: offset (0, 0)
    assert bool((out["semseg"][4:] == 255).all()) and bool((out["semseg"][:, 5:] == 255).all())
    assert bool((out["edge"][4:] == 255).all()) and bool((out["depth"][0, :, 5:] == 255).all())
    assert not bool(out["mask"]["depth"][0, 4:].any())  # bool masks pad with False
    assert torch.allclose(out["image"][:, 5, 6], torch.tensor(T.IMAGENET_MEAN))
    normed = T.Normalize()(out)
    assert torch.allclose(normed["image"][:, 5, 6], torch.zeros(3), atol=1e-6)
    # A crop inside a large sample is a plain slice at the drawn offset.
    big = _sample(h=10, w=12)
    g = torch.Generator().manual_seed(3)
    top = int(torch.randint(0, 10 - 4 + 1, (), generator=g))
    left = int(torch.randint(0, 12 - 5 + 1, (), generator=g))
    crop = T.RandomCrop((4, 5))(big, generator=torch.Generator().manual_seed(3))
    assert torch.equal(crop["depth"], big["depth"][..., top:top + 4, left:left + 5])


def test_resize_nearest_for_discrete_and_ignore_aware_bilinear():
    seg = torch.arange(16).reshape(4, 4)
    assert torch.equal(T.resize_nearest(seg, (2, 2)), torch.tensor([[5, 7], [13, 15]]))
    assert torch.equal(T.resize_nearest(seg, (8, 8)), seg.repeat_interleave(2, 0).repeat_interleave(2, 1))
    out = T.Resize((8, 8))({"image": torch.rand(3, 4, 4), "semseg": seg, "edge": (seg % 2).float()})
    assert out["semseg"].dtype == torch.int64 and set(out["semseg"].unique().tolist()) <= set(range(16))
    assert set(out["edge"].unique().tolist()) == {0.0, 1.0}  # nearest, though float
    # Continuous: plain bilinear where nothing is ignored ...
    d = torch.rand(1, 4, 4) + 1
    ref = torch.nn.functional.interpolate(d[None], size=(6, 6), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(T.resize_bilinear(d, (6, 6), ignore_value=255), ref)
    # ... and 255 never leaks into valid values: a constant field with an
    # ignored column upsamples to that constant or 255, nothing in between.
    c = torch.full((1, 4, 4), 2.0)
    c[:, :, 0] = 255
    up = T.resize_bilinear(c, (8, 8), ignore_value=255)
    assert set(up.unique().tolist()) == {2.0, 255.0}
    assert bool((up[..., :, :1] == 255).all()) and bool((up[..., :, 3:] == 2.0).all())


def test_eval_transforms_resize_and_pad():
    s = _sample(h=5, w=6)
    r = T.eval_transforms(size=4)(s)
    assert r["image"].shape == (3, 4, 4) and r["semseg"].shape == (4, 4)
    p = T.eval_transforms(size=8, mode="pad")(s)
    assert torch.equal(p["semseg"][:5, :6], s["semseg"]) and bool((p["semseg"][5:] == 255).all())
    mean = torch.tensor(T.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(T.IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(p["image"][:, :5, :6], (s["image"] - mean) / std)
    with pytest.raises(ValueError, match="'resize' or 'pad'"):
        T.eval_transforms(mode="crop")


def test_pascal_with_transforms_end_to_end(pascal_root):
    ds = PascalContextMT(pascal_root, "train", transform=lambda s: T.train_transforms(size=6)(
        s, generator=torch.Generator().manual_seed(0)))
    s = ds[0]
    assert s["image"].shape == (3, 6, 6) and s["normals"].shape == (3, 6, 6) and s["semseg"].shape == (6, 6)
    assert s["meta"]["size"].tolist() == [H, W]


def test_train_and_eval_a_swin_model_on_pascal_from_the_command_line(pascal_root, tmp_path, capsys):
    """`fastdense train --data pascal` trains on the loader's items with the task table's losses;
    `eval` rebuilds model and data from the checkpoint and prints Δm (PASCAL's four tasks)."""
    from fastdense import cli

    run = tmp_path / "run"
    tiny_swin = [f"--model-arg={a}" for a in ("embed_dim=16", "depths=1,1,1,1", "num_heads=1,1,2,2",
                                                "window_size=4", "shared_rank=4", "decoder_channels=4,4,4,4")]
    code = cli.main(["train", "--model", "mtlora_swin_t", *tiny_swin, "--data", "pascal", "--data-root",
                     str(pascal_root), "--resolution", "64", "--steps", "2", "--batch-size", "2", "--threads", "1",
                     "--no-progress", "--run-dir", str(run)])
    out = capsys.readouterr()
    assert code == 0, out.err
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["config"]["spec"]["data"]["dataset"] == "pascal"
    assert ckpt["config"]["tasks"] == ["semseg", "human_parts", "sal", "normals"]
    assert cli.main(["eval", "--checkpoint", str(run / "checkpoint.pt"), "--data", "pascal"]) == 0
    text = capsys.readouterr().out
    assert "human_parts" in text and re.search(r"delta_m vs the single-task Swin-T baselines: [-+]\d+\.\d\d%", text)
    assert cli.main(["eval", "--checkpoint", str(run / "checkpoint.pt"), "--data", "nyud"]) == 2
    assert "was trained on pascal" in capsys.readouterr().err
