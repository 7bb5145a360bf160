"""
`StellarForPreTraining.from_pretrained` with an EMA teacher: a teacher the checkpoint does not hold starts as an exact
copy of the student (not at its random initialisation), with a warning; a saved teacher is kept exactly; a partly
saved teacher is replaced as a whole by the student, with a warning naming what was discarded. This holds with and
without `output_loading_info`, through `AutoModelForPreTraining` and through `examples/pretrain.py
--model_name_or_path`.
"""

import importlib.util
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from stellar_tester import PRETRAINING, PRETRAINING_EMA, assert_state_dicts_equal, build_model
from transformers import AutoModelForPreTraining

from stellar_hf.modeling_stellar import StellarForPreTraining, StellarModel

LOGGER = "stellar_hf.modeling_stellar"
NO_TEACHER_MESSAGE = "holds no EMA teacher weights"
REPO_ROOT = Path(__file__).resolve().parents[1]


def teacher_state(model: StellarForPreTraining) -> dict[str, torch.Tensor]:
    """The teacher's tensors, named like the student's (`teacher.stellar.x` -> `stellar.x`)."""
    state = model.state_dict()
    return {key.removeprefix("teacher."): value for key, value in state.items() if key.startswith("teacher.")}


def student_counterpart(model: StellarForPreTraining) -> dict[str, torch.Tensor]:
    """The student's tensors that the teacher mirrors (encoder and clustering heads)."""
    state = model.state_dict()
    return {key: state[key] for key in teacher_state(model)}


def largest_difference(first: dict, second: dict) -> float:
    return max((first[key].float() - second[key].float()).abs().max().item() for key in first)


def save_student_only(folder: Path) -> StellarForPreTraining:
    """A perturbed pretraining model without a teacher, saved to `folder` (a converted / pretrained checkpoint)."""
    model = build_model(PRETRAINING)
    model.save_pretrained(folder)
    return model


def save_with_teacher(folder: Path) -> StellarForPreTraining:
    """A perturbed pretraining model whose teacher differs from its student, saved to `folder`."""
    model = build_model(PRETRAINING_EMA)
    assert largest_difference(teacher_state(model), student_counterpart(model)) > 1e-3
    model.save_pretrained(folder)
    return model


def drop_tensors(folder: Path, prefix: str) -> list[str]:
    """Remove the tensors whose names start with `prefix` from the folder's safetensors file; returns their names."""
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    dropped = sorted(key for key in tensors if key.startswith(prefix))
    kept = {key: value for key, value in tensors.items() if key not in dropped}
    save_file(kept, str(path), metadata={"format": "pt"})
    return dropped


def assert_teacher_is_a_frozen_copy_of_the_student(model: StellarForPreTraining) -> None:
    assert_state_dicts_equal(teacher_state(model), student_counterpart(model))
    student_storage = {
        parameter.data_ptr() for name, parameter in model.named_parameters() if not name.startswith("teacher.")
    }
    assert not {parameter.data_ptr() for parameter in model.teacher.parameters()} & student_storage
    assert not any(parameter.requires_grad for parameter in model.teacher.parameters())


# ---------------------------------------------------------------------------------------------- student-only folders


@pytest.mark.parametrize("output_loading_info", [False, True])
def test_teacher_missing_from_the_checkpoint_starts_as_the_student(output_loading_info, tmp_path, caplog):
    saved = save_student_only(tmp_path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        loaded = StellarForPreTraining.from_pretrained(
            tmp_path, use_ema_teacher=True, output_loading_info=output_loading_info
        )
    if output_loading_info:
        model, info = loaded
        # transformers' report is unchanged: the teacher tensors were not in the file.
        assert {key for key in info["missing_keys"] if key.startswith("teacher.")} == {
            f"teacher.{key}" for key in teacher_state(model)
        }
    else:
        model = loaded
        assert isinstance(model, StellarForPreTraining)
    saved_state = saved.state_dict()
    assert_state_dicts_equal(student_counterpart(model), {key: saved_state[key] for key in teacher_state(model)})
    assert_teacher_is_a_frozen_copy_of_the_student(model)
    warnings = [record for record in caplog.records if record.name == LOGGER and NO_TEACHER_MESSAGE in record.message]
    assert len(warnings) == 1 and str(tmp_path) in warnings[0].message
    assert warnings[0].levelno == logging.WARNING


def test_teacher_follows_the_student_from_an_encoder_only_folder(tmp_path, caplog):
    # A StellarModel folder: the heads are freshly initialised in the student, and the teacher copies them too.
    encoder = build_model(PRETRAINING).stellar
    encoder.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        model = StellarForPreTraining.from_pretrained(tmp_path, use_ema_teacher=True)
    assert_state_dicts_equal(model.stellar.state_dict(), encoder.state_dict())
    assert_teacher_is_a_frozen_copy_of_the_student(model)
    assert NO_TEACHER_MESSAGE in caplog.text


def test_auto_class_loading_copies_the_student_too(tmp_path, caplog):
    save_student_only(tmp_path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        model = AutoModelForPreTraining.from_pretrained(tmp_path, use_ema_teacher=True)
    assert type(model) is StellarForPreTraining
    assert_teacher_is_a_frozen_copy_of_the_student(model)
    assert NO_TEACHER_MESSAGE in caplog.text


def test_pretrain_script_continuing_from_a_student_only_folder_distils_from_the_student(tmp_path, caplog):
    # A converted checkpoint whose config enables the teacher: what `pretrain.py --model_name_or_path` continues from.
    save_student_only(tmp_path)
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "use_ema_teacher": True}))
    spec = importlib.util.spec_from_file_location("pretrain_example_teacher", REPO_ROOT / "examples" / "pretrain.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        model = script.build_model(SimpleNamespace(model_name_or_path=str(tmp_path)))
    assert_teacher_is_a_frozen_copy_of_the_student(model)
    assert NO_TEACHER_MESSAGE in caplog.text


# ---------------------------------------------------------------------------------------------- saved teachers


@pytest.mark.parametrize("output_loading_info", [False, True])
def test_a_saved_teacher_is_kept_exactly(output_loading_info, tmp_path, caplog):
    saved = save_with_teacher(tmp_path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        loaded = StellarForPreTraining.from_pretrained(tmp_path, output_loading_info=output_loading_info)
    model = loaded[0] if output_loading_info else loaded
    if output_loading_info:
        assert not loaded[1]["missing_keys"]
    assert_state_dicts_equal(model.state_dict(), saved.state_dict())
    assert largest_difference(teacher_state(model), student_counterpart(model)) > 1e-3
    assert not [record for record in caplog.records if record.name == LOGGER]


def test_a_partly_saved_teacher_is_replaced_by_the_student(tmp_path, caplog):
    saved = save_with_teacher(tmp_path)
    dropped = drop_tensors(tmp_path, "teacher.cls_clustering_head.")
    assert dropped
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        model = StellarForPreTraining.from_pretrained(tmp_path)
    assert_state_dicts_equal(student_counterpart(model), student_counterpart(saved))
    # The loaded teacher encoder is discarded with the rest: the whole teacher is the student.
    assert_teacher_is_a_frozen_copy_of_the_student(model)
    total = len(teacher_state(model))
    message = caplog.text
    assert f"holds only {total - len(dropped)} of the {total} EMA teacher tensors" in message
    assert dropped[0] in message and "discarding" in message


def test_a_teacher_tensor_of_another_shape_counts_as_missing(tmp_path, caplog):
    save_with_teacher(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(str(path))
    name = "teacher.sparse_clustering_head.prototypes.weight"
    tensors[name] = torch.zeros(tensors[name].shape[0] + 1, tensors[name].shape[1])
    save_file(tensors, str(path), metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        model = StellarForPreTraining.from_pretrained(tmp_path, ignore_mismatched_sizes=True)
    assert_teacher_is_a_frozen_copy_of_the_student(model)
    assert "holds only" in caplog.text and name in caplog.text


def test_models_without_a_teacher_load_as_before(tmp_path, caplog):
    saved = save_student_only(tmp_path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        model, info = StellarForPreTraining.from_pretrained(tmp_path, output_loading_info=True)
    assert model.teacher is None and not info["missing_keys"]
    assert_state_dicts_equal(model.state_dict(), saved.state_dict())
    assert not [record for record in caplog.records if record.name == LOGGER]
    base = StellarModel.from_pretrained(tmp_path)
    assert_state_dicts_equal(base.state_dict(), saved.stellar.state_dict())


def test_update_teacher_documents_when_it_runs():
    documentation = " ".join(StellarForPreTraining.update_teacher.__doc__.split())
    assert "once per optimiser step" in documentation and "once per micro-batch" in documentation
