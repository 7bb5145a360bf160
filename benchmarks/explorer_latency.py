"""Time per edit in the explorer (the decoder alone) against a full re-encode, on random weights.

    python benchmarks/explorer_latency.py                        # CPU, both models, all threads torch uses
    python benchmarks/explorer_latency.py --models quick-start --repeats 20 --threads 1

Models: `quick-start`, the Quick start's `stellar-small-synthetic` preset (examples/pretrain.py, 48 px, 8-px patches,
8 tokens, a pixel decoder), and `vit-b16`, STELLAR ViT-B/16 at 224 px (16 tokens, the default 6-layer 512-wide
decoder) with a pixel decoder, and again with the VQ target decoded by a full-size MaskGIT VQGAN (random weights: time
does not depend on them). The targets (issue 14): under 0.3 s per edit for the Quick start model and under 1 s for
ViT-B/16 at 224 px, on CPU.

Per model, the median over `--repeats` (after `--warmup` untimed calls) of:
- `edit`: one edit on the factors (drop a token: the costliest of the four edits);
- `decode`: `StellarExplorer.decode`, what an edit runs (F = A·S, decoder, head; for VQ, the VQGAN decoder);
- `page`: what the page adds per edit: the overlays of every token and the downloadable figure;
- `decode cpu`: the process CPU time of `decode` (all threads together): with `--threads 1`, the wall time the
  decode would take on an idle core, whatever else runs on the machine;
- `re-encode`: the full model on the image (encoder, factorization, decoder), what an edit would cost without
  the cached factors.
Prints a table, then one JSON line (the last line of the output) with every number, in seconds.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from stellar_hf import (
    MaskGitVQGANConfig,
    MaskGitVQGANModel,
    StellarConfig,
    StellarImageProcessor,
)
from stellar_hf.explorer import (
    Edit,
    StellarExplorer,
    apply_edit,
    edit_figure,
    overlay_tiles,
    sample_images,
)
from stellar_hf.modeling_stellar import StellarForImageReconstruction

REPO_ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"quick-start": 0.3, "vit-b16": 1.0, "vit-b16-vq": 1.0}


def quick_start_config() -> dict:
    """The `stellar-small-synthetic` preset, read from examples/pretrain.py so that it cannot drift."""
    path = REPO_ROOT / "examples" / "pretrain.py"
    spec = importlib.util.spec_from_file_location("stellar_pretrain_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return dict(module.PRESETS["stellar-small-synthetic"])


def build(name: str) -> StellarExplorer:
    torch.manual_seed(0)
    if name == "quick-start":
        config = StellarConfig(**quick_start_config())
    else:
        config = StellarConfig(
            reconstruction_target="vq" if name.endswith("-vq") else "pixel"
        )  # ViT-B/16, 224 px
    model = StellarForImageReconstruction(config).eval()
    if config.reconstruction_target == "vq":
        model.set_vq_tokenizer(MaskGitVQGANModel(MaskGitVQGANConfig()))
    return StellarExplorer(
        model, StellarImageProcessor.from_model_config(config), name=name
    )


def median_time(function, repeats: int, warmup: int) -> tuple[float, float]:
    """Median wall-clock seconds and median process CPU seconds (all threads) of `function()`."""
    for _ in range(warmup):
        function()
    times, cpu_times = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        function()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return statistics.median(times), statistics.median(cpu_times)


def measure(name: str, repeats: int, warmup: int) -> dict:
    explorer = build(name)
    image = next(
        iter(
            sample_images(
                num_synthetic=1, image_size=max(explorer.config.image_size, 128)
            ).values()
        )
    )
    factors = explorer.factorize(image)
    edit = Edit("drop", 0)
    edited = apply_edit(factors, edit)
    decoded = explorer.decode(edited).image
    pixel_values, _ = explorer.preprocess(image)

    def re_encode():
        with torch.inference_mode():
            explorer.model.reconstruct(
                lowrank_features=explorer.model.stellar(pixel_values).lowrank_features
            )

    def page():
        overlay_tiles(edited)
        edit_figure(factors, edited, decoded, decoded)

    result = {
        "model": name,
        "image_size": explorer.config.image_size,
        "grid": list(factors.grid_size),
        "tokens": factors.num_tokens,
        "target": explorer.config.reconstruction_target,
    }
    timed = {
        "edit": lambda: apply_edit(factors, edit),
        "decode": lambda: explorer.decode(edited),
    }
    for key, function in {**timed, "page": page, "re_encode": re_encode}.items():
        result[key], result[f"{key}_cpu"] = median_time(function, repeats, warmup)
    result["per_edit"] = result["edit"] + result["decode"]
    result["target_s"] = TARGETS[name]
    result["meets_target"] = result["per_edit"] < TARGETS[name]
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--models",
        default=",".join(TARGETS),
        help=f"comma-separated, of {', '.join(TARGETS)}",
    )
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch intra-op threads (0: torch's default)",
    )
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = sorted(set(names) - set(TARGETS))
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {', '.join(TARGETS)}")
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be at least 1 and --warmup at least 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = [measure(name, args.repeats, args.warmup) for name in names]
    header = (
        f"{'model':<12} {'px':>4} {'grid':>6} {'r':>3} {'target':>6} {'edit':>9} {'decode':>9} {'decode cpu':>10} "
        f"{'page':>9} {'re-encode':>10} {'per edit':>9}  goal"
    )
    print(
        f"explorer edit latency, CPU, {torch.get_num_threads()} threads, medians of {args.repeats} (seconds)"
    )
    print(header)
    for r in results:
        grid = f"{r['grid'][0]}x{r['grid'][1]}"
        goal = f"< {r['target_s']} s {'ok' if r['meets_target'] else 'MISSED'}"
        print(
            f"{r['model']:<12} {r['image_size']:>4} {grid:>6} {r['tokens']:>3} {r['target']:>6} {r['edit']:>9.4f} "
            f"{r['decode']:>9.4f} {r['decode_cpu']:>10.4f} {r['page']:>9.4f} {r['re_encode']:>10.4f} {r['per_edit']:>9.4f}  {goal}"
        )
    print(
        json.dumps(
            {
                "threads": torch.get_num_threads(),
                "repeats": args.repeats,
                "results": results,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
