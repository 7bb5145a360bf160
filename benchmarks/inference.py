"""Forward time of `StellarModel` against transformers' `ViTModel` with the same backbone, measured side by side.

    python benchmarks/inference.py                                   # CPU, fp32, ViT-S/16 and ViT-B/16
    python benchmarks/inference.py --device cuda --dtype bf16 --repeats 50
    python benchmarks/inference.py --models s16 --repeats 5 --profile
    python benchmarks/inference.py --scaling --repeats 3 --warmup 1 --threads 1   # time and memory sweeps

Both models get the same widths, depth, heads, MLP, patch size and image size, SDPA attention, random weights and
the same normalised input batch. `ViTModel` runs without its pooler (`add_pooling_layer=False`); `StellarModel`
runs its full forward: 1 + N + r tokens through the encoder plus the spatial-semantic factorization. Repetitions
are interleaved (STELLAR, ViT, ViT, STELLAR, ...) so that clock and thermal drift hit both models alike; the
reported time is the median over `--repeats` after `--warmup` untimed calls, under `torch.inference_mode()`.

The sequence grows from 1 + N to 1 + N + r tokens (197 -> 213 at 224 px, r = 16, about 8%); with attention growing
with the square of the sequence and the factorization's two d x d projections, the forward FLOPs grow by 9.4% (S/16)
and 9.2% (B/16). The target is a time ratio of at most 1.10. docs/benchmarks.md has measured numbers.

Columns: `ratio` = median STELLAR time / median ViT time (the number the target applies to); `paired` = median of
the per-round ratios; `min` = ratio of the fastest calls; `cpu` = ratio of median process CPU time (CPU only), the
steadiest of the four when other jobs share the machine; `tokens` = sequence length ratio (213 / 197); `flops` =
the ratio of counted forward FLOPs (attention grows with the square of the sequence, and the factorization adds two
d x d projections), the floor a perfect implementation would reach. Prints a table, then one JSON line (the last line of the
output) with every number.

`--scaling` measures instead how STELLAR's forward time and peak memory grow, for one backbone (`--models`, s16 by
default), in three sweeps that each vary one factor with the others at `--batch_size`, `--image_size` and
`--num_sparse_tokens`: the number of sparse tokens r (`--scaling_tokens`), the resolution (`--scaling_resolutions`,
position embeddings interpolated from the `--image_size` grid, for both models) and the batch (`--scaling_batches`).
ViTModel at the same resolution and batch is the reference column, timed interleaved with STELLAR at every point
(in the token sweep it does not depend on r; re-measuring it shows the drift between points). Memory is the peak of the bytes allocated during one forward call above what was allocated before it
(activations, temporaries and outputs; weights and input excluded): on CUDA `torch.cuda.max_memory_allocated` after
`reset_peak_memory_stats` minus the allocation at the start (the total peak is reported too); on CPU the running
maximum of the summed allocation (+) and free (-) events that `torch.profiler` records with `profile_memory=True`, in
the order they happened. On CUDA the sweeps are repeated in bf16 with SDPA and, when `flash_attn` is importable, with
flash_attention_2 (the GPU section); on CPU that section is skipped with a printed reason. One table per sweep, and the
JSON line carries everything under "scaling".
"""

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import ViTConfig, ViTModel

try:
    from stellar_hf import StellarConfig, StellarModel
except ImportError:  # run from a clone without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from stellar_hf import StellarConfig, StellarModel

# name -> (hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, patch_size)
BACKBONES = {
    "s16": (384, 12, 6, 1536, 16),
    "b16": (768, 12, 12, 3072, 16),
    "l16": (1024, 24, 16, 4096, 16),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TARGET_RATIO = 1.10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda[:i]")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights and inputs (bf16/fp16 on GPU)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--num_sparse_tokens", type=int, default=16, help="r, the sparse tokens of STELLAR")
    parser.add_argument(
        "--models",
        default=None,
        help=f"comma-separated backbones from {sorted(BACKBONES)} (s16,b16; s16 for --scaling)",
    )
    parser.add_argument("--repeats", type=int, default=20, help="timed forward calls per model")
    parser.add_argument("--warmup", type=int, default=3, help="untimed forward calls per model first")
    parser.add_argument("--attn_implementation", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--profile", action="store_true", help="after timing, print torch.profiler's top operators for both models"
    )
    parser.add_argument("--scaling", action="store_true", help="time and memory sweeps over r, resolution and batch")
    parser.add_argument("--scaling_tokens", default="1,4,16,64,196", help="r values of the token sweep")
    parser.add_argument("--scaling_resolutions", default="160,224,320", help="image sizes of the resolution sweep")
    parser.add_argument("--scaling_batches", default="1,4,16", help="batch sizes of the batch sweep")
    args = parser.parse_args(argv)
    if args.models is None:
        args.models = "s16" if args.scaling else "s16,b16"
    try:
        for key in ("scaling_tokens", "scaling_resolutions", "scaling_batches"):
            setattr(args, key, [int(value) for value in getattr(args, key).split(",") if value.strip()])
    except ValueError:
        parser.error("--scaling_tokens, --scaling_resolutions and --scaling_batches take comma-separated integers")
    unknown = [name for name in args.models.split(",") if name not in BACKBONES]
    if unknown:
        parser.error(f"unknown --models {unknown}; choose from {sorted(BACKBONES)}")
    if args.repeats < 1 or args.warmup < 0 or args.batch_size < 1:
        parser.error("--repeats and --batch_size must be positive, --warmup non-negative")
    if args.dtype != "fp32" and not args.device.startswith("cuda"):
        print(f"note: {args.dtype} on CPU is supported but not what this benchmark targets", file=sys.stderr)
    return args


def build_models(name: str, args: argparse.Namespace) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The STELLAR model and the plain ViT of one backbone, same sizes, same attention implementation, eval mode."""
    hidden, layers, heads, mlp, patch = BACKBONES[name]
    common = dict(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=mlp,
        hidden_act="gelu",
        layer_norm_eps=1e-12,
        qkv_bias=True,
        image_size=args.image_size,
        patch_size=patch,
        num_channels=3,
        attn_implementation=args.attn_implementation,
    )
    stellar = StellarModel(StellarConfig(num_sparse_tokens=args.num_sparse_tokens, **common))
    vit = ViTModel(ViTConfig(**common), add_pooling_layer=False)
    dtype = DTYPES[args.dtype]
    return (
        stellar.to(device=args.device, dtype=dtype).eval(),
        vit.to(device=args.device, dtype=dtype).eval(),
    )


def forward_gflops(name: str, batch_size: int, image_size: int, num_sparse_tokens: int) -> tuple[float, float]:
    """
    Multiply-add FLOPs (x2) of one forward pass of (StellarModel, ViTModel), counted from the shapes: patch embedding,
    per layer the q/k/v/o and MLP matmuls plus the two attention matmuls, and STELLAR's factorization (two d x d
    projections and two (N x r x d) products). Norms, softmax and element-wise ops are left out. A timing ratio far
    above this FLOP ratio points at overhead rather than arithmetic.
    """
    hidden, layers, _, mlp, patch = BACKBONES[name]
    num_patches = (image_size // patch) ** 2

    def encoder(sequence: int) -> float:
        linear = sequence * (4 * hidden * hidden + 2 * hidden * mlp)
        attention = 2 * sequence * sequence * hidden
        return layers * (linear + attention)

    patch_embedding = num_patches * 3 * patch * patch * hidden
    factorization = (num_patches + num_sparse_tokens) * hidden * hidden + 2 * num_patches * num_sparse_tokens * hidden
    stellar = encoder(1 + num_patches + num_sparse_tokens) + patch_embedding + factorization
    vit = encoder(1 + num_patches) + patch_embedding
    return 2 * batch_size * stellar / 1e9, 2 * batch_size * vit / 1e9


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def time_side_by_side(
    models: dict[str, torch.nn.Module], pixel_values: torch.Tensor, repeats: int, warmup: int, device: str
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """
    Seconds per forward call of each model; calls alternate between the models, the order flipping every round.

    Returns wall-clock times and, alongside, the CPU time the process used during each call (all threads). On a
    machine that other jobs share, the CPU time is less disturbed than the wall clock; on GPU it is meaningless.
    """
    names = list(models)
    with torch.inference_mode():
        for _ in range(warmup):
            for name in names:
                models[name](pixel_values=pixel_values)
        synchronize(device)
        wall = {name: [] for name in names}
        cpu = {name: [] for name in names}
        for index in range(repeats):
            for name in names if index % 2 == 0 else names[::-1]:
                synchronize(device)
                start, start_cpu = time.perf_counter(), time.process_time()
                models[name](pixel_values=pixel_values)
                synchronize(device)
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu


def interquartile_range(values: list[float]) -> float:
    """Spread of the timings (0 for fewer than two)."""
    if len(values) < 2:
        return 0.0
    quartiles = statistics.quantiles(values, n=4)
    return quartiles[2] - quartiles[0]


def profile_models(models: dict[str, torch.nn.Module], pixel_values: torch.Tensor, device: str, rows: int = 25) -> None:
    """Print the operators each model spends its time in (self time, a few calls after one warmup call)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    sort_by = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    with torch.inference_mode():
        for name, model in models.items():
            model(pixel_values=pixel_values)
            synchronize(device)
            with profile(activities=activities, record_shapes=False) as profiler:
                for _ in range(3):
                    model(pixel_values=pixel_values)
                synchronize(device)
            print(f"\n### {name}: top operators over 3 calls (sorted by {sort_by})")
            print(profiler.key_averages().table(sort_by=sort_by, row_limit=rows))


def describe_device(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    name = platform.processor()
    try:  # platform.processor() is often empty on Linux
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return name


def peak_forward_bytes(model: torch.nn.Module, pixel_values: torch.Tensor, device: str) -> tuple[int, int | None]:
    """
    (peak bytes allocated during one forward call above the allocation before it, total peak or None).

    CUDA: the caching allocator's counters. CPU: torch.profiler's memory events (+bytes on allocation, -bytes on
    free) in time order, summed; the running maximum is the peak of live bytes the call added. Tensors that exist
    before the call (weights, input) are not counted.
    """
    with torch.inference_mode():
        if device.startswith("cuda"):
            synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            model(pixel_values=pixel_values)
            synchronize(device)
            peak = torch.cuda.max_memory_allocated(device)
            return peak - before, peak
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
            model(pixel_values=pixel_values)
    events = [
        (event.start_ns(), event.nbytes())
        for event in profiler.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    ]
    live = peak = 0
    for _, nbytes in sorted(events):
        live += nbytes
        peak = max(peak, live)
    return peak, None


def measure_point(
    name: str,
    args: argparse.Namespace,
    batch_size: int,
    image_size: int,
    num_sparse_tokens: int,
    dtype_name: str,
    attn_implementation: str,
    with_vit: bool = True,
) -> dict:
    """Median forward time and peak memory of StellarModel (and ViTModel) at one point of a sweep."""
    point = argparse.Namespace(**vars(args))
    point.num_sparse_tokens, point.dtype, point.attn_implementation = (
        num_sparse_tokens,
        dtype_name,
        attn_implementation,
    )
    torch.manual_seed(args.seed)
    stellar, vit = build_models(name, point)  # built at --image_size; other sizes interpolate the position embeddings
    generator = torch.Generator().manual_seed(args.seed)
    pixel_values = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    pixel_values = pixel_values.to(device=args.device, dtype=DTYPES[dtype_name])
    interpolate = image_size != args.image_size

    def wrap(model):
        return lambda pixel_values: model(pixel_values=pixel_values, interpolate_pos_encoding=interpolate)

    class Call(torch.nn.Module):  # keeps the `model(pixel_values=...)` calling convention of the helpers
        def __init__(self, model):
            super().__init__()
            self.call = wrap(model)

        def forward(self, pixel_values):
            return self.call(pixel_values)

    models = {"StellarModel": Call(stellar)}
    if with_vit:
        models["ViTModel"] = Call(vit)
    times, _ = time_side_by_side(models, pixel_values, args.repeats, args.warmup, args.device)
    row = {
        "batch_size": batch_size,
        "image_size": image_size,
        "num_sparse_tokens": num_sparse_tokens,
        "sequence": 1 + (image_size // BACKBONES[name][4]) ** 2 + num_sparse_tokens,
    }
    for label, key in (("StellarModel", "stellar"), ("ViTModel", "vit")):
        if label not in models:
            continue
        peak, total = peak_forward_bytes(models[label], pixel_values, args.device)
        row[f"{key}_ms"] = round(statistics.median(times[label]) * 1e3, 2)
        row[f"{key}_peak_mib"] = round(peak / 2**20, 1)
        if total is not None:
            row[f"{key}_total_peak_mib"] = round(total / 2**20, 1)
    del stellar, vit, models
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row


def run_sweeps(name: str, args: argparse.Namespace, dtype_name: str, attn_implementation: str, title: str) -> dict:
    """The three sweeps at one dtype / attention implementation; prints one table per sweep."""
    b, s, r = args.batch_size, args.image_size, args.num_sparse_tokens
    sweeps = {}
    rows = []
    for tokens in args.scaling_tokens:  # ViT does not see r, but is re-measured, interleaved, at every point
        rows.append(measure_point(name, args, b, s, tokens, dtype_name, attn_implementation))
    sweeps["tokens"] = rows
    sweeps["resolution"] = [
        measure_point(name, args, b, size, r, dtype_name, attn_implementation) for size in args.scaling_resolutions
    ]
    sweeps["batch"] = [
        measure_point(name, args, batch, s, r, dtype_name, attn_implementation) for batch in args.scaling_batches
    ]
    labels = {
        "tokens": ("r", "num_sparse_tokens"),
        "resolution": ("px", "image_size"),
        "batch": ("batch", "batch_size"),
    }
    for sweep, sweep_rows in sweeps.items():
        label, key = labels[sweep]
        fixed = {"tokens": f"batch {b}, {s} px", "resolution": f"batch {b}, r = {r}", "batch": f"{s} px, r = {r}"}
        print(f"\n{title}: {sweep} sweep ({fixed[sweep]})")
        header = (
            f"{label:>6} {'seq':>5} {'Stellar ms':>11} {'ViT ms':>9} {'ratio':>6} "
            f"{'Stellar MiB':>12} {'ViT MiB':>9} {'ratio':>6}"
        )
        print(header)
        print("-" * len(header))
        for row in sweep_rows:
            print(
                f"{row[key]:>6} {row['sequence']:>5} {row['stellar_ms']:>11.1f} {row['vit_ms']:>9.1f} "
                f"{row['stellar_ms'] / row['vit_ms']:>6.3f} {row['stellar_peak_mib']:>12.1f} "
                f"{row['vit_peak_mib']:>9.1f} {row['stellar_peak_mib'] / max(row['vit_peak_mib'], 1e-9):>6.3f}"
            )
    return sweeps


def main_scaling(args: argparse.Namespace, device_name: str) -> dict:
    name = args.models.split(",")[0]
    if "," in args.models:
        print(f"note: --scaling measures one backbone; using {name}", file=sys.stderr)
    print(
        f"scaling: {name}, device {args.device} ({device_name}), torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, defaults batch {args.batch_size}, {args.image_size} px, "
        f"r = {args.num_sparse_tokens}, median of {args.repeats} (warmup {args.warmup}); memory = peak MiB allocated "
        f"during one forward above the allocation before it"
    )
    scaling = {
        "model": name,
        "main": {
            "dtype": args.dtype,
            "attn_implementation": args.attn_implementation,
            "sweeps": run_sweeps(
                name, args, args.dtype, args.attn_implementation, f"{args.dtype} {args.attn_implementation}"
            ),
        },
    }
    gpu = {"ran": False}
    if not args.device.startswith("cuda"):
        gpu["skipped"] = f"no GPU section on device {args.device!r} (it runs with --device cuda)"
        print(f"\nGPU section skipped: {gpu['skipped']}")
    else:
        gpu["ran"] = True
        implementations = ["sdpa"]
        try:
            import flash_attn  # noqa: F401

            implementations.append("flash_attention_2")
        except ImportError as error:
            gpu["flash_attention_2_skipped"] = f"flash_attn is not importable ({error})"
            print(f"\nflash_attention_2 skipped: {gpu['flash_attention_2_skipped']}")
        for implementation in implementations:
            try:
                gpu[f"bf16_{implementation}"] = run_sweeps(
                    name, args, "bf16", implementation, f"GPU bf16 {implementation}"
                )
            except (ImportError, ValueError, RuntimeError, NotImplementedError) as error:  # unsupported attention
                gpu[f"bf16_{implementation}_skipped"] = f"{type(error).__name__}: {error}"
                print(f"\nGPU bf16 {implementation} skipped: {gpu[f'bf16_{implementation}_skipped']}")
    scaling["gpu"] = gpu
    summary = {
        "benchmark": "inference",
        "mode": "scaling",
        "device": args.device,
        "device_name": device_name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "num_sparse_tokens": args.num_sparse_tokens,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "scaling": scaling,
    }
    print(json.dumps(summary))
    return summary


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dtype = DTYPES[args.dtype]
    device_name = describe_device(args.device)
    if args.scaling:
        return main_scaling(args, device_name)
    results = []
    for name in args.models.split(","):
        stellar, vit = build_models(name, args)
        generator = torch.Generator().manual_seed(args.seed)
        pixel_values = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=generator)
        pixel_values = pixel_values.to(device=args.device, dtype=dtype)
        models = {"StellarModel": stellar, "ViTModel": vit}
        times, cpu_times = time_side_by_side(models, pixel_values, args.repeats, args.warmup, args.device)
        stellar_ms = statistics.median(times["StellarModel"]) * 1e3
        vit_ms = statistics.median(times["ViTModel"]) * 1e3
        paired = statistics.median(s / v for s, v in zip(times["StellarModel"], times["ViTModel"]))
        min_ratio = min(times["StellarModel"]) / min(times["ViTModel"])
        cpu_ratio = statistics.median(cpu_times["StellarModel"]) / statistics.median(cpu_times["ViTModel"])
        num_patches = (args.image_size // BACKBONES[name][4]) ** 2
        stellar_gflops, vit_gflops = forward_gflops(name, args.batch_size, args.image_size, args.num_sparse_tokens)
        results.append(
            {
                "model": name,
                "stellar_ms": round(stellar_ms, 2),
                "vit_ms": round(vit_ms, 2),
                "ratio": round(stellar_ms / vit_ms, 4),
                "paired_ratio": round(paired, 4),
                "min_ratio": round(min_ratio, 4),
                "cpu_time_ratio": round(cpu_ratio, 4) if not args.device.startswith("cuda") else None,
                "stellar_min_ms": round(min(times["StellarModel"]) * 1e3, 2),
                "vit_min_ms": round(min(times["ViTModel"]) * 1e3, 2),
                "sequence": [1 + num_patches + args.num_sparse_tokens, 1 + num_patches],
                "token_ratio": round((1 + num_patches + args.num_sparse_tokens) / (1 + num_patches), 4),
                "gflops": [round(stellar_gflops, 2), round(vit_gflops, 2)],
                "flop_ratio": round(stellar_gflops / vit_gflops, 4),
                "stellar_iqr_ms": round(interquartile_range(times["StellarModel"]) * 1e3, 2),
                "vit_iqr_ms": round(interquartile_range(times["ViTModel"]) * 1e3, 2),
            }
        )
        if args.profile:
            profile_models(models, pixel_values, args.device)
        del stellar, vit, models

    print(
        f"device: {args.device} ({device_name}), dtype {args.dtype}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, batch {args.batch_size}, {args.image_size} px, "
        f"r = {args.num_sparse_tokens}, {args.attn_implementation}, median of {args.repeats} (warmup {args.warmup})"
    )
    header = (
        f"{'model':<6} {'StellarModel ms':>16} {'ViTModel ms':>12} {'ratio':>7} {'paired':>7} {'min':>7} "
        f"{'cpu':>7} {'tokens':>7} {'flops':>7} {'target':>7}"
    )
    print(header)
    print("-" * len(header))
    for row in results:
        verdict = "ok" if row["ratio"] <= TARGET_RATIO else "ABOVE"
        print(
            f"{row['model']:<6} {row['stellar_ms']:>16.1f} {row['vit_ms']:>12.1f} {row['ratio']:>7.3f} "
            f"{row['paired_ratio']:>7.3f} {row['min_ratio']:>7.3f} {row['cpu_time_ratio'] or float('nan'):>7.3f} "
            f"{row['token_ratio']:>7.3f} {row['flop_ratio']:>7.3f} {verdict:>7}"
        )
    summary = {
        "benchmark": "inference",
        "device": args.device,
        "device_name": device_name,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "num_sparse_tokens": args.num_sparse_tokens,
        "attn_implementation": args.attn_implementation,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "target_ratio": TARGET_RATIO,
        "results": results,
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
