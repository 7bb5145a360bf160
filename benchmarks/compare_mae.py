"""STELLAR against transformers' MAE (`ViTMAEForPreTraining`) at an equal pretraining budget, on frozen features.

    python benchmarks/compare_mae.py                                   # synthetic scenes + scikit-learn digits, CPU
    python benchmarks/compare_mae.py --steps 300 --batch_size 64 --output_json outputs/compare_mae.json
    python benchmarks/compare_mae.py --train_dir ~/data/train --eval_dir ~/data/val --image_size 64 --device cuda

For each dataset, two models are pretrained from scratch, in lockstep on the *same* batches:

- STELLAR: `StellarForPreTraining` with the pixel reconstruction target (the small synthetic preset of
  `examples/pretrain.py` unless `--config_overrides` says otherwise), all of its losses and views;
- MAE: `ViTMAEForPreTraining` with the same encoder (width, depth, heads, MLP, patch and image size, activation,
  LayerNorm eps, QKV bias, init range), a decoder of STELLAR's decoder size, `mask_ratio` 0.75 (MAE's recipe;
  `--mae_mask_ratio`) and `norm_pix_loss=False`, so that its predictions are (normalised) pixels. It is fed the
  main image of each item (`pixel_values`: a random resized crop with flip, no colour jitter), which is also the
  image STELLAR reconstructs.

Both get the same seed before construction, the same number of steps and batch size, AdamW with the same learning
rate (`--base_learning_rate` x batch / 256), betas, weight decay and no-decay rule (`no_decay_parameter_groups` of
`examples/pretrain.py`: biases, norms, CLS / position / sparse tokens), the same warmup + cosine schedule and the same
gradient clipping. Masking noise of both comes from `masking_generator(seed, step, ...)`, so a run is reproducible.
The budget is equal in steps and images, not in FLOPs: STELLAR's step also encodes its masked global and local views,
while MAE encodes only the 25 % of patches it keeps; the training seconds of each model are reported.

Then, with both encoders frozen, on held-out images:

- `knn`: DINO's weighted kNN (cosine, k = 20, T = 0.07), top-1 accuracy;
- `linear_probe`: the paper's LayerNorm + Linear head, AdamW, 30 epochs, top-1 accuracy;
  features: STELLAR's `pooler_output` (mean of its sparse tokens); MAE's mean of its final (post-LayerNorm) patch
  tokens, computed by `ViTMAEModel` with `config.mask_ratio = 0` and `noise = arange(N)`, so every patch is kept, in
  its original order (transformers 5.24 reads the ratio from the config at every forward);
- `psnr` (dB, mean over images, both on the [0, 1] scale after un-normalising and clamping):
  STELLAR: its own decoder on the full image (`StellarForImageReconstruction` with the pretrained weights: encoder ->
  sparse tokens x spatial map -> decoder -> pixels); MAE: its own decoder in its standard setting, at its training
  mask ratio with fixed noise, **measured on the masked patches only** (the patches MAE predicts and is trained on).
  MAE's decoder is never trained on visible patches, so as a second view `psnr_all_visible` reconstructs with
  `mask_ratio = 0` (every patch visible, no mask tokens) and scores the full image; `ssim` is reported for the
  full-image reconstructions (STELLAR's, and MAE's all-visible one);
- `pixels.knn`: the same kNN on the raw normalised pixels, the floor any representation should clear.

Data. Default: two datasets, each pretrained on separately.
- `synthetic`: the package's synthetic scenes (`--num_synthetic_images` for pretraining; probes train on the first
  min(N, 2048) of them and evaluate on `--num_synthetic_eval_images` validation scenes). Two probe tasks, as in
  `examples/pretrain.py`: the colour and the shape of the dominant object.
- `digits`: scikit-learn's 1797 handwritten digits (8 x 8 grey levels, bundled with scikit-learn, offline), upscaled
  bicubically to the image size as RGB PNGs in a temporary folder; one image in three of every class is held out for
  evaluation; pretraining uses the other two thirds. Task: the digit (10 classes).
With `--train_dir` and `--eval_dir` (labelled image folders, one subfolder per class), one dataset `folder` instead:
pretraining on the `--train_dir` images, probes trained with its labels and evaluated on `--eval_dir`.

Output: a table, then one JSON line (also written to `--output_json`). One block per dataset and task, keyed
`<dataset>` when the dataset has one task (`digits`, `folder`) and `<dataset>-<task>` otherwise
(`synthetic-color`, `synthetic-shape`):

    {"synthetic-color": {"stellar": {"knn", "linear_probe", "psnr", "ssim",
                                     "random_init_knn", "random_init_linear_probe"},
                         "mae": {"knn", "linear_probe", "psnr", "psnr_all_visible", "ssim_all_visible",
                                 "random_init_knn", "random_init_linear_probe"},
                         "pixels": {"knn"}, "chance", "num_classes", "num_train", "num_eval"},
     "synthetic-shape": {...}, "digits": {...},
     "settings": {training, models, protocols, per-dataset training time and losses, machine, versions}}

Accuracies are in [0, 1]. `random_init_*` are the same probes on the very same encoders before their first step
(both start from the seed's weights), to show how much of a score pretraining earned. The reconstruction numbers
belong to the dataset, so the blocks of one dataset's tasks repeat them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "examples"))

import pretrain as pretrain_example  # examples/pretrain.py: the pretraining pieces

from stellar_hf import StellarConfig
from stellar_hf.data import collate_views
from stellar_hf.evaluation import (
    ReconstructionMetrics,
    evaluate_reconstruction,
    extract_features,
    knn_accuracy,
    linear_probe,
)
from stellar_hf.modeling_stellar import (
    StellarForImageReconstruction,
    StellarForPreTraining,
    unnormalize,
)

DEFAULT_DATASETS = ("synthetic", "digits")
# The sizes both models share (MAE's decoder takes STELLAR's decoder sizes).
ENCODER_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "patch_size",
    "image_size",
)
DECODER_FIELDS = (
    "decoder_hidden_size",
    "decoder_num_hidden_layers",
    "decoder_num_attention_heads",
    "decoder_intermediate_size",
)
KNN_K, KNN_TEMPERATURE, PROBE_EPOCHS = 20, 0.07, 30
DIGITS_EVAL_EVERY = 3  # the third image of every class, then every third one, is held out


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Pretrain STELLAR and MAE at an equal budget; compare frozen features."
    )
    data = parser.add_argument_group("data (default: the synthetic scenes and scikit-learn's digits)")
    data.add_argument(
        "--train_dir", help="labelled image folder (one subfolder per class): pretraining and probe training"
    )
    data.add_argument(
        "--eval_dir", help="labelled image folder with the same classes: probe and reconstruction evaluation"
    )
    data.add_argument(
        "--datasets", default=",".join(DEFAULT_DATASETS), help="built-in datasets to run (synthetic,digits)"
    )
    data.add_argument("--num_synthetic_images", type=int, default=8192, help="synthetic pretraining images")
    data.add_argument("--num_synthetic_eval_images", type=int, default=1024, help="synthetic evaluation images")
    data.add_argument(
        "--num_digits_images", type=int, default=None, help="use only the first N digits (default: all 1797)"
    )
    data.add_argument("--num_workers", type=int, default=0, help="DataLoader workers for the pretraining views")

    model = parser.add_argument_group("models")
    model.add_argument("--image_size", type=int, default=48)
    model.add_argument(
        "--config_overrides",
        help='STELLAR config fields over the small synthetic preset, e.g. "hidden_size=192,num_hidden_layers=6"; '
        "MAE copies the encoder and decoder sizes from the result",
    )
    model.add_argument("--mae_mask_ratio", type=float, default=0.75, help="MAE's training mask ratio")

    optim = parser.add_argument_group("pretraining (the same for both models)")
    optim.add_argument("--steps", type=int, default=300)
    optim.add_argument("--batch_size", type=int, default=64)
    optim.add_argument(
        "--base_learning_rate",
        type=float,
        default=pretrain_example.SMALL_PRESET_BASE_LEARNING_RATE,
        help="lr = base_lr * batch / 256 (default: examples/pretrain.py's small-preset value)",
    )
    optim.add_argument("--seed", type=int, default=0)
    optim.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")

    parser.add_argument("--output_json", help="also write the results here")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    if bool(args.train_dir) != bool(args.eval_dir):
        parser.error("--train_dir and --eval_dir go together")
    args.datasets = [name.strip() for name in args.datasets.split(",") if name.strip()]
    unknown = sorted(set(args.datasets) - set(DEFAULT_DATASETS))
    if unknown:
        parser.error(f"--datasets: unknown {unknown}; choose from {list(DEFAULT_DATASETS)}")
    if args.train_dir:
        args.datasets = ["folder"]
    elif not args.datasets:
        parser.error("--datasets names no dataset")
    for name in ("steps", "batch_size", "num_synthetic_images", "num_synthetic_eval_images"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.num_digits_images is not None and args.num_digits_images < 10 * DIGITS_EVAL_EVERY:
        parser.error(f"--num_digits_images must be at least {10 * DIGITS_EVAL_EVERY} (every class in both splits)")
    if not 0.0 < args.mae_mask_ratio < 1.0:
        parser.error("--mae_mask_ratio must be in (0, 1)")
    return args


# ----------------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------------


def stellar_config(args) -> StellarConfig:
    """The small synthetic preset at `--image_size` (local views at half of it), with `--config_overrides` on top."""
    overrides = pretrain_example.parse_overrides(args.config_overrides)
    fields = {**pretrain_example.SMALL_SYNTHETIC_CONFIG, "image_size": args.image_size}
    patch_size = overrides.get("patch_size", fields["patch_size"])
    image_size = overrides.get("image_size", args.image_size)
    fields["local_image_size"] = max(patch_size, image_size // 2 // patch_size * patch_size)
    unknown = [key for key in overrides if not hasattr(StellarConfig(), key)]
    if unknown:
        raise SystemExit(f"error: --config_overrides names unknown StellarConfig fields: {unknown}")
    config = StellarConfig(**{**fields, **overrides})
    if config.reconstruction_target != "pixel":
        raise SystemExit(
            "error: the comparison uses the pixel reconstruction target (MAE's); drop reconstruction_target"
        )
    return config


def mae_config(config: StellarConfig, mask_ratio: float):
    """A `ViTMAEConfig` with STELLAR's encoder and decoder sizes; its target is the pixels, not normalised per patch."""
    from transformers import ViTMAEConfig

    return ViTMAEConfig(
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        hidden_act=config.hidden_act,
        layer_norm_eps=config.layer_norm_eps,
        qkv_bias=config.qkv_bias,
        initializer_range=config.initializer_range,
        hidden_dropout_prob=config.hidden_dropout_prob,
        attention_probs_dropout_prob=config.attention_probs_dropout_prob,
        image_size=config.image_size,
        patch_size=config.patch_size,
        num_channels=config.num_channels,
        decoder_hidden_size=config.decoder_hidden_size,
        decoder_num_hidden_layers=config.decoder_num_hidden_layers,
        decoder_num_attention_heads=config.decoder_num_attention_heads,
        decoder_intermediate_size=config.decoder_intermediate_size,
        mask_ratio=mask_ratio,
        norm_pix_loss=False,
    )


def build_models(config: StellarConfig, args, device: torch.device):
    """STELLAR and MAE, each built right after `torch.manual_seed(seed)`."""
    from transformers import ViTMAEForPreTraining

    torch.manual_seed(args.seed)
    stellar = StellarForPreTraining(config).to(device)
    torch.manual_seed(args.seed)
    mae = ViTMAEForPreTraining(mae_config(config, args.mae_mask_ratio)).to(device)
    return stellar, mae


@contextlib.contextmanager
def mae_mask_ratio(mae, ratio: float):
    """Temporarily set the mask ratio that `ViTMAEEmbeddings.random_masking` reads from its config."""
    model = getattr(mae, "vit", mae)
    configs = {id(c): c for c in (mae.config, model.config, model.embeddings.config)}.values()
    saved = [c.mask_ratio for c in configs]
    for c in configs:
        c.mask_ratio = ratio
    try:
        yield
    finally:
        for c, value in zip(configs, saved):
            c.mask_ratio = value


def ordered_noise(batch_size: int, num_patches: int, device: torch.device) -> torch.Tensor:
    """MAE noise that keeps patches in their original order (argsort of arange is the identity)."""
    return torch.arange(num_patches, dtype=torch.float32, device=device).expand(batch_size, num_patches)


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------


def write_digits(root: Path, image_size: int, limit: int | None) -> tuple[Path, Path]:
    """scikit-learn's digits as `train/<digit>/*.png` and `eval/<digit>/*.png` RGB images of `image_size` pixels."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, targets = digits.images, digits.target
    if limit is not None:
        images, targets = images[:limit], targets[:limit]
    counts = np.bincount(targets, minlength=10)
    if counts.min() < DIGITS_EVAL_EVERY:
        raise SystemExit(f"error: every digit needs {DIGITS_EVAL_EVERY} images; the first {len(targets)} give {counts}")
    seen = np.zeros(10, dtype=int)
    for index, (image, target) in enumerate(zip(images, targets)):
        split = "eval" if seen[target] % DIGITS_EVAL_EVERY == DIGITS_EVAL_EVERY - 1 else "train"
        seen[target] += 1
        folder = root / split / str(target)
        folder.mkdir(parents=True, exist_ok=True)
        grey = Image.fromarray((image * (255.0 / 16.0)).round().astype(np.uint8), mode="L")
        grey.resize((image_size, image_size), Image.Resampling.BICUBIC).convert("RGB").save(folder / f"{index:04d}.png")
    return root / "train", root / "eval"


def dataset_arguments(args, name: str, train_dir: Path | None = None, eval_dir: Path | None = None):
    """The namespace `examples/pretrain.py`'s `build_dataset`, `probe_labels` and `probe_loaders` read."""
    folder = name != "synthetic"
    return argparse.Namespace(
        train_dir=str(train_dir) if folder else None,
        dataset_name=None,
        probe_train_dir=str(train_dir) if folder else None,
        probe_eval_dir=str(eval_dir) if folder else None,
        num_synthetic_images=args.num_synthetic_images,
        num_synthetic_eval_images=args.num_synthetic_eval_images,
        image_column_name="image",
        label_column_name="label",
        seed=args.seed,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Pretraining
# ----------------------------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def optimizer_and_scheduler(model: torch.nn.Module, args, defaults: argparse.Namespace, learning_rate: float):
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW(
        pretrain_example.no_decay_parameter_groups(model, defaults.weight_decay),
        lr=learning_rate,
        betas=(defaults.adam_beta1, defaults.adam_beta2),
    )
    scheduler = get_scheduler(
        defaults.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=int(defaults.warmup_ratio * args.steps),
        num_training_steps=args.steps,
    )
    return optimizer, scheduler


def train_step(model, loss, optimizer, scheduler, max_grad_norm: float, name: str, step: int) -> float:
    if not torch.isfinite(loss.detach()):
        raise SystemExit(f"error: {name}'s loss became {loss.item()} at step {step + 1}; lower --base_learning_rate")
    loss.backward()
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def pretrain_pair(stellar, mae, dataset, args, device: torch.device) -> dict:
    """Train both models for `args.steps` steps on the same batches; returns seconds and losses of each."""
    defaults = pretrain_example.parse_args([])  # the example's optimiser defaults: weight decay, betas, schedule, ...
    learning_rate = args.base_learning_rate * args.batch_size / 256
    optimizers = {
        "stellar": optimizer_and_scheduler(stellar, args, defaults, learning_rate),
        "mae": optimizer_and_scheduler(mae, args, defaults, learning_rate),
    }
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=collate_views,
        num_workers=args.num_workers,
        generator=torch.Generator().manual_seed(args.seed),
    )
    if len(loader) == 0:
        raise SystemExit(f"error: {len(dataset)} pretraining images make no full batch of {args.batch_size}")
    config = stellar.config
    num_patches = (config.image_size // config.patch_size) ** 2
    seconds = {"stellar": 0.0, "mae": 0.0}
    losses = {"stellar": [], "mae": []}
    from tqdm.auto import tqdm

    progress = tqdm(total=args.steps, desc="pretrain STELLAR + MAE", disable=args.no_progress)
    stellar.train()
    mae.train()
    step, epoch = 0, 0
    while step < args.steps:
        dataset.set_epoch(epoch)
        for batch in loader:
            inputs = {key: value.to(device) for key, value in pretrain_example.to_model_inputs(batch, config).items()}
            optimizer, scheduler = optimizers["stellar"]
            synchronize(device)
            started = time.perf_counter()
            outputs = stellar(**inputs, generator=pretrain_example.masking_generator(args.seed, step, 0))
            losses["stellar"].append(
                train_step(stellar, outputs.loss, optimizer, scheduler, defaults.max_grad_norm, "STELLAR", step)
            )
            if stellar.teacher is not None:
                stellar.update_teacher(stellar.teacher_momentum(step, args.steps))
            synchronize(device)
            seconds["stellar"] += time.perf_counter() - started

            optimizer, scheduler = optimizers["mae"]
            noise_generator = pretrain_example.masking_generator(args.seed, step, 1)
            noise = torch.rand((args.batch_size, num_patches), generator=noise_generator).to(device)
            started = time.perf_counter()
            outputs = mae(pixel_values=inputs["pixel_values"], noise=noise)
            losses["mae"].append(
                train_step(mae, outputs.loss, optimizer, scheduler, defaults.max_grad_norm, "MAE", step)
            )
            synchronize(device)
            seconds["mae"] += time.perf_counter() - started

            step += 1
            progress.update(1)
            progress.set_postfix(stellar=f"{losses['stellar'][-1]:.3f}", mae=f"{losses['mae'][-1]:.3f}")
            if step >= args.steps:
                break
        epoch += 1
    progress.close()
    tail = max(1, args.steps // 10)
    return {
        "learning_rate": learning_rate,
        "epochs": round(args.steps * args.batch_size / len(dataset), 2),
        **{f"{name}_seconds": round(value, 1) for name, value in seconds.items()},
        **{f"{name}_first_loss": round(values[0], 5) for name, values in losses.items()},
        **{f"{name}_final_loss": round(sum(values[-tail:]) / tail, 5) for name, values in losses.items()},
    }


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def mae_features(mae, loader: DataLoader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of MAE's final patch tokens with every patch kept: `(n, d)` on the CPU, labels `(n, tasks)`."""
    encoder = mae.vit
    encoder.eval()
    features, labels = [], []
    with mae_mask_ratio(mae, 0.0):
        for batch in loader:
            pixel_values = batch["pixel_values"].to(device)
            num_patches = encoder.embeddings.patch_embeddings.num_patches
            outputs = encoder(pixel_values, noise=ordered_noise(pixel_values.shape[0], num_patches, device))
            features.append(outputs.last_hidden_state[:, 1:].mean(dim=1).float().cpu())
            labels.append(batch["labels"])
    return torch.cat(features), torch.cat(labels)


def pixel_features(loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised pixels, flattened: `(n, C*H*W)`, labels `(n, tasks)`."""
    features, labels = [], []
    for batch in loader:
        features.append(batch["pixel_values"].flatten(1).float())
        labels.append(batch["labels"])
    return torch.cat(features), torch.cat(labels)


@torch.no_grad()
def mae_reconstruction(mae, loader: DataLoader, config: StellarConfig, device: torch.device, seed: int) -> dict:
    """
    MAE's reconstruction PSNR, [0, 1] scale: `psnr` at its training mask ratio on the masked patches only (fixed
    noise from `seed`), `psnr_all_visible` / `ssim_all_visible` with every patch visible, on the full image.
    """
    mae.eval()
    generator = torch.Generator().manual_seed(seed)
    patch_area = config.patch_size**2 * config.num_channels
    masked_psnr = []
    full = ReconstructionMetrics()
    for batch in loader:
        pixel_values = batch["pixel_values"].to(device)
        target = unnormalize(pixel_values.float(), config).clamp(0, 1)
        size = tuple(pixel_values.shape[-2:])
        num_patches = (size[0] // config.patch_size) * (size[1] // config.patch_size)
        noise = torch.rand((pixel_values.shape[0], num_patches), generator=generator).to(device)
        outputs = mae(pixel_values=pixel_values, noise=noise)
        prediction = unnormalize(mae.unpatchify(outputs.logits, size).float(), config).clamp(0, 1)
        mask = mae.unpatchify(outputs.mask.unsqueeze(-1).expand(-1, -1, patch_area).float(), size)
        squared_error = ((prediction - target) ** 2 * mask).flatten(1).sum(dim=1) / mask.flatten(1).sum(dim=1)
        masked_psnr.append(10.0 * torch.log10(1.0 / squared_error.double()).cpu())
        with mae_mask_ratio(mae, 0.0):
            outputs = mae(pixel_values=pixel_values, noise=ordered_noise(pixel_values.shape[0], num_patches, device))
        full.update(unnormalize(mae.unpatchify(outputs.logits, size).float(), config).clamp(0, 1), target)
    all_visible = full.compute()
    return {
        "psnr": torch.cat(masked_psnr).mean().item(),
        "psnr_all_visible": all_visible["psnr"],
        "ssim_all_visible": all_visible["ssim"],
    }


def stellar_reconstruction(stellar: StellarForPreTraining, loader: DataLoader, device: torch.device) -> dict:
    """STELLAR's decoder on the full images, through `StellarForImageReconstruction` loaded with the trained weights."""
    model = StellarForImageReconstruction(stellar.config).to(device)
    missing, _ = model.load_state_dict(stellar.state_dict(), strict=False)
    if missing:
        raise RuntimeError(f"StellarForImageReconstruction lacks pretrained weights for {missing}")
    scores = evaluate_reconstruction(model, loader, device=device)
    return {"psnr": scores["psnr"], "ssim": scores["ssim"]}


def probe_scores(train, evaluation, column: int, num_classes: int, seed: int) -> dict:
    """kNN and linear-probe top-1 of one task (label column) for `(features, labels)` pairs."""
    (train_features, train_labels), (eval_features, eval_labels) = train, evaluation
    labels = train_labels[:, column], eval_labels[:, column]
    return {
        "knn": knn_accuracy(
            train_features, labels[0], eval_features, labels[1], k=KNN_K, temperature=KNN_TEMPERATURE,
            num_classes=num_classes,
        )["top1"],
        "linear_probe": linear_probe(
            train_features, labels[0], eval_features, labels[1], num_classes=num_classes, epochs=PROBE_EPOCHS,
            seed=seed,
        )["top1"],
    }  # fmt: skip


def encoder_features(stellar, mae, loaders, device: torch.device, progress: bool) -> dict:
    """Frozen features of both models on each loader: `{"stellar": [(features, labels), ...], "mae": [...]}`."""
    return {
        "stellar": [
            extract_features(stellar.stellar, loader, "pooled", device, progress=progress) for loader in loaders
        ],
        "mae": [mae_features(mae, loader, device) for loader in loaders],
    }


def run_dataset(name: str, data_args: argparse.Namespace, args, device: torch.device) -> tuple[dict, dict]:
    """Pretrain both models on one dataset and evaluate them: (result blocks by task, settings of this dataset)."""
    config = stellar_config(args)
    dataset, description = pretrain_example.build_dataset(data_args, config)
    if name == "digits":
        description = f"scikit-learn digits ({len(dataset)} training images, upscaled to {config.image_size} px)"
    tasks = pretrain_example.probe_labels(data_args)
    loaders = pretrain_example.probe_loaders(data_args, config, tasks)
    progress = not args.no_progress
    stellar, mae = build_models(config, args, device)
    # The same features before any training: how much of each score pretraining earned.
    initial = encoder_features(stellar, mae, loaders, device, progress)
    print(f"[{name}] pretraining on {description}: {len(dataset)} images, {args.steps} steps", file=sys.stderr)
    training = pretrain_pair(stellar, mae, dataset, args, device)

    features = encoder_features(stellar, mae, loaders, device, progress)
    features["pixels"] = [pixel_features(loader) for loader in loaders]
    reconstruction = {
        "stellar": stellar_reconstruction(stellar, loaders[1], device),
        "mae": mae_reconstruction(mae, loaders[1], config, device, args.seed),
    }
    blocks = {}
    for column, task in enumerate(tasks):
        (_, train_labels), (_, eval_labels) = features["pixels"]
        num_classes = tasks[task].num_classes
        block = {}
        for model_name in ("stellar", "mae"):
            at_init = probe_scores(*initial[model_name], column, num_classes, args.seed)
            block[model_name] = {
                **probe_scores(*features[model_name], column, num_classes, args.seed),
                **reconstruction[model_name],
                **{f"random_init_{key}": value for key, value in at_init.items()},
            }
        block["pixels"] = {"knn": probe_scores(*features["pixels"], column, num_classes, args.seed)["knn"]}
        block["chance"] = 1.0 / num_classes
        block["num_classes"] = num_classes
        block["num_train"] = len(train_labels)
        block["num_eval"] = len(eval_labels)
        blocks[name if len(tasks) == 1 else f"{name}-{task.removeprefix('dominant_')}"] = block
    return blocks, {"data": description, "pretraining_images": len(dataset), **training}


# ----------------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------------


def format_table(results: dict) -> str:
    rows = [
        "| data / task | features | kNN top-1 | linear probe top-1 | at init: kNN / linear | PSNR (dB) | reconstruction |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, block in results.items():
        if key == "settings":
            continue
        stellar, mae, pixels = block["stellar"], block["mae"], block["pixels"]
        for label, scores, note in (
            ("STELLAR pooled sparse tokens", stellar, f"full image, SSIM {stellar['ssim']:.3f}"),
            (
                "MAE mean patch tokens",
                mae,
                f"masked patches; all visible: {mae['psnr_all_visible']:.2f} dB, SSIM {mae['ssim_all_visible']:.3f}",
            ),
        ):
            rows.append(
                f"| {key} | {label} | {scores['knn']:.3f} | {scores['linear_probe']:.3f} | "
                f"{scores['random_init_knn']:.3f} / {scores['random_init_linear_probe']:.3f} | {scores['psnr']:.2f} | {note} |"
            )
        rows.append(f"| {key} | raw pixels | {pixels['knn']:.3f} | – | – | – | chance {block['chance']:.3f} |")
    return "\n".join(rows)


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    processor = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                processor = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{processor}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads"


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    import transformers

    started = time.monotonic()
    results, per_dataset = {}, {}
    with tempfile.TemporaryDirectory(prefix="compare_mae_") as scratch:
        for name in args.datasets:
            if name == "folder":
                data_args = dataset_arguments(args, name, Path(args.train_dir), Path(args.eval_dir))
            elif name == "digits":
                train_dir, eval_dir = write_digits(Path(scratch) / "digits", args.image_size, args.num_digits_images)
                data_args = dataset_arguments(args, name, train_dir, eval_dir)
            else:
                data_args = dataset_arguments(args, name)
            blocks, per_dataset[name] = run_dataset(name, data_args, args, device)
            results.update(blocks)

    config = stellar_config(args)
    defaults = pretrain_example.parse_args([])
    results["settings"] = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "device": str(device),
        "machine": machine_description(device),
        "optimizer": {
            "name": "AdamW",
            "base_learning_rate": args.base_learning_rate,
            "learning_rate": args.base_learning_rate * args.batch_size / 256,
            "betas": [defaults.adam_beta1, defaults.adam_beta2],
            "weight_decay": defaults.weight_decay,
            "no_decay": "biases, norms, cls_token, position_embeddings, sparse_tokens (examples/pretrain.py)",
            "schedule": defaults.lr_scheduler_type,
            "warmup_steps": int(defaults.warmup_ratio * args.steps),
            "max_grad_norm": defaults.max_grad_norm,
        },
        "encoder": {key: getattr(config, key) for key in ENCODER_FIELDS},
        "decoder": {key: getattr(config, key) for key in DECODER_FIELDS},
        "stellar": {
            "num_sparse_tokens": config.num_sparse_tokens,
            "num_masked_views": config.num_masked_views,
            "mask_ratio": config.mask_ratio,
            "num_local_views": config.num_local_views,
            "local_image_size": config.local_image_size,
            "feature": "pooler_output (mean of the sparse tokens)",
            "psnr": "own decoder, full image",
        },
        "mae": {
            "mask_ratio": args.mae_mask_ratio,
            "norm_pix_loss": False,
            "feature": "mean of the final patch tokens, mask_ratio 0, patches in order",
            "psnr": "own decoder at the training mask ratio, masked patches only; psnr_all_visible: mask_ratio 0, full image",
        },
        "knn": {"k": KNN_K, "temperature": KNN_TEMPERATURE},
        "linear_probe": {"head": "LayerNorm + Linear", "optimizer": "AdamW", "epochs": PROBE_EPOCHS},
        "datasets": per_dataset,
        "minutes": round((time.monotonic() - started) / 60, 2),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    print(format_table(results))
    line = json.dumps(results)
    if args.output_json:
        path = Path(args.output_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
