#!/usr/bin/env python
"""Pretrain STELLAR with Accelerate, on one CPU, one GPU, or many GPUs and nodes.

    accelerate launch examples/pretrain.py                          # built-in synthetic scenes, small model
    accelerate launch examples/pretrain.py --train_dir ~/images     # your own images (no labels needed)
    accelerate launch examples/pretrain.py --dataset_name ILSVRC/imagenet-1k --config_name stellar-b16 ...

With no arguments it trains a small STELLAR on the package's synthetic scenes (3 to 4 minutes on 2 CPU cores),
then reports kNN and linear-probe accuracy on a held-out split and writes reconstruction and spatial-map PNGs to
`--output_dir`. See docs/training.md for multi-GPU, multi-node, FSDP and DeepSpeed.
"""

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

# Waiting OpenMP threads that spin make a run that shares its cores with another busy process about 5x slower;
# sleeping ones cost about 20 % when the run is alone (benchmarks/shared_cores.py). It must be set before torch loads
# OpenMP; OMP_WAIT_POLICY=ACTIVE in the environment keeps spinning for a machine of its own.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from torch.utils.data import DataLoader
from transformers import get_scheduler

from stellar_hf import StellarConfig, StellarImageProcessor
from stellar_hf.checkpointing import (
    FINAL_STAGING_NAME,
    Checkpoint,
    NonFiniteStateError,
    TrainingCheckpointError,
    check_state_finite,
    describe_last_good,
    latest_checkpoint,
    publish_files,
    read_checkpoint,
    remove_stale_files,
    replace_atomically,
    save_checkpoint,
)
from stellar_hf.convert import CheckpointError as OriginalCheckpointError
from stellar_hf.data import (
    ColorAugmentation,
    MultiViewCrops,
    PretrainingDataset,
    StreamingPretrainingDataset,
    SyntheticScenes,
    collate_views,
    load_hub_dataset,
    load_image_folder,
    normalize,
    ViewAugmentation,
)
from stellar_hf.evaluation import (
    LINEAR_PROBE_EPOCHS,
    PROBE_BATCH_SIZE,
    SYNTHETIC_PROBE_EVAL_IMAGES,
    SYNTHETIC_PROBE_TRAIN_IMAGES,
    ProbeLabel,
    extract_features,
    folder_probe_label,
    knn_accuracy,
    linear_probe,
    probe_processor,
    random_init_encoder,
    synthetic_probe_datasets,
    synthetic_probe_labels,
)
from stellar_hf.model_card import ProbeResults, TrainingRun, hub_id_or_none, render_model_card
from stellar_hf.modeling_stellar import StellarForPreTraining
from stellar_hf.pretraining import StellarEMATeacher

logger = logging.getLogger("stellar_pretrain")

# A model small enough to learn the synthetic scenes on 2 CPU cores in minutes.
SMALL_SYNTHETIC_CONFIG = dict(
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=512,
    image_size=48,
    patch_size=8,
    num_sparse_tokens=8,
    decoder_hidden_size=96,
    decoder_num_hidden_layers=2,
    decoder_num_attention_heads=4,
    decoder_intermediate_size=384,
    reconstruction_target="pixel",
    num_prototypes=512,
    prototype_dim=64,
    predictor_hidden_size=512,
    num_masked_views=2,
    num_local_views=2,
    local_image_size=24,
)
# Named presets for `--config_name`: the original STELLAR backbones.
PRESETS = {
    "stellar-small-synthetic": SMALL_SYNTHETIC_CONFIG,
    "stellar-s16": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536),
    "stellar-b16": {},
    "stellar-l16": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}
# The default run: about 3 minutes of training on 2 CPU cores, enough for the probes to show what was learned.
DEFAULT_SYNTHETIC_STEPS = 450
# Above this share of wall time spent waiting for batches, the run says the input path starves the model.
STARVED_FRACTION = 0.1
SMALL_PRESET_BASE_LEARNING_RATE = 4e-3
RECIPE_BASE_LEARNING_RATE = 1.5e-4 * 256 / 2048


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Pretrain STELLAR with Accelerate.")
    data = parser.add_argument_group("data (default: the built-in synthetic scenes)")
    data.add_argument("--dataset_name", help="a datasets Hub id, a saved dataset folder or an imagefolder path")
    data.add_argument("--dataset_config_name", help="the dataset configuration name")
    data.add_argument("--dataset_split", default="train", help="split to pretrain on (default: train)")
    data.add_argument("--streaming", action="store_true", help="stream the dataset instead of downloading it")
    data.add_argument("--train_dir", help="a folder of images (searched recursively; labels not needed)")
    data.add_argument("--image_column_name", default="image", help="image column of --dataset_name")
    data.add_argument("--label_column_name", default="label", help="label column, used only for logging")
    data.add_argument("--num_synthetic_images", type=int, default=8192, help="size of the synthetic train split")
    data.add_argument(
        "--num_synthetic_eval_images", type=int, default=SYNTHETIC_PROBE_EVAL_IMAGES, help="size of the synthetic eval split"
    )
    data.add_argument("--probe_train_dir", help="labelled image folder (one subfolder per class) for the final probes")
    data.add_argument("--probe_eval_dir", help="labelled image folder for the final probes' evaluation")
    data.add_argument(
        "--dataloader_num_workers",
        type=int,
        help="processes that decode and crop images (default: sized to the machine, see default_loader_settings)",
    )
    data.add_argument(
        "--compile_view_augmentation",
        choices=("auto", "yes", "no"),
        default="auto",
        help=(
            "torch.compile the batched colour augmentation into one fixed graph per view size (auto: no: on a CPU "
            "the fused C kernels, on an accelerator the eager chunks until a measurement there favours the graph; "
            "see docs/benchmarks.md)"
        ),
    )

    model = parser.add_argument_group("model")
    model.add_argument("--model_name_or_path", help="continue from a StellarForPreTraining folder or Hub id")
    model.add_argument(
        "--config_name",
        help=f"a config.json folder / Hub id, or a preset: {', '.join(PRESETS)} (default: stellar-small-synthetic)",
    )
    model.add_argument("--config_overrides", help='comma-separated overrides, e.g. "num_sparse_tokens=16,mask_ratio=0.75"')
    model.add_argument("--init_encoder_from", help="initialise the encoder from MAE/ViT weights (folder, Hub id or timm file)")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--per_device_train_batch_size", type=int, default=64)
    optim.add_argument(
        "--base_learning_rate",
        type=float,
        default=None,
        help="lr = base_lr * global batch / 256 (default: 4e-3 for the small synthetic preset, else 1.875e-5, "
        "the original's 1.5e-4 at a global batch of 2048)",
    )
    optim.add_argument("--weight_decay", type=float, default=0.04)
    optim.add_argument("--adam_beta1", type=float, default=0.9)
    optim.add_argument("--adam_beta2", type=float, default=0.999)
    optim.add_argument(
        "--num_train_epochs",
        type=int,
        default=None,
        help=f"default: {DEFAULT_SYNTHETIC_STEPS} steps on the built-in synthetic scenes, otherwise 100 epochs",
    )
    optim.add_argument("--max_train_steps", type=int, default=None, help="overrides --num_train_epochs")
    optim.add_argument("--max_train_minutes", type=float, default=None, help="stop (and save) after this long")
    optim.add_argument("--lr_scheduler_type", default="cosine")
    optim.add_argument("--warmup_ratio", type=float, default=0.05)
    optim.add_argument("--max_grad_norm", type=float, default=3.0)
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1)
    optim.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None, help="default: accelerate config")
    optim.add_argument("--seed", type=int, default=0)
    optim.add_argument(
        "--cpu_threads",
        type=int,
        default=None,
        help="intra-op threads per process of a CPU run (default: OMP_NUM_THREADS when you set it, else torch's "
        "default; under `accelerate launch` without --cpu, whose OMP_NUM_THREADS=1 is a placeholder, the physical "
        "cores divided among this machine's processes)",
    )

    run = parser.add_argument_group("checkpoints, logging and publishing")
    run.add_argument("--output_dir", default="outputs/stellar-pretrain")
    run.add_argument("--overwrite_output_dir", action="store_true", help="allow writing into a non-empty folder")
    run.add_argument("--checkpointing_steps", type=int, default=None, help="save the full training state every N steps")
    run.add_argument("--checkpoints_total_limit", type=int, default=3, help="keep at most this many checkpoints")
    run.add_argument("--resume_from_checkpoint", help="a checkpoint folder, or 'latest' in --output_dir")
    run.add_argument("--report_to", default="tensorboard", help="accelerate trackers (tensorboard, wandb, all, none)")
    run.add_argument("--logging_steps", type=int, default=10)
    run.add_argument("--image_logging_steps", type=int, default=None, help="PNG of reconstructions and maps every N steps")
    run.add_argument("--skip_final_evaluation", action="store_true", help="do not run the kNN / linear probes at the end")
    run.add_argument("--push_to_hub", action="store_true")
    run.add_argument("--hub_model_id", help="Hub repository for --push_to_hub (default: the output folder's name)")
    run.add_argument("--hub_token", help="Hub token (default: the logged-in user)")
    run.add_argument("--hub_private_repo", action="store_true")
    args = parser.parse_args(argv)

    if args.dataset_name and args.train_dir:
        parser.error("give either --dataset_name or --train_dir, not both")
    if args.model_name_or_path and (args.config_name or args.config_overrides):
        parser.error("--config_name / --config_overrides build a new model; they cannot change --model_name_or_path")
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.streaming and args.max_train_steps is None:
        parser.error("--streaming needs --max_train_steps (a stream has no known length)")
    if bool(args.probe_train_dir) != bool(args.probe_eval_dir):
        parser.error("--probe_train_dir and --probe_eval_dir go together")
    return args


def apply_config_overrides(config: StellarConfig, text: str | None) -> StellarConfig:
    """
    `config` with `--config_overrides` (`"a=1,b=0.5,c=true,d=pixel"`) applied, validated as a whole.

    transformers' `config.update_from_string` reads each value as the type of the field's current value. A field
    that is unset (`None`, e.g. `reconstruction_weight` or `vq_tokenizer_name_or_path`) has no type to read it by: a
    number is read as one, anything else as text; `none` or `null` unsets a field.
    """
    set_config_fields(config, text)
    return StellarConfig(**config.to_dict())


def set_config_fields(config: StellarConfig, text: str | None) -> list[str]:
    """Set the fields `text` names on `config`, each checked on its own (see `apply_config_overrides`); returns the
    names."""
    items = [item.strip() for item in (text or "").split(",") if item.strip()]
    malformed = [item for item in items if "=" not in item]
    if malformed:
        raise ValueError(f"config overrides {malformed} are not of the form key=value")
    pairs = [tuple(part.strip() for part in item.split("=", 1)) for item in items]
    unknown = [key for key, _ in pairs if not hasattr(config, key)]
    if unknown:
        raise ValueError(f"--config_overrides names unknown config fields: {unknown}")
    for key, value in pairs:
        try:
            if value.lower() in ("none", "null"):
                setattr(config, key, None)
            elif getattr(config, key) is None:
                setattr(config, key, _number_or_text(value))
            else:
                config.update_from_string(f"{key}={value}")
        except (TypeError, ValueError) as error:
            raise ValueError(f"--config_overrides {key}={value}: {error}") from None
    return [key for key, _ in pairs]


def _number_or_text(value: str):
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def parse_overrides(text: str | None) -> dict:
    """Deprecated: `apply_config_overrides(config, text)`. The overrides as `{field: value}`, each value read as the
    type of a default `StellarConfig`'s field."""
    warnings.warn(
        "parse_overrides is deprecated: use apply_config_overrides(config, text)", FutureWarning, stacklevel=2
    )
    config = StellarConfig()
    return {key: getattr(config, key) for key in set_config_fields(config, text)}


def build_model(args) -> StellarForPreTraining:
    """The student: `--model_name_or_path`, else a new model of `--config_name` with `--config_overrides`."""
    if args.model_name_or_path:
        return StellarForPreTraining.from_pretrained(args.model_name_or_path)
    name = args.config_name or "stellar-small-synthetic"
    config = StellarConfig(**PRESETS[name]) if name in PRESETS else StellarConfig.from_pretrained(name)
    model = StellarForPreTraining(apply_config_overrides(config, args.config_overrides))
    if args.init_encoder_from:
        from stellar_hf.encoder_init import load_encoder_weights

        copied = load_encoder_weights(model, args.init_encoder_from)
        logger.info("initialised %d encoder tensors from %s", len(copied), args.init_encoder_from)
    return model


def build_teacher(args, model: StellarForPreTraining) -> StellarEMATeacher | None:
    """
    The EMA teacher when `config.use_ema_teacher`: the one saved in `--model_name_or_path` (or a copy of the student
    when the folder holds none, with a warning), else a copy of the student; `None` without a teacher.
    """
    if not model.config.use_ema_teacher:
        return None
    if args.model_name_or_path:
        return StellarEMATeacher.from_pretrained(args.model_name_or_path, model)
    return StellarEMATeacher.from_student(model)


def build_dataset(args, config: StellarConfig):
    """
    The pretraining dataset and a short description of it. Its items are the views' uint8 crops and colour
    parameters (`MultiViewCrops`, in the DataLoader workers); `ViewAugmentation` colours and normalises them on the
    training device (`to_model_inputs`).
    """
    transform = MultiViewCrops(
        image_size=config.image_size,
        num_global_views=max(config.num_masked_views, 1),
        num_local_views=config.num_local_views,
        local_image_size=config.local_image_size,
        color=ColorAugmentation(),
    )
    if args.train_dir:
        source, description = load_image_folder(args.train_dir, labels=False), f"image folder {args.train_dir}"
    elif args.dataset_name:
        source = load_hub_dataset(
            args.dataset_name,
            args.dataset_config_name,
            split=args.dataset_split,
            streaming=args.streaming,
            image_column=args.image_column_name,
        )
        description = f"{args.dataset_name} ({args.dataset_split})"
        if args.streaming:
            dataset = StreamingPretrainingDataset(
                source, transform, args.image_column_name, args.label_column_name, seed=args.seed
            )
            return dataset, description
    else:
        source = SyntheticScenes(num_images=args.num_synthetic_images, image_size=config.image_size, split="train")
        description = f"built-in synthetic scenes ({args.num_synthetic_images} images, {config.image_size} px)"
    dataset = PretrainingDataset(source, transform, args.image_column_name, args.label_column_name, seed=args.seed)
    return dataset, description


# Processes on this machine, as torchrun, Open MPI, MPICH and MVAPICH announce them (the list accelerate reads).
LOCAL_SIZE_VARIABLES = (
    "LOCAL_WORLD_SIZE",
    "MPI_LOCALNRANKS",
    "OMPI_COMM_WORLD_LOCAL_SIZE",
    "MV2_COMM_WORLD_LOCAL_SIZE",
)


def local_process_count(default: int, environ=os.environ) -> int:
    """The processes on this machine, as the launcher announces them (`LOCAL_SIZE_VARIABLES`), else `default`."""
    return next((int(environ[name]) for name in LOCAL_SIZE_VARIABLES if environ.get(name)), default)


def cpu_thread_count(requested: int | None, num_processes: int, environ=os.environ) -> int | None:
    """
    Intra-op threads for each process of a CPU run, or `None` to keep torch's setting.

    In order: `requested` (`--cpu_threads`); then, only when `accelerate launch` ran without `--cpu` and so exported
    its placeholder `OMP_NUM_THREADS=1`, the physical cores this process may use divided among the processes of this
    machine (the rule of `accelerate launch --cpu`); otherwise `None`, which respects an `OMP_NUM_THREADS` the user
    set and torch's own default.
    """
    if requested is not None:
        if requested < 1:
            raise SystemExit(f"error: --cpu_threads must be at least 1, got {requested}")
        return requested
    if environ.get("OMP_NUM_THREADS") != "1" or environ.get("ACCELERATE_USE_CPU") != "False":
        return None
    local_processes = local_process_count(num_processes, environ)
    return max(1, physical_cores() // max(local_processes, 1))


def physical_cores() -> int:
    """The physical cores this process may run on (its CPU affinity, capped by the machine's physical cores)."""
    import psutil

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(psutil.cpu_count(logical=False) or usable, usable)


def no_decay_parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms, tokens and position embeddings (1-D or token tensors)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if parameter.ndim <= 1 or name.endswith(("cls_token", "position_embeddings", "sparse_tokens")):
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def masking_generator(seed: int, step: int, process_index: int) -> torch.Generator:
    """A generator for one micro-step's masks: a pure function of (seed, step, rank), so resumed runs repeat them."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 1_009 + process_index) % (2**63))


def resolve_resume_path(args, output_dir: Path) -> Checkpoint | None:
    """
    The checkpoint `--resume_from_checkpoint` names, checked complete: `latest` is the newest complete one in
    `output_dir` (folders it skips are logged with the reason); a path must be a complete checkpoint.
    """
    if not args.resume_from_checkpoint:
        return None
    if args.resume_from_checkpoint == "latest":
        checkpoint = latest_checkpoint(output_dir)
        if checkpoint is None:
            raise SystemExit(f"error: --resume_from_checkpoint latest: no complete checkpoint-* folder in {output_dir}")
    else:
        try:
            checkpoint = read_checkpoint(args.resume_from_checkpoint)
        except TrainingCheckpointError as error:
            raise SystemExit(f"error: --resume_from_checkpoint: {error}") from None
    if args.max_train_steps is not None and checkpoint.step > args.max_train_steps:
        raise SystemExit(
            f"error: {checkpoint.path} was saved at step {checkpoint.step}, past --max_train_steps "
            f"{args.max_train_steps}; pass --max_train_steps {checkpoint.step} or more to continue it, or resume "
            "an earlier checkpoint"
        )
    return checkpoint


# Launchers announce the total number of processes in one of these (torchrun, Open MPI, MPICH/Intel MPI, MVAPICH).
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


def launcher_world_size(environ=os.environ) -> int:
    """The number of processes the launcher started (1 when the script was started directly)."""
    return next((int(environ[name]) for name in WORLD_SIZE_VARIABLES if environ.get(name)), 1)


def accelerate_launch_processes(parent_command: list[str] | None = None) -> int | None:
    """
    The process count an enclosing `accelerate launch` was asked for (its `--num_processes`, else its config
    file's), or None when this process was not started by `accelerate launch`.

    On a machine without GPUs, `accelerate launch --num_processes N` (with or without `--cpu`) starts one process
    and exports nothing that says N was asked; its command line is the only place where the request survives.
    """
    if parent_command is None:
        try:
            import psutil

            parent_command = psutil.Process().parent().cmdline()
        except Exception:  # no parent, or not allowed to read it
            return None
    names = [Path(part).name for part in parent_command]
    if "launch" not in names or not any(name.startswith("accelerate") for name in names[: names.index("launch")]):
        return None
    from accelerate.commands.config import default_config_file, load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    try:
        launch_args = launch_command_parser().parse_args(parent_command[names.index("launch") + 1 :])
    except SystemExit:
        return None
    if launch_args.num_processes is not None:
        return launch_args.num_processes
    config_file = launch_args.config_file or (default_config_file if os.path.isfile(default_config_file) else None)
    if config_file and not launch_args.cpu:
        return load_config_from_file(config_file).num_processes
    return None


def accelerator_available() -> bool:
    """Whether this machine has a GPU (or another torch accelerator) for Accelerate to use."""
    if hasattr(torch, "accelerator"):
        return torch.accelerator.is_available()
    return torch.cuda.is_available()


def check_process_count(accelerator: Accelerator, environ=os.environ, asked: int | None = None) -> None:
    """
    Stop at once, with the command to run instead, when the run has fewer (or more) processes than were asked for.
    """
    started = launcher_world_size(environ)
    cpu_commands = (
        "on CPUs, start N processes with `torchrun --nproc_per_node N examples/pretrain.py ...` or "
        "`accelerate launch --multi_gpu --num_processes N examples/pretrain.py ...` (both use gloo when no GPU is "
        "present); see docs/training.md"
    )
    if accelerator.num_processes != started:
        raise SystemExit(
            f"error: the launcher started {started} processes but Accelerate sees {accelerator.num_processes} "
            f"(distributed type {accelerator.distributed_type}); every process would train on its own. {cpu_commands}"
        )
    if asked is not None and asked != accelerator.num_processes:
        raise SystemExit(
            f"error: `accelerate launch` was asked for {asked} processes but started {accelerator.num_processes} "
            f"(without GPUs its launcher runs a single process); {cpu_commands}"
        )


class SkippedImages:
    """
    The unreadable images a run met, over all its processes and, through its checkpoints, across resumes.

    `record(batch)` takes a batch's `skipped_images` (one list of names per batch slot that was filled with the next
    readable image instead); `summary(accelerator)` (every process must call it) gives the run-wide figures.
    """

    SHOWN = 10

    def __init__(self, earlier: dict | None = None):
        earlier = earlier or {}
        self.earlier_names = list(earlier.get("first", []))
        self.earlier_count = int(earlier.get("count", 0))
        self.earlier_slots = int(earlier.get("substituted_slots", 0))
        self.names: dict[str, None] = {}  # insertion-ordered set
        self.slots = 0

    def record(self, batch: dict) -> None:
        for names in batch.get("skipped_images") or ():
            self.slots += 1
            self.names.update(dict.fromkeys(names))

    def summary(self, accelerator: Accelerator) -> dict:
        from accelerate.utils import gather_object

        everyone = gather_object([(list(self.names), self.slots)]) if accelerator.num_processes > 1 else [
            (list(self.names), self.slots)
        ]
        new_names = dict.fromkeys(name for names, _ in everyone for name in names if name not in self.earlier_names)
        # Names met before a resume are known only up to the first few; the count carries the rest.
        return {
            "count": self.earlier_count + len(new_names),
            "substituted_slots": self.earlier_slots + sum(slots for _, slots in everyone),
            "first": (self.earlier_names + list(new_names))[: self.SHOWN],
        }


def format_results(summary: dict, output_dir: Path, written: list[Path]) -> str:
    """The end-of-run report for a person: the probe table (task, chance, untrained, trained) and what was saved."""
    lines = [f"pretrained for {summary['completed_steps']} steps in {summary['minutes']:.1f} min on {summary['data']}"]
    skipped = summary.get("skipped_images") or {}
    if skipped.get("count"):
        lines.append(f"skipped {skipped['count']} unreadable image(s): {', '.join(skipped['first'])}")
    probes = summary.get("probes")
    if probes:
        sizes = probes.get("num_probe_images", {})
        lines += [
            "",
            f"held-out probes of the pooled sparse tokens (top-1; {sizes.get('train')} train / {sizes.get('eval')} eval "
            "images):",
            f"{'task':<18}{'chance':>8}{'untrained kNN':>15}{'untrained linear':>18}{'trained kNN':>13}"
            f"{'trained linear':>16}",
        ]
        for task, scores in probes.items():
            if task == "num_probe_images":
                continue
            lines.append(
                f"{task:<18}{scores['chance']:>8.3f}{scores['random_init_knn_top1']:>15.3f}"
                f"{scores['random_init_linear_probe_top1']:>18.3f}{scores['knn_top1']:>13.3f}"
                f"{scores['linear_probe_top1']:>16.3f}"
            )
    lines += ["", f"saved to {output_dir}/:"]
    lines += [f"  {path.relative_to(output_dir)}" for path in written]
    return "\n".join(lines)


def to_model_inputs(batch: dict, config: StellarConfig, augmentation: ViewAugmentation | None = None) -> dict:
    """
    The model's inputs from a batch of the data pipeline, on the batch's device: `MultiViewCrops` batches (uint8
    crops and colour parameters) through `augmentation` (default: `ViewAugmentation` with the config's statistics),
    the batched colour augmentation and normalisation; batches of [0, 1] views (`MultiViewTransform`) normalised.
    """
    if "global_crops" in batch:
        if augmentation is None:
            augmentation = ViewAugmentation(ColorAugmentation(), config.image_mean, config.image_std)
        return augmentation(batch)
    inputs = {"pixel_values": normalize(batch["pixel_values"], config.image_mean, config.image_std)}
    for key in ("global_views", "local_views"):
        if key in batch:
            inputs[key] = normalize(batch[key], config.image_mean, config.image_std)
    return inputs


def main_images(batch: dict) -> torch.Tensor:
    """The batch's main images `(B, 3, S, S)` on the [0, 1] scale, whichever view path made it."""
    if "global_crops" in batch:
        return batch["global_crops"][:, 0].float() / 255.0
    return batch["pixel_values"]


def default_loader_settings(
    requested_workers: int | None, device_type: str, local_processes: int, streaming: bool = False
) -> dict:
    """
    DataLoader settings sized to the machine: `num_workers`, `pin_memory`, `persistent_workers`, `prefetch_factor`.

    Workers: `requested_workers` when given; otherwise, on an accelerator, the cores this process may use divided
    among the processes of this machine, one left for the training loop, at most 12 (the uint8 crops take ~4 ms per
    image at the recipe, JPEG decoding 5-10 ms more: 12 workers feed ~700 images/s); on a CPU run one when the
    process has two cores or more (measured on the 2-core Quick start: data wait 11 % -> 1 %, 7 % faster), because the
    training threads use the cores and the crops are a small part of a CPU step. Pinned memory and
    non-blocking copies on CUDA. Persistent workers keep their state between epochs (`PretrainingDataset.set_epoch`
    reaches them through shared memory; not for a stream, whose `datasets` shuffle order is set per epoch in each
    worker's copy), with 4 batches in flight per worker.
    """
    if requested_workers is not None:
        if requested_workers < 0:
            raise SystemExit(f"error: --dataloader_num_workers must be 0 or more, got {requested_workers}")
        workers = requested_workers
    elif device_type == "cpu":
        # One worker overlaps the crops with the step; the training threads keep the other cores.
        workers = 1 if physical_cores() // max(local_processes, 1) >= 2 else 0
    else:
        workers = min(max(physical_cores() // max(local_processes, 1) - 1, 1), 12)
    settings = {
        "num_workers": workers,
        "pin_memory": device_type == "cuda",
        "persistent_workers": workers > 0 and not streaming,
    }
    if workers > 0:
        settings["prefetch_factor"] = 4
    return settings


class DataWait:
    """
    How long the training loop waits for its batches: `timed(loader)` yields the loader's batches and adds the time
    spent inside each `next()` to the step being assembled. `step_done()` closes a step; `recent_fraction` is the
    share of wall time spent waiting over the last `window` steps, `total_fraction` over the run.
    """

    def __init__(self, window: int = 20):
        self.window = window
        self.pending = 0.0
        self.recent: list[tuple[float, float]] = []  # (waited, wall) per step
        self.total_waited = 0.0
        self.started = time.perf_counter()
        self.step_started = self.started

    def timed(self, loader):
        iterator = iter(loader)
        while True:
            before = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                self.pending += time.perf_counter() - before
                return
            self.pending += time.perf_counter() - before
            yield batch

    def step_done(self) -> None:
        now = time.perf_counter()
        self.recent.append((self.pending, now - self.step_started))
        del self.recent[: -self.window]
        self.total_waited += self.pending
        self.pending, self.step_started = 0.0, now

    @property
    def recent_fraction(self) -> float:
        waited, wall = (sum(column) for column in zip(*self.recent)) if self.recent else (0.0, 0.0)
        return waited / wall if wall > 0 else 0.0

    @property
    def total_fraction(self) -> float:
        wall = time.perf_counter() - self.started
        return self.total_waited / wall if wall > 0 else 0.0


FIGURE_IMAGES = 8


def figure_images(args, config: StellarConfig, dataset) -> torch.Tensor | None:
    """
    The images every progress figure shows, `(n, 3, S, S)` in [0, 1]: the same at every logged step and after a
    resume, so that a reader can watch the spatial maps form. The first readable images of the synthetic scenes'
    validation split, or of the training images, centre-cropped as for evaluation; `None` for a stream (its figures
    show the first batch's images instead).
    """
    if args.streaming:
        return None
    if not (args.train_dir or args.dataset_name):
        scenes = SyntheticScenes(num_images=FIGURE_IMAGES, image_size=config.image_size, split="validation")
        processor = probe_processor(config, do_normalize=False)
        return processor([scenes[index]["image"] for index in range(FIGURE_IMAGES)], return_tensors="pt")["pixel_values"]
    processor = StellarImageProcessor.from_model_config(config)
    images = []
    for index in range(len(dataset)):
        image, _ = dataset.read_image(index)
        if image is not None:
            images.append(image)
        if len(images) == FIGURE_IMAGES:
            break
    return processor(images, do_normalize=False, return_tensors="pt")["pixel_values"]


@torch.no_grad()
def save_images(model, images: torch.Tensor, config: StellarConfig, output_dir: Path, tag: str, accelerator) -> list[Path]:
    """
    Reconstructions and every sparse token's spatial map for `images` (`(n, 3, S, S)` in [0, 1]), as PNGs under
    `output_dir/images/` (and to tensorboard when it is a tracker).
    """
    from stellar_hf.visualization import reconstruction_grid, spatial_map_grid

    unwrapped = accelerator.unwrap_model(model)
    was_training = unwrapped.training
    unwrapped.eval()
    images = images.float().cpu()
    pixel_values = normalize(images, config.image_mean, config.image_std).to(accelerator.device)
    outputs = unwrapped.stellar(pixel_values)
    grid = (pixel_values.shape[-2] // config.patch_size, pixel_values.shape[-1] // config.patch_size)
    panels = {"spatial_maps": spatial_map_grid(images, outputs.spatial_map.float().cpu(), grid)}
    if config.reconstruction_target == "pixel":
        reconstruction = unwrapped.reconstruct(lowrank_features=outputs.lowrank_features, grid_size=grid)
        panels["reconstructions"] = reconstruction_grid(images, reconstruction.float().cpu())
    unwrapped.train(was_training)
    image_dir = output_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, panel in panels.items():
        path = image_dir / f"{name}_{tag}.png"
        with replace_atomically(path) as temporary:
            panel.save(temporary, format="PNG")
        written.append(path)
        try:
            tracker = accelerator.get_tracker("tensorboard", unwrap=True)
            import numpy as np

            tracker.add_image(name, np.asarray(panel), global_step=int(tag) if tag.isdigit() else 0, dataformats="HWC")
        except (ValueError, AttributeError, ImportError):
            pass  # no tensorboard tracker in this run
    return written


def probe_labels(args) -> dict[str, ProbeLabel] | None:
    """
    The labels the final probes predict (`{name: ProbeLabel}`), or None when the run has no labelled data.

    On the synthetic scenes there are two (`stellar_hf.evaluation.synthetic_probe_labels`): the colour and the shape
    of the dominant object. Colour shows what a short CPU run learns; position-invariant shape recognition needs far
    longer training (see docs/training.md). `examples/evaluate.py knn --model OUTPUT_DIR` reproduces these figures.
    """
    if args.probe_train_dir:
        return {"class": folder_probe_label(load_image_folder(args.probe_train_dir, labels=True).class_names)}
    if args.train_dir or args.dataset_name:
        return None
    return synthetic_probe_labels()


def probe_loaders(args, config: StellarConfig, labels: dict[str, ProbeLabel]) -> tuple[DataLoader, DataLoader]:
    """(train, eval) loaders of normalised images with `labels` `(B, num_labels)`, one column per label."""
    processor = probe_processor(config)
    if args.probe_train_dir:
        train = load_image_folder(args.probe_train_dir, labels=True)
        evaluation = load_image_folder(args.probe_eval_dir, labels=True)
        if train.class_names != evaluation.class_names:
            raise ValueError("--probe_train_dir and --probe_eval_dir must have the same class subfolders")
    else:
        train, evaluation = synthetic_probe_datasets(
            config.image_size,
            min(args.num_synthetic_images, SYNTHETIC_PROBE_TRAIN_IMAGES),
            args.num_synthetic_eval_images,
        )

    def collate(items):
        pixel_values = processor([item["image"] for item in items], return_tensors="pt")["pixel_values"]
        columns = torch.tensor([[label.label_of(item) for label in labels.values()] for item in items])
        return {"pixel_values": pixel_values, "labels": columns}

    return (
        DataLoader(train, batch_size=PROBE_BATCH_SIZE, collate_fn=collate),
        DataLoader(evaluation, batch_size=PROBE_BATCH_SIZE, collate_fn=collate),
    )


def run_probes(model, args, config, accelerator) -> dict | None:
    """kNN and linear-probe top-1 per label for the trained encoder and, as a reference, a randomly initialised one."""
    labels = probe_labels(args)
    if labels is None:
        return None
    train_loader, eval_loader = probe_loaders(args, config, labels)
    untrained = random_init_encoder(config, seed=args.seed).to(accelerator.device)
    results = {}
    for name, encoder in (("trained", accelerator.unwrap_model(model).stellar), ("random_init", untrained)):
        train_features, train_labels = extract_features(encoder, train_loader, device=accelerator.device, progress=True)
        eval_features, eval_labels = extract_features(encoder, eval_loader, device=accelerator.device, progress=True)
        for column, label in enumerate(labels.values()):
            targets = train_labels[:, column], eval_labels[:, column]
            # The class count is the label's, not the highest index seen: a class absent from a small split would
            # otherwise overstate chance and shrink the probe.
            scores = results.setdefault(label.name, {"chance": label.chance})
            prefix = "" if name == "trained" else "random_init_"
            scores[f"{prefix}knn_top1"] = knn_accuracy(
                train_features, targets[0], eval_features, targets[1], num_classes=label.num_classes
            )["top1"]
            scores[f"{prefix}linear_probe_top1"] = linear_probe(
                train_features, targets[0], eval_features, targets[1], num_classes=label.num_classes,
                epochs=LINEAR_PROBE_EPOCHS,
            )["top1"]  # fmt: skip
    results["num_probe_images"] = {"train": len(train_labels), "eval": len(eval_labels)}
    return results


def main(argv=None) -> int:
    """Run the script; returns the exit status (0 done, 1 a clear error that was printed)."""
    args = parse_args(argv)
    try:
        return train(args)
    except OSError as error:
        # A full disk or a lost mount: say what failed and what is safe, not a traceback.
        message = f"{error}; {describe_last_good(args.output_dir)}"
        logger.error(message)
        print(f"error: {message}", file=sys.stderr)
        return 1


def train(args: argparse.Namespace) -> int:
    """Pretrain as `args` say (see `parse_args`); returns the exit status."""
    output_dir = Path(args.output_dir)
    resuming = args.resume_from_checkpoint is not None
    project = ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs"))
    asked_processes = accelerate_launch_processes()
    accelerator = Accelerator(
        # Without `cpu=True` Accelerate ignores torchrun's WORLD_SIZE on a machine without GPUs, and every process
        # would train alone on all the data.
        cpu=launcher_world_size() > 1 and not accelerator_available(),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=project,
        dataloader_config=DataLoaderConfiguration(
            use_seedable_sampler=True, data_seed=args.seed, non_blocking=torch.cuda.is_available()
        ),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not accelerator.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)
    check_process_count(accelerator, asked=asked_processes)
    final_weights = output_dir / "model.safetensors"
    if final_weights.exists() and not (resuming or args.overwrite_output_dir):
        raise SystemExit(
            f"error: {output_dir} already holds a trained model; pass --overwrite_output_dir or another --output_dir"
        )
    threads = cpu_thread_count(args.cpu_threads, accelerator.num_processes)
    if accelerator.device.type == "cpu" and threads is not None and threads != torch.get_num_threads():
        # `accelerate launch` without --cpu exports OMP_NUM_THREADS=1, which would leave every core but one idle.
        logger.info("CPU run: %d intra-op threads per process (was %d)", threads, torch.get_num_threads())
        torch.set_num_threads(threads)
    set_seed(args.seed)

    try:
        model = build_model(args)
    except OriginalCheckpointError as error:
        # Unreadable weights, or a Hub id that cannot be downloaded (offline): the message says what to do.
        raise SystemExit(f"error: {error}") from None
    config = model.config
    if config.reconstruction_target == "vq" and model.load_vq_tokenizer() is None:
        raise SystemExit(
            "error: the VQ reconstruction target trains on the codes of a MaskGIT VQGAN: pass --config_overrides "
            "vq_tokenizer_name_or_path=PATH (a folder written by python -m stellar_hf.convert_vqgan)"
        )
    teacher = build_teacher(args, model)
    dataset, data_description = build_dataset(args, config)
    local_processes = local_process_count(1)
    loader_settings = default_loader_settings(
        args.dataloader_num_workers, accelerator.device.type, local_processes, streaming=args.streaming
    )
    loader = DataLoader(
        dataset,
        batch_size=args.per_device_train_batch_size,
        shuffle=not args.streaming,
        collate_fn=collate_views,
        drop_last=True,
        **loader_settings,
    )
    augmentation = ViewAugmentation(
        ColorAugmentation(), config.image_mean, config.image_std, compile=args.compile_view_augmentation == "yes"
    )
    if not args.streaming and len(loader) == 0:
        raise SystemExit(
            f"error: {len(dataset)} images make no full batch of {args.per_device_train_batch_size} per device"
        )
    global_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    if args.base_learning_rate is None:
        small_preset = args.model_name_or_path is None and args.config_name in (None, "stellar-small-synthetic")
        args.base_learning_rate = SMALL_PRESET_BASE_LEARNING_RATE if small_preset else RECIPE_BASE_LEARNING_RATE
    learning_rate = args.base_learning_rate * global_batch / 256
    # The fused kernel updates every tensor in one pass (about 3x faster than the per-tensor loop on CPU).
    optimizer = torch.optim.AdamW(
        no_decay_parameter_groups(model, args.weight_decay),
        lr=learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        fused=accelerator.device.type in ("cpu", "cuda"),
    )
    if args.max_train_steps is None and args.num_train_epochs is None:
        if args.train_dir or args.dataset_name:
            args.num_train_epochs = 100
        else:
            args.max_train_steps = DEFAULT_SYNTHETIC_STEPS
    if args.max_train_steps is None:
        steps_per_epoch = math.ceil(len(loader) / accelerator.num_processes / args.gradient_accumulation_steps)
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=int(args.warmup_ratio * args.max_train_steps),
        num_training_steps=args.max_train_steps,
    )
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    # The model's weights with the EMA teacher's (when there is one): what the finite-state checks read.
    training_state = model
    if teacher is not None:
        teacher.to(accelerator.device)
        # Saved in every checkpoint and restored by `load_state`, so a resumed run continues from the same teacher.
        accelerator.register_for_checkpointing(teacher)
        training_state = torch.nn.ModuleDict({"student": model, "teacher": teacher})
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_files(output_dir)
    accelerator.wait_for_everyone()
    if args.report_to != "none":
        tracked = {key: value for key, value in vars(args).items() if isinstance(value, (int, float, str, bool))}
        accelerator.init_trackers("stellar_pretrain", config=tracked)

    completed_steps, start_epoch, skip_batches = 0, 0, 0
    resume = resolve_resume_path(args, output_dir)
    skipped_images = SkippedImages(resume.extra.get("skipped_images") if resume else None)
    if resume is not None:
        accelerator.load_state(str(resume.path))
        completed_steps = resume.step
        try:
            check_state_finite(accelerator, training_state, [optimizer], when=f"in {resume.path} ")
        except NonFiniteStateError as error:
            raise SystemExit(f"error: {error}; resume an earlier checkpoint instead") from None
        if not args.streaming:
            batches_per_epoch = len(loader)
            micro_steps = completed_steps * args.gradient_accumulation_steps
            start_epoch, skip_batches = divmod(micro_steps, batches_per_epoch)
        logger.info("resumed from %s at step %d", resume.path, completed_steps)

    logger.info(
        "pretraining on %s: %d steps, global batch %d, lr %.3g, %d process(es) on %s%s; %d DataLoader worker(s)%s",
        data_description, args.max_train_steps, global_batch, learning_rate, accelerator.num_processes,
        accelerator.device, f", {torch.get_num_threads()} threads each" if accelerator.device.type == "cpu" else "",
        loader_settings["num_workers"], ", pinned memory" if loader_settings["pin_memory"] else "",
    )  # fmt: skip
    from tqdm.auto import tqdm

    progress = tqdm(
        total=args.max_train_steps, initial=completed_steps, disable=not accelerator.is_local_main_process, desc="pretrain"
    )
    unwrapped = accelerator.unwrap_model(model)
    image_every = args.image_logging_steps or max(args.max_train_steps // 4, 1)
    started = time.monotonic()
    logger.info("started at %s", time.strftime("%H:%M:%S"))
    timed_from, timed_steps = None, min(10, args.max_train_steps - completed_steps)
    stop_reason, failure = None, None
    shown_images = figure_images(args, config, dataset) if accelerator.is_main_process else None
    epoch, micro_batches_in_step = start_epoch, 0
    data_wait = DataWait()
    training_state.train()
    while completed_steps < args.max_train_steps and stop_reason is None:
        dataset.set_epoch(epoch)
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        epoch_loader = accelerator.skip_first_batches(loader, skip_batches) if skip_batches else loader
        skip_batches = 0
        for batch in data_wait.timed(epoch_loader):
            skipped_images.record(batch)
            # Each micro-batch of an accumulated step gets its own masks.
            micro_step = completed_steps * args.gradient_accumulation_steps + micro_batches_in_step
            micro_batches_in_step += 1
            generator = masking_generator(args.seed, micro_step, accelerator.process_index)
            inputs = to_model_inputs(batch, config, augmentation)
            with accelerator.accumulate(model):
                teacher_targets = None
                if teacher is not None:
                    with accelerator.autocast():  # as the prepared model's forward runs
                        teacher_targets = teacher(inputs["pixel_values"], inputs.get("global_views"))
                outputs = model(
                    **inputs,
                    # Drawn here, not in forward, so that a compiled model holds no random number generator.
                    mask_noise=unwrapped.draw_mask_noise(inputs.get("global_views"), generator, accelerator.device),
                    teacher_targets=teacher_targets,
                )
                finite = torch.isfinite(outputs.loss.detach()).float()
                if accelerator.gather(finite.reshape(1)).min() < 1:
                    failure = f"the loss became NaN or infinite at step {completed_steps + 1}"
                    break
                accelerator.backward(outputs.loss)
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if shown_images is None and accelerator.is_main_process:
                shown_images = main_images(batch)[:FIGURE_IMAGES].cpu()  # a stream: its first batch, kept
            if not accelerator.sync_gradients:
                continue
            micro_batches_in_step = 0
            data_wait.step_done()
            if teacher is not None:
                teacher.update(unwrapped, teacher.momentum(completed_steps, args.max_train_steps))
            completed_steps += 1
            progress.update(1)
            if timed_from is None:
                timed_from = (time.monotonic(), completed_steps)  # the first step includes one-off warm-up
            elif completed_steps - timed_from[1] == timed_steps:
                seconds_per_step = (time.monotonic() - timed_from[0]) / timed_steps
                remaining = seconds_per_step * (args.max_train_steps - completed_steps)
                logger.info(
                    "%.2f s per step (%.0f%% of it waiting for data): expected to finish training in %.1f min (at "
                    "%s), then the final probes",
                    seconds_per_step, 100 * data_wait.recent_fraction, remaining / 60,
                    time.strftime("%H:%M:%S", time.localtime(time.time() + remaining)),
                )  # fmt: skip
                if data_wait.recent_fraction > STARVED_FRACTION:
                    logger.warning(
                        "the model waits for data %.0f%% of the time: raise --dataloader_num_workers (now %d)",
                        100 * data_wait.recent_fraction, loader_settings["num_workers"],
                    )  # fmt: skip
            names = ("loss", "reconstruction_loss", "clustering_loss", "mask_loss", "cls_loss", "koleo_loss")
            # One device-to-host copy for all parts.
            parts = dict(zip(names, torch.stack([getattr(outputs, name).detach().float() for name in names]).tolist()))
            postfix = {name.replace("_loss", ""): f"{value:.3f}" for name, value in parts.items()}
            postfix["data_wait"] = f"{100 * data_wait.recent_fraction:.0f}%"
            progress.set_postfix(postfix)
            if completed_steps % args.logging_steps == 0 and args.report_to != "none":
                accelerator.log(
                    {**parts, "lr": scheduler.get_last_lr()[0], "data_wait_fraction": data_wait.recent_fraction},
                    step=completed_steps,
                )
            if args.checkpointing_steps and completed_steps % args.checkpointing_steps == 0:
                try:
                    save_checkpoint(
                        accelerator, output_dir, completed_steps, args.checkpoints_total_limit, training_state,
                        [optimizer], extra={"skipped_images": skipped_images.summary(accelerator)},
                    )  # fmt: skip
                except NonFiniteStateError as error:
                    failure = str(error)
                    break
                except TrainingCheckpointError as error:
                    accelerator.end_training()
                    raise SystemExit(f"error: {error}") from None
            if completed_steps % image_every == 0 and accelerator.is_main_process:
                try:
                    save_images(model, shown_images, config, output_dir, f"{completed_steps:06d}", accelerator)
                except OSError as error:
                    logger.warning("could not write the step %d images: %s", completed_steps, error)
            if args.max_train_minutes and (time.monotonic() - started) / 60 > args.max_train_minutes:
                stop_reason = f"--max_train_minutes {args.max_train_minutes} reached at step {completed_steps}"
            if completed_steps >= args.max_train_steps or stop_reason:
                break
        if failure:
            break
        epoch += 1
    progress.close()

    if failure is None:
        try:
            check_state_finite(accelerator, training_state, [optimizer], when=f"after step {completed_steps} ")
        except NonFiniteStateError as error:
            failure = str(error)
    if failure:
        accelerator.end_training()
        message = (
            f"{failure}; stopping without saving this state: {describe_last_good(output_dir)}. Lower "
            "--base_learning_rate, use bf16 instead of fp16, or check the data."
        )
        logger.error(message)
        print(f"error: {message}", file=sys.stderr)
        return 1
    if stop_reason:
        logger.info(stop_reason)

    accelerator.wait_for_everyone()
    skipped = skipped_images.summary(accelerator)
    if skipped["count"]:
        logger.warning(
            "%d unreadable image(s) were skipped; %d batch slot(s) took the next readable image instead (first: %s)",
            skipped["count"], skipped["substituted_slots"], ", ".join(skipped["first"]),
        )  # fmt: skip
    unwrapped = accelerator.unwrap_model(model)
    results = None if args.skip_final_evaluation else run_probes(model, args, config, accelerator)
    if accelerator.is_main_process:
        # Everything goes to a staging folder first and is then moved in file by file, `results.json` last: a run
        # killed during the final save never leaves a truncated file, and `results.json` says the save finished.
        staging = output_dir / FINAL_STAGING_NAME
        shutil.rmtree(staging, ignore_errors=True)
        if teacher is None:
            unwrapped.save_pretrained(staging, save_function=accelerator.save)
        else:  # the student's folder, the teacher beside it as `teacher.*` tensors
            teacher.save_pretrained(staging, unwrapped, save_function=accelerator.save)
        StellarImageProcessor.from_model_config(config).save_pretrained(staging)
        final_figures = []
        if shown_images is not None:
            final_figures = save_images(model, shown_images, config, output_dir, "final", accelerator)
        summary = {
            "completed_steps": completed_steps,
            "data": data_description,
            "global_batch_size": global_batch,
            "num_processes": accelerator.num_processes,
            "learning_rate": learning_rate,
            "minutes": round((time.monotonic() - started) / 60, 2),
            "device": str(accelerator.device),
            "cpu_threads": torch.get_num_threads() if accelerator.device.type == "cpu" else None,
            "skipped_images": skipped,
            "dataloader_num_workers": loader_settings["num_workers"],
            "data_wait_fraction": round(data_wait.total_fraction, 4),
            "probes": results,
        }
        # The model card, rendered from what this run was (stellar_hf.model_card.TrainingRun). Sizes, target and
        # preprocessing come from the config; the snippets load `card_id`: the --hub_model_id, else this folder.
        size = config.image_size
        card_run = TrainingRun(
            data=data_description,
            data_hub_id=hub_id_or_none(args.dataset_name),
            synthetic=not (args.train_dir or args.dataset_name),
            steps=completed_steps,
            planned_steps=args.max_train_steps,
            global_batch_size=global_batch,
            learning_rate=learning_rate,
            base_learning_rate=args.base_learning_rate,
            weight_decay=args.weight_decay,
            lr_schedule=args.lr_scheduler_type,
            warmup_steps=int(args.warmup_ratio * args.max_train_steps),
            max_grad_norm=args.max_grad_norm,
            seed=args.seed,
            num_processes=accelerator.num_processes,
            mixed_precision=accelerator.mixed_precision,
            device=str(accelerator.device)
            + (f", {summary['cpu_threads']} threads per process" if summary["cpu_threads"] else ""),
            wall_minutes=summary["minutes"],
            resumed_from_step=resume.step if resume is not None else None,
            encoder_init=args.init_encoder_from,
            skipped_images=skipped,
            probes=ProbeResults.from_pretrain_results(
                results,
                dataset=f"labelled image folders (fitted on {args.probe_train_dir}, scored on {args.probe_eval_dir})"
                if args.probe_train_dir
                else "the synthetic scenes (fitted on the train split, scored on the held-out validation split)",
                preprocessing=f"shorter side resized to {size} px (bicubic), centre crop {size} x {size}, normalised "
                "as above",
            ),
            figures=sorted(path.relative_to(output_dir).as_posix() for path in final_figures),
        )
        card_id = args.hub_model_id or str(output_dir)
        (staging / "README.md").write_text(render_model_card(config, run=card_run, model_id=card_id), encoding="utf-8")
        (staging / "results.json").write_text(json.dumps(summary, indent=2))
        written = publish_files(staging, output_dir, last="results.json")
        written += final_figures
        print(format_results(summary, output_dir, written))
        if args.push_to_hub:
            from huggingface_hub import HfApi

            api = HfApi(token=args.hub_token)
            # A bare name lands under the token's namespace: the card on the Hub loads that full id.
            repo_id = api.create_repo(
                args.hub_model_id or output_dir.name, private=args.hub_private_repo, exist_ok=True
            ).repo_id
            if repo_id != card_id:
                with replace_atomically(output_dir / "README.md") as temporary:
                    temporary.write_text(render_model_card(config, run=card_run, model_id=repo_id), encoding="utf-8")
            api.upload_folder(
                repo_id=repo_id,
                folder_path=str(output_dir),
                commit_message=f"STELLAR pretraining, step {completed_steps}",
                ignore_patterns=["checkpoint-*", "logs/*"],
            )
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
