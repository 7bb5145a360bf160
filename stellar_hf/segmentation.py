"""The paper's linear segmentation probe on frozen STELLAR features (spec section 5).

A frozen encoder's patch grid, `(B, C, h, w)`, goes through `BatchNorm2d(C)` and a `1 x 1` convolution to class
logits `(B, K, h, w)`, trained with cross-entropy + Dice (weights 1 and 1, ignore label 255) against label maps
downsampled to the logit grid by nearest neighbour. Three grids can be probed ([`SEGMENTATION_FEATURES`]):

- `dense`: the encoder's patch tokens, `(B, N, d)` (the paper's probe feature);
- `lowrank`: the low-rank features `F = A S`, `(B, N, d)`, STELLAR's factorised grid (rank at most r);
- `spatial_map`: the spatial map `A` alone, `(B, N, r)`: which sparse token each patch belongs to.

Pieces (B images, N = h * w patches, K classes, H x W label maps):

- Features: [`feature_grid`], [`feature_channels`], [`extract_segmentation_features`].
- Head and loss: [`SegmentationProbe`], [`dice_loss`], [`segmentation_loss`], [`downsample_labels`].
- Metrics: [`confusion_matrix`], [`segmentation_scores`] (pixel accuracy and mean IoU; see there for which classes
  the mean runs over), [`check_label_map`].
- Protocol: [`train_segmentation_probe`], [`evaluate_segmentation_probe`], [`segmentation_probe`] (both at once),
  [`majority_class_scores`] (the floor).
- Data: [`SegmentationDataset`] (image + label map items from any source, checked), [`synthetic_segmentation`]
  (the built-in scenes' object masks as class maps), [`load_segmentation_folder`] (images and same-named label
  PNGs), a `datasets` split with an image and an annotation column (the `scene_parse_150` layout),
  [`reduce_labels`] (ADE20K's 0 = "other" -> ignore), and [`SegmentationCollator`] (the image processor on the
  images, the same resize and crop, nearest neighbour, on the label maps).

Imported by the examples, never by the model files.
"""

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

IGNORE_INDEX = 255
SEGMENTATION_FEATURES = ("dense", "lowrank", "spatial_map")
# The class maps the synthetic scenes offer: class 0 is the background, then one class per shape / colour.
SYNTHETIC_SEGMENTATION_CLASSES = ("shape", "color", "foreground")
DEFAULT_SYNTHETIC_SEGMENTATION_CLASSES = "color"
# Upstream's recipe (eval_seg.yaml): AdamW lr 1e-4, weight decay 1e-4, constant learning rate, 80 epochs, gradient
# norm clipped at 5; ADE20K, 150 classes, 224 px crops.
SEGMENTATION_EPOCHS = 80
SEGMENTATION_LEARNING_RATE = 1e-4
SEGMENTATION_WEIGHT_DECAY = 1e-4
SEGMENTATION_MAX_GRAD_NORM = 5.0
# What the mean IoU averages over, written next to every figure.
MEAN_IOU_CLASSES = (
    "classes present in the labels or the predictions of the evaluation split (sklearn's jaccard_score "
    "average='macro'); ignore-label pixels excluded"
)


# ----------------------------------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------------------------------


def feature_channels(config, feature: str) -> int:
    """Channels C of a feature grid: `hidden_size` for `dense` and `lowrank`, `num_sparse_tokens` for `spatial_map`."""
    if feature in ("dense", "lowrank"):
        return config.hidden_size
    if feature == "spatial_map":
        return config.num_sparse_tokens
    raise ValueError(f"unknown segmentation feature {feature!r}; choose one of {SEGMENTATION_FEATURES}")


def feature_grid(outputs, feature: str, grid_size: tuple[int, int]) -> torch.Tensor:
    """
    One feature of a [`StellarModelOutput`] as a patch grid.

    Args:
        outputs: the encoder's output (`dense_features`, `lowrank_features`: `(B, N, d)`; `spatial_map`: `(B, N, r)`).
        feature: one of `SEGMENTATION_FEATURES`.
        grid_size: `(h, w)` with `h * w = N` (rectangles allowed).

    Returns:
        `(B, C, h, w)`.
    """
    if feature == "dense":
        tokens = outputs.dense_features
    elif feature == "lowrank":
        tokens = outputs.lowrank_features
    elif feature == "spatial_map":
        tokens = outputs.spatial_map
    else:
        raise ValueError(f"unknown segmentation feature {feature!r}; choose one of {SEGMENTATION_FEATURES}")
    height, width = grid_size
    if tokens.shape[1] != height * width:
        raise ValueError(f"{feature} features of {tokens.shape[1]} patches do not fit a {height}x{width} grid")
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width)


@torch.no_grad()
def extract_segmentation_features(
    model: nn.Module,
    batches: Iterable[dict],
    features: Sequence[str] = ("dense",),
    device: torch.device | str | None = None,
    storage_dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """
    Run a frozen encoder once over `batches` of `{"pixel_values": (B, 3, H', W'), "labels": (B, H, W)}` and keep
    every requested feature grid.

    Args:
        model: a `StellarModel` or any model with a `.stellar` encoder (put in eval mode for the pass).
        features: names from `SEGMENTATION_FEATURES`; all come from the same forward pass.
        storage_dtype: dtype the grids are kept in on the CPU (float16 halves the memory; the probe trains in float32).

    Returns:
        `({feature: (n, C, h, w)}, labels (n, H, W) uint8)` on the CPU.
    """
    encoder = getattr(model, "stellar", model)
    device = torch.device(device) if device is not None else next(encoder.parameters()).device
    patch_size = encoder.config.patch_size
    was_training = encoder.training
    encoder.eval()
    grids = {feature: [] for feature in features}
    labels = []
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="segmentation features", leave=False)
    for batch in batches:
        pixel_values = batch["pixel_values"].to(device)
        grid_size = (
            pixel_values.shape[-2] // patch_size,
            pixel_values.shape[-1] // patch_size,
        )
        outputs = encoder(pixel_values, return_dict=True)
        for feature in features:
            grids[feature].append(feature_grid(outputs, feature, grid_size).to("cpu", storage_dtype))
        labels.append(torch.as_tensor(batch["labels"]).to(torch.uint8).cpu())
    encoder.train(was_training)
    if not labels:
        raise ValueError("no images to extract segmentation features from")
    return {feature: torch.cat(grid) for feature, grid in grids.items()}, torch.cat(labels)


# ----------------------------------------------------------------------------------------------------------------------
# Head, loss, labels
# ----------------------------------------------------------------------------------------------------------------------


class SegmentationProbe(nn.Module):
    """The paper's segmentation head: `BatchNorm2d(C)` then `Conv2d(C, K, 1)`, `(B, C, h, w) -> (B, K, h, w)`."""

    def __init__(self, num_channels: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(num_channels)
        self.classifier = nn.Conv2d(num_channels, num_classes, kernel_size=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.norm(features))


def downsample_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """
    Label maps `(B, H, W)` -> `(B, h, w)` by nearest neighbour (`F.interpolate(mode="nearest")`: the pixel at
    `floor(i * H / h)`, as upstream): the logit-grid labels the probe trains on and upstream reports against.
    """
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels.long()
    return F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()


def dice_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    smooth: float = 1.0,
) -> torch.Tensor:
    """
    Upstream's soft Dice loss: `1 - mean_k (2 I_k + smooth) / (P_k + T_k + smooth)` with, over every labelled pixel
    of the batch, `I_k = sum p_k t_k`, `P_k = sum p_k` (softmax probability of class k) and `T_k = sum t_k` (one-hot
    label). The mean runs over all K classes (a class absent from the batch scores 1 when the probe gives it no
    probability). Ignore-label pixels count nowhere; a batch without labelled pixels has loss 0.

    Args:
        logits: `(B, K, h, w)`; labels: `(B, h, w)` class indices or `ignore_index`.

    Returns:
        `()`.
    """
    valid = labels != ignore_index
    if not valid.any():
        return logits.sum() * 0.0  # zero, still attached to the graph
    probabilities = logits.float().softmax(dim=1) * valid[:, None]
    one_hot = F.one_hot(labels.masked_fill(~valid, 0).long(), logits.shape[1]).permute(0, 3, 1, 2)
    one_hot = one_hot.float() * valid[:, None]
    dims = (0, 2, 3)
    intersection = (probabilities * one_hot).sum(dims)
    total = probabilities.sum(dims) + one_hot.sum(dims)
    return 1.0 - ((2.0 * intersection + smooth) / (total + smooth)).mean()


def segmentation_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    cross_entropy_weight: float = 1.0,
    dice_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """
    The probe's loss, `cross_entropy_weight * CE + dice_weight * Dice` (spec: 1 and 1), with labels brought to the
    logit grid by [`downsample_labels`] when their size differs.

    Args:
        logits: `(B, K, h, w)`; labels: `(B, h, w)` or `(B, H, W)`.

    Returns:
        `{"loss", "cross_entropy", "dice"}`, each `()`.
    """
    labels = downsample_labels(labels, logits.shape[-2:])
    if (labels != ignore_index).any():
        cross_entropy = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index)
    else:
        cross_entropy = logits.sum() * 0.0  # F.cross_entropy would be NaN
    dice = dice_loss(logits, labels, ignore_index)
    return {
        "loss": cross_entropy_weight * cross_entropy + dice_weight * dice,
        "cross_entropy": cross_entropy,
        "dice": dice,
    }


def check_label_map(labels, num_classes: int, ignore_index: int = IGNORE_INDEX, name: str = "label map") -> None:
    """
    Raise `ValueError` naming `name` and the offending values when `labels` holds anything but class indices
    `0 .. num_classes - 1` and `ignore_index`.
    """
    values = torch.unique(torch.as_tensor(np.asarray(labels)))
    bad = values[((values < 0) | (values >= num_classes)) & (values != ignore_index)]
    if bad.numel():
        shown = ", ".join(str(int(value)) for value in bad[:8]) + (", ..." if bad.numel() > 8 else "")
        raise ValueError(
            f"{name} holds values {shown} outside the classes 0..{num_classes - 1} and the ignore label "
            f"{ignore_index}; check the number of classes, or reduce the labels (ADE20K-style maps number their "
            "classes from 1, with 0 for unlabelled pixels)"
        )


# ----------------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------------


def confusion_matrix(
    predictions: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """
    Pixel counts `(K, K)` int64, rows the label class, columns the predicted class, over the pixels whose label is
    not `ignore_index`. `predictions` and `labels` have the same shape (any).
    """
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions {tuple(predictions.shape)} and labels {tuple(labels.shape)} differ in shape")
    labels = labels.reshape(-1).long()
    predictions = predictions.reshape(-1).long()
    valid = labels != ignore_index
    labels, predictions = labels[valid], predictions[valid]
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        check_label_map(labels, num_classes, ignore_index)
    if predictions.numel() and (predictions.min() < 0 or predictions.max() >= num_classes):
        raise ValueError(f"predictions hold classes outside 0..{num_classes - 1}")
    counts = torch.bincount(labels * num_classes + predictions, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).cpu()


def segmentation_scores(confusion: torch.Tensor) -> dict:
    """
    Pixel accuracy and mean IoU of a [`confusion_matrix`].

    - `pixel_accuracy`: correctly classified labelled pixels / labelled pixels.
    - `mean_iou`: mean over the *present* classes of `IoU_k = TP_k / (TP_k + FP_k + FN_k)`, a class being present
      when it occurs in the labels or in the predictions (its union is not empty): the macro Jaccard index of
      `sklearn.metrics.jaccard_score(labels, predictions, average="macro")`, which upstream reports. A class that is
      predicted but never labelled counts with IoU 0; a class neither labelled nor predicted is left out.
    - `per_class_iou`: `IoU_k` per class, `None` for absent classes; `num_classes_present`.

    Raises `ValueError` when the matrix counts no labelled pixel.
    """
    confusion = confusion.double()
    total = confusion.sum()
    if total == 0:
        raise ValueError("no labelled pixel to score (every label is the ignore label)")
    true_positive = confusion.diagonal()
    union = confusion.sum(dim=0) + confusion.sum(dim=1) - true_positive
    present = union > 0
    iou = true_positive / union.clamp(min=1)
    return {
        "mean_iou": iou[present].mean().item(),
        "pixel_accuracy": (true_positive.sum() / total).item(),
        "per_class_iou": [value if keep else None for value, keep in zip(iou.tolist(), present.tolist())],
        "num_classes_present": int(present.sum()),
    }


# ----------------------------------------------------------------------------------------------------------------------
# Protocol
# ----------------------------------------------------------------------------------------------------------------------


def train_segmentation_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    epochs: int = SEGMENTATION_EPOCHS,
    learning_rate: float = SEGMENTATION_LEARNING_RATE,
    weight_decay: float = SEGMENTATION_WEIGHT_DECAY,
    batch_size: int = 64,
    max_grad_norm: float | None = SEGMENTATION_MAX_GRAD_NORM,
    ignore_index: int = IGNORE_INDEX,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[SegmentationProbe, dict]:
    """
    Train a [`SegmentationProbe`] on frozen feature grids: AdamW at a constant learning rate (upstream's), shuffled
    batches of `batch_size` images, [`segmentation_loss`] against the labels downsampled to the grid.

    Args:
        features: `(n, C, h, w)` (any float dtype; batches are cast to float32).
        labels: `(n, H, W)` class indices or `ignore_index`.
        seed: the probe's initialisation and the shuffling; the global RNG state is left untouched.

    Returns:
        the probe in eval mode on the CPU, and `{"steps", "initial_loss", "final_loss"}` (final: mean of the last
        epoch).
    """
    grid_labels = downsample_labels(labels, features.shape[-2:])
    if not (grid_labels != ignore_index).any():
        raise ValueError("no labelled pixel on the feature grid to train the segmentation probe on")
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = SegmentationProbe(features.shape[1], num_classes)
    probe.to(device).train()
    optimizer = torch.optim.AdamW(probe.parameters(), lr=learning_rate, weight_decay=weight_decay)
    losses, steps = [], 0
    for _ in range(epochs):
        order = torch.randperm(features.shape[0], generator=generator)
        epoch_losses = []
        for start in range(0, order.shape[0], batch_size):
            index = order[start : start + batch_size]
            if index.numel() < 2 and order.shape[0] > 1:
                continue  # BatchNorm in training mode needs more than one value per channel
            logits = probe(features[index].to(device, torch.float32))
            loss = segmentation_loss(logits, grid_labels[index].to(device), ignore_index)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(probe.parameters(), max_grad_norm)
            optimizer.step()
            epoch_losses.append(loss.item())
            steps += 1
        losses.append(epoch_losses)
    history = {
        "steps": steps,
        "initial_loss": losses[0][0],
        "final_loss": float(np.mean(losses[-1])),
    }
    return probe.cpu().eval(), history


@torch.no_grad()
def evaluate_segmentation_probe(
    probe: nn.Module,
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    batch_size: int = 64,
    ignore_index: int = IGNORE_INDEX,
) -> dict[str, dict]:
    """
    Score a trained probe two ways:

    - `"full"`: logits upsampled bilinearly (`align_corners=False`) to the label maps' size, argmax per pixel;
    - `"grid"`: argmax on the logit grid against the labels downsampled by nearest neighbour (upstream's figure).

    Args:
        features: `(n, C, h, w)`; labels: `(n, H, W)`.

    Returns:
        `{"full": segmentation_scores(...), "grid": segmentation_scores(...)}`.
    """
    probe = probe.eval()
    device = next(probe.parameters()).device
    full = torch.zeros(num_classes, num_classes, dtype=torch.long)
    grid = torch.zeros_like(full)
    for start in range(0, features.shape[0], batch_size):
        logits = probe(features[start : start + batch_size].to(device, torch.float32)).float()
        batch_labels = labels[start : start + batch_size].long()
        grid += confusion_matrix(
            logits.argmax(dim=1).cpu(),
            downsample_labels(batch_labels, logits.shape[-2:]),
            num_classes,
            ignore_index,
        )
        upsampled = F.interpolate(
            logits,
            size=tuple(batch_labels.shape[-2:]),
            mode="bilinear",
            align_corners=False,
        )
        full += confusion_matrix(upsampled.argmax(dim=1).cpu(), batch_labels, num_classes, ignore_index)
    return {"full": segmentation_scores(full), "grid": segmentation_scores(grid)}


def majority_class_scores(
    train_labels: torch.Tensor,
    eval_labels: torch.Tensor,
    num_classes: int,
    ignore_index: int = IGNORE_INDEX,
) -> dict:
    """The floor: [`segmentation_scores`] of predicting the training split's most frequent class at every pixel."""
    train_labels = train_labels.reshape(-1).long()
    train_labels = train_labels[train_labels != ignore_index]
    if train_labels.numel() == 0:
        raise ValueError("the training split has no labelled pixel")
    majority = int(torch.bincount(train_labels, minlength=num_classes).argmax())
    eval_labels = eval_labels.long()
    return segmentation_scores(
        confusion_matrix(
            torch.full_like(eval_labels, majority),
            eval_labels,
            num_classes,
            ignore_index,
        )
    )


def segmentation_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    eval_features: torch.Tensor,
    eval_labels: torch.Tensor,
    num_classes: int,
    epochs: int = SEGMENTATION_EPOCHS,
    learning_rate: float = SEGMENTATION_LEARNING_RATE,
    weight_decay: float = SEGMENTATION_WEIGHT_DECAY,
    batch_size: int = 64,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> dict:
    """
    Train on one split, score on the other ([`train_segmentation_probe`], [`evaluate_segmentation_probe`]).

    Args:
        train_features / eval_features: `(n, C, h, w)`; train_labels / eval_labels: `(n, H, W)`.

    Returns:
        `{"mean_iou", "pixel_accuracy"}` at the labels' size, `{"grid_mean_iou", "grid_pixel_accuracy"}` on the
        logit grid, `per_class_iou`, `num_classes_present`, and the training's `steps`, `initial_loss`, `final_loss`.
    """
    probe, history = train_segmentation_probe(
        train_features,
        train_labels,
        num_classes,
        epochs=epochs,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        batch_size=batch_size,
        seed=seed,
        device=device,
    )
    scores = evaluate_segmentation_probe(probe.to(device), eval_features, eval_labels, num_classes, batch_size)
    return {
        "mean_iou": scores["full"]["mean_iou"],
        "pixel_accuracy": scores["full"]["pixel_accuracy"],
        "grid_mean_iou": scores["grid"]["mean_iou"],
        "grid_pixel_accuracy": scores["grid"]["pixel_accuracy"],
        "per_class_iou": scores["full"]["per_class_iou"],
        "num_classes_present": scores["full"]["num_classes_present"],
        **history,
    }


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------


def synthetic_segmentation_class_names(
    classes: str = DEFAULT_SYNTHETIC_SEGMENTATION_CLASSES,
) -> tuple[str, ...]:
    """Class names of a synthetic class map: `background`, then the shapes (7), the colours (9) or `object` (2)."""
    from .data import CLASS_NAMES, COLOR_NAMES

    if classes == "shape":
        return ("background", *CLASS_NAMES)
    if classes == "color":
        return ("background", *COLOR_NAMES)
    if classes == "foreground":
        return ("background", "object")
    raise ValueError(f"unknown synthetic classes {classes!r}; choose one of {SYNTHETIC_SEGMENTATION_CLASSES}")


def synthetic_class_map(item: dict, classes: str = DEFAULT_SYNTHETIC_SEGMENTATION_CLASSES) -> torch.Tensor:
    """
    A synthetic scene's class map `(S, S)` int64 from its instance mask: 0 for the background, and for each object
    pixel `1 + shape` (`classes="shape"`), `1 + colour` (`"color"`) or 1 (`"foreground"`).
    """
    synthetic_segmentation_class_names(classes)  # checks `classes`
    mask = torch.as_tensor(item["mask"]).long()
    if classes == "foreground":
        return (mask > 0).long()
    per_object = item["shapes"] if classes == "shape" else item["colors"]
    table = torch.tensor([0, *(1 + int(value) for value in per_object)], dtype=torch.long)
    return table[mask]


class _SyntheticSegmentationSource:
    """Synthetic scenes as `{"image", "annotation"}` items (the annotation: their class map)."""

    def __init__(self, scenes, classes: str):
        self.scenes = scenes
        self.classes = classes

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int) -> dict:
        item = self.scenes[index]
        return {
            "image": item["image"],
            "annotation": synthetic_class_map(item, self.classes),
        }


def synthetic_segmentation(
    scenes,
    classes: str = DEFAULT_SYNTHETIC_SEGMENTATION_CLASSES,
    indices: Sequence[int] | None = None,
) -> "SegmentationDataset":
    """
    The built-in synthetic scenes (a `stellar_hf.data.SyntheticScenes`) as a [`SegmentationDataset`] whose label
    maps are [`synthetic_class_map`]s.
    """
    names = synthetic_segmentation_class_names(classes)
    return SegmentationDataset(
        _SyntheticSegmentationSource(scenes, classes),
        len(names),
        indices=indices,
        name="synthetic scenes",
    )


def reduce_labels(labels: np.ndarray, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """
    ADE20K's numbering (`scene_parse_150`: 0 = unlabelled / "other", 1..150 the classes) -> 0..149 with 0 becoming
    the ignore label, as upstream's ADE20K loader and transformers' `do_reduce_labels` do. Values already equal to
    `ignore_index` stay ignored.
    """
    labels = np.asarray(labels).astype(np.int64)
    reduced = labels - 1
    reduced[(labels == 0) | (labels == ignore_index)] = ignore_index
    return reduced


def label_map_array(annotation) -> np.ndarray:
    """
    A label map as an `(H, W)` int64 array: a single-channel PIL image (modes `L`, `P`, `I`, `I;16`: the pixel values
    are the class indices; a palette image's indices, not its colours), a 2-D array or tensor. Colour images are
    refused: a class cannot be read from an RGB colour.
    """
    from PIL import Image

    if isinstance(annotation, Image.Image):
        if annotation.mode not in ("L", "P", "I", "I;16", "I;16L", "I;16B", "1"):
            raise ValueError(
                f"a label map must be a single-channel image of class indices (mode L, P or I), got mode "
                f"{annotation.mode!r}"
            )
        array = np.asarray(annotation)
    else:
        array = np.asarray(torch.as_tensor(annotation).cpu()) if torch.is_tensor(annotation) else np.asarray(annotation)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 2:
        raise ValueError(f"a label map must be 2-D (H, W) class indices, got shape {array.shape}")
    return array.astype(np.int64)


class SegmentationFolder(Dataset):
    """
    Images and their label maps from two folders ([`load_segmentation_folder`]). Items: `{"image": PIL,
    "annotation": PIL label map, "path": image path}`.
    """

    def __init__(self, image_paths: list[Path], label_paths: list[Path]):
        self.image_paths = image_paths
        self.label_paths = label_paths

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> dict:
        from PIL import Image

        image = Image.open(self.image_paths[index])
        annotation = Image.open(self.label_paths[index])
        return {
            "image": image,
            "annotation": annotation,
            "path": str(self.image_paths[index]),
        }


def _list_names(paths: list[str], limit: int = 5) -> str:
    shown = ", ".join(paths[:limit])
    return shown + (f", ... ({len(paths)} in all)" if len(paths) > limit else "")


def load_segmentation_folder(images_dir, labels_dir) -> SegmentationFolder:
    """
    Pair every image under `images_dir` (found recursively) with the label PNG at the same relative path under
    `labels_dir`, extension `.png` (`images/a/b.jpg` <-> `labels/a/b.png`).

    Raises:
        ValueError: a folder is missing or empty, or some images have no label PNG or some label PNGs no image (the
            message names them).
    """
    from .data import IMAGE_EXTENSIONS

    images_dir, labels_dir = Path(images_dir), Path(labels_dir)
    for flag, folder in (("images", images_dir), ("labels", labels_dir)):
        if not folder.is_dir():
            raise ValueError(f"the {flag} folder {folder} does not exist or is not a directory")
    images = {
        path.relative_to(images_dir).with_suffix(""): path
        for path in sorted(images_dir.rglob("*"))
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS
    }
    labels = {
        path.relative_to(labels_dir).with_suffix(""): path
        for path in sorted(labels_dir.rglob("*"))
        if path.is_file() and path.suffix.lower() == ".png"
    }
    if not images:
        raise ValueError(f"no images found under {images_dir}")
    without_label = sorted(str(images[key].relative_to(images_dir)) for key in images.keys() - labels.keys())
    without_image = sorted(str(labels[key].relative_to(labels_dir)) for key in labels.keys() - images.keys())
    if without_label or without_image:
        problems = []
        if without_label:
            problems.append(
                f"{len(without_label)} image(s) under {images_dir} have no label PNG of the same name under "
                f"{labels_dir}: {_list_names(without_label)}"
            )
        if without_image:
            problems.append(
                f"{len(without_image)} label PNG(s) under {labels_dir} have no image of the same name under "
                f"{images_dir}: {_list_names(without_image)}"
            )
        raise ValueError("; ".join(problems))
    keys = sorted(images)
    return SegmentationFolder([images[key] for key in keys], [labels[key] for key in keys])


class SegmentationDataset(Dataset):
    """
    Checked segmentation items from any source of `{image_column: image, annotation_column: label map}` items (a
    `datasets.Dataset`, a [`SegmentationFolder`], the synthetic scenes).

    Items: `{"image": PIL RGB, "labels": (H, W) int64 array}`. Each item is checked as it is read: the label map has
    the image's size, and holds only class indices `0 .. num_classes - 1` and `ignore_index` (after
    [`reduce_labels`] when `reduce=True`); a failure raises `ValueError` naming the item (and its file).
    """

    def __init__(
        self,
        source,
        num_classes: int,
        image_column: str = "image",
        annotation_column: str = "annotation",
        reduce: bool = False,
        indices: Sequence[int] | None = None,
        ignore_index: int = IGNORE_INDEX,
        name: str = "dataset",
    ):
        if not 2 <= num_classes <= ignore_index:
            raise ValueError(f"num_classes must be in 2..{ignore_index} ({ignore_index} is the ignore label)")
        self.source = source
        self.num_classes = num_classes
        self.image_column = image_column
        self.annotation_column = annotation_column
        self.reduce = reduce
        self.indices = list(range(len(source))) if indices is None else list(indices)
        self.ignore_index = ignore_index
        self.name = name

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        from .image_processing_stellar import to_rgb_image

        position = self.indices[index]
        item = self.source[position]
        where = f"{self.name} item {position}" + (f" ({item['path']})" if item.get("path") else "")
        image = item[self.image_column]
        try:
            labels = label_map_array(item[self.annotation_column])
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        if self.reduce:
            labels = reduce_labels(labels, self.ignore_index)
        image = image if isinstance(image, torch.Tensor) else to_rgb_image(image)
        image_size = (image.height, image.width) if hasattr(image, "height") else tuple(image.shape[-2:])
        if tuple(labels.shape) != image_size:
            raise ValueError(
                f"{where}: the label map is {labels.shape[0]}x{labels.shape[1]} (HxW) but the image is "
                f"{image_size[0]}x{image_size[1]}; they must be the same size"
            )
        check_label_map(labels, self.num_classes, self.ignore_index, f"{where}: the label map")
        return {"image": image, "labels": labels}


def _processor_option(processor, name: str, default=None):
    value = getattr(processor, name, default)
    return default if value is None else value


class SegmentationCollator:
    """
    Items of a [`SegmentationDataset`] -> `{"pixel_values": (B, 3, S, S), "labels": (B, S, S) int64}`: the image
    processor on the images; on the label maps the same geometry (its resize rule and centre crop) with nearest
    neighbour, so that labels stay class indices and aligned with the pixels. Pixels a crop pads in are ignored.
    """

    def __init__(self, processor, ignore_index: int = IGNORE_INDEX):
        self.processor = processor
        self.ignore_index = ignore_index

    def label_geometry(self, labels: torch.Tensor) -> torch.Tensor:
        """`(H, W)` -> `(S, S)` class indices: the processor's resize (nearest) and centre crop (padding ignored)."""
        from torchvision.transforms.v2 import functional as tvF
        from transformers.image_transforms import get_resize_output_image_size
        from transformers.image_utils import ChannelDimension

        processor = self.processor
        labels = labels[None]
        size = _processor_option(processor, "size", {})
        if _processor_option(processor, "do_resize", False) and size:
            shortest = size.get("shortest_edge") if hasattr(size, "get") else size.shortest_edge
            if shortest:
                new_size = get_resize_output_image_size(
                    labels,
                    size=shortest,
                    default_to_square=False,
                    input_data_format=ChannelDimension.FIRST,
                )
            else:
                new_size = (size["height"], size["width"])
            labels = tvF.resize(
                labels,
                list(new_size),
                interpolation=tvF.InterpolationMode.NEAREST,
                antialias=False,
            )
        crop = _processor_option(processor, "crop_size", {})
        if _processor_option(processor, "do_center_crop", False) and crop:
            crop_height, crop_width = crop["height"], crop["width"]
            height, width = labels.shape[-2:]
            if crop_height > height or crop_width > width:  # the processor pads; padded pixels are unlabelled
                left, top = (
                    max(crop_width - width, 0) // 2,
                    max(crop_height - height, 0) // 2,
                )
                right, bottom = (
                    max(crop_width - width, 0) - left,
                    max(crop_height - height, 0) - top,
                )
                labels = F.pad(labels, (left, right, top, bottom), value=self.ignore_index)
                height, width = labels.shape[-2:]
            top, left = (
                int((height - crop_height) / 2.0),
                int((width - crop_width) / 2.0),
            )
            labels = labels[..., top : top + crop_height, left : left + crop_width]
        return labels[0]

    def __call__(self, items: list[dict]) -> dict:
        pixel_values = self.processor([item["image"] for item in items], return_tensors="pt")["pixel_values"]
        labels = torch.stack([self.label_geometry(torch.as_tensor(item["labels"])) for item in items])
        if tuple(labels.shape[-2:]) != tuple(pixel_values.shape[-2:]):
            raise ValueError(
                f"label maps came out {tuple(labels.shape[-2:])} but pixels {tuple(pixel_values.shape[-2:])}: the "
                "image processor's geometry is not one the label transform follows (resize + centre crop)"
            )
        return {"pixel_values": pixel_values, "labels": labels.long()}


def describe_scores(scores: dict) -> str:
    """`mIoU 0.412, pixel accuracy 0.873 (grid: 0.398, 0.861)`, for a readable line."""
    text = f"mIoU {scores['mean_iou']:.3f}, pixel accuracy {scores['pixel_accuracy']:.3f}"
    if "grid_mean_iou" in scores:
        text += f" (logit grid: {scores['grid_mean_iou']:.3f}, {scores['grid_pixel_accuracy']:.3f})"
    return text


__all__ = [
    "DEFAULT_SYNTHETIC_SEGMENTATION_CLASSES",
    "IGNORE_INDEX",
    "MEAN_IOU_CLASSES",
    "SEGMENTATION_EPOCHS",
    "SEGMENTATION_FEATURES",
    "SEGMENTATION_LEARNING_RATE",
    "SEGMENTATION_WEIGHT_DECAY",
    "SYNTHETIC_SEGMENTATION_CLASSES",
    "SegmentationCollator",
    "SegmentationDataset",
    "SegmentationFolder",
    "SegmentationProbe",
    "check_label_map",
    "confusion_matrix",
    "describe_scores",
    "dice_loss",
    "downsample_labels",
    "evaluate_segmentation_probe",
    "extract_segmentation_features",
    "feature_channels",
    "feature_grid",
    "label_map_array",
    "load_segmentation_folder",
    "majority_class_scores",
    "reduce_labels",
    "segmentation_loss",
    "segmentation_probe",
    "segmentation_scores",
    "synthetic_class_map",
    "synthetic_segmentation",
    "synthetic_segmentation_class_names",
    "train_segmentation_probe",
]
