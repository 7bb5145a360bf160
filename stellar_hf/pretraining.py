"""The training side of STELLAR pretraining: the optional EMA teacher (spec section 4.2).

`StellarForPreTraining` computes the objective for one step; by default its clustering targets come from its own
outputs (the paper's recipe). With `config.use_ema_teacher`, they come from an exponential moving average of the
student that the training loop owns, as DINOv2 keeps its teacher and momentum in the training side
(`SSLMetaArch`), not in the backbone:

    teacher = StellarEMATeacher.from_student(model)  # or .from_pretrained(folder, model) to keep a saved one
    for step, batch in enumerate(loader):
        outputs = model(**batch, teacher_targets=teacher(batch["pixel_values"], batch["global_views"]))
        outputs.loss.backward()
        optimizer.step()
        teacher.update(model, teacher.momentum(step, total_steps))
    teacher.save_pretrained(output_dir, model)  # the student's folder, with the teacher as `teacher.*` tensors

The teacher is a plain `nn.Module`: register it for checkpointing (`accelerator.register_for_checkpointing`) so that
a resumed run continues from the same teacher. `examples/pretrain.py` does all of this.

This module is not part of the model's remote code; nothing in `modeling_stellar.py` imports it.
"""

from __future__ import annotations

import json
import logging
import math
import os

import torch
from torch import nn

from .configuration_stellar import StellarConfig
from .losses_stellar import clustering_targets
from .modeling_stellar import (
    StellarClusteringHead,
    StellarForPreTraining,
    StellarModel,
    StellarPreTrainingTargets,
    check_pixel_values,
)

logger = logging.getLogger(__name__)

# Where a saved folder keeps the teacher: its tensors sit beside the student's in the same weights file, under this
# prefix (the layout of folders saved before the teacher left the model, and of converted original checkpoints).
TEACHER_PREFIX = "teacher."
# Tensors of earlier teachers that this one no longer holds: the factorization (a teacher reads only tokens).
UNUSED_SAVED_TENSORS = ("stellar.factorization.",)


class StellarEMATeacher(nn.Module):
    """
    EMA copy of a [`StellarForPreTraining`]'s encoder and clustering heads, never trained by gradients.

    Its tensors are named as the student's (`stellar.*`, `sparse_clustering_head.*`, `cls_clustering_head.*`), so the
    EMA pairs them by name. It has no factorization: its targets read only the sparse and CLS tokens.
    """

    def __init__(self, config: StellarConfig):
        super().__init__()
        self.config = config
        self.stellar = StellarModel(config, add_factorization=False)
        self.sparse_clustering_head = StellarClusteringHead(config)
        self.cls_clustering_head = StellarClusteringHead(config) if config.use_cls_clustering else None
        self.requires_grad_(False)

    # -- building --------------------------------------------------------------------------------------------------

    @classmethod
    def from_student(cls, student: StellarForPreTraining) -> StellarEMATeacher:
        """A teacher that starts as an exact copy of `student` (with its own storage), on the student's device and
        in its dtype."""
        parameter = next(student.parameters())
        teacher = cls(student.config).to(device=parameter.device, dtype=parameter.dtype)
        teacher.copy_student(student)
        return teacher.train(student.training)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, student: StellarForPreTraining, **hub_kwargs
    ) -> StellarEMATeacher:
        """
        The teacher saved in a folder or Hub repository (its `teacher.*` tensors, as [`save_pretrained`] and
        `python -m stellar_hf.convert` write them), for `student` loaded from the same place.

        A teacher the folder does not hold starts as a copy of the student instead, with a warning: a student-only
        folder (a converted or released checkpoint), teacher tensors of another shape, or only some teacher tensors
        (then the warning names what is discarded: a teacher mixing loaded and fresh tensors is an EMA of nothing,
        and the student is the only complete, consistent set).

        Args:
            hub_kwargs: `revision`, `token`, `cache_dir`, `local_files_only`, ... as for `from_pretrained`.
        """
        teacher = cls.from_student(student)
        saved = read_prefixed_tensors(pretrained_model_name_or_path, TEACHER_PREFIX, **hub_kwargs)
        saved = {name: tensor for name, tensor in saved.items() if not name.startswith(UNUSED_SAVED_TENSORS)}
        state = teacher.state_dict()
        unknown = sorted(set(saved) - set(state))
        if unknown:
            logger.warning(
                "%s holds teacher tensors that a StellarEMATeacher does not have, ignored: %s",
                pretrained_model_name_or_path,
                ", ".join(TEACHER_PREFIX + name for name in unknown[:5]) + (", ..." if len(unknown) > 5 else ""),
            )
        missing = [name for name in state if name not in saved or saved[name].shape != state[name].shape]
        if not missing:
            teacher.load_state_dict({name: saved[name] for name in state})
            return teacher
        if len(missing) == len(state):
            logger.warning(
                "The checkpoint %s holds no EMA teacher weights (config.use_ema_teacher=True): the teacher starts as "
                "a copy of the student, not from its random initialisation.",
                pretrained_model_name_or_path,
            )
        else:
            logger.warning(
                "The checkpoint %s holds only %d of the %d EMA teacher tensors (missing: %s): the whole teacher "
                "starts as a copy of the student, discarding the %d loaded teacher tensors, because a teacher mixing "
                "loaded and freshly initialised tensors is not an EMA of the student.",
                pretrained_model_name_or_path,
                len(state) - len(missing),
                len(state),
                ", ".join(TEACHER_PREFIX + name for name in missing[:5]) + (", ..." if len(missing) > 5 else ""),
                len(state) - len(missing),
            )
        return teacher

    def save_pretrained(self, save_directory: str | os.PathLike, student: StellarForPreTraining, **kwargs) -> None:
        """
        `student.save_pretrained(save_directory, **kwargs)`, with this teacher's tensors under `teacher.` in the same
        weights file, which [`from_pretrained`] reads back. The model classes skip them when loading the folder.
        """
        state_dict = {**student.state_dict(), **self.state_dict(prefix=TEACHER_PREFIX)}
        student.save_pretrained(save_directory, state_dict=state_dict, **kwargs)

    # -- training --------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def copy_student(self, student: StellarForPreTraining) -> None:
        """Make every teacher tensor an exact copy of the student's tensor of the same name."""
        student_state = student.state_dict()
        for name, tensor in self.state_dict().items():
            tensor.copy_(student_state[name])

    def momentum(self, step: int, total_steps: int) -> float:
        """Cosine schedule from `config.ema_momentum` at step 0 to `config.ema_momentum_end` at `total_steps`."""
        start, end = self.config.ema_momentum, self.config.ema_momentum_end
        progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
        return end - (end - start) * (math.cos(math.pi * progress) + 1) / 2

    @torch.no_grad()
    def update(self, student: StellarForPreTraining, momentum: float) -> None:
        """
        EMA update `teacher = momentum * teacher + (1 - momentum) * student`, over every teacher parameter; call after
        each optimiser step, with the unwrapped student.

        `examples/pretrain.py` calls it once per optimiser step, i.e. once per accumulated batch; the original updates
        the teacher on every training forward, i.e. once per micro-batch under gradient accumulation, so runs with
        accumulation move the teacher fewer times per epoch than the original does.
        """
        student_parameters = dict(student.named_parameters())
        teacher_parameters = list(self.named_parameters())
        torch._foreach_lerp_(
            [parameter for _, parameter in teacher_parameters],
            [student_parameters[name].detach() for name, _ in teacher_parameters],
            1.0 - momentum,
        )

    @torch.no_grad()
    def forward(
        self, pixel_values: torch.Tensor, global_views: torch.Tensor | None = None
    ) -> StellarPreTrainingTargets:
        """
        The clustering targets of B images for `StellarForPreTraining(..., teacher_targets=...)`, made from the second
        global view when there is one (as the original's teacher reads it), else from the main images.

        Args:
            pixel_values: `(B, C, H, W)` main images; global_views: `(B, M, C, H, W)` or `None`. Shapes are checked
                here, values by the student's step, which reads the same images.

        Returns:
            the teacher's sparse tokens `(B, r, d)` and their Sinkhorn-Knopp assignments `(B, r, C)`, and the CLS
            assignments `(B, 1, C)` (`None` without CLS clustering).
        """
        view = global_views[:, 1] if global_views is not None and global_views.shape[1] > 1 else pixel_values
        check_pixel_values(view, self.config.num_channels, self.config.patch_size, values=False)
        outputs = self.stellar(view, check_values=False, return_dict=True)
        temperature, iterations = self.config.sinkhorn_temperature, self.config.sinkhorn_iterations
        assignments = clustering_targets(self.sparse_clustering_head(outputs.sparse_tokens), temperature, iterations)
        cls_assignments = None
        if self.cls_clustering_head is not None:
            cls_logits = self.cls_clustering_head(outputs.cls_embedding.unsqueeze(1))
            cls_assignments = clustering_targets(cls_logits, temperature, iterations)
        return StellarPreTrainingTargets(
            tokens=outputs.sparse_tokens, assignments=assignments, cls_assignments=cls_assignments
        )


def read_prefixed_tensors(
    pretrained_model_name_or_path: str | os.PathLike, prefix: str, **hub_kwargs
) -> dict[str, torch.Tensor]:
    """
    The tensors whose names start with `prefix` in a saved folder's (or Hub repository's) safetensors weights, one
    file or shards, with the prefix removed; `{}` when there are no safetensors weights or no such tensor.
    """
    from safetensors import safe_open
    from transformers.utils import (
        SAFE_WEIGHTS_INDEX_NAME,
        SAFE_WEIGHTS_NAME,
        cached_file,
    )

    def locate(filename: str) -> str | None:
        return cached_file(
            pretrained_model_name_or_path,
            filename,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            **hub_kwargs,
        )

    index = locate(SAFE_WEIGHTS_INDEX_NAME)
    if index is not None:
        with open(index, encoding="utf-8") as handle:
            shards = sorted(set(json.load(handle)["weight_map"].values()))
        files = [locate(shard) for shard in shards]
    else:
        files = [locate(SAFE_WEIGHTS_NAME)]
    tensors = {}
    for path in filter(None, files):
        with safe_open(path, framework="pt") as weights:
            for name in weights.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                if name.startswith(prefix):
                    tensors[name[len(prefix) :]] = weights.get_tensor(name)
    return tensors


__all__ = ["StellarEMATeacher", "read_prefixed_tensors"]
