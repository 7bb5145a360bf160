"""Tests for stellar_hf.visualization: panel layout, non-square grids, colours, value ranges."""

import numpy as np
import pytest
import torch
from PIL import Image

from stellar_hf.visualization import (
    COLORMAPS,
    apply_colormap,
    denormalize,
    reconstruction_grid,
    spatial_map_grid,
    spatial_map_overlays,
    spatial_map_tiles,
    to_pil_image,
    token_colors,
)


def random_map(num_patches: int, num_tokens: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.softmax(3 * torch.randn(num_patches, num_tokens, generator=generator), dim=-1)


def random_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(3, height, width, generator=torch.Generator().manual_seed(seed))


def test_panel_size_one_row_and_columns():
    image, spatial_map = random_image(32, 32), random_map(16, 4)
    unlabelled = spatial_map_overlays(image, spatial_map, (4, 4), labels=False, padding=2)
    assert unlabelled.mode == "RGB"
    assert unlabelled.size == (6 * 32 + 7 * 2, 32 + 2 * 2)  # image, argmax, 4 tokens
    labelled = spatial_map_overlays(image, spatial_map, 4)
    assert labelled.width == unlabelled.width and labelled.height > unlabelled.height
    wrapped = spatial_map_overlays(image, spatial_map, (4, 4), labels=False, columns=4, padding=0)
    assert wrapped.size == (4 * 32, 2 * 32)
    picked = spatial_map_overlays(image, spatial_map, (4, 4), labels=False, tokens=[2], padding=0)
    assert picked.size == (3 * 32, 32)


@pytest.mark.parametrize("grid_size", [(2, 6), (6, 2), (3, 4)])
def test_non_square_grids_and_images(grid_size):
    height, width = grid_size[0] * 8, grid_size[1] * 8
    image = random_image(height, width)
    spatial_map = random_map(grid_size[0] * grid_size[1], 3)
    tiles = spatial_map_tiles(image, spatial_map, grid_size)
    assert [caption for caption, _ in tiles][:2] == ["image", "argmax"]
    assert all(tile.size == (width, height) for _, tile in tiles)
    panel = spatial_map_overlays(image, spatial_map, grid_size, labels=False, padding=0)
    assert panel.size == (5 * width, height)


def test_non_square_grid_orientation_is_row_major():
    # Token 0 owns the left column of a 2 x 3 grid: its overlay must differ between left and right halves.
    grid = (2, 3)
    spatial_map = torch.full((6, 2), 0.0)
    owner = torch.tensor([[0, 1, 1], [0, 1, 1]]).flatten()
    spatial_map[torch.arange(6), owner] = 1.0
    image = torch.full((3, 20, 30), 0.5)
    tiles = dict(spatial_map_tiles(image, spatial_map, grid, interpolation="nearest", alpha=1.0))
    token0 = np.asarray(tiles["#0 33.3%"])
    assert (token0[:, :10] == apply_colormap(np.ones(1))[0]).all()
    assert (token0[:, 10:] == apply_colormap(np.zeros(1))[0]).all()
    argmax = np.asarray(tiles["argmax"])
    colors = token_colors(2)
    assert (argmax[:, :10] == colors[0]).all() and (argmax[:, 10:] == colors[1]).all()


def test_mass_share_labels():
    spatial_map = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    captions = [caption for caption, _ in spatial_map_tiles(random_image(16, 16), spatial_map, 2)]
    assert captions == ["image", "argmax", "#0 62.5%", "#1 37.5%"]


def test_token_tiles_differ_when_maps_differ():
    image = random_image(32, 32)
    spatial_map = random_map(16, 4)
    tiles = [np.asarray(tile, dtype=np.int16) for _, tile in spatial_map_tiles(image, spatial_map, 4)]
    token_tiles = tiles[2:]
    for i in range(4):
        for j in range(i + 1, 4):
            assert np.abs(token_tiles[i] - token_tiles[j]).max() > 10
    changed = spatial_map.clone()
    changed[:, [0, 1]] = changed[:, [1, 0]]
    tiles_changed = [np.asarray(tile, dtype=np.int16) for _, tile in spatial_map_tiles(image, changed, 4)]
    np.testing.assert_array_equal(tiles_changed[2], token_tiles[1])
    np.testing.assert_array_equal(tiles_changed[4], token_tiles[2])
    assert np.abs(tiles_changed[1] - tiles[1]).max() > 10  # the argmax colours moved with the tokens
    np.testing.assert_array_equal(tiles_changed[0], tiles[0])


def test_overlay_values_and_blending():
    image = random_image(24, 24)
    spatial_map = random_map(9, 3)
    base = np.asarray(to_pil_image(image))
    transparent = spatial_map_tiles(image, spatial_map, 3, alpha=0.0)
    for _, tile in transparent:
        np.testing.assert_array_equal(np.asarray(tile), base)
    opaque = spatial_map_tiles(image, spatial_map, 3, alpha=1.0, normalize="minmax", interpolation="nearest")
    for _, tile in opaque[2:]:
        values = np.asarray(tile)
        assert values.dtype == np.uint8
        # min-max per token: both ends of the colormap appear
        flat = values.reshape(-1, 3)
        assert (flat == COLORMAPS["viridis"][0].astype(np.uint8)).all(axis=1).any()
        assert (flat == COLORMAPS["viridis"][-1].astype(np.uint8)).all(axis=1).any()


def test_constant_and_tiny_maps_do_not_break():
    uniform = torch.full((16, 4), 0.25)
    tiles = spatial_map_tiles(random_image(32, 32), uniform, 4, alpha=1.0)
    for _, tile in tiles[2:]:
        assert (np.asarray(tile) == COLORMAPS["viridis"][0].astype(np.uint8)).all()
    panel = spatial_map_overlays(random_image(8, 8), random_map(1, 2), 1, normalize="max")
    assert panel.width > 0


def test_inputs_pil_uint8_bf16_and_batched_map():
    spatial_map = random_map(16, 4).to(torch.bfloat16)[None]  # (1, N, r) is accepted
    pil = Image.new("RGB", (40, 40), (10, 200, 30))
    panel = spatial_map_overlays(pil, spatial_map, 4, labels=False, padding=0)
    assert panel.size == (6 * 40, 40)
    array = np.zeros((40, 40, 3), dtype=np.uint8)
    assert spatial_map_overlays(array, spatial_map, 4, labels=False, padding=0).size == (6 * 40, 40)
    resized = spatial_map_overlays(pil, spatial_map, 4, labels=False, padding=0, tile_size=20)
    assert resized.size == (6 * 20, 20)


def test_bad_arguments():
    image, spatial_map = random_image(32, 32), random_map(16, 4)
    with pytest.raises(ValueError, match="grid_size"):
        spatial_map_overlays(image, spatial_map, (3, 5))
    with pytest.raises(ValueError, match="token index"):
        spatial_map_overlays(image, spatial_map, 4, tokens=[4])
    with pytest.raises(ValueError, match="spatial_map must be"):
        spatial_map_overlays(image, random_map(16, 4)[None].repeat(2, 1, 1), 4)
    with pytest.raises(ValueError, match="alpha"):
        spatial_map_overlays(image, spatial_map, 4, alpha=1.5)
    with pytest.raises(ValueError, match="colormap"):
        spatial_map_overlays(image, spatial_map, 4, colormap="jet")
    with pytest.raises(ValueError, match="spatial maps"):
        spatial_map_grid(image[None], torch.stack([spatial_map, spatial_map]), 4)


def test_spatial_map_grid_rows_and_max_images():
    images = torch.rand(5, 3, 16, 24)
    maps = torch.stack([random_map(6, 3, seed) for seed in range(5)])
    one = spatial_map_overlays(images[0], maps[0], (2, 3))
    grid = spatial_map_grid(images, maps, (2, 3), max_images=3)
    assert grid.width == one.width
    assert grid.height == 3 * one.height + 2 * 2
    np.testing.assert_array_equal(np.asarray(grid)[: one.height], np.asarray(one))
    listed = spatial_map_grid(list(images[:2]), maps[:2], (2, 3))
    assert listed.height == 2 * one.height + 2


def test_reconstruction_grid_clamps_and_lays_out():
    originals = torch.rand(3, 3, 16, 16)
    reconstructions = originals * 3 - 1  # outside [0, 1], as a raw reconstruction may be
    grid = reconstruction_grid(originals, reconstructions, max_images=2, padding=1)
    assert grid.size == (2 * 16 + 3, 2 * 16 + 3)
    cell = np.asarray(grid)[18:34, 1:17].astype(np.float32) / 255
    expected = reconstructions[0].clamp(0, 1).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(cell, expected, atol=1 / 255)
    mixed = reconstruction_grid(originals[:1], torch.rand(1, 3, 20, 20), padding=0)
    assert mixed.size == (20, 40)
    with pytest.raises(ValueError, match="reconstructions"):
        reconstruction_grid(originals, reconstructions[:2])


def test_normalisation_helper_round_trip_and_deprecated_denormalize():
    from stellar_hf.data import normalize
    from stellar_hf.image_processing_stellar import normalize_images, unnormalize_images

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    images = torch.rand(2, 5, 3, 8, 8)  # any leading dimensions: batch and views
    normalized = (images - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    torch.testing.assert_close(normalize_images(images, mean, std), normalized)
    torch.testing.assert_close(normalize(images), normalized)  # the data module's name, ImageNet by default
    torch.testing.assert_close(unnormalize_images(normalized, mean, std), images, atol=1e-6, rtol=0)
    as_bytes = (images * 255).round().to(torch.uint8)
    torch.testing.assert_close(normalize_images(as_bytes, mean, std), normalize_images(as_bytes.float() / 255, mean, std))
    with pytest.warns(FutureWarning, match="unnormalize_images"):
        shown = denormalize(normalized * 10, mean, std)
    assert shown.min() >= 0 and shown.max() <= 1
    with pytest.raises(ValueError, match="one value per channel"), pytest.warns(FutureWarning):
        denormalize(normalized, mean[:2], std[:2])
    with pytest.raises(ValueError, match="one value per channel"):
        normalize_images(images, mean[:2], std[:2])
    colors = token_colors(200)
    assert len({tuple(c) for c in colors.tolist()}) == 200
    ramp = apply_colormap(np.linspace(-1, 2, 50), "inferno")
    assert ramp.shape == (50, 3) and ramp.dtype == np.uint8
    np.testing.assert_array_equal(ramp[0], COLORMAPS["inferno"][0])
    np.testing.assert_array_equal(ramp[-1], COLORMAPS["inferno"][-1])
    gray = to_pil_image(torch.full((1, 4, 4), 2.0))
    assert gray.mode == "RGB" and np.asarray(gray).min() == 255
