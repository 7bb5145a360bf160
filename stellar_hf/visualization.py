"""Pictures of what STELLAR computes: each sparse token's spatial map over the image, and reconstructions.

Pure PIL + NumPy + torch (no matplotlib). The examples and the pretraining script import this module; the model
files never do, so the Hub copy of the model stays light. This file imports nothing from `stellar_hf` either, so
`examples/extract_features.py` can load it by path when the package is not installed.

Conventions: images are PIL images, `(3, H, W)` tensors / arrays on the [0, 1] scale (clamped here, for display
only), or `(H, W, 3)` uint8 arrays. A spatial map is `(N, r)` for one image (N patches in row-major order, r sparse
tokens, each row a distribution over the tokens) and `grid_size` is the patch grid `(h, w)` with `h * w == N`; an
int means a square grid.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "COLORMAPS",
    "apply_colormap",
    "denormalize",
    "reconstruction_grid",
    "spatial_map_grid",
    "spatial_map_overlays",
    "spatial_map_tiles",
    "to_pil_image",
    "token_colors",
]

# Colormap anchors (RGB, 0-255) at evenly spaced positions in [0, 1], linearly interpolated in between.
COLORMAPS: dict[str, np.ndarray] = {
    "viridis": np.array(
        [
            (68, 1, 84),
            (71, 44, 122),
            (59, 81, 139),
            (44, 113, 142),
            (33, 144, 141),
            (39, 173, 129),
            (92, 200, 99),
            (170, 220, 50),
            (253, 231, 37),
        ],
        dtype=np.float64,
    ),
    "inferno": np.array(
        [
            (0, 0, 4),
            (31, 12, 72),
            (85, 15, 109),
            (136, 34, 106),
            (186, 54, 85),
            (227, 89, 51),
            (249, 140, 10),
            (249, 201, 50),
            (252, 255, 164),
        ],
        dtype=np.float64,
    ),
    "gray": np.array([(0, 0, 0), (255, 255, 255)], dtype=np.float64),
}

# The first ten token colours (the familiar "tab10" palette); later tokens step round the hue circle by the golden
# angle, so every token gets its own colour whatever r is.
_BASE_PALETTE = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
]

_BACKGROUND = (255, 255, 255)
_TEXT = (0, 0, 0)


# ----------------------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------------------


def denormalize(pixel_values: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """
    Undo an image processor's normalisation for display: `(..., C, H, W)` normalised -> the same shape in [0, 1]
    (float32, clamped), with the statistics the processor actually used (`processor.image_mean`,
    `processor.image_std`), which need not be the config's.

    Deprecated: `unnormalize_images(pixel_values, mean, std).clamp(0, 1)` from
    `stellar_hf.image_processing_stellar`, the one normalisation helper, does the same.
    """
    import warnings

    warnings.warn(
        "stellar_hf.visualization.denormalize is deprecated: use "
        "stellar_hf.image_processing_stellar.unnormalize_images(pixel_values, mean, std).clamp(0, 1)",
        FutureWarning,
        stacklevel=2,
    )
    from stellar_hf.image_processing_stellar import unnormalize_images

    return unnormalize_images(pixel_values.detach().float(), mean, std).clamp(0.0, 1.0)


def to_pil_image(image) -> Image.Image:
    """
    A PIL image, a `(C, H, W)` tensor or array on the [0, 1] scale (C = 1 or 3; clamped), or an `(H, W, 3)` /
    `(H, W)` uint8 array -> an RGB PIL image.
    """
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        array = image.detach().float().cpu().numpy()
    elif isinstance(image, np.ndarray):
        array = image
    else:
        raise TypeError(f"expected a PIL image, a torch.Tensor or a numpy array, got {type(image).__name__}")
    if array.dtype == np.uint8:
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=-1)
        if array.ndim != 3 or array.shape[-1] not in (1, 3):
            raise ValueError(f"a uint8 image must be (H, W) or (H, W, 3), got shape {array.shape}")
        return Image.fromarray(np.ascontiguousarray(np.broadcast_to(array, array.shape[:2] + (3,))), "RGB")
    if array.ndim != 3 or array.shape[0] not in (1, 3):
        raise ValueError(
            f"a float image must be (C, H, W) with C = 1 or 3 on the [0, 1] scale, got shape {array.shape}"
        )
    array = np.nan_to_num(array.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    array = np.clip(array, 0.0, 1.0)
    if array.shape[0] == 1:
        array = np.repeat(array, 3, axis=0)
    return Image.fromarray(np.rint(array.transpose(1, 2, 0) * 255.0).astype(np.uint8), "RGB")


def apply_colormap(values: np.ndarray, colormap: str | np.ndarray = "viridis") -> np.ndarray:
    """
    Colour scalars in [0, 1] (any shape, clipped) -> uint8 RGB of shape `values.shape + (3,)`.

    `colormap` is a name in `COLORMAPS` or a `(K, 3)` array of RGB anchors (0-255), K >= 2, evenly spaced.
    """
    if isinstance(colormap, str):
        if colormap not in COLORMAPS:
            raise ValueError(f"unknown colormap {colormap!r}; choose one of {sorted(COLORMAPS)} or pass (K, 3) anchors")
        anchors = COLORMAPS[colormap]
    else:
        anchors = np.asarray(colormap, dtype=np.float64)
        if anchors.ndim != 2 or anchors.shape[1] != 3 or anchors.shape[0] < 2:
            raise ValueError(f"colormap anchors must have shape (K >= 2, 3), got {anchors.shape}")
    values = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0), 0.0, 1.0)
    position = values * (len(anchors) - 1)
    low = np.minimum(np.floor(position).astype(np.int64), len(anchors) - 2)
    frac = (position - low)[..., None]
    rgb = anchors[low] * (1.0 - frac) + anchors[low + 1] * frac
    return np.rint(rgb).astype(np.uint8)


def token_colors(num_tokens: int) -> np.ndarray:
    """`(num_tokens, 3)` uint8: a distinct colour per sparse token (tab10, then golden-angle hues)."""
    colors = []
    for index in range(num_tokens):
        if index < len(_BASE_PALETTE):
            colors.append(_BASE_PALETTE[index])
        else:
            hue = (index * 0.6180339887498949) % 1.0
            saturation = 0.55 + 0.4 * ((index // 3) % 2)
            value = 0.95 - 0.25 * ((index // 7) % 2)
            colors.append(tuple(round(255 * c) for c in colorsys.hsv_to_rgb(hue, saturation, value)))
    return np.array(colors, dtype=np.uint8).reshape(num_tokens, 3)


def _grid_hw(grid_size: int | Sequence[int], num_patches: int) -> tuple[int, int]:
    if isinstance(grid_size, int):
        height, width = grid_size, grid_size
    else:
        if len(grid_size) != 2:
            raise ValueError(f"grid_size must be an int or (height, width), got {grid_size!r}")
        height, width = int(grid_size[0]), int(grid_size[1])
    if height <= 0 or width <= 0 or height * width != num_patches:
        raise ValueError(
            f"grid_size {(height, width)} does not match the spatial map's {num_patches} patches (need h * w == N)"
        )
    return height, width


def _as_spatial_map(spatial_map) -> torch.Tensor:
    spatial_map = torch.as_tensor(spatial_map).detach().float().cpu()
    if spatial_map.ndim == 3 and spatial_map.shape[0] == 1:
        spatial_map = spatial_map[0]
    if spatial_map.ndim != 2:
        raise ValueError(
            f"spatial_map must be (N, r) for one image, got shape {tuple(spatial_map.shape)}; "
            "use spatial_map_grid for a batch"
        )
    return spatial_map


def _tile_hw(image: Image.Image, tile_size: int | Sequence[int] | None) -> tuple[int, int]:
    if tile_size is None:
        return image.height, image.width
    if isinstance(tile_size, int):
        # The longer side becomes tile_size; the aspect ratio is kept.
        scale = tile_size / max(image.height, image.width)
        return max(1, round(image.height * scale)), max(1, round(image.width * scale))
    return int(tile_size[0]), int(tile_size[1])


def _font(tile_width: int) -> ImageFont.ImageFont:
    size = int(min(max(tile_width / 10, 9), 20))
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1, or no FreeType: the fixed-size bitmap font
        return ImageFont.load_default()


def _caption_height(font: ImageFont.ImageFont) -> int:
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left, top, right, bottom = draw.textbbox((0, 0), "#0 Ag 100.0%", font=font)
    return bottom + 4


def _labelled(tile: Image.Image, caption: str, font: ImageFont.ImageFont, caption_height: int) -> Image.Image:
    """The tile under a caption band of `caption_height` pixels (text clipped to the tile's width)."""
    out = Image.new("RGB", (tile.width, tile.height + caption_height), _BACKGROUND)
    ImageDraw.Draw(out).text((2, 2), caption, fill=_TEXT, font=font)
    out.paste(tile, (0, caption_height))
    return out


def _arrange(tiles: list[Image.Image], columns: int | None, padding: int) -> Image.Image:
    """Tiles in a grid, `columns` per row (all in one row when None), `padding` pixels around and between."""
    columns = len(tiles) if not columns else max(1, min(columns, len(tiles)))
    rows = -(-len(tiles) // columns)
    cell_w = max(tile.width for tile in tiles)
    cell_h = max(tile.height for tile in tiles)
    canvas = Image.new(
        "RGB", (columns * cell_w + (columns + 1) * padding, rows * cell_h + (rows + 1) * padding), _BACKGROUND
    )
    for index, tile in enumerate(tiles):
        row, col = divmod(index, columns)
        canvas.paste(tile, (padding + col * (cell_w + padding), padding + row * (cell_h + padding)))
    return canvas


def _stack_rows(panels: list[Image.Image], padding: int) -> Image.Image:
    width = max(panel.width for panel in panels)
    height = sum(panel.height for panel in panels) + padding * (len(panels) - 1)
    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    top = 0
    for panel in panels:
        canvas.paste(panel, (0, top))
        top += panel.height + padding
    return canvas


# ----------------------------------------------------------------------------------------------------------------------
# Spatial maps
# ----------------------------------------------------------------------------------------------------------------------


def spatial_map_tiles(
    image,
    spatial_map,
    grid_size: int | Sequence[int],
    *,
    tokens: Sequence[int] | None = None,
    alpha: float = 0.6,
    colormap: str | np.ndarray = "viridis",
    normalize: str = "minmax",
    interpolation: str = "bilinear",
    tile_size: int | Sequence[int] | None = None,
) -> list[tuple[str, Image.Image]]:
    """
    The unlabelled tiles of [`spatial_map_overlays`], as `(caption, image)` pairs, all of one size: the image, the
    hard assignment (each patch coloured by its argmax token, see [`token_colors`]), then one overlay per token.

    Args:
        image: the image the map belongs to (see the module docstring), usually the *processed* crop, so that
            patches line up with pixels.
        spatial_map: `(N, r)` (or `(1, N, r)`), rows summing to one.
        grid_size: the patch grid `(h, w)` (row-major, `h * w == N`), or an int for a square grid.
        tokens: which token indices to draw (default all r); the hard assignment always uses every token.
        alpha: weight of the colour over the image, in [0, 1].
        colormap: a name in `COLORMAPS` or `(K, 3)` RGB anchors.
        normalize: how each token's map is scaled to [0, 1] before colouring: `"minmax"` (per token, the default),
            `"max"` (divide by the token's maximum, so zero stays dark) or `"none"` (the raw mass, already in
            [0, 1]). A constant map is drawn at 0 under `"minmax"`.
        interpolation: `"bilinear"` or `"nearest"` upsampling of the maps from the patch grid to the tile.
        tile_size: `None` (the image's size), an int (the longer side, aspect kept) or `(height, width)`.

    Captions: `"image"`, `"argmax"`, and `"#t 12.3%"` for token t with its mass share, the mean of its map column.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if normalize not in ("minmax", "max", "none"):
        raise ValueError(f"normalize must be 'minmax', 'max' or 'none', got {normalize!r}")
    if interpolation not in ("bilinear", "nearest"):
        raise ValueError(f"interpolation must be 'bilinear' or 'nearest', got {interpolation!r}")
    spatial_map = _as_spatial_map(spatial_map)
    num_patches, num_tokens = spatial_map.shape
    grid_h, grid_w = _grid_hw(grid_size, num_patches)
    tokens = list(range(num_tokens)) if tokens is None else [int(t) for t in tokens]
    for token in tokens:
        if not 0 <= token < num_tokens:
            raise ValueError(f"token index {token} out of range for a map with {num_tokens} tokens")

    picture = to_pil_image(image)
    tile_h, tile_w = _tile_hw(picture, tile_size)
    if picture.size != (tile_w, tile_h):
        picture = picture.resize((tile_w, tile_h), Image.Resampling.BICUBIC)
    base = np.asarray(picture, dtype=np.float32)

    maps = spatial_map.T.reshape(num_tokens, grid_h, grid_w)  # (r, h, w)
    shares = spatial_map.mean(dim=0)  # (r,)

    # Hard assignment: argmax per patch, nearest upsampling so patch borders stay crisp.
    argmax = maps.argmax(dim=0)[None, None].float()
    argmax = F.interpolate(argmax, size=(tile_h, tile_w), mode="nearest")[0, 0].long().numpy()
    hard = token_colors(num_tokens)[argmax].astype(np.float32)
    tiles = [("image", picture), ("argmax", _blend(base, hard, alpha))]

    selected = maps[tokens]
    if normalize == "minmax":
        low = selected.amin(dim=(1, 2), keepdim=True)
        span = selected.amax(dim=(1, 2), keepdim=True) - low
        selected = torch.where(span > 1e-12, (selected - low) / span.clamp_min(1e-12), torch.zeros_like(selected))
    elif normalize == "max":
        selected = selected / selected.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)
    upsampled = F.interpolate(
        selected[:, None],
        size=(tile_h, tile_w),
        mode=interpolation,
        **({"align_corners": False} if interpolation == "bilinear" else {}),
    )[:, 0].clamp(0.0, 1.0)
    for token, values in zip(tokens, upsampled.numpy()):
        colored = apply_colormap(values, colormap).astype(np.float32)
        tiles.append((f"#{token} {100.0 * float(shares[token]):.1f}%", _blend(base, colored, alpha)))
    return tiles


def _blend(base: np.ndarray, overlay: np.ndarray, alpha: float) -> Image.Image:
    mixed = (1.0 - alpha) * base + alpha * overlay
    return Image.fromarray(np.clip(np.rint(mixed), 0, 255).astype(np.uint8), "RGB")


def spatial_map_overlays(
    image,
    spatial_map,
    grid_size: int | Sequence[int],
    *,
    tokens: Sequence[int] | None = None,
    alpha: float = 0.6,
    colormap: str | np.ndarray = "viridis",
    normalize: str = "minmax",
    interpolation: str = "bilinear",
    tile_size: int | Sequence[int] | None = None,
    columns: int | None = None,
    padding: int = 2,
    labels: bool = True,
) -> Image.Image:
    """
    One image's spatial map as a single RGB panel: the image, the hard assignment (argmax token per patch, a
    colour per token), then each sparse token's map upsampled to the image, scaled per token, coloured and blended
    over the image. Each tile is captioned (PIL's default font) with `image`, `argmax`, or the token index and its
    mass share (`#3 12.5%`: the mean of that map column, so the shares sum to 100%).

    Args: as [`spatial_map_tiles`], plus
        columns: tiles per row (default: all `2 + len(tokens)` tiles in one row).
        padding: white pixels around and between tiles.
        labels: draw the caption band above each tile.

    Returns:
        a PIL RGB image of `columns * W + (columns + 1) * padding` by `rows * (H + caption) + (rows + 1) * padding`
        pixels, W x H being the tile size.
    """
    tiles = spatial_map_tiles(
        image,
        spatial_map,
        grid_size,
        tokens=tokens,
        alpha=alpha,
        colormap=colormap,
        normalize=normalize,
        interpolation=interpolation,
        tile_size=tile_size,
    )
    if labels:
        font = _font(tiles[0][1].width)
        caption_height = _caption_height(font)
        pictures = [_labelled(tile, caption, font, caption_height) for caption, tile in tiles]
    else:
        pictures = [tile for _, tile in tiles]
    return _arrange(pictures, columns, padding)


def spatial_map_grid(
    images,
    spatial_maps,
    grid_size: int | Sequence[int],
    max_images: int = 8,
    **kwargs,
) -> Image.Image:
    """
    [`spatial_map_overlays`] for a batch, one image per row (the first `max_images`).

    Args:
        images: `(B, 3, H, W)` on the [0, 1] scale, or a sequence of images (see the module docstring).
        spatial_maps: `(B, N, r)`.
        grid_size: the patch grid shared by the batch.
        kwargs: passed to [`spatial_map_overlays`] (`tokens`, `alpha`, `tile_size`, `columns`, ...).
    """
    if max_images < 1:
        raise ValueError(f"max_images must be at least 1, got {max_images}")
    spatial_maps = torch.as_tensor(spatial_maps).detach()
    if spatial_maps.ndim != 3:
        raise ValueError(f"spatial_maps must be (B, N, r), got shape {tuple(spatial_maps.shape)}")
    if len(images) != spatial_maps.shape[0]:
        raise ValueError(f"got {len(images)} images but {spatial_maps.shape[0]} spatial maps")
    if len(images) == 0:
        raise ValueError("no images to draw")
    count = min(len(images), max_images)
    panels = [spatial_map_overlays(images[i], spatial_maps[i], grid_size, **kwargs) for i in range(count)]
    return _stack_rows(panels, kwargs.get("padding", 2))


# ----------------------------------------------------------------------------------------------------------------------
# Reconstructions
# ----------------------------------------------------------------------------------------------------------------------


def reconstruction_grid(originals, reconstructions, max_images: int = 8, padding: int = 2) -> Image.Image:
    """
    Originals on the top row, their reconstructions below (the first `max_images` pairs).

    Args:
        originals, reconstructions: `(B, 3, H, W)` on the [0, 1] scale, or sequences of images. Reconstructions are
            the model's raw output and may leave [0, 1]: they are clamped here, for display only. The two may
            differ in size (a VQ decoding at 256 px against a 224 px input); each cell is as large as the largest
            image, which sits at its top-left corner.
    """
    if max_images < 1:
        raise ValueError(f"max_images must be at least 1, got {max_images}")
    if len(originals) != len(reconstructions):
        raise ValueError(f"got {len(originals)} originals but {len(reconstructions)} reconstructions")
    if len(originals) == 0:
        raise ValueError("no images to draw")
    count = min(len(originals), max_images)
    top = [to_pil_image(originals[i]) for i in range(count)]
    bottom = [to_pil_image(reconstructions[i]) for i in range(count)]
    return _arrange(top + bottom, count, padding)
