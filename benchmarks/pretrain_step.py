"""One pretraining step of `StellarForPreTraining` against the original STELLAR, measured side by side.

    python benchmarks/pretrain_step.py                                  # ours only (CPU, fp32)
    python benchmarks/pretrain_step.py --original_repo /tmp/stellar_original --original_pythonpath /tmp/tf457
    python benchmarks/pretrain_step.py ... --device cuda --dtype bf16 --repeats 30
    python benchmarks/pretrain_step.py ... --profile                    # + top operators of both sides
    python benchmarks/pretrain_step.py ... --device cuda --compile both --warmup 3   # torch.compile on both sides

The original (github.com/microsoft/STELLAR) is never imported from this repository: `--original_repo` is a work
tree of it somewhere else and `--original_pythonpath` the folder(s) holding the transformers 4.x it was written
for (e.g. `pip install --target /tmp/tf457 "transformers==4.57.1" "huggingface-hub<1.0" "tokenizers<0.23"`).
Its `src.models.modules.titok` (the VQ tokenizer wrapper, whose package imports a file missing from the release) is
replaced by a stub in the worker process; the pixel target used here never touches it.

Configuration, the same on both sides: ViT-S/16 encoder (384 wide, 12 layers, 6 heads, MLP 1536), 224 px, batch
4, r = 16 sparse tokens, 8 masked global views at mask ratio 0.8 (the original's constructor default is 0.75; 0.8 is
passed), 8 local views at 96 px, pixel reconstruction target (MSE, weight 10), decoder 512 wide x 6 layers, 8 heads,
MLP 2048, 16384 prototypes of dimension 256, predictor MLP 384 -> 2048 -> 256, no EMA teacher, SDPA attention.
Weights are random (shapes, not values, matter for speed); inputs are random images on the [0, 1] scale.

One step = `zero_grad(set_to_none=True)`, forward, backward, `AdamW.step()` (torch's default implementation), plus
the preprocessing each implementation does inside its training step: ours normalises its four input tensors (as
`examples/pretrain.py` does in the main process), the original normalises inside its forward. Both draw the masking
noise of the masked views inside the step, on the model's device: the original with the global RNG inside
`forward` (`random_masking`), ours with `StellarForPreTraining.draw_mask_noise` before `forward`, from a generator
on the device re-seeded with `--seed` every step (the same masks every round), passed in as `mask_noise` so that
`forward` holds no random number generator (one graph under `torch.compile`). `examples/pretrain.py` passes it the
same way but draws it from a CPU generator (masks independent of the device); here it is drawn where the original
draws its own. The number of kept patches, and so the work, does not depend on the noise.

`--compile ours` wraps our model in `torch.compile(backend=--compile_backend, mode=--compile_mode)`; `--compile both`
compiles the original's `STELLARModel` too (it may graph-break; the count is reported). The loss of the original
(`STELLAR_Loss`), the normalisation of our inputs, the noise draw and the optimiser step stay eager. Compilation
happens in the warm-up steps, so `--compile` needs `--warmup` >= 1, better >= 2 (the original compiles once per
kind of step, model and full, and a first step can leave a recompilation for the second); graphs compiled during
the timed rounds are reported as a warning. The graph-break and graph counts are
`torch._dynamo.utils.counters` summed over every compilation in the worker.

Two comparisons, because the implementations put the colour augmentation in different places:

(a) `model step`: the model alone. The original runs with `color_augmentation=False` (its global views) and its
    module-level `random_color_blur` replaced by the identity (its local views always get it, there is no switch);
    ours gets views that the data pipeline already coloured.
(b) `full step`: each implementation as it trains. The original colours its 4 x 8 global and 4 x 8 local views
    inside `forward` (one parameter draw per call, batched); ours as `examples/pretrain.py` does by default: the
    DataLoader workers crop in uint8 (`MultiViewCrops`, one parameter draw per view) and the training process
    colours the whole batch on the model's device before the forward (`ViewAugmentation`). Our number is the model
    step plus that colour work for the same views, timed on the model's device with the worker's threads as
    `ViewAugmentation()` minus `ViewAugmentation(color=None)` (uint8 -> float and normalisation alone) on the same
    crops: it runs in the training process, in series with the model.

Each implementation runs in its own worker process (so peak memory is its own); the parent sends one command at a
time, so only one side runs at any moment, and alternates the order every round (ours, theirs, theirs, ours, ...)
so that load from other jobs and clock drift hit both alike. Times are medians over `--repeats` rounds after
`--warmup` untimed steps; `cpu` is the process CPU time of a step (all threads), steadier than the wall clock on a
shared machine. There, also pass `--threads 1` (or set `OMP_WAIT_POLICY=PASSIVE`): OpenMP threads spin while their
partner is descheduled, which makes multi-threaded step times bimodal (4 s or 35 s for the same step).

Peak memory. CUDA: `torch.cuda.max_memory_allocated` over one step (after warm-up, so the AdamW state exists).
CPU: the peak of live tensor bytes during one step, from `torch.profiler`'s allocation events (`profile_memory`),
added to the bytes alive when the step starts (parameters, AdamW state, inputs; gradients are freed by
`zero_grad`). This counts tensors only, like `max_memory_allocated`; the process peak RSS above the RSS measured
after imports (which depends on the allocator and on the transformers version) is printed too, for reference.

Prints a table, then one JSON line (the last line of the output) with every number, including the ratios
ours / original for step time and peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TARGET_TIME_RATIO = 0.7
TARGET_MEMORY_RATIO = 1.0

# ViT-S/16
ENCODER = {
    "hidden_size": 384,
    "num_hidden_layers": 12,
    "num_attention_heads": 6,
    "intermediate_size": 1536,
    "patch_size": 16,
}
DTYPES = ("fp32", "bf16", "fp16")
COMPILE_CHOICES = ("none", "ours", "both")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--original_repo",
        default=None,
        help="work tree of microsoft/STELLAR (outside this repo)",
    )
    parser.add_argument(
        "--original_pythonpath",
        default=None,
        help=f"extra sys.path entries ({os.pathsep!r}-separated) for the original: its transformers 4.x",
    )
    parser.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when available)")
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="fp32",
        help="fp32, or autocast to bf16/fp16 on both sides (GPU)",
    )
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--local_image_size", type=int, default=96)
    parser.add_argument("--num_masked_views", type=int, default=8)
    parser.add_argument("--num_local_views", type=int, default=8)
    parser.add_argument("--num_sparse_tokens", type=int, default=16)
    parser.add_argument("--mask_ratio", type=float, default=0.8)
    parser.add_argument("--num_prototypes", type=int, default=16384)
    parser.add_argument("--prototype_dim", type=int, default=256)
    parser.add_argument(
        "--repeats",
        type=int,
        default=10,
        help="timed rounds (each: one step of every kind)",
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side and kind first")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads in each worker (default: torch's); on a machine other jobs share, 1 avoids OpenMP "
        "threads spinning while their partner is descheduled, which makes multi-threaded timings bimodal",
    )
    parser.add_argument(
        "--source_size",
        default="375x500",
        help="HxW of the images the colour-work timing crops",
    )
    parser.add_argument(
        "--compile",
        choices=COMPILE_CHOICES,
        default="none",
        help="torch.compile our model (ours) or both models (both); compilation runs in the warm-up steps",
    )
    parser.add_argument(
        "--compile_backend",
        default="inductor",
        help="torch.compile backend (aot_eager needs no C++ compiler)",
    )
    parser.add_argument(
        "--compile_mode",
        default=None,
        help="torch.compile mode (default, reduce-overhead, max-autotune, ...)",
    )
    parser.add_argument("--skip_full", action="store_true", help="measure (a) only")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also print each side's top operators (one step)",
    )
    parser.add_argument("--profile_rows", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--_worker", choices=("ours", "original"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.batch_size < 1:
        parser.error("--repeats and --batch_size must be positive, --warmup non-negative")
    if args.dtype == "fp16" and not (args.device or "").startswith("cuda"):
        parser.error("--dtype fp16 needs --device cuda")
    if args.compile != "none" and args.warmup < 1:
        parser.error(
            f"--compile {args.compile} compiles during the warm-up steps, so it needs --warmup >= 1 (better >= 2); "
            "with --warmup 0 the first timed round would include the compilation"
        )
    return args


# ----------------------------------------------------------------------------------------------------------------------
# Worker side: one implementation per process, driven by JSON commands on stdin
# ----------------------------------------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for tensor in tensors:
        if tensor is None:
            continue
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


class Worker:
    """Builds one implementation, its AdamW and a fixed random batch; runs steps on command."""

    side: str  # "ours" or "original", as in --compile

    def __init__(self, args: argparse.Namespace):
        import torch

        self.torch = torch
        self.args = args
        if args.threads:
            torch.set_num_threads(args.threads)
        self.device = torch.device(args.device)
        torch.manual_seed(args.seed)
        generator = torch.Generator().manual_seed(args.seed)
        b, m, k, s, t = (
            args.batch_size,
            args.num_masked_views,
            args.num_local_views,
            args.image_size,
            args.local_image_size,
        )
        # Unnormalised images on [0, 1], as both data pipelines hand them over.
        self.batch = {
            "pixel_values": torch.rand(b, 3, s, s, generator=generator),
            "global_views": torch.rand(b, m, 3, s, s, generator=generator),
            "local_views": torch.rand(b, k, 3, t, t, generator=generator),
        }
        self.batch = {key: value.to(self.device) for key, value in self.batch.items()}
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype)
        self.build()
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)
        self.model.train()
        # `self.model` stays the plain module (parameters, attributes the step sets); `loss` calls `self.forward_model`.
        self.compiled = args.compile == "both" or args.compile == self.side
        self.forward_model = self.model
        if self.compiled:
            self.forward_model = torch.compile(self.model, backend=args.compile_backend, mode=args.compile_mode)

    def autocast(self):
        import contextlib

        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return self.torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def info(self) -> dict:
        parameters = list(self.model.parameters())
        return {
            "parameters": sum(p.numel() for p in parameters),
            "trainable_parameters": sum(p.numel() for p in parameters if p.requires_grad),
            "torch": self.torch.__version__,
            "threads": self.torch.get_num_threads(),
            "compiled": self.compiled,
            **self.describe(),
        }

    def compile_stats(self) -> dict:
        """Graphs and graph breaks dynamo has recorded in this process so far (summed over every compilation)."""
        if not self.compiled:
            return {"graph_breaks": None, "graphs": None, "graph_break_reasons": {}}
        from torch._dynamo.utils import counters

        reasons = {}
        for reason, count in counters["graph_break"].items():
            first_line = reason.strip().splitlines()[0][:160] if reason.strip() else "?"
            reasons[first_line] = reasons.get(first_line, 0) + count
        return {
            "graph_breaks": sum(counters["graph_break"].values()),
            "graphs": counters["stats"]["unique_graphs"],
            "graph_break_reasons": reasons,
        }

    def step(self, mode: str) -> dict:
        torch = self.torch
        self.synchronize()
        start_cpu, start = time.process_time(), time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss = self.loss(mode)
        loss.backward()
        self.optimizer.step()
        self.synchronize()
        wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
        if not torch.isfinite(loss.detach()):
            raise RuntimeError(f"non-finite loss {loss.item()}")
        return {"wall": wall, "cpu": cpu, "loss": float(loss.detach())}

    def grads_received(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.grad is not None)

    def memory(self, mode: str) -> dict:
        """Peak memory of one step (after warm-up); see the module docstring."""
        torch = self.torch
        self.optimizer.zero_grad(set_to_none=True)
        result = {}
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.step(mode)
            result["peak_bytes"] = torch.cuda.max_memory_allocated(self.device)
            result["method"] = "torch.cuda.max_memory_allocated"
        else:
            from torch.profiler import ProfilerActivity, profile

            state = [v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
            alive = _tensor_bytes(list(self.model.parameters()) + list(self.model.buffers()) + state)
            alive += _tensor_bytes(self.batch.values())
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
                self.step(mode)
            events = [
                event
                for event in profiler.profiler.kineto_results.events()
                if event.name() == "[memory]" and str(event.device_type()).endswith("CPU")
            ]
            events.sort(key=lambda event: event.start_ns())
            current = peak = 0
            for event in events:
                current += event.nbytes()
                peak = max(peak, current)
            result.update(
                peak_bytes=alive + peak,
                alive_at_start_bytes=alive,
                step_peak_bytes=peak,
                method="torch.profiler allocation events + tensors alive at step start",
            )
        # Process peak RSS over one unprofiled step, above the RSS after imports (reference only).
        self.optimizer.zero_grad(set_to_none=True)
        if _reset_peak_rss():
            self.step(mode)
            peak_rss = _peak_rss_bytes()
            if peak_rss is not None:
                result["peak_rss_above_imports_bytes"] = peak_rss - self.rss_after_imports
        return result

    def profile(self, mode: str, rows: int) -> dict:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        sort_by = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        with profile(activities=activities, record_shapes=True) as profiler:
            self.step(mode)
        averages = profiler.key_averages()
        table = averages.table(sort_by=sort_by, row_limit=rows)
        shapes = profiler.key_averages(group_by_input_shape=True).table(sort_by=sort_by, row_limit=rows)
        total = sum(getattr(event, sort_by) for event in averages)
        return {"table": table, "shapes_table": shapes, "total_self_us": total}


class OursWorker(Worker):
    side = "ours"

    def build(self) -> None:
        sys.path.insert(0, str(REPO_ROOT))
        import transformers

        from stellar_hf import StellarConfig
        from stellar_hf.data import ColorAugmentation, MultiViewCrops, ViewAugmentation, collate_views, normalize
        from stellar_hf.modeling_stellar import StellarForPreTraining

        args = self.args
        self.rss_after_imports = _rss_bytes()
        self.transformers_version = transformers.__version__
        self.normalize = normalize
        self.config = StellarConfig(
            **ENCODER,
            image_size=args.image_size,
            num_sparse_tokens=args.num_sparse_tokens,
            reconstruction_target="pixel",
            num_masked_views=args.num_masked_views,
            num_local_views=args.num_local_views,
            local_image_size=args.local_image_size,
            mask_ratio=args.mask_ratio,
            num_prototypes=args.num_prototypes,
            prototype_dim=args.prototype_dim,
            attn_implementation="sdpa",
        )
        self.model = StellarForPreTraining(self.config).to(self.device)
        # Masking noise: drawn on the model's device like the original's, from a generator re-seeded every step.
        self.mask_generator = self.torch.Generator(device=self.device)
        self.crops = MultiViewCrops(
            image_size=args.image_size,
            num_global_views=args.num_masked_views,
            num_local_views=args.num_local_views,
            local_image_size=args.local_image_size,
        )
        self.collate_views = collate_views
        # With and without colour; both turn the uint8 crops into normalised floats, so the difference is the colour.
        self.augmentations = {
            flag: ViewAugmentation(ColorAugmentation() if flag else None, self.config.image_mean, self.config.image_std)
            for flag in (True, False)
        }
        height, width = (int(v) for v in args.source_size.lower().split("x"))
        generator = self.torch.Generator().manual_seed(args.seed + 1)
        self.source_images = [
            self.torch.randint(0, 256, (3, height, width), dtype=self.torch.uint8, generator=generator)
            for _ in range(args.batch_size)
        ]
        self.color_round = 0

    def describe(self) -> dict:
        return {
            "implementation": "stellar_hf StellarForPreTraining",
            "transformers": self.transformers_version,
            "attn_implementation": self.config._attn_implementation,
            "decoder_attn_implementation": self.config._attn_implementation,
        }

    def loss(self, mode: str):
        mean, std = self.config.image_mean, self.config.image_std
        inputs = {key: self.normalize(value, mean, std) for key, value in self.batch.items()}
        self.mask_generator.manual_seed(self.args.seed)
        inputs["mask_noise"] = self.model.draw_mask_noise(inputs.get("global_views"), self.mask_generator, self.device)
        return self.forward_model(**inputs).loss

    def color(self) -> dict:
        """The colour work of one batch on the model's device, as the training loop does it before the forward:
        `ViewAugmentation()` minus `ViewAugmentation(color=None)` on the same crops (new draws every round)."""
        self.color_round += 1
        items = [
            self.crops(image, seed=self.args.seed * 1_000_003 + self.color_round * 1_009 + index)
            for index, image in enumerate(self.source_images)
        ]
        batch = {
            key: value.to(self.device) for key, value in self.collate_views(items).items() if self.torch.is_tensor(value)
        }
        times = {}
        for flag in (True, False) if self.color_round % 2 else (False, True):
            self.synchronize()
            start_cpu, start = time.process_time(), time.perf_counter()
            self.augmentations[flag](batch)
            self.synchronize()
            times[flag] = (time.perf_counter() - start, time.process_time() - start_cpu)
        return {
            "wall": times[True][0] - times[False][0],
            "cpu": times[True][1] - times[False][1],
            "wall_with": times[True][0],
            "wall_without": times[False][0],
        }


class OriginalWorker(Worker):
    side = "original"

    def build(self) -> None:
        args = self.args
        paths = [p for p in (args.original_pythonpath or "").split(os.pathsep) if p] + [args.original_repo]
        sys.path[:0] = paths
        # The VQ tokenizer wrapper: unused with the pixel target, and its package imports a module the release
        # lacks (titok_modules/ema_model.py). A stub that fails loudly if anything tries to build it.
        stub = types.ModuleType("src.models.modules.titok")

        class PretrainedTokenizer:
            def __init__(self, *unused, **unused_kw):
                raise RuntimeError("the VQ tokenizer is stubbed out in this benchmark (pixel target only)")

        stub.PretrainedTokenizer = PretrainedTokenizer
        sys.modules["src.models.modules.titok"] = stub
        import transformers
        from transformers import ViTConfig, ViTModel

        if not transformers.__version__.startswith("4."):
            raise RuntimeError(
                f"the original needs transformers 4.x, found {transformers.__version__} at {transformers.__file__}: "
                "pass --original_pythonpath"
            )
        from src.losses.stellar_loss import STELLAR_Loss
        from src.models import stellar_model

        self.rss_after_imports = _rss_bytes()
        self.transformers_version = transformers.__version__
        self.module = stellar_model
        self.original_color = stellar_model.random_color_blur
        with tempfile.TemporaryDirectory() as folder:
            # STELLARModel builds ViT-B from ViTConfig() or loads `vit_pretrained`: hand it a random ViT-S/16.
            ViTModel(ViTConfig(**ENCODER, image_size=args.image_size)).save_pretrained(folder)
            self.model = stellar_model.STELLARModel(
                num_sparse_tokens=args.num_sparse_tokens,
                num_clusters=args.num_prototypes,
                prototype_dim=args.prototype_dim,
                num_masks=args.num_masked_views,
                masking_ratio=args.mask_ratio,
                num_local_crops=args.num_local_views,
                color_augmentation=True,
                vit_pretrained=folder,
            ).to(self.device)
        self.criterion = STELLAR_Loss()
        self.labels = self.torch.zeros(args.batch_size, dtype=self.torch.long, device=self.device)

    def describe(self) -> dict:
        return {
            "implementation": "microsoft/STELLAR STELLARModel",
            "transformers": self.transformers_version,
            "attn_implementation": self.model.encoder.config._attn_implementation,
            "decoder_attn_implementation": self.model.decoder.config._attn_implementation,
        }

    def loss(self, mode: str):
        full = mode == "full"
        self.model.color_augmentation = full
        self.module.random_color_blur = self.original_color if full else (lambda views: views)
        inputs = {
            "image": self.batch["pixel_values"],
            "labels": self.labels,
            "global_views": self.batch["global_views"],
            "local_views": self.batch["local_views"],
        }
        predictions = self.forward_model(inputs, mode="train")["predictions"]
        return self.criterion(predictions, None)


def worker_main(args: argparse.Namespace) -> None:
    # Commands and answers travel on private pipes; anything a library prints goes to stderr.
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    worker = (OursWorker if args._worker == "ours" else OriginalWorker)(args)
    answers.write(json.dumps({"ok": True, "info": worker.info()}) + "\n")
    for line in sys.stdin:
        command = json.loads(line)
        try:
            name = command["cmd"]
            if name == "quit":
                break
            if name == "step":
                result = worker.step(command["mode"])
            elif name == "color":
                result = worker.color()
            elif name == "memory":
                result = worker.memory(command["mode"])
            elif name == "grads":
                result = {"with_grad": worker.grads_received()}
            elif name == "compile_stats":
                result = worker.compile_stats()
            elif name == "profile":
                result = worker.profile(command["mode"], command.get("rows", 30))
            else:
                raise ValueError(f"unknown command {name!r}")
            answers.write(json.dumps({"ok": True, **result}) + "\n")
        except Exception as error:  # noqa: BLE001 - report it to the parent, keep serving
            import traceback

            traceback.print_exc()
            answers.write(json.dumps({"ok": False, "error": f"{type(error).__name__}: {error}"}) + "\n")


# ----------------------------------------------------------------------------------------------------------------------
# Parent side
# ----------------------------------------------------------------------------------------------------------------------


class WorkerProcess:
    def __init__(self, side: str, argv: list[str]):
        self.side = side
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            *argv,
            "--_worker",
            side,
        ]
        env = dict(os.environ)
        if side == "original":
            env.pop("PYTHONPATH", None)  # the worker puts the original's paths first itself
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            env=env,
            cwd=str(REPO_ROOT),
        )
        self.info = self._read()["info"]

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            code = self.process.wait()
            raise RuntimeError(f"the {self.side} worker exited (code {code}); see its messages above")
        answer = json.loads(line)
        if not answer.pop("ok", False):
            raise RuntimeError(f"{self.side} worker: {answer.get('error')}")
        return answer

    def __call__(self, cmd: str, **fields) -> dict:
        self.process.stdin.write(json.dumps({"cmd": cmd, **fields}) + "\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.process.stdin.flush()
                self.process.wait(timeout=60)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.process.kill()


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_average() -> list[float] | None:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def quartiles(values: list[float]) -> tuple[float, float] | None:
    if len(values) < 2:
        return None
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 4)


def original_problem(args: argparse.Namespace) -> str | None:
    """Why the original cannot be measured, or None."""
    if not args.original_repo:
        return "no --original_repo given"
    model_file = Path(args.original_repo) / "src" / "models" / "stellar_model.py"
    if not model_file.is_file():
        return f"{model_file} not found (--original_repo must be a work tree of microsoft/STELLAR)"
    if REPO_ROOT in Path(args.original_repo).resolve().parents or Path(args.original_repo).resolve() == REPO_ROOT:
        return "--original_repo must live outside this repository"
    if not args.original_pythonpath:
        return "no --original_pythonpath given (the original needs transformers 4.x, see the docstring)"
    return None


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args._worker:
        worker_main(args)
        return {}
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--profile"]
    forwarded += ["--device", args.device]
    skipped = original_problem(args)
    if args.compile != "none":
        print(
            f"--compile {args.compile} (backend {args.compile_backend}, mode {args.compile_mode}): "
            f"torch.compile runs during the {args.warmup} warm-up step(s) of each kind, which are not timed; "
            "--warmup must be >= 1, and >= 2 is safer (a first step can leave a recompilation for the second). "
            "Graphs compiled during the timed rounds are reported.",
            file=sys.stderr,
            flush=True,
        )
    load_before = load_average()
    sides = {"ours": WorkerProcess("ours", forwarded)}
    try:
        if skipped is None:
            sides["original"] = WorkerProcess("original", forwarded)
        kinds = [("ours", "model"), ("original", "model")]
        if not args.skip_full:
            kinds += [("ours", "color"), ("original", "full")]
        kinds = [(side, kind) for side, kind in kinds if side in sides]

        def run(side: str, kind: str) -> dict:
            return sides[side]("color") if kind == "color" else sides[side]("step", mode=kind)

        warmup_wall = {key: [] for key in kinds}
        for index in range(args.warmup):
            for side, kind in kinds:
                warmup_wall[(side, kind)].append(run(side, kind)["wall"])
            print(
                f"warm-up {index + 1}/{args.warmup}: "
                + ", ".join(f"{s} {k} {warmup_wall[(s, k)][-1]:.2f}s" for s, k in kinds),
                file=sys.stderr,
                flush=True,
            )
        compile_after_warmup = {side: worker("compile_stats") for side, worker in sides.items()}
        wall = {key: [] for key in kinds}
        cpu = {key: [] for key in kinds}
        losses = {key: [] for key in kinds}
        for index in range(args.repeats):
            for key in kinds if index % 2 == 0 else kinds[::-1]:
                result = run(*key)
                wall[key].append(result["wall"])
                cpu[key].append(result["cpu"])
                if "loss" in result:
                    losses[key].append(result["loss"])
            print(
                f"round {index + 1}/{args.repeats}: "
                + ", ".join(f"{s} {k} {wall[(s, k)][-1]:.2f}s (cpu {cpu[(s, k)][-1]:.2f}s)" for s, k in kinds)
                + f" (load {load_average()})",
                file=sys.stderr,
                flush=True,
            )
        compile_after_timing = {side: worker("compile_stats") for side, worker in sides.items()}
        grads = {side: worker("grads")["with_grad"] for side, worker in sides.items()}
        memory = {}
        for side, worker in sides.items():
            for kind in ("model",) + (() if args.skip_full or side == "ours" else ("full",)):
                memory[(side, kind)] = worker("memory", mode=kind)
        profiles = {}
        if args.profile:
            for side, worker in sides.items():
                profiles[side] = worker("profile", mode="model", rows=args.profile_rows)
    finally:
        for worker in sides.values():
            worker.close()
    load_after = load_average()

    def stats(key) -> dict:
        return {
            "wall_median_s": median(wall[key]),
            "wall_mean_s": statistics.fmean(wall[key]) if wall[key] else None,
            "wall_min_s": min(wall[key]) if wall[key] else None,
            "wall_quartiles_s": quartiles(wall[key]),
            "cpu_median_s": median(cpu[key]),
        }

    rows = {f"{side}/{kind}": stats((side, kind)) for side, kind in kinds}
    ours_model = rows["ours/model"]
    result = {
        "benchmark": "pretrain_step",
        "device": args.device,
        "device_name": device_name(args.device),
        "dtype": args.dtype,
        "threads": sides["ours"].info["threads"],
        "cpu_count": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "config": {
            "encoder": "ViT-S/16",
            **ENCODER,
            "image_size": args.image_size,
            "batch_size": args.batch_size,
            "num_masked_views": args.num_masked_views,
            "num_local_views": args.num_local_views,
            "local_image_size": args.local_image_size,
            "num_sparse_tokens": args.num_sparse_tokens,
            "mask_ratio": args.mask_ratio,
            "num_prototypes": args.num_prototypes,
            "prototype_dim": args.prototype_dim,
        },
        "repeats": args.repeats,
        "warmup": args.warmup,
        "compile": {
            "models": args.compile,
            "backend": args.compile_backend if args.compile != "none" else None,
            "mode": args.compile_mode if args.compile != "none" else None,
            "sides": {
                side: {
                    "compiled": worker.info["compiled"],
                    **compile_after_warmup[side],
                    "graphs_compiled_while_timed": (
                        compile_after_timing[side]["graphs"] - compile_after_warmup[side]["graphs"]
                        if worker.info["compiled"]
                        else None
                    ),
                }
                for side, worker in sides.items()
            },
        },
        "warmup_wall_s": {f"{side}/{kind}": value for (side, kind), value in warmup_wall.items()},
        "implementations": {side: worker.info for side, worker in sides.items()},
        "parameters_with_gradient": grads,
        "timings": rows,
        "memory": {f"{side}/{kind}": value for (side, kind), value in memory.items()},
        "original_skipped": skipped,
        "target_time_ratio": TARGET_TIME_RATIO,
        "target_memory_ratio": TARGET_MEMORY_RATIO,
    }
    if "ours/color" in rows:
        color = rows["ours/color"]
        full = {
            "wall_median_s": ours_model["wall_median_s"] + color["wall_median_s"],
            "cpu_median_s": ours_model["cpu_median_s"] + color["cpu_median_s"],
            "note": "ours/model + ours/color (the colour work runs on the model's device before the forward)",
        }
        result["timings"]["ours/full"] = full
    ratios = {}
    if skipped is None:
        ratios["model_step_time"] = ratio(ours_model["wall_median_s"], rows["original/model"]["wall_median_s"])
        ratios["model_step_cpu_time"] = ratio(ours_model["cpu_median_s"], rows["original/model"]["cpu_median_s"])
        paired = [o / t for o, t in zip(wall[("ours", "model")], wall[("original", "model")])]
        ratios["model_step_time_paired"] = round(statistics.median(paired), 4)
        # Fastest step of each: the least disturbed by other jobs (the best estimate on an otherwise idle machine).
        ratios["model_step_time_min"] = ratio(ours_model["wall_min_s"], rows["original/model"]["wall_min_s"])
        if "ours/full" in result["timings"]:
            ours_full, original_full = (
                result["timings"]["ours/full"],
                rows["original/full"],
            )
            ratios["full_step_time"] = ratio(ours_full["wall_median_s"], original_full["wall_median_s"])
            ratios["full_step_cpu_time"] = ratio(ours_full["cpu_median_s"], original_full["cpu_median_s"])
            ratios["full_step_time_min"] = ratio(
                ours_model["wall_min_s"] + rows["ours/color"]["wall_min_s"],
                original_full["wall_min_s"],
            )
        ratios["peak_memory_model"] = ratio(
            memory[("ours", "model")]["peak_bytes"],
            memory[("original", "model")]["peak_bytes"],
        )
        if ("original", "full") in memory:
            ratios["peak_memory_full"] = ratio(
                memory[("ours", "model")]["peak_bytes"],
                memory[("original", "full")]["peak_bytes"],
            )
        ratios["meets_time_target"] = ratios["model_step_time"] <= TARGET_TIME_RATIO
        ratios["meets_memory_target"] = ratios["peak_memory_model"] <= TARGET_MEMORY_RATIO
    result["ratios"] = ratios

    print_report(result, profiles, losses)
    print(json.dumps(result))
    return result


def print_report(result: dict, profiles: dict, losses: dict) -> None:
    mib = 2**20
    info = result["implementations"]
    print(
        f"\ndevice: {result['device']} ({result['device_name']}), {result['dtype']}, {result['threads']} threads, "
        f"{result['cpu_count']} CPUs, load average before {result['load_average_before']} "
        f"after {result['load_average_after']}"
    )
    for side, details in info.items():
        print(
            f"  {side:<9} {details['implementation']}: torch {details['torch']}, transformers {details['transformers']}, "
            f"attention {details['attn_implementation']}/{details['decoder_attn_implementation']}, "
            f"{details['parameters'] / 1e6:.2f} M parameters, "
            f"{result['parameters_with_gradient'][side] / 1e6:.2f} M receive gradients"
        )
    config = result["config"]
    print(
        f"config: ViT-S/16, {config['image_size']} px, batch {config['batch_size']}, {config['num_masked_views']} masked "
        f"views (ratio {config['mask_ratio']}), {config['num_local_views']} local views at "
        f"{config['local_image_size']} px, r = {config['num_sparse_tokens']}, {config['num_prototypes']} prototypes; "
        f"median of {result['repeats']} interleaved rounds after {result['warmup']} warm-up steps"
    )
    compile_settings = result["compile"]
    if compile_settings["models"] == "none":
        print("torch.compile: none (both sides eager)")
    else:
        print(
            f"torch.compile: --compile {compile_settings['models']}, backend {compile_settings['backend']}, "
            f"mode {compile_settings['mode']}"
        )
        for side, stats in compile_settings["sides"].items():
            if not stats["compiled"]:
                print(f"  {side:<9} eager")
                continue
            first = ", ".join(
                f"{name.split('/')[1]} {times[0]:.1f} s"
                for name, times in result["warmup_wall_s"].items()
                if name.startswith(side + "/") and times and name != "ours/color"
            )
            print(
                f"  {side:<9} compiled: {stats['graph_breaks']} graph breaks, {stats['graphs']} graphs after "
                f"warm-up; first warm-up step (with compilation): {first}"
            )
            for reason, count in stats["graph_break_reasons"].items():
                print(f"            {count} x {reason}")
            if stats["graphs_compiled_while_timed"]:
                print(
                    f"  WARNING: {side} compiled {stats['graphs_compiled_while_timed']} graph(s) during the timed "
                    "rounds: raise --warmup"
                )
    if result["original_skipped"]:
        print(f"comparison with the original skipped: {result['original_skipped']}")
    header = f"{'step':<16} {'wall s':>8} {'IQR s':>15} {'min s':>7} {'cpu s':>7} {'peak MiB':>9} {'RSS+ MiB':>9}"
    print(header)
    print("-" * len(header))
    memory = result["memory"]
    for name, row in result["timings"].items():
        quart = row.get("wall_quartiles_s")
        iqr = f"{quart[0]:.2f}-{quart[1]:.2f}" if quart else ""
        mem_key = name if name in memory else ("ours/model" if name == "ours/full" else None)
        peak = memory.get(mem_key, {}).get("peak_bytes") if mem_key else None
        rss = memory.get(mem_key, {}).get("peak_rss_above_imports_bytes") if mem_key else None
        print(
            f"{name:<16} {row['wall_median_s']:>8.3f} {iqr:>15} "
            f"{row['wall_min_s'] if row.get('wall_min_s') is not None else float('nan'):>7.3f} "
            f"{row['cpu_median_s']:>7.3f} {peak / mib if peak else float('nan'):>9.1f} "
            f"{rss / mib if rss else float('nan'):>9.1f}"
        )
    if "ours/full" in result["timings"]:
        print("(ours/full = ours/model + ours/color; the colour work runs on the model's device before the forward)")
    ratios = result["ratios"]
    if ratios:
        print(
            f"ours / original: (a) model step {ratios['model_step_time']:.3f} (cpu {ratios['model_step_cpu_time']:.3f}, "
            f"paired {ratios['model_step_time_paired']:.3f}, min {ratios['model_step_time_min']:.3f}); "
            f"peak memory {ratios['peak_memory_model']:.3f}"
        )
        if "full_step_time" in ratios:
            print(
                f"                 (b) full step {ratios['full_step_time']:.3f} (cpu {ratios['full_step_cpu_time']:.3f}, "
                f"min {ratios['full_step_time_min']:.3f}); "
                f"peak memory {ratios.get('peak_memory_full', float('nan')):.3f}"
            )
        print(
            f"target: time <= {TARGET_TIME_RATIO} x the original: "
            f"{'met' if ratios['meets_time_target'] else 'NOT met'}; memory <= {TARGET_MEMORY_RATIO} x: "
            f"{'met' if ratios['meets_memory_target'] else 'NOT met'}"
        )
    for side, profile in profiles.items():
        print(f"\n### {side}: top operators of one model step (self time)\n{profile['table']}")
        print(f"\n### {side}: by input shape\n{profile['shapes_table']}")


if __name__ == "__main__":
    main()
