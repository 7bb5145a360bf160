"""
Checks that need an accelerator: fp32 agreement with the CPU, bf16/fp16 autocast, SDPA and FlashAttention-2 against
eager attention, a full pretraining step with fused AdamW, the VQGAN tokenizer, a compiled pretraining step and the
feature-extraction pipeline.

They run on the device named by `STELLAR_TEST_DEVICE` (`cuda`, `cuda:1`, `mps`, or `cpu` to exercise the tests
themselves without a GPU), else on CUDA when it is available; otherwise each test skips and says why.
`benchmarks/gpu_checks.sh` runs them before the GPU benchmarks.
"""

import os

import pytest
import torch
from stellar_tester import (
    ALL_CASES,
    MODEL,
    PRETRAINING,
    PRETRAINING_EMA,
    assert_gradients_close,
    build_model,
    make_inputs,
    make_pixel_values,
    output_tensors,
    parameter_gradients,
)
from test_vqgan import tiny_model as tiny_vqgan

from stellar_hf.modeling_stellar import encode_view_rows
from stellar_hf.pretraining import StellarEMATeacher

LOW_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(scope="module")
def device() -> torch.device:
    name = os.environ.get("STELLAR_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
    if name is None:
        pytest.skip("no accelerator: set STELLAR_TEST_DEVICE (e.g. cuda, mps, or cpu) or run on a CUDA machine")
    return torch.device(name)


@pytest.fixture(autouse=True)
def full_fp32(device):
    """fp32 comparisons mean fp32: no TF32 in matmuls or cuDNN convolutions while a test runs."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def on(device: torch.device, inputs: dict) -> dict:
    """`inputs` on `device`; a `ModelOutput` among them (teacher targets) field by field."""
    moved = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            moved[key] = value.to(device)
        else:
            moved[key] = type(value)(**{name: tensor.to(device) for name, tensor in value.items()})
    return moved


def autocast_dtype(device: torch.device, name: str) -> torch.dtype:
    """The autocast dtype `name`, or a skip when this device cannot run it."""
    dtype = LOW_PRECISION[name]
    if device.type == "cuda" and dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    if device.type == "cpu" and dtype is torch.float16:
        pytest.skip("fp16 autocast is a GPU check")
    return dtype


@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_fp32_outputs_match_the_cpu(case, device):
    model = build_model(case)
    inputs = make_inputs(case, model.config)
    with torch.no_grad():
        expected = output_tensors(model(**inputs))
        actual = output_tensors(model.to(device)(**on(device, inputs)))
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert actual[name].device.type == device.type, name
        torch.testing.assert_close(actual[name].cpu(), tensor, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("precision", sorted(LOW_PRECISION))
@pytest.mark.parametrize("case", [MODEL, PRETRAINING], ids=str)
def test_autocast_is_close_to_fp32(case, precision, device):
    dtype = autocast_dtype(device, precision)
    model = build_model(case).to(device)
    inputs = on(device, make_inputs(case, model.config))
    with torch.no_grad():
        reference = output_tensors(model(**inputs))
        with torch.autocast(device.type, dtype=dtype):
            low = output_tensors(model(**inputs))
    tolerance = 0.15 if dtype is torch.bfloat16 else 0.03
    for name, tensor in reference.items():
        assert torch.isfinite(low[name]).all(), name
        if name == "assignments":  # Sinkhorn sharpens small logit differences; its inputs are compared instead
            continue
        torch.testing.assert_close(low[name].float(), tensor.float(), rtol=tolerance, atol=tolerance, msg=name)


def attention_implementations(device: torch.device) -> list[str]:
    from transformers.utils import is_flash_attn_2_available

    names = ["sdpa"]
    if device.type == "cuda" and is_flash_attn_2_available():
        names.append("flash_attention_2")
    return names


@pytest.mark.parametrize("attn_implementation", ["sdpa", "flash_attention_2"])
def test_fused_attention_matches_eager(attn_implementation, device):
    # Also through `encode_view_rows`, where the last layer's queries are fewer than its keys.
    if attn_implementation not in attention_implementations(device):
        pytest.skip(f"{attn_implementation} is not available on {device} (flash-attn not installed or not CUDA)")
    dtype = torch.float32 if attn_implementation == "sdpa" else autocast_dtype(device, "bf16")
    eager = build_model(MODEL, attn_implementation="eager").to(device, dtype)
    fused = build_model(MODEL, attn_implementation=attn_implementation).to(device, dtype)
    pixel_values = make_pixel_values().to(device, dtype)
    rows = torch.tensor([0, 17, 18, 19, 20], device=device)
    tolerance = 1e-4 if dtype is torch.float32 else 0.05
    with torch.no_grad():
        torch.testing.assert_close(
            fused(pixel_values).last_hidden_state.float(),
            eager(pixel_values).last_hidden_state.float(),
            rtol=tolerance,
            atol=tolerance,
        )
        torch.testing.assert_close(
            encode_view_rows(fused, pixel_values, rows).float(),
            eager(pixel_values).last_hidden_state[:, rows].float(),
            rtol=tolerance,
            atol=tolerance,
        )


@pytest.mark.parametrize("case", [PRETRAINING, PRETRAINING_EMA], ids=str)
def test_pretraining_steps_with_fused_adamw(case, device):
    model = build_model(case).to(device).train()
    inputs = on(device, make_inputs(case, model.config))
    teacher = StellarEMATeacher.from_student(model) if model.config.use_ema_teacher else None
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, fused=True)
    dtype = torch.bfloat16 if device.type != "cuda" or torch.cuda.is_bf16_supported() else torch.float16
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    teacher_before = {name: tensor.clone() for name, tensor in teacher.state_dict().items()} if teacher else {}
    for _ in range(2):
        with torch.autocast(device.type, dtype=dtype):
            if teacher is not None:
                inputs["teacher_targets"] = teacher(inputs["pixel_values"], inputs["global_views"])
            loss = model(**inputs).loss
        assert torch.isfinite(loss), loss
        loss.backward()
        # Presence, not size: the key biases' exact gradient is zero (softmax ignores a shift), so theirs is noise.
        assert [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
        assert torch.isfinite(torch.stack([p.grad.float().norm() for p in optimizer.param_groups[0]["params"]])).all()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if teacher is not None:
            teacher.update(model, 0.9)
    # The student moves by AdamW, the EMA teacher (when there is one) by its update.
    unchanged = [name for name, parameter in model.named_parameters() if torch.equal(parameter, before[name])]
    teacher_state = teacher.state_dict() if teacher is not None else {}
    unchanged += [f"teacher.{key}" for key, value in teacher_before.items() if torch.equal(value, teacher_state[key])]
    assert unchanged == [], f"parameters that did not move: {unchanged}"


def test_vqgan_matches_the_cpu(device):
    model = tiny_vqgan()
    pixel_values = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        codes = model.encode(pixel_values)
        decoded = model.decode(codes)
        model.to(device)
        device_codes = model.encode(pixel_values.to(device))
        device_decoded = model.decode(codes.to(device))
    # Codes are an argmin over distances: a tie broken differently on the device may flip a rare code.
    assert (device_codes.cpu() == codes).float().mean() >= 0.99
    torch.testing.assert_close(device_decoded.cpu(), decoded, rtol=1e-4, atol=1e-4)


def test_compiled_pretraining_step(device):
    # One graph (fullgraph=True fails on any break) compiled by inductor for this device, same loss and gradients.
    model = build_model(PRETRAINING).to(device).train()
    inputs = on(device, make_inputs(PRETRAINING, model.config))
    eager = model(**inputs).loss
    expected = parameter_gradients(model, eager)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)(**inputs).loss
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    assert_gradients_close(parameter_gradients(model, compiled), expected, rtol=1e-3, atol=1e-4)


def test_feature_extraction_pipeline(device, tmp_path):
    from PIL import Image
    from transformers import pipeline

    from stellar_hf import StellarImageProcessor

    model = build_model(MODEL)
    model.save_pretrained(tmp_path)
    StellarImageProcessor.from_model_config(model.config).save_pretrained(tmp_path)
    pixels = (torch.rand(40, 50, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8).numpy()
    image = Image.fromarray(pixels)
    features = {
        where: torch.as_tensor(
            pipeline("image-feature-extraction", model=str(tmp_path), device=where)(image, return_tensors=False)
        )
        for where in (device, "cpu")
    }
    on_device, on_cpu = features[device], features["cpu"]
    assert on_device.shape == on_cpu.shape
    torch.testing.assert_close(on_device, on_cpu, rtol=1e-4, atol=1e-4)
