"""
Where an EMA teacher starts: `StellarEMATeacher.from_pretrained(folder, student)` keeps a teacher the folder saved
(`teacher.*` tensors) exactly; a teacher the folder does not hold starts as an exact copy of the student (not at its
random initialisation), with a warning; a partly saved teacher is replaced as a whole by the student, with a warning
naming what was discarded. The model classes skip the `teacher.*` tensors. This holds through `AutoModelForPreTraining`
and through `examples/pretrain.py --model_name_or_path`.
"""

import importlib.util
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from stellar_tester import (
    PRETRAINING,
    PRETRAINING_EMA,
    assert_state_dicts_equal,
    build_model,
    perturb_,
)
from transformers import AutoModelForPreTraining

from stellar_hf.modeling_stellar import StellarForPreTraining, StellarModel
from stellar_hf.pretraining import StellarEMATeacher

LOGGER = "stellar_hf.pretraining"
NO_TEACHER_MESSAGE = "holds no EMA teacher weights"
REPO_ROOT = Path(__file__).resolve().parents[1]
SAVED_BEFORE_REDESIGN = REPO_ROOT / "tests" / "fixtures" / "saved_before_redesign"


def student_counterpart(student: StellarForPreTraining, teacher: StellarEMATeacher) -> dict[str, torch.Tensor]:
    """The student's tensors that the teacher mirrors (encoder and clustering heads), by the teacher's names."""
    state = student.state_dict()
    return {key: state[key] for key in teacher.state_dict()}


def largest_difference(first: dict, second: dict) -> float:
    return max((first[key].float() - second[key].float()).abs().max().item() for key in first)


def save_student_only(folder: Path) -> StellarForPreTraining:
    """A perturbed pretraining model without a teacher, saved to `folder` (a converted / pretrained checkpoint)."""
    model = build_model(PRETRAINING)
    model.save_pretrained(folder)
    return model


def save_with_teacher(folder: Path) -> tuple[StellarForPreTraining, StellarEMATeacher]:
    """A perturbed pretraining model and a teacher that differs from it, saved together to `folder`."""
    model = build_model(PRETRAINING_EMA)
    teacher = StellarEMATeacher.from_student(model)
    perturb_(teacher, seed=77)
    assert largest_difference(teacher.state_dict(), student_counterpart(model, teacher)) > 1e-3
    teacher.save_pretrained(folder, model)
    return model, teacher


def drop_tensors(folder: Path, prefix: str) -> list[str]:
    """Remove the tensors whose names start with `prefix` from the folder's safetensors file; returns their names."""
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    dropped = sorted(key for key in tensors if key.startswith(prefix))
    kept = {key: value for key, value in tensors.items() if key not in dropped}
    save_file(kept, str(path), metadata={"format": "pt"})
    return dropped


def assert_teacher_is_a_frozen_copy_of_the_student(teacher: StellarEMATeacher, student: StellarForPreTraining) -> None:
    assert_state_dicts_equal(teacher.state_dict(), student_counterpart(student, teacher))
    student_storage = {parameter.data_ptr() for parameter in student.parameters()}
    assert not {parameter.data_ptr() for parameter in teacher.parameters()} & student_storage
    assert not any(parameter.requires_grad for parameter in teacher.parameters())


def no_teacher_warnings(caplog) -> list:
    return [record for record in caplog.records if record.name == LOGGER and NO_TEACHER_MESSAGE in record.message]


# ---------------------------------------------------------------------------------------------- student-only folders


def test_teacher_missing_from_the_checkpoint_starts_as_the_student(tmp_path, caplog):
    saved = save_student_only(tmp_path)
    model = StellarForPreTraining.from_pretrained(tmp_path, use_ema_teacher=True)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        teacher = StellarEMATeacher.from_pretrained(tmp_path, model)
    assert_state_dicts_equal(model.state_dict(), saved.state_dict())
    assert_teacher_is_a_frozen_copy_of_the_student(teacher, model)
    warnings = no_teacher_warnings(caplog)
    assert len(warnings) == 1 and str(tmp_path) in warnings[0].message
    assert warnings[0].levelno == logging.WARNING


def test_teacher_follows_the_student_from_an_encoder_only_folder(tmp_path, caplog):
    # A StellarModel folder: the heads are freshly initialised in the student, and the teacher copies them too.
    encoder = build_model(PRETRAINING).stellar
    encoder.save_pretrained(tmp_path)
    model = StellarForPreTraining.from_pretrained(tmp_path, use_ema_teacher=True)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        teacher = StellarEMATeacher.from_pretrained(tmp_path, model)
    assert_state_dicts_equal(model.stellar.state_dict(), encoder.state_dict())
    assert_teacher_is_a_frozen_copy_of_the_student(teacher, model)
    assert NO_TEACHER_MESSAGE in caplog.text


def test_auto_class_loading_with_a_teacher(tmp_path, caplog):
    save_student_only(tmp_path)
    model = AutoModelForPreTraining.from_pretrained(tmp_path, use_ema_teacher=True)
    assert type(model) is StellarForPreTraining
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        teacher = StellarEMATeacher.from_pretrained(tmp_path, model)
    assert_teacher_is_a_frozen_copy_of_the_student(teacher, model)
    assert NO_TEACHER_MESSAGE in caplog.text


def load_pretrain_script():
    spec = importlib.util.spec_from_file_location("pretrain_example_teacher", REPO_ROOT / "examples" / "pretrain.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_pretrain_script_continuing_from_a_student_only_folder_distils_from_the_student(tmp_path, caplog):
    # A converted checkpoint whose config enables the teacher: what `pretrain.py --model_name_or_path` continues from.
    save_student_only(tmp_path)
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "use_ema_teacher": True}))
    script = load_pretrain_script()
    args = SimpleNamespace(model_name_or_path=str(tmp_path))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        model = script.build_model(args)
        teacher = script.build_teacher(args, model)
    assert_teacher_is_a_frozen_copy_of_the_student(teacher, model)
    assert NO_TEACHER_MESSAGE in caplog.text


def test_pretrain_script_builds_no_teacher_without_use_ema_teacher(tmp_path):
    save_student_only(tmp_path)
    script = load_pretrain_script()
    args = SimpleNamespace(model_name_or_path=str(tmp_path))
    assert script.build_teacher(args, script.build_model(args)) is None


# ---------------------------------------------------------------------------------------------- saved teachers


def test_a_saved_teacher_is_kept_exactly(tmp_path, caplog):
    saved_model, saved_teacher = save_with_teacher(tmp_path)
    with caplog.at_level(logging.WARNING):
        model, info = StellarForPreTraining.from_pretrained(tmp_path, output_loading_info=True)
        teacher = StellarEMATeacher.from_pretrained(tmp_path, model)
    # The student loads as before, without a report about the teacher's tensors, which the teacher reads.
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert_state_dicts_equal(model.state_dict(), saved_model.state_dict())
    assert_state_dicts_equal(teacher.state_dict(), saved_teacher.state_dict())
    assert not [record for record in caplog.records if record.name in (LOGGER, "stellar_hf.modeling_stellar")]
    assert not any(parameter.requires_grad for parameter in teacher.parameters())


def test_every_model_class_skips_the_teachers_tensors(tmp_path):
    saved_model, _ = save_with_teacher(tmp_path)
    base, info = StellarModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"]
    assert_state_dicts_equal(base.state_dict(), saved_model.stellar.state_dict())


def test_a_partly_saved_teacher_is_replaced_by_the_student(tmp_path, caplog):
    save_with_teacher(tmp_path)
    dropped = drop_tensors(tmp_path, "teacher.cls_clustering_head.")
    assert dropped
    model = StellarForPreTraining.from_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        teacher = StellarEMATeacher.from_pretrained(tmp_path, model)
    # The loaded teacher encoder is discarded with the rest: the whole teacher is the student.
    assert_teacher_is_a_frozen_copy_of_the_student(teacher, model)
    total = len(teacher.state_dict())
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
    model = StellarForPreTraining.from_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        teacher = StellarEMATeacher.from_pretrained(tmp_path, model)
    assert_teacher_is_a_frozen_copy_of_the_student(teacher, model)
    assert "holds only" in caplog.text and name in caplog.text


def test_a_folder_saved_before_the_teacher_left_the_model_keeps_its_teacher(caplog):
    # Saved by the previous version, whose StellarForPreTraining held the teacher (and its unused factorization).
    folder = SAVED_BEFORE_REDESIGN / "pretraining-ema"
    saved = load_file(str(folder / "model.safetensors"))
    model = StellarForPreTraining.from_pretrained(folder)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        teacher = StellarEMATeacher.from_pretrained(folder, model)
    assert not caplog.records
    expected = {key.removeprefix("teacher."): value for key, value in saved.items() if key.startswith("teacher.")}
    assert set(expected) - set(teacher.state_dict()) == {
        f"stellar.factorization.{name}" for name in ("dense_proj.weight", "dense_proj.bias", "sparse_proj.weight",
                                                     "sparse_proj.bias")
    }  # fmt: skip
    assert_state_dicts_equal(teacher.state_dict(), {key: expected[key] for key in teacher.state_dict()})


def test_models_without_a_teacher_load_as_before(tmp_path, caplog):
    saved = save_student_only(tmp_path)
    with caplog.at_level(logging.WARNING):
        model, info = StellarForPreTraining.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"]
    assert_state_dicts_equal(model.state_dict(), saved.state_dict())
    assert not [record for record in caplog.records if record.name.startswith("stellar_hf")]
    base = StellarModel.from_pretrained(tmp_path)
    assert_state_dicts_equal(base.state_dict(), saved.stellar.state_dict())


def test_update_documents_when_it_runs():
    documentation = " ".join(StellarEMATeacher.update.__doc__.split())
    assert "once per optimiser step" in documentation and "once per micro-batch" in documentation


@pytest.mark.parametrize("name", ["StellarTeacher"])
def test_the_old_teacher_class_name_imports_with_a_deprecation_warning(name):
    import stellar_hf.modeling_stellar as modeling

    with pytest.warns(FutureWarning, match="StellarEMATeacher"):
        old = getattr(modeling, name)
    assert old is StellarEMATeacher
