#!/usr/bin/env bash
# Prepare, on a machine with package-registry access, what `benchmarks/gpu_checks.sh` needs on a GPU machine that has
# no network: wheels for the transformers releases the two implementations need, and a copy of the original STELLAR
# code, all under `.bench/` (git-ignored; carried to the GPU machine, about 25 MiB).
#
#   bash benchmarks/prepare_gpu_checks.sh [path/to/microsoft-STELLAR-work-tree]
#
# The original is optional (without it the training-step comparison is skipped): a work tree of
# github.com/microsoft/STELLAR that lives outside this repository; only its files are copied, never committed.
set -euo pipefail
cd "$(dirname "$0")/.."
original=${1:-}
python_version=${GPU_PYTHON_VERSION:-3.12}

download() {  # download <folder> <requirement>...: binary wheels for the GPU machine's Python, no dependencies
    local folder=$1
    shift
    mkdir -p "$folder"
    python -m pip download -q --no-deps --only-binary=:all: --python-version "$python_version" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$folder" "$@"
}

rm -rf .bench/wheels
# Ours: the transformers this checkout is tested with (the GPU image may hold an older 5.x).
download .bench/wheels/ours "transformers==$(python -c 'import transformers; print(transformers.__version__)')"
if [[ -n "$original" ]]; then
    # The original was written for transformers 4.x, which needs huggingface-hub < 1 and tokenizers < 0.23.
    download .bench/wheels/original "transformers==4.57.1" "huggingface-hub==0.36.2" "tokenizers==0.22.2"
    rm -rf .bench/stellar_original
    mkdir -p .bench/stellar_original
    if git -C "$original" rev-parse --git-dir >/dev/null 2>&1; then
        git -C "$original" archive HEAD | tar -x -C .bench/stellar_original
    else
        cp -r "$original"/. .bench/stellar_original/
    fi
fi
# The photograph of benchmarks/data_pipeline.py, for GPU images without scikit-image.
python -c "from PIL import Image; from skimage import data; Image.fromarray(data.chelsea()).save('.bench/chelsea.png')"
du -sh .bench
echo "ready: carry .bench to the GPU machine and run benchmarks/gpu_checks.sh there"
