"""
The logic of the STELLAR explorer (`examples/explorer.py`): factorize an image once, then edit and decode its factors.

An image goes through the encoder once ([`StellarExplorer.factorize`]): its sparse tokens S `(r, d)` ("what"), its
spatial map A `(N, r)` ("where", row n the distribution of patch n over the tokens) and its patch grid `(h, w)` are
kept as a [`Factors`]. Every edit is a pure function on those tensors, and only the decoder runs again
([`StellarExplorer.decode`], the model's own `reconstruct`, which forms F = A·S and decodes it). Nothing here imports
gradio, so the functions are tested like the rest of the package and usable from a notebook.

The edits (one image's factors; a token index is a column of A and a row of S):

- [`reassign_token`] `(A, i, j)`: token j takes over token i's area: `A'[:, j] = A[:, j] + A[:, i]`, `A'[:, i] = 0`.
  Rows still sum to one.
- [`drop_token`] `(A, i)`: token i is removed from every patch, and each row is renormalised over the other tokens:
  `A'[n, k] = A[n, k] / (1 - A[n, i])` for k != i, `A'[:, i] = 0`. Since A is a softmax over the tokens, this is
  exactly the map the factorization gives when token i is left out of the softmax. A row whose whole mass was on
  token i (`1 - A[n, i]` below 1e-12) has nothing to renormalise and becomes uniform over the other tokens. S is
  unchanged (token i's vector is kept, with no area).
- [`swap_token`] `(S, i, S2, j)`: token i's vector becomes token j of a second image's tokens S2; A is unchanged, so
  the second image's "what" is painted into this image's "where" of token i.
- [`restrict_token`] `(A, i, region)`: token i keeps its mass inside `region` (a boolean `(h, w)` patch mask) and is
  dropped, as in [`drop_token`], from every patch outside it. [`region_from_drawing`] turns a mask drawn over the
  image into that patch mask.

Decoding unedited factors gives exactly the model's own reconstruction of the image.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .image_processing_stellar import to_rgb_image, unnormalize_images
from .visualization import (
    _arrange,
    _caption_height,
    _font,
    _labelled,
    spatial_map_tiles,
    to_pil_image,
)

__all__ = [
    "EDIT_KINDS",
    "Edit",
    "Factors",
    "StellarExplorer",
    "apply_edit",
    "drop_token",
    "edit_figure",
    "load_explorer",
    "load_factors",
    "reassign_token",
    "region_from_drawing",
    "restrict_token",
    "sample_images",
    "save_factors",
    "swap_token",
    "write_space",
]

EDIT_KINDS = ("reassign", "drop", "swap", "restrict")
# Below this, a row's mass outside the dropped token is treated as zero (the row becomes uniform over the others).
_EMPTY_ROW = 1e-12


# ----------------------------------------------------------------------------------------------------------------------
# Factors and their edits (pure functions)
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class Factors:
    """
    One image's factorization, on the CPU in float32.

    Attributes:
        sparse_tokens: `(r, d)`, the "what".
        spatial_map: `(N, r)`, the "where": row n is patch n's distribution over the r tokens (row-major patches).
        grid_size: the patch grid `(h, w)`, `h * w == N`.
        image: the processed image `(3, H, W)` on the [0, 1] scale (what the encoder saw), or None.
        edits: the edits applied so far, in order (empty for the encoder's own factors).
    """

    sparse_tokens: torch.Tensor
    spatial_map: torch.Tensor
    grid_size: tuple[int, int]
    image: torch.Tensor | None = None
    edits: list[Edit] = field(default_factory=list)

    def __post_init__(self):
        if self.sparse_tokens.ndim != 2 or self.spatial_map.ndim != 2:
            raise ValueError(
                f"Factors holds one image: sparse_tokens (r, d) and spatial_map (N, r), got shapes "
                f"{tuple(self.sparse_tokens.shape)} and {tuple(self.spatial_map.shape)}"
            )
        if self.spatial_map.shape[1] != self.sparse_tokens.shape[0]:
            raise ValueError(
                f"spatial_map has {self.spatial_map.shape[1]} columns but there are {self.sparse_tokens.shape[0]} tokens"
            )
        self.grid_size = (int(self.grid_size[0]), int(self.grid_size[1]))
        if self.grid_size[0] * self.grid_size[1] != self.spatial_map.shape[0]:
            raise ValueError(
                f"grid_size {self.grid_size} does not hold the map's {self.spatial_map.shape[0]} patches"
            )

    @property
    def num_tokens(self) -> int:
        return self.sparse_tokens.shape[0]

    def hard_assignment(self) -> torch.Tensor:
        """`(h, w)` long: each patch's argmax token."""
        return self.spatial_map.argmax(dim=1).view(self.grid_size)

    def replace(
        self, sparse_tokens=None, spatial_map=None, edit: Edit | None = None
    ) -> Factors:
        """A new `Factors` with the given tensors swapped in and `edit` appended to the history."""
        return Factors(
            sparse_tokens=self.sparse_tokens
            if sparse_tokens is None
            else sparse_tokens,
            spatial_map=self.spatial_map if spatial_map is None else spatial_map,
            grid_size=self.grid_size,
            image=self.image,
            edits=[*self.edits, *([edit] if edit is not None else [])],
        )


@dataclass(frozen=True)
class Edit:
    """
    One edit, as data: `kind` in `EDIT_KINDS`, the `token` it acts on and, per kind, `target` (reassign: the token
    that takes the area; swap: the token of the second image) or `region` (restrict: a boolean `(h, w)` patch mask).
    """

    kind: str
    token: int
    target: int | None = None
    region: tuple[tuple[bool, ...], ...] | None = None

    def describe(self) -> str:
        if self.kind == "reassign":
            return f"token {self.token}'s area -> token {self.target}"
        if self.kind == "drop":
            return f"drop token {self.token}"
        if self.kind == "swap":
            return f"token {self.token} <- token {self.target} of the second image"
        inside = sum(map(sum, self.region)) if self.region is not None else 0
        return f"restrict token {self.token} to {inside} drawn patches"

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "token": self.token,
            "target": self.target,
            "region": self.region,
        }


def _check_token(token: int, num_tokens: int, name: str = "token") -> int:
    token = int(token)
    if not 0 <= token < num_tokens:
        raise ValueError(
            f"{name} {token} is out of range: the factors have {num_tokens} tokens (0..{num_tokens - 1})"
        )
    return token


def _check_map(spatial_map: torch.Tensor) -> None:
    if spatial_map.ndim != 2:
        raise ValueError(
            f"spatial_map must be (N, r) for one image, got shape {tuple(spatial_map.shape)}"
        )


def reassign_token(spatial_map: torch.Tensor, token: int, target: int) -> torch.Tensor:
    """
    `(N, r) -> (N, r)`: token `target` takes over token `token`'s area (`A[:, target] += A[:, token]`, then
    `A[:, token] = 0`). Rows keep their sums. A token reassigned to itself leaves the map as it is.
    """
    _check_map(spatial_map)
    token = _check_token(token, spatial_map.shape[1])
    target = _check_token(target, spatial_map.shape[1], "target token")
    edited = spatial_map.clone()
    if token != target:
        edited[:, target] += edited[:, token]
        edited[:, token] = 0
    return edited


def _drop_rows(
    spatial_map: torch.Tensor, token: int, rows: torch.Tensor
) -> torch.Tensor:
    """Drop `token` from the patches where `rows` `(N,)` is True, renormalising those rows over the other tokens."""
    edited = spatial_map.clone()
    num_tokens = spatial_map.shape[1]
    others = torch.ones(num_tokens, dtype=torch.bool, device=spatial_map.device)
    others[token] = False
    remaining = (1.0 - spatial_map[:, token].double()).clamp_min(
        0.0
    )  # in float64: 1 - A is exact enough here
    kept = spatial_map.double() / remaining.clamp_min(_EMPTY_ROW)[:, None]
    uniform = torch.full_like(kept, 1.0 / max(num_tokens - 1, 1))
    renormalised = (
        torch.where((remaining > _EMPTY_ROW)[:, None], kept, uniform) * others
    )
    edited[rows] = renormalised[rows].to(spatial_map.dtype)
    return edited


def drop_token(spatial_map: torch.Tensor, token: int) -> torch.Tensor:
    """
    `(N, r) -> (N, r)`: token `token` leaves every patch; each row is renormalised over the other tokens
    (`A[n, k] / (1 - A[n, token])`), which is the softmax without that token. Rows entirely on the token become uniform
    over the others. Needs at least two tokens.
    """
    _check_map(spatial_map)
    token = _check_token(token, spatial_map.shape[1])
    if spatial_map.shape[1] < 2:
        raise ValueError(
            "cannot drop the only token: every patch needs a token to describe it"
        )
    return _drop_rows(
        spatial_map, token, torch.ones(spatial_map.shape[0], dtype=torch.bool)
    )


def restrict_token(spatial_map: torch.Tensor, token: int, region) -> torch.Tensor:
    """
    `(N, r) -> (N, r)`: token `token` keeps its mass where `region` (boolean, `(h, w)` or `(N,)`, row-major patches) is
    True and is dropped, as in [`drop_token`], everywhere else. Patches inside the region are unchanged.
    """
    _check_map(spatial_map)
    token = _check_token(token, spatial_map.shape[1])
    region = torch.as_tensor(np.asarray(region, dtype=bool)).reshape(-1)
    if region.numel() != spatial_map.shape[0]:
        raise ValueError(
            f"the region covers {region.numel()} patches, the map has {spatial_map.shape[0]}"
        )
    if spatial_map.shape[1] < 2:
        raise ValueError(
            "cannot restrict the only token: the patches outside the region need another token"
        )
    return _drop_rows(spatial_map, token, ~region)


def swap_token(
    sparse_tokens: torch.Tensor,
    token: int,
    other_tokens: torch.Tensor,
    other_token: int,
) -> torch.Tensor:
    """`(r, d) -> (r, d)`: row `token` becomes row `other_token` of a second image's tokens `other_tokens` `(r2, d)`."""
    if sparse_tokens.ndim != 2 or other_tokens.ndim != 2:
        raise ValueError(
            "swap_token takes one image's tokens (r, d) and the second image's (r2, d)"
        )
    if sparse_tokens.shape[1] != other_tokens.shape[1]:
        raise ValueError(
            f"the two images' tokens have different widths ({sparse_tokens.shape[1]} and {other_tokens.shape[1]}): "
            "both must come from the same model"
        )
    token = _check_token(token, sparse_tokens.shape[0])
    other_token = _check_token(
        other_token, other_tokens.shape[0], "the second image's token"
    )
    edited = sparse_tokens.clone()
    edited[token] = other_tokens[other_token].to(sparse_tokens)
    return edited


def region_from_drawing(
    drawing, grid_size: Sequence[int], min_coverage: float = 0.5
) -> np.ndarray:
    """
    A mask drawn over the image -> a boolean `(h, w)` patch mask: a patch is in the region when at least
    `min_coverage` of its pixels are drawn (area average of the drawing resized onto the patch grid).

    `drawing`: an `(H, W)` array (non-zero = drawn), an `(H, W, 4)` RGBA array (alpha > 0 = drawn, as a paint layer
    of an image editor), an `(H, W, 3)` array (any non-zero channel) or a PIL image of those. Any size: it is
    stretched over the whole image.
    """
    if not 0.0 < min_coverage <= 1.0:
        raise ValueError(f"min_coverage must be in (0, 1], got {min_coverage}")
    array = np.asarray(drawing)
    if array.ndim == 3:
        array = array[..., 3] if array.shape[-1] == 4 else array.max(axis=-1)
    if array.ndim != 2:
        raise ValueError(
            f"a drawing must be (H, W), (H, W, 3) or (H, W, 4), got shape {array.shape}"
        )
    drawn = torch.from_numpy((array > 0).astype(np.float32))[None, None]
    height, width = int(grid_size[0]), int(grid_size[1])
    # Upsample first so that every patch averages at least one pixel, whatever the drawing's size.
    scale = max(1, -(-height // drawn.shape[-2]), -(-width // drawn.shape[-1]))
    drawn = (
        F.interpolate(drawn, scale_factor=scale, mode="nearest") if scale > 1 else drawn
    )
    coverage = F.adaptive_avg_pool2d(drawn, (height, width))[0, 0]
    return (coverage >= min_coverage - 1e-6).numpy()


def apply_edit(factors: Factors, edit: Edit, other: Factors | None = None) -> Factors:
    """`factors` with `edit` applied (and recorded); `other` is the second image's factors, for `swap`."""
    if edit.kind == "reassign":
        if edit.target is None:
            raise ValueError(
                "a reassign edit needs the target token that takes the area"
            )
        return factors.replace(
            spatial_map=reassign_token(factors.spatial_map, edit.token, edit.target),
            edit=edit,
        )
    if edit.kind == "drop":
        return factors.replace(
            spatial_map=drop_token(factors.spatial_map, edit.token), edit=edit
        )
    if edit.kind == "swap":
        if other is None:
            raise ValueError("a swap edit needs a second image: factorize one first")
        if edit.target is None:
            raise ValueError("a swap edit needs the second image's token")
        tokens = swap_token(
            factors.sparse_tokens, edit.token, other.sparse_tokens, edit.target
        )
        return factors.replace(sparse_tokens=tokens, edit=edit)
    if edit.kind == "restrict":
        if edit.region is None:
            raise ValueError(
                "a restrict edit needs a region: draw over the image first"
            )
        return factors.replace(
            spatial_map=restrict_token(factors.spatial_map, edit.token, edit.region),
            edit=edit,
        )
    raise ValueError(f"unknown edit kind {edit.kind!r}; choose one of {EDIT_KINDS}")


# ----------------------------------------------------------------------------------------------------------------------
# The model: factorize once, decode after every edit
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class Decoding:
    """A decoded image `(3, H, W)` on the [0, 1] scale (clamped) and the seconds the decoder took."""

    image: torch.Tensor
    seconds: float


class StellarExplorer:
    """
    A STELLAR model with its reconstruction decoder and image processor, for the explorer.

    [`factorize`] runs the encoder (and the decoder once, for the reconstruction); [`decode`] runs the decoder alone.
    Load one with [`load_explorer`].
    """

    def __init__(self, model, processor, name: str = ""):
        self.model = model.eval()
        self.processor = processor
        self.name = name
        self.encoder_calls = (
            0  # counted, so that tests and the page can show that edits never re-encode
        )

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.device

    def preprocess(self, image) -> tuple[torch.Tensor, torch.Tensor]:
        """PIL image (any mode), path or `(H, W, 3)` uint8 array -> normalised `pixel_values` `(1, 3, H, W)` and the
        processed image on the [0, 1] scale `(3, H, W)` (for display: what the encoder saw)."""
        if isinstance(image, (str, Path)):
            with Image.open(image) as opened:
                image = to_rgb_image(opened).copy()
        elif isinstance(image, np.ndarray):
            image = to_pil_image(image)
        else:
            image = to_rgb_image(image)
        pixel_values = self.processor(images=image, return_tensors="pt")[
            "pixel_values"
        ].float()
        shown = pixel_values[0]
        if getattr(self.processor, "do_normalize", False):
            shown = unnormalize_images(
                shown, self.processor.image_mean, self.processor.image_std
            )
        if not getattr(self.processor, "do_rescale", True):
            shown = shown / 255.0
        return pixel_values, shown.clamp(0.0, 1.0)

    @torch.inference_mode()
    def factorize(self, image) -> Factors:
        """Encode `image` once: its factors (with the processed image attached), on the CPU in float32."""
        pixel_values, shown = self.preprocess(image)
        patch = self.config.patch_size
        grid_size = (pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch)
        dtype = self.model.stellar.embeddings.patch_embeddings.projection.weight.dtype
        outputs = self.model.stellar(
            pixel_values=pixel_values.to(self.device, dtype), return_dict=True
        )
        self.encoder_calls += 1
        return Factors(
            sparse_tokens=outputs.sparse_tokens[0].float().cpu(),
            spatial_map=outputs.spatial_map[0].float().cpu(),
            grid_size=grid_size,
            image=shown,
        )

    @torch.inference_mode()
    def decode(self, factors: Factors) -> Decoding:
        """The decoder alone on `factors` (F = A·S inside the model's `reconstruct`), timed (the device synchronised)."""
        sparse_tokens = factors.sparse_tokens[None].to(self.device)
        spatial_map = factors.spatial_map[None].to(self.device)
        _synchronize(self.device)
        start = time.perf_counter()
        images = self.model.reconstruct(sparse_tokens, spatial_map, factors.grid_size)
        _synchronize(self.device)
        seconds = time.perf_counter() - start
        return Decoding(image=images[0].float().clamp(0.0, 1.0).cpu(), seconds=seconds)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_explorer(
    model_name_or_path: str | Path,
    vq_tokenizer: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> StellarExplorer:
    """
    A [`StellarExplorer`] for a STELLAR folder or Hub id that holds the reconstruction decoder: what the Quick start
    writes (`StellarForPreTraining`), a `StellarForImageReconstruction`, or a converted released checkpoint.

    VQ models need the MaskGIT VQGAN to turn codes into pixels: `vq_tokenizer` (a folder or Hub id), else the one the
    config names (`vq_tokenizer_name_or_path`). The processor saved with the model is used, else one made from the
    config.

    Raises:
        ValueError: the folder has no decoder weights, or a VQ model has no tokenizer.
    """
    from .image_processing_stellar import StellarImageProcessor
    from .modeling_stellar import StellarForImageReconstruction

    name = str(model_name_or_path)
    model, info = StellarForImageReconstruction.from_pretrained(
        name, output_loading_info=True, dtype=dtype
    )
    missing = [
        key
        for key in info["missing_keys"]
        if key.startswith(("decoder.", "reconstruction_head."))
    ]
    if missing:
        raise ValueError(
            f"{name} holds no reconstruction decoder (missing {', '.join(sorted(missing)[:3])}, ...): the explorer "
            "needs a model saved with its decoder (the Quick start's output, a StellarForImageReconstruction or "
            "a converted released checkpoint)"
        )
    if model.config.reconstruction_target == "vq":
        if model.load_vq_tokenizer(vq_tokenizer) is None:
            raise ValueError(
                f"{name} predicts MaskGIT VQGAN codes: pass the tokenizer that turns them into pixels (a folder made "
                "by `python -m stellar_hf.convert_vqgan`, or a Hub id) as vq_tokenizer / --vq_tokenizer"
            )
    elif vq_tokenizer is not None:
        raise ValueError(
            f"{name} reconstructs pixels: it takes no VQ tokenizer (got {vq_tokenizer})"
        )
    try:
        processor = StellarImageProcessor.from_pretrained(name)
    except (
        OSError
    ):  # no preprocessor_config.json: the config's crop size and statistics
        processor = StellarImageProcessor.from_model_config(model.config)
    device = torch.device(device)
    model.to(device)
    if model.vq_tokenizer is not None:
        model.vq_tokenizer.to(device)
    return StellarExplorer(model, processor, name=name)


# ----------------------------------------------------------------------------------------------------------------------
# Pictures: overlays and the figure
# ----------------------------------------------------------------------------------------------------------------------


def display_size(image: Image.Image, size: int) -> Image.Image:
    """`image` scaled so that its longer side is `size` pixels (nearest neighbour when enlarging small images, so that
    patches stay visible)."""
    scale = size / max(image.size)
    if scale == 1:
        return image
    new_size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.BICUBIC
    return image.resize(new_size, resample)


def overlay_tiles(
    factors: Factors, tile_size: int = 192, alpha: float = 0.6
) -> list[tuple[Image.Image, str]]:
    """
    `(picture, caption)` pairs: the processed image, the hard assignment (argmax token per patch, one colour per
    token, see `visualization.token_colors`), then each token's map as a heat overlay with its mass share
    (`visualization.spatial_map_tiles`).
    """
    if factors.image is None:
        raise ValueError(
            "these factors carry no image to draw over (they were loaded without one)"
        )
    tiles = spatial_map_tiles(
        factors.image,
        factors.spatial_map,
        factors.grid_size,
        alpha=alpha,
        tile_size=tile_size,
    )
    return [
        (picture, caption if caption != "argmax" else "hard assignment")
        for caption, picture in tiles
    ]


def edit_figure(
    original: Factors,
    edited: Factors,
    original_image,
    edited_image,
    tile_size: int = 192,
) -> Image.Image:
    """
    One PNG-ready panel: the image, the hard assignment before and after the edits, the decoding of the original
    factors and of the edited ones, each captioned.
    """
    before = spatial_map_tiles(
        original.image, original.spatial_map, original.grid_size, tile_size=tile_size
    )
    after = spatial_map_tiles(
        original.image,
        edited.spatial_map,
        edited.grid_size,
        tile_size=tile_size,
        tokens=[],
    )
    size = before[0][1].size
    tiles = [
        ("image", before[0][1]),
        ("assignment", before[1][1]),
        ("edited assignment", after[1][1]),
        (
            "decoded",
            to_pil_image(original_image).resize(size, Image.Resampling.BICUBIC),
        ),
        (
            "edited, decoded",
            to_pil_image(edited_image).resize(size, Image.Resampling.BICUBIC),
        ),
    ]
    font = _font(size[0])
    caption_height = _caption_height(font)
    return _arrange(
        [_labelled(tile, caption, font, caption_height) for caption, tile in tiles],
        None,
        2,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Files: factors as safetensors, built-in samples, the Space
# ----------------------------------------------------------------------------------------------------------------------


def save_factors(
    path: str | Path, factors: Factors, original: Factors | None = None, model: str = ""
) -> Path:
    """
    Write `factors` to a safetensors file: `sparse_tokens` `(r, d)`, `spatial_map` `(N, r)` and, when given, the
    unedited `original_sparse_tokens` / `original_spatial_map`; metadata `grid_size` (JSON `[h, w]`), `model` and
    `edits` (JSON list, see [`Edit.to_dict`]). [`load_factors`] reads it back.
    """
    from safetensors.torch import save_file

    tensors = {
        "sparse_tokens": factors.sparse_tokens.float().contiguous(),
        "spatial_map": factors.spatial_map.float().contiguous(),
    }
    if original is not None:
        # Copies: unedited factors share memory with the edited ones, which safetensors refuses.
        tensors["original_sparse_tokens"] = (
            original.sparse_tokens.float().clone().contiguous()
        )
        tensors["original_spatial_map"] = (
            original.spatial_map.float().clone().contiguous()
        )
    metadata = {
        "grid_size": json.dumps(list(factors.grid_size)),
        "model": model,
        "edits": json.dumps([edit.to_dict() for edit in factors.edits]),
    }
    path = Path(path)
    save_file(tensors, str(path), metadata=metadata)
    return path


def load_factors(path: str | Path) -> tuple[Factors, Factors | None, dict]:
    """The file [`save_factors`] wrote: `(factors, original factors or None, metadata)`; edits are restored."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - safe_open is not a dict
    grid_size = tuple(json.loads(metadata["grid_size"]))
    edits = [
        Edit(
            kind=item["kind"],
            token=item["token"],
            target=item["target"],
            region=None
            if item["region"] is None
            else tuple(tuple(row) for row in item["region"]),
        )
        for item in json.loads(metadata.get("edits", "[]"))
    ]
    factors = Factors(
        tensors["sparse_tokens"], tensors["spatial_map"], grid_size, edits=edits
    )
    original = None
    if "original_sparse_tokens" in tensors:
        original = Factors(
            tensors["original_sparse_tokens"],
            tensors["original_spatial_map"],
            grid_size,
        )
    return factors, original, metadata


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def sample_images(
    num_synthetic: int = 6,
    image_size: int = 128,
    samples_dir: str | Path | None = None,
    limit: int = 64,
) -> dict[str, Image.Image | Path]:
    """
    The explorer's built-in samples, name -> image: `num_synthetic` synthetic scenes (`stellar_hf.data.SyntheticScenes`,
    test split, drawn on the fly) as PIL images, then the image files directly in `samples_dir` (sorted, at most
    `limit`), as paths.
    """
    samples: dict[str, Image.Image | Path] = {}
    if num_synthetic:
        from .data import SyntheticScenes

        scenes = SyntheticScenes(
            num_images=num_synthetic, image_size=image_size, split="test"
        )
        for index in range(num_synthetic):
            samples[f"synthetic scene {index}"] = scenes[index]["image"]
    if samples_dir is not None:
        folder = Path(samples_dir)
        if not folder.is_dir():
            raise ValueError(
                f"samples folder {folder} does not exist or is not a directory"
            )
        files = sorted(
            p
            for p in folder.iterdir()
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )[:limit]
        for path in files:
            samples[path.name] = path
    return samples


SPACE_REQUIREMENTS = [
    "torch>=2.4",
    "torchvision>=0.19",
    "transformers>=5.24,<6",
    "safetensors>=0.4",
    "huggingface-hub>=1.0",
    "numpy>=1.24",
    "pillow>=10.0",
]


def write_space(
    output_dir: str | Path,
    hub_model_id: str,
    ui_script: str | Path,
    vq_tokenizer: str | None = None,
    title: str = "STELLAR explorer",
    gradio_version: str | None = None,
) -> Path:
    """
    A Hugging Face Space folder for the explorer on the model `hub_model_id`: `app.py` (the entry point, which loads
    the model by Hub id and launches the page), `explorer.py` (a copy of `ui_script`, the page), `stellar_hf/` (a copy
    of this package, so the Space needs nothing that is not on PyPI), `requirements.txt` and `README.md` with the
    Space card's front matter (`sdk: gradio`, `app_file: app.py`, the model under `models:`).

    Upload it with `hf upload <user>/<space> <output_dir> --repo-type space`.
    """
    if (
        not hub_model_id
        or hub_model_id.startswith((".", "/"))
        or hub_model_id.count("/") != 1
    ):
        raise ValueError(
            f"a Space loads its model from the Hub: pass a Hub id such as org/stellar-b16, got {hub_model_id!r}"
        )
    if gradio_version is None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            gradio_version = version("gradio")
        except PackageNotFoundError:
            # The Space card pins the SDK version: a guess could name a release the page was never run with.
            raise ValueError(
                "the Space card names the gradio version the page runs with: install gradio "
                '(pip install -e ".[demo]") or pass gradio_version'
            ) from None
    from .checkpointing import publish_files

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # Everything is written beside the folder first, then moved in: a run killed at any point leaves the folder's
    # files old or new and whole, never cut short (README.md, the card, last).
    staging = output_dir.parent / f".{output_dir.name}.space.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    shutil.copyfile(ui_script, staging / "explorer.py")
    package = Path(__file__).resolve().parent
    shutil.copytree(
        package,
        staging / "stellar_hf",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        symlinks=False,
    )
    vq_line = f", vq_tokenizer={vq_tokenizer!r}" if vq_tokenizer else ""
    (staging / "app.py").write_text(
        '"""Hugging Face Space entry point: the STELLAR explorer on '
        f'{hub_model_id}."""\n\n'
        "from explorer import build_demo, launch_options\n"
        "from stellar_hf.explorer import load_explorer, sample_images\n\n"
        f"explorer = load_explorer({hub_model_id!r}{vq_line})\n"
        "demo = build_demo(explorer, sample_images())\n\n"
        'if __name__ == "__main__":\n'
        "    demo.launch(**launch_options())\n",
        encoding="utf-8",
    )
    (staging / "requirements.txt").write_text(
        "\n".join([*SPACE_REQUIREMENTS, f"gradio=={gradio_version}"]) + "\n",
        encoding="utf-8",
    )
    vq_model = (
        f"  - {vq_tokenizer}\n" if vq_tokenizer and vq_tokenizer.count("/") == 1 else ""
    )
    (staging / "README.md").write_text(
        "---\n"
        f"title: {title}\n"
        "emoji: 🔭\n"
        "colorFrom: indigo\n"
        "colorTo: yellow\n"
        "sdk: gradio\n"
        f"sdk_version: {gradio_version}\n"
        "app_file: app.py\n"
        "pinned: false\n"
        "license: mit\n"
        "models:\n"
        f"  - {hub_model_id}\n"
        f"{vq_model}"
        "tags:\n"
        "  - stellar\n"
        "  - sparse-tokens\n"
        "short_description: Edit an image's STELLAR sparse tokens and spatial maps\n"
        "---\n\n"
        f"# {title}\n\n"
        f"Upload an image to see what [{hub_model_id}](https://huggingface.co/{hub_model_id}) makes of it: each "
        "sparse token's spatial map over the image, the hard assignment of patches to tokens and the reconstruction "
        "from the factors. Then edit the factors (hand a token's area to another, drop a token, swap a token with "
        "one of a second image, restrict a token to a drawn region) and see the edited image decoded at once; only "
        "the decoder runs again.\n",
        encoding="utf-8",
    )
    # The package copy moves in by rename, the previous one set aside first: a kill between the two renames leaves it
    # beside the folder (`.NAME.stellar_hf.previous`), and the next export completes the folder again.
    target, previous = output_dir / "stellar_hf", output_dir.parent / f".{output_dir.name}.stellar_hf.previous"
    shutil.rmtree(previous, ignore_errors=True)
    if target.exists():
        os.replace(target, previous)
    os.replace(staging / "stellar_hf", target)
    shutil.rmtree(previous, ignore_errors=True)
    publish_files(staging, output_dir, last="README.md")
    return output_dir
