#!/usr/bin/env bash
# Every check that needs a GPU, in one command sized for a machine lent for a few minutes:
#
#   bash benchmarks/prepare_gpu_checks.sh /path/to/STELLAR   # first, where pip works: wheels + the original -> .bench/
#   bash benchmarks/gpu_checks.sh [part ...]                  # then, on the GPU machine (no network needed)
#
# Parts: tests (tests/test_device.py: fp32 vs CPU, bf16/fp16 autocast, SDPA and FlashAttention-2 vs eager, training
# steps with fused AdamW, VQGAN, compiled step, pipeline), inference (StellarModel vs ViTModel, bf16 and fp32, then the
# scaling sweeps), pretrain (one training step vs the original, eager on both sides), views (benchmarks/data_pipeline.py:
# the batched view augmentation as a share of a ViT-S/16 and ViT-B/16 step at the recipe), and, only when named, compile
# (the same with torch.compile on our side; inductor needs minutes per side at ViT-S) and compile_both. Each part has
# its own time limit: the default parts stay under about 10 minutes, `compile` under 4, `compile_both` under 6; a
# part that runs out is reported and the next one starts.
# Three files go to $OUT (the device tool's output folder, which returns at most 8) or ./gpu_checks: gpu_checks.log
# (everything printed), results.jsonl (each part's JSON line, with the part's name) and summary.txt.
# DEVICE=cuda:1 picks another GPU; DEVICE=cpu runs the same flow on a CPU (slowly) to check the script itself.
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
out=${OUT:-$repo/gpu_checks}
device=${DEVICE:-cuda}
parts=("$@")
[[ ${#parts[@]} -eq 0 ]] && parts=(tests inference pretrain views)
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

# Our transformers (the GPU image may hold an older 5.x) and, separately, the original's transformers 4.x.
if compgen -G ".bench/wheels/ours/*.whl" >/dev/null; then
    python -m pip install -q --no-index --no-deps --no-compile --target /tmp/stellar_site .bench/wheels/ours/*.whl \
        && export PYTHONPATH="/tmp/stellar_site:$PYTHONPATH"
fi
original_args=()
if [[ -d .bench/stellar_original ]] && compgen -G ".bench/wheels/original/*.whl" >/dev/null; then
    python -m pip install -q --no-index --no-deps --no-compile --target /tmp/stellar_original_site .bench/wheels/original/*.whl \
        && original_args=(--original_repo "$repo/.bench/stellar_original" --original_pythonpath /tmp/stellar_original_site)
fi

{
    nvidia-smi 2>/dev/null | head -15
    python -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
} 2>&1 | tee "$out/gpu_checks.log"
: >"$out/results.jsonl"

summary=()
run_part() {  # run_part <name> <seconds> <command...>: appends to the log, keeps the part's last JSON line
    local name=$1 seconds=$2
    shift 2
    echo "=== $name (at most ${seconds}s): $*" | tee -a "$out/gpu_checks.log"
    local started=$SECONDS part_log
    part_log=$(mktemp)
    timeout "$seconds" "$@" 2>&1 | tee "$part_log"
    local status=${PIPESTATUS[0]}
    cat "$part_log" >>"$out/gpu_checks.log"
    local verdict="exit $status"
    [[ $status -eq 124 ]] && verdict="TIMED OUT"
    summary+=("$name: $verdict in $((SECONDS - started))s")
    local json
    json=$(grep '^{' "$part_log" | tail -1)
    [[ -n $json ]] && printf '{"part": "%s", "result": %s}\n' "$name" "$json" >>"$out/results.jsonl"
    rm -f "$part_log"
}

low=bf16
[[ $device == cpu ]] && low=fp32
for part in "${parts[@]}"; do
    case $part in
    tests)
        run_part tests 150 env STELLAR_TEST_DEVICE="$device" python -m pytest -q -rs -p no:cacheprovider tests/test_device.py
        ;;
    inference)
        run_part inference_$low 45 python benchmarks/inference.py --device "$device" --dtype $low --repeats 30
        run_part inference_fp32 45 python benchmarks/inference.py --device "$device" --dtype fp32 --repeats 30
        run_part inference_scaling 90 python benchmarks/inference.py --device "$device" --dtype $low --scaling --repeats 10
        ;;
    pretrain)
        run_part pretrain_step 100 python benchmarks/pretrain_step.py "${original_args[@]}" --device "$device" \
            --dtype $low --repeats 30 --warmup 3
        ;;
    views)
        photo=()
        [[ -f .bench/chelsea.png ]] && photo=(--image .bench/chelsea.png)
        run_part views 150 python benchmarks/data_pipeline.py "${photo[@]}" --device "$device" --batch_size 128 \
            --step_batch_size 32 --dtype $low --rounds 5 --compile
        ;;
    compile)
        run_part pretrain_step_compile_ours 240 python benchmarks/pretrain_step.py "${original_args[@]}" \
            --device "$device" --dtype $low --repeats 30 --warmup 3 --skip_full --compile ours
        ;;
    compile_both)
        run_part pretrain_step_compile_both 360 python benchmarks/pretrain_step.py "${original_args[@]}" \
            --device "$device" --dtype $low --repeats 30 --warmup 3 --skip_full --compile both
        ;;
    *)
        echo "unknown part '$part' (tests, inference, pretrain, views, compile, compile_both)" >&2
        exit 2
        ;;
    esac
done

echo "=== summary (logs in $out)"
printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
