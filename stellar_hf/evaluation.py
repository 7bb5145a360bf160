"""Frozen-feature evaluation protocols of the STELLAR paper (spec section 5), plus reconstruction and object-discovery
metrics.

- Features: [`extract_features`], [`select_feature`].
- Classification probes: [`knn_classify`] / [`knn_accuracy`] (DINO's weighted kNN), [`linear_probe`].
- What a probe figure measures: [`ProbeLabel`] (the label's name, classes and chance), the synthetic scenes' labels
  ([`synthetic_probe_labels`]: `dominant_color`, `dominant_shape`), [`folder_probe_label`] (`class`, the subfolder),
  and the probe recipe of `examples/pretrain.py`'s final evaluation, the Quick start's figures
  ([`synthetic_probe_datasets`], [`probe_processor`], [`random_init_encoder`], `SYNTHETIC_PROBE_*_IMAGES`,
  `PROBE_BATCH_SIZE`), which `examples/run_evaluation.py` uses by default. ([`probe_transform`] is deprecated.)
- Segmentation: the linear segmentation probe lives in `stellar_hf.segmentation`.
- Reconstruction: [`psnr`], [`ssim`] (always available), [`lpips`] and [`frechet_distance`] on Inception features
  (only with locally available network weights: [`load_lpips`], [`load_inception`] raise [`MetricUnavailable`] with
  the reason otherwise), [`ReconstructionMetrics`] to accumulate them over batches, [`train_reconstruction_probe`]
  (a fresh decoder on frozen low-rank features) and [`evaluate_reconstruction`].
- Object discovery: [`adjusted_rand_index`], [`spatial_map_segments`], [`grid_partition`],
  [`object_discovery_scores`] (FG-ARI and mean best overlap of the spatial-map segments, and of a fixed grid
  partition as the floor).

Imported by the examples and benchmarks, never by the model files. Optional dependencies (`lpips`, `torch_fidelity`,
`tqdm`) are imported inside the functions that need them.
"""

import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FEATURES = ("pooled", "cls", "dense-mean")


def select_feature(outputs, feature: str) -> torch.Tensor:
    """
    The probe feature of a [`StellarModelOutput`]: `(B, d)`.

    `pooled`: mean of the sparse tokens (the paper's choice); `cls`: the CLS token; `dense-mean`: mean patch token.
    """
    if feature == "pooled":
        return outputs.pooler_output
    if feature == "cls":
        return outputs.cls_embedding
    if feature == "dense-mean":
        return outputs.dense_features.mean(dim=1)
    raise ValueError(f"unknown feature {feature!r}; choose one of {FEATURES}")


@torch.no_grad()
def extract_features(
    model: nn.Module,
    batches: Iterable[dict],
    feature: str = "pooled",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """
    Run a frozen STELLAR encoder over `batches` of `{"pixel_values": (B, C, H, W), "labels": (B,)}`.

    Args:
        model: a `StellarModel` or any model with a `.stellar` encoder.
        feature: one of `FEATURES`.

    Returns:
        features `(num_images, d)` in float32 on the CPU, and labels `(num_images,)` (or `None` without labels).
    """
    encoder = getattr(model, "stellar", model)
    device = torch.device(device) if device is not None else next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    features, labels = [], []
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"features ({feature})", leave=False)
    for batch in batches:
        pixel_values = batch["pixel_values"].to(device)
        if dtype is not None:
            pixel_values = pixel_values.to(dtype)
        features.append(select_feature(encoder(pixel_values, return_dict=True), feature).float().cpu())
        if batch.get("labels") is not None:
            labels.append(torch.as_tensor(batch["labels"]).cpu())
    encoder.train(was_training)
    if not features:
        raise ValueError("no images to extract features from")
    return torch.cat(features), torch.cat(labels) if labels else None


def _topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    k = min(k, scores.shape[1])
    top = scores.topk(k, dim=1).indices
    return (top == labels.unsqueeze(1)).any(dim=1).float().mean().item()


@torch.no_grad()
def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int | None = None,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """
    DINO's weighted kNN: cosine similarity, the k nearest training features vote with weight exp(sim / T).

    Args:
        train_features: `(n_train, d)`; train_labels: `(n_train,)`; test_features: `(n_test, d)`.

    Returns:
        class scores `(n_test, num_classes)`.
    """
    if train_features.shape[0] == 0:
        raise ValueError("kNN needs at least one training feature")
    num_classes = num_classes or int(train_labels.max()) + 1
    k = min(k, train_features.shape[0])
    train_features = F.normalize(train_features.float(), dim=1)
    test_features = F.normalize(test_features.float(), dim=1)
    scores = []
    for start in range(0, test_features.shape[0], chunk_size):
        similarity = test_features[start : start + chunk_size] @ train_features.T
        top_similarity, top_index = similarity.topk(k, dim=1)
        votes = torch.zeros(top_index.shape[0], num_classes, device=similarity.device)
        votes.scatter_add_(1, train_labels.to(similarity.device)[top_index], (top_similarity / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (in [0, 1]) of [`knn_classify`] on labelled test features."""
    num_classes = num_classes or int(torch.cat([train_labels, test_labels]).max()) + 1
    scores = knn_classify(train_features, train_labels, test_features, num_classes, k, temperature)
    return {"top1": _topk_accuracy(scores, test_labels, 1), "top5": _topk_accuracy(scores, test_labels, 5)}


class LinearProbe(nn.Module):
    """The paper's probe head: LayerNorm + Linear, `(B, d) -> (B, num_classes)`."""

    def __init__(self, hidden_size: int, num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.linear = nn.Linear(hidden_size, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(features))


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int | None = None,
    epochs: int = 30,
    learning_rate: float = 1e-3,
    weight_decay: float = 0.0,
    batch_size: int = 256,
    seed: int = 0,
) -> dict[str, float]:
    """
    Train [`LinearProbe`] with AdamW on frozen features and report top-1 / top-5 test accuracy in [0, 1].

    Args:
        train_features: `(n_train, d)`; test_features: `(n_test, d)`; labels `(n,)` class indices.
    """
    num_classes = num_classes or int(torch.cat([train_labels, test_labels]).max()) + 1
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = LinearProbe(train_features.shape[1], num_classes)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=learning_rate, weight_decay=weight_decay)
    steps_per_epoch = max(1, -(-train_features.shape[0] // batch_size))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    train_features, test_features = train_features.float(), test_features.float()
    for _ in range(epochs):
        order = torch.randperm(train_features.shape[0], generator=generator)
        for start in range(0, order.shape[0], batch_size):
            index = order[start : start + batch_size]
            loss = F.cross_entropy(probe(train_features[index]), train_labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    with torch.no_grad():
        scores = probe(test_features)
    return {"top1": _topk_accuracy(scores, test_labels, 1), "top5": _topk_accuracy(scores, test_labels, 5)}


def majority_class_accuracy(train_labels: torch.Tensor, eval_labels: torch.Tensor) -> float:
    """Top-1 of always answering the training split's most frequent class: the floor of an imbalanced split."""
    if train_labels.numel() == 0 or eval_labels.numel() == 0:
        raise ValueError("the majority-class baseline needs labelled training and evaluation images")
    majority = torch.bincount(train_labels.long().flatten()).argmax()
    return (eval_labels.long() == majority).float().mean().item()


# ----------------------------------------------------------------------------------------------------------------------
# What a probe figure measures, and the probe recipe of the Quick start
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeLabel:
    """
    The label a kNN or linear probe predicts: every figure carries its `name`, `num_classes` and `chance`.

    Attributes:
        name: short name written with every figure (`dominant_color`, `dominant_shape`, `class`, a dataset column).
        description: one line for a reader, e.g. "class (subfolder)".
        class_names: the classes in label-index order.
        label_of: `item -> class index` for the items of the label's dataset.
    """

    name: str
    description: str
    class_names: tuple[str, ...]
    label_of: Callable[[dict], int] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def chance(self) -> float:
        """Top-1 of a uniform random guess: `1 / num_classes`."""
        return 1.0 / self.num_classes

    def describe(self) -> dict:
        """`{"label", "label_description", "num_classes", "chance"}`: what to write next to a figure."""
        return {
            "label": self.name,
            "label_description": self.description,
            "num_classes": self.num_classes,
            "chance": self.chance,
        }


def dominant_color_label(item: dict) -> int:
    """A synthetic scene's label `dominant_color`: the colour (index into `COLOR_NAMES`) of its largest object."""
    return int(item["colors"][item["dominant_id"] - 1])


def dominant_shape_label(item: dict) -> int:
    """A synthetic scene's label `dominant_shape`: the shape (index into `CLASS_NAMES`) of its largest object."""
    return int(item["label"])


def class_label(item: dict) -> int:
    """An image folder item's label `class`: the index of its class subfolder."""
    return int(item["label"])


# The labels of the synthetic scenes, in the order the Quick start reports them; colour is its headline figure
# (a short CPU run learns it; shape stays near chance at that budget).
SYNTHETIC_LABEL_NAMES = ("dominant_color", "dominant_shape")
DEFAULT_SYNTHETIC_LABEL = "dominant_color"
# The probe recipe of `examples/pretrain.py`'s final evaluation on the synthetic scenes (the Quick start's figures):
# the first `min(--num_synthetic_images, 2048)` scenes of the "train" split to fit on, 1024 (its
# `--num_synthetic_eval_images`) of the "validation" split to evaluate on, rendered at the model's size, base seed 0;
# features of the pooled sparse tokens in batches of 128; kNN k=20, T=0.07; linear probe 30 epochs, AdamW lr 1e-3,
# no weight decay, batches of 256, seed 0 (the defaults of `knn_accuracy` and `linear_probe`).
SYNTHETIC_PROBE_TRAIN_IMAGES = 2048
SYNTHETIC_PROBE_EVAL_IMAGES = 1024
SYNTHETIC_PROBE_SEED = 0
PROBE_BATCH_SIZE = 128
LINEAR_PROBE_EPOCHS = 30


def synthetic_probe_labels() -> dict[str, ProbeLabel]:
    """`{name: ProbeLabel}` of the synthetic scenes: `dominant_color` (8 colours) and `dominant_shape` (6 shapes)."""
    from .data import CLASS_NAMES, COLOR_NAMES

    return {
        "dominant_color": ProbeLabel(
            "dominant_color",
            "colour of each scene's dominant (largest) object",
            tuple(COLOR_NAMES),
            dominant_color_label,
        ),
        "dominant_shape": ProbeLabel(
            "dominant_shape",
            "shape of each scene's dominant (largest) object",
            tuple(CLASS_NAMES),
            dominant_shape_label,
        ),
    }


def folder_probe_label(class_names: Sequence[str]) -> ProbeLabel:
    """The label `class` of an image folder with one subfolder per class."""
    return ProbeLabel("class", "class (subfolder)", tuple(class_names), class_label)


def synthetic_probe_datasets(
    image_size: int,
    num_train_images: int = SYNTHETIC_PROBE_TRAIN_IMAGES,
    num_eval_images: int = SYNTHETIC_PROBE_EVAL_IMAGES,
    seed: int = SYNTHETIC_PROBE_SEED,
):
    """
    The probes' `(train, eval)` synthetic scenes: the "train" and "validation" splits (separate seed streams) at
    `image_size`, as `stellar_hf.data.SyntheticScenes`.
    """
    from .data import SyntheticScenes

    train = SyntheticScenes(num_images=num_train_images, image_size=image_size, split="train", seed=seed)
    evaluation = SyntheticScenes(num_images=num_eval_images, image_size=image_size, split="validation", seed=seed)
    return train, evaluation


def probe_processor(config, do_normalize: bool = True):
    """
    The probes' image processor: a `StellarImageProcessor` (torchvision backend) that resizes the shorter side to
    `config.image_size` and centre-crops `config.image_size` square (synthetic scenes, rendered at that size, pass
    unchanged: no 256 / 224 enlargement), then normalises with the config's mean and std.

    Call it as `probe_processor(config)(list_of_pil_images, return_tensors="pt")["pixel_values"]`:
    `(B, 3, S, S)`; with `do_normalize=False` the pixels stay on the [0, 1] scale.
    """
    from .image_processing_stellar import StellarImageProcessor

    size = config.image_size
    return StellarImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(config.image_mean),
        image_std=list(config.image_std),
        do_normalize=do_normalize,
    )


def probe_transform(image_size: int):
    """
    Deprecated: use [`probe_processor`] (`probe_processor(config)(images, return_tensors="pt")["pixel_values"]`).

    The probes' former preprocessing of synthetic scenes, `EvalTransform(image_size, resize_size=image_size)`
    (pixels in [0, 1], not normalised).
    """
    import warnings

    from .data import EvalTransform

    warnings.warn(
        "`stellar_hf.evaluation.probe_transform` is deprecated and will be removed in a future version: use "
        "`stellar_hf.evaluation.probe_processor(config)` (a StellarImageProcessor; pass do_normalize=False for "
        "[0, 1] pixels)",
        FutureWarning,
        stacklevel=2,
    )
    return EvalTransform(image_size, resize_size=image_size)


def random_init_encoder(config, seed: int = 0) -> nn.Module:
    """
    The reference every trained figure is read against: a `StellarModel(config)` as initialised under
    `torch.manual_seed(seed)` (the global RNG state is restored afterwards), in eval mode on the CPU.
    """
    from .modeling_stellar import StellarModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = StellarModel(config)
    return encoder.eval()


# ----------------------------------------------------------------------------------------------------------------------
# Reconstruction metrics
# ----------------------------------------------------------------------------------------------------------------------


class MetricUnavailable(RuntimeError):
    """A metric cannot be computed here: a package or its network weights are missing. `str(error)` says which."""


def _check_image_pair(prediction: torch.Tensor, target: torch.Tensor) -> None:
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
    if prediction.ndim != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(prediction.shape)}")


def _precise(tensor: torch.Tensor) -> torch.Tensor:
    """float64 where the device has it (MPS does not: float32 there)."""
    return tensor.float() if tensor.device.type == "mps" else tensor.double()


def psnr(prediction: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """
    Peak signal-to-noise ratio per image: `10 log10(data_range^2 / MSE)`, in dB.

    Args:
        prediction, target: `(B, C, H, W)` on a `[0, data_range]` scale (clamp raw reconstructions first).

    Returns:
        `(B,)` float64 (float32 on MPS); `inf` where an image is reproduced exactly.
    """
    _check_image_pair(prediction, target)
    mse = (_precise(prediction) - _precise(target)).pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    coordinates = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    window = torch.exp(-(coordinates**2) / (2 * sigma**2))
    return window / window.sum()


def ssim(
    prediction: torch.Tensor,
    target: torch.Tensor,
    data_range: float = 1.0,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """
    Structural similarity per image (Wang et al. 2004): Gaussian-weighted local statistics (population covariance)
    over every position where the `window_size` window fits, averaged over positions and channels.

    Matches `skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=1, channel_axis=0)`, which filters the whole image and then drops the
    border the window does not cover.

    Args:
        prediction, target: `(B, C, H, W)` on a `[0, data_range]` scale; H and W at least `window_size`.

    Returns:
        `(B,)` float64 (float32 on MPS) in [-1, 1]; 1 for identical images.
    """
    _check_image_pair(prediction, target)
    if min(prediction.shape[-2:]) < window_size:
        raise ValueError(
            f"SSIM needs images of at least {window_size}x{window_size} pixels, got {tuple(prediction.shape[-2:])}"
        )
    x, y = _precise(prediction), _precise(target)
    channels = x.shape[1]
    window = _gaussian_window(window_size, sigma, x.dtype, x.device)
    # Separable filter, "valid" positions only; channels filtered independently.
    rows = window.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)
    columns = window.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)

    def blur(image: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(image, rows, groups=channels), columns, groups=channels)

    mean_x, mean_y = blur(x), blur(y)
    variance_x = blur(x * x) - mean_x**2
    variance_y = blur(y * y) - mean_y**2
    covariance = blur(x * y) - mean_x * mean_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    numerator = (2 * mean_x * mean_y + c1) * (2 * covariance + c2)
    denominator = (mean_x**2 + mean_y**2 + c1) * (variance_x + variance_y + c2)
    return (numerator / denominator).flatten(1).mean(dim=1)


LPIPS_NETS = ("alex", "vgg", "squeeze")


def _torchvision_weights_url(net: str) -> str:
    from torchvision import models

    weights = {
        "alex": models.AlexNet_Weights.IMAGENET1K_V1,
        "vgg": models.VGG16_Weights.IMAGENET1K_V1,
        "squeeze": models.SqueezeNet1_1_Weights.IMAGENET1K_V1,
    }
    return weights[net].url


def hub_cache_file(url: str) -> Path:
    """Where `torch.hub.load_state_dict_from_url(url)` keeps its download: `<torch hub dir>/checkpoints/<file>`."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def load_lpips(
    net: str = "alex", backbone_weights: str | os.PathLike | None = None, device: torch.device | str | None = None
) -> nn.Module:
    """
    An `lpips.LPIPS` network built without network access.

    The `lpips` package ships its calibrated linear layers in the wheel (`lpips/weights/v0.1/<net>.pth`), but takes
    the ImageNet backbone (AlexNet for `net="alex"`, the paper's LPIPS) from torchvision, which downloads it. Here the
    backbone comes from `backbone_weights` (a torchvision state dict, e.g. `alexnet-owt-7be5be79.pth`), else from the
    torch hub cache (`<torch hub dir>/checkpoints/`, where torchvision would have saved it), else nothing is built.

    Returns:
        the network in eval mode on `device`; call it as `model(a, b, normalize=True)` on images in [0, 1].

    Raises:
        MetricUnavailable: `lpips` is not installed, or the linear layers or the backbone weights are not on disk.
        ValueError: `backbone_weights` is not a state dict of the `net` backbone.
    """
    if net not in LPIPS_NETS:
        raise ValueError(f"unknown LPIPS network {net!r}; choose one of {LPIPS_NETS}")
    try:
        import lpips as lpips_package
    except ImportError as error:
        raise MetricUnavailable(f"LPIPS needs the `lpips` package (pip install lpips): {error}") from error
    linear_weights = Path(lpips_package.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    if not linear_weights.is_file():
        raise MetricUnavailable(f"LPIPS: the lpips package has no linear-layer weights at {linear_weights}")
    url = _torchvision_weights_url(net)
    if backbone_weights is not None:
        backbone_path = Path(backbone_weights)
        if not backbone_path.is_file():
            raise MetricUnavailable(f"LPIPS: backbone weights {backbone_path} do not exist")
    else:
        backbone_path = hub_cache_file(url)
        if not backbone_path.is_file():
            raise MetricUnavailable(
                f"LPIPS ({net}) needs torchvision's ImageNet {net} backbone, which is not available offline: it is not "
                f"in the torch hub cache ({backbone_path}) and no weights path was given. Download {url} on a machine "
                "with network access and pass its path (--lpips_weights), or copy it into that cache folder."
            )
    import warnings

    with warnings.catch_warnings():
        # lpips passes torchvision's deprecated `pretrained=` argument; with pnet_rand=True nothing is downloaded.
        warnings.simplefilter("ignore", UserWarning)
        model = lpips_package.LPIPS(
            net=net, pretrained=True, pnet_rand=True, model_path=str(linear_weights), verbose=False
        )
    state_dict = torch.load(backbone_path, map_location="cpu", weights_only=True)
    if isinstance(state_dict, dict) and "state_dict" in state_dict:
        state_dict = state_dict["state_dict"]
    # lpips splits torchvision's `features` Sequential into slices that keep the original indices as child names:
    # `net.slice2.3.weight` is torchvision's `features.3.weight`.
    backbone = {}
    missing = []
    for slice_name, block in model.net.named_children():
        for key in block.state_dict():
            source = f"features.{key}"
            if source in state_dict:
                backbone[f"{slice_name}.{key}"] = state_dict[source]
            else:
                missing.append(source)
    if missing:
        raise ValueError(
            f"{backbone_path} is not a torchvision {net} state dict: missing {', '.join(missing[:5])}"
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        )
    model.net.load_state_dict(backbone, strict=True)
    model.requires_grad_(False)
    return model.eval().to(device or "cpu")


@torch.no_grad()
def lpips(
    prediction: torch.Tensor,
    target: torch.Tensor,
    model: nn.Module | None = None,
    net: str = "alex",
    backbone_weights: str | os.PathLike | None = None,
) -> torch.Tensor:
    """
    LPIPS distance per image (lower is closer), with `model` from [`load_lpips`] or one loaded here.

    Args:
        prediction, target: `(B, 3, H, W)` in [0, 1].

    Returns:
        `(B,)` float32 on the CPU.

    Raises:
        MetricUnavailable: see [`load_lpips`].
    """
    _check_image_pair(prediction, target)
    model = model if model is not None else load_lpips(net, backbone_weights)
    device = next(model.parameters()).device
    distance = model(prediction.float().to(device), target.float().to(device), normalize=True)
    return distance.flatten().float().cpu()


def load_inception(weights: str | os.PathLike | None = None, device: torch.device | str | None = None) -> nn.Module:
    """
    The FID Inception-V3 feature extractor of `torch-fidelity` (the network torchmetrics' FID uses too), built offline.

    Weights come from `weights` (torch-fidelity's `weights-inception-2015-12-05-6726825d.pth`), else from the torch
    hub cache where torch-fidelity would have downloaded them.

    Returns:
        a module mapping uint8 images `(B, 3, H, W)` to a 1-tuple of pool features `(B, 2048)`.

    Raises:
        MetricUnavailable: `torch-fidelity` is not installed or the weights are not on disk.
    """
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
    except ImportError as error:
        raise MetricUnavailable(
            "rFID needs the Inception network of `torch-fidelity` (pip install torch-fidelity; torchmetrics' FID uses "
            f"the same package): {error}"
        ) from error
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise MetricUnavailable(f"rFID: Inception weights {path} do not exist")
    else:
        path = hub_cache_file(URL_INCEPTION_V3)
        if not path.is_file():
            raise MetricUnavailable(
                "rFID needs the FID Inception-V3 weights, which are not available offline: they are not in the torch "
                f"hub cache ({path}) and no weights path was given. Download {URL_INCEPTION_V3} on a machine with "
                "network access and pass its path (--inception_weights), or copy it into that cache folder."
            )
    extractor = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    return extractor.eval().to(device or "cpu")


@torch.no_grad()
def inception_features(images: torch.Tensor, extractor: nn.Module) -> torch.Tensor:
    """Pool features `(B, 2048)` (float64, CPU) of images `(B, 3, H, W)` in [0, 1], quantised to 8 bits first."""
    device = next(extractor.parameters()).device
    quantised = (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return extractor(quantised.to(device))[0].double().cpu()


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """
    Fréchet distance between Gaussians fitted to two feature sets `(n_a, D)` and `(n_b, D)`:
    `|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))`, in float64.

    The trace of the matrix square root is the sum of square roots of the eigenvalues of `S_a^(1/2) S_b S_a^(1/2)`
    (symmetric, so `eigh` is stable). With fewer samples than dimensions the covariances are rank-deficient and the
    value is biased upwards: FID is comparable only at equal sample counts (the paper uses 50k images).
    """
    if features_a.shape[0] < 2 or features_b.shape[0] < 2:
        raise ValueError("the Fréchet distance needs at least two samples per set")
    a = features_a.double().cpu().numpy()
    b = features_b.double().cpu().numpy()
    mean_a, mean_b = a.mean(axis=0), b.mean(axis=0)
    covariance_a, covariance_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance_a)
    root_a = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T
    product = root_a @ covariance_b @ root_a
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh((product + product.T) / 2), 0, None)).sum()
    distance = ((mean_a - mean_b) ** 2).sum() + np.trace(covariance_a) + np.trace(covariance_b) - 2 * trace_root
    return float(max(distance, 0.0))


class ReconstructionMetrics:
    """
    Accumulates reconstruction metrics over batches: PSNR and SSIM always, LPIPS and rFID when their networks are
    given (see [`build_reconstruction_metrics`]).

    `update(prediction, target)` with `(B, 3, H, W)` images in [0, 1]; `compute()` returns the means over all
    images: `psnr` (dB, mean of per-image values), `ssim`, and `lpips` / `rfid` where available.
    """

    def __init__(self, lpips_model: nn.Module | None = None, inception: nn.Module | None = None):
        self.lpips_model = lpips_model
        self.inception = inception
        self.reset()

    def reset(self) -> None:
        self.values = {"psnr": [], "ssim": []}
        if self.lpips_model is not None:
            self.values["lpips"] = []
        self.real_features, self.fake_features = [], []

    @torch.no_grad()
    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        prediction, target = prediction.detach().float(), target.detach().float()
        self.values["psnr"].append(psnr(prediction, target).cpu())
        self.values["ssim"].append(ssim(prediction, target).cpu())
        if self.lpips_model is not None:
            self.values["lpips"].append(lpips(prediction, target, model=self.lpips_model))
        if self.inception is not None:
            self.fake_features.append(inception_features(prediction, self.inception))
            self.real_features.append(inception_features(target, self.inception))

    @property
    def num_images(self) -> int:
        return sum(len(value) for value in self.values["psnr"])

    def compute(self) -> dict[str, float]:
        if not self.num_images:
            raise ValueError("no images were added to the reconstruction metrics")
        results = {name: torch.cat(chunks).double().mean().item() for name, chunks in self.values.items()}
        if self.inception is not None:
            results["rfid"] = frechet_distance(torch.cat(self.real_features), torch.cat(self.fake_features))
        return results


def build_reconstruction_metrics(
    lpips_net: str | None = "alex",
    lpips_weights: str | os.PathLike | None = None,
    inception_weights: str | os.PathLike | None = None,
    compute_rfid: bool = True,
    device: torch.device | str | None = None,
) -> tuple[ReconstructionMetrics, dict[str, str]]:
    """
    A [`ReconstructionMetrics`] with every metric whose network loads offline here.

    Args:
        lpips_net: backbone of LPIPS (`None` skips LPIPS); lpips_weights / inception_weights: local weight files,
            else the torch hub cache is searched; compute_rfid: `False` skips rFID.

    Returns:
        the accumulator and `skipped`: `{metric name: reason}` for LPIPS / rFID when unavailable.
    """
    skipped = {}
    lpips_model = inception = None
    if lpips_net is None:
        skipped["lpips"] = "not requested"
    else:
        try:
            lpips_model = load_lpips(lpips_net, lpips_weights, device)
        except MetricUnavailable as error:
            skipped["lpips"] = str(error)
    if not compute_rfid:
        skipped["rfid"] = "not requested"
    else:
        try:
            inception = load_inception(inception_weights, device)
        except MetricUnavailable as error:
            skipped["rfid"] = str(error)
    return ReconstructionMetrics(lpips_model, inception), skipped


def _iterate_forever(batches: Iterable[dict]) -> Iterator[dict]:
    """Yield from `batches` again and again (a fresh pass each time, unlike `itertools.cycle`, which caches)."""
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise ValueError("no batches to train on")


def reinitialize_reconstruction_modules(model: nn.Module, seed: int | None = None) -> None:
    """
    Replace `model.decoder` and `model.reconstruction_head` by freshly initialised ones (the paper's reconstruction
    probe starts from scratch); the encoder and an attached VQ tokenizer are kept.
    """
    from .modeling_stellar import StellarDecoder, reconstruction_head_for

    device, dtype = next(model.decoder.parameters()).device, next(model.decoder.parameters()).dtype
    # The new modules are built on the CPU, so only the CPU generator needs forking.
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model.decoder = StellarDecoder(model.config)
        model.reconstruction_head = reconstruction_head_for(model.config)
        # Fresh tensors carry no `_is_hf_initialized` flag, so `_init_weights` initialises them as in `post_init`.
        model.decoder.apply(model._init_weights)
        model.reconstruction_head.apply(model._init_weights)
    model.decoder.to(device=device, dtype=dtype)
    model.reconstruction_head.to(device=device, dtype=dtype)


def train_reconstruction_probe(
    model: nn.Module,
    batches: Iterable[dict],
    steps: int,
    learning_rate: float = 5e-4,
    weight_decay: float = 0.05,
    reinitialize: bool = True,
    vq_tokenizer=None,
    device: torch.device | str | None = None,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, float]:
    """
    The paper's reconstruction probe: train a decoder and head on the frozen encoder's `lowrank_features`.

    The encoder and factorization (`model.stellar`) are frozen and run without gradients; the decoder and
    reconstruction head are re-initialised (`reinitialize=True`) and trained with AdamW and a cosine schedule on the
    model's own reconstruction loss: MSE against the un-normalised image for the pixel target, cross-entropy against
    the VQGAN codes for the VQ target (needs a tokenizer: `vq_tokenizer`, an attached one or the config's).

    Args:
        model: a `StellarForImageReconstruction` (or `StellarForPreTraining`), updated in place.
        batches: re-iterable, of `{"pixel_values": (B, C, H, W)}` normalised images.
        steps: optimiser steps.

    Returns:
        `{"steps", "initial_loss", "final_loss"}` (final: mean of the last 10% of steps).
    """
    from .modeling_stellar import grid_size_of

    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    if reinitialize:
        reinitialize_reconstruction_modules(model, seed)
    if model.config.reconstruction_target == "vq" and model.load_vq_tokenizer(vq_tokenizer) is None:
        raise ValueError("training a VQ-target decoder needs the MaskGIT VQGAN tokenizer to make its targets")
    model.stellar.requires_grad_(False).eval()
    trainable = [*model.decoder.parameters(), *model.reconstruction_head.parameters()]
    for parameter in trainable:
        parameter.requires_grad_(True)
    model.decoder.train()
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    losses = []
    iterator = _iterate_forever(batches)
    step_range = range(steps)
    if progress:
        from tqdm.auto import tqdm

        step_range = tqdm(step_range, desc="reconstruction probe", leave=False)
    for _ in step_range:
        pixel_values = next(iterator)["pixel_values"].to(device)
        with torch.no_grad():
            lowrank_features = model.stellar(pixel_values, return_dict=True).lowrank_features
        prediction = model.decode_lowrank(lowrank_features, grid_size_of(pixel_values, model.config.patch_size))
        loss = model.reconstruction_loss(prediction, pixel_values)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if progress:
            step_range.set_postfix(loss=f"{losses[-1]:.4f}")
    model.eval()
    tail = losses[-max(1, steps // 10) :]
    return {"steps": steps, "initial_loss": losses[0], "final_loss": float(np.mean(tail))}


@torch.no_grad()
def evaluate_reconstruction(
    model: nn.Module,
    batches: Iterable[dict],
    metrics: ReconstructionMetrics | None = None,
    vq_tokenizer=None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """
    Reconstruct every image of `batches` (`{"pixel_values"}`, normalised) and score it against the un-normalised
    input. Reconstructions are clamped to [0, 1] (the pixel head's output is raw); a VQ reconstruction at another
    size than the input (14-px patches decode at 256 px) is compared with the input resized to its size.

    Returns:
        `metrics.compute()` plus `num_images`.
    """
    from .modeling_stellar import grid_size_of, unnormalize

    metrics = metrics if metrics is not None else ReconstructionMetrics()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    if model.config.reconstruction_target == "vq" and model.load_vq_tokenizer(vq_tokenizer) is None:
        raise ValueError("VQ-target reconstructions need the MaskGIT VQGAN tokenizer to decode codes to pixels")
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="reconstruction", leave=False)
    for batch in batches:
        pixel_values = batch["pixel_values"].to(device)
        lowrank_features = model.stellar(pixel_values, return_dict=True).lowrank_features
        grid_size = grid_size_of(pixel_values, model.config.patch_size)
        reconstruction = model.reconstruct(lowrank_features=lowrank_features, grid_size=grid_size)
        target = unnormalize(pixel_values.float(), model.config).clamp(0, 1)
        if reconstruction.shape[-2:] != target.shape[-2:]:
            target = F.interpolate(target, size=reconstruction.shape[-2:], mode="bicubic", antialias=True)
        metrics.update(reconstruction.float().clamp(0, 1), target.clamp(0, 1))
    return {**metrics.compute(), "num_images": metrics.num_images}


# ----------------------------------------------------------------------------------------------------------------------
# Object discovery
# ----------------------------------------------------------------------------------------------------------------------


def adjusted_rand_index(labels_true, labels_pred) -> float:
    """
    Adjusted Rand index of two labelings of the same items (Hubert & Arabie), as `sklearn.metrics.adjusted_rand_score`:
    1 for identical partitions (up to renaming), about 0 for independent ones.

    Args:
        labels_true, labels_pred: 1-D integer arrays or tensors of equal length.
    """
    labels_true = np.asarray(torch.as_tensor(labels_true).cpu()).ravel()
    labels_pred = np.asarray(torch.as_tensor(labels_pred).cpu()).ravel()
    if labels_true.shape != labels_pred.shape:
        raise ValueError(f"labelings differ in length: {labels_true.shape[0]} and {labels_pred.shape[0]}")
    n = labels_true.shape[0]
    if n < 2:
        return 1.0
    _, true_index = np.unique(labels_true, return_inverse=True)
    _, pred_index = np.unique(labels_pred, return_inverse=True)
    num_pred = int(pred_index.max()) + 1
    contingency = np.bincount(true_index * num_pred + pred_index, minlength=(int(true_index.max()) + 1) * num_pred)
    # Pair counts in float64: products of pair counts overflow int64 for images of a few hundred pixels a side.
    contingency = contingency.astype(np.float64)
    rows = contingency.reshape(-1, num_pred).sum(axis=1)
    columns = contingency.reshape(-1, num_pred).sum(axis=0)
    index = (contingency * (contingency - 1) / 2).sum()
    sum_rows = (rows * (rows - 1) / 2).sum()
    sum_columns = (columns * (columns - 1) / 2).sum()
    expected = sum_rows * sum_columns / (n * (n - 1) / 2)
    maximum = (sum_rows + sum_columns) / 2
    if maximum == expected:
        # Both labelings put everything in one cluster, or every item in its own: identical partitions.
        return 1.0
    return float((index - expected) / (maximum - expected))


def _upsample_segments(segments: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`(B, h, w)` integer segments -> `(B, H, W)` with nearest-neighbour upsampling."""
    if tuple(segments.shape[-2:]) == tuple(size):
        return segments.long()
    return F.interpolate(segments[:, None].float(), size=size, mode="nearest")[:, 0].long()


def spatial_map_segments(
    spatial_map: torch.Tensor, grid_size: tuple[int, int], image_size: tuple[int, int] | None = None
) -> torch.Tensor:
    """
    Hard segments of the spatial map: each patch goes to its argmax sparse token.

    Args:
        spatial_map: `(B, N, r)` with `N = h * w` patches in row-major order.
        grid_size: `(h, w)`; image_size: `(H, W)` to upsample to (nearest), or `None` for the patch grid.

    Returns:
        `(B, h, w)` or `(B, H, W)` token indices in `[0, r)`.
    """
    height, width = grid_size
    if spatial_map.ndim != 3 or spatial_map.shape[1] != height * width:
        raise ValueError(f"spatial_map of shape {tuple(spatial_map.shape)} does not fit a {height}x{width} grid")
    segments = spatial_map.argmax(dim=-1).view(-1, height, width)
    return segments if image_size is None else _upsample_segments(segments, image_size)


def grid_blocks(num_segments: int, grid_size: tuple[int, int]) -> tuple[int, int]:
    """
    `(rows, columns)` of [`grid_partition`]: the most square factorisation of `num_segments` (4 x 4 for 16,
    2 x 3 for 6), with more blocks along the longer side of the `(h, w)` grid.
    """
    if num_segments < 1:
        raise ValueError(f"num_segments must be positive, got {num_segments}")
    rows = max(divisor for divisor in range(1, math.isqrt(num_segments) + 1) if num_segments % divisor == 0)
    columns = num_segments // rows
    height, width = grid_size
    return (columns, rows) if width < height else (rows, columns)


def grid_partition(num_segments: int, grid_size: tuple[int, int]) -> torch.Tensor:
    """
    A fixed partition of the `(h, w)` patch grid into `num_segments` rectangular blocks ([`grid_blocks`]): the
    content-blind baseline of object discovery.

    Returns:
        `(h, w)` block indices in `[0, num_segments)` (some may be empty when the grid is smaller than the blocks).
    """
    rows, columns = grid_blocks(num_segments, grid_size)
    height, width = grid_size
    row_block = torch.arange(height) * rows // height
    column_block = torch.arange(width) * columns // width
    return row_block[:, None] * columns + column_block[None, :]


def _best_overlap(mask: torch.Tensor, segments: torch.Tensor) -> float:
    """Mean over the objects of `mask` (ids > 0) of the best IoU with any segment; NaN without objects."""
    object_ids = torch.unique(mask)
    object_ids = object_ids[object_ids > 0]
    if object_ids.numel() == 0:
        return float("nan")
    _, segment_index = torch.unique(segments.flatten(), return_inverse=True)
    num_segments = int(segment_index.max()) + 1
    mask_values, mask_index = torch.unique(mask.flatten(), return_inverse=True)
    joint = torch.bincount(mask_index * num_segments + segment_index, minlength=mask_values.numel() * num_segments)
    intersection = joint.view(mask_values.numel(), num_segments).double()
    union = intersection.sum(dim=1, keepdim=True) + intersection.sum(dim=0, keepdim=True) - intersection
    iou = intersection / union
    return iou[mask_values > 0].max(dim=1).values.mean().item()


def _segmentation_scores(masks: torch.Tensor, segments: torch.Tensor) -> tuple[list[float], list[float]]:
    fg_ari, best_overlap = [], []
    for mask, segment in zip(masks, segments):
        foreground = mask > 0
        fg_ari.append(adjusted_rand_index(mask[foreground], segment[foreground]) if foreground.any() else float("nan"))
        best_overlap.append(_best_overlap(mask, segment))
    return fg_ari, best_overlap


def _nanmean(values: list[float]) -> float:
    finite = [value for value in values if not math.isnan(value)]
    return float(np.mean(finite)) if finite else float("nan")


@torch.no_grad()
def object_discovery_scores(
    spatial_map: torch.Tensor, grid_size: tuple[int, int], masks: torch.Tensor, per_image: bool = False
) -> dict:
    """
    How well the spatial map's hard segments find the objects of instance masks, and the same for a fixed grid.

    Segments: each patch's argmax token ([`spatial_map_segments`]), upsampled to the mask with nearest neighbours.
    - `fg_ari`: adjusted Rand index between the true objects and the segments over foreground pixels only (how
      consistently each object is kept in one segment and apart from the others; background is ignored).
      Single-object images score 1 only when the whole object lies in one segment, 0 otherwise.
    - `mbo`: mean best overlap: for each true object, the best IoU with any segment (over the whole image), averaged
      over the image's objects.
    - `grid_fg_ari`, `grid_mbo`: the same for [`grid_partition`] into r blocks, the floor a content-blind partition
      reaches.
    Images without foreground are left out of the means.

    Args:
        spatial_map: `(B, N, r)`; grid_size: `(h, w)` with `h * w = N`; masks: `(B, H, W)` integer instance ids,
            0 for background.
        per_image: also return the lists of per-image values under `"per_image"`.

    Returns:
        `{"fg_ari", "mbo", "grid_fg_ari", "grid_mbo", "num_images"}` (means over the images with objects).
    """
    masks = torch.as_tensor(masks).cpu().long()
    if masks.ndim != 3 or masks.shape[0] != spatial_map.shape[0]:
        raise ValueError(f"masks must be (B, H, W) for {spatial_map.shape[0]} images, got {tuple(masks.shape)}")
    image_size = tuple(masks.shape[-2:])
    segments = spatial_map_segments(spatial_map.float().cpu(), grid_size, image_size)
    grid = grid_partition(spatial_map.shape[-1], grid_size)
    grid_segments = _upsample_segments(grid[None], image_size).expand_as(masks)
    fg_ari, mbo = _segmentation_scores(masks, segments)
    grid_fg_ari, grid_mbo = _segmentation_scores(masks, grid_segments)
    values = {"fg_ari": fg_ari, "mbo": mbo, "grid_fg_ari": grid_fg_ari, "grid_mbo": grid_mbo}
    results = {name: _nanmean(value) for name, value in values.items()}
    results["num_images"] = sum(not math.isnan(value) for value in mbo)
    if per_image:
        results["per_image"] = values
    return results


@torch.no_grad()
def evaluate_object_discovery(
    model: nn.Module,
    batches: Iterable[dict],
    device: torch.device | str | None = None,
    progress: bool = False,
) -> dict:
    """
    [`object_discovery_scores`] over batches of `{"pixel_values": (B, C, H, W), "masks": (B, H', W')}`, averaged
    over all images. The masks must cover the same field of view as the pixels (any resolution).
    """
    encoder = getattr(model, "stellar", model)
    device = torch.device(device) if device is not None else next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="object discovery", leave=False)
    values = {"fg_ari": [], "mbo": [], "grid_fg_ari": [], "grid_mbo": []}
    for batch in batches:
        if batch.get("masks") is None:
            raise ValueError("object discovery needs per-pixel instance masks in every batch (key 'masks')")
        pixel_values = batch["pixel_values"].to(device)
        spatial_map = encoder(pixel_values, return_dict=True).spatial_map
        patch_size = encoder.config.patch_size
        grid_size = (pixel_values.shape[-2] // patch_size, pixel_values.shape[-1] // patch_size)
        scores = object_discovery_scores(spatial_map, grid_size, batch["masks"], per_image=True)
        for name, per_image in scores["per_image"].items():
            values[name].extend(per_image)
    encoder.train(was_training)
    results = {name: _nanmean(value) for name, value in values.items()}
    results["num_images"] = sum(not math.isnan(value) for value in values["mbo"])
    if not results["num_images"]:
        raise ValueError("no image with a foreground object to evaluate object discovery on")
    return results


__all__ = [
    "DEFAULT_SYNTHETIC_LABEL",
    "FEATURES",
    "LINEAR_PROBE_EPOCHS",
    "LPIPS_NETS",
    "PROBE_BATCH_SIZE",
    "SYNTHETIC_LABEL_NAMES",
    "SYNTHETIC_PROBE_EVAL_IMAGES",
    "SYNTHETIC_PROBE_SEED",
    "SYNTHETIC_PROBE_TRAIN_IMAGES",
    "LinearProbe",
    "MetricUnavailable",
    "ProbeLabel",
    "ReconstructionMetrics",
    "adjusted_rand_index",
    "build_reconstruction_metrics",
    "class_label",
    "dominant_color_label",
    "dominant_shape_label",
    "evaluate_object_discovery",
    "evaluate_reconstruction",
    "extract_features",
    "folder_probe_label",
    "frechet_distance",
    "grid_blocks",
    "grid_partition",
    "hub_cache_file",
    "inception_features",
    "knn_accuracy",
    "knn_classify",
    "linear_probe",
    "load_inception",
    "load_lpips",
    "lpips",
    "majority_class_accuracy",
    "object_discovery_scores",
    "probe_processor",
    "probe_transform",
    "psnr",
    "random_init_encoder",
    "reinitialize_reconstruction_modules",
    "select_feature",
    "spatial_map_segments",
    "ssim",
    "synthetic_probe_datasets",
    "synthetic_probe_labels",
    "train_reconstruction_probe",
]
