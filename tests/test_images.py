"""Image folders at any resolution: real-world files, the decode-once cache, the policy, the contract."""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from conftest import FAST_LATENCY
from conftest import photo as _photo
from conftest import photo_folder as _folder

from toolchain.data import imagefile
from toolchain.data.loaders import build_data
from toolchain.errors import DataError
from toolchain.recipe import DataConfig


def _save(path, img, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def _cfg(root, tmp_path, **kw):
    return DataConfig(name="imagefolder", root=str(root), cache_dir=str(tmp_path / "cache"), val_fraction=0.25, **kw)


def test_mixed_formats_and_sizes_become_one_model_size(tmp_path):
    """Grey, RGBA, palette with transparency, CMYK JPEG, 16-bit PNG, tiny and wide photos: all load."""
    from PIL import Image

    root = _folder(tmp_path / "data")
    odd = tmp_path / "data" / "train" / "cat"
    _save(odd / "grey.png", Image.new("L", (50, 50), 90))
    _save(odd / "rgba.png", Image.new("RGBA", (30, 70), (255, 0, 0, 0)))  # fully transparent: white after compositing
    palette = Image.new("P", (40, 40), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.info["transparency"] = 0
    _save(odd / "palette.png", palette, transparency=0)
    _save(odd / "cmyk.jpg", Image.new("CMYK", (64, 48), (0, 255, 255, 0)))
    _save(odd / "deep.png", Image.fromarray(np.full((36, 36), 40000, dtype=np.uint16)))
    _save(odd / "tiny.bmp", Image.new("RGB", (5, 7), (1, 2, 3)))
    _save(odd / "wide.webp", _photo(300, 20, seed=9))
    b = build_data(_cfg(root, tmp_path, image_size=[48, 40], batch_size=4), seed=0)
    assert b.input_shape == (3, 48, 40) and b.policy.frame == (54, 45)  # 48 / 0.875, 40 / 0.875
    assert b.train.num_samples + b.val.num_samples == 15 and b.stats["train_skipped_images"] == 0
    assert b.stats["train_enlarged_images"] >= 2  # tiny.bmp, wide.webp (20 px high)
    x, _ = next(iter(b.train))
    assert x.shape == (4, 3, 48, 40) and x.dtype == torch.float32
    assert next(iter(b.test))[0].shape[1:] == (3, 48, 40)


def test_conversions_match_what_a_viewer_shows(tmp_path):
    from PIL import Image

    rgba = _save(tmp_path / "a.png", Image.new("RGBA", (4, 4), (255, 0, 0, 0)))
    assert np.asarray(imagefile.read_image(rgba)).max() == 255 and np.asarray(imagefile.read_image(rgba)).min() == 255
    deep = _save(tmp_path / "d.png", Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)))
    assert (
        imagefile.read_image(deep, "grey").mode == "L" and np.asarray(imagefile.read_image(deep, "grey")).min() == 255
    )
    cmyk = _save(tmp_path / "c.jpg", Image.new("CMYK", (8, 8), (0, 255, 255, 0)), quality=100)
    r, g, b = np.asarray(imagefile.read_image(cmyk)).reshape(-1, 3).mean(axis=0)
    assert r > 200 and g < 60 and b < 60  # CMYK (0, 255, 255, 0) is red


def test_exif_rotated_photo_is_turned_upright(tmp_path):
    from PIL import Image

    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 20))  # left half white as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = _save(tmp_path / "r.jpg", img, exif=exif.tobytes(), quality=95)
    shown = np.asarray(imagefile.read_image(path))
    assert shown.shape[:2] == (40, 20)  # upright: portrait
    assert shown[:20].mean() > 200 and shown[20:].mean() < 60  # the stored left half is now on top


def _truncated_jpeg(path):
    buf = io.BytesIO()
    _photo(64, 64, seed=1).save(buf, "JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def test_truncated_file_is_one_line_naming_it_or_skipped_and_counted(tmp_path):
    root = _folder(tmp_path / "data")
    bad = _truncated_jpeg(root / "train" / "dog" / "cut.jpg")
    with pytest.raises(DataError) as err:
        build_data(_cfg(root, tmp_path), seed=0)
    assert str(bad) in str(err.value) and "skip_bad_images" in str(err.value) and "\n" not in str(err.value)
    assert not list((tmp_path / "cache").glob("*.json"))  # nothing half-written looks complete
    b = build_data(_cfg(root, tmp_path, skip_bad_images=True), seed=0)
    assert b.stats["train_skipped_images"] == 1
    assert b.train.num_samples + b.val.num_samples == 8


def _png_header_only(path, width: int, height: int) -> None:
    """A PNG that claims width x height pixels (a decompression bomb's header) in a few bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def test_decompression_bomb_is_one_data_error_naming_the_file(tmp_path):
    root = _folder(tmp_path / "data")
    bomb = root / "train" / "cat" / "bomb.png"
    _png_header_only(bomb, 40000, 40000)  # 1.6 G pixels: PIL refuses it with DecompressionBombError
    with pytest.raises(DataError) as err:
        build_data(_cfg(root, tmp_path), seed=0)
    assert str(bomb) in str(err.value) and "DecompressionBombError" in str(err.value) and "\n" not in str(err.value)


def test_empty_class_folder_and_unknown_test_class_are_clear_errors(tmp_path):
    root = _folder(tmp_path / "data")
    (root / "train" / "owl").mkdir()
    with pytest.raises(DataError, match="class folder .*owl has no images"):
        build_data(_cfg(root, tmp_path), seed=0)
    (root / "train" / "owl").rmdir()
    _save(root / "test" / "zebra" / "z.png", _photo(10, 10, 0))
    with pytest.raises(DataError, match="test/zebra is not a class of train/"):
        build_data(_cfg(root, tmp_path), seed=0)


def test_cache_is_reused_and_follows_the_files_and_the_size(tmp_path):
    root = _folder(tmp_path / "data")
    first = build_data(_cfg(root, tmp_path), seed=0)
    files = sorted((tmp_path / "cache").glob("*.u8"))
    stamps = [f.stat().st_mtime_ns for f in files]
    again = build_data(_cfg(root, tmp_path), seed=0)
    assert again.fingerprint == first.fingerprint and [f.stat().st_mtime_ns for f in files] == stamps
    _photo(60, 40, seed=77).save(root / "train" / "cat" / "0.png")  # an edited photo
    os.utime(root / "train" / "cat" / "0.png", ns=(1, 1))
    assert build_data(_cfg(root, tmp_path), seed=0).fingerprint != first.fingerprint
    assert build_data(_cfg(root, tmp_path, image_size=64), seed=0).fingerprint != first.fingerprint


def test_evaluation_view_is_what_the_device_computes_from_the_file(tmp_path):
    """The cache + batch crop and imagefile.model_input (infer.py's code) give the same input."""
    root = _folder(tmp_path / "data", size=(90, 50))
    b = build_data(_cfg(root, tmp_path, image_size=32, test_subset=None, eval_batch_size=64), seed=0)
    x, _ = next(iter(b.test))
    contract = b.contract()
    files = sorted(str(p) for p in (root / "test").glob("*/*.png"))
    device = np.stack([imagefile.model_input(f, contract) for f in files])
    assert np.allclose(device, x.numpy(), atol=1e-5)


def test_augmentation_does_not_depend_on_the_number_of_workers(tmp_path):
    root = _folder(tmp_path / "data", per_class=6)

    def epoch(workers):
        b = build_data(_cfg(root, tmp_path, image_size=24, batch_size=4, num_workers=workers), seed=0)
        b.train.set_epoch(1)
        return torch.cat([x for x, _ in b.train])

    in_process = epoch(0)
    assert in_process.shape[1:] == (3, 24, 24)
    assert torch.equal(in_process, epoch(2))


def test_random_resized_crop_stays_inside_the_frame_and_varies():
    from toolchain.data.transforms import Policy

    policy = Policy(
        size=(16, 16),
        frame=(40, 30),
        resize=(40, 30),
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
        train_crop="random_resized",
        scale=(0.1, 1.0),
    )
    params = policy.plan(64, torch.Generator().manual_seed(0), augment=True)
    boxes = params["boxes"]
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 40).all() and (left + w <= 30).all()
    assert len(set(map(tuple, boxes.tolist()))) > 50
    frames = torch.randint(0, 255, (64, 3, 40, 30), dtype=torch.uint8)
    assert policy.apply(frames, params).shape == (64, 3, 16, 16)


def test_builtin_dataset_at_another_size_and_its_defaults(fmnist_root):
    b = build_data(DataConfig(root=str(fmnist_root), image_size=48, batch_size=8), seed=0)
    assert b.input_shape == (3, 48, 48) and next(iter(b.train))[0].shape == (8, 3, 48, 48)
    assert b.contract()["fit"] == "pad" and b.contract()["image_mode"] == "grey" and b.contract()["frame"] == [32, 32]
    plain = build_data(DataConfig(root=str(fmnist_root)), seed=0)
    assert plain.input_shape == (3, 32, 32) and plain.policy.train_crop == "none"


@pytest.mark.slow
def test_imagefolder_end_to_end_at_another_size(tmp_path):
    """Mixed-size, mixed-format photos at 40x48 (height x width): the shipped ONNX takes that size,
    its metadata carries the whole contract, the bench ran at it, the package reproduces it."""
    import json

    import onnx
    import yaml
    from PIL import Image

    from toolchain.cli import run

    root = _folder(tmp_path / "data", per_class=12, size=(70, 50))
    _save(root / "train" / "cat" / "grey.jpg", Image.new("L", (90, 60), 100))
    _save(root / "train" / "dog" / "rgba.png", Image.new("RGBA", (20, 30), (0, 0, 255, 128)))
    recipe = {
        "name": "photos",
        "output_dir": str(tmp_path / "export"),
        "data": {
            "name": "imagefolder",
            "root": str(root),
            "image_size": [40, 48],
            "batch_size": 8,
            "cache_dir": str(tmp_path / "cache"),
            "val_fraction": 0.2,
        },
        "student": {"model": "mobilenet_v3_small"},
        "distill": {"epochs": 1, "lr": 0.05, "loss": "ce"},
        "prune": {"method": "channel", "sparsity": 0.5},
        "finetune": {"epochs": 1, "lr": 0.01, "loss": "ce"},
        "bench": {
            "batch_sizes": [1, 2],
            "warmup": 1,
            "iterations": 3,
            "time_budget_s": 0.1,
            "compare_torch": False,
            "latency": FAST_LATENCY,
        },
        "package": {"golden_images": 2},
        "tracking": {"enabled": False},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert run(["compress", str(path)]) == 0
    run_dir = tmp_path / "export" / "photos"
    model = onnx.load(str(run_dir / "model.onnx"))
    dims = [d.dim_value or d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims[1:] == [3, 40, 48]
    meta = {p.key: p.value for p in model.metadata_props}
    contract = json.loads(meta["preprocess"])
    assert contract["crop"] == [40, 48] and contract["resize"] == [45, 54] and contract["interpolation"] == "bilinear"
    assert (
        contract["layout"] == "NCHW"
        and contract["channel_order"] == "RGB"
        and json.loads(meta["class_names"]) == ["cat", "dog"]
    )
    shapes = set()

    def walk(node):
        if isinstance(node, dict):
            if "input_shape" in node:
                shapes.add(tuple(node["input_shape"][1:]))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads((run_dir / "bench.json").read_text()))
    assert shapes == {(3, 40, 48)}
    shipped = json.loads((run_dir / "package" / "preprocess.json").read_text())
    assert shipped["frame"] == [45, 54] and (run_dir / "package" / "imagefile.py").is_file()


def test_pretrained_weights_set_the_data_defaults_and_the_recipe_overrides_them(tmp_path):
    from toolchain.engine.runner import pretrained_preprocessing
    from toolchain.recipe import validate_dict

    root = _folder(tmp_path / "data")
    base = {
        "name": "p",
        "data": {"name": "imagefolder", "root": str(root), "cache_dir": str(tmp_path / "cache")},
        "teacher": {"model": "resnet18", "train": {"epochs": 1}},
        "student": {"model": "torchvision/resnet50", "weights": "IMAGENET1K_V2"},
        "export": None,
        "bench": None,
    }
    recipe = validate_dict(base)
    weights = pretrained_preprocessing(recipe)
    policy = build_data(recipe.data, seed=0, weights_preprocessing=weights).policy
    assert policy.size == (224, 224) and policy.resize == (232, 232)  # resnet50 V2: resize 232, crop 224
    assert policy.mean == pytest.approx((0.485, 0.456, 0.406))
    smaller = validate_dict({**base, "data": {**base["data"], "image_size": 160, "interpolation": "bicubic"}})
    policy = build_data(smaller.data, seed=0, weights_preprocessing=weights).policy
    assert policy.size == (160, 160) and policy.interpolation == "bicubic"
    assert pretrained_preprocessing(validate_dict({**base, "student": {"model": "mobilenet_v2"}})) is None
