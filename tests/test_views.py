"""The two-part pretraining views (issue: views at accelerator speed).

`MultiViewCrops` (CPU: the draws and the uint8 crops) + `ViewAugmentation` (device: the batched colour augmentation
and normalisation) against the per-view float32 reference `MultiViewTransform`: the same draws, the same colour
operations to float precision, pixels within the documented bound, and views that depend only on (image, seed).
"""

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from stellar_hf.data import (
    COLOR_PARAMETERS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ColorAugmentation,
    MultiViewCrops,
    MultiViewTransform,
    PretrainingDataset,
    SyntheticScenes,
    ViewAugmentation,
    collate_views,
)
from stellar_hf.data import _SLOTS_PER_VIEW  # the fixed number of uniforms each view draws
from stellar_hf.image_processing_stellar import unnormalize_images

# The documented bound between the two paths, in [0, 1] units (docs/training.md, "Views"): uint8 resizing rounds
# to the nearest grey level, which the colour operations can stretch (contrast up to 1.4x, then a blur).
MEAN_BOUND = 3 / 255
MAX_BOUND = 12 / 255


def photo(size=(500, 375)):
    skimage_data = pytest.importorskip("skimage.data")
    return Image.fromarray(skimage_data.chelsea()).resize(size)


def scene(size=64, seed=0):
    return SyntheticScenes(num_images=1, image_size=size, seed=seed)[0]["image"]


def as_unit_scale(pixel_values):
    return unnormalize_images(pixel_values, IMAGENET_MEAN, IMAGENET_STD)


def test_crops_are_uint8_with_the_reference_draws():
    crops = MultiViewCrops(64, num_global_views=3, num_local_views=4, local_image_size=32)
    reference = MultiViewTransform(64, num_global_views=3, num_local_views=4, local_image_size=32)
    item = crops(scene(), seed=5)
    assert set(item) == {"global_crops", "local_crops", "view_parameters"}
    assert item["global_crops"].shape == (3, 3, 64, 64) and item["global_crops"].dtype == torch.uint8
    assert item["local_crops"].shape == (4, 3, 32, 32) and item["local_crops"].dtype == torch.uint8
    assert item["view_parameters"].shape == (7, COLOR_PARAMETERS)
    # Same crop boxes, flips and colour parameters for the same seed: one `draw` serves both paths.
    generator = torch.Generator().manual_seed(5)
    ours = crops.draw(64, 64, torch.Generator().manual_seed(5))
    theirs = reference.draw(64, 64, generator)
    assert torch.equal(ours.boxes, theirs.boxes) and torch.equal(ours.flips, theirs.flips)
    assert torch.equal(ours.color_parameters, theirs.color_parameters)
    assert torch.equal(ours.color_parameters, item["view_parameters"])
    # No local views; tensor inputs (uint8 and float) give the same crops as the PIL image.
    empty = MultiViewCrops(48, 2, 0, 16)(torch.rand(3, 40, 70), seed=1)
    assert empty["local_crops"].shape == (0, 3, 16, 16) and empty["local_crops"].dtype == torch.uint8
    as_tensor = torch.from_numpy(np.array(scene())).permute(2, 0, 1)
    assert torch.equal(crops(as_tensor, seed=5)["global_crops"], item["global_crops"])
    assert torch.equal(crops(as_tensor.float() / 255, seed=5)["global_crops"], item["global_crops"])


def test_colour_parameters_follow_the_settings():
    uniforms = torch.rand(4000, _SLOTS_PER_VIEW, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    parameters = ColorAugmentation().parameters(uniforms)
    assert abs(parameters[:, 0].mean() - 0.8) < 0.03  # jitter
    assert abs(parameters[:, 9].mean() - 0.2) < 0.03  # grayscale
    assert abs(parameters[:, 10].mean() - 0.5) < 0.03  # blur
    factors = parameters[:, 1:5]
    assert factors[:, 0].min() >= 0.6 and factors[:, 0].max() <= 1.4  # brightness 0.4
    assert factors[:, 2].min() >= 0.8 and factors[:, 2].max() <= 1.2  # saturation 0.2
    assert factors[:, 3].abs().max() <= 0.1  # hue 0.1
    assert parameters[:, 11].min() >= 0.1 and parameters[:, 11].max() <= 2.0
    # Every row's order is a permutation of the four operations, all 24 of them drawn.
    orders = parameters[:, 5:9].long()
    assert torch.equal(orders.sort(dim=1).values, torch.arange(4).expand(4000, 4))
    assert len({tuple(row) for row in orders.tolist()}) == 24
    for bad, match in (
        (dict(jitter_p=1.5), "jitter_p"),
        (dict(hue=0.7), "hue"),
        (dict(blur_kernel_size=4), "blur_kernel_size"),
        (dict(blur_sigma=(0.0, 1.0)), "blur_sigma"),
        (dict(brightness=-0.1), "brightness"),
    ):
        with pytest.raises(ValueError, match=match):
            ColorAugmentation(**bad)


@pytest.mark.parametrize(
    "settings",
    [
        {},  # the recipe
        dict(jitter_p=1.0, grayscale_p=0.0, blur_p=1.0),  # every view jittered and blurred
        dict(jitter_p=1.0, grayscale_p=1.0, blur_p=0.0, hue=0.5),
        dict(jitter_p=1.0, brightness=0.0, saturation=0.0, blur_kernel_size=5),  # operations of strength 0 skipped
    ],
)
@pytest.mark.parametrize("native", [False, True], ids=["eager", "native"])
def test_batched_colour_matches_the_per_view_reference(settings, native, request):
    # The same float views through the implementations of the colour operations: float rounding apart, equal.
    if native:
        request.getfixturevalue("native_kernels")
    reference = MultiViewTransform(
        48, 4, 4, 24, **{("color_jitter_p" if key == "jitter_p" else key): value for key, value in settings.items()}
    )
    augmentation = ViewAugmentation(reference.color, native=native)
    views, parameters = [], []
    for seed in range(6):
        image = torch.from_numpy(np.array(scene(64, seed))).permute(2, 0, 1).float() / 255
        draws = reference.draw(64, 64, torch.Generator().manual_seed(seed))
        views += [reference.crop(image, draws, view) for view in range(4)]
        parameters.append(draws.color_parameters[:4])
    views, parameters = torch.stack(views), torch.cat(parameters)
    expected = torch.stack([reference.color_view(view, row) for view, row in zip(views, parameters)])
    actual = augmentation.color_views(views, parameters)
    torch.testing.assert_close(actual, expected, atol=2e-6, rtol=0)
    assert not torch.equal(actual, views)


def edge_colours():
    """(1, 3, 8, 40) float views: greys, the six primaries and secondaries, ties between channels, near-greys whose
    chroma is a few ulps, and random colours."""
    levels = (0.0, 1.0, 0.5, 1 / 3, 2 / 3)
    named = [(a, b, c) for a in levels for b in levels for c in levels]  # every tie and sector boundary among them
    near_grey = [(0.5, 0.5 + 1e-7, 0.5 - 1e-7), (1e-8, 0.0, 0.0), (1.0, 1.0 - 1e-7, 1.0)]
    random = torch.rand(320 - len(named) - len(near_grey), 3, generator=torch.Generator().manual_seed(0)).tolist()
    pixels = torch.tensor(named + near_grey + random, dtype=torch.float32)
    return pixels.T.reshape(1, 3, 8, 40)


@pytest.mark.parametrize("shift", [-0.5, -0.3, -0.1, 0.0, 0.05, 0.25, 0.5])
def test_hue_rotation_matches_torchvision_on_edge_colours(shift):
    import torchvision.transforms.v2.functional as TF

    from stellar_hf.data import _rotate_hue_

    views = edge_colours()
    expected = TF.adjust_hue(views[0], shift)
    actual = _rotate_hue_(views.clone(), torch.tensor([shift]))[0]
    torch.testing.assert_close(actual, expected, atol=2e-6, rtol=0)
    grey = views[0].amax(0) == views[0].amin(0)
    assert torch.equal(actual[:, grey], views[0][:, grey]), "grey pixels keep their value"


@pytest.mark.parametrize("size,kernel_size", [((10, 12), 9), ((24, 17), 5), ((7, 7), 3)])
def test_blur_matches_torchvision_with_reflected_borders(size, kernel_size):
    import torchvision.transforms.v2.functional as TF

    from stellar_hf.data import _blur_taps, _gaussian_blur_

    views = torch.rand(3, 3, *size, generator=torch.Generator().manual_seed(1))
    sigmas = torch.tensor([0.1, 0.9, 2.0])
    expected = torch.stack(
        [TF.gaussian_blur(view, [kernel_size] * 2, [sigma] * 2) for view, sigma in zip(views, sigmas.tolist())]
    )
    blurred = _gaussian_blur_(views.clone(), _blur_taps(sigmas, kernel_size))
    torch.testing.assert_close(blurred, expected, atol=1e-6, rtol=0)


def test_blur_leaves_out_only_taps_too_light_to_matter():
    from stellar_hf.data import _NEGLIGIBLE_TAP, _BlurBuffers, _blur_radii, _blur_taps, _gaussian_blur_

    sigmas = torch.tensor([0.1, 0.2, 0.4, 0.6, 0.8, 2.0])
    radii = _blur_radii(sigmas, 9).tolist()
    assert radii == [0, 1, 2, 3, 4, 4]
    taps = _blur_taps(sigmas, 9)
    for index, radius in enumerate(radii):
        assert (taps[radius + 1 :, index] <= _NEGLIGIBLE_TAP).all()
        assert (taps[1 : radius + 1, index] > _NEGLIGIBLE_TAP).all()
    views = torch.rand(len(sigmas), 3, 20, 17, generator=torch.Generator().manual_seed(2))
    full = _gaussian_blur_(views.clone(), taps)
    for index, radius in enumerate(radii):
        view, short_taps = views[index : index + 1], taps[: radius + 1, index : index + 1]
        short = _gaussian_blur_(view.clone(), short_taps)
        torch.testing.assert_close(short, full[index : index + 1], atol=3e-8, rtol=0)
        # As the chunks call it: buffers padded for the whole kernel, fewer taps.
        padded_for_all = _BlurBuffers(1, 3, 20, 17, 4, views)
        torch.testing.assert_close(_gaussian_blur_(view.clone(), short_taps, padded_for_all), short, atol=0, rtol=0)


def test_chunks_colour_each_view_as_one_batch_does(monkeypatch):
    # On a CPU the views go through in chunks of a few; a view's colours must not depend on its chunk.
    import stellar_hf.data as data

    reference = MultiViewTransform(40, 6, 0, 16, color_jitter_p=1.0, grayscale_p=0.3, blur_p=0.5)
    views = torch.stack([torch.from_numpy(np.array(scene(40, seed))).permute(2, 0, 1) for seed in range(23)]) / 255
    parameters = torch.cat(
        [reference.draw(40, 40, torch.Generator().manual_seed(seed)).color_parameters for seed in range(4)]
    )[:23]
    whole = ViewAugmentation(reference.color, native=False).color_views(views, parameters)
    for pixels in (40 * 40, 3 * 40 * 40, 7 * 40 * 40):  # chunks of 1, 3 and 7 views: runs cut at chunk edges
        monkeypatch.setitem(data._CHUNK_PIXELS, "cpu", pixels)
        augmentation = ViewAugmentation(reference.color, native=False)
        torch.testing.assert_close(augmentation.color_views(views, parameters), whole, atol=1e-6, rtol=0)
        # The kept buffers serve the next batch alike, and another view size gets its own.
        torch.testing.assert_close(augmentation.color_views(views, parameters), whole, atol=1e-6, rtol=0)
        augmentation.color_views(views[:5, :, :24, :24].contiguous(), parameters[:5])
    expected = torch.stack([reference.color_view(view, row) for view, row in zip(views, parameters)])
    torch.testing.assert_close(whole, expected, atol=2e-6, rtol=0)


def test_in_place_colouring_refuses_views_it_cannot_write_through():
    augmentation = ViewAugmentation()
    views = torch.rand(2, 3, 16, 16)
    parameters = MultiViewCrops(16, 2, 0, 8).draw(16, 16, torch.Generator().manual_seed(0)).color_parameters
    colored = augmentation.color_views_(views, parameters)
    assert colored is views
    with pytest.raises(ValueError, match="contiguous"):
        augmentation.color_views_(torch.rand(3, 2, 16, 16).transpose(0, 1), parameters)


def test_two_paths_give_the_same_views_within_the_bound():
    image = photo()
    reference = MultiViewTransform(224, 8, 8, 96)
    crops = MultiViewCrops(224, 8, 8, 96)
    augmentation = ViewAugmentation()
    for seed in range(3):
        expected = reference(image, seed=seed)
        actual = augmentation(collate_views([crops(image, seed=seed)]))
        for key in ("pixel_values", "global_views", "local_views"):
            difference = (as_unit_scale(actual[key][0]) - expected[key]).abs()
            assert difference.mean() < MEAN_BOUND and difference.max() < MAX_BOUND, (key, seed)
            assert actual[key].dtype == torch.float32


def test_a_view_does_not_depend_on_its_batch():
    crops = MultiViewCrops(48, 3, 2, 24)
    augmentation = ViewAugmentation()
    items = [crops(scene(48, index), seed=index) for index in range(5)]
    together = augmentation(collate_views(items))
    for index in (0, 3):
        alone = augmentation(collate_views([items[index]]))
        for key, value in alone.items():
            torch.testing.assert_close(together[key][index], value[0], atol=1e-6, rtol=0)
    # The main image is global crop 0, normalised, not coloured.
    main = items[0]["global_crops"][0].float() / 255
    torch.testing.assert_close(as_unit_scale(together["pixel_values"][0]), main, atol=1e-6, rtol=0)
    plain = ViewAugmentation(color=None)(collate_views(items))
    torch.testing.assert_close(as_unit_scale(plain["global_views"][:, 0]), as_unit_scale(plain["pixel_values"]))


def test_views_are_the_same_for_any_worker_count_and_across_epochs_with_persistent_workers():
    scenes = SyntheticScenes(num_images=8, image_size=32)
    dataset = PretrainingDataset(scenes, MultiViewCrops(32, 2, 1, 16), seed=4)

    def epochs(loader):
        batches = []
        for epoch in range(2):
            dataset.set_epoch(epoch)
            batches.append(next(iter(loader)))
        return batches

    plain = epochs(DataLoader(dataset, batch_size=4, collate_fn=collate_views))
    persistent = epochs(
        DataLoader(dataset, batch_size=4, collate_fn=collate_views, num_workers=2, persistent_workers=True)
    )
    for first, second in zip(plain, persistent):
        for key in ("global_crops", "local_crops", "view_parameters", "labels"):
            assert torch.equal(first[key], second[key]), key
    assert not torch.equal(plain[0]["global_crops"], plain[1]["global_crops"]), "a new epoch draws new views"


def test_collate_refuses_items_of_neither_kind():
    with pytest.raises(KeyError, match="global_crops"):
        collate_views([{"image": torch.zeros(3)}])


@pytest.mark.slow  # inductor compiles each operation: about a minute on 2 CPU cores
def test_compiled_augmentation_matches_eager():
    crops = MultiViewCrops(32, 2, 1, 16)
    batch = collate_views([crops(scene(32, index), seed=index) for index in range(4)])
    eager, compiled = ViewAugmentation()(batch), ViewAugmentation(compile=True)(batch)
    for key, value in eager.items():
        torch.testing.assert_close(compiled[key], value, atol=1e-5, rtol=0)


def test_a_failed_compile_falls_back_to_eager(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    augmentation = ViewAugmentation(compile=True)
    monkeypatch.setattr(augmentation, "_compiled", broken)
    crops = MultiViewCrops(32, 2, 1, 16, color=ColorAugmentation(jitter_p=1.0))
    batch = collate_views([crops(scene(32, index), seed=index) for index in range(2)])
    with caplog.at_level("WARNING", logger="stellar_hf.data"):
        inputs = augmentation(batch)
    assert "running it eagerly" in caplog.text
    for key, value in ViewAugmentation(native=False)(batch).items():
        assert torch.equal(inputs[key], value)
