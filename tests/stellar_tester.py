"""
A small model tester for the STELLAR classes.

transformers' `ModelTesterMixin` is not shipped in the wheel, so the behavioural checks of
`test_modeling_stellar.py` build on these helpers instead: a tiny `StellarConfig`, one `Case` per model
class (and reconstruction target), deterministic inputs for each case, weight perturbation (so that a
tensor silently left at its init value after a reload is noticed), and comparisons of state dicts and
outputs that name every tensor that differs.

Symbols: B images, N patches (16 at 32 px with 8 px patches), r sparse tokens (4), d width (32).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from stellar_hf import (
    StellarConfig,
    StellarForImageClassification,
    StellarForImageReconstruction,
    StellarModel,
)
from stellar_hf.modeling_stellar import StellarForPreTraining, StellarPreTrainingTargets

TINY_CONFIG = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "image_size": 32,
    "patch_size": 8,
    "num_sparse_tokens": 4,
    "decoder_hidden_size": 32,
    "decoder_num_hidden_layers": 2,
    "decoder_num_attention_heads": 4,
    "decoder_intermediate_size": 64,
    "reconstruction_target": "pixel",
    "vq_codebook_size": 16,
    "num_prototypes": 32,
    "prototype_dim": 16,
    "predictor_hidden_size": 64,
    "num_masked_views": 2,
    "num_local_views": 2,
    "local_image_size": 16,
    "mask_ratio": 0.75,
    "num_labels": 3,
}
BATCH_SIZE = 2
GRID = TINY_CONFIG["image_size"] // TINY_CONFIG["patch_size"]
NUM_PATCHES = GRID * GRID
NUM_SPARSE = TINY_CONFIG["num_sparse_tokens"]
HIDDEN = TINY_CONFIG["hidden_size"]
SEQUENCE_LENGTH = 1 + NUM_PATCHES + NUM_SPARSE


def tiny_config(**overrides) -> StellarConfig:
    """The tiny configuration, with `overrides` applied."""
    return StellarConfig(**{**TINY_CONFIG, **overrides})


@dataclasses.dataclass(frozen=True)
class Case:
    """One model class under test, with the config overrides it needs."""

    name: str
    model_class: type
    overrides: tuple[tuple[str, object], ...] = ()

    def config(self, **overrides) -> StellarConfig:
        return tiny_config(**{**dict(self.overrides), **overrides})

    @property
    def is_pretraining(self) -> bool:
        return self.model_class is StellarForPreTraining

    def __str__(self) -> str:
        return self.name


MODEL = Case("model", StellarModel)
RECONSTRUCTION_PIXEL = Case("reconstruction-pixel", StellarForImageReconstruction)
RECONSTRUCTION_VQ = Case("reconstruction-vq", StellarForImageReconstruction, (("reconstruction_target", "vq"),))
CLASSIFICATION = Case("classification", StellarForImageClassification)
PRETRAINING = Case("pretraining", StellarForPreTraining)
PRETRAINING_VQ = Case("pretraining-vq", StellarForPreTraining, (("reconstruction_target", "vq"),))
# With `use_ema_teacher` the targets come from outside the model (`teacher_targets`, see `make_inputs`).
PRETRAINING_EMA = Case("pretraining-ema", StellarForPreTraining, (("use_ema_teacher", True),))

ALL_CASES = [
    MODEL,
    RECONSTRUCTION_PIXEL,
    RECONSTRUCTION_VQ,
    CLASSIFICATION,
    PRETRAINING,
    PRETRAINING_VQ,
    PRETRAINING_EMA,
]
# Models whose every output for image i depends on image i only (pretraining's Sinkhorn couples the batch).
PER_IMAGE_CASES = [MODEL, RECONSTRUCTION_PIXEL, RECONSTRUCTION_VQ, CLASSIFICATION]


def build_model(case: Case, seed: int = 0, attn_implementation: str | None = None, perturb: bool = True, **overrides):
    """
    A tiny model of `case` in eval mode, built after `torch.manual_seed(seed)`.

    With `perturb`, every floating parameter and buffer gets seeded noise, so that biases, LayerNorms and the
    prototypes are all distinct from their init values (a reload that re-initialises anything is then visible).
    """
    torch.manual_seed(seed)
    config = case.config(**overrides)
    if attn_implementation is None:
        model = case.model_class(config)
    else:
        model = case.model_class._from_config(config, attn_implementation=attn_implementation)
    if perturb:
        perturb_(model, seed + 1000)
    return model.eval()


@torch.no_grad()
def perturb_(model: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """Add seeded Gaussian noise of std `scale` to every floating parameter and buffer of `model`, in place."""
    generator = torch.Generator().manual_seed(seed)
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            tensor.add_(torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype) * scale)


def make_pixel_values(batch_size: int = BATCH_SIZE, height: int = 32, width: int = 32, seed: int = 0) -> torch.Tensor:
    """Normalised-looking images `(B, 3, H, W)`: standard Gaussian noise from a fixed generator."""
    return torch.randn(batch_size, 3, height, width, generator=torch.Generator().manual_seed(seed))


def make_inputs(case: Case, config: StellarConfig, batch_size: int = BATCH_SIZE, seed: int = 0, labels: bool = True):
    """
    Keyword arguments for one deterministic forward pass of `case`.

    Pretraining gets global and local views and explicit masking noise (every head and loss is used), and with
    `use_ema_teacher` seeded `teacher_targets` (what a teacher returns: tokens, assignments whose rows sum to one);
    the VQ target gets its codes as `labels`; the classifier gets `labels` (when asked).
    """
    generator = torch.Generator().manual_seed(seed)
    inputs = {"pixel_values": make_pixel_values(batch_size, config.image_size, config.image_size, seed)}
    takes_codes = case.model_class in (StellarForImageReconstruction, StellarForPreTraining)
    if config.reconstruction_target == "vq" and takes_codes:
        codes = torch.randint(0, config.vq_codebook_size, (batch_size, NUM_PATCHES), generator=generator)
        if labels:
            inputs["labels"] = codes
    if case.model_class is StellarForImageClassification and labels:
        inputs["labels"] = torch.randint(0, config.num_labels, (batch_size,), generator=generator)
    if case.is_pretraining:
        size, local = config.image_size, config.local_image_size
        inputs["global_views"] = torch.randn(batch_size, config.num_masked_views, 3, size, size, generator=generator)
        inputs["local_views"] = torch.randn(batch_size, config.num_local_views, 3, local, local, generator=generator)
        inputs["mask_noise"] = torch.rand(batch_size * config.num_masked_views, NUM_PATCHES, generator=generator)
        if config.use_ema_teacher:
            inputs["teacher_targets"] = make_teacher_targets(config, batch_size, generator)
    return inputs


def make_teacher_targets(
    config: StellarConfig, batch_size: int, generator: torch.Generator
) -> StellarPreTrainingTargets:
    """Seeded stand-ins for an EMA teacher's targets: tokens `(B, r, d)`, assignments `(B, r, C)` and `(B, 1, C)`."""
    num_prototypes = config.num_prototypes
    return StellarPreTrainingTargets(
        tokens=torch.randn(batch_size, NUM_SPARSE, config.hidden_size, generator=generator),
        assignments=torch.randn(batch_size, NUM_SPARSE, num_prototypes, generator=generator).softmax(-1),
        cls_assignments=torch.randn(batch_size, 1, num_prototypes, generator=generator).softmax(-1)
        if config.use_cls_clustering
        else None,
    )


def output_tensors(output) -> dict[str, torch.Tensor]:
    """Every tensor of a `ModelOutput` (or tuple), flattened into `{name: tensor}`; `None` fields skipped."""
    items = output.items() if isinstance(output, Mapping) else enumerate(output)
    tensors = {}
    for key, value in items:
        if isinstance(value, torch.Tensor):
            tensors[str(key)] = value
        elif isinstance(value, (tuple, list)):
            for index, item in enumerate(value):
                tensors[f"{key}.{index}"] = item
    return tensors


def assert_outputs_close(actual, expected, atol: float = 1e-5, rtol: float = 0.0, what: str = "outputs") -> None:
    """Same tensor names and every tensor close; the message lists every tensor that differs and by how much."""
    actual, expected = output_tensors(actual), output_tensors(expected)
    assert actual.keys() == expected.keys(), f"{what}: fields differ: {sorted(actual)} vs {sorted(expected)}"
    assert actual, f"{what}: no tensors to compare"
    differing = {}
    for name, tensor in expected.items():
        other = actual[name]
        assert other.shape == tensor.shape, (
            f"{what}: {name} has shape {tuple(other.shape)}, expected {tuple(tensor.shape)}"
        )
        if not torch.allclose(other.float(), tensor.float(), atol=atol, rtol=rtol):
            differing[name] = (other.float() - tensor.float()).abs().max().item()
    assert not differing, f"{what}: tensors differ beyond atol={atol}: {differing}"


def assert_state_dicts_equal(actual: dict, expected: dict) -> None:
    """Same keys and bit-identical tensors; the message names every missing, extra and differing key."""
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    assert not missing and not extra, f"state dict keys differ: missing {missing}, unexpected {extra}"
    differing = [key for key in expected if not torch.equal(actual[key], expected[key])]
    assert not differing, f"tensors changed by the round trip: {differing}"


def trainable_parameters_without_gradient(model: torch.nn.Module) -> list[str]:
    """Names of the parameters that require grad but got no gradient, or an all-zero one."""
    return [
        name
        for name, parameter in model.named_parameters()
        if parameter.requires_grad and (parameter.grad is None or not bool(parameter.grad.abs().sum() > 0))
    ]


def scalar_objective(case: Case, output) -> torch.Tensor:
    """A scalar that depends on every output of `case`: the loss where there is one, else a sum of squares."""
    if getattr(output, "loss", None) is not None:
        return output.loss
    return sum(tensor.float().pow(2).mean() for tensor in output_tensors(output).values())


def parameter_gradients(model: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradient of `loss` for every trainable parameter of `model` that gets one, by name."""
    named = [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]
    gradients = torch.autograd.grad(loss, [parameter for _, parameter in named], allow_unused=True)
    return {name: gradient for (name, _), gradient in zip(named, gradients) if gradient is not None}


def assert_gradients_close(actual: dict, expected: dict, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """The same parameters got gradients on both sides, each close; the message names the parameter."""
    assert actual.keys() == expected.keys(), f"gradients for different parameters: {set(actual) ^ set(expected)}"
    for name, gradient in expected.items():
        torch.testing.assert_close(actual[name], gradient, rtol=rtol, atol=atol, msg=name)
