"""Data for STELLAR pretraining and evaluation.

Three parts, none of which the model files import (so the Hub copy of the model stays light):

1. **Synthetic scenes** (`SyntheticScenes`): a built-in, file-free dataset of shapes on textured
   backgrounds, each image a pure function of ``(seed, split, index)``. It is the default
   pretraining data of the examples and carries labels and instance masks for evaluation.
2. **Views** (`MultiViewTransform`, `EvalTransform`, `normalize`): the pretraining views of spec
   section 4 made from one image, with all randomness drawn from an explicit `torch.Generator`.
3. **Loading** (`load_image_folder`, `load_hub_dataset`, `PretrainingDataset`,
   `StreamingPretrainingDataset`, `collate_views`): images from folders, the Hub or disk, made
   RGB, with unreadable files skipped and counted.

Every tensor this module returns is on the [0, 1] scale, *unnormalised*: the reconstruction
target is the unnormalised image, and the model takes ImageNet-normalised `pixel_values`, so the
training loop (or the image processor) calls `normalize` once, just before the forward pass.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info
from torchvision.transforms import InterpolationMode

from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .image_processing_stellar import evaluation_resize, normalize_images, to_rgb_image

logger = logging.getLogger(__name__)

__all__ = [
    "CLASS_NAMES",
    "COLOR_NAMES",
    "COLOR_VALUES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "EvalTransform",
    "ImageFolder",
    "MultiViewTransform",
    "PretrainingDataset",
    "StreamingPretrainingDataset",
    "SyntheticScenes",
    "SyntheticScenesConfig",
    "collate_views",
    "load_hub_dataset",
    "load_image_folder",
    "normalize",
    "synthetic_scenes_dataset",
    "to_rgb",
]

# transformers' constants, the one source of the ImageNet statistics.
IMAGENET_MEAN = tuple(IMAGENET_DEFAULT_MEAN)
IMAGENET_STD = tuple(IMAGENET_DEFAULT_STD)

# --------------------------------------------------------------------------------------------
# 1. Synthetic scenes
# --------------------------------------------------------------------------------------------

CLASS_NAMES = ("circle", "square", "triangle", "cross", "ring", "star")
COLOR_NAMES = ("red", "green", "blue", "yellow", "magenta", "cyan", "orange", "white")
# Saturated colours, so that every object stands out from the muted backgrounds.
COLOR_VALUES = (
    (220, 40, 40),
    (40, 175, 60),
    (45, 85, 225),
    (240, 210, 40),
    (205, 55, 205),
    (40, 205, 215),
    (245, 135, 30),
    (240, 240, 240),
)
SPLITS = ("train", "validation", "test")

# Each shape is drawn with the area of a disc of radius R (its "size"), so the size ranges alone
# decide which object is largest. Circumradius / R for each shape, used to keep shapes in frame:
# square half-side 0.886R, triangle circumradius 1.555R, cross arm 1.166R, ring outer 1.197R,
# star outer 1.541R (see `_shape_mask`).
_SHAPE_EXTENT = (1.0, 1.254, 1.555, 1.260, 1.197, 1.541)


@dataclass
class SyntheticScenesConfig:
    """Settings of `SyntheticScenes`; every image is a pure function of these and its index.

    Args:
        num_images: number of images in the split.
        image_size: side S of the square images, in pixels.
        split: "train", "validation" or "test"; each draws from its own seed stream.
        seed: base seed; different seeds give different datasets.
        min_objects / max_objects: objects per image, the dominant one included.
        dominant_size: range of the dominant object's size R as a fraction of S (its area is
            that of a disc of radius R).
        distractor_size: the same for the other objects. `dominant_size[0]` must exceed
            `distractor_size[1]` so that the label (the dominant shape) is learnable.
        noise_std: per-pixel Gaussian noise, as a fraction of the full intensity range.
        texture_amplitude: amplitude of the background's stripe texture (same units).
    """

    num_images: int = 10000
    image_size: int = 64
    split: str = "train"
    seed: int = 0
    min_objects: int = 1
    max_objects: int = 4
    dominant_size: tuple[float, float] = (0.18, 0.25)
    distractor_size: tuple[float, float] = (0.07, 0.12)
    noise_std: float = 0.025
    texture_amplitude: float = 0.06

    def __post_init__(self):
        # Fail early with the offending value rather than deep inside the rasteriser.
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.num_images < 0:
            raise ValueError(f"num_images must be >= 0, got {self.num_images}")
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16 pixels, got {self.image_size}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(
                f"need 1 <= min_objects <= max_objects, got {self.min_objects} and {self.max_objects}"
            )
        self.dominant_size = tuple(float(v) for v in self.dominant_size)
        self.distractor_size = tuple(float(v) for v in self.distractor_size)
        for name in ("dominant_size", "distractor_size"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ValueError(f"{name} must satisfy 0 < low <= high, got {(low, high)}")
        if self.dominant_size[1] * max(_SHAPE_EXTENT) > 0.5:
            raise ValueError(f"dominant_size {self.dominant_size} is too large to keep every shape in frame")
        if self.dominant_size[0] <= self.distractor_size[1]:
            raise ValueError(
                "dominant_size[0] must exceed distractor_size[1] so the dominant object is the largest, "
                f"got {self.dominant_size} and {self.distractor_size}"
            )


def _shape_mask(shape: int, u: np.ndarray, v: np.ndarray, size: float) -> np.ndarray:
    """Boolean raster of one shape in its own rotated frame.

    Args:
        shape: index into `CLASS_NAMES`.
        u, v: (h, w) pixel-centre coordinates relative to the shape centre, already rotated.
        size: R in pixels; every shape has the area of a disc of radius R.
    Returns:
        (h, w) bool.
    """
    if shape == 0:  # circle
        return u * u + v * v <= size * size
    if shape == 1:  # square: 4a^2 = pi R^2
        a = 0.8862 * size
        return (np.abs(u) <= a) & (np.abs(v) <= a)
    if shape == 2:  # equilateral triangle: (3 sqrt 3 / 4) Rt^2 = pi R^2; inside all three edges
        apothem = 0.5 * 1.5551 * size
        inside = np.ones(u.shape, dtype=bool)
        for k in range(3):
            angle = math.pi / 2 + k * 2 * math.pi / 3
            inside &= u * math.cos(angle) + v * math.sin(angle) <= apothem
        return inside
    if shape == 3:  # cross with arm half-width 0.35 L: 2.31 L^2 = pi R^2
        arm = 1.1662 * size
        half_width = 0.35 * arm
        au, av = np.abs(u), np.abs(v)
        return ((au <= arm) & (av <= half_width)) | ((av <= arm) & (au <= half_width))
    if shape == 4:  # ring, inner radius 0.55 of the outer: 0.6975 pi Ro^2 = pi R^2
        outer = 1.1974 * size
        r2 = u * u + v * v
        return (r2 <= outer * outer) & (r2 >= (0.55 * outer) ** 2)
    if shape == 5:  # five-pointed star, inner radius 0.45 of the outer: 1.3225 Ro^2 = pi R^2
        outer = 1.5413 * size
        inner = 0.45 * outer
        # Fold the angle into one half-spike: beta = 0 points at an inner vertex, pi/5 at a tip
        # (tips at alpha = 0, the first one straight up).
        alpha = np.mod(np.arctan2(v, u) + math.pi / 2, 2 * math.pi / 5)
        beta = np.abs(alpha - math.pi / 5)
        # Radius of the edge from the inner vertex (inner, 0) to the tip outer*(cos, sin)(pi/5),
        # along the ray at angle beta: r = (P_i x P_o) / (d x (P_o - P_i)).
        tip_x, tip_y = outer * math.cos(math.pi / 5), outer * math.sin(math.pi / 5)
        numerator = inner * tip_y
        denominator = np.cos(beta) * tip_y - np.sin(beta) * (tip_x - inner)
        return u * u + v * v <= (numerator / denominator) ** 2
    raise ValueError(f"unknown shape index {shape}")


class SyntheticScenes(Dataset):
    """Shapes on textured backgrounds, generated on the fly; no files needed.

    Each image has a smooth two-colour gradient background with a stripe texture, and 1-4
    objects (`CLASS_NAMES` shapes in `COLOR_VALUES` colours) at random places, sizes and angles,
    later objects occluding earlier ones. One object, the *dominant* one, is clearly larger than
    the others (at least ~2x the area, and the largest visible area in the mask); its shape is the
    image's label, so linear and kNN probes have something learnable to find. Objects left less
    than a quarter visible by occlusion are dropped, so every mask id is really on screen.

    An item is a pure function of ``(seed, split, index)`` (numpy's `SeedSequence` on those three
    numbers), so any worker count, order or resumption sees the same images; the three splits use
    disjoint seed streams.

    Args:
        config: a `SyntheticScenesConfig`; or pass its fields as keyword arguments.

    `__getitem__(index)` returns a dict:
        - ``image``: PIL RGB image, S x S.
        - ``label``: int, the dominant object's shape index into `CLASS_NAMES`.
        - ``mask``: (S, S) int64 tensor; 0 background, 1..K the objects in paint order.
        - ``num_objects``: K.
        - ``shapes``, ``colors``: K ints each (indices into `CLASS_NAMES` / `COLOR_NAMES`), paint order.
        - ``dominant_id``: the mask id (1..K) of the dominant object.
    """

    class_names = CLASS_NAMES

    def __init__(self, config: Optional[SyntheticScenesConfig] = None, **kwargs):
        if config is None:
            config = SyntheticScenesConfig(**kwargs)
        elif kwargs:
            config = SyntheticScenesConfig(**{**asdict(config), **kwargs})
        self.config = config
        size = config.image_size
        # Pixel-centre coordinates, shared by every image.
        coords = np.arange(size, dtype=np.float32) + 0.5
        self._x = np.broadcast_to(coords[None, :], (size, size))
        self._y = np.broadcast_to(coords[:, None], (size, size))
        self._colors = np.asarray(COLOR_VALUES, dtype=np.float32) / 255.0

    def __len__(self) -> int:
        return self.config.num_images

    def __repr__(self) -> str:
        c = self.config
        return (
            f"SyntheticScenes(split={c.split!r}, num_images={c.num_images}, "
            f"image_size={c.image_size}, seed={c.seed})"
        )

    def _rng(self, index: int) -> np.random.Generator:
        split_id = SPLITS.index(self.config.split)
        return np.random.default_rng(np.random.SeedSequence([self.config.seed, split_id, index]))

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        """(S, S, 3) float32 muted gradient plus stripe texture, values around [0.2, 0.8]."""
        c = self.config
        size = c.image_size
        # Muted colours: a grey level with a small per-channel tint, far from the object palette.
        grey = rng.uniform(0.3, 0.7, size=(2, 1))
        ends = np.clip(grey + rng.uniform(-0.12, 0.12, size=(2, 3)), 0.0, 1.0).astype(np.float32)
        angle = rng.uniform(0, 2 * math.pi)
        t = ((self._x - size / 2) * math.cos(angle) + (self._y - size / 2) * math.sin(angle)) / (size * 0.7071)
        t = np.clip(t + 0.5, 0.0, 1.0)[..., None]
        background = ends[0] * (1 - t) + ends[1] * t
        # Stripes of random frequency and direction: texture that is not an object.
        frequency = rng.uniform(2.0, 8.0)
        stripe_angle = rng.uniform(0, math.pi)
        phase = rng.uniform(0, 2 * math.pi)
        stripes = np.sin(
            2 * math.pi * frequency / size * (self._x * math.cos(stripe_angle) + self._y * math.sin(stripe_angle))
            + phase
        )
        return background + (c.texture_amplitude * stripes)[..., None]

    def _paint(self, objects: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """Rasterise `objects` in order.

        Returns:
            mask: (S, S) int64, 0 background, i + 1 for objects[i].
            areas: (K,) int64, each object's full (unoccluded, in-frame) pixel count.
        """
        size = self.config.image_size
        mask = np.zeros((size, size), dtype=np.int64)
        areas = np.zeros(len(objects), dtype=np.int64)
        for i, obj in enumerate(objects):
            # Work inside the bounding box only: small objects cost a few hundred pixels, not S^2.
            reach = obj["size"] * _SHAPE_EXTENT[obj["shape"]] + 1
            x0, x1 = max(int(obj["cx"] - reach), 0), min(int(math.ceil(obj["cx"] + reach)), size)
            y0, y1 = max(int(obj["cy"] - reach), 0), min(int(math.ceil(obj["cy"] + reach)), size)
            if x0 >= x1 or y0 >= y1:
                continue
            dx = self._x[y0:y1, x0:x1] - obj["cx"]
            dy = self._y[y0:y1, x0:x1] - obj["cy"]
            cos, sin = math.cos(obj["angle"]), math.sin(obj["angle"])
            inside = _shape_mask(obj["shape"], dx * cos + dy * sin, dy * cos - dx * sin, obj["size"])
            mask[y0:y1, x0:x1][inside] = i + 1
            areas[i] = inside.sum()
        return mask, areas

    def render(self, index: int) -> dict[str, Any]:
        """Render image `index` as numpy arrays.

        Returns:
            dict with ``image`` (S, S, 3) uint8, ``mask`` (S, S) int64, ``label`` int,
            ``shapes`` / ``colors`` lists of K ints, ``dominant_id`` int in 1..K.
        """
        c = self.config
        size = c.image_size
        if not 0 <= index < c.num_images:
            raise IndexError(f"index {index} out of range for {c.num_images} images")
        rng = self._rng(index)
        background = self._background(rng)

        num_objects = int(rng.integers(c.min_objects, c.max_objects + 1))
        label = int(rng.integers(len(CLASS_NAMES)))
        objects = []
        for k in range(num_objects):
            dominant = k == 0
            shape = label if dominant else int(rng.integers(len(CLASS_NAMES)))
            low, high = c.dominant_size if dominant else c.distractor_size
            radius = rng.uniform(low, high) * size
            # The dominant object stays fully in frame; distractors may be cut by the border.
            margin = radius * _SHAPE_EXTENT[shape] if dominant else 0.0
            objects.append(
                {
                    "shape": shape,
                    "color": int(rng.integers(len(COLOR_NAMES))),
                    "size": radius,
                    "cx": rng.uniform(margin, size - margin),
                    "cy": rng.uniform(margin, size - margin),
                    "angle": rng.uniform(0, 2 * math.pi),
                    "shade": rng.uniform(0.85, 1.1),
                    "dominant": dominant,
                }
            )
        # The dominant object takes a random place in the paint order, so distractors may cover it.
        order = rng.permutation(num_objects)
        objects = [objects[i] for i in order]
        noise = rng.normal(0.0, c.noise_std, size=(size, size, 3)).astype(np.float32)

        mask, areas = self._paint(objects)
        visible = np.bincount(mask.ravel(), minlength=len(objects) + 1)[1:]
        dominant_pos = next(i for i, o in enumerate(objects) if o["dominant"])
        others = np.delete(visible, dominant_pos)
        if others.size and visible[dominant_pos] < 1.5 * others.max():
            # Occlusion ate too much of it: paint it last instead (fully visible, by construction
            # at least ~2x any distractor), so the label stays the clearly largest visible object.
            objects.append(objects.pop(dominant_pos))
            mask, areas = self._paint(objects)
            visible = np.bincount(mask.ravel(), minlength=len(objects) + 1)[1:]
        keep = (visible >= 0.25 * areas) & (visible >= 4)
        if not keep.all():
            # Drop nearly hidden distractors (never the dominant one), then repaint: removing an
            # occluder only uncovers the others, so one repaint suffices.
            objects = [o for o, k in zip(objects, keep) if k or o["dominant"]]
            mask, _ = self._paint(objects)

        # One gather paints every object: row i + 1 of the table is objects[i]'s colour.
        table = np.zeros((len(objects) + 1, 3), dtype=np.float32)
        for i, obj in enumerate(objects):
            table[i + 1] = self._colors[obj["color"]] * obj["shade"]
        image = np.where((mask > 0)[..., None], table[mask], background)
        image = np.clip((image + noise) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return {
            "image": image,
            "mask": mask,
            "label": label,
            "shapes": [o["shape"] for o in objects],
            "colors": [o["color"] for o in objects],
            "dominant_id": next(i for i, o in enumerate(objects) if o["dominant"]) + 1,
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            index += len(self)
        scene = self.render(index)
        return {
            "image": Image.fromarray(scene["image"], mode="RGB"),
            "label": scene["label"],
            "mask": torch.from_numpy(scene["mask"]),
            "num_objects": len(scene["shapes"]),
            "shapes": scene["shapes"],
            "colors": scene["colors"],
            "dominant_id": scene["dominant_id"],
        }


def _synthetic_scenes_generator(config_dict: dict) -> Iterator[dict]:
    # Module-level (not a closure) so that `datasets` can fingerprint it for its cache.
    scenes = SyntheticScenes(SyntheticScenesConfig(**config_dict))
    for index in range(len(scenes)):
        scene = scenes.render(index)
        yield {
            "image": Image.fromarray(scene["image"], mode="RGB"),
            "label": scene["label"],
            "mask": scene["mask"].astype(np.uint8),
            "num_objects": len(scene["shapes"]),
            "shapes": scene["shapes"],
            "colors": scene["colors"],
            "dominant_id": scene["dominant_id"],
        }


def synthetic_scenes_dataset(
    config: Optional[SyntheticScenesConfig] = None, cache_dir: Optional[str] = None, **kwargs
):
    """The synthetic scenes as a `datasets.Dataset` (for `push_to_hub`, `map`, the image viewer).

    Same rows as `SyntheticScenes` (`config` or its fields as keyword arguments), with features
    ``image`` (Image), ``label`` (ClassLabel of `CLASS_NAMES`), ``mask`` (Array2D uint8, S x S),
    ``num_objects``, ``shapes``, ``colors`` (lists of ClassLabel), ``dominant_id``. The mask is
    stored as uint8 (at most 4 objects) to keep the Arrow file small.
    """
    import datasets

    if config is None:
        config = SyntheticScenesConfig(**kwargs)
    elif kwargs:
        config = SyntheticScenesConfig(**{**asdict(config), **kwargs})
    size = config.image_size
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=list(CLASS_NAMES)),
            "mask": datasets.Array2D(shape=(size, size), dtype="uint8"),
            "num_objects": datasets.Value("int32"),
            "shapes": datasets.Sequence(datasets.ClassLabel(names=list(CLASS_NAMES))),
            "colors": datasets.Sequence(datasets.ClassLabel(names=list(COLOR_NAMES))),
            "dominant_id": datasets.Value("int32"),
        }
    )
    return datasets.Dataset.from_generator(
        _synthetic_scenes_generator,
        features=features,
        gen_kwargs={"config_dict": asdict(config)},
        cache_dir=cache_dir,
        split=datasets.Split(config.split),
    )


# --------------------------------------------------------------------------------------------
# 2. Views
# --------------------------------------------------------------------------------------------


def normalize(
    images: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """ImageNet-normalise images on the [0, 1] scale, as the model expects its `pixel_values`.

    Args:
        images: (..., 3, H, W) float tensor in [0, 1] (any leading dimensions: views, batch), or uint8 in 0-255.
    Returns:
        Tensor of the same shape, ``(images - mean) / std`` per channel (`normalize_images`, the one helper).
    """
    return normalize_images(images, mean, std)


def to_rgb(image: Any) -> Image.Image:
    """Decode and convert one image to a loaded PIL RGB image.

    Accepts a PIL image, a path, a ``{"bytes": ..., "path": ...}`` dict (a `datasets` Image
    column with ``decode=False``), an (H, W[, C]) array (uint8; a 2-D uint16 or float32 array reads
    as a 16-bit or [0, 1] image), or a (C, H, W) tensor (uint8, or float in [0, 1]). The decoded
    image is read as RGB by `to_rgb_image`, the rule the image processors apply too (16-bit and
    float images rescaled, transparency composited on white; see its docstring for each mode).
    Raises (OSError, ValueError, ...) when the data cannot be decoded; `PretrainingDataset` turns
    that into a skip.
    """
    if isinstance(image, dict):
        if image.get("bytes") is not None:
            import io

            image = Image.open(io.BytesIO(image["bytes"]))
        elif image.get("path"):
            image = image["path"]
        else:
            raise ValueError("image dict has neither 'bytes' nor 'path'")
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as opened:
            opened.load()  # decode now, inside the caller's error handling, not lazily later
            return to_rgb(opened)
    if isinstance(image, torch.Tensor):
        if image.ndim != 3:
            raise ValueError(f"expected a (C, H, W) tensor, got shape {tuple(image.shape)}")
        if image.is_floating_point():
            image = (image.clamp(0, 1) * 255 + 0.5).to(torch.uint8)
        image = image.permute(1, 2, 0).cpu().numpy()
    if isinstance(image, np.ndarray):
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"cannot make an image from {type(image).__name__}")
    # The one reading rule shared with the image processors, so training and inference see the same pixels.
    return to_rgb_image(image)


def _to_float_tensor(image: Any) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1] from a PIL image or a (3, H, W) uint8/float tensor."""
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"expected a (3, H, W) image tensor, got shape {tuple(image.shape)}")
        if image.shape[0] == 1:
            image = image.expand(3, -1, -1)
        if image.dtype == torch.uint8:
            return image.float().div_(255.0)
        return image.float()
    return TF.pil_to_tensor(to_rgb(image)).float().div_(255.0)


def _interpolation(mode: Union[str, InterpolationMode]) -> InterpolationMode:
    return mode if isinstance(mode, InterpolationMode) else InterpolationMode(mode)


def _generator_for(generator: Optional[torch.Generator], seed: Optional[int]) -> torch.Generator:
    if generator is not None and seed is not None:
        raise ValueError("pass either generator or seed, not both")
    if generator is not None:
        return generator
    if seed is None:
        # No explicit randomness: draw one seed from the global RNG, like torchvision transforms
        # do, so DataLoader workers (seeded differently by PyTorch) still differ.
        seed = int(torch.randint(0, 2**62, (1,)).item())
    return torch.Generator().manual_seed(seed)


# Slots of each view's row of uniforms (see MultiViewTransform.__call__): a fixed layout, so a
# view's parameters do not depend on how many draws another view's crop needed.
_CROP_TRIES = 10
_SLOT_POSITION = 2 * _CROP_TRIES
_SLOT_FLIP = _SLOT_POSITION + 2
_SLOT_JITTER = _SLOT_FLIP + 1
_SLOT_FACTORS = _SLOT_JITTER + 1
_SLOT_ORDER = _SLOT_FACTORS + 4
_SLOT_GRAY = _SLOT_ORDER + 4
_SLOT_BLUR = _SLOT_GRAY + 1
_SLOT_SIGMA = _SLOT_BLUR + 1
_SLOTS_PER_VIEW = _SLOT_SIGMA + 1


def _crop_box(
    height: int, width: int, u: Sequence[float], scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop sampling, driven by the given uniforms.

    Args:
        height, width: input size.
        u: the view's uniforms in [0, 1); slots 0..2*_CROP_TRIES+1 are used.
    Returns:
        (top, left, crop_height, crop_width).
    """
    area = height * width
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for attempt in range(_CROP_TRIES):
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u[2 * attempt])
        aspect = math.exp(log_low + (log_high - log_low) * u[2 * attempt + 1])
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(u[_SLOT_POSITION] * (height - h + 1)), height - h)
            left = min(int(u[_SLOT_POSITION + 1] * (width - w + 1)), width - w)
            return top, left, h, w
    # Fallback, as torchvision: the largest centred crop with an allowed aspect ratio.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class MultiViewTransform:
    """The pretraining views of one image (spec section 4), reproducible from a generator.

    From one image it makes M global views (random resized crop to `image_size`, scale
    `global_scale`, horizontal flip) and K local views (crop to `local_image_size`, scale
    `local_scale`, flip). Global view 0, uncoloured, is the **main image** x (reconstructed and
    clustered). Every global view, view 0 included, and every local view then gets the original's
    `random_color_blur`: colour jitter with p 0.8 (brightness 0.4, contrast 0.4, saturation 0.2,
    hue 0.1, in a random order), grayscale with p 0.2, clamp to [0, 1], Gaussian blur with p 0.5
    (kernel 9, sigma 0.1-2). So ``global_views[0]`` is the colour-augmented copy of the same crop
    as ``pixel_values``, as in the original, where the model colours its global views itself.

    Differences from the original, on purpose: each view gets its own colour parameters (the
    original applies one torchvision v2 transform to the whole flattened batch of views, which
    draws a single set of parameters for all of them); resizing is bicubic with antialiasing
    (the original's kornia crops do not antialias); crops are clamped to [0, 1] like the original.
    The original's dataset also computes a separate crop at scale 0.2-1 but returns global view 0
    as the main image, so the main image here is global view 0 at `global_scale`, as there.

    Randomness: all of it comes from one ``torch.rand`` call on the given generator (a fixed
    number of uniforms per view), never from the global RNGs, so ``transform(image, seed=s)`` is a
    pure function of ``(image, s)`` whatever process or worker runs it. `PretrainingDataset`
    derives ``s`` from ``(seed, epoch, index)``. With neither `generator` nor `seed`, one seed is
    drawn from the global torch RNG (like torchvision transforms).

    Args:
        image_size: side of the main image and global views.
        num_global_views: M >= 1 (view 0 is the main image).
        num_local_views: K >= 0.
        local_image_size: side of the local views (96 in the original at 224 px).
        global_scale, local_scale: crop area ranges as fractions of the image.
        ratio: crop aspect-ratio range.
        flip_p: probability of a horizontal flip per view.
        color_augment: False skips the colour/grayscale/blur step (global views are then plain crops).
        color_jitter_p, brightness, contrast, saturation, hue, grayscale_p, blur_p,
        blur_kernel_size, blur_sigma: the `random_color_blur` parameters.
        interpolation: resize mode for the crops.

    Call: ``transform(image, generator=None, seed=None)`` with a PIL image or a (3, H, W) tensor
    (uint8, or float in [0, 1]). Returns a dict:
        - ``pixel_values``: (3, S, S) float32 in [0, 1], the main image, not colour-augmented.
        - ``global_views``: (M, 3, S, S) float32 in [0, 1], colour-augmented.
        - ``local_views``: (K, 3, s, s) float32 in [0, 1], colour-augmented.
    None of them is normalised; see `normalize`.
    """

    def __init__(
        self,
        image_size: int = 224,
        num_global_views: int = 8,
        num_local_views: int = 8,
        local_image_size: int = 96,
        global_scale: tuple[float, float] = (0.36, 1.0),
        local_scale: tuple[float, float] = (0.06, 0.36),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        color_augment: bool = True,
        color_jitter_p: float = 0.8,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.2,
        hue: float = 0.1,
        grayscale_p: float = 0.2,
        blur_p: float = 0.5,
        blur_kernel_size: int = 9,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        interpolation: Union[str, InterpolationMode] = "bicubic",
    ):
        if num_global_views < 1:
            raise ValueError(f"num_global_views must be >= 1 (view 0 is the main image), got {num_global_views}")
        if num_local_views < 0:
            raise ValueError(f"num_local_views must be >= 0, got {num_local_views}")
        for name, (low, high) in (("global_scale", global_scale), ("local_scale", local_scale)):
            if not 0 < low <= high <= 1:
                raise ValueError(f"{name} must satisfy 0 < low <= high <= 1, got {(low, high)}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < low <= high, got {ratio}")
        if not 0 <= hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {hue}")
        if blur_kernel_size % 2 != 1:
            raise ValueError(f"blur_kernel_size must be odd, got {blur_kernel_size}")
        self.image_size = int(image_size)
        self.num_global_views = int(num_global_views)
        self.num_local_views = int(num_local_views)
        self.local_image_size = int(local_image_size)
        self.global_scale = tuple(global_scale)
        self.local_scale = tuple(local_scale)
        self.ratio = tuple(ratio)
        self.flip_p = flip_p
        self.color_augment = color_augment
        self.color_jitter_p = color_jitter_p
        self.brightness = brightness
        self.contrast = contrast
        self.saturation = saturation
        self.hue = hue
        self.grayscale_p = grayscale_p
        self.blur_p = blur_p
        self.blur_kernel_size = blur_kernel_size
        self.blur_sigma = tuple(blur_sigma)
        self.interpolation = _interpolation(interpolation)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(image_size={self.image_size}, num_global_views={self.num_global_views}, "
            f"num_local_views={self.num_local_views}, local_image_size={self.local_image_size}, "
            f"global_scale={self.global_scale}, local_scale={self.local_scale}, color_augment={self.color_augment})"
        )

    def _crop(self, image: torch.Tensor, u: Sequence[float], scale, size: int) -> torch.Tensor:
        """(3, H, W) → (3, size, size): random resized crop, optional flip, clamp to [0, 1]."""
        top, left, h, w = _crop_box(image.shape[-2], image.shape[-1], u, scale, self.ratio)
        view = TF.resized_crop(image, top, left, h, w, [size, size], interpolation=self.interpolation, antialias=True)
        if u[_SLOT_FLIP] < self.flip_p:
            view = TF.hflip(view)
        # Bicubic overshoots; the original clamps its crops too.
        return view.clamp_(0.0, 1.0)

    def _color(self, view: torch.Tensor, u: Sequence[float]) -> torch.Tensor:
        """The original's `random_color_blur` on one (3, s, s) view, parameters from `u`."""
        if u[_SLOT_JITTER] < self.color_jitter_p:
            f = u[_SLOT_FACTORS : _SLOT_FACTORS + 4]
            factors = (
                1 + self.brightness * (2 * f[0] - 1),
                1 + self.contrast * (2 * f[1] - 1),
                1 + self.saturation * (2 * f[2] - 1),
                self.hue * (2 * f[3] - 1),
            )
            # A uniformly random order of the four operations, as ColorJitter's randperm(4).
            order = sorted(range(4), key=lambda k: u[_SLOT_ORDER + k])
            for op in order:
                if op == 0 and self.brightness > 0:
                    view = TF.adjust_brightness(view, factors[0])
                elif op == 1 and self.contrast > 0:
                    view = TF.adjust_contrast(view, factors[1])
                elif op == 2 and self.saturation > 0:
                    view = TF.adjust_saturation(view, factors[2])
                elif op == 3 and self.hue > 0:
                    view = TF.adjust_hue(view, factors[3])
        if u[_SLOT_GRAY] < self.grayscale_p:
            view = TF.rgb_to_grayscale(view, num_output_channels=3)
        view = view.clamp(0.0, 1.0)
        if u[_SLOT_BLUR] < self.blur_p:
            low, high = self.blur_sigma
            sigma = low + (high - low) * u[_SLOT_SIGMA]
            view = TF.gaussian_blur(view, [self.blur_kernel_size] * 2, [sigma, sigma])
        return view

    def __call__(
        self, image: Any, generator: Optional[torch.Generator] = None, seed: Optional[int] = None
    ) -> dict[str, torch.Tensor]:
        image = _to_float_tensor(image)
        generator = _generator_for(generator, seed)
        num_views = self.num_global_views + self.num_local_views
        # One draw for everything (rows: global views, then local views): fast, and the
        # parameters of view k never depend on the other views.
        uniforms = torch.rand((num_views, _SLOTS_PER_VIEW), generator=generator, dtype=torch.float64).tolist()
        global_crops = [
            self._crop(image, uniforms[k], self.global_scale, self.image_size) for k in range(self.num_global_views)
        ]
        local_crops = [
            self._crop(image, uniforms[self.num_global_views + k], self.local_scale, self.local_image_size)
            for k in range(self.num_local_views)
        ]
        if self.color_augment:
            global_views = [self._color(v, uniforms[k]) for k, v in enumerate(global_crops)]
            local_views = [self._color(v, uniforms[self.num_global_views + k]) for k, v in enumerate(local_crops)]
        else:
            global_views, local_views = [v.clone() for v in global_crops], local_crops
        local_shape = (0, 3, self.local_image_size, self.local_image_size)
        return {
            "pixel_values": global_crops[0],
            "global_views": torch.stack(global_views),
            "local_views": torch.stack(local_views) if local_views else torch.zeros(local_shape),
        }


class EvalTransform:
    """Deterministic evaluation preprocessing: resize the shorter side, centre crop, [0, 1] tensor.

    As the original's validation transform: shorter side to `resize_size` (bicubic, default
    ``int(image_size * 256 / 224)``), centre crop `image_size`, clamp to [0, 1] (bicubic
    overshoots). Not normalised; see `normalize`.

    Call: ``transform(image)`` with a PIL image or a (3, H, W) tensor. Returns a (3, S, S) float32 tensor.
    """

    def __init__(
        self,
        image_size: int = 224,
        resize_size: Optional[int] = None,
        interpolation: Union[str, InterpolationMode] = "bicubic",
    ):
        self.image_size = int(image_size)
        self.resize_size = evaluation_resize(image_size) if resize_size is None else int(resize_size)
        if self.resize_size < self.image_size:
            raise ValueError(f"resize_size ({self.resize_size}) must be >= image_size ({self.image_size})")
        self.interpolation = _interpolation(interpolation)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_size={self.image_size}, resize_size={self.resize_size})"

    def __call__(self, image: Any) -> torch.Tensor:
        image = _to_float_tensor(image)
        image = TF.resize(image, [self.resize_size], interpolation=self.interpolation, antialias=True)
        return TF.center_crop(image, [self.image_size, self.image_size]).clamp_(0.0, 1.0)


# --------------------------------------------------------------------------------------------
# 3. Loading
# --------------------------------------------------------------------------------------------

# Pillow-readable formats common in image datasets (the `datasets` imagefolder list is longer).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".jfif")


class ImageFolder(Dataset):
    """Images under a folder, found recursively, decoded lazily; optionally labelled by subfolder.

    Build it with `load_image_folder`. Items are dicts: ``image`` (PIL RGB), ``path`` (str), and
    ``label`` (int) when the folder is labelled. A file that cannot be decoded raises OSError
    naming it; `PretrainingDataset` skips such files.

    Attributes:
        paths: sorted list of image paths.
        labels: list of ints, or None when unlabelled.
        class_names: sorted subfolder names, or None.
    """

    def __init__(self, paths: list[Path], labels: Optional[list[int]] = None, class_names: Optional[list[str]] = None):
        self.paths = paths
        self.labels = labels
        self.class_names = class_names

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        classes = f", classes={len(self.class_names)}" if self.class_names else ""
        return f"ImageFolder(images={len(self.paths)}{classes})"

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.paths[index]
        try:
            image = to_rgb(path)
        except Exception as error:
            raise OSError(f"cannot read image {path}: {error}") from error
        item = {"image": image, "path": str(path)}
        if self.labels is not None:
            item["label"] = self.labels[index]
        return item


def load_image_folder(
    path: Union[str, os.PathLike], labels: Union[bool, str] = "auto", extensions: Sequence[str] = IMAGE_EXTENSIONS
) -> ImageFolder:
    """List the images under `path` (recursively, by extension, case-insensitive, sorted).

    Args:
        path: the folder.
        labels: True: one subfolder per class (the `datasets` imagefolder layout
            ``path/<class>/.../x.png``), labelled by the immediate parent folder's name;
            False: unlabelled; "auto": labelled exactly when `datasets` would infer labels, i.e.
            all images are at the same depth and in more than one parent folder.
        extensions: file endings to include.
    Returns:
        An `ImageFolder`.
    Raises:
        ValueError: the folder does not exist or holds no image files.
    """
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"image folder {root} does not exist or is not a directory")
    suffixes = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    paths = sorted(
        p for p in root.rglob("*") if p.suffix.lower() in suffixes and p.is_file() and not p.name.startswith(".")
    )
    if not paths:
        raise ValueError(f"no image files ({', '.join(suffixes)}) found under {root}")
    parents = [p.parent.name if p.parent != root else None for p in paths]
    if labels == "auto":
        depths = {len(p.relative_to(root).parts) for p in paths}
        labels = len(depths) == 1 and None not in parents and len(set(parents)) > 1
    if not labels:
        return ImageFolder(paths)
    if None in parents:
        loose = next(p for p, parent in zip(paths, parents) if parent is None)
        raise ValueError(f"labels=True needs every image inside a class subfolder, but {loose} is not")
    class_names = sorted(set(parents))
    index = {name: i for i, name in enumerate(class_names)}
    return ImageFolder(paths, [index[name] for name in parents], class_names)


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def load_hub_dataset(
    name: Union[str, os.PathLike],
    config: Optional[str] = None,
    split: str = "train",
    streaming: bool = False,
    image_column: str = "image",
    cache_dir: Optional[str] = None,
    **load_kwargs,
):
    """Load one split of an image dataset with `datasets`.

    Args:
        name: a Hub dataset id ("ILSVRC/imagenet-1k"), a local folder of images (loaded with the
            imagefolder builder), or a folder written by `save_to_disk`.
        config: the dataset configuration name, if any.
        split: which split ("train", "validation", slicing like "train[:1%]" for Hub datasets).
        streaming: return a `datasets.IterableDataset` that reads lazily (use it with
            `StreamingPretrainingDataset`).
        image_column: the column that must hold the images; checked here so a typo fails early.
        cache_dir, load_kwargs: passed to `datasets.load_dataset` (e.g. `revision`, `token`).
    Returns:
        `datasets.Dataset`, or `datasets.IterableDataset` when `streaming`.
    Raises:
        ValueError: the split or the image column does not exist.
    """
    import datasets

    local = Path(name)
    if local.is_dir() and _is_saved_dataset(local):
        dataset = datasets.load_from_disk(str(local))
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise ValueError(f"split {split!r} not in the saved dataset at {local}; it has {list(dataset)}")
            dataset = dataset[split]
        if streaming:
            dataset = dataset.to_iterable_dataset()
    else:
        dataset = datasets.load_dataset(
            str(name), config, split=split, streaming=streaming, cache_dir=cache_dir, **load_kwargs
        )
    columns = dataset.column_names
    # A streamed dataset may not know its columns before the first row; then the first access checks.
    if columns is not None and image_column not in columns:
        raise ValueError(f"image column {image_column!r} not found in {name}; columns are {columns}")
    return dataset


def _transform_takes_generator(transform: Callable) -> bool:
    try:
        return "generator" in inspect.signature(transform).parameters
    except (TypeError, ValueError):
        return False


def _item_seed(*numbers: int) -> int:
    """A well-mixed 63-bit seed from small integers (seed, epoch, index, ...)."""
    state = np.random.SeedSequence([int(n) for n in numbers]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


def _split_item(item: Any, image_column: str, label_column: Optional[str]) -> tuple[Any, Optional[int]]:
    """(raw image, label or None) from a dict row, an (image, label) tuple, or a bare image."""
    if isinstance(item, dict):
        if image_column not in item:
            raise KeyError(f"image column {image_column!r} not in item with keys {sorted(item)}")
        label = item.get(label_column) if label_column else None
        return item[image_column], label
    if isinstance(item, (tuple, list)):
        return item[0], (item[1] if len(item) > 1 and label_column else None)
    return item, None


def _describe(image: Any) -> Optional[str]:
    """A file name for warnings, when the raw image carries one."""
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    if isinstance(image, dict) and image.get("path"):
        return str(image["path"])
    return None


def _undecoded(source: Any, image_column: str) -> Any:
    """For a `datasets` table with a decoding Image column, the same table without decoding.

    Decoding then happens in `to_rgb`, inside our error handling and with the file name known,
    instead of inside `datasets.__getitem__`, where a corrupt file would fail the whole row.
    """
    features = getattr(source, "features", None)
    if not type(source).__module__.startswith("datasets") or not features or image_column not in features:
        return source
    import datasets

    feature = features[image_column]
    if isinstance(feature, datasets.Image) and feature.decode:
        return source.cast_column(image_column, datasets.Image(decode=False))
    return source


def _views_from(transform: Callable, takes_generator: bool, image: Image.Image, seed: int) -> dict[str, Any]:
    if takes_generator:
        output = transform(image, generator=torch.Generator().manual_seed(seed))
    else:
        output = transform(image)
    return output if isinstance(output, dict) else {"pixel_values": output}


class PretrainingDataset(Dataset):
    """Map-style wrapper: source rows → RGB image → `transform`, skipping unreadable images.

    Args:
        source: anything indexable with a length: an `ImageFolder`, a `datasets.Dataset`,
            `SyntheticScenes`, a list of paths, a torchvision-style dataset of (image, label).
        transform: usually a `MultiViewTransform`; if it accepts ``generator=``, each item gets a
            generator seeded from ``(seed, epoch, index)``, so the views of an item are the same
            whatever the worker count or order. A transform returning a tensor is stored under
            ``pixel_values``.
        image_column: key of the image in dict rows.
        label_column: key of the label in dict rows (returned as ``labels``), or None.
        seed: base seed of the views.

    Items: the transform's dict (``pixel_values``, ``global_views``, ``local_views``) plus
    ``labels`` (int) when the row has a label, and ``skipped_images`` (list of names) when the
    item stands in for unreadable images.

    An image that cannot be read or decoded is skipped: a warning names it once, it is recorded in
    `skipped_indices` (`num_skipped` counts them) and the item comes from the next readable index
    (wrapping around), transformed with the *requested* index's seed, so the result is still
    deterministic. The item then names, in ``skipped_images``, every unreadable image it was
    substituted for, so the training loop can count them whatever the worker count (`collate_views`
    keeps the names). Raises ValueError for an empty source, or when no image can be read.

    `set_epoch` changes the views; DataLoader workers see it when they start, so call it before
    each epoch's `iter(loader)` and do not use ``persistent_workers=True`` (whose workers keep
    their old copy of the dataset).
    """

    def __init__(
        self,
        source: Any,
        transform: Callable,
        image_column: str = "image",
        label_column: Optional[str] = "label",
        seed: int = 0,
    ):
        if len(source) == 0:
            raise ValueError(f"the pretraining source {source!r} is empty")
        self.source = _undecoded(source, image_column)
        self.transform = transform
        self.image_column = image_column
        self.label_column = label_column
        self.seed = int(seed)
        self.epoch = 0
        self.skipped_indices: set[int] = set()
        self._skipped_names: dict[int, str] = {}
        self._takes_generator = _transform_takes_generator(transform)

    def __len__(self) -> int:
        return len(self.source)

    @property
    def num_skipped(self) -> int:
        """How many distinct unreadable images this process has met so far."""
        return len(self.skipped_indices)

    def set_epoch(self, epoch: int) -> None:
        """Draw fresh views for a new epoch (call on every rank, before iterating)."""
        self.epoch = int(epoch)

    def _file_name(self, index: int, raw: Any = None) -> str:
        paths = getattr(self.source, "paths", None)
        if paths is not None:
            return str(paths[index])
        return _describe(raw) or f"item {index}"

    def read_image(self, index: int) -> tuple[Optional[Image.Image], Optional[int]]:
        """(RGB image, label or None) of source row `index`, untransformed; (None, None) when it cannot be read."""
        raw = None
        try:
            raw, label = _split_item(self.source[index], self.image_column, self.label_column)
            return to_rgb(raw), label
        except KeyError:
            raise  # a wrong column name is a configuration error, not a bad file
        except Exception as error:
            self.skipped_indices.add(index)
            self._skipped_names[index] = self._file_name(index, raw)
            logger.warning("skipping unreadable image %s: %s", self._skipped_names[index], error)
            return None, None

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} items")
        passed_over = []
        for offset in range(n):
            position = (index + offset) % n
            image, label = (None, None) if position in self.skipped_indices else self.read_image(position)
            if image is None:
                passed_over.append(self._skipped_names.get(position) or self._file_name(position))
                continue
            item = _views_from(self.transform, self._takes_generator, image, _item_seed(self.seed, self.epoch, index))
            if label is not None:
                item["labels"] = int(label)
            if passed_over:
                item["skipped_images"] = passed_over
            return item
        raise ValueError(f"none of the {n} images of {self.source!r} could be read (see the warnings above)")


class StreamingPretrainingDataset(IterableDataset):
    """Iterable counterpart of `PretrainingDataset`, for streamed (`streaming=True`) datasets.

    Works on DataLoader workers: a `datasets.IterableDataset` hands each worker its own shards
    (it needs at least as many shards as workers); any other iterable is split by taking every
    `num_workers`-th row. Views are seeded from ``(seed, epoch, worker id, position)``, so a run
    with the same worker count is reproducible. Unreadable images are skipped with a warning
    and counted in `num_skipped` (per process).

    Args: as `PretrainingDataset`; `source` is any iterable of rows.
    """

    def __init__(
        self,
        source: Iterable,
        transform: Callable,
        image_column: str = "image",
        label_column: Optional[str] = "label",
        seed: int = 0,
    ):
        self.source = _undecoded(source, image_column)
        self.transform = transform
        self.image_column = image_column
        self.label_column = label_column
        self.seed = int(seed)
        self.epoch = 0
        self.num_skipped = 0
        self._takes_generator = _transform_takes_generator(transform)

    def set_epoch(self, epoch: int) -> None:
        """New views (and, for `datasets`, a new shuffle order) for a new epoch."""
        self.epoch = int(epoch)
        if hasattr(self.source, "set_epoch"):
            self.source.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        shards_itself = type(self.source).__module__.startswith("datasets")
        yielded, passed_over = 0, []
        for position, row in enumerate(self.source):
            if not shards_itself and position % num_workers != worker_id:
                continue
            raw = None
            try:
                raw, label = _split_item(row, self.image_column, self.label_column)
                image = to_rgb(raw)
            except KeyError:
                raise
            except Exception as error:
                self.num_skipped += 1
                passed_over.append(_describe(raw) or f"row {position}")
                logger.warning("skipping unreadable image %s: %s", passed_over[-1], error)
                continue
            seed = _item_seed(self.seed, self.epoch, worker_id, position)
            item = _views_from(self.transform, self._takes_generator, image, seed)
            if label is not None:
                item["labels"] = int(label)
            if passed_over:
                item["skipped_images"], passed_over = passed_over, []
            yielded += 1
            yield item
        if yielded == 0 and self.num_skipped > 0:
            raise ValueError(f"none of the {self.num_skipped} images this worker read could be decoded")


_STACKED_KEYS = ("pixel_values", "global_views", "local_views")


def collate_views(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack per-image view dicts into a batch.

    Args:
        batch: items of `PretrainingDataset` (or any dicts with ``pixel_values``).
    Returns:
        ``pixel_values`` (B, 3, S, S); ``global_views`` (B, M, 3, S, S) and ``local_views``
        (B, K, 3, s, s) when the items have them; ``labels`` (B,) int64 when every item has one;
        ``skipped_images`` when some items stand in for unreadable images: one list of names per
        such item.
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    if "pixel_values" not in batch[0]:
        raise KeyError(f"items need 'pixel_values', got keys {sorted(batch[0])}")
    output = {key: torch.stack([item[key] for item in batch]) for key in _STACKED_KEYS if key in batch[0]}
    if all(item.get("labels") is not None for item in batch):
        output["labels"] = torch.tensor([int(item["labels"]) for item in batch], dtype=torch.long)
    substitutions = [list(item["skipped_images"]) for item in batch if item.get("skipped_images")]
    if substitutions:
        output["skipped_images"] = substitutions
    return output
