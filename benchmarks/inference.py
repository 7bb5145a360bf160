"""Forward time of `StellarModel` against transformers' `ViTModel` with the same backbone, measured side by side.

    python benchmarks/inference.py                                   # CPU, fp32, ViT-S/16 and ViT-B/16
    python benchmarks/inference.py --device cuda --dtype bf16 --repeats 50
    python benchmarks/inference.py --models s16 --repeats 5 --profile

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
    parser.add_argument("--models", default="s16,b16", help=f"comma-separated backbones from {sorted(BACKBONES)}")
    parser.add_argument("--repeats", type=int, default=20, help="timed forward calls per model")
    parser.add_argument("--warmup", type=int, default=3, help="untimed forward calls per model first")
    parser.add_argument("--attn_implementation", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--profile", action="store_true", help="after timing, print torch.profiler's top operators for both models"
    )
    args = parser.parse_args(argv)
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


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dtype = DTYPES[args.dtype]
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else platform.processor()
    if not args.device.startswith("cuda"):
        try:  # platform.processor() is often empty on Linux
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    device_name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
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
