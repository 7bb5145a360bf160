"""Tests for stellar_hf.data: synthetic scenes, the multi-view transform, image loading, collation."""

import logging
import random

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import InterpolationMode

from stellar_hf import StellarImageProcessor
from stellar_hf.data import (
    CLASS_NAMES,
    COLOR_NAMES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    ImageFolder,
    MultiViewTransform,
    PretrainingDataset,
    StreamingPretrainingDataset,
    SyntheticScenes,
    SyntheticScenesConfig,
    collate_views,
    load_hub_dataset,
    load_image_folder,
    normalize,
    synthetic_scenes_dataset,
    to_rgb,
)

# --------------------------------------------------------------------------- synthetic scenes


def test_scenes_are_a_pure_function_of_seed_split_index():
    a = SyntheticScenes(num_images=20, seed=3)
    b = SyntheticScenes(num_images=20, seed=3)
    # Read b in reverse: order must not matter.
    items_b = {i: b[i] for i in reversed(range(20))}
    for i in range(20):
        item_a = a[i]
        assert item_a["image"].tobytes() == items_b[i]["image"].tobytes()
        assert torch.equal(item_a["mask"], items_b[i]["mask"])
        assert item_a["label"] == items_b[i]["label"]
    assert a[-1]["image"].tobytes() == a[19]["image"].tobytes()

    other_split = SyntheticScenes(num_images=20, seed=3, split="validation")
    other_seed = SyntheticScenes(num_images=20, seed=4)
    for i in range(5):
        assert a[i]["image"].tobytes() != other_split[i]["image"].tobytes()
        assert a[i]["image"].tobytes() != other_seed[i]["image"].tobytes()
    # Validation and test streams are disjoint too.
    test_split = SyntheticScenes(num_images=20, seed=3, split="test")
    assert all(other_split[i]["image"].tobytes() != test_split[i]["image"].tobytes() for i in range(5))


def test_scene_item_format():
    scenes = SyntheticScenes(num_images=4, image_size=48)
    item = scenes[0]
    assert isinstance(item["image"], Image.Image) and item["image"].mode == "RGB"
    assert item["image"].size == (48, 48)
    assert item["mask"].dtype == torch.int64 and item["mask"].shape == (48, 48)
    assert len(item["shapes"]) == len(item["colors"]) == item["num_objects"]
    assert all(0 <= c < len(COLOR_NAMES) for c in item["colors"])
    with pytest.raises(IndexError):
        scenes[4]


def test_scene_config_validation():
    with pytest.raises(ValueError, match="split"):
        SyntheticScenesConfig(split="val")
    with pytest.raises(ValueError, match="dominant_size"):
        SyntheticScenesConfig(dominant_size=(0.1, 0.2), distractor_size=(0.05, 0.12))
    with pytest.raises(ValueError, match="max_objects"):
        SyntheticScenesConfig(min_objects=3, max_objects=2)
    # Keyword overrides on top of a config.
    scenes = SyntheticScenes(SyntheticScenesConfig(num_images=5), image_size=32)
    assert len(scenes) == 5 and scenes[0]["image"].size == (32, 32)


def test_scene_labels_are_balanced():
    scenes = SyntheticScenes(num_images=600)
    labels = np.array([scenes.render(i)["label"] for i in range(600)])
    assert labels.min() >= 0 and labels.max() < len(CLASS_NAMES)
    counts = np.bincount(labels, minlength=len(CLASS_NAMES))
    # 100 expected per class, binomial sd ~9: a wide margin, the data are fixed anyway.
    assert counts.min() >= 65 and counts.max() <= 135, counts


def test_dominant_object_is_the_largest_and_mask_ids_match():
    scenes = SyntheticScenes(num_images=300, seed=1)
    object_counts = []
    for i in range(300):
        scene = scenes.render(i)
        mask, k = scene["mask"], len(scene["shapes"])
        object_counts.append(k)
        assert 1 <= k <= 4
        # Every id 0..K is on screen (nearly hidden objects are dropped), none beyond.
        assert set(np.unique(mask).tolist()) == set(range(k + 1))
        visible = np.bincount(mask.ravel(), minlength=k + 1)[1:]
        dominant = scene["dominant_id"]
        assert scene["shapes"][dominant - 1] == scene["label"]
        others = np.delete(visible, dominant - 1)
        if others.size:
            assert visible[dominant - 1] >= 1.5 * others.max(), (i, visible)
    # Both single-object and crowded scenes occur.
    assert set(object_counts) == {1, 2, 3, 4}


def test_synthetic_scenes_as_hf_dataset(tmp_path):
    pytest.importorskip("datasets")
    dataset = synthetic_scenes_dataset(num_images=6, image_size=32, seed=2, cache_dir=str(tmp_path))
    scenes = SyntheticScenes(num_images=6, image_size=32, seed=2)
    assert len(dataset) == 6
    assert dataset.features["label"].names == list(CLASS_NAMES)
    row, item = dataset[3], scenes[3]
    assert row["label"] == item["label"]
    assert np.array_equal(np.asarray(row["image"]), np.asarray(item["image"]))  # PNG is lossless
    assert np.array_equal(np.asarray(row["mask"]), item["mask"].numpy())


# --------------------------------------------------------------------------- views


def _image(size=64, seed=0):
    return SyntheticScenes(num_images=1, image_size=size, seed=seed)[0]["image"]


def test_multiview_shapes_and_ranges():
    transform = MultiViewTransform(64, num_global_views=3, num_local_views=4, local_image_size=32)
    out = transform(_image(), seed=0)
    assert set(out) == {"pixel_values", "global_views", "local_views"}
    assert out["pixel_values"].shape == (3, 64, 64)
    assert out["global_views"].shape == (3, 3, 64, 64)
    assert out["local_views"].shape == (4, 3, 32, 32)
    for value in out.values():
        assert value.dtype == torch.float32
        assert value.min() >= 0 and value.max() <= 1
    # Non-square input, tensor input, no local views.
    out = MultiViewTransform(48, 2, 0, 16)(torch.rand(3, 40, 70), seed=1)
    assert out["global_views"].shape == (2, 3, 48, 48) and out["local_views"].shape == (0, 3, 16, 16)


def test_multiview_reproducible_and_global_rng_untouched():
    transform = MultiViewTransform(64, 4, 4, 32)
    image = _image()
    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    a = transform(image, generator=torch.Generator().manual_seed(7))
    b = transform(image, generator=torch.Generator().manual_seed(7))
    c = transform(image, seed=7)  # seed= is the same as a fresh generator with that seed
    d = transform(image, generator=torch.Generator().manual_seed(8))
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == py_state
    assert np.array_equal(np.random.get_state()[1], np_state[1])
    for key in a:
        assert torch.equal(a[key], b[key]) and torch.equal(a[key], c[key])
        assert not torch.equal(a[key], d[key])
    # Views differ from each other.
    assert not torch.equal(a["global_views"][1], a["global_views"][2])
    with pytest.raises(ValueError, match="not both"):
        transform(image, generator=torch.Generator(), seed=1)


def test_main_image_is_not_colour_augmented():
    image = _image(80)
    # Whole-image crop, no flip: the main image is just the resized input.
    transform = MultiViewTransform(
        64, 2, 1, 32, global_scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, color_jitter_p=1.0, grayscale_p=1.0
    )
    out = transform(image, seed=0)
    tensor = TF.pil_to_tensor(image).float() / 255
    expected = TF.resize(tensor, [64, 64], interpolation=InterpolationMode.BICUBIC, antialias=True).clamp(0, 1)
    torch.testing.assert_close(out["pixel_values"], expected)
    # Global view 0 is the same crop, coloured (here always grayscale): equal channels.
    view0 = out["global_views"][0]
    assert not torch.allclose(view0, out["pixel_values"], atol=1e-3)
    torch.testing.assert_close(view0[0], view0[1])
    torch.testing.assert_close(out["local_views"][0][0], out["local_views"][0][2])
    # Without colour augmentation global view 0 is the main image itself.
    plain = MultiViewTransform(64, 2, 1, 32, color_augment=False)(image, seed=3)
    assert torch.equal(plain["global_views"][0], plain["pixel_values"])


def test_colour_augmentation_rates():
    # Over many views, grayscale hits ~20% and leaves the crops unchanged otherwise when off.
    transform = MultiViewTransform(32, 8, 0, 16, color_jitter_p=0.0, blur_p=0.0, grayscale_p=0.2)
    plain = MultiViewTransform(32, 8, 0, 16, color_augment=False)
    gray = total = 0
    for seed in range(40):
        views = transform(_image(32, seed), seed=seed)["global_views"]
        crops = plain(_image(32, seed), seed=seed)["global_views"]
        for view, crop in zip(views, crops):
            is_gray = torch.allclose(view[0], view[1]) and torch.allclose(view[1], view[2])
            gray += is_gray
            total += 1
            if not is_gray:
                assert torch.equal(view, crop)
    assert 0.1 < gray / total < 0.3


def test_deprecated_eval_transform_is_the_image_processor():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8))
    with pytest.warns(FutureWarning, match="StellarImageProcessor"):
        transform = EvalTransform(32)
    out = transform(image)
    assert out.shape == (3, 32, 32) and out.min() >= 0 and out.max() <= 1
    processor = StellarImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32})
    expected = processor(image, do_normalize=False, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(out, expected)
    with pytest.warns(FutureWarning):
        assert EvalTransform(224).resize_size == 256
    # Close to the float resize it replaced: uint8 resizing rounds each step to a grey level (on this uniform noise,
    # the worst case for rounding, 5 levels at most).
    resized = TF.resize(TF.pil_to_tensor(image).float() / 255, [36], interpolation=InterpolationMode.BICUBIC)
    difference = (out - TF.center_crop(resized, [32, 32]).clamp(0, 1)).abs()
    assert difference.mean() < 1 / 255 and difference.max() < 6 / 255
    with pytest.raises(ValueError), pytest.warns(FutureWarning):
        EvalTransform(64, resize_size=32)


def test_normalize():
    batch = torch.rand(2, 5, 3, 8, 8)
    normed = normalize(batch)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(normed, (batch - mean) / std)


# --------------------------------------------------------------------------- loading


def _write_images(root):
    """A small unlabelled tree: RGB JPEG, grayscale PNG, RGBA PNG, palette GIF, a corrupt file."""
    rng = np.random.default_rng(0)
    (root / "nested" / "deeper").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(root / "a_rgb.jpg")
    Image.fromarray(rng.integers(0, 256, (30, 30), dtype=np.uint8), mode="L").save(root / "nested" / "b_gray.png")
    rgba = np.zeros((20, 20, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[:10, ..., 3] = 255  # top half opaque red, bottom half transparent
    Image.fromarray(rgba, mode="RGBA").save(root / "nested" / "c_rgba.png")
    (root / "nested" / "d_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).convert("P").save(
        root / "nested" / "deeper" / "e_palette.gif"
    )
    (root / "notes.txt").write_text("not an image")


def test_image_folder_unlabelled(tmp_path):
    _write_images(tmp_path)
    folder = load_image_folder(tmp_path)
    assert isinstance(folder, ImageFolder) and folder.labels is None
    assert [p.name for p in folder.paths] == ["a_rgb.jpg", "b_gray.png", "c_rgba.png", "d_corrupt.jpg", "e_palette.gif"]
    assert folder[1]["image"].mode == "RGB" and "label" not in folder[1]
    rgba = np.asarray(folder[2]["image"])
    assert tuple(rgba[0, 0]) == (255, 0, 0) and tuple(rgba[-1, 0]) == (255, 255, 255)  # composited on white
    assert folder[4]["image"].mode == "RGB"
    with pytest.raises(OSError, match="d_corrupt.jpg"):
        folder[3]


def test_image_folder_labelled(tmp_path):
    for name, value in (("cat", 10), ("dog", 200)):
        (tmp_path / name).mkdir()
        for i in range(2):
            Image.new("RGB", (8, 8), (value, i, 0)).save(tmp_path / name / f"{i}.png")
    folder = load_image_folder(tmp_path)  # "auto" infers labels, as datasets' imagefolder would
    assert folder.class_names == ["cat", "dog"] and folder.labels == [0, 0, 1, 1]
    assert folder[2]["label"] == 1
    assert load_image_folder(tmp_path, labels=False).labels is None
    Image.new("RGB", (8, 8)).save(tmp_path / "loose.png")
    assert load_image_folder(tmp_path).labels is None
    with pytest.raises(ValueError, match="loose.png"):
        load_image_folder(tmp_path, labels=True)


def test_empty_or_missing_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("no images here")
    with pytest.raises(ValueError, match="no image files"):
        load_image_folder(tmp_path / "empty")
    with pytest.raises(ValueError, match="does not exist"):
        load_image_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match="empty"):
        PretrainingDataset([], MultiViewTransform(32, 1, 0))


def test_pretraining_dataset_skips_unreadable_images(tmp_path, caplog):
    _write_images(tmp_path)
    transform = MultiViewTransform(32, 2, 2, 16)
    dataset = PretrainingDataset(load_image_folder(tmp_path), transform)
    with caplog.at_level(logging.WARNING, logger="stellar_hf.data"):
        items = [dataset[i] for i in range(len(dataset))]
    assert dataset.num_skipped == 1 and dataset.skipped_indices == {3}
    assert sum("d_corrupt.jpg" in r.getMessage() for r in caplog.records) == 1  # warned once
    # Index 3 falls through to index 4's image, with index 3's own views seed: deterministic.
    again = PretrainingDataset(load_image_folder(tmp_path), transform)
    substitute = again[3]
    for key in ("pixel_values", "global_views", "local_views"):
        assert torch.equal(items[3][key], substitute[key])
    # The item says which unreadable image it stands in for; the others say nothing.
    corrupt = str(tmp_path / "nested" / "d_corrupt.jpg")
    assert items[3]["skipped_images"] == substitute["skipped_images"] == [corrupt]
    assert all("skipped_images" not in item for index, item in enumerate(items) if index != 3)
    # Met again, a known unreadable image is not read (or warned about) again, but still named.
    assert dataset[3]["skipped_images"] == [corrupt]
    assert not torch.equal(items[3]["pixel_values"], items[4]["pixel_values"])
    # A new epoch gives new views of the same image.
    dataset.set_epoch(1)
    assert not torch.equal(dataset[0]["global_views"], items[0]["global_views"])

    batch = collate_views(items)
    assert batch["pixel_values"].shape == (5, 3, 32, 32)
    assert batch["global_views"].shape == (5, 2, 3, 32, 32)
    assert batch["local_views"].shape == (5, 2, 3, 16, 16)
    assert "labels" not in batch
    assert batch["skipped_images"] == [[corrupt]]


def test_every_image_unreadable_is_a_clear_error(tmp_path, caplog):
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(b"garbage")
    dataset = PretrainingDataset(load_image_folder(tmp_path), MultiViewTransform(32, 1, 0))
    with caplog.at_level(logging.ERROR), pytest.raises(ValueError, match="none of the 3 images"):
        dataset[1]
    assert dataset.num_skipped == 3


def test_labels_and_collate_with_workers_match_in_process():
    scenes = SyntheticScenes(num_images=8, image_size=32)
    dataset = PretrainingDataset(scenes, MultiViewTransform(32, 2, 2, 16), seed=5)
    batch = collate_views([dataset[i] for i in range(4)])
    assert batch["labels"].tolist() == [scenes[i]["label"] for i in range(4)]
    assert batch["labels"].dtype == torch.long
    # Same views whatever the worker count: seeds come from (seed, epoch, index) only.
    loader = DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=collate_views)
    first = next(iter(loader))
    for key in batch:
        assert torch.equal(first[key], batch[key])


def test_pretraining_dataset_with_plain_transform_and_tuples():
    def plain(image):  # a transform without `generator`: its tensor becomes `pixel_values`
        return TF.pil_to_tensor(image).float()[:, :8, :8] / 255

    dataset = PretrainingDataset([(np.zeros((10, 12), dtype=np.uint8), 3)], plain)
    item = dataset[0]
    assert item["pixel_values"].shape == (3, 8, 8) and item["labels"] == 3
    assert to_rgb(torch.rand(3, 5, 6)).size == (6, 5)


def test_load_hub_dataset_from_local_folders(tmp_path):
    datasets = pytest.importorskip("datasets")
    root = tmp_path / "images"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (12, 12), (i * 60, 0, 0)).save(root / name / f"{i}.png")
    cache = str(tmp_path / "cache")
    folder = load_hub_dataset(str(root), cache_dir=cache)  # the imagefolder builder, offline
    assert len(folder) == 6 and folder.features["label"].names == ["a", "b"]
    with pytest.raises(ValueError, match="pixels"):
        load_hub_dataset(str(root), image_column="pixels", cache_dir=cache)

    # A dataset written by save_to_disk, with a corrupt row: skipped, not fatal.
    good = Image.new("RGB", (12, 12), (0, 255, 0))
    table = datasets.Dataset.from_dict(
        {"image": [good, good, good], "label": [0, 1, 0]}, features=folder.features
    )
    table = table.cast_column("image", datasets.Image(decode=False))
    rows = table.to_list()
    rows[1]["image"] = {"bytes": b"broken", "path": "broken.png"}
    table = datasets.Dataset.from_list(rows, features=table.features).cast_column("image", datasets.Image())
    datasets.DatasetDict({"train": table}).save_to_disk(str(tmp_path / "saved"))

    loaded = load_hub_dataset(str(tmp_path / "saved"), split="train")
    dataset = PretrainingDataset(loaded, MultiViewTransform(16, 1, 1, 8))
    assert dataset[1]["labels"] == 0  # row 1 is broken: row 2 stands in, with its own label
    assert dataset.num_skipped == 1
    with pytest.raises(ValueError, match="split"):
        load_hub_dataset(str(tmp_path / "saved"), split="test")

    streamed = load_hub_dataset(str(tmp_path / "saved"), split="train", streaming=True)
    assert isinstance(streamed, datasets.IterableDataset)
    stream = StreamingPretrainingDataset(streamed, MultiViewTransform(16, 1, 1, 8))
    items = list(stream)
    assert len(items) == 2 and stream.num_skipped == 1
    assert [item["labels"] for item in items] == [0, 0]
    again = list(StreamingPretrainingDataset(streamed, MultiViewTransform(16, 1, 1, 8)))
    assert torch.equal(items[0]["global_views"], again[0]["global_views"])


def test_real_photographs():
    skimage_data = pytest.importorskip("skimage.data")
    photos = [skimage_data.astronaut(), skimage_data.chelsea(), skimage_data.camera()]  # camera is grayscale
    transform = MultiViewTransform(64, 2, 2, 32)
    dataset = PretrainingDataset(photos, transform)
    batch = collate_views([dataset[i] for i in range(3)])
    assert batch["pixel_values"].shape == (3, 3, 64, 64)
    assert batch["local_views"].shape == (3, 2, 3, 32, 32)
    # The whole-image main view of the astronaut keeps its content: close to a plain resize.
    whole = MultiViewTransform(64, 1, 0, global_scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0)
    main = whole(Image.fromarray(photos[0]), seed=0)["pixel_values"]
    plain_resize = TF.resize(torch.from_numpy(photos[0]).permute(2, 0, 1).float() / 255, [64, 64],
                             interpolation=InterpolationMode.BICUBIC, antialias=True).clamp(0, 1)  # fmt: skip
    assert (main - plain_resize).abs().max() < 1e-5
