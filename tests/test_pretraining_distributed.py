"""Two CPU processes (gloo) each holding half the batch give the same Sinkhorn assignments and losses as one
process holding the whole batch: the clustering statistics are global, not per rank."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from stellar_tester import TINY_CONFIG

from stellar_hf import StellarConfig
from stellar_hf.modeling_stellar import StellarForPreTraining

BATCH = 4


def tiny_config() -> StellarConfig:
    return StellarConfig(**{**TINY_CONFIG, "num_local_views": 1})


def make_inputs(config: StellarConfig) -> dict:
    generator = torch.Generator().manual_seed(7)
    num_patches = (config.image_size // config.patch_size) ** 2
    return {
        "pixel_values": torch.randn(BATCH, 3, 32, 32, generator=generator),
        "global_views": torch.randn(BATCH, 2, 3, 32, 32, generator=generator),
        "local_views": torch.randn(BATCH, 1, 3, 16, 16, generator=generator),
        # rows image-major: image 0 view 0, image 0 view 1, ...
        "mask_noise": torch.rand(BATCH * 2, num_patches, generator=generator),
    }


def run_model(model: StellarForPreTraining, inputs: dict) -> dict:
    outputs = model(**inputs)
    return {
        "assignments": outputs.assignments.detach(),
        "clustering_loss": outputs.clustering_loss.detach(),
        "mask_loss": outputs.mask_loss.detach(),
        "cls_loss": outputs.cls_loss.detach(),
    }


def worker(rank: int, world_size: int, init_file: str, state_dict: dict, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        model = StellarForPreTraining(tiny_config())
        model.load_state_dict(state_dict)
        inputs = make_inputs(model.config)
        half = BATCH // world_size
        local = {
            "pixel_values": inputs["pixel_values"][rank * half : (rank + 1) * half],
            "global_views": inputs["global_views"][rank * half : (rank + 1) * half],
            "local_views": inputs["local_views"][rank * half : (rank + 1) * half],
            "mask_noise": inputs["mask_noise"][rank * half * 2 : (rank + 1) * half * 2],
        }
        results[rank] = run_model(model, local)
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one_process(tmp_path):
    torch.manual_seed(0)
    model = StellarForPreTraining(tiny_config())
    single = run_model(model, make_inputs(model.config))

    manager = mp.Manager()
    results = manager.dict()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(worker, args=(2, str(tmp_path / "init"), model.state_dict(), results), nprocs=2, join=True)

    assignments = torch.cat([results[0]["assignments"], results[1]["assignments"]])
    torch.testing.assert_close(assignments, single["assignments"], rtol=0, atol=1e-6)
    # The losses are means over each rank's tokens; with equal halves the rank mean is the global mean.
    for name in ("clustering_loss", "mask_loss", "cls_loss"):
        averaged = (results[0][name] + results[1][name]) / 2
        torch.testing.assert_close(averaged, single[name], rtol=0, atol=1e-5, msg=name)
    # Without the all-reduce each rank would balance its own half: make sure that would differ.
    inputs = make_inputs(model.config)
    first_half = {key: value[: BATCH // 2] for key, value in inputs.items() if key != "mask_noise"}
    local_only = run_model(model, {**first_half, "mask_noise": inputs["mask_noise"][:BATCH]})
    assert not torch.allclose(local_only["assignments"], single["assignments"][: BATCH // 2], atol=1e-4)
