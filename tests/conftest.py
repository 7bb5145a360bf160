"""Shared pytest fixtures: locations of the parity fixtures made by the original code."""

from pathlib import Path

import pytest
import torch

# Tiny models on a 2-core machine: one thread avoids thread contention that makes small ops many times slower.
torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]
# `../shared/` sits beside the repository in CI and developer checkouts, not in a user's clone.
SHARED_PARITY = REPO_ROOT.parent / "shared" / "parity"


def _parity_dir(name: str) -> Path:
    path = SHARED_PARITY / name
    if not path.is_dir():
        pytest.skip(f"parity fixtures not found at {path} (they live in ../shared/, beside the repository)")
    return path


@pytest.fixture
def stellar_parity_dir() -> Path:
    """`../shared/parity/stellar`: the original STELLAR's checkpoint, inputs and outputs."""
    return _parity_dir("stellar")


@pytest.fixture
def vqgan_parity_dir() -> Path:
    """`../shared/parity/vqgan`: the original MaskGIT VQGAN tokenizer's checkpoint, inputs and outputs."""
    return _parity_dir("vqgan")


@pytest.fixture
def native_kernels():
    """The CPU view kernels (`stellar_hf.native`), built if need be; skips, with the reason, where they cannot be."""
    from stellar_hf import native

    library = native.view_kernels()
    if library is None:
        pytest.skip(f"the CPU view kernels are unavailable here: {native.why_unavailable()}")
    return library


def pytest_collection_modifyitems(config, items):
    """CI (CI=true) skips tests marked `slow`; RUN_SLOW=1 runs them anyway."""
    import os

    if os.environ.get("CI", "").lower() not in ("1", "true") or os.environ.get("RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow test: skipped in CI (set RUN_SLOW=1 to run it)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
