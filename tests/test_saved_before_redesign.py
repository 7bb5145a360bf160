"""
Folders saved by the version before the pretraining machinery left the model (commit 219d9b3, see
`fixtures/saved_before_redesign/make_fixture.py`) load with the current code and give the same outputs, losses,
gradients and EMA-teacher update: the checkpoint layout and every computation are unchanged. The EMA run's folder
holds its teacher as `teacher.*` tensors, which now go to `StellarEMATeacher`.

`expected.safetensors` holds what the old code computed; gradients and teacher tensors as three summary numbers each
(sum, sum of squares, position-weighted sum), which move with any change of the tensor.
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stellar_hf import (
    StellarForImageClassification,
    StellarForImageReconstruction,
    StellarModel,
)
from stellar_hf.modeling_stellar import StellarForPreTraining
from stellar_hf.pretraining import StellarEMATeacher

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "saved_before_redesign"
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURE / "expected.safetensors"))


@pytest.fixture(scope="module")
def inputs(expected) -> dict[str, torch.Tensor]:
    return {key.removeprefix("input."): value for key, value in expected.items() if key.startswith("input.")}


def summary(tensor: torch.Tensor) -> torch.Tensor:
    """As in make_fixture.py: sum, sum of squares and position-weighted sum, in float64."""
    flat = tensor.detach().double().flatten()
    weights = torch.linspace(-1.0, 1.0, flat.numel(), dtype=torch.float64)
    return torch.stack((flat.sum(), flat.pow(2).sum(), (flat * weights).sum()))


def assert_matches(expected: dict, prefix: str, output) -> None:
    """Every tensor the old code recorded under `prefix.` is in `output`, with the same value, and nothing else."""
    recorded = {
        key.removeprefix(f"{prefix}."): value
        for key, value in expected.items()
        if key.startswith(f"{prefix}.") and ".grad." not in key and ".teacher_after_update." not in key
    }
    produced = {key: value for key, value in output.items() if isinstance(value, torch.Tensor)}
    assert recorded.keys() == produced.keys(), f"{prefix}: fields {sorted(recorded)} vs {sorted(produced)}"
    for name, value in recorded.items():
        torch.testing.assert_close(produced[name].detach(), value, **TOLERANCE, msg=f"{prefix}.{name}")


def test_inference_classes_load_the_old_folders_and_give_the_same_outputs(expected, inputs):
    ema, vq = FIXTURE / "pretraining-ema", FIXTURE / "pretraining-vq"
    with torch.no_grad():
        model = StellarModel.from_pretrained(ema).eval()
        assert_matches(expected, "model", model(inputs["pixel_values"], output_hidden_states=True))
        assert_matches(expected, "model_48", model(inputs["pixel_values_48"]))
        reconstruction = StellarForImageReconstruction.from_pretrained(ema).eval()
        assert_matches(expected, "reconstruction_pixel", reconstruction(inputs["pixel_values"]))
        reconstruction = StellarForImageReconstruction.from_pretrained(vq).eval()
        output = reconstruction(inputs["pixel_values"], labels=inputs["target_codes"])
        assert_matches(expected, "reconstruction_vq", output)
        classifier = StellarForImageClassification.from_pretrained(FIXTURE / "classification").eval()
        assert_matches(expected, "classification", classifier(inputs["pixel_values"], labels=inputs["labels"]))


@pytest.mark.parametrize(
    "prefix, folder, overrides",
    [
        ("pretraining_ema", "pretraining-ema", {}),
        ("pretraining_pixel", "pretraining-ema", {"use_ema_teacher": False}),
        ("pretraining_vq", "pretraining-vq", {}),
    ],
)
def test_pretraining_step_loss_gradients_and_teacher_update_are_unchanged(expected, inputs, prefix, folder, overrides):
    model = StellarForPreTraining.from_pretrained(FIXTURE / folder, **overrides).train()
    step = {key: inputs[key] for key in ("pixel_values", "global_views", "local_views", "mask_noise")}
    if model.config.reconstruction_target == "vq":
        step["labels"] = inputs["target_codes"]
    teacher = None
    if model.config.use_ema_teacher:
        teacher = StellarEMATeacher.from_pretrained(FIXTURE / folder, model)
        step["teacher_targets"] = teacher(step["pixel_values"], step["global_views"])
    output = model(**step)
    assert_matches(expected, prefix, output)

    output.loss.backward()
    gradients = {name: parameter.grad for name, parameter in model.named_parameters() if parameter.grad is not None}
    grad_prefix = f"{prefix}.grad."
    recorded = {key.removeprefix(grad_prefix): value for key, value in expected.items() if key.startswith(grad_prefix)}
    assert gradients.keys() == recorded.keys()
    for name, gradient in gradients.items():
        torch.testing.assert_close(summary(gradient), recorded[name], **TOLERANCE, msg=f"gradient of {name}")

    if teacher is not None:
        teacher.update(model, 0.9)
        key_prefix = f"{prefix}.teacher_after_update."
        recorded = {key.removeprefix(key_prefix): v for key, v in expected.items() if key.startswith(key_prefix)}
        state = teacher.state_dict()
        # The old teacher also held a factorization it never used; the rest is the same tensors, updated alike.
        assert set(recorded) - set(state) == {key for key in recorded if key.startswith("stellar.factorization.")}
        for name, tensor in state.items():
            torch.testing.assert_close(summary(tensor), recorded[name], **TOLERANCE, msg=f"teacher {name}")
