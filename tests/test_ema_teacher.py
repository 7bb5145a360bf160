"""
The EMA teacher on the training side (`stellar_hf.pretraining.StellarEMATeacher`, spec section 4.2): a frozen copy of
the student's encoder and clustering heads with its own storage, moved by `update` after each optimiser step on a
cosine momentum schedule, whose targets (from the second global view) drive `StellarForPreTraining`; and
`examples/pretrain.py` with a teacher: the teacher is saved beside the student, and a resumed run ends with the same
student and teacher as an uninterrupted one.
"""

import torch
from safetensors.torch import load_file
from stellar_tester import (
    BATCH_SIZE,
    PRETRAINING,
    PRETRAINING_EMA,
    assert_outputs_close,
    assert_state_dicts_equal,
    build_model,
    make_inputs,
    perturb_,
    trainable_parameters_without_gradient,
)
from test_model_inputs import FullSizeReads
from test_modeling_stellar import HostSyncs
from test_pretrain_example import run_pretrain

from stellar_hf.losses_stellar import clustering_targets
from stellar_hf.pretraining import StellarEMATeacher


def teacher_and_student(**overrides):
    model = build_model(PRETRAINING_EMA, **overrides)
    return StellarEMATeacher.from_student(model), model


def clone(state_dict):
    return {key: value.clone() for key, value in state_dict.items()}


def test_teacher_starts_as_a_copy_with_its_own_storage():
    teacher, model = teacher_and_student()
    student = model.state_dict()
    assert_state_dicts_equal(teacher.state_dict(), {key: student[key] for key in teacher.state_dict()})
    # The encoder and both clustering heads; no factorization (the targets read only tokens), no decoder.
    assert {key.split(".")[0] for key in teacher.state_dict()} == {
        "stellar", "sparse_clustering_head", "cls_clustering_head"
    }  # fmt: skip
    assert not any(key.startswith("stellar.factorization.") for key in teacher.state_dict())
    student_pointers = {parameter.data_ptr() for parameter in model.parameters()}
    assert not {parameter.data_ptr() for parameter in teacher.parameters()} & student_pointers


def test_teacher_gets_no_gradients():
    teacher, model = teacher_and_student()
    model.train()
    inputs = make_inputs(PRETRAINING_EMA, model.config)
    inputs["teacher_targets"] = teacher(inputs["pixel_values"], inputs["global_views"])
    model(**inputs).loss.backward()
    for name, parameter in teacher.named_parameters():
        assert not parameter.requires_grad and parameter.grad is None, name
    assert trainable_parameters_without_gradient(model) == []


def test_update_moves_teacher_toward_student():
    teacher, model = teacher_and_student()
    perturb_(model, seed=7)  # as an optimiser step would
    momentum = 0.9
    teacher_before, student_before = clone(teacher.state_dict()), clone(model.state_dict())
    teacher.update(model, momentum)
    assert_state_dicts_equal(model.state_dict(), student_before)
    for key, value in teacher.state_dict().items():
        expected = momentum * teacher_before[key] + (1 - momentum) * student_before[key]
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7, msg=key)
    distance_before = sum((teacher_before[k] - student_before[k]).norm() for k in teacher_before)
    distance_after = sum((value - student_before[k]).norm() for k, value in teacher.state_dict().items())
    assert distance_after < distance_before
    teacher.update(model, 0.0)
    assert_outputs_close(
        teacher.state_dict(), {k: model.state_dict()[k] for k in teacher_before}, atol=1e-7, what="momentum 0 copies"
    )
    teacher.update(model, 1.0)  # momentum 1 keeps the teacher
    perturb_(model, seed=8)
    kept = clone(teacher.state_dict())
    teacher.update(model, 1.0)
    assert_state_dicts_equal(teacher.state_dict(), kept)


def test_momentum_schedule():
    teacher, _ = teacher_and_student(ema_momentum=0.99, ema_momentum_end=1.0)
    assert teacher.momentum(0, 100) == 0.99
    assert abs(teacher.momentum(50, 100) - 0.995) < 1e-12
    assert teacher.momentum(100, 100) == 1.0
    assert teacher.momentum(200, 100) == 1.0  # clamped past the end
    constant, _ = teacher_and_student()
    assert constant.momentum(0, 10) == constant.momentum(7, 10) == 0.996


def test_targets_come_from_the_second_global_view():
    teacher, model = teacher_and_student()
    inputs = make_inputs(PRETRAINING_EMA, model.config)
    config = model.config
    with torch.no_grad():
        targets = teacher(inputs["pixel_values"], inputs["global_views"])
        encoded = teacher.stellar(inputs["global_views"][:, 1])
        expected = clustering_targets(
            teacher.sparse_clustering_head(encoded.sparse_tokens),
            config.sinkhorn_temperature,
            config.sinkhorn_iterations,
        )
        expected_cls = clustering_targets(
            teacher.cls_clustering_head(encoded.cls_embedding.unsqueeze(1)),
            config.sinkhorn_temperature,
            config.sinkhorn_iterations,
        )
        # With one global view it reads the main images.
        alone = teacher(inputs["pixel_values"], inputs["global_views"][:, :1])
        from_main = teacher.stellar(inputs["pixel_values"]).sparse_tokens
    torch.testing.assert_close(targets.tokens, encoded.sparse_tokens, rtol=0, atol=0)
    torch.testing.assert_close(targets.assignments, expected, rtol=0, atol=0)
    torch.testing.assert_close(targets.cls_assignments, expected_cls, rtol=0, atol=0)
    assert targets.assignments.shape == (BATCH_SIZE, config.num_sparse_tokens, config.num_prototypes)
    torch.testing.assert_close(alone.tokens, from_main, rtol=0, atol=0)


def test_targets_without_cls_clustering():
    teacher, model = teacher_and_student(use_cls_clustering=False)
    inputs = make_inputs(PRETRAINING_EMA, model.config)
    assert teacher.cls_clustering_head is None
    targets = teacher(inputs["pixel_values"], inputs["global_views"])
    assert targets.cls_assignments is None
    inputs["teacher_targets"] = targets
    output = model(**inputs)
    assert output.cls_clustering_loss == 0 and output.cls_loss == 0


def test_the_teacher_reads_its_view_without_a_host_sync():
    # The values of the view are checked by the student's step, which reads the same images.
    teacher, model = teacher_and_student()
    inputs = make_inputs(PRETRAINING_EMA, model.config)
    with HostSyncs() as syncs:
        teacher(inputs["pixel_values"], inputs["global_views"])
    assert syncs.count == 0
    with FullSizeReads(inputs["global_views"][:, 1].numel()) as reads:
        teacher(inputs["pixel_values"], inputs["global_views"])
    assert "aminmax.default" not in reads.ops


def test_a_step_with_the_teacher_equals_the_self_distilled_step_when_teacher_and_view_are_the_student_and_image():
    # The teacher is the student and reads the main image: the targets are the model's own; only the clustering
    # loss differs, by the matching of each token to itself (which the hard argmax may not make the identity).
    teacher, model = teacher_and_student()
    inputs = make_inputs(PRETRAINING, model.config)
    inputs.pop("teacher_targets")
    inputs["global_views"][:, 1] = inputs["pixel_values"]
    with torch.no_grad():
        with_teacher = model(**inputs, teacher_targets=teacher(inputs["pixel_values"], inputs["global_views"]))
        model.config.use_ema_teacher = False
        own = model(**inputs)
    for name in ("assignments", "reconstruction_loss", "cls_clustering_loss", "mask_loss", "cls_loss", "koleo_loss"):
        torch.testing.assert_close(with_teacher[name], own[name], rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------- examples/pretrain.py


def test_pretrain_script_with_a_teacher_saves_it_and_resumes_exactly(tmp_path):
    uninterrupted, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    common = (
        "--max_train_steps", "4", "--checkpointing_steps", "2", "--skip_final_evaluation", "--config_overrides",
        "hidden_size=32,num_hidden_layers=2,num_attention_heads=4,intermediate_size=64,image_size=32,patch_size=8,"
        "num_sparse_tokens=4,decoder_hidden_size=32,decoder_num_hidden_layers=2,decoder_num_attention_heads=4,"
        "decoder_intermediate_size=64,reconstruction_target=pixel,num_prototypes=32,prototype_dim=16,"
        "predictor_hidden_size=64,num_masked_views=2,num_local_views=2,local_image_size=16,use_ema_teacher=true,"
        "ema_momentum=0.9",
    )  # fmt: skip
    run_pretrain(uninterrupted, *common)
    checkpoint = uninterrupted / "checkpoint-2"
    assert (checkpoint / "custom_checkpoint_0.pkl").is_file(), "the teacher is not in the training checkpoint"
    run_pretrain(resumed, *common, "--resume_from_checkpoint", str(checkpoint))
    expected = load_file(uninterrupted / "model.safetensors")
    actual = load_file(resumed / "model.safetensors")
    assert expected.keys() == actual.keys()
    teacher_keys = [name for name in expected if name.startswith("teacher.")]
    assert "teacher.stellar.embeddings.sparse_tokens" in teacher_keys
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0, msg=name)
    # After 4 updates at momentum 0.9 the teacher is no longer the student, and the final folder keeps it.
    student_name = "stellar.embeddings.sparse_tokens"
    assert not torch.equal(expected["teacher." + student_name], expected[student_name])
