"""
Second-view global alignment (`StellarConfig.do_global_align`, spec section 4.1, upstream `do_global_align`).

The loss of a tiny model is checked against a direct computation of the spec's formulas, written out here with plain
torch (Sinkhorn-Knopp, the entropic matcher and the cross-entropy, from section 4's text, none of them imported from
`losses_stellar`): every component, the total and the gradient of every parameter. The index convention (one y -> x
index gathers both views' targets) is checked on tokens whose match is a 4-cycle, where any other reading gives
another number. Then: the option is off by default and adds no weights, the second view is global view 1, the
refusals name the field, and `examples/pretrain.py --config_overrides do_global_align=true` trains for two steps.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from stellar_tester import TINY_CONFIG, tiny_config

from stellar_hf import StellarConfig
from stellar_hf.losses_stellar import koleo_loss
from stellar_hf.modeling_stellar import (
    StellarForPreTraining,
    StellarModelOutput,
    StellarPreTrainingTargets,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
BATCH, MASKED, LOCAL = 2, 3, 2
SIDE, LOCAL_SIDE = TINY_CONFIG["image_size"], TINY_CONFIG["local_image_size"]
NUM_PATCHES = (SIDE // TINY_CONFIG["patch_size"]) ** 2


# ---------------------------------------------------------------------------------------------- the spec, written out


def sinkhorn(logits: torch.Tensor, temperature: float = 0.06, iterations: int = 3) -> torch.Tensor:
    """Section 4 item 2: every token of the batch a row; M - colmax + 50, exp, then (columns, rows) x 3, eps 1e-8."""
    scores = logits.detach().reshape(-1, logits.shape[-1]) / temperature
    plan = (scores - scores.max(dim=0, keepdim=True).values + 50).exp()
    for _ in range(iterations):
        plan = plan / (plan.sum(dim=0, keepdim=True) + 1e-8)
        plan = plan / (plan.sum(dim=1, keepdim=True) + 1e-8)
    return plan.reshape(logits.shape)


def matcher(predictions: torch.Tensor, targets: torch.Tensor, epsilon: float = 0.1, iterations: int = 5):
    """Section 4 item 4, one (r, d) set against one (r', d) set: the argmax row index of the entropic OT plan."""
    cost = torch.cdist(predictions.detach(), targets.detach())
    u, v = cost.new_zeros(cost.shape[0]), cost.new_zeros(cost.shape[1])
    for _ in range(iterations):
        u = -epsilon * torch.logsumexp((v[None, :] - cost) / epsilon, dim=1)
        v = -epsilon * torch.logsumexp((u[:, None] - cost) / epsilon, dim=0)
    return torch.exp((u[:, None] + v[None, :] - cost) / epsilon).argmax(dim=1)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 0.12) -> torch.Tensor:
    """Section 4: CE between the targets and softmax(logits / 0.12), averaged over tokens."""
    return -(targets * F.log_softmax(logits / temperature, dim=-1)).sum(dim=-1).mean()


def gathered(assignments: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Section 4.1's "Q gathered by idx": row j of image b takes Q[b, idx[b, j]]."""
    return torch.stack([assignments[b, index[b]] for b in range(len(index))])


def alignment_by_the_formula(logits_x, logits_y, tokens_x, tokens_y):
    """Section 4.1's clustering loss, with idx[b, j] the token of x matched to token j of y; also the targets Q_x."""
    q_x, q_y = sinkhorn(logits_x), sinkhorn(logits_y)
    index = torch.stack([matcher(tokens_y[b], tokens_x[b]) for b in range(len(tokens_x))])
    loss = (cross_entropy(logits_x, gathered(q_y, index)) + cross_entropy(logits_y, gathered(q_x, index))) / 2
    return loss, q_x, index


def loss_by_the_formula(model: StellarForPreTraining, batch: dict) -> dict[str, torch.Tensor]:
    """
    Every loss of one step with `do_global_align`, from the spec: the model supplies the encoder passes and the heads
    (unchanged by the option), the losses are computed here. y is global view 1, encoded in full.
    """
    config = model.config
    image = model.stellar(batch["pixel_values"])
    second = model.stellar(batch["global_views"][:, 1])
    head, cls_head = model.sparse_clustering_head, model.cls_clustering_head
    logits_x, logits_y = head(image.sparse_tokens), head(second.sparse_tokens)
    clustering, q_x, _ = alignment_by_the_formula(logits_x, logits_y, image.sparse_tokens, second.sparse_tokens)
    cls_x, cls_y = cls_head(image.cls_embedding[:, None]), cls_head(second.cls_embedding[:, None])
    cls_q_x, cls_q_y = sinkhorn(cls_x), sinkhorn(cls_y)
    cls_clustering = (cross_entropy(cls_x, cls_q_y) + cross_entropy(cls_y, cls_q_x)) / 2

    # The masked and local views keep x's targets: its detached tokens to match against, Q_x and cls_Q_x.
    views = batch["global_views"][:, :MASKED].flatten(0, 1)
    masked_sparse, masked_cls = model.encode_masked_views(views, batch["mask_noise"], with_cls=True)
    index = torch.stack([matcher(masked_sparse[k], image.sparse_tokens[k // MASKED]) for k in range(len(views))])
    targets = torch.stack([q_x[k // MASKED, index[k]] for k in range(len(views))])
    mask = cross_entropy(head(masked_sparse), targets)
    local_cls = model.encode_local_views(batch["local_views"].flatten(0, 1))
    cls = cross_entropy(cls_head(masked_cls[:, None]), cls_q_x.repeat_interleave(MASKED, dim=0)) + cross_entropy(
        cls_head(local_cls[:, None]), cls_q_x.repeat_interleave(LOCAL, dim=0)
    )

    grid = (SIDE // config.patch_size,) * 2
    prediction = model.decode_lowrank(image.lowrank_features, grid)
    reconstruction = model.reconstruction_loss(prediction, batch["pixel_values"], None)
    koleo = config.koleo_weight * koleo_loss(image.sparse_tokens) + config.koleo_weight * koleo_loss(masked_sparse)
    parts = {
        "reconstruction_loss": reconstruction,
        "koleo_loss": koleo,
        "clustering_loss": clustering,
        "cls_clustering_loss": cls_clustering,
        "mask_loss": mask,
        "cls_loss": cls,
    }
    parts["loss"] = config.effective_reconstruction_weight * reconstruction + sum(
        value for name, value in parts.items() if name != "reconstruction_loss"
    )
    parts["assignments"] = q_x
    return parts


# ---------------------------------------------------------------------------------------------- fixtures


def make_batch(dtype=torch.float64, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "pixel_values": torch.randn(BATCH, 3, SIDE, SIDE, generator=generator, dtype=dtype),
        "global_views": torch.randn(BATCH, MASKED, 3, SIDE, SIDE, generator=generator, dtype=dtype),
        "local_views": torch.randn(BATCH, LOCAL, 3, LOCAL_SIDE, LOCAL_SIDE, generator=generator, dtype=dtype),
        "mask_noise": torch.rand(BATCH * MASKED, NUM_PATCHES, generator=generator),
    }


def make_model(**changes) -> StellarForPreTraining:
    torch.manual_seed(0)
    config = tiny_config(num_masked_views=MASKED, num_local_views=LOCAL, **changes)
    # float64, so that a difference of order 1e-7 is a bug and not rounding.
    return StellarForPreTraining(config).double().train()


def gradients(model: StellarForPreTraining, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {name: parameter.grad.clone() for name, parameter in model.named_parameters() if parameter.grad is not None}


# ---------------------------------------------------------------------------------------------- the loss


def test_loss_and_gradients_match_the_formula_of_the_spec():
    model, batch = make_model(do_global_align=True), make_batch()
    output = model(**batch)
    expected = loss_by_the_formula(model, batch)
    for name, value in expected.items():
        torch.testing.assert_close(getattr(output, name), value, rtol=1e-9, atol=1e-10, msg=name)
    # The alignment is not the default objective in disguise: the default clustering loss is another number.
    default = cross_entropy(model.sparse_clustering_head(output.sparse_tokens), output.assignments)
    assert not torch.isclose(output.clustering_loss, default)

    produced, wanted = gradients(model, output.loss), gradients(model, loss_by_the_formula(model, batch)["loss"])
    assert produced.keys() == wanted.keys() == {name for name, _ in model.named_parameters()}
    for name in produced:
        torch.testing.assert_close(produced[name], wanted[name], rtol=1e-7, atol=1e-10, msg=f"gradient of {name}")


def test_the_first_term_gathers_the_second_views_targets_with_the_same_y_to_x_index():
    # y's token j is x's token perm[j] plus a little noise: the match y -> x is the 4-cycle perm, not an involution,
    # so gathering Q_y for x's rows by idx (as upstream does) and by the inverse pairing give different numbers.
    model = make_model(do_global_align=True, use_cls_clustering=False)
    generator = torch.Generator().manual_seed(1)
    tokens_x = torch.randn(BATCH, 4, TINY_CONFIG["hidden_size"], generator=generator, dtype=torch.float64) * 3
    perm = torch.tensor([1, 2, 3, 0])
    tokens_y = tokens_x[:, perm] + 0.01 * torch.randn(tokens_x.shape, generator=generator, dtype=torch.float64)
    image, second = StellarModelOutput(sparse_tokens=tokens_x), StellarModelOutput(sparse_tokens=tokens_y)

    targets, clustering_loss, cls_clustering_loss = model.global_alignment_losses(image, second)

    head = model.sparse_clustering_head
    logits_x, logits_y = head(tokens_x), head(tokens_y)
    expected, q_x, index = alignment_by_the_formula(logits_x, logits_y, tokens_x, tokens_y)
    assert torch.equal(index, perm.expand(BATCH, -1))
    torch.testing.assert_close(clustering_loss, expected, rtol=1e-12, atol=0)
    inverse = torch.argsort(perm).expand(BATCH, -1)
    re_paired = (
        cross_entropy(logits_x, gathered(sinkhorn(logits_y), inverse)) + cross_entropy(logits_y, gathered(q_x, index))
    ) / 2
    assert not torch.isclose(clustering_loss, re_paired)
    assert cls_clustering_loss.item() == 0.0
    # x's own targets go on to the masked and local views.
    assert isinstance(targets, StellarPreTrainingTargets) and targets.cls_assignments is None
    torch.testing.assert_close(targets.assignments, q_x, rtol=0, atol=0)
    assert torch.equal(targets.tokens, tokens_x) and not targets.tokens.requires_grad


def test_the_second_view_is_global_view_1():
    model, batch = make_model(do_global_align=True), make_batch()
    with torch.no_grad():
        reference = model(**batch)
        for view, changes in ((0, False), (2, False), (1, True)):
            changed = {**batch, "global_views": batch["global_views"].clone()}
            changed["global_views"][:, view] += 0.5
            output = model(**changed)
            for name in ("clustering_loss", "cls_clustering_loss"):
                assert torch.equal(getattr(output, name), getattr(reference, name)) != changes, (view, name)


# ---------------------------------------------------------------------------------------------- default off


def test_off_by_default_and_no_new_weights():
    assert StellarConfig().do_global_align is False and tiny_config().do_global_align is False
    off, on = make_model(), make_model(do_global_align=True)
    assert {k: v.shape for k, v in off.state_dict().items()} == {k: v.shape for k, v in on.state_dict().items()}
    batch = make_batch()
    output = off(**batch)
    # Off: the clustering loss is the default one, each view's logits against its own Sinkhorn targets.
    logits = off.sparse_clustering_head(output.sparse_tokens)
    torch.testing.assert_close(output.clustering_loss, cross_entropy(logits, sinkhorn(logits)), rtol=1e-9, atol=0)
    # The same weights with the option turned on give another objective; turned off again, the same bits.
    on.load_state_dict(off.state_dict())
    assert not torch.isclose(on(**batch).clustering_loss, output.clustering_loss)
    on.config.do_global_align = False
    again = on(**batch)
    for name in ("loss", "clustering_loss", "cls_clustering_loss", "mask_loss", "cls_loss"):
        assert torch.equal(getattr(again, name), getattr(output, name)), name


# ---------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"use_ema_teacher": True}, "use_ema_teacher"),
        ({"num_masked_views": 1}, "num_masked_views"),
        ({"num_masked_views": 0}, "num_masked_views"),
    ],
)
def test_config_refuses_what_the_alignment_cannot_run_with(changes, words):
    with pytest.raises(ValueError, match=r"^StellarConfig\.do_global_align\b") as error:
        tiny_config(do_global_align=True, **changes)
    assert type(error.value) is ValueError and words in str(error.value)
    tiny_config(**changes)  # fine without the alignment
    with pytest.raises(ValueError, match=r"^StellarConfig\.do_global_align\b"):
        StellarConfig.from_dict(tiny_config(**changes).to_dict(), do_global_align=True)


def test_forward_refuses_a_missing_second_view_and_teacher_targets():
    model, batch = make_model(do_global_align=True), make_batch()
    with pytest.raises(ValueError, match="second global view"):
        model(**{**batch, "global_views": batch["global_views"][:, :1], "mask_noise": None})
    with pytest.raises(ValueError, match="second global view"):
        model(pixel_values=batch["pixel_values"])
    targets = StellarPreTrainingTargets(tokens=torch.zeros(BATCH, 4, 32), assignments=torch.zeros(BATCH, 4, 32))
    with pytest.raises(ValueError, match="teacher_targets"):
        model(**batch, teacher_targets=targets)


# ---------------------------------------------------------------------------------------------- the pretrain CLI


def test_pretrain_cli_trains_with_the_override(tmp_path):
    overrides = ",".join(f"{key}={value}" for key, value in TINY_CONFIG.items()) + ",do_global_align=true"
    output_dir = tmp_path / "run"
    command = [
        sys.executable, str(REPO_ROOT / "examples" / "pretrain.py"),
        "--output_dir", str(output_dir),
        "--config_overrides", overrides,
        "--num_synthetic_images", "8",
        "--num_synthetic_eval_images", "4",
        "--per_device_train_batch_size", "4",
        "--max_train_steps", "2",
        "--logging_steps", "1",
        "--skip_final_evaluation",
        "--report_to", "none",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, check=False, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-5000:]
    assert json.loads((output_dir / "results.json").read_text())["completed_steps"] == 2
    config = StellarConfig.from_pretrained(output_dir)
    assert config.do_global_align is True and config.use_ema_teacher is False
    model = StellarForPreTraining.from_pretrained(output_dir)
    assert all(torch.isfinite(parameter).all() for parameter in model.parameters())

    # `--output_dir` and `--config_overrides` are items 3 and 5 of the command.
    refused_command = [*command[:3], str(tmp_path / "refused"), command[4], overrides + ",use_ema_teacher=true"]
    refused = subprocess.run(
        refused_command + command[6:], check=False, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=300
    )
    assert refused.returncode != 0 and "StellarConfig.do_global_align" in refused.stderr + refused.stdout
