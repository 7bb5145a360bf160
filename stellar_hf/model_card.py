"""Fill the STELLAR model card template (`MODEL_CARD.md`) for one checkpoint.

A checkpoint made by a training run is described by a `TrainingRun` (what the run was: data, steps, settings, time,
measured probe figures next to their baselines, the figures it drew); everything about sizes, the reconstruction
target and the preprocessing is read from the model's config and image processor, never typed in:

    from stellar_hf.model_card import ProbeResults, TrainingRun, render_model_card
    run = TrainingRun(data="built-in synthetic scenes (8192 images, 48 px)", steps=450, global_batch_size=64,
                      learning_rate=1e-3, probes=ProbeResults.from_pretrain_results(results, "held-out synthetic scenes"),
                      figures=["images/reconstructions_final.png", "images/spatial_maps_final.png"])
    text = render_model_card(config, run=run, model_id="me/stellar-small-synthetic")

A converted release is rendered from free text and the paper's numbers instead:

    from stellar_hf.model_card import render_model_card, PAPER_RESULTS, IMAGENET_1K
    text = render_model_card(config, model_id="me/stellar-b16", datasets=[IMAGENET_1K],
                             results=PAPER_RESULTS["stellar-b16"])

The code snippets of the card are generated here for the checkpoint at hand (its Hub id, image size, token count,
pixel or VQ target) and form one Python session that runs as written, in order, given an image file `photo.jpg`
(`tests/test_model_card.py` executes them against saved models). The template (`MODEL_CARD.md` at the repository root,
reached through the `stellar_hf/MODEL_CARD.md` symlink, shipped as package data) therefore holds no code block of
its own but the citation. The filled card's YAML header is rebuilt from Python values and checked with
`huggingface_hub.ModelCard`, so what this returns always parses on the Hub; `model-index` lists only measured numbers
on Hub datasets. Not imported by `stellar_hf/__init__.py` and never needed by the model files.
"""

import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard
from huggingface_hub.repocard_data import eval_results_to_model_index
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .configuration_stellar import StellarConfig

TEMPLATE_PATH = Path(__file__).with_name("MODEL_CARD.md")
PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
IMAGENET_1K = "ILSVRC/imagenet-1k"
# The image file every snippet reads from the working directory.
EXAMPLE_IMAGE = "photo.jpg"
_REQUIRED_RESULT_KEYS = ("task", "dataset", "metric", "value")
_OPTIONAL_RESULT_KEYS = {
    "split", "name", "task_name", "dataset_name", "dataset_config", "source_name", "source_url", "verified",
}  # fmt: skip
_BACKBONE_NAMES = {384: "ViT-S", 768: "ViT-B", 1024: "ViT-L", 1280: "ViT-H"}
_UNSET: Any = object()

_PAPER = {"source_name": "STELLAR paper (Zhao et al., 2026), original implementation", "source_url": "https://arxiv.org/abs/2602.01905"}  # fmt: skip
_IMAGENET = {"dataset": IMAGENET_1K, "dataset_name": "ImageNet-1k", "split": "validation"}


def _paper_results(linear: float, knn: float, fid: float, lpips: float) -> list[dict[str, Any]]:
    classification = {"task": "image-classification", "task_name": "Frozen-feature classification", **_IMAGENET}
    reconstruction = {"task": "image-to-image", "task_name": "Reconstruction probe", **_IMAGENET}
    return [
        {**classification, "metric": "accuracy", "name": "Linear probe top-1 (%)", "value": linear, **_PAPER},
        {**classification, "metric": "accuracy", "name": "kNN top-1 (%), k=20", "value": knn, **_PAPER},
        {**reconstruction, "metric": "fid", "name": "rFID (50k val)", "value": fid, **_PAPER},
        {**reconstruction, "metric": "lpips", "name": "LPIPS", "value": lpips, **_PAPER},
    ]


# Numbers the paper reports (ImageNet-1k, 224 px, 16 sparse tokens), measured with the original code, not with this
# port; opt in with `results=PAPER_RESULTS[...]` only for a checkpoint converted from the matching release.
PAPER_RESULTS: dict[str, list[dict[str, Any]]] = {
    "stellar-b16": _paper_results(linear=73.26, knn=67.25, fid=3.06, lpips=0.2077),
    "stellar-h16": _paper_results(linear=79.10, knn=77.31, fid=2.60, lpips=0.1729),
}


# ----------------------------------------------------------------------------------------------------------------------
# What a run was
# ----------------------------------------------------------------------------------------------------------------------


def hub_id_or_none(name: str | None) -> str | None:
    """
    `name` when it can only be a Hub repository id (a valid id that is not an existing local path), else `None`.

    For the `base_model` and `datasets` metadata, which must name Hub repositories: `facebook/vit-mae-base` -> itself,
    `./mae`, `/data/mae.pth` or an existing folder `mae/base` -> `None`.
    """
    if not name or not isinstance(name, str) or Path(name).expanduser().exists():
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _is_fraction(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 <= value <= 1


@dataclasses.dataclass(frozen=True)
class ProbeTask:
    """
    Frozen-feature probe figures of one labelled task, as fractions in [0, 1] (top-1 accuracy).

    `chance` is 1 / number of classes; the `random_init_*` figures are the same probes on a randomly initialised
    encoder of the same config (the untrained baseline), `None` when not measured.
    """

    name: str
    chance: float
    knn_top1: float
    linear_probe_top1: float
    random_init_knn_top1: float | None = None
    random_init_linear_probe_top1: float | None = None

    def __post_init__(self):
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"a probe task needs a name, got {self.name!r}")
        for field in dataclasses.fields(self)[1:]:
            value = getattr(self, field.name)
            if value is None and field.name.startswith("random_init_"):
                continue
            if not _is_fraction(value):
                raise ValueError(f"probe task {self.name!r}: {field.name} must be a fraction in [0, 1], got {value!r}")
        if self.chance == 0:
            raise ValueError(f"probe task {self.name!r}: chance must be 1 / number of classes, got 0")

    @property
    def num_classes(self) -> int:
        return round(1 / self.chance)


@dataclasses.dataclass(frozen=True)
class ProbeResults:
    """
    The probes of a run: kNN and linear-probe top-1 of the frozen `pooler_output` per labelled task.

    Args:
        dataset: what the probes were measured on, in words (`"held-out synthetic scenes"`).
        tasks: one `ProbeTask` per labelled task.
        num_train_images / num_eval_images: images the probes were fitted on / scored on.
        dataset_hub_id: the Hub dataset id, only when the probe images are a Hub dataset; then (and only then) the
            figures also go into the card's `model-index`.
        split: the split scored (`"validation"`).
        preprocessing: how the probe images were prepared, in words, when it differs from the image processor.
        knn_k, knn_temperature, linear_probe_epochs, linear_probe_learning_rate: the protocol
            (`stellar_hf.evaluation.knn_accuracy` / `linear_probe`; the defaults are theirs and `examples/pretrain.py`'s).
    """

    dataset: str
    tasks: tuple[ProbeTask, ...]
    num_train_images: int
    num_eval_images: int
    dataset_hub_id: str | None = None
    split: str = "validation"
    preprocessing: str | None = None
    knn_k: int = 20
    knn_temperature: float = 0.07
    linear_probe_epochs: int = 30
    linear_probe_learning_rate: float = 1e-3

    def __post_init__(self):
        object.__setattr__(self, "tasks", tuple(self.tasks))
        if not self.dataset or not isinstance(self.dataset, str):
            raise ValueError(f"ProbeResults.dataset must describe the probe images, got {self.dataset!r}")
        if not self.tasks or not all(isinstance(task, ProbeTask) for task in self.tasks):
            raise ValueError(f"ProbeResults.tasks must be one or more ProbeTask, got {self.tasks!r}")
        for name in ("num_train_images", "num_eval_images"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ProbeResults.{name} must be a positive integer, got {value!r}")
        if self.dataset_hub_id is not None and hub_id_or_none(self.dataset_hub_id) is None:
            raise ValueError(f"ProbeResults.dataset_hub_id {self.dataset_hub_id!r} is not a Hub dataset id")

    @classmethod
    def from_pretrain_results(cls, results: Mapping[str, Any] | None, dataset: str, **kwargs) -> "ProbeResults | None":
        """
        From the dict `run_probes` of `examples/pretrain.py` returns (`{task: {chance, knn_top1, linear_probe_top1,
        random_init_knn_top1, random_init_linear_probe_top1}, ..., "num_probe_images": {"train": n, "eval": m}}`);
        `None` for `None` (no probes). `kwargs` go to the constructor.
        """
        if results is None:
            return None
        sizes = results.get("num_probe_images") or {}
        fields = {field.name for field in dataclasses.fields(ProbeTask)} - {"name"}
        tasks = []
        for name, scores in results.items():
            if name == "num_probe_images":
                continue
            unknown = sorted(set(scores) - fields)
            if unknown:
                raise ValueError(f"probe task {name!r} has unknown figures {unknown}")
            tasks.append(ProbeTask(name=name, **scores))
        return cls(
            dataset=dataset,
            tasks=tuple(tasks),
            num_train_images=sizes.get("train"),
            num_eval_images=sizes.get("eval"),
            **kwargs,
        )


@dataclasses.dataclass(frozen=True)
class TrainingRun:
    """
    What a training run was, for its model card. Optional fields left at `None` are left out of the card, never
    guessed; sizes, target and preprocessing come from the config and image processor given to `render_model_card`.

    Args:
        data: the training data in words (`"built-in synthetic scenes (8192 images, 48 px)"`).
        steps: optimiser steps completed.
        global_batch_size: images per optimiser step over all processes and accumulation.
        learning_rate: the peak learning rate.
        data_hub_id: the Hub dataset id, only when the training data is a Hub dataset (it becomes the `datasets`
            metadata); `None` for the synthetic scenes or a local folder. See `hub_id_or_none`.
        synthetic: whether the data are the built-in synthetic scenes (the card then says what that implies).
        planned_steps: the steps the run was set to do, when it stopped earlier (`--max_train_minutes`).
        base_learning_rate: the learning rate per 256 images (lr = base x global batch / 256).
        optimizer: e.g. `"AdamW"`.
        weight_decay, lr_schedule (e.g. `"cosine"`), warmup_steps, max_grad_norm, seed, num_processes,
        mixed_precision (`"no"`, `"bf16"`, `"fp16"`), device (in words, e.g. `"cpu, 2 threads per process"`).
        wall_minutes: the run's wall-clock minutes; `timed` says what they cover.
        timed: what `wall_minutes` covers (default: from the first step to the final save, probes included).
        resumed_from_step: the step this session resumed from; the time then covers this session only.
        encoder_init: where the encoder was initialised from (a Hub id, folder or file); `None` for random.
        skipped_images: `{"count", "substituted_slots", "first"}` as `examples/pretrain.py` records unreadable images.
        probes: the probe figures, or `None`.
        figures: images the run wrote, as paths relative to the card's folder (`"images/spatial_maps_final.png"`), or
            `(path, caption)` pairs; embedded in the card.
        script: what trained it.
    """

    data: str
    steps: int
    global_batch_size: int
    learning_rate: float
    data_hub_id: str | None = None
    synthetic: bool = False
    planned_steps: int | None = None
    base_learning_rate: float | None = None
    optimizer: str | None = "AdamW"
    weight_decay: float | None = None
    lr_schedule: str | None = None
    warmup_steps: int | None = None
    max_grad_norm: float | None = None
    seed: int | None = None
    num_processes: int | None = None
    mixed_precision: str | None = None
    device: str | None = None
    wall_minutes: float | None = None
    timed: str = "from the first training step to the final save, final probes included"
    resumed_from_step: int | None = None
    encoder_init: str | None = None
    skipped_images: Mapping[str, Any] | None = None
    probes: ProbeResults | None = None
    figures: Sequence[str | tuple[str, str]] = ()
    script: str = "`examples/pretrain.py` of `stellar_hf`"

    def __post_init__(self):
        object.__setattr__(self, "figures", tuple(self.figures))
        if not self.data or not isinstance(self.data, str):
            raise ValueError(f"TrainingRun.data must describe the training data, got {self.data!r}")
        for name in ("steps", "global_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "steps" else 1):
                raise ValueError(f"TrainingRun.{name} must be a {'non-negative' if name == 'steps' else 'positive'} "
                                 f"integer, got {value!r}")  # fmt: skip
        if not isinstance(self.learning_rate, (int, float)) or not self.learning_rate > 0:
            raise ValueError(f"TrainingRun.learning_rate must be positive, got {self.learning_rate!r}")
        if self.data_hub_id is not None and hub_id_or_none(self.data_hub_id) is None:
            raise ValueError(
                f"TrainingRun.data_hub_id {self.data_hub_id!r} is not a Hub dataset id (a local path or an invalid id); "
                "describe local data in `data` only"
            )
        if self.synthetic and self.data_hub_id:
            raise ValueError("TrainingRun: the synthetic scenes are not a Hub dataset; give synthetic or data_hub_id")
        if self.probes is not None and not isinstance(self.probes, ProbeResults):
            raise ValueError(f"TrainingRun.probes must be a ProbeResults or None, got {type(self.probes).__name__}")
        if self.skipped_images is not None and not isinstance(self.skipped_images, Mapping):
            raise ValueError(f"TrainingRun.skipped_images must be a dict, got {self.skipped_images!r}")
        for figure in self.figures:
            _figure_path(figure[0] if isinstance(figure, tuple) else figure)


def _figure_path(path: Any) -> str:
    """A figure's path as written in the card: relative, POSIX, inside the card's folder; `ValueError` otherwise."""
    if isinstance(path, Path):
        path = path.as_posix()
    if not isinstance(path, str) or not path:
        raise ValueError(f"a figure path must be a non-empty relative path, got {path!r}")
    pure = PurePosixPath(path)
    if pure.is_absolute() or "\\" in path or ".." in pure.parts or re.match(r"^[A-Za-z]:", path):
        raise ValueError(
            f"figure path {path!r} must be relative to the card's folder (e.g. images/spatial_maps_final.png), so that "
            "it renders on the Hub after upload"
        )
    return pure.as_posix()


def default_figure_caption(path: str, config: StellarConfig) -> str:
    """The caption of a figure `examples/pretrain.py` writes (`reconstructions_<tag>.png`, `spatial_maps_<tag>.png`)."""
    stem = PurePosixPath(path).stem
    name, _, tag = stem.rpartition("_")
    when = "after the last step" if tag == "final" else f"at step {int(tag)}" if tag.isdigit() else f"({tag})"
    if not name:
        name, when = stem, ""
    if name == "reconstructions":
        return (
            f"Input images (top row) and their reconstructions from the {config.num_sparse_tokens}-token latent "
            f"(bottom row), {when}; clamped to [0, 1] for display."
        ).replace(" , ", ", ")
    if name == "spatial_maps":
        return (
            f"Spatial maps {when}: per image (one per row) the image, the hard assignment (the arg-max token of each "
            "patch) and each sparse token's map over the image with its share of the patches."
        ).replace("  ", " ")
    return f"`{path}`"


# ----------------------------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------------------------


def _backbone_name(config: StellarConfig) -> str:
    name = _BACKBONE_NAMES.get(config.hidden_size, f"ViT (width {config.hidden_size})")
    return f"{name}/{config.patch_size}"


def architecture_table(config: StellarConfig) -> str:
    """A Markdown table of the sizes that define the checkpoint, read from its config."""
    grid = config.image_size // config.patch_size
    if config.reconstruction_target == "vq":
        target = f"VQ: logits over the {config.vq_codebook_size} codes of the frozen MaskGIT VQGAN, per patch"
    else:
        target = "pixels: ConvTranspose2d to an image on the [0, 1] scale"
    temperature = (
        f"cosine / {config.spatial_temperature}" if config.spatial_temperature is not None else "dot product / sqrt(d)"
    )
    predictor = (
        f"{config.predictor_num_layers} Linear layers (hidden {config.predictor_hidden_size})"
        if config.predictor_num_layers > 1
        else "1 Linear layer"
    )
    rows = [
        ("Backbone", f"{_backbone_name(config)}, pre-norm, LayerNorm eps {config.layer_norm_eps:g}"),
        (
            "Encoder",
            f"width {config.hidden_size}, {config.num_hidden_layers} layers, {config.num_attention_heads} heads, "
            f"MLP {config.intermediate_size}",
        ),
        ("Patch size", f"{config.patch_size} px"),
        ("Image size", f"{config.image_size} px ({grid} x {grid} = {grid * grid} patches)"),
        ("Sparse tokens r", str(config.num_sparse_tokens)),
        ("Spatial map", f"softmax over the r tokens of {temperature}"),
        (
            "Decoder",
            f"width {config.decoder_hidden_size}, {config.decoder_num_hidden_layers} layers, "
            f"{config.decoder_num_attention_heads} heads, MLP {config.decoder_intermediate_size}, random Fourier "
            "position encoding",
        ),
        ("Reconstruction target", target),
        (
            "Clustering heads",
            f"{config.num_prototypes} prototypes of width {config.prototype_dim}, predictor {predictor}"
            + ("; sparse and CLS heads" if config.use_cls_clustering else "; sparse head only"),
        ),
        ("EMA teacher", f"on (momentum {config.ema_momentum})" if config.use_ema_teacher else "off"),
    ]
    lines = ["| | |", "|---|---|"] + [f"| {key} | {value} |" for key, value in rows]
    return "\n".join(lines)


def _eval_results(results: list[dict[str, Any]]) -> list[EvalResult]:
    """`results` dicts -> `huggingface_hub.EvalResult`s, with a `ValueError` naming the first bad entry."""
    eval_results = []
    for index, result in enumerate(results):
        if not isinstance(result, dict):
            raise ValueError(f"results[{index}] must be a dict, got {type(result).__name__}")
        missing = [key for key in _REQUIRED_RESULT_KEYS if result.get(key) in (None, "")]
        if missing:
            raise ValueError(f"results[{index}] lacks {missing}; each result needs {list(_REQUIRED_RESULT_KEYS)}")
        unknown = sorted(set(result) - set(_REQUIRED_RESULT_KEYS) - _OPTIONAL_RESULT_KEYS)
        if unknown:
            raise ValueError(f"results[{index}] has unknown keys {unknown}")
        value = result["value"]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"results[{index}]['value'] must be a number, got {value!r}")
        eval_results.append(
            EvalResult(
                task_type=str(result["task"]),
                task_name=result.get("task_name"),
                dataset_type=str(result["dataset"]),
                dataset_name=str(result.get("dataset_name") or result["dataset"]),
                dataset_config=result.get("dataset_config"),
                dataset_split=result.get("split"),
                metric_type=str(result["metric"]),
                metric_name=result.get("name"),
                metric_value=value,
                source_name=result.get("source_name"),
                source_url=result.get("source_url"),
                verified=result.get("verified"),
            )
        )
    return eval_results


def results_table(results: list[dict[str, Any]] | None) -> str:
    """The body's table of this checkpoint's numbers, or a sentence saying there are none."""
    if not results:
        return "No evaluation results are recorded for this checkpoint."
    lines = ["| Protocol | Metric | Dataset | Split | Value | Source |", "|---|---|---|---|---|---|"]
    for result in results:
        source = result.get("source_name") or "this checkpoint"
        if result.get("source_url"):
            source = f"[{source}]({result['source_url']})"
        lines.append(
            f"| {result.get('name') or result.get('task_name') or result['task']} | {result['metric']} | "
            f"{result.get('dataset_name') or result['dataset']} | {result.get('split') or '-'} | {result['value']} | "
            f"{source} |"
        )
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def probe_table(probes: ProbeResults) -> str:
    """The probe figures of a run next to chance and the untrained encoder, as a Markdown table."""
    lines = [
        "| Task | Classes | Chance | kNN top-1, untrained | kNN top-1, trained | Linear top-1, untrained | "
        "Linear top-1, trained |",
        "|---|---|---|---|---|---|---|",
    ]
    for task in probes.tasks:
        lines.append(
            f"| `{task.name}` | {task.num_classes} | {_percent(task.chance)} | {_percent(task.random_init_knn_top1)} | "
            f"{_percent(task.knn_top1)} | {_percent(task.random_init_linear_probe_top1)} | "
            f"{_percent(task.linear_probe_top1)} |"
        )
    return "\n".join(lines)


def _probe_remarks(probes: ProbeResults) -> list[str]:
    """
    One sentence per task on which neither trained probe beats the better of chance and the untrained encoder by two
    binomial standard errors of a top-1 measured on `num_eval_images` images (at least one image).
    """
    remarks = []
    count = probes.num_eval_images
    for task in probes.tasks:
        pairs = [
            (task.knn_top1, task.random_init_knn_top1),
            (task.linear_probe_top1, task.random_init_linear_probe_top1),
        ]
        learned = False
        for trained, untrained in pairs:
            baseline = max(task.chance, untrained if untrained is not None else 0.0)
            margin = max(2 * math.sqrt(baseline * (1 - baseline) / count), 1 / count)
            learned |= trained >= baseline + margin
        if not learned:
            baseline = "chance or the untrained encoder" if any(u is not None for _, u in pairs) else "chance"
            remarks.append(
                f"On `{task.name}` neither probe is clearly above {baseline} (by two standard errors on {count} "
                "images): these features show no sign of having learned that task."
            )
    return remarks


def _probe_results_for_model_index(probes: ProbeResults) -> list[dict[str, Any]]:
    """The probe figures as `results` entries (percent), for a probe set that is a Hub dataset."""
    results = []
    for task in probes.tasks:
        common = dict(
            task="image-classification",
            task_name=f"Frozen-feature classification ({task.name})",
            dataset=probes.dataset_hub_id,
            dataset_name=probes.dataset,
            split=probes.split,
            metric="accuracy",
        )
        results.append({**common, "name": f"kNN top-1 (%), k={probes.knn_k}", "value": round(100 * task.knn_top1, 2)})
        results.append({**common, "name": "Linear probe top-1 (%)", "value": round(100 * task.linear_probe_top1, 2)})
    return results


# ----------------------------------------------------------------------------------------------------------------------
# Preprocessing, snippets and the run's sections
# ----------------------------------------------------------------------------------------------------------------------


def _numbers(values) -> str:
    return "(" + ", ".join(f"{value:g}" for value in values) + ")"


def _size_of(size) -> dict[str, int]:
    """A processor's `size` / `crop_size` (a `SizeDict` or a dict) as a plain dict of the fields that are set."""
    items = size.items() if isinstance(size, Mapping) else vars(size).items() if hasattr(size, "__dict__") else ()
    if not items and hasattr(size, "__dataclass_fields__"):
        items = ((name, getattr(size, name)) for name in size.__dataclass_fields__)
    return {key: value for key, value in items if value is not None}


def _preprocessing_facts(image_processor) -> dict[str, Any]:
    """What the processor does, read from it: resize, crop, rescale, normalisation statistics."""
    facts: dict[str, Any] = {}
    if getattr(image_processor, "do_resize", False):
        size = _size_of(image_processor.size)
        resample = getattr(image_processor, "resample", None)
        method = getattr(resample, "name", None) or {0: "NEAREST", 2: "BILINEAR", 3: "BICUBIC"}.get(resample, "")
        method = method.lower()
        if "shortest_edge" in size:
            facts["resize"] = f"shorter side to {size['shortest_edge']} px" + (f" ({method})" if method else "")
            facts["resize_short"] = f"shorter side {size['shortest_edge']} px"
        elif "height" in size and "width" in size:
            facts["resize"] = f"resize to {size['height']} x {size['width']} px" + (f" ({method})" if method else "")
            facts["resize_short"] = f"resize {size['height']} x {size['width']}"
        else:
            raise ValueError(f"the image processor's size {size} is not one this card can describe")
    if getattr(image_processor, "do_center_crop", False):
        crop = _size_of(image_processor.crop_size)
        facts["crop"] = f"centre crop {crop['height']} x {crop['width']}"
        facts["crop_height"], facts["crop_width"] = crop["height"], crop["width"]
    facts["rescale"] = bool(getattr(image_processor, "do_rescale", False))
    if getattr(image_processor, "do_normalize", False):
        mean, std = tuple(image_processor.image_mean), tuple(image_processor.image_std)
        imagenet = all(abs(a - b) < 1e-6 for a, b in zip(mean + std, tuple(IMAGENET_DEFAULT_MEAN) + tuple(IMAGENET_DEFAULT_STD)))
        facts["normalize"] = (
            f"normalise with the {'ImageNet ' if imagenet else ''}mean {_numbers(mean)} and std {_numbers(std)}"
        )
    return facts


def _check_processor_matches(config: StellarConfig, facts: dict[str, Any]) -> None:
    if "crop_height" in facts and (facts["crop_height"], facts["crop_width"]) != (config.image_size, config.image_size):
        raise ValueError(
            f"the image processor crops {facts['crop_height']} x {facts['crop_width']} but the model's image_size is "
            f"{config.image_size}; give the processor saved with this checkpoint"
        )


def preprocessing_text(config: StellarConfig, facts: dict[str, Any], run: TrainingRun | None) -> str:
    steps = [facts[key] for key in ("resize", "crop") if key in facts]
    if facts["rescale"]:
        steps.append("rescale to [0, 1]")
    if "normalize" in facts:
        steps.append(facts["normalize"])
    text = (
        f"The model is fed {config.image_size} x {config.image_size} px images. The image processor saved with this "
        f"checkpoint does everything: {', '.join(steps)}. The model takes these **normalised** `pixel_values` and does "
        "not normalise again. (The original code took [0, 1] images and normalised inside the model; the port moved "
        "that step into the processor, and the reconstruction loss un-normalises with `config.image_mean` / "
        "`config.image_std`.) If you build tensors yourself, normalise them exactly once."
    )
    if run is not None:
        text += (
            "\n\nDuring pretraining the model saw augmented views made by the data pipeline (`stellar_hf.data`), not "
            "this evaluation transform; see *Training procedure*."
        )
        if run.probes is not None and run.probes.preprocessing:
            text += f" The probes of *Evaluation* prepared their images as follows: {run.probes.preprocessing}."
    return text


def _code(text: str) -> str:
    return "```python\n" + text.strip("\n") + "\n```"


def feature_extraction_snippet(config: StellarConfig, model_id: str, facts: dict[str, Any]) -> str:
    grid = config.image_size // config.patch_size
    steps = ", ".join(
        [facts[key] for key in ("resize_short", "crop") if key in facts]
        + (["rescale"] if facts["rescale"] else [])
        + (["normalise"] if "normalize" in facts else [])
    )
    d, r, n = config.hidden_size, config.num_sparse_tokens, grid * grid
    return _code(f'''
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel

processor = AutoImageProcessor.from_pretrained({json.dumps(model_id)}, trust_remote_code=True)
model = AutoModel.from_pretrained({json.dumps(model_id)}, trust_remote_code=True).eval()

image = Image.open({json.dumps(EXAMPLE_IMAGE)})
inputs = processor(images=image, return_tensors="pt")  # {steps}
with torch.no_grad():
    outputs = model(**inputs)

outputs.pooler_output.shape   # (1, {d})  image feature (mean of the sparse tokens)
outputs.sparse_tokens.shape   # (1, {r}, {d})  "what"
outputs.spatial_map.shape     # (1, {n}, {r})  "where"
''')


def package_snippet(config: StellarConfig, model_id: str) -> str:
    return _code(f'''
from stellar_hf import StellarImageProcessor, StellarModel

processor = StellarImageProcessor.from_pretrained({json.dumps(model_id)})
model = StellarModel.from_pretrained({json.dumps(model_id)}, dtype=torch.bfloat16).eval()  # or float32 / float16
with torch.no_grad():
    features = model(**processor(images=image, return_tensors="pt")).pooler_output
features.shape  # (1, {config.hidden_size})
''')


def pipeline_snippet(config: StellarConfig, model_id: str) -> str:
    grid = config.image_size // config.patch_size
    length = 1 + grid * grid + config.num_sparse_tokens
    return _code(f'''
from transformers import pipeline

extractor = pipeline("image-feature-extraction", model={json.dumps(model_id)}, trust_remote_code=True)
pooled = extractor({json.dumps(EXAMPLE_IMAGE)}, pool=True)  # nested lists: pooler_output, the mean of the sparse tokens
tokens = extractor({json.dumps(EXAMPLE_IMAGE)})             # nested lists: last_hidden_state [CLS, patches, sparse tokens]
torch.tensor(pooled).shape  # (1, {config.hidden_size})
torch.tensor(tokens).shape  # (1, {length}, {config.hidden_size})
''')


def _edit_lines(config: StellarConfig, decode: str) -> str:
    """The "where" and "what" edits, with token indices valid for this model (`decode` turns factors into output)."""
    r = config.num_sparse_tokens
    if r < 2:
        return (
            "    # With a single sparse token there is no area to hand over; edit \"what\" instead:\n"
            "    where = outputs.spatial_map\n"
        ) + decode.format(tokens="other.sparse_tokens", where="where", name="swapped")
    source, target = 0, r - 1
    return (
        f'    # Edit "where": hand the area of token {source} to token {target} (of {r}), then decode the edited factors.\n'
        "    tokens, where = outputs.sparse_tokens.clone(), outputs.spatial_map.clone()\n"
        f"    where[..., {target}] += where[..., {source}]\n"
        f"    where[..., {source}] = 0\n"
        + decode.format(tokens="tokens", where="where", name="edited")
        + '    # Edit "what": another image\'s tokens (here the flipped image) with this image\'s map.\n'
        + decode.format(tokens="other.sparse_tokens", where="outputs.spatial_map", name="swapped")
    )


def reconstruction_section(config: StellarConfig, model_id: str) -> str:
    """Prose and a snippet for reconstruction and factor editing that are right for this checkpoint's target."""
    grid = config.image_size // config.patch_size
    n, size = grid * grid, config.image_size
    head = f'''
from stellar_hf import StellarForImageReconstruction

model = StellarForImageReconstruction.from_pretrained({json.dumps(model_id)}).eval()
inputs = processor(images=[image], return_tensors="pt")
flipped = processor(images=[image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)], return_tensors="pt")
with torch.no_grad():
    outputs = model(**inputs)
    other = model(**flipped)
'''
    remote = (
        "Without the `stellar_hf` package the same class loads from this repository's code with "
        f'`AutoModelForImageToImage.from_pretrained("{model_id}", trust_remote_code=True)`. Every STELLAR class loads '
        "from this folder; weights a class does not use (for example the clustering heads of a pretraining "
        "checkpoint) are skipped. `reconstruct(sparse_tokens, spatial_map)` assumes a square patch grid; pass "
        "`grid_size=(h, w)` for rectangular images."
    )
    if config.reconstruction_target == "pixel":
        intro = (
            "`StellarForImageReconstruction` adds the decoder. This checkpoint's target is **pixels**: the decoder "
            "outputs the image itself, on the [0, 1] scale (raw: clamp it for display); no tokenizer is involved."
        )
        decode = "    {name} = model.reconstruct({tokens}, {where})\n"
        body = (
            head
            + f"    picture = outputs.reconstruction.clamp(0, 1)  # the image rebuilt from {config.num_sparse_tokens} tokens\n"
            + "\n"
            + _edit_lines(config, decode)
            + f"picture.shape  # (1, {config.num_channels}, {size}, {size})\n"
            + (f"edited.shape   # (1, {config.num_channels}, {size}, {size})\n" if config.num_sparse_tokens > 1 else "")
            + f"swapped.shape  # (1, {config.num_channels}, {size}, {size})\n"
        )
        return intro + "\n\n" + _code(body) + "\n\n" + remote
    codes = config.vq_codebook_size
    tokenizer = config.vq_tokenizer_name_or_path
    released = (
        " The released models use the 1024-code MaskGIT VQGAN of the TiTok project (`bytedance/1d-tokenizer`): "
        "convert the public `maskgit-vqgan-imagenet-f16-256.bin` once with `python -m stellar_hf.convert_vqgan "
        "--checkpoint maskgit-vqgan-imagenet-f16-256.bin --output_dir maskgit-vqgan`."
        if codes == 1024
        else ""
    )
    intro = (
        "`StellarForImageReconstruction` adds the decoder. This checkpoint's target is **VQ**: per patch, the decoder "
        f"predicts logits over the {codes} codes of a frozen MaskGIT VQGAN tokenizer, and pixels come from that "
        "VQGAN's decoder. The VQGAN is not part of this checkpoint's weights."
    )
    if tokenizer:
        intro += (
            f" This checkpoint's config names it: `vq_tokenizer_name_or_path = {json.dumps(tokenizer)}`, which "
            "`model.load_vq_tokenizer()` attaches once (attach another with `model.set_vq_tokenizer(folder_or_id)`)."
            + released
        )
        decode = "    {name} = model.reconstruct({tokens}, {where})\n"
        attach = ".eval()\nmodel.load_vq_tokenizer()  # the MaskGIT VQGAN the config names: codes -> pixels\n"
        body = (
            head.replace(".eval()\n", attach, 1)
            + "    picture = outputs.reconstruction.clamp(0, 1)  # the VQGAN's decoding of the predicted codes\n"
            + "\n"
            + _edit_lines(config, decode)
            + f"outputs.logits.shape  # (1, {n}, {codes})\n"
            + "picture.shape         # (1, 3, H, W): the code grid times the VQGAN's downsampling\n"
        )
        remote += (
            " With remote code only, the VQGAN folder loads with "
            f'`AutoModel.from_pretrained({json.dumps(tokenizer)}, trust_remote_code=True)`, when it was written by '
            "`stellar_hf.convert_vqgan`."
        )
        return intro + "\n\n" + _code(body) + "\n\n" + remote
    intro += (
        " This checkpoint's config names **no** tokenizer (`vq_tokenizer_name_or_path` is unset), so the model "
        "returns the code logits and `reconstruction` is `None`; the snippet below works with the codes. To get "
        "pixels, attach a MaskGIT VQGAN with the same codebook whose code grid matches the patch grid "
        f"({grid} x {grid}), as a `MaskGitVQGANModel` folder: `model.set_vq_tokenizer(folder)` before calling "
        "the model; `model.reconstruct(tokens, where)` then decodes edited factors into images." + released
    )
    decode = "    {name} = model.decode_lowrank(torch.bmm({where}, {tokens}), " + f"({grid}, {grid}))\n"
    body = (
        head
        + "    codes = outputs.logits.argmax(-1)  # the predicted VQGAN code of each patch\n"
        + "\n"
        + _edit_lines(config, decode).replace("then decode the edited factors", "then predict the codes again")
        + "outputs.reconstruction is None  # True: no VQGAN to decode the codes with\n"
        + f"outputs.logits.shape  # (1, {n}, {codes})\n"
        + f"codes.shape  # (1, {n})\n"
        + (f"edited.shape  # (1, {n}, {codes})\n" if config.num_sparse_tokens > 1 else "")
        + f"swapped.shape  # (1, {n}, {codes})\n"
    )
    return intro + "\n\n" + _code(body) + "\n\n" + remote


def _model_id_note(model_id: str) -> str:
    """A sentence for a `model_id` that is not a `namespace/name` Hub id, saying what the snippets then load."""
    path = Path(model_id).expanduser()
    if path.exists() or path.is_absolute() or model_id.startswith((".", "~")) or model_id.count("/") > 1:
        return (
            f" `{model_id}` is a local folder path: run the snippets where that path resolves, or put the Hub id "
            "(`namespace/name`) in its place after uploading."
        )
    if "/" not in model_id:
        return (
            f" `{model_id}` is not a full Hub repository id (`namespace/name`), so as written the snippets load a local "
            "folder of that name from the working directory; put the Hub id in its place after uploading."
        )
    return ""


def _minutes(minutes: float) -> str:
    if minutes < 1:
        return f"{minutes * 60:.0f} s"
    if minutes < 120:
        return f"{minutes:.1f} min"
    return f"{minutes / 60:.1f} h"


def run_details(config: StellarConfig, run: TrainingRun) -> str:
    """The *Training procedure* table of a run."""
    rows = [("Trained with", run.script), ("Data", run.data)]
    steps = str(run.steps)
    if run.planned_steps is not None and run.planned_steps != run.steps:
        steps += f" (of {run.planned_steps} planned; the run stopped early)"
    if run.resumed_from_step:
        steps += f", resumed at step {run.resumed_from_step}"
    rows.append(("Optimiser steps", steps))
    rows.append(("Global batch", f"{run.global_batch_size} images per step"))
    rows.append(("Images seen", f"{run.steps * run.global_batch_size} (steps x global batch; each with its views)"))
    rate = f"{run.learning_rate:.3g} peak"
    if run.base_learning_rate is not None:
        rate += f" (base {run.base_learning_rate:g} x {run.global_batch_size} / 256)"
    rows.append(("Learning rate", rate))
    if run.optimizer:
        rows.append(
            ("Optimiser", run.optimizer + (f", weight decay {run.weight_decay:g}" if run.weight_decay is not None else ""))
        )
    if run.lr_schedule:
        schedule = run.lr_schedule
        if run.warmup_steps is not None:
            schedule += f", {run.warmup_steps} warmup steps"
        rows.append(("Schedule", schedule))
    if run.max_grad_norm is not None:
        rows.append(("Gradient clipping", f"{run.max_grad_norm:g}" if run.max_grad_norm else "off"))
    views = f"{config.num_masked_views} masked global views of {config.image_size} px (mask ratio {config.mask_ratio:g})"
    views += f", {config.num_local_views} local views of {config.local_image_size} px"
    rows.append(("Views per image", views))
    if run.seed is not None:
        rows.append(("Seed", str(run.seed)))
    if run.num_processes is not None or run.device:
        where = f"{run.num_processes} process(es)" if run.num_processes is not None else ""
        where += (" on " if where and run.device else "") + (run.device or "")
        rows.append(("Hardware", where))
    if run.mixed_precision:
        rows.append(("Mixed precision", run.mixed_precision))
    if run.wall_minutes is not None:
        timed = run.timed + ("; this session only, since the resume" if run.resumed_from_step else "")
        rows.append(("Wall time", f"{_minutes(run.wall_minutes)} ({timed})"))
    if run.skipped_images is not None:
        count = int(run.skipped_images.get("count", 0))
        if count:
            first = ", ".join(f"`{name}`" for name in run.skipped_images.get("first", []))
            rows.append((
                "Unreadable images",
                f"{count} skipped; {run.skipped_images.get('substituted_slots', 0)} batch slot(s) took the next "
                f"readable image instead" + (f" (first: {first})" if first else ""),
            ))  # fmt: skip
        else:
            rows.append(("Unreadable images", "none"))
    lines = ["| | |", "|---|---|"] + [f"| {key} | {str(value).replace('|', '/')} |" for key, value in rows]
    return "\n".join(lines)


def run_evaluation(run: TrainingRun) -> str:
    probes = run.probes
    if probes is None:
        return "This run measured no probes, so no evaluation results are recorded for this checkpoint."
    text = (
        f"Measured at the end of this run on {probes.dataset}: {probes.num_train_images} images fit the probes, "
        f"{probes.num_eval_images} {probes.split} images score them. Top-1 accuracy of the frozen `pooler_output` "
        f"(mean of the sparse tokens): kNN with cosine similarity, k = {probes.knn_k}, votes weighted by "
        f"exp(similarity / {probes.knn_temperature:g}); linear probe (LayerNorm -> Linear) trained with AdamW at lr "
        f"{probes.linear_probe_learning_rate:g} for {probes.linear_probe_epochs} epochs. *Untrained* is the same "
        "probe on a randomly initialised encoder of the same config; chance is 1 / number of classes.\n\n"
        + probe_table(probes)
    )
    remarks = _probe_remarks(probes)
    if remarks:
        text += "\n\n" + " ".join(remarks)
    if probes.dataset_hub_id is None:
        text += (
            "\n\nThese figures are in the text only, not in the `model-index` metadata: the probe images are not a "
            "Hub dataset. They describe this small run, not the released STELLAR models (see *Variants*)."
        )
    return text


def figures_section(config: StellarConfig, run: TrainingRun) -> str:
    if not run.figures:
        return ""
    parts = ["## Figures of this run", ""]
    for figure in run.figures:
        path, caption = figure if isinstance(figure, tuple) else (figure, None)
        path = _figure_path(path)
        caption = caption or default_figure_caption(path, config)
        alt = PurePosixPath(path).stem.replace("_", " ")
        parts += [f"![{alt}]({path})", "", f"*{caption}*", ""]
    return "\n".join(parts).rstrip()


def _link(name: str | None) -> str:
    if not name:
        return "none (random initialisation)"
    if hub_id_or_none(name):
        return f"[{name}](https://huggingface.co/{name})"
    return f"`{name}` (a local file or folder)"


def _training_data(datasets: list[str]) -> str:
    if not datasets:
        return "The training data of this checkpoint is described under *Training procedure* below."
    links = ", ".join(f"[{name}](https://huggingface.co/datasets/{name})" for name in datasets)
    return f"Trained without labels on: {links}."


def _run_training_data(run: TrainingRun) -> str:
    if run.data_hub_id:
        text = f"Trained without labels on [{run.data}](https://huggingface.co/datasets/{run.data_hub_id})."
    else:
        text = f"Trained without labels on {run.data}."
    if run.synthetic:
        text += (
            " The synthetic scenes are generated by `stellar_hf.data.SyntheticScenes` (no download): circles, "
            "squares, triangles, crosses, rings and stars in eight colours on textured backgrounds, one object "
            "clearly larger than the others. They are not a Hub dataset."
        )
    elif not run.data_hub_id:
        text += " It is not a Hub dataset."
    return text


def _data_limitation(run: TrainingRun | None, config: StellarConfig) -> str:
    if run is None:
        return (
            "- Trained on ImageNet-1k only (released checkpoints): object-centric natural photographs at 224 px. "
            "Expect weaker\n  features on medical, satellite, document or other out-of-domain images, and the "
            "biases of ImageNet's content and\n  labelling."
        )
    if run.synthetic:
        return (
            f"- Trained for {run.steps} steps on synthetic scenes of coloured shapes at {config.image_size} px: a small "
            "demonstration model. Its\n  features and reconstructions are not meant for photographs or any other "
            "images; it is not one of the released STELLAR models."
        )
    return (
        f"- Trained on {run.data} only, at {config.image_size} px, for {run.steps} steps. Expect weaker features on "
        "images unlike\n  those, and the biases of that data."
    )


def third_party_licences(config: StellarConfig, base_model: str | None, run: TrainingRun | None) -> str:
    """The licence notes of the third-party weights that take part in this checkpoint."""
    notes = []
    if base_model or run is None:
        notes.append(
            f"- **MAE initialisation** (this checkpoint: {_link(base_model)}): the encoders of the released models "
            "were\n  initialised from Meta's MAE weights (`facebook/vit-mae-base` for B/16). Read the licence on the "
            "MAE model card and\n  in the original MAE repository (`facebookresearch/mae`) before you build on them; "
            "the two have not always stated\n  the same terms."
        )
    if config.reconstruction_target == "vq":
        notes.append(
            "- **MaskGIT VQGAN tokenizer** (`maskgit-vqgan-imagenet-f16-256.bin`, from the TiTok project,\n"
            "  `bytedance/1d-tokenizer`, for the released models): used frozen, as the VQ reconstruction target and "
            "decoder; it is not\n  part of this checkpoint's weights. Read the licence of the repository you "
            "download it from (the TiTok repository\n  states Apache-2.0 at the time of writing)."
        )
    if not notes:
        return (
            "No third-party weights take part in this checkpoint: its encoder was randomly initialised and its "
            "reconstruction target is pixels, so neither MAE weights nor a VQGAN tokenizer are involved."
        )
    return "Third-party artefacts that take part keep their own terms:\n\n" + "\n".join(notes)


def _checkpoint_summary(config: StellarConfig, run: TrainingRun | None, model_id: str) -> str:
    if run is None:
        return ""
    target = "pixel" if config.reconstruction_target == "pixel" else "VQ"
    return (
        f"**This checkpoint** is a {_backbone_name(config)} at {config.image_size} px with "
        f"{config.num_sparse_tokens} sparse tokens and a {target} reconstruction target, trained with {run.script} "
        f"on {run.data} for {run.steps} steps. It is not one of the released STELLAR checkpoints of *Variants*; its "
        "own measured figures are under *Evaluation*."
    )


# ----------------------------------------------------------------------------------------------------------------------
# The renderer
# ----------------------------------------------------------------------------------------------------------------------


def _split_header(text: str) -> tuple[str, str]:
    match = re.match(r"\A---\r?\n(.*?)\r?\n---\r?\n", text, flags=re.DOTALL)
    if match is None:
        raise ValueError(f"{TEMPLATE_PATH} must start with a YAML header between '---' lines")
    return match.group(1), text[match.end() :]


def _fill(text: str, values: dict[str, str], where: str) -> str:
    unknown = sorted({name for name in PLACEHOLDER.findall(text)} - set(values))
    if unknown:
        raise ValueError(f"the model card template's {where} has placeholders no value is given for: {unknown}")
    return PLACEHOLDER.sub(lambda match: values[match.group(1)], text)


def render_model_card(
    config: StellarConfig,
    training_details: str = "",
    model_id: str = "stellar",
    base_model: str | None = _UNSET,
    datasets: list[str] | None = None,
    results: list[dict[str, Any]] | None = None,
    run: TrainingRun | None = None,
    image_processor=None,
) -> str:
    """
    Fill `MODEL_CARD.md` for a checkpoint with `config`.

    Args:
        config: the checkpoint's [`StellarConfig`]; sizes, output shapes, target and the architecture table come
            from it.
        training_details: Markdown describing how this checkpoint was made, for a checkpoint without a `run` (a
            converted release); may be empty. Not allowed with `run`.
        model_id: what the code snippets load and the model-index name: the Hub id the card is published under
            (`namespace/name`), or a local folder path (the card then says so).
        base_model: the Hub id the encoder was initialised from; `None` or `""` leaves `base_model` out. Defaults to
            `facebook/vit-mae-base` without a run (the released B/16 recipe) and to `run.encoder_init` with one; a
            local path is named in the text but kept out of the metadata.
        datasets: Hub dataset ids the checkpoint was trained on (`[IMAGENET_1K]` for the released models), without a
            `run` (a run gives `data_hub_id`); `None` or `[]` leaves `datasets` out.
        results: without a `run`, one dict per reported number with `task` (e.g. `"image-classification"`), `dataset`
            (a Hub id), `metric` (e.g. `"accuracy"`, `"fid"`), `value`, and optionally `split`, `name` (the protocol,
            shown on the Hub), `task_name`, `dataset_name`, `dataset_config`, `source_name`, `source_url`, `verified`.
            Without results the card has no `model-index`. A run's results come from `run.probes`.
        run: a [`TrainingRun`] describing the run that made this checkpoint: data, steps, settings, time, probe
            figures and figures; the card's training, evaluation and figure sections are rendered from it.
        image_processor: the image processor saved with the checkpoint (default:
            `StellarImageProcessor.from_model_config(config)`, what the converter and `examples/pretrain.py` save);
            the preprocessing text and snippet comments are read from it.

    Returns:
        the card as text: a YAML header that `huggingface_hub.ModelCard` parses, then Markdown, with no placeholder
        left, whose Python snippets run in order as written given an image file `photo.jpg`.
    """
    if not isinstance(config, StellarConfig):
        raise ValueError(f"config must be a StellarConfig, got {type(config).__name__}")
    if not model_id or not isinstance(model_id, str) or model_id != model_id.strip() or "\n" in model_id:
        raise ValueError(f"model_id must be a non-empty string, got {json.dumps(model_id)}")
    if run is not None:
        if not isinstance(run, TrainingRun):
            raise ValueError(f"run must be a TrainingRun, got {type(run).__name__}")
        if training_details or datasets or results:
            raise ValueError(
                "with a run, the training details, datasets and results come from it: leave training_details, "
                "datasets and results out"
            )
        if base_model is not _UNSET and base_model != run.encoder_init:
            raise ValueError(f"base_model {base_model!r} contradicts run.encoder_init {run.encoder_init!r}")
        base_model = run.encoder_init
        datasets = [run.data_hub_id] if run.data_hub_id else []
        results = (
            _probe_results_for_model_index(run.probes) if run.probes and run.probes.dataset_hub_id else []
        )
    elif base_model is _UNSET:
        base_model = "facebook/vit-mae-base"
    datasets = list(datasets or [])
    if any(not isinstance(name, str) or not name for name in datasets):
        raise ValueError(f"datasets must be non-empty strings, got {datasets}")
    results = list(results or [])
    eval_results = _eval_results(results)
    if image_processor is None:
        from .image_processing_stellar import StellarImageProcessor

        image_processor = StellarImageProcessor.from_model_config(config)
    facts = _preprocessing_facts(image_processor)
    _check_processor_matches(config, facts)
    base_model_id = hub_id_or_none(base_model) if base_model else None

    header_text, body = _split_header(TEMPLATE_PATH.read_text(encoding="utf-8"))
    header = yaml.safe_load(
        _fill(
            header_text,
            {
                "base_model": json.dumps(base_model_id),
                "datasets": json.dumps(datasets or None),
                "model_index": "model-index: null",
            },
            "YAML header",
        )
    )
    if not isinstance(header, dict):
        raise ValueError(f"the YAML header of {TEMPLATE_PATH} is not a mapping")
    if eval_results:
        header["model-index"] = eval_results_to_model_index(model_id, eval_results)
    header = {key: value for key, value in header.items() if value not in (None, [], "")}

    grid = config.image_size // config.patch_size
    num_patches = grid * grid
    if run is None:
        details = training_details.strip() or "No run-specific details were recorded."
        evaluation = results_table(results)
        if results and any(result.get("source_url") == _PAPER["source_url"] for result in results):
            evaluation += "\n\nThe paper's numbers follow the protocols listed under *Variants*."
        training_data = _training_data(datasets)
    else:
        details = run_details(config, run)
        evaluation = run_evaluation(run)
        training_data = _run_training_data(run)
    body = _fill(
        body,
        {
            "model_id": model_id,
            "model_id_note": _model_id_note(model_id),
            "checkpoint_summary": _checkpoint_summary(config, run, model_id),
            "base_model_link": _link(base_model),
            "training_data": training_data,
            "training_details": details,
            "architecture_table": architecture_table(config),
            "evaluation": evaluation,
            "figures_section": figures_section(config, run) if run is not None else "",
            "data_limitation": _data_limitation(run, config),
            "third_party_licences": third_party_licences(config, base_model, run),
            "preprocessing": preprocessing_text(config, facts, run),
            "feature_extraction_snippet": feature_extraction_snippet(config, model_id, facts),
            "package_snippet": package_snippet(config, model_id),
            "pipeline_snippet": pipeline_snippet(config, model_id),
            "reconstruction_section": reconstruction_section(config, model_id),
            "backbone": _backbone_name(config),
            "image_size": str(config.image_size),
            "patch_size": str(config.patch_size),
            "grid": f"{grid} x {grid}",
            "num_patches": str(num_patches),
            "num_sparse_tokens": str(config.num_sparse_tokens),
            "hidden_size": str(config.hidden_size),
            "sequence_length": str(1 + num_patches + config.num_sparse_tokens),
            "reconstruction_target": config.reconstruction_target,
        },
        "body",
    )
    body = re.sub(r"\n{3,}", "\n\n", body)
    text = "---\n" + yaml.safe_dump(header, sort_keys=False, allow_unicode=True) + "---\n" + body
    _validate(text, header, len(eval_results))
    return text


def python_blocks(text: str) -> list[str]:
    """The ```python blocks of a card, in order (what a reader runs as one session)."""
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.DOTALL | re.MULTILINE)


def _validate(text: str, header: dict[str, Any], num_results: int) -> None:
    """Parse the card back with `huggingface_hub` and check the fields the Hub and users rely on."""
    leftover = PLACEHOLDER.findall(text)
    if leftover:
        raise ValueError(f"unfilled placeholders in the model card: {sorted(set(leftover))}")
    for index, block in enumerate(python_blocks(text)):
        try:
            compile(block, f"<model card block {index}>", "exec")
        except SyntaxError as error:
            raise ValueError(f"model card code block {index} is not valid Python: {error}") from None
    card = ModelCard(text)
    data = card.data
    for key in ("library_name", "pipeline_tag", "license"):
        if getattr(data, key) != header.get(key):
            raise ValueError(f"model card field {key} reads back as {getattr(data, key)!r}, not {header.get(key)!r}")
    if "custom_code" not in (data.tags or []):
        raise ValueError("model card tags must include custom_code")
    if len(data.eval_results or []) != num_results:
        raise ValueError(f"model card lists {len(data.eval_results or [])} results, expected {num_results}")


__all__ = [
    "EXAMPLE_IMAGE",
    "IMAGENET_1K",
    "PAPER_RESULTS",
    "ProbeResults",
    "ProbeTask",
    "TrainingRun",
    "architecture_table",
    "default_figure_caption",
    "hub_id_or_none",
    "probe_table",
    "python_blocks",
    "render_model_card",
    "results_table",
]
