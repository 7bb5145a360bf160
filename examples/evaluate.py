#!/usr/bin/env python
"""Evaluate a frozen STELLAR model: kNN, linear probe, reconstruction and object discovery (spec section 5).

    python examples/evaluate.py knn --model path/to/stellar --train_dir data/train --eval_dir data/val
    python examples/evaluate.py linear-probe --model org/stellar-b16 --dataset_name ILSVRC/imagenet-1k \\
        --eval_split validation --epochs 30 --learning_rate 1e-3 --device cuda --batch_size 256
    python examples/evaluate.py reconstruction --model path/to/stellar --synthetic --train_decoder_steps 2000 \\
        --lpips_weights ~/weights/alexnet-owt-7be5be79.pth
    python examples/evaluate.py object-discovery --model path/to/stellar --num_images 500

Data: `--train_dir` / `--eval_dir` (image folders with one subfolder per class, the `datasets` imagefolder layout),
`--dataset_name` (a Hub dataset, a local imagefolder, or a `save_to_disk` folder), or `--synthetic`, the built-in
synthetic scenes (the default when no data is given; the only data with object masks, so the only data for
`object-discovery`). Images are preprocessed by the image processor saved with the model when there is one, else
resized and centre-cropped to `config.image_size` (`stellar_hf.data.EvalTransform`) and ImageNet-normalised;
synthetic scenes are rendered at `config.image_size` and only normalised, so their masks stay aligned.

Every subcommand prints one final JSON line with its metrics (accuracies in [0, 1]) and writes it to
`--output_json` when given. Reconstruction always reports PSNR and SSIM; LPIPS and rFID need network weights on this
machine (`--lpips_weights`, `--inception_weights`, or the torch hub cache) and are otherwise listed under "skipped"
with the reason.
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

SUBCOMMANDS = ("knn", "linear-probe", "reconstruction", "object-discovery")
DEFAULT_SYNTHETIC_IMAGES = 1000


# ----------------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------------


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="folder or Hub id of a STELLAR model (any STELLAR class)")
    parser.add_argument("--output_json", type=Path, help="also write the final JSON line to this file")
    parser.add_argument("--batch_size", type=int, default=64, help="images per forward pass")
    parser.add_argument("--device", default="auto", help="'auto' (cuda, then mps, then cpu), or a torch device")
    parser.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument(
        "--num_images",
        type=int,
        help=f"at most this many images per split (a seeded random subset of folders and datasets); synthetic "
        f"scenes: images generated per split (default {DEFAULT_SYNTHETIC_IMAGES})",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of subsets, probe initialisation and shuffling")
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


def add_feature_argument(parser: argparse.ArgumentParser) -> None:
    from stellar_hf.evaluation import FEATURES

    parser.add_argument(
        "--feature",
        choices=FEATURES,
        default="pooled",
        help="pooled: mean of the sparse tokens (the paper's); cls: the CLS token; dense-mean: mean patch token",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    # Each subcommand's own parser, so that argument errors print that subcommand's usage.
    parser.subcommand_parsers = subparsers.choices

    knn = subparsers.add_parser("knn", help="DINO's weighted kNN on frozen features")
    add_common_arguments(knn)
    add_feature_argument(knn)
    knn.add_argument("--k", type=int, default=20, help="neighbours that vote")
    knn.add_argument("--temperature", type=float, default=0.07, help="votes are weighted by exp(cosine / T)")

    probe = subparsers.add_parser("linear-probe", help="LayerNorm + Linear on frozen features, AdamW")
    add_common_arguments(probe)
    add_feature_argument(probe)
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
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    sub = parser.subcommand_parsers[args.command]
    if args.batch_size < 1:
        sub.error(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.num_images is not None and args.num_images < 1:
        sub.error(f"--num_images must be at least 1, got {args.num_images}")
    sources = [name for name, given in (("image folders", args.train_dir or args.eval_dir), ("--dataset_name", args.dataset_name), ("--synthetic", args.synthetic)) if given]  # fmt: skip
    if len(sources) > 1:
        sub.error(f"choose one data source, got {' and '.join(sources)}")
    if not sources:
        args.synthetic = True
    needs_train = args.command in ("knn", "linear-probe") or getattr(args, "train_decoder_steps", 0) > 0
    if args.command == "object-discovery" and not args.synthetic:
        sub.error(
            "object-discovery needs per-pixel object masks, which only the built-in synthetic scenes provide; "
            "run it with --synthetic (or without data arguments), not with image folders or --dataset_name"
        )
    if args.train_dir or args.eval_dir:
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


def fail(message: str) -> None:
    """Stop with a one-line error (exit status 2, like argparse)."""
    print(f"evaluate.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


# ----------------------------------------------------------------------------------------------------------------------
# Model and preprocessing
# ----------------------------------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def load_config(model_id: str):
    """The model's `StellarConfig`, read before anything large is loaded so that data errors surface first."""
    from stellar_hf import StellarConfig

    try:
        config_dict, _ = StellarConfig.get_config_dict(model_id)
        if config_dict.get("model_type") != StellarConfig.model_type:
            fail(f"{model_id} holds a {config_dict.get('model_type')!r} model, not a STELLAR model")
        return StellarConfig.from_pretrained(model_id)
    except (OSError, ValueError) as error:
        fail(f"cannot load a STELLAR configuration from {model_id}: {error}")


def load_model(args, config, device: torch.device):
    """`StellarModel` (probes, object discovery) or `StellarForImageReconstruction`, from any STELLAR checkpoint."""
    from stellar_hf import StellarForImageReconstruction, StellarModel

    model_class = StellarForImageReconstruction if args.command == "reconstruction" else StellarModel
    try:
        model, info = model_class.from_pretrained(args.model, config=config, output_loading_info=True)
    except (OSError, ValueError) as error:
        fail(f"cannot load a STELLAR model from {args.model}: {error}")
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


def normalization_stats(processor, config) -> tuple[tuple, tuple] | None:
    if processor is None:
        return tuple(config.image_mean), tuple(config.image_std)
    if not getattr(processor, "do_normalize", True):
        return None
    return tuple(processor.image_mean), tuple(processor.image_std)


class Preprocess:
    """PIL images -> normalised `pixel_values` `(B, 3, H, W)`: the model's processor, else `EvalTransform`."""

    def __init__(self, processor, config, synthetic: bool):
        from stellar_hf.data import EvalTransform

        self.processor = None if synthetic else processor
        self.stats = normalization_stats(processor, config)
        # Synthetic scenes are rendered at the model's size: no resize or crop, so object masks stay aligned.
        self.transform = EvalTransform(config.image_size, resize_size=config.image_size if synthetic else None)

    def __call__(self, images: list) -> torch.Tensor:
        from stellar_hf.data import normalize

        if self.processor is not None:
            return self.processor(images=images, return_tensors="pt")["pixel_values"]
        pixel_values = torch.stack([self.transform(image) for image in images])
        return pixel_values if self.stats is None else normalize(pixel_values, *self.stats)


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------


class Items(Dataset):
    """Uniform items `{"image": PIL RGB, "label": int or None, "mask": tensor or None}` from any of the sources."""

    def __init__(self, source, indices=None, image_column="image", label_column=None, label_map=None):
        self.source = source
        self.indices = list(range(len(source))) if indices is None else indices
        self.image_column = image_column
        self.label_column = label_column
        self.label_map = label_map

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        from stellar_hf.data import to_rgb

        item = self.source[self.indices[index]]
        label = item.get(self.label_column) if self.label_column else item.get("label")
        if label is not None and self.label_map is not None:
            label = self.label_map[label]
        return {"image": to_rgb(item[self.image_column]), "label": label, "mask": item.get("mask")}


def subset_indices(size: int, limit: int | None, seed: int) -> list[int] | None:
    """A sorted, seeded random subset of `limit` indices (folders are sorted by class, so a prefix would not do)."""
    if limit is None or limit >= size:
        return None
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(size, generator=generator)[:limit].tolist())


def folder_splits(args, splits: list[str], need_labels: bool) -> tuple[dict, list[str] | None]:
    from stellar_hf.data import load_image_folder

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
    class_names = next(iter(loaded.values())).class_names
    datasets = {
        split: Items(folder, subset_indices(len(folder), args.num_images, args.seed))
        for split, folder in loaded.items()
    }
    return datasets, class_names


def hub_splits(args, splits: list[str], need_labels: bool) -> tuple[dict, list[str] | None]:
    from stellar_hf.data import load_hub_dataset

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
    label_column, label_map, class_names = None, None, None
    if need_labels:
        label_column = args.label_column_name
        for split, dataset in loaded.items():
            if label_column not in dataset.column_names:
                fail(
                    f"split {names[split]!r} of {args.dataset_name} has no label column {label_column!r} (columns: "
                    f"{dataset.column_names}); pass --label_column_name"
                )
        feature = next(iter(loaded.values())).features[label_column]
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
    datasets = {
        split: Items(
            dataset,
            subset_indices(len(dataset), args.num_images, args.seed),
            image_column=args.image_column_name,
            label_column=label_column,
            label_map=label_map,
        )
        for split, dataset in loaded.items()
    }
    return datasets, class_names


def synthetic_splits(args, splits: list[str], image_size: int) -> tuple[dict, list[str]]:
    from stellar_hf.data import CLASS_NAMES, SyntheticScenes

    names = {"train": "train", "eval": "validation"}
    num_images = args.num_images or DEFAULT_SYNTHETIC_IMAGES
    datasets = {
        split: Items(SyntheticScenes(num_images=num_images, image_size=image_size, split=names[split], seed=args.seed))
        for split in splits
    }
    return datasets, list(CLASS_NAMES)


def build_loaders(args, config, preprocess: Preprocess, splits: list[str], need_labels: bool, need_masks: bool):
    if args.synthetic:
        datasets, class_names = synthetic_splits(args, splits, config.image_size)
    elif args.dataset_name:
        datasets, class_names = hub_splits(args, splits, need_labels)
    else:
        datasets, class_names = folder_splits(args, splits, need_labels)

    def collate(items: list[dict]) -> dict:
        batch = {"pixel_values": preprocess([item["image"] for item in items])}
        if need_labels:
            batch["labels"] = torch.tensor([int(item["label"]) for item in items])
        if need_masks:
            batch["masks"] = torch.stack([torch.as_tensor(item["mask"]).long() for item in items])
        return batch

    loaders = {
        split: DataLoader(
            dataset,
            batch_size=args.batch_size,
            shuffle=False,
            num_workers=args.num_workers,
            collate_fn=collate,
        )
        for split, dataset in datasets.items()
    }
    return loaders, class_names, {split: len(dataset) for split, dataset in datasets.items()}


def describe_data(args) -> dict:
    if args.synthetic:
        return {"source": "synthetic", "seed": args.seed}
    if args.dataset_name:
        return {"source": args.dataset_name, "config": args.dataset_config_name, "train_split": args.train_split, "eval_split": args.eval_split}  # fmt: skip
    return {"source": "image_folders", "train_dir": str(args.train_dir) if args.train_dir else None, "eval_dir": str(args.eval_dir)}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# Subcommands
# ----------------------------------------------------------------------------------------------------------------------


def run_classification(args, model, loaders, class_names, device) -> dict:
    from stellar_hf.evaluation import extract_features, knn_accuracy, linear_probe

    progress = not args.no_progress
    train_features, train_labels = extract_features(model, loaders["train"], args.feature, device, progress=progress)
    eval_features, eval_labels = extract_features(model, loaders["eval"], args.feature, device, progress=progress)
    num_classes = len(class_names) if class_names else int(torch.cat([train_labels, eval_labels]).max()) + 1
    if args.command == "knn":
        scores = knn_accuracy(
            train_features, train_labels, eval_features, eval_labels, args.k, args.temperature, num_classes
        )
        settings = {"k": args.k, "temperature": args.temperature}
    else:
        scores = linear_probe(
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
        settings = {"epochs": args.epochs, "learning_rate": args.learning_rate, "weight_decay": args.weight_decay}
    return {
        "top1": scores["top1"],
        "top5": scores["top5"],
        "chance": 1.0 / num_classes,
        "num_classes": num_classes,
        "feature": args.feature,
        **settings,
    }


def run_reconstruction(args, model, loaders, device) -> dict:
    from stellar_hf.evaluation import build_reconstruction_metrics, evaluate_reconstruction, train_reconstruction_probe

    tokenizer = None
    if model.config.reconstruction_target == "vq":
        try:
            tokenizer = model.get_vq_tokenizer(args.vq_tokenizer, device)
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
    device = resolve_device(args.device)
    config = load_config(args.model)
    processor = load_processor(args.model)
    preprocess = Preprocess(processor, config, args.synthetic)

    if args.command in ("knn", "linear-probe"):
        splits, need_labels = ["train", "eval"], True
    elif args.command == "reconstruction":
        splits, need_labels = (["train", "eval"] if args.train_decoder_steps else ["eval"]), False
    else:
        splits, need_labels = ["eval"], False
    need_masks = args.command == "object-discovery"
    loaders, class_names, sizes = build_loaders(args, config, preprocess, splits, need_labels, need_masks)
    model = load_model(args, config, device)

    if args.command in ("knn", "linear-probe"):
        metrics = run_classification(args, model, loaders, class_names, device)
    elif args.command == "reconstruction":
        metrics = run_reconstruction(args, model, loaders, device)
    else:
        metrics = run_object_discovery(args, model, loaders, device)

    result = {
        "task": args.command,
        **metrics,
        "num_train_images": sizes.get("train"),
        "num_eval_images": sizes["eval"],
        "model": str(args.model),
        "data": describe_data(args),
        "preprocessing": "image processor" if preprocess.processor is not None else "EvalTransform",
        "image_size": config.image_size,
        "device": str(device),
    }
    line = json.dumps(json_safe(result), allow_nan=False)
    if args.output_json is not None:
        args.output_json.parent.mkdir(parents=True, exist_ok=True)
        args.output_json.write_text(json.dumps(json_safe(result), indent=2, allow_nan=False) + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
