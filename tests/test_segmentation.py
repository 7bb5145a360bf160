"""`stellar_hf.segmentation`: the linear segmentation probe, its loss and metrics on hand-made maps, and its data."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from stellar_tester import tiny_config

from stellar_hf.data import SyntheticScenes
from stellar_hf.evaluation import probe_processor, random_init_encoder
from stellar_hf.segmentation import (
    IGNORE_INDEX,
    SegmentationCollator,
    SegmentationDataset,
    SegmentationProbe,
    check_label_map,
    confusion_matrix,
    dice_loss,
    downsample_labels,
    extract_segmentation_features,
    feature_grid,
    load_segmentation_folder,
    majority_class_scores,
    reduce_labels,
    segmentation_loss,
    segmentation_probe,
    segmentation_scores,
    synthetic_class_map,
    synthetic_segmentation,
)

# ----------------------------------------------------------------------------------------------------------------------
# Metrics on hand-made label maps
# ----------------------------------------------------------------------------------------------------------------------


def test_mean_iou_on_a_hand_made_map_with_an_empty_class_and_ignored_pixels():
    # 4 classes; class 3 is neither labelled nor predicted (left out of the mean); 255 pixels count nowhere.
    labels = torch.tensor([[0, 0, 1, 1], [0, 2, 2, 255], [255, 255, 1, 1]])
    predictions = torch.tensor([[0, 1, 1, 1], [0, 2, 0, 3], [3, 0, 1, 2]])
    confusion = confusion_matrix(predictions, labels, num_classes=4)
    assert confusion.sum() == 9  # 12 pixels, 3 ignored (whatever is predicted there)
    scores = segmentation_scores(confusion)
    # class 0: TP 2 (pixels (0,0), (1,0)), FP 1 (label 2 predicted 0), FN 1 (label 0 predicted 1): IoU 2/4
    # class 1: TP 3, FP 1 (label 0 predicted 1), FN 1 (label 1 predicted 2): IoU 3/5
    # class 2: TP 1, FP 1, FN 1: IoU 1/3; class 3: absent (predicted only on ignored pixels).
    assert scores["per_class_iou"][:3] == pytest.approx([2 / 4, 3 / 5, 1 / 3])
    assert scores["per_class_iou"][3] is None and scores["num_classes_present"] == 3
    assert scores["mean_iou"] == pytest.approx((2 / 4 + 3 / 5 + 1 / 3) / 3)
    assert scores["pixel_accuracy"] == pytest.approx(6 / 9)


def test_a_class_predicted_but_never_labelled_counts_as_zero():
    labels = torch.tensor([0, 0, 1, 1])
    predictions = torch.tensor([0, 2, 1, 1])  # class 2 is a false positive only
    scores = segmentation_scores(confusion_matrix(predictions, labels, num_classes=3))
    assert scores["per_class_iou"] == pytest.approx([0.5, 1.0, 0.0])
    assert scores["mean_iou"] == pytest.approx(0.5) and scores["num_classes_present"] == 3


def test_mean_iou_matches_sklearn_macro_jaccard():
    metrics = pytest.importorskip("sklearn.metrics")
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 6, (3, 17, 19), generator=generator)
    labels[labels == 5] = IGNORE_INDEX  # some ignored pixels; class 5 then exists only in the predictions
    predictions = torch.randint(0, 6, (3, 17, 19), generator=generator)
    valid = labels != IGNORE_INDEX
    expected = metrics.jaccard_score(labels[valid].numpy(), predictions[valid].numpy(), average="macro")
    scores = segmentation_scores(confusion_matrix(predictions, labels, num_classes=8))
    assert scores["mean_iou"] == pytest.approx(expected)
    assert scores["pixel_accuracy"] == pytest.approx(metrics.accuracy_score(labels[valid], predictions[valid]))


def test_scores_refuse_maps_without_labelled_pixels_and_out_of_range_labels():
    with pytest.raises(ValueError, match="no labelled pixel"):
        segmentation_scores(confusion_matrix(torch.zeros(4), torch.full((4,), IGNORE_INDEX), num_classes=2))
    with pytest.raises(ValueError, match="values 7"):
        confusion_matrix(torch.zeros(3), torch.tensor([0, 1, 7]), num_classes=3)
    with pytest.raises(ValueError, match="differ in shape"):
        confusion_matrix(torch.zeros(3), torch.zeros(4), num_classes=3)


def test_check_label_map_and_reduce_labels():
    check_label_map(np.array([[0, 2], [255, 1]]), num_classes=3)
    with pytest.raises(
        ValueError,
        match=r"values 3, 200 outside the classes 0..2 and the ignore label 255",
    ):
        check_label_map(np.array([[0, 3], [200, 255]]), num_classes=3, name="x")
    # ADE20K numbering: 0 = unlabelled -> ignored, 1..150 -> 0..149.
    assert reduce_labels(np.array([0, 1, 150, 255])).tolist() == [255, 0, 149, 255]


# ----------------------------------------------------------------------------------------------------------------------
# Loss and head
# ----------------------------------------------------------------------------------------------------------------------


def test_dice_loss_against_a_direct_computation():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, generator=generator)
    labels = torch.randint(0, 3, (2, 4, 5), generator=generator)
    labels[0, 0, :3] = IGNORE_INDEX
    probabilities = logits.softmax(dim=1)
    dices = []
    for k in range(3):
        intersection = total = 0.0
        for b in range(2):
            for i in range(4):
                for j in range(5):
                    if labels[b, i, j] == IGNORE_INDEX:
                        continue
                    target = float(labels[b, i, j] == k)
                    intersection += probabilities[b, k, i, j].item() * target
                    total += probabilities[b, k, i, j].item() + target
        dices.append((2 * intersection + 1.0) / (total + 1.0))
    assert dice_loss(logits, labels).item() == pytest.approx(1 - sum(dices) / 3, abs=1e-6)
    # No labelled pixel: zero, and still differentiable.
    empty = dice_loss(logits.requires_grad_(), torch.full((2, 4, 5), IGNORE_INDEX))
    assert empty.item() == 0.0 and empty.requires_grad


def test_segmentation_loss_is_cross_entropy_plus_dice_on_the_downsampled_labels():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 3, 3, generator=generator)
    labels = torch.randint(0, 4, (2, 12, 12), generator=generator)
    labels[:, :4] = IGNORE_INDEX
    grid = downsample_labels(labels, (3, 3))
    assert torch.equal(grid, labels[:, ::4, ::4])  # nearest: the pixel at floor(i * H / h)
    parts = segmentation_loss(logits, labels)
    expected_ce = F.cross_entropy(logits, grid, ignore_index=IGNORE_INDEX)
    assert parts["cross_entropy"].item() == pytest.approx(expected_ce.item())
    assert parts["dice"].item() == pytest.approx(dice_loss(logits, grid).item())
    assert parts["loss"].item() == pytest.approx(parts["cross_entropy"].item() + parts["dice"].item())


def test_probe_head_and_feature_grids():
    probe = SegmentationProbe(num_channels=6, num_classes=5)
    assert isinstance(probe.norm, torch.nn.BatchNorm2d) and probe.classifier.kernel_size == (1, 1)
    assert probe(torch.randn(2, 6, 3, 4)).shape == (2, 5, 3, 4)

    config = tiny_config()
    encoder = random_init_encoder(config, seed=0)
    pixel_values = torch.randn(2, 3, 32, 48)  # a rectangle: a 4 x 6 grid
    outputs = encoder(pixel_values)
    dense = feature_grid(outputs, "dense", (4, 6))
    assert dense.shape == (2, config.hidden_size, 4, 6)
    # Row-major patches: grid cell (i, j) is patch i * w + j.
    assert torch.equal(dense[:, :, 1, 2], outputs.dense_features[:, 1 * 6 + 2])
    assert torch.equal(
        feature_grid(outputs, "lowrank", (4, 6))[:, :, 3, 5],
        outputs.lowrank_features[:, 23],
    )
    assert feature_grid(outputs, "spatial_map", (4, 6)).shape == (
        2,
        config.num_sparse_tokens,
        4,
        6,
    )
    with pytest.raises(ValueError, match="unknown segmentation feature"):
        feature_grid(outputs, "cls", (4, 6))


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------


def test_synthetic_class_maps_follow_the_instance_masks():
    scenes = SyntheticScenes(num_images=6, image_size=32, split="validation")
    for item in scenes:
        mask = item["mask"]
        for classes, values in (("shape", item["shapes"]), ("color", item["colors"])):
            class_map = synthetic_class_map(item, classes)
            assert class_map.shape == mask.shape and torch.equal(class_map == 0, mask == 0)
            for object_id, value in enumerate(values, start=1):
                assert (class_map[mask == object_id] == 1 + value).all()
        assert torch.equal(synthetic_class_map(item, "foreground"), (mask > 0).long())
    dataset = synthetic_segmentation(scenes, "color")
    assert dataset.num_classes == 9 and dataset[2]["labels"].shape == (32, 32)


def test_label_maps_follow_the_processor_geometry():
    """Resize (nearest) and centre crop of the labels land on the processor's pixels: colour stripes stay aligned."""
    from stellar_hf.image_processing_stellar import StellarImageProcessor

    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], dtype=np.uint8)
    labels = (np.arange(70)[None, :] // 9 % 4).repeat(50, axis=0)  # vertical stripes, 50 x 70 image
    image = Image.fromarray(colours[labels])
    processor = StellarImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}, do_normalize=False)  # fmt: skip
    batch = SegmentationCollator(processor)([{"image": image, "labels": labels}])
    assert batch["pixel_values"].shape == (1, 3, 32, 32) and batch["labels"].shape == (
        1,
        32,
        32,
    )
    predicted = torch.cdist(batch["pixel_values"][0].permute(1, 2, 0).reshape(-1, 3), torch.tensor(colours / 255.0).float()).argmin(dim=1)  # fmt: skip
    agreement = (predicted.view(32, 32) == batch["labels"][0]).float().mean()
    assert agreement > 0.9  # only stripe boundaries (bicubic blur) may differ


def test_segmentation_folder_pairs_and_clear_errors(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    (images / "sub").mkdir(parents=True)
    labels.mkdir()
    (labels / "sub").mkdir()
    for name in ("a", "sub/b"):
        Image.new("RGB", (12, 10), (10, 20, 30)).save(images / f"{name}.jpg")
        Image.fromarray(np.full((10, 12), 2, dtype=np.uint8)).save(labels / f"{name}.png")
    folder = load_segmentation_folder(images, labels)
    assert [path.name for path in folder.image_paths] == ["a.jpg", "b.jpg"]
    dataset = SegmentationDataset(folder, num_classes=3, name="--train_dir")
    assert dataset[1]["labels"].shape == (10, 12) and (dataset[1]["labels"] == 2).all()

    Image.new("RGB", (12, 10)).save(images / "c.jpg")
    Image.fromarray(np.zeros((10, 12), dtype=np.uint8)).save(labels / "d.png")
    with pytest.raises(
        ValueError,
        match=r"1 image\(s\).*no label PNG.*c\.jpg.*1 label PNG\(s\).*no image.*d\.png",
    ):
        load_segmentation_folder(images, labels)
    (images / "c.jpg").unlink()
    (labels / "d.png").unlink()

    # Out-of-range values and a size mismatch name the item and its file.
    with pytest.raises(ValueError, match=r"item 0 \(.*a\.jpg\).*values 2 outside the classes 0..1"):
        SegmentationDataset(folder, num_classes=2, name="--train_dir")[0]
    Image.fromarray(np.zeros((9, 12), dtype=np.uint8)).save(labels / "a.png")
    with pytest.raises(ValueError, match=r"label map is 9x12 \(HxW\) but the image is 10x12"):
        SegmentationDataset(load_segmentation_folder(images, labels), num_classes=3)[0]
    Image.new("RGB", (12, 10)).save(labels / "a.png")
    with pytest.raises(ValueError, match="single-channel"):
        SegmentationDataset(load_segmentation_folder(images, labels), num_classes=3)[0]


def test_a_datasets_split_in_the_scene_parse_150_layout():
    datasets = pytest.importorskip("datasets")
    annotation = np.array([[0, 1, 2], [3, 150, 0]], dtype=np.uint8)
    rows = [{"image": Image.new("RGB", (3, 2)), "annotation": Image.fromarray(annotation)}]
    split = datasets.Dataset.from_list(rows, features=datasets.Features({"image": datasets.Image(), "annotation": datasets.Image()}))  # fmt: skip
    item = SegmentationDataset(split, num_classes=150, reduce=True)[0]
    assert item["labels"].tolist() == [[255, 0, 1], [2, 149, 255]]
    with pytest.raises(ValueError, match="values 150 outside"):
        SegmentationDataset(split, num_classes=150)[0]  # without reducing, 150 is out of range


# ----------------------------------------------------------------------------------------------------------------------
# The protocol on tiny synthetic data
# ----------------------------------------------------------------------------------------------------------------------


def loader_of(dataset, config, batch_size=16):
    from torch.utils.data import DataLoader

    return DataLoader(
        dataset,
        batch_size=batch_size,
        collate_fn=SegmentationCollator(probe_processor(config)),
    )


def supervised_encoder(config, loader, num_classes, steps=100):
    """
    An encoder whose patch features do carry the classes: trained jointly with a segmentation head (the frozen-probe
    protocol must then find them, and a random-init encoder must do worse).
    """
    encoder = random_init_encoder(config, seed=1).train()
    head = torch.nn.Conv2d(config.hidden_size, num_classes, 1)
    optimizer = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=2e-3)
    grid = config.image_size // config.patch_size
    batches = [batch for batch in loader]
    for step in range(steps):
        batch = batches[step % len(batches)]
        dense = feature_grid(encoder(batch["pixel_values"]), "dense", (grid, grid))
        loss = segmentation_loss(head(dense), batch["labels"])["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return encoder.eval()


def test_a_probe_on_informative_features_beats_one_on_a_random_init_encoder():
    torch.manual_seed(0)
    config = tiny_config()
    train = synthetic_segmentation(SyntheticScenes(num_images=64, image_size=32, split="train"), "color")
    evaluation = synthetic_segmentation(SyntheticScenes(num_images=32, image_size=32, split="validation"), "color")
    train_loader, eval_loader = loader_of(train, config), loader_of(evaluation, config)
    trained = supervised_encoder(config, train_loader, num_classes=9)
    results = {}
    for name, encoder in (
        ("trained", trained),
        ("random_init", random_init_encoder(config, seed=0)),
    ):
        train_grids, train_labels = extract_segmentation_features(encoder, train_loader, ("dense", "spatial_map"))
        eval_grids, eval_labels = extract_segmentation_features(encoder, eval_loader, ("dense", "spatial_map"))
        assert train_grids["dense"].shape == (
            64,
            config.hidden_size,
            4,
            4,
        ) and train_labels.shape == (64, 32, 32)
        assert train_grids["spatial_map"].shape == (64, config.num_sparse_tokens, 4, 4)
        results[name] = segmentation_probe(
            train_grids["dense"], train_labels, eval_grids["dense"], eval_labels, num_classes=9,
            epochs=30, learning_rate=1e-2, batch_size=16,
        )  # fmt: skip
    trained, random = results["trained"], results["random_init"]
    assert trained["final_loss"] < trained["initial_loss"]
    assert trained["mean_iou"] > random["mean_iou"] + 0.05, (
        trained["mean_iou"],
        random["mean_iou"],
    )
    assert trained["grid_mean_iou"] > random["grid_mean_iou"]
    floor = majority_class_scores(train_labels, eval_labels, num_classes=9)
    assert trained["mean_iou"] > floor["mean_iou"]
    for result in results.values():
        assert 0.0 <= result["mean_iou"] <= 1.0 and 0.0 <= result["pixel_accuracy"] <= 1.0


def test_the_probe_is_deterministic_with_a_seed():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(8, 5, 3, 3, generator=generator)
    labels = torch.randint(0, 3, (8, 6, 6), generator=generator)
    first = segmentation_probe(
        features,
        labels,
        features,
        labels,
        num_classes=3,
        epochs=3,
        batch_size=4,
        seed=4,
    )
    state = torch.random.get_rng_state()
    second = segmentation_probe(
        features,
        labels,
        features,
        labels,
        num_classes=3,
        epochs=3,
        batch_size=4,
        seed=4,
    )
    assert first == second and torch.equal(torch.random.get_rng_state(), state)
    other = segmentation_probe(
        features,
        labels,
        features,
        labels,
        num_classes=3,
        epochs=3,
        batch_size=4,
        seed=5,
    )
    assert other["initial_loss"] != first["initial_loss"]
