"""Fill the STELLAR model card template (`MODEL_CARD.md`) for one checkpoint.

    from stellar_hf.model_card import render_model_card, PAPER_RESULTS
    text = render_model_card(config, model_id="me/stellar-b16", results=PAPER_RESULTS["stellar-b16"])
    Path("stellar-b16-hf/README.md").write_text(text)

The template sits at the repository root and is reached through the `stellar_hf/MODEL_CARD.md` symlink (shipped as
package data). The filled card's YAML header is rebuilt from Python values and checked with
`huggingface_hub.ModelCard`, so what this returns always parses on the Hub. Not imported by `stellar_hf/__init__.py`
and never needed by the model files.
"""

import json
import re
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard
from huggingface_hub.repocard_data import eval_results_to_model_index

from .configuration_stellar import StellarConfig

TEMPLATE_PATH = Path(__file__).with_name("MODEL_CARD.md")
PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
IMAGENET_1K = "ILSVRC/imagenet-1k"
_REQUIRED_RESULT_KEYS = ("task", "dataset", "metric", "value")
_OPTIONAL_RESULT_KEYS = {
    "split", "name", "task_name", "dataset_name", "dataset_config", "source_name", "source_url", "verified",
}  # fmt: skip
_BACKBONE_NAMES = {384: "ViT-S", 768: "ViT-B", 1024: "ViT-L", 1280: "ViT-H"}

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


def _training_data(datasets: list[str]) -> str:
    if not datasets:
        return "The training data of this checkpoint is described under *Training procedure* below."
    links = ", ".join(f"[{name}](https://huggingface.co/datasets/{name})" for name in datasets)
    return f"Trained without labels on: {links}."


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
    base_model: str | None = "facebook/vit-mae-base",
    datasets: list[str] | None = None,
    results: list[dict[str, Any]] | None = None,
) -> str:
    """
    Fill `MODEL_CARD.md` for a checkpoint with `config`.

    Args:
        config: the checkpoint's [`StellarConfig`]; sizes, output shapes and the architecture table come from it.
        training_details: Markdown describing how this checkpoint was made (data, steps, settings); may be empty.
        model_id: the Hub repository id (or local name) used in the code snippets and as the model-index name.
        base_model: the Hub id the encoder was initialised from; `None` or `""` leaves `base_model` out.
        datasets: Hub dataset ids the checkpoint was trained on (`[IMAGENET_1K]` for the released models);
            `None` or `[]` leaves `datasets` out, e.g. for the built-in synthetic scenes or a private image folder.
        results: one dict per reported number with `task` (e.g. `"image-classification"`), `dataset` (a Hub id),
            `metric` (e.g. `"accuracy"`, `"fid"`), `value`, and optionally `split`, `name` (the protocol, shown on the
            Hub), `task_name`, `dataset_name`, `dataset_config`, `source_name`, `source_url`, `verified`. Without
            results the card has no `model-index`.

    Returns:
        the card as text: a YAML header that `huggingface_hub.ModelCard` parses, then Markdown, with no placeholder
        left.
    """
    if not isinstance(config, StellarConfig):
        raise ValueError(f"config must be a StellarConfig, got {type(config).__name__}")
    if not model_id or not isinstance(model_id, str):
        raise ValueError(f"model_id must be a non-empty string, got {model_id!r}")
    datasets = list(datasets or [])
    if any(not isinstance(name, str) or not name for name in datasets):
        raise ValueError(f"datasets must be non-empty strings, got {datasets}")
    results = list(results or [])
    eval_results = _eval_results(results)

    header_text, body = _split_header(TEMPLATE_PATH.read_text(encoding="utf-8"))
    header = yaml.safe_load(
        _fill(
            header_text,
            {
                "base_model": json.dumps(base_model or None),
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
    body = _fill(
        body,
        {
            "model_id": model_id,
            "base_model_link": f"[{base_model}](https://huggingface.co/{base_model})"
            if base_model
            else "none (random initialisation)",
            "datasets": ", ".join(datasets) if datasets else "see the training procedure",
            "training_data": _training_data(datasets),
            "training_details": training_details.strip() or "No run-specific details were recorded.",
            "architecture_table": architecture_table(config),
            "results_table": results_table(results),
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
    text = "---\n" + yaml.safe_dump(header, sort_keys=False, allow_unicode=True) + "---\n" + body
    _validate(text, header, len(eval_results))
    return text


def _validate(text: str, header: dict[str, Any], num_results: int) -> None:
    """Parse the card back with `huggingface_hub` and check the fields the Hub and users rely on."""
    leftover = PLACEHOLDER.findall(text)
    if leftover:
        raise ValueError(f"unfilled placeholders in the model card: {sorted(set(leftover))}")
    card = ModelCard(text)
    data = card.data
    for key in ("library_name", "pipeline_tag", "license"):
        if getattr(data, key) != header.get(key):
            raise ValueError(f"model card field {key} reads back as {getattr(data, key)!r}, not {header.get(key)!r}")
    if "custom_code" not in (data.tags or []):
        raise ValueError("model card tags must include custom_code")
    if len(data.eval_results or []) != num_results:
        raise ValueError(f"model card lists {len(data.eval_results or [])} results, expected {num_results}")


__all__ = ["IMAGENET_1K", "PAPER_RESULTS", "architecture_table", "render_model_card", "results_table"]
