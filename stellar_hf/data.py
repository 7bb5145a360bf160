"""Data for STELLAR pretraining and evaluation.

Three parts, none of which the model files import (so the Hub copy of the model stays light):

1. **Synthetic scenes** (`SyntheticScenes`): a built-in, file-free dataset of shapes on textured
   backgrounds, each image a pure function of ``(seed, split, index)``. It is the default
   pretraining data of the examples and carries labels and instance masks for evaluation.
2. **Views**: the pretraining views of spec section 4, with all randomness drawn from an explicit
   `torch.Generator`, in two parts: `MultiViewCrops` (CPU, DataLoader workers: the draws and the
   uint8 crops) and `ViewAugmentation` (the accelerator, the whole batch at once: colour jitter,
   grayscale, blur, normalisation); `MultiViewTransform` is the per-view float32 reference of the
   same views. `normalize` applies the model's statistics.
3. **Loading** (`load_image_folder`, `load_hub_dataset`, `PretrainingDataset`,
   `StreamingPretrainingDataset`, `collate_views`): images from folders, the Hub or disk, made
   RGB, with unreadable files skipped and counted.

`MultiViewTransform` and the loaders return tensors on the [0, 1] scale, *unnormalised*, and
`MultiViewCrops` uint8 crops: the model takes ImageNet-normalised `pixel_values`, made once on the
training device by `ViewAugmentation` (or `normalize`, or the image processor).
"""

from __future__ import annotations

import inspect
import itertools
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info
from torchvision.transforms import InterpolationMode

from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .image_processing_stellar import evaluation_resize, normalize_images, to_rgb_image
from .native import require_view_kernels, view_kernels

logger = logging.getLogger(__name__)

__all__ = [
    "CLASS_NAMES",
    "COLOR_NAMES",
    "COLOR_VALUES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "COLOR_PARAMETERS",
    "ColorAugmentation",
    "EvalTransform",
    "ImageFolder",
    "MultiViewCrops",
    "MultiViewTransform",
    "PretrainingDataset",
    "StreamingPretrainingDataset",
    "SyntheticScenes",
    "SyntheticScenesConfig",
    "ViewAugmentation",
    "ViewDraws",
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


def _to_uint8_tensor(image: Any) -> torch.Tensor:
    """(3, H, W) uint8 from a PIL image or a (3, H, W) uint8/float tensor (floats in [0, 1], rounded)."""
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"expected a (3, H, W) image tensor, got shape {tuple(image.shape)}")
        if image.shape[0] == 1:
            image = image.expand(3, -1, -1)
        if image.dtype == torch.uint8:
            return image
        return image.float().clamp(0, 1).mul(255).round_().to(torch.uint8)
    return TF.pil_to_tensor(to_rgb(image))


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


# Columns of a view's colour parameters (`ColorAugmentation.parameters`), shared by both view paths.
COLOR_JITTER = 0  # 1.0 when the view gets colour jitter
COLOR_FACTORS = slice(1, 5)  # brightness, contrast, saturation factors and the hue shift
COLOR_ORDER = slice(5, 9)  # the operation (0 brightness, 1 contrast, 2 saturation, 3 hue) at each of 4 positions
COLOR_GRAY = 9  # 1.0 when the view is made grayscale
COLOR_BLUR = 10  # 1.0 when the view is blurred
COLOR_SIGMA = 11  # the blur's sigma
COLOR_PARAMETERS = 12
# ITU-R 601 luma weights, as torchvision's rgb_to_grayscale.
_LUMA = (0.2989, 0.587, 0.114)


@dataclass(frozen=True)
class ColorAugmentation:
    """The original's `random_color_blur` settings, and the per-view parameters drawn from them.

    Colour jitter with probability `jitter_p` (brightness, contrast and saturation factors uniform in
    ``[1 - x, 1 + x]``, hue shift uniform in ``[-hue, hue]``, the four applied in a uniformly random order, as
    torchvision's `ColorJitter`), then grayscale with probability `grayscale_p`, clamp to [0, 1], then Gaussian blur
    with probability `blur_p` (kernel `blur_kernel_size`, sigma uniform in `blur_sigma`).

    `parameters` turns a view's uniforms into its parameters; both view paths read them, so the per-view reference
    (`MultiViewTransform`) and the batched device path (`MultiViewCrops` + `ViewAugmentation`) colour a view alike.
    """

    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_kernel_size: int = 9
    blur_sigma: tuple[float, float] = (0.1, 2.0)

    def __post_init__(self):
        for name in ("jitter_p", "grayscale_p", "blur_p"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
        for name in ("brightness", "contrast", "saturation"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1] (factors in [1 - {name}, 1 + {name}]), got {value}")
        if not 0 <= self.hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {self.hue}")
        if self.blur_kernel_size < 1 or self.blur_kernel_size % 2 != 1:
            raise ValueError(f"blur_kernel_size must be odd and positive, got {self.blur_kernel_size}")
        low, high = self.blur_sigma
        if not 0 < low <= high:
            raise ValueError(f"blur_sigma must satisfy 0 < low <= high, got {self.blur_sigma}")
        object.__setattr__(self, "blur_sigma", (float(low), float(high)))

    @property
    def strengths(self) -> tuple[float, float, float, float]:
        """Brightness, contrast, saturation and hue strengths; an operation of strength 0 is skipped."""
        return (self.brightness, self.contrast, self.saturation, self.hue)

    def parameters(self, uniforms: torch.Tensor) -> torch.Tensor:
        """Each view's colour parameters from its row of uniforms.

        Args:
            uniforms: (V, _SLOTS_PER_VIEW) float64 in [0, 1), the views' draws (see `MultiViewCrops.draw`).
        Returns:
            (V, COLOR_PARAMETERS) float32: columns `COLOR_JITTER`, `COLOR_FACTORS`, `COLOR_ORDER`, `COLOR_GRAY`,
            `COLOR_BLUR`, `COLOR_SIGMA` (flags are 0.0 / 1.0, the order holds operation numbers as floats).
        """
        parameters = torch.zeros(uniforms.shape[0], COLOR_PARAMETERS, dtype=torch.float64)
        parameters[:, COLOR_JITTER] = (uniforms[:, _SLOT_JITTER] < self.jitter_p).double()
        factors = 2 * uniforms[:, _SLOT_FACTORS : _SLOT_FACTORS + 4] - 1
        strengths = torch.tensor(self.strengths, dtype=torch.float64)
        parameters[:, COLOR_FACTORS] = factors * strengths + torch.tensor((1.0, 1.0, 1.0, 0.0), dtype=torch.float64)
        # A uniformly random order of the four operations, as ColorJitter's randperm(4).
        parameters[:, COLOR_ORDER] = uniforms[:, _SLOT_ORDER : _SLOT_ORDER + 4].argsort(dim=1).double()
        parameters[:, COLOR_GRAY] = (uniforms[:, _SLOT_GRAY] < self.grayscale_p).double()
        parameters[:, COLOR_BLUR] = (uniforms[:, _SLOT_BLUR] < self.blur_p).double()
        low, high = self.blur_sigma
        parameters[:, COLOR_SIGMA] = low + (high - low) * uniforms[:, _SLOT_SIGMA]
        return parameters.float()


def _check_view_settings(num_global_views, num_local_views, global_scale, local_scale, ratio) -> None:
    if num_global_views < 1:
        raise ValueError(f"num_global_views must be >= 1 (view 0 is the main image), got {num_global_views}")
    if num_local_views < 0:
        raise ValueError(f"num_local_views must be >= 0, got {num_local_views}")
    for name, (low, high) in (("global_scale", global_scale), ("local_scale", local_scale)):
        if not 0 < low <= high <= 1:
            raise ValueError(f"{name} must satisfy 0 < low <= high <= 1, got {(low, high)}")
    if not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"ratio must satisfy 0 < low <= high, got {ratio}")


@dataclass
class ViewDraws:
    """Everything random about one image's views, drawn once (`MultiViewCrops.draw`).

    Attributes:
        boxes: (V, 4) int64 crop boxes ``(top, left, height, width)`` in input pixels, global views first.
        flips: (V,) bool, horizontal flips.
        color_parameters: (V, COLOR_PARAMETERS) float32 (`ColorAugmentation.parameters`).
    """

    boxes: torch.Tensor
    flips: torch.Tensor
    color_parameters: torch.Tensor


class MultiViewCrops:
    """The CPU part of the pretraining views (spec section 4): crops in uint8, colour left to the device.

    From one image it draws every view's randomness (`draw`) and makes M global crops (random resized crop to
    `image_size`, scale `global_scale`, horizontal flip) and K local crops (`local_image_size`, `local_scale`, flip),
    resized **in uint8** (torchvision's vectorised bicubic, antialiased: about 3x faster than on float32, and a
    quarter of the bytes to move). Global crop 0 is the **main image** x. The colour parameters of every view are
    drawn here too and travel with the crops, so `ViewAugmentation` colours the whole batch at once on the
    accelerator while each view stays a pure function of ``(image, seed)``, whatever the batch, worker or process.

    `MultiViewTransform` is the per-view float32 reference of the same views (same draws; pixels differ only by the
    uint8 resize's rounding).

    Randomness: one ``torch.rand`` call on the given generator (a fixed number of uniforms per view), never the
    global RNGs. `PretrainingDataset` seeds it from ``(seed, epoch, index)``. With neither `generator` nor `seed`,
    one seed is drawn from the global torch RNG (like torchvision transforms).

    Args:
        image_size: side of the main image and global views.
        num_global_views: M >= 1 (view 0 is the main image).
        num_local_views: K >= 0.
        local_image_size: side of the local views (96 in the original at 224 px).
        global_scale, local_scale: crop area ranges as fractions of the image.
        ratio: crop aspect-ratio range.
        flip_p: probability of a horizontal flip per view.
        color: the `ColorAugmentation` whose parameters are drawn (the device applies them).
        interpolation: resize mode for the crops.

    Call: ``crops(image, generator=None, seed=None)`` with a PIL image or a (3, H, W) tensor (uint8, or float in
    [0, 1]). Returns a dict:
        - ``global_crops``: (M, 3, S, S) uint8; ``[0]`` is the main image.
        - ``local_crops``: (K, 3, s, s) uint8.
        - ``view_parameters``: (M + K, COLOR_PARAMETERS) float32, global views first.
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
        color: ColorAugmentation = ColorAugmentation(),
        interpolation: Union[str, InterpolationMode] = "bicubic",
    ):
        _check_view_settings(num_global_views, num_local_views, global_scale, local_scale, ratio)
        self.image_size = int(image_size)
        self.num_global_views = int(num_global_views)
        self.num_local_views = int(num_local_views)
        self.local_image_size = int(local_image_size)
        self.global_scale = tuple(global_scale)
        self.local_scale = tuple(local_scale)
        self.ratio = tuple(ratio)
        self.flip_p = flip_p
        self.color = color
        self.interpolation = _interpolation(interpolation)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(image_size={self.image_size}, num_global_views={self.num_global_views}, "
            f"num_local_views={self.num_local_views}, local_image_size={self.local_image_size}, "
            f"global_scale={self.global_scale}, local_scale={self.local_scale})"
        )

    @property
    def num_views(self) -> int:
        return self.num_global_views + self.num_local_views

    def draw(self, height: int, width: int, generator: torch.Generator) -> ViewDraws:
        """All views' randomness for an image of `height` x `width` pixels, from one draw on `generator`."""
        # Rows: global views, then local views; a fixed number of uniforms per view, so the parameters of view k
        # never depend on the other views.
        uniforms = torch.rand((self.num_views, _SLOTS_PER_VIEW), generator=generator, dtype=torch.float64)
        rows = uniforms.tolist()
        boxes = [
            _crop_box(height, width, row, self.global_scale if k < self.num_global_views else self.local_scale, self.ratio)
            for k, row in enumerate(rows)
        ]
        return ViewDraws(
            boxes=torch.tensor(boxes, dtype=torch.long).reshape(self.num_views, 4),
            flips=uniforms[:, _SLOT_FLIP] < self.flip_p,
            color_parameters=self.color.parameters(uniforms),
        )

    def _size_of(self, view: int) -> int:
        return self.image_size if view < self.num_global_views else self.local_image_size

    def crop(self, image: torch.Tensor, draws: ViewDraws, view: int) -> torch.Tensor:
        """(3, H, W) -> (3, s, s) of the same dtype: view `view`'s resized crop and flip (clamped for floats)."""
        top, left, height, width = draws.boxes[view].tolist()
        size = self._size_of(view)
        crop = TF.resized_crop(image, top, left, height, width, [size, size], self.interpolation, antialias=True)
        if draws.flips[view]:
            crop = TF.hflip(crop)
        # Bicubic overshoots; the original clamps its crops too (uint8 results are clamped by the cast).
        return crop.clamp_(0.0, 1.0) if crop.is_floating_point() else crop

    def __call__(
        self, image: Any, generator: Optional[torch.Generator] = None, seed: Optional[int] = None
    ) -> dict[str, torch.Tensor]:
        image = _to_uint8_tensor(image)
        draws = self.draw(image.shape[-2], image.shape[-1], _generator_for(generator, seed))
        crops = [self.crop(image, draws, view) for view in range(self.num_views)]
        local_shape = (0, 3, self.local_image_size, self.local_image_size)
        local = crops[self.num_global_views :]
        return {
            "global_crops": torch.stack(crops[: self.num_global_views]),
            "local_crops": torch.stack(local) if local else torch.zeros(local_shape, dtype=torch.uint8),
            "view_parameters": draws.color_parameters,
        }


class MultiViewTransform(MultiViewCrops):
    """The pretraining views of one image, per view and in float32: the reference for `MultiViewCrops` + `ViewAugmentation`.

    The same views as the batched path (the same `draw`: crop boxes, flips and colour parameters), made one at a
    time on float32 tensors with torchvision's functional ops, as the data pipeline did before the views moved to the
    accelerator; kept for the equivalence test, the benchmark (`benchmarks/data_pipeline.py`) and users of its
    output format. About 35 ms per image at the recipe on one core against ~5 ms for `MultiViewCrops`.

    Every global view, view 0 included, and every local view gets the original's `random_color_blur`
    (`ColorAugmentation`); the main image (global crop 0) does not. So ``global_views[0]`` is the colour-augmented
    copy of the same crop as ``pixel_values``, as in the original, where the model colours its global views itself.

    Differences from the original, on purpose: each view gets its own colour parameters (the original applies one
    torchvision v2 transform to the whole flattened batch of views, which draws a single set of parameters for all
    of them); resizing is bicubic with antialiasing (the original's kornia crops do not antialias); crops are clamped
    to [0, 1] like the original. The original's dataset also computes a separate crop at scale 0.2-1 but returns
    global view 0 as the main image, so the main image here is global view 0 at `global_scale`, as there.

    Args: as `MultiViewCrops`, with the colour settings spelled out (`color_jitter_p`, `brightness`, `contrast`,
    `saturation`, `hue`, `grayscale_p`, `blur_p`, `blur_kernel_size`, `blur_sigma`; see `ColorAugmentation`), and
    `color_augment`: False skips the colour/grayscale/blur step (global views are then plain crops).

    Call: ``transform(image, generator=None, seed=None)``. Returns a dict:
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
        color = ColorAugmentation(
            color_jitter_p, brightness, contrast, saturation, hue, grayscale_p, blur_p, blur_kernel_size, blur_sigma
        )
        super().__init__(
            image_size, num_global_views, num_local_views, local_image_size, global_scale, local_scale, ratio, flip_p,
            color, interpolation,
        )  # fmt: skip
        self.color_augment = color_augment

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", color_augment={self.color_augment})"

    def color_view(self, view: torch.Tensor, parameters: torch.Tensor) -> torch.Tensor:
        """`ColorAugmentation` on one (3, s, s) float view in [0, 1], with its (COLOR_PARAMETERS,) parameters."""
        values = parameters.tolist()
        if values[COLOR_JITTER]:
            factors = values[COLOR_FACTORS]
            operations = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
            for operation in values[COLOR_ORDER]:
                operation = int(operation)
                if self.color.strengths[operation] > 0:
                    view = operations[operation](view, factors[operation])
        if values[COLOR_GRAY]:
            view = TF.rgb_to_grayscale(view, num_output_channels=3)
        view = view.clamp(0.0, 1.0)
        if values[COLOR_BLUR]:
            sigma = values[COLOR_SIGMA]
            view = TF.gaussian_blur(view, [self.color.blur_kernel_size] * 2, [sigma, sigma])
        return view

    def __call__(
        self, image: Any, generator: Optional[torch.Generator] = None, seed: Optional[int] = None
    ) -> dict[str, torch.Tensor]:
        image = _to_float_tensor(image)
        draws = self.draw(image.shape[-2], image.shape[-1], _generator_for(generator, seed))
        crops = [self.crop(image, draws, view) for view in range(self.num_views)]
        if self.color_augment:
            views = [self.color_view(crop, draws.color_parameters[k]) for k, crop in enumerate(crops)]
        else:
            views = [crop.clone() for crop in crops]
        local_shape = (0, 3, self.local_image_size, self.local_image_size)
        local = views[self.num_global_views :]
        return {
            "pixel_values": crops[0],
            "global_views": torch.stack(views[: self.num_global_views]),
            "local_views": torch.stack(local) if local else torch.zeros(local_shape),
        }


_CONSTANTS: dict = {}


def _constant(values: tuple, like: torch.Tensor, shape: tuple = (-1,)) -> torch.Tensor:
    """`values` as a tensor of `like`'s dtype and device viewed as `shape`, made once: the colour kernels run a few
    hundred times per batch on small runs of views, where making a tensor costs as much as a pass over one."""
    key = (values, shape, like.dtype, like.device)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.tensor(values, dtype=like.dtype, device=like.device).view(shape)
    return _CONSTANTS[key]


def _per_view(values: torch.Tensor) -> torch.Tensor:
    """(n,) per-view values -> (n, 1, 1, 1), to broadcast over each view's channels and pixels (kept if already so)."""
    return values if values.dim() == 4 else values.view(-1, 1, 1, 1)


def _planes(scratch: Sequence[torch.Tensor], n: int) -> Sequence[torch.Tensor]:
    """The first n views of each (>= n, 1, h, w) scratch plane."""
    return scratch if scratch[0].shape[0] == n else [plane[:n] for plane in scratch]


def _luma_into(views: torch.Tensor, plane: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(n, 3, h, w) views -> their (n, 1, h, w) luma, computed as torchvision's rgb_to_grayscale, written into the
    first n views of `plane` ((>= n, 1, h, w) scratch; None: allocated)."""
    n = views.shape[0]
    out = views.new_empty((n, 1, *views.shape[2:])) if plane is None else _planes((plane,), n)[0]
    red, green, blue = views.unsqueeze(2).unbind(1)
    torch.mul(red, _LUMA[0], out=out)
    return out.add_(green, alpha=_LUMA[1]).add_(blue, alpha=_LUMA[2])


def _blend_(
    views: torch.Tensor,
    scales: torch.Tensor,
    luma_weights: Optional[torch.Tensor],
    mean_weights: Optional[torch.Tensor],
    plane: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Brightness, contrast, saturation and grayscale in one form, per view, in place on (n, 3, h, w) views in [0, 1]:

        views = clamp(scale * views + luma_weight * luma(views) + mean_weight * mean(luma(views)), 0, 1)

    Brightness b is (b, 0, 0), contrast c is (c, 0, 1 - c), saturation s is (s, 1 - s, 0), grayscale is (0, 1, 0) and
    a view left alone is (1, 0, 0). The zero terms add exact zeros, so each view gets torchvision's values whatever
    the other views of its batch take. `scales`, `luma_weights`, `mean_weights`: (n,) or (n, 1, 1, 1) on the views'
    device; None for all zeros (the pass is skipped). `plane`: (>= n, 1, h, w) scratch (None: allocated).
    """
    if luma_weights is not None:
        luma = _luma_into(views, plane)
    if mean_weights is not None:
        # The mean of the luma image is the luma of the channel means: no luma image needed for it.
        mean_luma = views.mean((-2, -1)) @ _constant(_LUMA, views)
        offsets = mean_luma.view(-1, 1, 1, 1).mul_(_per_view(mean_weights))
    views.mul_(_per_view(scales))
    if luma_weights is not None:
        views.addcmul_(luma, _per_view(luma_weights))
    if mean_weights is not None:
        views.add_(offsets)
    return views.clamp_(0.0, 1.0)


def _toward_luma_(views: torch.Tensor, factors: torch.Tensor, plane: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Saturation with per-view `factors` ((n,) or (n, 1, 1, 1)), in place on (n, 3, h, w) views in [0, 1]:
    ``clamp(factor * views + (1 - factor) * luma(views), 0, 1)``, the `_blend_` form (s, 1 - s, 0) in one pass
    (`lerp`, float rounding apart); factor 0 is grayscale, luma exactly. `plane`: (>= n, 1, h, w) scratch."""
    luma = _luma_into(views, plane)
    return torch.lerp(luma, views, _per_view(factors), out=views).clamp_(0.0, 1.0)


# Channel c of an HSV colour is ``v - chroma * T(6 * hue + m_c)`` with m_c = 5, 3, 1 for red, green, blue and T the
# trapezoid clamp(min(k, 4 - k), 0, 1) for k mod 6, that is clamp(2 - |k - 2|, 0, 1) with k - 2 wrapped to [-3, 3);
# so channel c = min + chroma * clamp(|k - 2| - 1, 0, 1). In turns: (m_c - 2) / 6, plus 1.5 turns (the half turn
# `_rotate_hue_` takes back after `frac` to wrap, and one more so the argument of `frac` stays positive for any shift
# in [-0.5, 0.5]).
_HUE_OFFSETS = tuple((m - 2) / 6 + 1.5 for m in (5.0, 3.0, 1.0))


def _rotate_hue_(
    views: torch.Tensor, shifts: torch.Tensor, scratch: Optional[Sequence[torch.Tensor]] = None
) -> torch.Tensor:
    """Rotate the hue of (n, 3, h, w) views in [0, 1] by `shifts` ((n,) or (n, 1, 1, 1)) turns, through HSV as
    torchvision's adjust_hue, in place. `scratch`: five (>= n, 1, h, w) planes (None: allocated).

    No HSV image is built: the hue comes from the sector of the largest channel, with the sector masks as float
    weights (boolean selects are slow on CPUs), and each output channel is ``min + chroma * clamp(|k - 2| - 1, 0, 1)``
    (see `_HUE_OFFSETS`), written with `frac` and `abs`. A grey pixel (chroma 0) keeps its value whatever its hue.
    """
    n = views.shape[0]
    red, green, blue = views.unsqueeze(2).unbind(1)
    if scratch is None:
        scratch = views.new_empty((5, n, 1, *views.shape[2:])).unbind(0)
    # Five planes, each reused once its value is dead: less scratch for the cache to hold beside the chunk.
    value, chroma, hue, term, mask = _planes(scratch, n)
    torch.maximum(torch.maximum(red, green, out=value), blue, out=value)
    torch.minimum(torch.minimum(red, green, out=chroma), blue, out=chroma)
    torch.sub(value, chroma, out=chroma)
    # hue * chroma in sixths of a turn: the blue sector's (r - g + 4 chroma), replaced by the green sector's
    # (b - r + 2 chroma) where green is the largest channel, then by the red sector's (g - b) where red is (masks
    # 1.0 / 0.0), so ties go to red, then green, as torchvision's. A lerp with weight exactly 0 or 1 returns one of
    # its ends exactly.
    torch.sub(red, green, out=hue).add_(chroma, alpha=4.0)
    torch.sub(blue, red, out=term).add_(chroma, alpha=2.0)
    torch.lerp(hue, term, torch.ge(green, value, out=mask), out=hue)
    torch.lerp(hue, torch.sub(green, blue, out=term), torch.ge(red, value, out=mask), out=hue)
    # The hue in sixths of a turn is hue * chroma / chroma: one `addcdiv` with the offsets. For a grey pixel
    # hue * chroma is 0 and any finite hue will do: its chroma cancels the hue below.
    offsets = _constant(_HUE_OFFSETS, views, (1, 3, 1, 1)) + _per_view(shifts)
    torch.addcdiv(offsets, hue, torch.clamp(chroma, min=1e-12, out=term), value=1.0 / 6.0, out=views)
    # |k - 2| / 6 = |frac(...) - 1/2|; channel = min + 6 chroma clamp(|k - 2| / 6 - 1/6, 0, 1/6)
    # = (min - chroma) + 6 chroma clamp(|k - 2| / 6, 1/6, 1/3), one pass fewer over the three channels; and
    # min - chroma = max - 2 chroma.
    views.frac_().sub_(0.5).abs_().clamp_(1.0 / 6.0, 1.0 / 3.0)
    value.sub_(chroma, alpha=2.0)
    return torch.addcmul(value, views, chroma, value=6.0, out=views)


def _blur_taps(sigmas: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """(n,) sigmas -> (kernel_size // 2 + 1, n, 1, 1, 1): the weights at distance 0, 1, ... of each view's normalised
    1-D Gaussian kernel of `kernel_size` taps, as torchvision's gaussian_blur makes it."""
    radius = kernel_size // 2
    positions = torch.arange(-radius, radius + 1, dtype=sigmas.dtype, device=sigmas.device)
    kernels = torch.exp(-0.5 * (positions / sigmas.view(-1, 1)) ** 2)
    kernels = kernels / kernels.sum(1, keepdim=True)  # (n, kernel_size)
    return kernels[:, radius:].t().reshape(radius + 1, -1, 1, 1, 1)


# A tap at most this weight is left out of a blur: the Gaussian's tail beyond it weighs less than twice it, so the two
# sides of the two passes change a value in [0, 1] by less than 3e-8, a quarter of float32's spacing at 1.
_NEGLIGIBLE_TAP = 2.0**-28


def _blur_radii(sigmas: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """(n,) sigmas -> (n,) int64: how many taps on each side of each view's `_blur_taps` weigh more than
    `_NEGLIGIBLE_TAP` (at most kernel_size // 2): a sigma of 0.6 needs 3 of a 9-tap kernel's 4, one of 0.1 none."""
    return (_blur_taps(sigmas, kernel_size)[1:].flatten(1) > _NEGLIGIBLE_TAP).sum(0)


class _BlurBuffers(dict):
    """Scratch for `_gaussian_blur_` on up to `size` (channels, height, width) views with a kernel of `radius`: the
    views padded across and padded down. Indexed by a view count n, it gives what the passes over n views read and
    write (the shifted windows of each padded buffer, its borders with the insides they reflect), cut once per n: a
    cut costs as much as a pass over a small view.
    """

    def __init__(self, size: int, channels: int, height: int, width: int, radius: int, like: torch.Tensor):
        super().__init__()
        self.radius = radius
        self.across = like.new_empty((size, channels, height, width + 2 * radius))
        self.down = like.new_empty((size, channels, height + 2 * radius, width))

    def __missing__(self, n: int) -> tuple:
        radius = self.radius
        passes = []
        for padded, dim in ((self.across[:n], -1), (self.down[:n], -2)):
            size = padded.shape[dim] - 2 * radius
            windows = [padded.narrow(dim, offset, size) for offset in range(2 * radius + 1)]
            borders = [
                (padded.narrow(dim, 0, radius), padded.narrow(dim, radius + 1, radius)),
                (padded.narrow(dim, radius + size, radius), padded.narrow(dim, size - 1, radius)),
            ]
            passes.append((dim, windows, borders))
        self[n] = passes
        return self[n]


def _gaussian_blur_(views: torch.Tensor, taps: torch.Tensor, buffers: Optional[_BlurBuffers] = None) -> torch.Tensor:
    """Blur each of the (n, 3, h, w) views with its own kernel, in place: across then down, each pass a sum of the
    views shifted by each tap over a reflect-padded copy (the 2-D kernel torchvision uses is the outer product of the
    two 1-D ones). `taps`: the views' `_blur_taps`, or its first rows (the taps at larger distances left out, see
    `_blur_radii`); `buffers`: `_BlurBuffers` for >= n views and a radius >= the taps' (None: allocated).

    Shifted sums rather than a depthwise convolution: a convolution with one kernel per plane is fast only
    channels-last, and the two transposing copies to and from that layout cost more than the sums. Each shifted view
    is one `addcmul_`: adding the symmetric pairs first is as many passes and needs one more buffer in cache.
    """
    radius = taps.shape[0] - 1
    if radius == 0:
        return views.mul_(taps[0])
    if buffers is None:
        buffers = _BlurBuffers(views.shape[0], *views.shape[1:], radius, views)
    across, down = buffers[views.shape[0]]
    taps, center = taps.unbind(0), buffers.radius
    # The views into the inside of the across buffer; the across pass writes the inside of the down buffer.
    across[1][center].copy_(views)
    for (dim, windows, borders), result in ((across, down[1][center]), (down, views)):
        for border, inside in borders:
            border.copy_(inside.flip(dim))
        torch.mul(windows[center], taps[0], out=result)
        for distance in range(1, radius + 1):
            result.addcmul_(windows[center - distance], taps[distance])
            result.addcmul_(windows[center + distance], taps[distance])
    return views


def _groups(values: Sequence, offset: int = 0) -> list[tuple[Any, int, int]]:
    """(value, start, stop) of each run of equal `values`, positions shifted by `offset`."""
    groups, start = [], offset
    for value, members in itertools.groupby(values):
        stop = start + sum(1 for _ in members)
        groups.append((value, start, stop))
        start = stop
    return groups


def _runs(flags: Sequence[bool], offset: int = 0) -> list[tuple[int, int]]:
    """[start, stop) of each run of True in `flags`, shifted by `offset`."""
    return [(start, stop) for flag, start, stop in _groups(flags, offset) if flag]


# Views per chunk of the batched colour augmentation, in pixels: on a CPU, three 224-px views (2 to 4 measure within
# 5 %, 8 is 10 % slower and a whole batch 2x), so a chunk and its scratch stay in cache; on an accelerator, large
# chunks to keep the kernel count low.
_CHUNK_PIXELS = {"cpu": 3 * 224 * 224}
_ACCELERATOR_CHUNK_PIXELS = 256 * 224 * 224


def _read_parameters(host: torch.Tensor, color: ColorAugmentation) -> tuple[torch.Tensor, ...]:
    """What each view takes, from its (n, COLOR_PARAMETERS) float64 host parameters, for both batched paths.

    Returns: operations (n, 4) int64, the jitter operation at each position (0 brightness, 1 contrast, 2 saturation,
    3 hue; -1 none: jitter not drawn, or an operation of strength 0); factors (n, 4) float64, that operation's factor
    (the hue's shift); gray (n,) bool; blur_radius (n,) int64, the taps per side the view's blur needs (`_blur_radii`
    of its float32 sigma, as the device computes the taps), -1 when not blurred.
    """
    active = torch.tensor([strength > 0 for strength in color.strengths])
    order = host[:, COLOR_ORDER].long()
    jitter = host[:, COLOR_JITTER] > 0.5
    operations = torch.where(jitter[:, None] & active[order], order, -1)
    factors = host[:, COLOR_FACTORS].gather(1, operations.clamp(min=0))
    gray = host[:, COLOR_GRAY] > 0.5
    blurred = host[:, COLOR_BLUR] > 0.5
    blur_radius = torch.where(blurred, _blur_radii(host[:, COLOR_SIGMA].float(), color.blur_kernel_size), -1)
    return operations, factors, gray, blur_radius


@dataclass
class _ColorPlan:
    """The host's reading of a group's `view_parameters`: which view takes what, in an order that batches well.

    Views are sorted by (blurred and the taps their blur needs, most first; position of the hue rotation; then the
    operation at each jitter position), so the views rotating their hue at one jitter position sit together,
    neighbours often take the same blend at a position (`steps`), and the blurred views are the tail, those whose
    kernel is narrow (`_blur_radii`) last. Per-view weights (`_blend_`'s form) are in `weights`, rows in that order.
    """

    order: torch.Tensor  # (n,) view indices, sorted
    order_list: list  # the same, on the host
    operations: list  # per sorted view, its 4 jitter operations (-1: none)
    hue_position: list  # per sorted view, the position of its hue rotation (4: none)
    gray: list
    unclamped: list  # per sorted view: its last step is not a `_blend_` (which clamps), so it needs the clamp
    blur_radius: list  # per sorted view: the taps per side its blur needs (`_blur_radii`); -1: not blurred
    weights: torch.Tensor  # (n, 16) float32: scales (4), luma weights (4), mean weights (4), shift, keep, gray, sigma

    @classmethod
    def of(cls, parameters: torch.Tensor, color: ColorAugmentation) -> "_ColorPlan":
        host = parameters.detach().to("cpu", torch.float64)
        operations, factors, gray, blur_radius = _read_parameters(host, color)
        blurred = blur_radius >= 0
        is_hue = operations == 3
        hue_position = torch.where(is_hue.any(1), is_hue.long().argmax(1), 4)
        # A hue rotation can end a view 1 ulp outside [0, 1], and the input itself is not checked.
        applied = operations >= 0
        last = torch.where(applied.any(1), 3 - applied.flip(1).long().argmax(1), -1)
        last_is_hue = operations.gather(1, last.clamp(min=0)[:, None])[:, 0] == 3
        unclamped = ~gray & ((last < 0) | last_is_hue)
        weights = torch.cat(
            [
                torch.where((operations >= 0) & (operations < 3), factors, 1.0),
                torch.where(operations == 2, 1.0 - factors, 0.0),
                torch.where(operations == 1, 1.0 - factors, 0.0),
                host[:, COLOR_FACTORS][:, 3:4],
                (~gray).double()[:, None],
                gray.double()[:, None],
                host[:, COLOR_SIGMA : COLOR_SIGMA + 1],
            ],
            dim=1,
        )
        # Then by the operation at each position, so that neighbours often take the same blend there.
        blur_rank = torch.where(blurred, color.blur_kernel_size // 2 + 1 - blur_radius, 0)
        key = (blur_rank * 5 + hue_position) * 625
        for position in range(4):
            key += (operations[:, position] + 1) * 5 ** (3 - position)
        sorted_order = torch.argsort(key, stable=True)
        return cls(
            order=sorted_order,
            order_list=sorted_order.tolist(),
            operations=operations[sorted_order].tolist(),
            hue_position=hue_position[sorted_order].tolist(),
            gray=gray[sorted_order].tolist(),
            unclamped=unclamped[sorted_order].tolist(),
            blur_radius=blur_radius[sorted_order].tolist(),
            weights=weights[sorted_order].float(),
        )

    def steps(self, start: int, stop: int) -> list[tuple[str, int, int, Any]]:
        """The calls that colour the sorted views [start, stop), in order, as (step, first, last, argument) over runs
        [first, last) of views: ("blend", ..., (position, operation)) for each jitter position and each of brightness,
        contrast and saturation, so that no view pays for a term it does not use; ("hue", ..., position); then
        "gray" and "clamp" (argument None), and ("blur", ..., radius) for each run of blurred views needing as many
        taps."""
        steps = []
        rows = slice(start, stop)
        for position in range(4):
            taken = [operations[position] for operations in self.operations[rows]]
            for operation, first, last in _groups(taken, start):
                if operation == 3:
                    steps.append(("hue", first, last, position))
                elif operation >= 0:
                    steps.append(("blend", first, last, (position, operation)))
        for step, flags in (("gray", self.gray), ("clamp", self.unclamped)):
            steps += [(step, first, last, None) for first, last in _runs(flags[rows], start)]
        blur_runs = _groups(self.blur_radius[rows], start)
        return steps + [("blur", first, last, radius) for radius, first, last in blur_runs if radius >= 0]

    @property
    def blurred(self) -> list:
        """Per sorted view: whether it is blurred."""
        return [radius >= 0 for radius in self.blur_radius]


class _ScratchPlanes(dict):
    """k -> the first k views of each scratch plane, sliced once per k (a slice costs as much as a small pass)."""

    def __init__(self, planes: Sequence[torch.Tensor]):
        super().__init__()
        self.planes = planes

    def __missing__(self, count: int) -> Sequence[torch.Tensor]:
        self[count] = _planes(self.planes, count)
        return self[count]


def _color_all_positions(views: torch.Tensor, weights: torch.Tensor, hue_at: torch.Tensor) -> torch.Tensor:
    """The jitter and grayscale of `ViewAugmentation` in a fixed sequence, for `torch.compile`: returns new views.

    Every view goes through `_blend_` and `_rotate_hue_` at each of the four positions and keeps the rotation where
    `hue_at` says so, so the graph has no data-dependent branch and compiles once for any batch, and inductor may fuse
    each position into a reduction (the contrast means) and one elementwise kernel where the eager chunks take some
    forty passes per view.

    Args:
        views: (n, 3, h, w) float in [0, 1].
        weights: (n, 16), `_ColorPlan.weights`' columns, rows in `views`' order.
        hue_at: (n, 4) bool, whether the view rotates its hue at that position.
    """
    scales, luma_weights, mean_weights = weights[:, 0:4], weights[:, 4:8], weights[:, 8:12]
    shifts, keep, gray = weights[:, 12], weights[:, 13], weights[:, 14]
    for position in range(4):
        views = _blend_(views.clone(), scales[:, position], luma_weights[:, position], mean_weights[:, position])
        rotated = _rotate_hue_(views.clone(), shifts)
        views = torch.where(hue_at[:, position].view(-1, 1, 1, 1), rotated, views)
    return _blend_(views, keep, gray, None)



class ViewAugmentation:
    """The device part of the pretraining views: one batched colour augmentation of every view, then normalisation.

    Takes a batch of `MultiViewCrops` items (after `collate_views`, on the accelerator) and applies each view's
    `ColorAugmentation` with its own parameters, without a Python loop over views.

    On a CPU (float32 views) the views go through fused C kernels (`stellar_hf/view_kernels.c`, built on first use by
    `stellar_hf.native`): per view, the jitter, grayscale and clamp in one pass over tiles that stay in L1 (one more
    before each contrast, for its mean) and the blur in two, following torchvision's operations step by step; the
    views are split over `torch.get_num_threads()` threads. Where the kernels cannot be built (no C compiler) a
    warning says why and the eager path below takes over: the same values to float rounding, some 2x slower.

    The eager path (accelerators, and CPUs without the kernels): the host reads the parameters once
    (`_ColorPlan`) and sorts the views so that those rotating their hue at the same jitter position, and those blurred,
    sit together; then, chunk by chunk of that order (`_ColorPlan.steps`): at each of the four jitter positions one
    call per run of views taking the same operation there (brightness or contrast through `_blend_`, saturation
    through `_toward_luma_`, hue through `_rotate_hue_`); grayscale through `_toward_luma_`; the clamp where the last
    step was not a blend; one blur per run of blurred views needing as many taps (`_blur_radii`), each view with its
    own kernel. Views of the same size form one group (global and local views are two). Then uint8 -> float and
    normalisation with `image_mean` / `image_std`, in place.

    Chunks: on a CPU a few views at a time (the chunk and its scratch stay in cache), on an accelerator up to
    `_ACCELERATOR_CHUNK_PIXELS`. A view's result does not depend on its chunk or batch (tested).

    Args:
        color: the settings the parameters were drawn with (only the blur kernel size and which strengths are zero
            are read here); None skips colour augmentation (views are the normalised crops).
        image_mean, image_std: the model's normalisation (`config.image_mean`, `config.image_std`).
        compile: run the jitter as one fixed `torch.compile` graph per group (`_color_all_positions`) instead of the
            eager chunks; the first batch takes the compile time (~20-60 s). Not yet measured on an accelerator; on
            a CPU inductor's code for it is slower than the eager chunks (docs/benchmarks.md). With compile set, CPU
            views take the compiled graph too (compile with native=True is refused as contradictory).
        native: None (default): the CPU kernels for CPU views where they build, else the eager path with a warning;
            True: the kernels or an error saying why not (`stellar_hf.native.NativeKernelsUnavailable`, or ValueError
            for views they do not take); False: always the eager path.

    Call: ``augment(batch)`` with ``global_crops`` (B, M, 3, S, S) uint8, ``local_crops`` (B, K, 3, s, s) uint8 and
    ``view_parameters`` (B, M + K, COLOR_PARAMETERS), all on one device. Returns the model's inputs on that device,
    float32 and normalised: ``pixel_values`` (B, 3, S, S) (global crop 0, not coloured), ``global_views``
    (B, M, 3, S, S) and ``local_views`` (B, K, 3, s, s).
    """

    def __init__(
        self,
        color: Optional[ColorAugmentation] = ColorAugmentation(),
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        compile: bool = False,
        native: Optional[bool] = None,
    ):
        self.color = color
        self.image_mean = tuple(image_mean)
        self.image_std = tuple(image_std)
        if compile and native:
            raise ValueError("compile=True and native=True ask for two different kernels; set one of them")
        self.compile = compile
        self.native = native
        self._buffers: dict = {}
        self._pool: Optional[tuple[int, int, ThreadPoolExecutor]] = None  # (pid, threads, pool)
        # Compiled, the jitter runs as one fixed graph over whole groups (`_color_all_positions`); eager, in chunks.
        self._compiled = torch.compile(_color_all_positions, dynamic=True) if compile else None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(color={self.color}, image_mean={self.image_mean}, image_std={self.image_std}, "
            f"compile={self.compile}, native={self.native})"
        )

    def color_views(
        self, views: torch.Tensor, parameters: torch.Tensor, out: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Colour (n, 3, h, w) float views in [0, 1] with their (n, COLOR_PARAMETERS) parameters.

        Returns `out` (a contiguous tensor of the views' shape and dtype; default: a new one), which may be `views`
        itself (`color_views_`). With `compile`, a failure to compile (a backend missing on this machine) is logged
        once and the eager kernels take over: the same values, more slowly.
        """
        if out is None:
            out = torch.empty_like(views, memory_format=torch.contiguous_format)
        if out.shape != views.shape or out.dtype != views.dtype or out.device != views.device:
            raise ValueError(f"out must match the views ({tuple(views.shape)}, {views.dtype}, {views.device}), got "
                             f"{tuple(out.shape)}, {out.dtype}, {out.device}")  # fmt: skip
        if not out.is_contiguous():
            raise ValueError("the views are coloured into a contiguous tensor; out (or views, in place) is not")
        if views.dim() != 4 or views.shape[1] != 3:
            raise ValueError(f"views must be (n, 3, height, width) RGB, got shape {tuple(views.shape)}")
        if tuple(parameters.shape) != (views.shape[0], COLOR_PARAMETERS):
            raise ValueError(f"parameters must be (n, {COLOR_PARAMETERS}) for n = {views.shape[0]} views, got shape "
                             f"{tuple(parameters.shape)}")  # fmt: skip
        if self.color is None or views.shape[0] == 0:
            return out if out is views else out.copy_(views)
        library = self._native_kernels(views)
        if library is not None:
            return self._color_native(library, views, parameters, out)
        plan = _ColorPlan.of(parameters, self.color)
        if self._compiled is None:
            return self._color_chunks(views, plan, out)
        try:
            return self._color_compiled(views, plan, out)
        except Exception as error:  # torch.compile raises backend-specific types at the first call
            logger.warning("compiling the view augmentation failed (%s: %s); running it eagerly", type(error).__name__, error)
            self._compiled = None
            return self._color_chunks(views, plan, out)

    def color_views_(self, views: torch.Tensor, parameters: torch.Tensor) -> torch.Tensor:
        """`color_views` in place on `views` (contiguous), which it returns."""
        return self.color_views(views, parameters, out=views)

    def _native_kernels(self, views: torch.Tensor) -> Optional[Any]:
        """The CPU kernels when these views take them (`native` and the views: float32 on a CPU, each side longer
        than the blur's radius, as reflect padding needs), else None; `native=True` raises where they do not."""
        if self.native is False or (self.native is None and self.compile):
            return None
        fits = views.device.type == "cpu" and views.dtype == torch.float32
        fits = fits and min(views.shape[-2:]) > self.color.blur_kernel_size // 2
        if not fits:
            if self.native:
                raise ValueError(f"native=True colours float32 views on a CPU, each side longer than "
                                 f"{self.color.blur_kernel_size // 2} pixels; got {views.dtype} "
                                 f"{tuple(views.shape)} on {views.device}")  # fmt: skip
            return None
        return require_view_kernels() if self.native else view_kernels()

    def _color_native(
        self, library: Any, views: torch.Tensor, parameters: torch.Tensor, out: torch.Tensor
    ) -> torch.Tensor:
        """Colour with the fused CPU kernels (`stellar_hf/view_kernels.c`), views in their own order, split over
        `torch.get_num_threads()` threads (the kernels release the GIL; a view's values do not depend on the split)."""
        n, _, height, width = views.shape
        views = views.contiguous()
        host = parameters.detach().to("cpu", torch.float64)
        operations, factors, gray, blur_radius = _read_parameters(host, self.color)
        # The C side reads them as dense int32 and float32 arrays.
        integers = (operations, gray, blur_radius)
        operations, gray, blur_radius = [values.to(torch.int32).contiguous() for values in integers]
        factors = factors.float().contiguous()
        # (n, kernel_size // 2 + 1): each view's weights at distance 0, 1, ... (rows of views not blurred unread).
        taps = _blur_taps(host[:, COLOR_SIGMA].float(), self.color.blur_kernel_size).flatten(1).t().contiguous()

        def color_range(first: int, last: int) -> None:
            scratch = torch.empty(height * width, dtype=torch.float32)
            library.stellar_color_views(
                views[first].data_ptr(), out[first].data_ptr(), last - first, height, width,
                operations[first].data_ptr(), factors[first].data_ptr(), gray[first:].data_ptr(),
                blur_radius[first:].data_ptr(), taps[first].data_ptr(), taps.shape[1], scratch.data_ptr(),
            )  # fmt: skip

        threads = min(torch.get_num_threads(), n)
        if threads <= 1:
            color_range(0, n)
            return out
        bounds = [n * part // threads for part in range(threads + 1)]
        for future in [self._thread_pool(threads).submit(color_range, first, last)
                       for first, last in zip(bounds[:-1], bounds[1:]) if last > first]:  # fmt: skip
            future.result()
        return out

    def _thread_pool(self, threads: int) -> ThreadPoolExecutor:
        """A pool of `threads` threads, made again after a fork (a forked child has none of its parent's threads)."""
        if self._pool is None or self._pool[:2] != (os.getpid(), threads):
            if self._pool is not None and self._pool[0] == os.getpid():
                self._pool[2].shutdown(wait=False)  # a new thread count: the old pool's threads are let go
            self._pool = (os.getpid(), threads, ThreadPoolExecutor(threads, thread_name_prefix="stellar-views"))
        return self._pool[2]

    def __getstate__(self) -> dict:
        # Threads and scratch memory are this process's; a copy (or another process) makes its own.
        return {**self.__dict__, "_pool": None, "_buffers": {}}

    def _color_compiled(self, views: torch.Tensor, plan: _ColorPlan, out: torch.Tensor) -> torch.Tensor:
        device = views.device
        order = plan.order.to(device, non_blocking=True)
        weights = plan.weights.to(device, non_blocking=True)
        hue_at = torch.tensor([[hue == position for position in range(4)] for hue in plan.hue_position], device=device)
        colored = self._compiled(views.index_select(0, order), weights, hue_at).clamp_(0.0, 1.0)
        if any(plan.blurred):
            taps = _blur_taps(weights[:, 15], self.color.blur_kernel_size)
        for first, last in _runs(plan.blurred):
            _gaussian_blur_(colored[first:last], taps[:, first:last])
        return out.index_copy_(0, order, colored)

    def _color_chunks(self, views: torch.Tensor, plan: _ColorPlan, out: torch.Tensor) -> torch.Tensor:
        """Each chunk of the sorted views is gathered from `views`, coloured by `plan.steps`, and written to `out`."""
        n, channels, height, width = views.shape
        device = views.device
        order = plan.order.to(device, non_blocking=True)
        # One (n, 1, 1, 1) column per weight, so that a run's weights are one slice.
        columns = plan.weights.t().contiguous().to(device, non_blocking=True).view(16, n, 1, 1, 1).unbind(0)
        scales, mean_weights = columns[0:4], columns[8:12]
        shifts, keep, sigmas = columns[12], columns[13], columns[15]
        if any(plan.blurred):
            taps = _blur_taps(sigmas.view(-1), self.color.blur_kernel_size)
        size = max(1, _CHUNK_PIXELS.get(device.type, _ACCELERATOR_CHUNK_PIXELS) // (height * width))
        chunk_buffer, planes, blur_buffers = self._workspace(min(size, n), views, self.color.blur_kernel_size)
        # index_copy_ is serial on a CPU, ~3x slower there than one copy per view.
        per_view = device.type == "cpu"
        targets, rows = (out.unbind(0), chunk_buffer.unbind(0)) if per_view else (None, None)
        for start in range(0, n, size):
            stop = min(start + size, n)
            chunk = torch.index_select(views, 0, order[start:stop], out=chunk_buffer[: stop - start])
            for step, first, last, argument in plan.steps(start, stop):
                run, span = chunk[first - start : last - start], slice(first, last)
                if step == "blend" and argument[1] == 2:
                    _toward_luma_(run, scales[argument[0]][span], planes[last - first][0])
                elif step == "blend":
                    position, operation = argument
                    mean = mean_weights[position][span] if operation == 1 else None
                    _blend_(run, scales[position][span], None, mean, planes[last - first][0])
                elif step == "hue":
                    _rotate_hue_(run, shifts[span], planes[last - first])
                elif step == "gray":
                    _toward_luma_(run, keep[span], planes[last - first][0])
                elif step == "clamp":
                    run.clamp_(0.0, 1.0)
                else:
                    _gaussian_blur_(run, taps[: argument + 1, span], blur_buffers)
            if per_view:
                for row, view in zip(rows, plan.order_list[start:stop]):
                    targets[view].copy_(row)
            else:
                out.index_copy_(0, order[start:stop], chunk)
        return out

    def _workspace(self, size: int, views: torch.Tensor, kernel_size: int) -> tuple:
        """A chunk buffer (size, 3, h, w); the five (k, 1, h, w) scratch planes of k views, by k <= size (slices of
        one allocation, made on first use); `_BlurBuffers` for `views`' shape.

        On a CPU they are kept for the next batch: glibc hands large blocks back to the system on free, and faulting
        fresh pages in costs as much as the work on them. Accelerators have caching allocators.
        """
        _, channels, height, width = views.shape
        key = (views.device, views.dtype, size, channels, height, width, kernel_size)
        if key in self._buffers:
            return self._buffers[key]
        scratch = torch.empty((5, size, 1, height, width), dtype=views.dtype, device=views.device).unbind(0)
        buffers = (
            torch.empty((size, channels, height, width), dtype=views.dtype, device=views.device),
            _ScratchPlanes(scratch),
            _BlurBuffers(size, channels, height, width, kernel_size // 2, views),
        )
        if views.device.type == "cpu":
            self._buffers[key] = buffers
        return buffers

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        global_crops, local_crops = batch["global_crops"], batch["local_crops"]
        parameters = batch["view_parameters"]
        num_global = global_crops.shape[1]
        inputs = {"pixel_values": normalize_images(global_crops[:, 0], self.image_mean, self.image_std)}
        for key, crops, view_parameters in (
            ("global_views", global_crops, parameters[:, :num_global]),
            ("local_views", local_crops, parameters[:, num_global:]),
        ):
            views = self.color_views_(crops.flatten(0, 1).float().div_(255.0), view_parameters.flatten(0, 1))
            inputs[key] = normalize_images(views, self.image_mean, self.image_std, inplace=True).view(crops.shape)
        return inputs


class EvalTransform:
    """Deprecated: the image processor does this (`StellarImageProcessor`, with ``do_normalize=False`` for [0, 1]
    pixels); `stellar_hf.evaluation.probe_processor(config)` is the probes' one.

    Resize the shorter side to `resize_size` (bicubic, default ``int(image_size * 256 / 224)``), centre crop
    `image_size`, pixels on the [0, 1] scale, not normalised: a `StellarImageProcessor` with those settings.

    Call: ``transform(image)`` with a PIL image or a (3, H, W) tensor. Returns a (3, S, S) float32 tensor.
    """

    def __init__(self, image_size: int = 224, resize_size: Optional[int] = None, interpolation: Any = "bicubic"):
        import warnings

        warnings.warn(
            "stellar_hf.data.EvalTransform is deprecated: use StellarImageProcessor(size={'shortest_edge': R}, "
            "crop_size={'height': S, 'width': S}) (do_normalize=False for [0, 1] pixels), or "
            "stellar_hf.evaluation.probe_processor(config)",
            FutureWarning,
            stacklevel=2,
        )
        from .image_processing_stellar import StellarImageProcessor

        self.image_size = int(image_size)
        self.resize_size = evaluation_resize(image_size) if resize_size is None else int(resize_size)
        if self.resize_size < self.image_size:
            raise ValueError(f"resize_size ({self.resize_size}) must be >= image_size ({self.image_size})")
        if _interpolation(interpolation) != InterpolationMode.BICUBIC:
            raise ValueError(f"EvalTransform resizes bicubic only (as the image processor), got {interpolation!r}")
        self.processor = StellarImageProcessor(
            size={"shortest_edge": self.resize_size},
            crop_size={"height": self.image_size, "width": self.image_size},
            do_normalize=False,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_size={self.image_size}, resize_size={self.resize_size})"

    def __call__(self, image: Any) -> torch.Tensor:
        return self.processor(_to_uint8_tensor(image), return_tensors="pt")["pixel_values"][0]


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


class _SharedEpoch:
    """An epoch number in shared memory: DataLoader workers (persistent ones included, forked or spawned) read the
    value the main process set last, so `set_epoch` reaches them without restarting them."""

    def __init__(self):
        self._value = torch.zeros((), dtype=torch.long).share_memory_()

    def get(self) -> int:
        return int(self._value)

    def set(self, epoch: int) -> None:
        self._value.fill_(int(epoch))


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

    `set_epoch` changes the views; call it before each epoch's `iter(loader)`. The epoch lives in
    shared memory, so persistent DataLoader workers (``persistent_workers=True``) see it too.
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
        self._epoch = _SharedEpoch()
        self.skipped_indices: set[int] = set()
        self._skipped_names: dict[int, str] = {}
        self._takes_generator = _transform_takes_generator(transform)

    def __len__(self) -> int:
        return len(self.source)

    @property
    def num_skipped(self) -> int:
        """How many distinct unreadable images this process has met so far."""
        return len(self.skipped_indices)

    @property
    def epoch(self) -> int:
        return self._epoch.get()

    def set_epoch(self, epoch: int) -> None:
        """Draw fresh views for a new epoch (call on every rank, before iterating; workers see it at once)."""
        self._epoch.set(epoch)

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
        self._epoch = _SharedEpoch()
        self.num_skipped = 0
        self._takes_generator = _transform_takes_generator(transform)

    @property
    def epoch(self) -> int:
        return self._epoch.get()

    def set_epoch(self, epoch: int) -> None:
        """New views (and, for `datasets`, a new shuffle order) for a new epoch."""
        self._epoch.set(epoch)
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


_STACKED_KEYS = ("pixel_values", "global_views", "local_views", "global_crops", "local_crops", "view_parameters")
# What each kind of item must hold: `MultiViewTransform`-style views, or `MultiViewCrops`' uint8 crops.
_REQUIRED_KEYS = (("pixel_values",), ("global_crops", "local_crops", "view_parameters"))


def collate_views(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack per-image view dicts into a batch.

    Args:
        batch: items of `PretrainingDataset`: `MultiViewCrops` items (uint8 crops + colour parameters, for
            `ViewAugmentation`), `MultiViewTransform` items, or any dicts with ``pixel_values``.
    Returns:
        Each item key stacked: ``global_crops`` (B, M, 3, S, S) uint8, ``local_crops`` (B, K, 3, s, s) uint8 and
        ``view_parameters`` (B, M + K, COLOR_PARAMETERS); or ``pixel_values`` (B, 3, S, S), ``global_views``
        (B, M, 3, S, S) and ``local_views`` (B, K, 3, s, s). Also ``labels`` (B,) int64 when every item has one, and
        ``skipped_images`` when some items stand in for unreadable images: one list of names per such item.
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    if not any(all(key in batch[0] for key in keys) for keys in _REQUIRED_KEYS):
        raise KeyError(
            f"items need 'pixel_values' (or 'global_crops', 'local_crops' and 'view_parameters'), got keys "
            f"{sorted(batch[0])}"
        )
    output = {key: torch.stack([item[key] for item in batch]) for key in _STACKED_KEYS if key in batch[0]}
    if all(item.get("labels") is not None for item in batch):
        output["labels"] = torch.tensor([int(item["labels"]) for item in batch], dtype=torch.long)
    substitutions = [list(item["skipped_images"]) for item in batch if item.get("skipped_images")]
    if substitutions:
        output["skipped_images"] = substitutions
    return output
