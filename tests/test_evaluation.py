"""Tests for stellar_hf.evaluation: probes, reconstruction metrics, object discovery, and the `evaluate` metric scripts."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from stellar_tester import TINY_CONFIG

from stellar_hf import StellarConfig, StellarForImageReconstruction
from stellar_hf.data import SyntheticScenes, normalize
from stellar_hf.evaluation import (
    MetricUnavailable,
    ReconstructionMetrics,
    adjusted_rand_index,
    build_reconstruction_metrics,
    evaluate_object_discovery,
    evaluate_reconstruction,
    extract_features,
    frechet_distance,
    grid_blocks,
    grid_partition,
    inception_features,
    knn_accuracy,
    knn_classify,
    linear_probe,
    load_inception,
    load_lpips,
    lpips,
    object_discovery_scores,
    psnr,
    spatial_map_segments,
    ssim,
    train_reconstruction_probe,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    """These workloads are tiny: one intra-op thread avoids OpenMP spin-waits on a busy machine (seconds per test)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY = TINY_CONFIG


def tiny_config(**overrides) -> StellarConfig:
    return StellarConfig(**{**TINY, **overrides})


def separable_features(num_per_class: int, num_classes: int, dim: int = 16, seed: int = 0):
    """Clusters around orthogonal directions: cosine kNN and a linear probe separate them perfectly."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(num_per_class)
    centres = torch.eye(dim)[:num_classes] * 5
    return centres[labels] + 0.3 * torch.randn(labels.shape[0], dim, generator=generator), labels


# ----------------------------------------------------------------------------------------------------------------------
# kNN and linear probe
# ----------------------------------------------------------------------------------------------------------------------


def dino_knn_reference(train_features, train_labels, test_features, num_classes, k, temperature):
    """DINO's `knn_classifier` written out per test sample: top-k cosine neighbours vote with exp(sim / T)."""
    train = train_features / train_features.norm(dim=1, keepdim=True)
    test = test_features / test_features.norm(dim=1, keepdim=True)
    scores = torch.zeros(test.shape[0], num_classes)
    for i in range(test.shape[0]):
        similarities = [(float(test[i] @ train[j]), int(train_labels[j])) for j in range(train.shape[0])]
        similarities.sort(key=lambda pair: -pair[0])
        for similarity, label in similarities[:k]:
            scores[i, label] += math.exp(similarity / temperature)
    return scores


def test_knn_separable_features_are_classified_perfectly():
    train, train_labels = separable_features(20, 4, seed=0)
    test, test_labels = separable_features(10, 4, seed=1)
    scores = knn_accuracy(train, train_labels, test, test_labels)
    assert scores["top1"] == 1.0 and scores["top5"] == 1.0


def test_knn_random_features_score_near_chance():
    generator = torch.Generator().manual_seed(0)
    train, test = torch.randn(800, 32, generator=generator), torch.randn(800, 32, generator=generator)
    train_labels = torch.randint(0, 4, (800,), generator=generator)
    test_labels = torch.randint(0, 4, (800,), generator=generator)
    assert abs(knn_accuracy(train, train_labels, test, test_labels)["top1"] - 0.25) < 0.07


@pytest.mark.parametrize("k, temperature", [(20, 0.07), (3, 0.5), (100, 0.07)])
def test_knn_matches_brute_force_dino_vote(k, temperature):
    generator = torch.Generator().manual_seed(k)
    train, test = torch.randn(60, 8, generator=generator), torch.randn(15, 8, generator=generator)
    labels = torch.randint(0, 5, (60,), generator=generator)
    expected = dino_knn_reference(train, labels, test, 5, min(k, 60), temperature)
    actual = knn_classify(train, labels, test, num_classes=5, k=k, temperature=temperature, chunk_size=4)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_linear_probe_learns_separable_data():
    train, train_labels = separable_features(30, 5, seed=0)
    test, test_labels = separable_features(10, 5, seed=1)
    scores = linear_probe(train, train_labels, test, test_labels, epochs=30, batch_size=32)
    assert scores["top1"] >= 0.98 and scores["top5"] == 1.0


def test_extract_features_kinds_and_labels():
    from stellar_hf import StellarModel

    torch.manual_seed(0)
    model = StellarModel(tiny_config())
    batches = [{"pixel_values": torch.randn(3, 3, 32, 32), "labels": torch.tensor([0, 1, 2])}] * 2
    for feature in ("pooled", "cls", "dense-mean"):
        features, labels = extract_features(model, batches, feature)
        assert features.shape == (6, 32) and labels.tolist() == [0, 1, 2, 0, 1, 2]
    outputs = model(batches[0]["pixel_values"])
    torch.testing.assert_close(extract_features(model, batches[:1], "pooled")[0], outputs.sparse_tokens.mean(1))
    with pytest.raises(ValueError, match="unknown feature"):
        extract_features(model, batches, "patches")


# ----------------------------------------------------------------------------------------------------------------------
# PSNR, SSIM
# ----------------------------------------------------------------------------------------------------------------------


def test_psnr_known_values():
    image = torch.rand(2, 3, 16, 16, dtype=torch.float64) * 0.8
    assert torch.isinf(psnr(image, image)).all()
    for offset in (0.01, 0.1, 0.2):
        expected = 20 * math.log10(1 / offset)
        torch.testing.assert_close(psnr(image + offset, image), torch.full((2,), expected, dtype=torch.float64))
    torch.testing.assert_close(psnr(image * 255 + 2.55, image * 255, data_range=255.0), psnr(image + 0.01, image))
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(image, image[:, :, :8])


def test_ssim_identical_is_one_and_matches_skimage():
    structural_similarity = pytest.importorskip("skimage.metrics").structural_similarity
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(3, 3, 24, 37, generator=generator)
    torch.testing.assert_close(ssim(image, image), torch.ones(3, dtype=torch.float64))
    for noise in (0.02, 0.2):
        other = (image + noise * torch.randn(image.shape, generator=generator)).clamp(0, 1)
        settings = {"gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False, "data_range": 1.0}
        expected = [
            structural_similarity(other[i].numpy(), image[i].numpy(), channel_axis=0, **settings) for i in range(3)
        ]
        np.testing.assert_allclose(ssim(other, image).numpy(), expected, atol=1e-3)
    assert ssim(image.flip(-1), image).max() < 0.5
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(image[..., :8, :8], image[..., :8, :8])


# ----------------------------------------------------------------------------------------------------------------------
# LPIPS and rFID: offline weights only
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    """A torch hub cache with nothing in it, whatever this machine has downloaded."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    return tmp_path / "torch_home"


def test_lpips_without_backbone_weights_is_unavailable(empty_torch_home, tmp_path):
    pytest.importorskip("lpips")
    with pytest.raises(MetricUnavailable, match="alexnet-owt-7be5be79.pth") as error:
        load_lpips("alex")
    assert "--lpips_weights" in str(error.value) and str(empty_torch_home) in str(error.value)
    with pytest.raises(MetricUnavailable, match="do not exist"):
        load_lpips("alex", tmp_path / "missing.pth")
    metrics, skipped = build_reconstruction_metrics(compute_rfid=False)
    assert metrics.lpips_model is None and "not available offline" in skipped["lpips"]


def test_lpips_without_package_is_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "lpips", None)
    with pytest.raises(MetricUnavailable, match="pip install lpips"):
        load_lpips()


def test_lpips_plumbing_with_a_local_random_backbone(tmp_path):
    pytest.importorskip("lpips")
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    backbone = tmp_path / "alexnet.pth"
    torch.save(torchvision.models.alexnet().state_dict(), backbone)
    model = load_lpips("alex", backbone)
    saved = torch.load(backbone)
    for index, slice_name in ((0, "slice1"), (3, "slice2"), (10, "slice5")):
        # lpips keeps torchvision's `features` indices as child names; each must hold the file's tensor.
        torch.testing.assert_close(
            getattr(getattr(model.net, slice_name), str(index)).weight, saved[f"features.{index}.weight"]
        )
    images = torch.rand(2, 3, 32, 32)
    distance = lpips(images, images.flip(-1), model=model)
    assert distance.shape == (2,) and (distance > 0).all()
    torch.testing.assert_close(lpips(images, images, model=model), torch.zeros(2))
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="not a torchvision alex state dict"):
        load_lpips("alex", tmp_path / "wrong.pth")


def test_rfid_unavailable_offline(empty_torch_home, monkeypatch):
    try:
        import torch_fidelity  # noqa: F401

        with pytest.raises(MetricUnavailable, match="--inception_weights"):
            load_inception()
    except ImportError:
        pass
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", None)
    with pytest.raises(MetricUnavailable, match="pip install torch-fidelity"):
        load_inception()
    _, skipped = build_reconstruction_metrics(lpips_net=None)
    assert skipped["lpips"] == "not requested" and "torch-fidelity" in skipped["rfid"]


class TinyInception(torch.nn.Module):
    """Stands in for the 95 MB FID Inception network: uint8 images -> a 1-tuple of (B, 8) features."""

    def __init__(self, *args, feature_extractor_weights_path=None, **kwargs):
        super().__init__()
        self.weights_path = feature_extractor_weights_path
        self.projection = torch.nn.Linear(3 * 4 * 4, 8)

    def forward(self, images):
        assert images.dtype == torch.uint8
        return (self.projection(F.adaptive_avg_pool2d(images.float() / 255, 4).flatten(1)),)


def test_load_inception_takes_local_weights(tmp_path, monkeypatch):
    import types

    package = types.ModuleType("torch_fidelity")
    module = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")
    module.URL_INCEPTION_V3 = "https://example.invalid/weights-inception-2015-12-05-6726825d.pth"
    module.FeatureExtractorInceptionV3 = TinyInception
    monkeypatch.setitem(sys.modules, "torch_fidelity", package)
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", module)
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"")
    assert load_inception(weights).weights_path == str(weights)
    cached = tmp_path / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    assert load_inception().weights_path == str(cached)
    _, skipped = build_reconstruction_metrics(lpips_net=None)
    assert skipped == {"lpips": "not requested"}


def test_rfid_accumulates_inception_features():
    torch.manual_seed(0)
    metrics = ReconstructionMetrics(inception=TinyInception())
    images = torch.rand(6, 3, 16, 16)
    metrics.update(images[:3], images[:3])
    metrics.update(images[3:], images[3:])
    assert metrics.compute()["rfid"] == pytest.approx(0.0, abs=1e-9)
    metrics.reset()
    metrics.update(images.flip(-1).clamp(0, 0.5), images)
    assert metrics.compute()["rfid"] > 1e-4


def test_frechet_distance_matches_scipy_reference():
    linalg = pytest.importorskip("scipy.linalg")
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(200, 6, generator=generator, dtype=torch.float64)
    b = (
        torch.randn(300, 6, generator=generator, dtype=torch.float64)
        @ torch.rand(6, 6, generator=generator, dtype=torch.float64)
        + 0.5
    )
    mean_a, mean_b = a.mean(0).numpy(), b.mean(0).numpy()
    covariance_a, covariance_b = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    root = linalg.sqrtm(covariance_a @ covariance_b).real
    expected = ((mean_a - mean_b) ** 2).sum() + np.trace(covariance_a + covariance_b - 2 * root)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(a, a + 2.0) == pytest.approx(4.0 * 6, rel=1e-8)  # equal covariances: |shift|^2


def test_reconstruction_metrics_accumulate_over_batches():
    generator = torch.Generator().manual_seed(0)
    target = torch.rand(6, 3, 16, 16, generator=generator)
    prediction = (target + 0.1 * torch.randn(target.shape, generator=generator)).clamp(0, 1)
    metrics = ReconstructionMetrics()
    for start in (0, 2, 4):
        metrics.update(prediction[start : start + 2], target[start : start + 2])
    results = metrics.compute()
    assert metrics.num_images == 6 and set(results) == {"psnr", "ssim"}
    assert results["psnr"] == pytest.approx(psnr(prediction, target).mean().item())
    assert results["ssim"] == pytest.approx(ssim(prediction, target).mean().item())
    with pytest.raises(ValueError, match="no images"):
        ReconstructionMetrics().compute()


# ----------------------------------------------------------------------------------------------------------------------
# Reconstruction probe
# ----------------------------------------------------------------------------------------------------------------------


def synthetic_batches(num_images: int, batch_size: int, image_size: int = 32, with_masks: bool = False):
    scenes = SyntheticScenes(num_images=num_images, image_size=image_size, split="validation")
    items = [scenes[i] for i in range(num_images)]
    batches = []
    for start in range(0, num_images, batch_size):
        chunk = items[start : start + batch_size]
        images = torch.stack(
            [torch.from_numpy(np.array(item["image"])).permute(2, 0, 1).float() / 255 for item in chunk]
        )
        batch = {"pixel_values": normalize(images)}
        if with_masks:
            batch["masks"] = torch.stack([item["mask"] for item in chunk])
        batches.append(batch)
    return batches


def test_reconstruction_probe_trains_a_fresh_decoder_on_a_frozen_encoder():
    torch.manual_seed(0)
    model = StellarForImageReconstruction(tiny_config())
    encoder_before = {key: value.clone() for key, value in model.stellar.state_dict().items()}
    decoder_before = model.decoder.decoder_proj.weight.clone()
    head_before = model.reconstruction_head.weight.clone()
    batches = synthetic_batches(8, 8)
    result = train_reconstruction_probe(model, batches, steps=15, learning_rate=3e-3, seed=0)
    assert result["steps"] == 15 and result["final_loss"] < result["initial_loss"]
    for key, value in model.stellar.state_dict().items():
        assert torch.equal(value, encoder_before[key]), f"encoder weight {key} changed"
    assert not torch.equal(model.decoder.decoder_proj.weight, decoder_before)
    assert not torch.equal(model.reconstruction_head.weight, head_before)
    # Freshly initialised as `post_init` does: truncated normal weights, zero biases, a drawn Fourier matrix.
    fresh = StellarForImageReconstruction(tiny_config())
    train_reconstruction_probe(fresh, batches, steps=1, learning_rate=0.0, seed=0)
    assert (
        fresh.decoder.decoder_proj.weight.std() < 0.03 and fresh.decoder.position_encoding.gaussian_matrix.std() > 0.5
    )
    scores = evaluate_reconstruction(model, batches)
    assert scores["num_images"] == 8 and 0 < scores["psnr"] < 60 and -1 <= scores["ssim"] <= 1


# ----------------------------------------------------------------------------------------------------------------------
# Object discovery
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_adjusted_rand_index_matches_sklearn(seed):
    adjusted_rand_score = pytest.importorskip("sklearn.metrics").adjusted_rand_score
    rng = np.random.default_rng(seed)
    size = int(rng.integers(2, 500))
    labels_true = rng.integers(0, rng.integers(1, 6), size)
    labels_pred = rng.integers(0, rng.integers(1, 8), size)
    assert adjusted_rand_index(labels_true, labels_pred) == pytest.approx(
        adjusted_rand_score(labels_true, labels_pred), abs=1e-10
    )
    # Correlated labelings too, and invariance to renaming the clusters.
    noisy = np.where(rng.random(size) < 0.8, labels_true, labels_pred)
    assert adjusted_rand_index(labels_true, noisy) == pytest.approx(adjusted_rand_score(labels_true, noisy), abs=1e-10)
    assert adjusted_rand_index(labels_true, labels_true * 7 + 3) == 1.0


def test_adjusted_rand_index_degenerate_cases():
    adjusted_rand_score = pytest.importorskip("sklearn.metrics").adjusted_rand_score
    for a, b in [([0, 0, 0], [1, 1, 1]), ([0, 1, 2], [5, 6, 7]), ([0, 0, 0], [0, 1, 2]), ([1], [2]), ([0, 0, 1, 1], [0, 0, 0, 0])]:  # fmt: skip
        assert adjusted_rand_index(a, b) == pytest.approx(adjusted_rand_score(a, b)), (a, b)
    big = np.arange(200_000) % 7  # pair counts beyond int64 products
    assert adjusted_rand_index(big, big) == 1.0


def test_grid_partition_blocks():
    assert grid_blocks(16, (14, 14)) == (4, 4) and grid_blocks(6, (4, 4)) == (2, 3) and grid_blocks(7, (4, 4)) == (1, 7)
    assert grid_blocks(6, (8, 4)) == (3, 2)  # more blocks along the longer side
    partition = grid_partition(4, (4, 6))
    assert partition.shape == (4, 6) and partition.unique().tolist() == [0, 1, 2, 3]
    assert (partition[:2, :3] == 0).all() and (partition[2:, 3:] == 3).all()


def perfect_scene():
    """A 4x4 patch grid (8-px patches) with three objects made of whole patches, and a one-hot map finding them."""
    objects = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 0], [2, 2, 0, 3], [2, 2, 0, 3]])
    masks = objects.repeat_interleave(8, 0).repeat_interleave(8, 1)[None]
    spatial_map = F.one_hot(objects.flatten(), 4).float()[None] * 0.9 + 0.025
    return spatial_map, masks


def test_object_discovery_perfect_segmentation_scores_one_and_beats_the_grid():
    spatial_map, masks = perfect_scene()
    segments = spatial_map_segments(spatial_map, (4, 4), (32, 32))
    assert torch.equal(segments, masks)
    scores = object_discovery_scores(spatial_map, (4, 4), masks)
    assert scores["fg_ari"] == 1.0 and scores["mbo"] == 1.0 and scores["num_images"] == 1
    assert scores["grid_fg_ari"] < 0.9 and scores["grid_mbo"] < 0.9
    # Token names do not matter; a map that merges two objects loses FG-ARI and mBO.
    permuted = spatial_map[..., [2, 0, 3, 1]]
    assert object_discovery_scores(permuted, (4, 4), masks)["fg_ari"] == 1.0
    merged = spatial_map.clone()
    merged[0, :, 2] += merged[0, :, 3]
    merged[0, :, 3] = 0
    worse = object_discovery_scores(merged, (4, 4), masks)
    assert worse["fg_ari"] < 1.0 and worse["mbo"] < 1.0
    # Masks at another resolution than 8 px per patch are matched by nearest upsampling.
    small = object_discovery_scores(spatial_map, (4, 4), masks[:, ::2, ::2])
    assert small["fg_ari"] == 1.0 and small["mbo"] == 1.0


def test_object_discovery_skips_images_without_objects():
    spatial_map, masks = perfect_scene()
    scores = object_discovery_scores(
        spatial_map.repeat(2, 1, 1), (4, 4), torch.cat([masks, torch.zeros_like(masks)]), per_image=True
    )
    assert scores["num_images"] == 1 and scores["fg_ari"] == 1.0 and math.isnan(scores["per_image"]["mbo"][1])
    with pytest.raises(ValueError, match="masks must be"):
        object_discovery_scores(spatial_map, (4, 4), masks[0])


def test_evaluate_object_discovery_on_synthetic_scenes():
    from stellar_hf import StellarModel

    torch.manual_seed(0)
    model = StellarModel(tiny_config())
    scores = evaluate_object_discovery(model, synthetic_batches(6, 3, with_masks=True))
    assert scores["num_images"] == 6
    for key in ("fg_ari", "grid_fg_ari"):
        assert -1.0 <= scores[key] <= 1.0
    for key in ("mbo", "grid_mbo"):
        assert 0.0 <= scores[key] <= 1.0
    with pytest.raises(ValueError, match="instance masks"):
        evaluate_object_discovery(model, synthetic_batches(2, 2))


# ----------------------------------------------------------------------------------------------------------------------
# `evaluate` metric scripts, loaded by path, offline
# ----------------------------------------------------------------------------------------------------------------------


def test_evaluate_metric_scripts_load_offline_by_path_and_agree(tmp_path):
    pytest.importorskip("evaluate")
    script = """
import json, numpy as np, torch, evaluate
from stellar_hf.metrics import metric_path
from stellar_hf.evaluation import psnr, ssim
rng = np.random.default_rng(0)
references = rng.random((3, 3, 20, 24)).astype(np.float32)
predictions = np.clip(references + 0.05 * rng.standard_normal(references.shape), 0, 1).astype(np.float32)
out = {}
for name, function in (("psnr", psnr), ("ssim", ssim)):
    metric = evaluate.load(metric_path(name))
    result = metric.compute(predictions=list(predictions), references=list(references))
    expected = function(torch.from_numpy(predictions), torch.from_numpy(references))
    out[name] = [result[name], expected.mean().item(), result[name + "_per_image"], expected.tolist()]
metric = evaluate.load(metric_path("psnr"))
metric.add_batch(predictions=list(predictions[:2]), references=list(references[:2]))
metric.add_batch(predictions=list(predictions[2:]), references=list(references[2:]))
out["batched"] = metric.compute()["psnr"]
print(json.dumps(out))
"""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "HF_HUB_OFFLINE": "1",
        "HF_EVALUATE_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "HF_HOME": str(tmp_path / "hf_home"),
    }
    result = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    for name in ("psnr", "ssim"):
        value, expected, per_image, expected_per_image = out[name]
        assert value == pytest.approx(expected, rel=1e-6)
        np.testing.assert_allclose(per_image, expected_per_image, rtol=1e-6)
    assert out["batched"] == pytest.approx(out["psnr"][0], rel=1e-9)
    # evaluate ran a copy of the script from its module cache, not the file in the package.
    assert list((tmp_path / "modules").rglob("psnr.py"))


# ----------------------------------------------------------------------------------------------------------------------
# What a probe figure measures: labels, chance, references
# ----------------------------------------------------------------------------------------------------------------------


def test_synthetic_probe_labels_name_what_they_measure():
    from stellar_hf.data import CLASS_NAMES, COLOR_NAMES
    from stellar_hf.evaluation import DEFAULT_SYNTHETIC_LABEL, SYNTHETIC_LABEL_NAMES, synthetic_probe_labels

    labels = synthetic_probe_labels()
    assert tuple(labels) == SYNTHETIC_LABEL_NAMES == ("dominant_color", "dominant_shape")
    assert DEFAULT_SYNTHETIC_LABEL == "dominant_color"  # the Quick start's headline figure
    color, shape = labels["dominant_color"], labels["dominant_shape"]
    assert color.class_names == tuple(COLOR_NAMES) and color.num_classes == 8 and color.chance == 1 / 8
    assert shape.class_names == tuple(CLASS_NAMES) and shape.num_classes == 6 and shape.chance == 1 / 6
    assert color.describe() == {
        "label": "dominant_color",
        "label_description": "colour of each scene's dominant (largest) object",
        "num_classes": 8,
        "chance": 0.125,
    }
    scenes = SyntheticScenes(num_images=20, image_size=32, split="validation")
    for item in scenes:
        dominant = item["dominant_id"]
        assert color.label_of(item) == item["colors"][dominant - 1]
        assert shape.label_of(item) == item["shapes"][dominant - 1] == item["label"]
    # Colour and shape are different labels of the same images (the defect: one was scored as the other).
    assert [color.label_of(item) for item in scenes] != [shape.label_of(item) for item in scenes]


def test_folder_label_and_majority_class():
    from stellar_hf.evaluation import folder_probe_label, majority_class_accuracy

    label = folder_probe_label(["cat", "dog", "fox"])
    assert label.describe() == {"label": "class", "label_description": "class (subfolder)", "num_classes": 3, "chance": 1 / 3}  # fmt: skip
    assert label.label_of({"label": 2}) == 2
    train, evaluation = torch.tensor([0, 1, 1, 1, 2]), torch.tensor([1, 1, 0, 2])
    assert majority_class_accuracy(train, evaluation) == 0.5
    with pytest.raises(ValueError):
        majority_class_accuracy(torch.tensor([], dtype=torch.long), evaluation)


def test_synthetic_probe_recipe_and_processor():
    from stellar_hf.evaluation import (
        PROBE_BATCH_SIZE,
        SYNTHETIC_PROBE_EVAL_IMAGES,
        SYNTHETIC_PROBE_TRAIN_IMAGES,
        probe_processor,
        synthetic_probe_datasets,
    )
    from stellar_hf.image_processing_stellar import StellarImageProcessor

    assert (SYNTHETIC_PROBE_TRAIN_IMAGES, SYNTHETIC_PROBE_EVAL_IMAGES, PROBE_BATCH_SIZE) == (2048, 1024, 128)
    train, evaluation = synthetic_probe_datasets(32)
    assert (len(train), len(evaluation)) == (2048, 1024)
    assert (train.config.split, evaluation.config.split, train.config.seed) == ("train", "validation", 0)
    expected = SyntheticScenes(num_images=4, image_size=32, split="validation")[3]["image"]
    config = tiny_config(image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3])
    processor = probe_processor(config)
    assert isinstance(processor, StellarImageProcessor)
    assert processor.size.shortest_edge == 32 and (
        processor.crop_size.height,
        processor.crop_size.width,
    ) == (32, 32)
    pixels = processor([evaluation[3]["image"], expected], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (2, 3, 32, 32) and torch.equal(pixels[0], pixels[1])
    # Scenes rendered at the model's size pass unchanged: only rescaled and normalised with the config's statistics.
    raw = torch.from_numpy(np.array(expected)).permute(2, 0, 1).float() / 255
    assert torch.allclose(pixels[1], normalize(raw, config.image_mean, config.image_std), atol=1e-5)
    unnormalised = probe_processor(config, do_normalize=False)([expected], return_tensors="pt")["pixel_values"][0]
    assert torch.allclose(unnormalised, raw, atol=1e-6)


def test_probe_transform_is_deprecated_but_still_works():
    from stellar_hf.data import EvalTransform
    from stellar_hf.evaluation import probe_transform

    with pytest.warns(FutureWarning, match="probe_processor"):
        transform = probe_transform(32)
    assert isinstance(transform, EvalTransform) and transform.resize_size == 32
    image = SyntheticScenes(num_images=1, image_size=32, split="validation")[0]["image"]
    assert transform(image).shape == (3, 32, 32)


def test_random_init_encoder_is_seeded():
    from stellar_hf.evaluation import random_init_encoder
    from stellar_hf.modeling_stellar import StellarModel

    config = tiny_config()
    state = torch.random.get_rng_state()
    first, second = random_init_encoder(config, seed=5), random_init_encoder(config, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random stream is left alone
    assert isinstance(first, StellarModel) and not first.training
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    torch.manual_seed(5)
    assert torch.equal(StellarModel(config).embeddings.sparse_tokens, first.embeddings.sparse_tokens)


# ----------------------------------------------------------------------------------------------------------------------
# The `eval` extra holds what the optional metrics import
# ----------------------------------------------------------------------------------------------------------------------


def setup_extras() -> dict[str, list[str]]:
    """The lists of requirements assigned at the top level of setup.py (BASE, TRAIN, EVAL), read without running it."""
    import ast

    tree = ast.parse((REPO_ROOT / "setup.py").read_text())
    extras = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.List):
            extras[node.targets[0].id] = [ast.literal_eval(item) for item in node.value.elts]
    return extras


def requirement_names(requirements: list[str]) -> set[str]:
    import re

    return {re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower() for requirement in requirements}


def test_eval_extra_has_every_package_the_metrics_import():
    # rFID: `load_inception` imports torch_fidelity; LPIPS: lpips; the `evaluate` metric scripts: evaluate.
    names = requirement_names(setup_extras()["EVAL"])
    assert {"torch-fidelity", "lpips", "evaluate", "torchvision", "scipy"} <= names


def test_rfid_with_torch_fidelity_installed_is_skipped_for_its_weights_only(empty_torch_home):
    pytest.importorskip("torch_fidelity")
    _, skipped = build_reconstruction_metrics(lpips_net=None)
    reason = skipped["rfid"]
    assert "weights-inception-2015-12-05-6726825d.pth" in reason and "--inception_weights" in reason
    assert "pip install" not in reason and str(empty_torch_home) in reason


def test_load_inception_with_the_real_torch_fidelity(tmp_path):
    """The installed torch-fidelity's network built from a local weights file (random here), and its features."""
    fidelity = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    with pytest.MonkeyPatch.context() as patch:
        # Build the network once without weights (no download) to write a state dict of the right layout.
        patch.setattr(fidelity, "load_state_dict_from_url", lambda *args, **kwargs: None)
        patch.setattr(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state_dict: None)
        torch.manual_seed(0)
        network = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    weights = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(network.state_dict(), weights)
    extractor = load_inception(weights)
    features = inception_features(torch.rand(2, 3, 32, 32), extractor)
    assert features.shape == (2, 2048) and features.dtype == torch.float64 and torch.isfinite(features).all()
    metrics, skipped = build_reconstruction_metrics(lpips_net=None, inception_weights=weights)
    assert "rfid" not in skipped and metrics.inception is not None
