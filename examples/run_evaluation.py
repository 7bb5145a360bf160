#!/usr/bin/env python
"""Evaluate a frozen STELLAR model: kNN, linear probe, reconstruction, object discovery, segmentation (spec section 5).

    python examples/run_evaluation.py knn --model outputs/stellar-pretrain          # the Quick start's colour kNN figure
    python examples/run_evaluation.py linear-probe --model outputs/stellar-pretrain --label all
    python examples/run_evaluation.py knn --model path/to/stellar --train_dir data/train --eval_dir data/val
    python examples/run_evaluation.py linear-probe --model org/stellar-b16 --dataset_name ILSVRC/imagenet-1k \\
        --eval_split validation --epochs 30 --learning_rate 1e-3 --device cuda --batch_size 256
    python examples/run_evaluation.py reconstruction --model path/to/stellar --synthetic --train_decoder_steps 2000 \\
        --lpips_weights ~/weights/alexnet-owt-7be5be79.pth
    python examples/run_evaluation.py object-discovery --model path/to/stellar --num_images 500
    python examples/run_evaluation.py segmentation --model outputs/stellar-pretrain --feature all   # synthetic scenes
    python examples/run_evaluation.py segmentation --model path/to/stellar --dataset_name scene_parse_150 \\
        --num_classes 150 --reduce_labels --device cuda
    python examples/run_evaluation.py segmentation --model path/to/stellar --train_dir images/train \\
        --train_label_dir labels/train --eval_dir images/val --eval_label_dir labels/val --num_classes 21

Data: `--train_dir` / `--eval_dir` (image folders with one subfolder per class, the `datasets` imagefolder layout),
`--dataset_name` (a Hub dataset, a local imagefolder, or a `save_to_disk` folder), or `--synthetic`, the built-in
synthetic scenes (the default when no data is given; the only data with object masks, so the only data for
`object-discovery`). `segmentation` reads image folders paired with label-PNG folders (`--train_label_dir`,
`--eval_label_dir`), a dataset with an image and an annotation column (the `scene_parse_150` layout), or the
synthetic scenes' object masks as class maps. Images are preprocessed by the image processor saved with the model
when there is one, else by `StellarImageProcessor.from_model_config(config)` (shorter side to 256 / 224 of
`config.image_size`, centre crop, the config's mean and std); synthetic scenes are rendered at `config.image_size`
and only normalised (`stellar_hf.evaluation.probe_processor`), so their masks stay aligned.

What `knn` and `linear-probe` predict is the *label*: for image folders the class subfolder (`class`), for a dataset
its `--label_column_name` column, for the synthetic scenes `--label dominant_color` (the default: the Quick start's
headline figure), `dominant_shape` or `all`. On the synthetic scenes the defaults are the Quick start's probe recipe
(`examples/pretrain.py`'s final evaluation: 2048 train / 1024 validation scenes, batches of 128, the same kNN and
probe settings), so `knn --model outputs/stellar-pretrain` prints the figure the Quick start printed for that label.
Every figure is written with its label, number of classes, chance (1 / classes), the majority-class rate and, where
cheap, the same protocol on a randomly initialised encoder.

Every subcommand prints one final JSON line with its metrics (accuracies in [0, 1]) and writes it to
`--output_json` when given; `knn` and `linear-probe` first print one readable line per label on standard error.
Reconstruction always reports PSNR and SSIM; LPIPS and rFID need network weights on this machine
(`--lpips_weights`, `--inception_weights`, or the torch hub cache) and are otherwise listed under "skipped" with the
reason.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

try:
    import stellar_hf  # registers the STELLAR classes with the Auto classes
except ModuleNotFoundError as error:
    if error.name != "stellar_hf":
        raise
    # Not installed: use the package of the checkout this script sits in.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import stellar_hf  # noqa: F401

SUBCOMMANDS = (
    "knn",
    "linear-probe",
    "reconstruction",
    "object-discovery",
    "segmentation",
)
CLASSIFICATION = ("knn", "linear-probe")
# Synthetic scenes per split for reconstruction and object discovery (knn / linear-probe follow the probe recipe).
DEFAULT_SYNTHETIC_IMAGES = 1000
# Feature batch of reconstruction and object discovery (knn / linear-probe: the probe recipe's PROBE_BATCH_SIZE).
DEFAULT_BATCH_SIZE = 64
# `--random_init auto` runs the random-init reference (a second feature extraction) up to this many images in all.
RANDOM_INIT_AUTO_LIMIT = 20_000


# ----------------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------------


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="folder or Hub id of a STELLAR model (any STELLAR class)")
    parser.add_argument("--output_json", type=Path, help="also write the final JSON line to this file")
    parser.add_argument(
        "--batch_size",
        type=int,
        help="images per forward pass (default: 128 for knn / linear-probe, the probe recipe's; else "
        f"{DEFAULT_BATCH_SIZE})",
    )
    parser.add_argument("--device", default="auto", help="'auto' (cuda, then mps, then cpu), or a torch device")
    parser.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument(
        "--num_images",
        type=int,
        help="at most this many images per split (a seeded random subset of folders and datasets); synthetic "
        "scenes: images generated per split (default: 2048 train / 1024 eval for knn / linear-probe, the Quick "
        f"start's probe recipe; {DEFAULT_SYNTHETIC_IMAGES} otherwise)",
    )
    parser.add_argument("--num_train_images", type=int, help="as --num_images, for the training split only")
    parser.add_argument("--num_eval_images", type=int, help="as --num_images, for the evaluation split only")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of subsets, synthetic scenes, probe initialisation and shuffling, and the random-init encoder",
    )
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    data = parser.add_argument_group("data (one of: image folders, a dataset, or the synthetic scenes)")
    data.add_argument("--train_dir", type=Path, help="labelled image folder (one subfolder per class) to fit on")
    data.add_argument("--eval_dir", type=Path, help="labelled image folder to evaluate on, same class subfolders")
    data.add_argument("--dataset_name", help="Hub dataset id, local imagefolder, or save_to_disk folder")
    data.add_argument("--dataset_config_name", help="configuration of --dataset_name")
    data.add_argument("--train_split", default="train", help="split of --dataset_name to fit on")
    data.add_argument("--eval_split", default="validation", help="split of --dataset_name to evaluate on")
    data.add_argument("--image_column_name", default="image", help="image column of --dataset_name")
    data.add_argument("--label_column_name", default="label", help="label column of --dataset_name")
    data.add_argument("--cache_dir", help="datasets cache folder")
    data.add_argument("--synthetic", action="store_true", help="the built-in synthetic scenes (default without data)")


def add_random_init_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--random_init",
        choices=("auto", "yes", "no"),
        default="auto",
        help="also run the protocol on a randomly initialised encoder of the same config (seeded by --seed), the "
        f"reference a trained figure is read against; auto: when both splits hold at most {RANDOM_INIT_AUTO_LIMIT} "
        "images in all (it doubles the feature extraction)",
    )


def add_feature_argument(parser: argparse.ArgumentParser) -> None:
    from stellar_hf.evaluation import FEATURES

    parser.add_argument(
        "--feature",
        choices=FEATURES,
        default="pooled",
        help="pooled: mean of the sparse tokens (the paper's); cls: the CLS token; dense-mean: mean patch token",
    )


def add_label_arguments(parser: argparse.ArgumentParser) -> None:
    from stellar_hf.evaluation import DEFAULT_SYNTHETIC_LABEL, SYNTHETIC_LABEL_NAMES

    parser.add_argument(
        "--label",
        choices=(*SYNTHETIC_LABEL_NAMES, "all"),
        help=f"synthetic scenes only: the label to predict, the colour or the shape of each scene's dominant object, "
        f"or both (default {DEFAULT_SYNTHETIC_LABEL}, the Quick start's headline figure). Image folders are labelled "
        "by their class subfolder, datasets by --label_column_name",
    )
    add_random_init_argument(parser)


def add_segmentation_arguments(parser: argparse.ArgumentParser) -> None:
    from stellar_hf.segmentation import (
        DEFAULT_SYNTHETIC_SEGMENTATION_CLASSES,
        SEGMENTATION_EPOCHS,
        SEGMENTATION_FEATURES,
        SEGMENTATION_LEARNING_RATE,
        SEGMENTATION_WEIGHT_DECAY,
        SYNTHETIC_SEGMENTATION_CLASSES,
    )

    parser.add_argument(
        "--feature",
        choices=(*SEGMENTATION_FEATURES, "all"),
        default="dense",
        help="the frozen patch grid the probe reads: dense (the encoder's patch tokens, the paper's), lowrank (F = A S, "
        "STELLAR's factorised grid), spatial_map (A alone, r channels), or all three from one feature extraction",
    )
    add_random_init_argument(parser)
    parser.add_argument(
        "--epochs",
        type=int,
        default=SEGMENTATION_EPOCHS,
        help="probe training epochs (upstream: 80)",
    )
    parser.add_argument(
        "--learning_rate",
        type=float,
        default=SEGMENTATION_LEARNING_RATE,
        help="AdamW learning rate, constant",
    )
    parser.add_argument(
        "--weight_decay",
        type=float,
        default=SEGMENTATION_WEIGHT_DECAY,
        help="AdamW weight decay",
    )
    parser.add_argument("--probe_batch_size", type=int, default=64, help="images per probe step")
    parser.add_argument(
        "--feature_dtype",
        choices=("float32", "float16", "bfloat16"),
        default="float32",
        help="dtype the extracted feature grids are kept in memory (float16 halves it; the probe trains in float32)",
    )
    labels = parser.add_argument_group("segmentation labels")
    labels.add_argument(
        "--num_classes",
        type=int,
        help="classes of the label maps (values 0..N-1; 255 is ignored); required for folders and datasets",
    )
    labels.add_argument(
        "--train_label_dir",
        type=Path,
        help="label PNGs named as the images of --train_dir",
    )
    labels.add_argument(
        "--eval_label_dir",
        type=Path,
        help="label PNGs named as the images of --eval_dir",
    )
    labels.add_argument(
        "--annotation_column_name",
        default="annotation",
        help="label-map column of --dataset_name (scene_parse_150's)",
    )
    labels.add_argument(
        "--reduce_labels",
        action="store_true",
        help="labels number their classes from 1 with 0 for unlabelled pixels (ADE20K, scene_parse_150): 0 becomes "
        "the ignore label 255 and every other value v becomes v - 1",
    )
    labels.add_argument(
        "--classes",
        choices=SYNTHETIC_SEGMENTATION_CLASSES,
        help="synthetic scenes only: class 0 is the background, then one class per shape (7 in all), per colour (9), "
        f"or one object class (2); default {DEFAULT_SYNTHETIC_SEGMENTATION_CLASSES}",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    # Each subcommand's own parser, so that argument errors print that subcommand's usage.
    parser.subcommand_parsers = subparsers.choices

    knn = subparsers.add_parser("knn", help="DINO's weighted kNN on frozen features")
    add_common_arguments(knn)
    add_feature_argument(knn)
    add_label_arguments(knn)
    knn.add_argument("--k", type=int, default=20, help="neighbours that vote")
    knn.add_argument("--temperature", type=float, default=0.07, help="votes are weighted by exp(cosine / T)")

    probe = subparsers.add_parser("linear-probe", help="LayerNorm + Linear on frozen features, AdamW")
    add_common_arguments(probe)
    add_feature_argument(probe)
    add_label_arguments(probe)
    probe.add_argument("--epochs", type=int, default=30, help="probe training epochs")
    probe.add_argument("--learning_rate", type=float, default=1e-3, help="AdamW learning rate (cosine schedule)")
    probe.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay")
    probe.add_argument("--probe_batch_size", type=int, default=256, help="features per probe step")

    reconstruction = subparsers.add_parser("reconstruction", help="PSNR, SSIM, LPIPS, rFID of the decoder")
    add_common_arguments(reconstruction)
    reconstruction.add_argument(
        "--train_decoder_steps",
        type=int,
        default=0,
        help="first train the paper's reconstruction probe: a fresh decoder and head on the frozen low-rank "
        "features, for this many steps on the training split (0: use the model's own decoder)",
    )
    reconstruction.add_argument("--decoder_learning_rate", type=float, default=5e-4, help="probe decoder AdamW lr")
    reconstruction.add_argument("--decoder_weight_decay", type=float, default=0.05, help="probe decoder weight decay")
    reconstruction.add_argument(
        "--lpips_net", choices=("alex", "vgg", "squeeze"), default="alex", help="LPIPS backbone"
    )
    reconstruction.add_argument(
        "--lpips_weights",
        type=Path,
        help="torchvision ImageNet state dict of the LPIPS backbone (alexnet-owt-7be5be79.pth for alex); default: "
        "the torch hub cache, else LPIPS is skipped",
    )
    reconstruction.add_argument(
        "--inception_weights",
        type=Path,
        help="torch-fidelity's FID Inception weights (weights-inception-2015-12-05-6726825d.pth); default: the "
        "torch hub cache, else rFID is skipped",
    )
    reconstruction.add_argument("--no_lpips", action="store_true", help="do not compute LPIPS")
    reconstruction.add_argument("--no_rfid", action="store_true", help="do not compute rFID")
    reconstruction.add_argument(
        "--vq_tokenizer", help="MaskGIT VQGAN folder or Hub id, for VQ-target models (default: the one in the config)"
    )

    discovery = subparsers.add_parser(
        "object-discovery", help="FG-ARI and mBO of the spatial-map segments (synthetic scenes only)"
    )
    add_common_arguments(discovery)

    segmentation = subparsers.add_parser(
        "segmentation",
        help="linear segmentation probe (BatchNorm + 1x1 conv) on the frozen patch grid: mIoU",
    )
    add_common_arguments(segmentation)
    add_segmentation_arguments(segmentation)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    sub = parser.subcommand_parsers[args.command]
    if args.batch_size is not None and args.batch_size < 1:
        sub.error(f"--batch_size must be at least 1, got {args.batch_size}")
    for flag in ("num_images", "num_train_images", "num_eval_images"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            sub.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    sources = [name for name, given in (("image folders", args.train_dir or args.eval_dir), ("--dataset_name", args.dataset_name), ("--synthetic", args.synthetic)) if given]  # fmt: skip
    if len(sources) > 1:
        sub.error(f"choose one data source, got {' and '.join(sources)}")
    if not sources:
        args.synthetic = True
    if args.command in CLASSIFICATION and args.label is not None and not args.synthetic:
        what = "--dataset_name is labelled by its --label_column_name column" if args.dataset_name else "image folders are labelled by their class subfolder"  # fmt: skip
        sub.error(f"--label {args.label} names a label of the synthetic scenes; {what}")
    if args.batch_size is None:
        from stellar_hf.evaluation import PROBE_BATCH_SIZE

        args.batch_size = PROBE_BATCH_SIZE if args.command in CLASSIFICATION else DEFAULT_BATCH_SIZE
    needs_train = args.command in ("knn", "linear-probe", "segmentation") or getattr(args, "train_decoder_steps", 0) > 0
    if args.command == "segmentation":
        check_segmentation_args(args, sub)
    if args.command == "object-discovery" and not args.synthetic:
        sub.error(
            "object-discovery needs per-pixel object masks, which only the built-in synthetic scenes provide; "
            "run it with --synthetic (or without data arguments), not with image folders or --dataset_name"
        )
    if (args.train_dir or args.eval_dir) and args.command != "segmentation":
        if args.eval_dir is None:
            sub.error("--train_dir needs --eval_dir: the folder of labelled images to evaluate on")
        if needs_train and args.train_dir is None:
            sub.error(f"{args.command} fits on training images: give --train_dir as well as --eval_dir")
        for flag, folder in (("--train_dir", args.train_dir), ("--eval_dir", args.eval_dir)):
            if folder is not None and not folder.is_dir():
                sub.error(f"{flag} {folder} does not exist or is not a directory")
    if args.command == "knn" and (args.k < 1 or args.temperature <= 0):
        sub.error("--k must be positive and --temperature above zero")
    if args.command == "linear-probe" and (args.epochs < 1 or args.learning_rate <= 0):
        sub.error("--epochs must be positive and --learning_rate above zero")
    if args.command == "reconstruction" and args.train_decoder_steps < 0:
        sub.error(f"--train_decoder_steps must be 0 or positive, got {args.train_decoder_steps}")
    if args.output_json is not None and args.output_json.is_dir():
        sub.error(f"--output_json {args.output_json} is a directory")
    return args


def check_segmentation_args(args, sub) -> None:
    """The segmentation subcommand's own argument checks: data, classes and probe settings."""
    if args.epochs < 1 or args.learning_rate <= 0 or args.probe_batch_size < 1:
        sub.error("--epochs and --probe_batch_size must be positive and --learning_rate above zero")
    if args.synthetic:
        given = [flag for flag, value in (("--num_classes", args.num_classes), ("--reduce_labels", args.reduce_labels), ("--train_label_dir", args.train_label_dir), ("--eval_label_dir", args.eval_label_dir)) if value]  # fmt: skip
        if given:
            sub.error(
                f"{', '.join(given)} apply to folders and datasets; the synthetic scenes' classes are set by --classes"
            )
        return
    if args.classes is not None:
        sub.error("--classes names the class maps of the synthetic scenes; folders and datasets bring their own labels")
    if args.num_classes is None:
        sub.error("segmentation of folders or a dataset needs --num_classes (label values 0..N-1, 255 ignored)")
    if not 2 <= args.num_classes <= 255:
        sub.error(f"--num_classes must be in 2..255 (255 is the ignore label), got {args.num_classes}")
    if args.dataset_name:
        if args.train_label_dir or args.eval_label_dir:
            sub.error("--train_label_dir / --eval_label_dir go with --train_dir / --eval_dir, not --dataset_name")
        return
    pairs = (("--train_dir", args.train_dir), ("--train_label_dir", args.train_label_dir), ("--eval_dir", args.eval_dir), ("--eval_label_dir", args.eval_label_dir))  # fmt: skip
    missing = [flag for flag, value in pairs if value is None]
    if missing:
        sub.error(
            "segmentation on folders needs --train_dir, --train_label_dir, --eval_dir and --eval_label_dir (images "
            f"and same-named label PNGs); missing: {', '.join(missing)}"
        )
    for flag, folder in pairs:
        if not folder.is_dir():
            sub.error(f"{flag} {folder} does not exist or is not a directory")


def fail(message: str) -> None:
    """Stop with a one-line error (exit status 2, like argparse)."""
    print(f"run_evaluation.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


# ----------------------------------------------------------------------------------------------------------------------
# Model and preprocessing
# ----------------------------------------------------------------------------------------------------------------------


def hub_advice(model_id: str, error: BaseException) -> str:
    """
    What to do, when `error` says that the Hub id `model_id` could not be fetched (no network, or offline mode and not
    in the cache): empty for other errors, such as a repository that does not exist.
    """
    from stellar_hf.encoder_init import hub_download_advice, hub_offline, is_network_error

    if Path(model_id).exists():
        return ""
    seen = []
    while error is not None and len(seen) < 20:
        seen.append(error)
        if is_network_error(error) or type(error).__name__ == "LocalEntryNotFoundError":
            return " " + hub_download_advice(model_id, offline=hub_offline())
        error = error.__cause__ or error.__context__
    return ""


def load_config(model_id: str):
    """The model's `StellarConfig`, read before anything large is loaded so that data errors surface first."""
    from stellar_hf import StellarConfig

    try:
        config_dict, _ = StellarConfig.get_config_dict(model_id)
        if config_dict.get("model_type") != StellarConfig.model_type:
            fail(f"{model_id} holds a {config_dict.get('model_type')!r} model, not a STELLAR model")
        return StellarConfig.from_pretrained(model_id)
    except (OSError, ValueError) as error:
        fail(f"cannot load a STELLAR configuration from {model_id}: {error}{hub_advice(model_id, error)}")


def load_model(args, config, device: torch.device):
    """`StellarModel` (probes, object discovery) or `StellarForImageReconstruction`, from any STELLAR checkpoint."""
    from stellar_hf import StellarForImageReconstruction, StellarModel

    model_class = StellarForImageReconstruction if args.command == "reconstruction" else StellarModel
    try:
        model, info = model_class.from_pretrained(args.model, config=config, output_loading_info=True)
    except (OSError, ValueError) as error:
        fail(f"cannot load a STELLAR model from {args.model}: {error}{hub_advice(args.model, error)}")
    if args.command == "reconstruction" and not args.train_decoder_steps:
        missing = sorted(key for key in info["missing_keys"] if key.startswith(("decoder.", "reconstruction_head.")))
        if missing:
            fail(
                f"{args.model} has no trained decoder ({len(missing)} decoder weights missing, e.g. {missing[0]}): "
                "pass --train_decoder_steps N to train the reconstruction probe first"
            )
    return model.to(device).eval()


def load_processor(model_id: str):
    """The image processor saved with the model, or None when there is none."""
    from transformers import AutoImageProcessor

    local = Path(model_id)
    if local.is_dir() and not (local / "preprocessor_config.json").is_file():
        return None
    try:
        return AutoImageProcessor.from_pretrained(model_id)
    except (OSError, ValueError):
        return None


class Preprocess:
    """
    PIL images -> `pixel_values` `(B, 3, H, W)` with one image processor (`self.processor`):

    - synthetic scenes: `stellar_hf.evaluation.probe_processor(config)` (rendered at the model's size: no resize or
      crop, so object masks stay aligned), with the saved processor's normalisation when the model has one;
    - folders and datasets: the processor saved with the model, else `StellarImageProcessor.from_model_config`.

    `description` says which, for the results' "preprocessing" field.
    """

    def __init__(self, saved_processor, config, synthetic: bool):
        from stellar_hf.evaluation import probe_processor
        from stellar_hf.image_processing_stellar import StellarImageProcessor

        if synthetic:
            self.processor = probe_processor(config)
            if saved_processor is not None:
                self.processor.do_normalize = getattr(saved_processor, "do_normalize", True)
                self.processor.image_mean = list(saved_processor.image_mean)
                self.processor.image_std = list(saved_processor.image_std)
            self.description = f"StellarImageProcessor (no resize or crop: scenes rendered at {config.image_size} px)"
        elif saved_processor is not None:
            self.processor = saved_processor
            self.description = "image processor"
        else:
            self.processor = StellarImageProcessor.from_model_config(config)
            self.description = (
                f"StellarImageProcessor (shorter side {self.processor.size.shortest_edge}, centre crop "
                f"{config.image_size})"
            )

    def __call__(self, images: list) -> torch.Tensor:
        return self.processor(images=images, return_tensors="pt")["pixel_values"]


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------


class ColumnLabel:
    """`item -> class index` for a dataset's label column (a `ClassLabel`, or raw values indexed by `label_map`)."""

    def __init__(self, column: str, label_map: dict | None = None):
        self.column = column
        self.label_map = label_map

    def __call__(self, item: dict) -> int:
        value = item[self.column]
        return int(self.label_map[value] if self.label_map is not None else value)


class Items(Dataset):
    """
    Uniform items `{"image": PIL RGB, "labels": [int per label] or None, "mask": tensor or None}` from any source;
    `label_of` holds one `item -> class index` function per label.
    """

    def __init__(self, source, indices=None, image_column="image", label_of=()):
        self.source = source
        self.indices = list(range(len(source))) if indices is None else indices
        self.image_column = image_column
        self.label_of = tuple(label_of)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        from stellar_hf.data import to_rgb

        item = self.source[self.indices[index]]
        labels = [label_of(item) for label_of in self.label_of] if self.label_of else None
        return {"image": to_rgb(item[self.image_column]), "labels": labels, "mask": item.get("mask")}


def subset_indices(size: int, limit: int | None, seed: int) -> list[int] | None:
    """A sorted, seeded random subset of `limit` indices (folders are sorted by class, so a prefix would not do)."""
    if limit is None or limit >= size:
        return None
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(size, generator=generator)[:limit].tolist())


def split_limits(args) -> dict:
    """Images per split asked for: `--num_train_images` / `--num_eval_images`, else `--num_images`, else None."""
    return {
        "train": args.num_train_images if args.num_train_images is not None else args.num_images,
        "eval": args.num_eval_images if args.num_eval_images is not None else args.num_images,
    }


def folder_splits(args, splits: list[str], need_labels: bool) -> tuple[dict, list]:
    from stellar_hf.data import load_image_folder
    from stellar_hf.evaluation import folder_probe_label

    folders = {"train": args.train_dir, "eval": args.eval_dir}
    loaded = {}
    for split in splits:
        try:
            # Labels only where a probe needs them: reconstruction reads any folder of images.
            loaded[split] = load_image_folder(folders[split], labels=need_labels)
        except ValueError as error:
            fail(f"--{split}_dir: {error}")
    if need_labels and loaded["train"].class_names != loaded["eval"].class_names:
        train, evaluation = set(loaded["train"].class_names), set(loaded["eval"].class_names)
        fail(
            "--train_dir and --eval_dir must hold the same class subfolders; only in --train_dir: "
            f"{sorted(train - evaluation) or 'none'}, only in --eval_dir: {sorted(evaluation - train) or 'none'}"
        )
    labels = [folder_probe_label(loaded["train"].class_names)] if need_labels else []
    limits = split_limits(args)
    datasets = {
        split: Items(
            folder, subset_indices(len(folder), limits[split], args.seed), label_of=[label.label_of for label in labels]
        )
        for split, folder in loaded.items()
    }
    return datasets, labels


def hub_splits(args, splits: list[str], need_labels: bool) -> tuple[dict, list]:
    from stellar_hf.data import load_hub_dataset
    from stellar_hf.evaluation import ProbeLabel

    names = {"train": args.train_split, "eval": args.eval_split}
    loaded = {}
    for split in splits:
        try:
            loaded[split] = load_hub_dataset(
                args.dataset_name,
                args.dataset_config_name,
                split=names[split],
                image_column=args.image_column_name,
                cache_dir=args.cache_dir,
            )
        except (ValueError, FileNotFoundError, OSError) as error:
            fail(f"cannot load split {names[split]!r} of {args.dataset_name}: {error}")
    labels = []
    if need_labels:
        label_column = args.label_column_name
        for split, dataset in loaded.items():
            if label_column not in dataset.column_names:
                fail(
                    f"split {names[split]!r} of {args.dataset_name} has no label column {label_column!r} (columns: "
                    f"{dataset.column_names}); pass --label_column_name"
                )
        feature = next(iter(loaded.values())).features[label_column]
        label_map = None
        if hasattr(feature, "names"):  # a ClassLabel: integers with names
            class_names = list(feature.names)
            for split, dataset in loaded.items():
                other = getattr(dataset.features[label_column], "names", None)
                if other != class_names:
                    fail(f"the {label_column!r} classes of {args.train_split!r} and {args.eval_split!r} differ")
        else:  # raw values (strings or integers): index their sorted union
            values = sorted({value for dataset in loaded.values() for value in dataset.unique(label_column)}, key=str)
            label_map = {value: index for index, value in enumerate(values)}
            class_names = [str(value) for value in values]
        labels = [
            ProbeLabel(
                label_column,
                f"the {label_column!r} column of {args.dataset_name}",
                tuple(class_names),
                ColumnLabel(label_column, label_map),
            )
        ]
    limits = split_limits(args)
    datasets = {
        split: Items(
            dataset,
            subset_indices(len(dataset), limits[split], args.seed),
            image_column=args.image_column_name,
            label_of=[label.label_of for label in labels],
        )
        for split, dataset in loaded.items()
    }
    return datasets, labels


def synthetic_splits(args, splits: list[str], image_size: int, need_labels: bool) -> tuple[dict, list]:
    """The synthetic scenes: for the probes, the Quick start's recipe (`synthetic_probe_datasets`) by default."""
    from stellar_hf.evaluation import (
        DEFAULT_SYNTHETIC_LABEL,
        SYNTHETIC_PROBE_EVAL_IMAGES,
        SYNTHETIC_PROBE_TRAIN_IMAGES,
        synthetic_probe_datasets,
        synthetic_probe_labels,
    )

    defaults = (
        {"train": SYNTHETIC_PROBE_TRAIN_IMAGES, "eval": SYNTHETIC_PROBE_EVAL_IMAGES}
        if args.command in CLASSIFICATION
        else {"train": DEFAULT_SYNTHETIC_IMAGES, "eval": DEFAULT_SYNTHETIC_IMAGES}
    )
    sizes = {split: limit or defaults[split] for split, limit in split_limits(args).items()}
    train, evaluation = synthetic_probe_datasets(image_size, sizes["train"], sizes["eval"], seed=args.seed)
    labels = []
    if need_labels:
        available = synthetic_probe_labels()
        chosen = args.label or DEFAULT_SYNTHETIC_LABEL
        labels = list(available.values()) if chosen == "all" else [available[chosen]]
    sources = {"train": train, "eval": evaluation}
    datasets = {split: Items(sources[split], label_of=[label.label_of for label in labels]) for split in splits}
    return datasets, labels


def build_loaders(args, config, preprocess: Preprocess, splits: list[str], need_labels: bool, need_masks: bool):
    """`({split: DataLoader}, [ProbeLabel] (empty without labels), {split: number of images})`."""
    if args.synthetic:
        datasets, labels = synthetic_splits(args, splits, config.image_size, need_labels)
    elif args.dataset_name:
        datasets, labels = hub_splits(args, splits, need_labels)
    else:
        datasets, labels = folder_splits(args, splits, need_labels)

    def collate(items: list[dict]) -> dict:
        batch = {"pixel_values": preprocess([item["image"] for item in items])}
        if need_labels:
            batch["labels"] = torch.tensor([item["labels"] for item in items], dtype=torch.long)
        if need_masks:
            batch["masks"] = torch.stack([torch.as_tensor(item["mask"]).long() for item in items])
        return batch

    loaders = split_loaders(args, datasets, collate)
    return loaders, labels, {split: len(dataset) for split, dataset in datasets.items()}


def segmentation_splits(args, config) -> tuple[dict, tuple | None, int]:
    """`({split: SegmentationDataset}, class names or None, number of classes)` for the segmentation subcommand."""
    from stellar_hf.segmentation import (
        DEFAULT_SYNTHETIC_SEGMENTATION_CLASSES,
        SegmentationDataset,
        load_segmentation_folder,
        synthetic_segmentation,
        synthetic_segmentation_class_names,
    )

    limits = split_limits(args)
    if args.synthetic:
        from stellar_hf.data import SyntheticScenes

        classes = args.classes or DEFAULT_SYNTHETIC_SEGMENTATION_CLASSES
        names = synthetic_segmentation_class_names(classes)
        datasets = {
            split: synthetic_segmentation(
                SyntheticScenes(
                    num_images=limits[split] or DEFAULT_SYNTHETIC_IMAGES,
                    image_size=config.image_size,
                    split=scenes_split,
                    seed=args.seed,
                ),
                classes,
            )
            for split, scenes_split in (("train", "train"), ("eval", "validation"))
        }
        return datasets, names, len(names)
    sources = {}
    if args.dataset_name:
        from stellar_hf.data import load_hub_dataset

        names = {"train": args.train_split, "eval": args.eval_split}
        for split, name in names.items():
            try:
                sources[split] = load_hub_dataset(
                    args.dataset_name,
                    args.dataset_config_name,
                    split=name,
                    image_column=args.image_column_name,
                    cache_dir=args.cache_dir,
                )
            except (ValueError, FileNotFoundError, OSError) as error:
                fail(f"cannot load split {name!r} of {args.dataset_name}: {error}")
            if args.annotation_column_name not in sources[split].column_names:
                fail(
                    f"split {name!r} of {args.dataset_name} has no annotation column {args.annotation_column_name!r} "
                    f"(columns: {sources[split].column_names}); pass --annotation_column_name"
                )
        described = {split: f"split {name!r} of {args.dataset_name}" for split, name in names.items()}
    else:
        folders = {
            "train": (args.train_dir, args.train_label_dir),
            "eval": (args.eval_dir, args.eval_label_dir),
        }
        for split, (images, labels) in folders.items():
            try:
                sources[split] = load_segmentation_folder(images, labels)
            except ValueError as error:
                fail(f"--{split}_dir / --{split}_label_dir: {error}")
        described = {split: f"--{split}_dir" for split in folders}
    datasets = {
        split: SegmentationDataset(
            source,
            args.num_classes,
            image_column=args.image_column_name,
            annotation_column=args.annotation_column_name,
            reduce=args.reduce_labels,
            indices=subset_indices(len(source), limits[split], args.seed),
            name=described[split],
        )
        for split, source in sources.items()
    }
    return datasets, None, args.num_classes


def save_results(path: Path, result: dict) -> None:
    """`result` as JSON at `path`: written beside it and renamed in, so a kill or a full disk leaves the previous file
    whole (or none), never a cut one."""
    from stellar_hf.checkpointing import replace_atomically

    path.parent.mkdir(parents=True, exist_ok=True)
    with replace_atomically(path) as temporary:
        temporary.write_text(json.dumps(json_safe(result), indent=2, allow_nan=False) + "\n")


def split_loaders(args, datasets: dict, collate) -> dict:
    """`{split: DataLoader}` over `datasets` in order (no shuffling: evaluation), `--batch_size` and `--num_workers`."""
    return {
        split: DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers,
                          collate_fn=collate)  # fmt: skip
        for split, dataset in datasets.items()
    }


def segmentation_loaders(args, config, preprocess: Preprocess):
    """`({split: DataLoader of {"pixel_values", "labels" (B, S, S)}}, class names or None, classes, {split: size})`."""
    from stellar_hf.segmentation import SegmentationCollator

    datasets, class_names, num_classes = segmentation_splits(args, config)
    collate = SegmentationCollator(preprocess.processor)
    loaders = split_loaders(args, datasets, collate)
    return (
        loaders,
        class_names,
        num_classes,
        {split: len(dataset) for split, dataset in datasets.items()},
    )


def describe_data(args) -> dict:
    if args.synthetic:
        return {"source": "synthetic", "seed": args.seed}
    if args.dataset_name:
        described = {"source": args.dataset_name, "config": args.dataset_config_name, "train_split": args.train_split, "eval_split": args.eval_split}  # fmt: skip
        if args.command == "segmentation":
            described["annotation_column"] = args.annotation_column_name
        return described
    described = {"source": "image_folders", "train_dir": str(args.train_dir) if args.train_dir else None, "eval_dir": str(args.eval_dir)}  # fmt: skip
    if args.command == "segmentation":
        described.update(
            train_label_dir=str(args.train_label_dir),
            eval_label_dir=str(args.eval_label_dir),
        )
    return described


# ----------------------------------------------------------------------------------------------------------------------
# Subcommands
# ----------------------------------------------------------------------------------------------------------------------


def random_init_reason(args, sizes: dict) -> str | None:
    """None when the random-init reference is to be run, else why not."""
    if args.random_init == "no":
        return "not requested (--random_init no)"
    total = sum(sizes.values())
    if args.random_init == "auto" and total > RANDOM_INIT_AUTO_LIMIT:
        return f"{total} images exceed the --random_init auto limit of {RANDOM_INIT_AUTO_LIMIT}; pass --random_init yes"
    return None


def classification_scores(args, train_features, train_labels, eval_features, eval_labels, num_classes) -> dict:
    from stellar_hf.evaluation import knn_accuracy, linear_probe

    if args.command == "knn":
        return knn_accuracy(
            train_features, train_labels, eval_features, eval_labels, args.k, args.temperature, num_classes
        )
    return linear_probe(
        train_features,
        train_labels,
        eval_features,
        eval_labels,
        num_classes=num_classes,
        epochs=args.epochs,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        batch_size=args.probe_batch_size,
        seed=args.seed,
    )


def run_classification(args, model, loaders, labels, sizes, device) -> dict:
    """
    Top-1 / top-5 of the protocol for every label, each with what it measures: the label, its classes, chance, the
    majority-class rate and the same protocol on a randomly initialised encoder (when run).
    """
    from stellar_hf.evaluation import extract_features, majority_class_accuracy, random_init_encoder

    progress = not args.no_progress
    encoders = {"trained": model}
    skipped = random_init_reason(args, sizes)
    if skipped is None:
        encoders["random_init"] = random_init_encoder(model.config, seed=args.seed).to(device)
    features = {}
    for name, encoder in encoders.items():
        train = extract_features(encoder, loaders["train"], args.feature, device, progress=progress)
        evaluation = extract_features(encoder, loaders["eval"], args.feature, device, progress=progress)
        features[name] = (train, evaluation)
    per_label = {}
    for column, label in enumerate(labels):
        entry = label.describe()
        (train_features, train_labels), (eval_features, eval_labels) = features["trained"]
        train_labels, eval_labels = train_labels[:, column], eval_labels[:, column]
        entry["majority_class"] = majority_class_accuracy(train_labels, eval_labels)
        for name in encoders:
            (train_features, _), (eval_features, _) = features[name]
            scores = classification_scores(
                args, train_features, train_labels, eval_features, eval_labels, label.num_classes
            )
            prefix = "" if name == "trained" else "random_init_"
            entry[f"{prefix}top1"] = scores["top1"]
            # With five classes or fewer every class is in the top 5: the figure would always be 1.
            entry[f"{prefix}top5"] = scores["top5"] if label.num_classes > 5 else None
        if skipped is not None:
            entry["random_init_top1"] = entry["random_init_top5"] = None
            entry["random_init_skipped"] = skipped
        if label.num_classes <= 5:
            entry["top5_note"] = f"not reported: with {label.num_classes} classes every class is in the top 5"
        per_label[label.name] = entry
    if args.command == "knn":
        settings = {"k": args.k, "temperature": args.temperature}
    else:
        settings = {"epochs": args.epochs, "learning_rate": args.learning_rate, "weight_decay": args.weight_decay}
    common = {"feature": args.feature, **settings}
    if len(per_label) == 1:
        return {**next(iter(per_label.values())), **common}
    return {"label": "all", "labels": per_label, **common}


def summary_lines(result: dict) -> list[str]:
    """One readable line per label of a knn / linear-probe result: the figure next to what it is read against."""
    entries = result["labels"].values() if "labels" in result else [result]
    lines = []
    for entry in entries:
        line = (
            f"{result['task']} top-1 {entry['top1']:.3f} on label {entry['label']} ({entry['label_description']}; "
            f"{entry['num_classes']} classes): chance {entry['chance']:.3f}, majority class "
            f"{entry['majority_class']:.3f}, "
        )
        if entry.get("random_init_top1") is not None:
            line += f"random-init encoder {entry['random_init_top1']:.3f}"
        else:
            line += f"random-init encoder not run ({entry.get('random_init_skipped')})"
        source = {"synthetic": "synthetic scenes", "image_folders": "image folders"}.get(
            result["data"]["source"], result["data"]["source"]
        )
        line += (
            f"; {result['feature']} feature, {result['num_train_images']} train / {result['num_eval_images']} eval "
            f"images of {source}"
        )
        lines.append(line)
    return lines


def run_reconstruction(args, model, loaders, device) -> dict:
    from stellar_hf.evaluation import build_reconstruction_metrics, evaluate_reconstruction, train_reconstruction_probe

    tokenizer = None
    if model.config.reconstruction_target == "vq":
        try:
            tokenizer = model.load_vq_tokenizer(args.vq_tokenizer)
            if tokenizer is not None:
                tokenizer.to(device)
        except (OSError, ValueError) as error:
            fail(f"cannot load the VQ tokenizer {args.vq_tokenizer or model.config.vq_tokenizer_name_or_path}: {error}")
        if tokenizer is None:
            fail("this model predicts MaskGIT VQGAN codes: pass --vq_tokenizer (a MaskGIT VQGAN folder or Hub id)")
    results = {"decoder": "model"}
    if args.train_decoder_steps:
        probe = train_reconstruction_probe(
            model,
            loaders["train"],
            args.train_decoder_steps,
            learning_rate=args.decoder_learning_rate,
            weight_decay=args.decoder_weight_decay,
            vq_tokenizer=tokenizer,
            device=device,
            seed=args.seed,
            progress=not args.no_progress,
        )
        results = {
            "decoder": "probe",
            "decoder_steps": probe["steps"],
            "decoder_initial_loss": probe["initial_loss"],
            "decoder_final_loss": probe["final_loss"],
        }
    metrics, skipped = build_reconstruction_metrics(
        lpips_net=None if args.no_lpips else args.lpips_net,
        lpips_weights=args.lpips_weights,
        inception_weights=args.inception_weights,
        compute_rfid=not args.no_rfid,
        device=device,
    )
    for name, reason in skipped.items():
        if reason != "not requested":
            print(f"skipping {name}: {reason}", file=sys.stderr)
    scores = evaluate_reconstruction(
        model, loaders["eval"], metrics, vq_tokenizer=tokenizer, device=device, progress=not args.no_progress
    )
    if "rfid" in scores and scores["num_images"] < 2048:
        results["rfid_note"] = (
            f"rFID from {scores['num_images']} images: biased upwards below ~2048 (rank-deficient covariance); "
            "compare only at equal image counts"
        )
    return {**scores, **results, "reconstruction_target": model.config.reconstruction_target, "skipped": skipped}


def run_object_discovery(args, model, loaders, device) -> dict:
    from stellar_hf.evaluation import evaluate_object_discovery, grid_blocks

    try:
        scores = evaluate_object_discovery(model, loaders["eval"], device, progress=not args.no_progress)
    except ValueError as error:
        fail(str(error))
    config = model.config
    side = config.image_size // config.patch_size
    rows, columns = grid_blocks(config.num_sparse_tokens, (side, side))
    return {**scores, "num_sparse_tokens": config.num_sparse_tokens, "grid_blocks": f"{rows}x{columns}"}


def run_segmentation(args, model, loaders, class_names, num_classes, sizes, device) -> dict:
    """
    mIoU and pixel accuracy of the linear segmentation probe for each requested feature grid, next to the majority
    class and the same probe on a randomly initialised encoder (when run).
    """
    from stellar_hf.evaluation import random_init_encoder
    from stellar_hf.segmentation import (
        DEFAULT_SYNTHETIC_SEGMENTATION_CLASSES,
        MEAN_IOU_CLASSES,
        SEGMENTATION_FEATURES,
        extract_segmentation_features,
        majority_class_scores,
        segmentation_probe,
    )

    features = list(SEGMENTATION_FEATURES) if args.feature == "all" else [args.feature]
    storage_dtype = getattr(torch, args.feature_dtype)
    progress = not args.no_progress
    encoders = {"trained": model}
    skipped = random_init_reason(args, sizes)
    if skipped is None:
        encoders["random_init"] = random_init_encoder(model.config, seed=args.seed).to(device)
    grids, labels = {}, {}
    for name, encoder in encoders.items():
        for split in ("train", "eval"):
            try:
                grids[name, split], labels[split] = extract_segmentation_features(
                    encoder, loaders[split], features, device, storage_dtype, progress
                )
            except ValueError as error:
                fail(str(error))
    majority = majority_class_scores(labels["train"], labels["eval"], num_classes)
    per_feature = {}
    for feature in features:
        entry = {"num_channels": grids["trained", "train"][feature].shape[1]}
        for name in encoders:
            scores = segmentation_probe(
                grids[name, "train"][feature],
                labels["train"],
                grids[name, "eval"][feature],
                labels["eval"],
                num_classes,
                epochs=args.epochs,
                learning_rate=args.learning_rate,
                weight_decay=args.weight_decay,
                batch_size=args.probe_batch_size,
                seed=args.seed,
                device=device,
            )
            if name == "trained":
                entry.update(scores)
            else:
                for key in (
                    "mean_iou",
                    "pixel_accuracy",
                    "grid_mean_iou",
                    "grid_pixel_accuracy",
                ):
                    entry[f"random_init_{key}"] = scores[key]
        if skipped is not None:
            for key in (
                "mean_iou",
                "pixel_accuracy",
                "grid_mean_iou",
                "grid_pixel_accuracy",
            ):
                entry[f"random_init_{key}"] = None
            entry["random_init_skipped"] = skipped
        per_feature[feature] = entry
    grid = tuple(grids["trained", "eval"][features[0]].shape[-2:])
    common = {
        "num_classes": num_classes,
        "class_names": list(class_names) if class_names is not None else None,
        "classes": (args.classes or DEFAULT_SYNTHETIC_SEGMENTATION_CLASSES) if args.synthetic else None,
        "ignore_index": 255,
        "mean_iou_over": MEAN_IOU_CLASSES,
        "label_size": list(labels["eval"].shape[-2:]),
        "logit_grid": list(grid),
        "majority_class_mean_iou": majority["mean_iou"],
        "majority_class_pixel_accuracy": majority["pixel_accuracy"],
        "epochs": args.epochs,
        "learning_rate": args.learning_rate,
        "weight_decay": args.weight_decay,
        "probe_batch_size": args.probe_batch_size,
        "reduce_labels": args.reduce_labels,
    }
    if len(per_feature) == 1:
        return {"feature": features[0], **per_feature[features[0]], **common}
    return {"feature": "all", "features": per_feature, **common}


def segmentation_summary_lines(result: dict) -> list[str]:
    """One readable line per feature of a segmentation result: mIoU next to the random-init encoder and the floor."""
    entries = result["features"] if "features" in result else {result["feature"]: result}
    lines = []
    for feature, entry in entries.items():
        line = (
            f"segmentation mIoU {entry['mean_iou']:.3f}, pixel accuracy {entry['pixel_accuracy']:.3f} (logit grid "
            f"{entry['grid_mean_iou']:.3f}, {entry['grid_pixel_accuracy']:.3f}) on the {feature} feature, "
            f"{result['num_classes']} classes: "
        )
        if entry.get("random_init_mean_iou") is not None:
            line += (
                f"random-init encoder {entry['random_init_mean_iou']:.3f}, {entry['random_init_pixel_accuracy']:.3f}; "
            )
        else:
            line += f"random-init encoder not run ({entry.get('random_init_skipped')}); "
        line += (
            f"majority class {result['majority_class_mean_iou']:.3f}, {result['majority_class_pixel_accuracy']:.3f}; "
            f"{result['num_train_images']} train / {result['num_eval_images']} eval images"
        )
        lines.append(line)
    return lines


def json_safe(value):
    """Non-finite floats become null, so the line is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    from stellar_hf.devices import resolve_device

    device = resolve_device(args.device)
    config = load_config(args.model)
    processor = load_processor(args.model)
    preprocess = Preprocess(processor, config, args.synthetic)

    if args.command == "segmentation":
        loaders, class_names, num_classes, sizes = segmentation_loaders(args, config, preprocess)
        model = load_model(args, config, device)
        try:
            metrics = run_segmentation(args, model, loaders, class_names, num_classes, sizes, device)
        except ValueError as error:  # a label map that is not what the arguments say (values, size)
            fail(str(error))
        return finish(args, metrics, sizes, config, preprocess, device)

    if args.command in CLASSIFICATION:
        splits, need_labels = ["train", "eval"], True
    elif args.command == "reconstruction":
        splits, need_labels = (["train", "eval"] if args.train_decoder_steps else ["eval"]), False
    else:
        splits, need_labels = ["eval"], False
    need_masks = args.command == "object-discovery"
    loaders, labels, sizes = build_loaders(args, config, preprocess, splits, need_labels, need_masks)
    model = load_model(args, config, device)

    if args.command in CLASSIFICATION:
        metrics = run_classification(args, model, loaders, labels, sizes, device)
    elif args.command == "reconstruction":
        metrics = run_reconstruction(args, model, loaders, device)
    else:
        metrics = run_object_discovery(args, model, loaders, device)
    return finish(args, metrics, sizes, config, preprocess, device)


def finish(args, metrics: dict, sizes: dict, config, preprocess: Preprocess, device) -> int:
    """Print (and write) the final JSON line, after the readable lines on standard error."""
    result = {
        "task": args.command,
        **metrics,
        "num_train_images": sizes.get("train"),
        "num_eval_images": sizes["eval"],
        "model": str(args.model),
        "data": describe_data(args),
        "preprocessing": preprocess.description,
        "image_size": config.image_size,
        "device": str(device),
    }
    line = json.dumps(json_safe(result), allow_nan=False)
    if args.command in CLASSIFICATION:
        for summary in summary_lines(result):
            print(summary, file=sys.stderr)
    if args.command == "segmentation":
        for summary in segmentation_summary_lines(result):
            print(summary, file=sys.stderr)
    if args.output_json is not None:
        save_results(args.output_json, result)
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
