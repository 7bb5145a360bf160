"""PyTorch STELLAR: sparse semantic tokens ("what") times a spatial assignment map ("where").

Reading order, following one `pixel_values`:

- input checks (`check_pixel_values`, `check_input_values`);
- the encoder, a pre-norm ViT with r sparse tokens appended after the patches (`StellarEmbeddings`, `StellarAttention`,
  `StellarLayer`, `StellarTransformer`) and the spatial-semantic factorization (`StellarFactorization`);
- the reconstruction decoder and heads (`StellarDecoder`, `StellarClusteringHead`);
- the models: `StellarModel` (encoder + factorization), `StellarForImageClassification` (the linear probe),
  `StellarDecodingModel` (the one decode path: low-rank features or factors -> image, and the VQ tokenizer),
  `StellarForImageReconstruction`, and `StellarForPreTraining`, whose `forward` runs the named steps of the objective
  (spec section 4) down to the loss. The row-subset encoder pass that masked and local views use lives with it.

The EMA teacher is training state, not part of any model here: see `stellar_hf.pretraining.StellarEMATeacher`.
"""

import importlib
import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_stellar import StellarConfig
from .image_processing_stellar import unnormalize_images
from .losses_stellar import (
    clustering_cross_entropy,
    clustering_targets,
    gather_matched_targets,
    kept_patch_indices,
    koleo_loss,
    masking_noise,
    match_tokens,
    matched_clustering_loss,
)

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class StellarModelOutput(ModelOutput):
    """
    Output of [`StellarModel`]. B images, N patches, r sparse tokens, d width.

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(B, 1 + N + r, d)`):
            the encoder sequence [CLS, patches, sparse tokens] after the final LayerNorm.
        pooler_output (`torch.FloatTensor` of shape `(B, d)`): mean of the sparse tokens (the paper's probe feature).
        sparse_tokens (`torch.FloatTensor` of shape `(B, r, d)`): the sparse semantic tokens ("what").
        spatial_map (`torch.FloatTensor` of shape `(B, N, r)`): each patch's distribution over the sparse tokens
            ("where"); rows sum to one.
        lowrank_features (`torch.FloatTensor` of shape `(B, N, d)`): `spatial_map @ sparse_tokens`, the dense grid
            the decoder reads (rank at most r).
        dense_features (`torch.FloatTensor` of shape `(B, N, d)`): the encoder's patch tokens.
        cls_embedding (`torch.FloatTensor` of shape `(B, d)`): the CLS token.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*): embeddings and the output of each layer,
            each `(B, 1 + N + r, d)`, when `output_hidden_states=True`.
        attentions (`tuple(torch.FloatTensor)`, *optional*): attention probabilities of each layer,
            each `(B, heads, 1 + N + r, 1 + N + r)`, when `output_attentions=True`.
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    sparse_tokens: torch.FloatTensor | None = None
    spatial_map: torch.FloatTensor | None = None
    lowrank_features: torch.FloatTensor | None = None
    dense_features: torch.FloatTensor | None = None
    cls_embedding: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class StellarReconstructionOutput(ModelOutput):
    """
    Output of [`StellarForImageReconstruction`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*): MSE against the un-normalised input (pixel target) or
            cross-entropy against the VQGAN codes of the input (VQ target: `labels`, or the attached tokenizer's
            codes of the input).
        reconstruction (`torch.FloatTensor` of shape `(B, C, H, W)`, *optional*): the image on the [0, 1] scale. Pixel
            target: the head's raw, unclamped output. VQ target: the VQGAN decoding of the argmax codes, when a
            tokenizer is attached.
        logits (`torch.FloatTensor` of shape `(B, N, codebook_size)`, *optional*): VQ target only, per-patch logits.
        sparse_tokens, spatial_map, lowrank_features: as in [`StellarModelOutput`].
        hidden_states, attentions: of the encoder, as in [`StellarModelOutput`].
    """

    loss: torch.FloatTensor | None = None
    reconstruction: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    sparse_tokens: torch.FloatTensor | None = None
    spatial_map: torch.FloatTensor | None = None
    lowrank_features: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class StellarForPreTrainingOutput(ModelOutput):
    """
    Output of [`StellarForPreTraining`]: the total loss, every weighted component (for logging), and the main
    image's factors.

    Args:
        loss (`torch.FloatTensor` of shape `()`): `reconstruction_weight * reconstruction_loss + koleo_loss +
            clustering_loss + cls_clustering_loss + mask_loss + cls_loss`.
        reconstruction_loss (`()`): unweighted MSE (pixel) or cross-entropy (VQ).
        koleo_loss (`()`): weighted KoLeo on the main image's and the masked views' sparse tokens.
        clustering_loss, cls_clustering_loss (`()`): online clustering of the main image's sparse / CLS tokens (with
            `config.do_global_align`, the mean of the two cross-view terms between it and its second global view).
        mask_loss (`()`): masked-view sparse tokens predicting their matched targets (0 without global views).
        cls_loss (`()`): masked-view and local-view CLS predicting the CLS targets (0 without views).
        reconstruction (`(B, C, H, W)`, *optional*): pixel target: the raw reconstruction on the [0, 1] scale.
        logits (`(B, N, V)`, *optional*): VQ target: per-patch code logits.
        sparse_tokens (`(B, r, d)`), spatial_map (`(B, N, r)`), cls_embedding (`(B, d)`): of the main image.
        assignments (`(B, r, C)`): the Sinkhorn-Knopp targets of the main image's sparse tokens.
    """

    loss: torch.FloatTensor | None = None
    reconstruction_loss: torch.FloatTensor | None = None
    koleo_loss: torch.FloatTensor | None = None
    clustering_loss: torch.FloatTensor | None = None
    cls_clustering_loss: torch.FloatTensor | None = None
    mask_loss: torch.FloatTensor | None = None
    cls_loss: torch.FloatTensor | None = None
    reconstruction: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    sparse_tokens: torch.FloatTensor | None = None
    spatial_map: torch.FloatTensor | None = None
    cls_embedding: torch.FloatTensor | None = None
    assignments: torch.FloatTensor | None = None


@dataclass
class StellarPreTrainingTargets(ModelOutput):
    """
    What the clustering losses of [`StellarForPreTraining`] predict, for B images. Without a teacher the model makes
    them from its own main-image outputs ([`StellarForPreTraining.self_distillation_targets`]); with an EMA teacher
    they come from `stellar_hf.pretraining.StellarEMATeacher` and are passed as `teacher_targets`.

    Args:
        tokens (`(B, r, d)`): the sparse tokens that predicted tokens are matched to (no gradient).
        assignments (`(B, r, C)`): their Sinkhorn-Knopp clustering targets.
        cls_assignments (`(B, 1, C)`, *optional*): the CLS clustering targets; `None` without CLS clustering.
    """

    tokens: torch.FloatTensor | None = None
    assignments: torch.FloatTensor | None = None
    cls_assignments: torch.FloatTensor | None = None


# ----------------------------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------------------------


# Largest magnitude accepted in `pixel_values`. Normalised images stay far inside it: the ImageNet statistics map [0, 1]
# images to [-2.12, 2.64], and even a [0, 255] image normalised with them (a common mistake, still an image) stays
# below 1.2e3. Far beyond it lie only broken inputs, which the encoder cannot turn into finite outputs: its first
# LayerNorm squares the patch embeddings, so float32 and bfloat16 overflow to NaN from about 1e19-1e20, and float16
# holds nothing above 65504 at all. The bound is a property of images, not of the weights, so it is the same for
# every dtype and model size.
PIXEL_VALUE_LIMIT = 1e4
PIXEL_VALUE_LIMIT_REASON = (
    ": normalised images lie within a few units of 0 (ImageNet statistics map [0, 1] images to [-2.12, 2.64]), and "
    "values this large overflow the encoder (its LayerNorm squares the patch embeddings) to NaN; normalise the images "
    "with StellarImageProcessor"
)


def check_input_values(tensors: dict[str, torch.Tensor], limit: float | None = None, why: str = "") -> None:
    """
    Raise `ValueError` naming the first of `tensors` (non-empty, floating point) that holds NaN, an infinity or, with
    `limit`, a value of magnitude above `limit`; the message says what was found and, for the bound, `why` it is
    refused.

    The passing path reads each tensor once (one `aminmax`; NaN propagates through min and max and fails every
    comparison) and syncs with the host once, however many tensors are checked. Skipped under `torch.compile` (a
    data-dependent branch would break the graph).
    """
    if torch.compiler.is_compiling():
        return
    bounds = torch.stack([torch.stack(torch.aminmax(tensor.detach())).float() for tensor in tensors.values()])
    lowest, highest = bounds.unbind(dim=1)
    if limit is None:
        passing = torch.isfinite(lowest) & torch.isfinite(highest)
    else:
        passing = (lowest >= -limit) & (highest <= limit)
    if bool(passing.all()):
        return
    for name, (low, high), passed in zip(tensors, bounds.tolist(), passing.tolist()):
        if passed:
            continue
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError(f"{name} contains NaN or infinite values (min {low}, max {high})")
        raise ValueError(
            f"{name} holds values of magnitude up to {max(-low, high):.3g} (min {low:.3g}, max {high:.3g}), beyond "
            f"the limit of {limit:g}{why}"
        )


def check_pixel_values(
    pixel_values: torch.Tensor, num_channels: int, patch_size: int, name: str = "pixel_values", values: bool = True
) -> None:
    """
    Raise `ValueError` with the reason when `pixel_values` cannot be encoded.

    Args:
        pixel_values: expected `(B, num_channels, H, W)` with B >= 1, H and W positive multiples of `patch_size`,
            floating point, finite and within `PIXEL_VALUE_LIMIT` in magnitude (normalised images; see the constant
            for why larger values are refused).
        name: the argument named in the messages.
        values: also check the values (one reduction and a host sync, see [`check_input_values`]); callers that
            check several inputs at once pass `False` and call `check_input_values` themselves.
    """
    if not isinstance(pixel_values, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(pixel_values).__name__}")
    if not pixel_values.is_floating_point():
        raise ValueError(
            f"{name} must be a floating-point tensor of normalised images, got {pixel_values.dtype}; "
            "use StellarImageProcessor to turn images into pixel_values"
        )
    if pixel_values.ndim != 4:
        raise ValueError(
            f"{name} must be a 4-D tensor (batch, channels, height, width), got shape {tuple(pixel_values.shape)}"
        )
    batch_size, channels, height, width = pixel_values.shape
    if batch_size == 0:
        # Refused rather than answered with empty outputs: the pretraining losses (means, Sinkhorn) have no value
        # for an empty batch, and one rule for every model class is simpler to rely on.
        raise ValueError(f"{name} has an empty batch (shape {tuple(pixel_values.shape)}); pass at least one image")
    if channels != num_channels:
        raise ValueError(f"{name} has {channels} channels but the model expects {num_channels}")
    if height < patch_size or width < patch_size:
        raise ValueError(f"image of {height}x{width} pixels is smaller than one {patch_size}x{patch_size} patch")
    if height % patch_size or width % patch_size:
        raise ValueError(f"image sides ({height}x{width}) must be multiples of the patch size {patch_size}")
    if values:
        check_input_values({name: pixel_values}, PIXEL_VALUE_LIMIT, PIXEL_VALUE_LIMIT_REASON)


def check_factors(sparse_tokens: torch.Tensor, spatial_map: torch.Tensor, hidden_size: int) -> None:
    """
    Raise `ValueError` naming the argument when two factors cannot be decoded together.

    Args:
        sparse_tokens: expected `(B, r, hidden_size)`, floating point, finite.
        spatial_map: expected `(B, N, r)` (one row per patch, one column per token), floating point, finite; B >= 1,
            N >= 1, r >= 1. r need not be `config.num_sparse_tokens`: the decoder reads only the product.
    """
    for name, factor in (("sparse_tokens", sparse_tokens), ("spatial_map", spatial_map)):
        if not isinstance(factor, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(factor).__name__}")
        if not factor.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {factor.dtype}")
    if sparse_tokens.ndim != 3 or sparse_tokens.shape[-1] != hidden_size:
        raise ValueError(
            f"sparse_tokens must have shape (batch, num_tokens, {hidden_size}), got {tuple(sparse_tokens.shape)}"
        )
    if spatial_map.ndim != 3:
        raise ValueError(
            f"spatial_map must have shape (batch, num_patches, num_tokens), got {tuple(spatial_map.shape)}"
        )
    batch_size, num_tokens = sparse_tokens.shape[:2]
    if spatial_map.shape[0] != batch_size or spatial_map.shape[2] != num_tokens:
        raise ValueError(
            f"spatial_map of shape {tuple(spatial_map.shape)} does not match sparse_tokens of shape "
            f"{tuple(sparse_tokens.shape)}: expected (batch={batch_size}, num_patches, num_tokens={num_tokens})"
        )
    if batch_size == 0 or num_tokens == 0 or spatial_map.shape[1] == 0:
        raise ValueError(
            f"sparse_tokens {tuple(sparse_tokens.shape)} and spatial_map {tuple(spatial_map.shape)} are empty; "
            "decoding needs at least one image, one token and one patch"
        )
    check_input_values({"sparse_tokens": sparse_tokens, "spatial_map": spatial_map})


def check_lowrank_features(lowrank_features: torch.Tensor, hidden_size: int) -> None:
    """Raise `ValueError` unless `lowrank_features` is a non-empty, finite, floating-point `(B, N, hidden_size)`."""
    if not isinstance(lowrank_features, torch.Tensor) or not lowrank_features.is_floating_point():
        kind = lowrank_features.dtype if isinstance(lowrank_features, torch.Tensor) else type(lowrank_features).__name__
        raise ValueError(f"lowrank_features must be a floating-point torch.Tensor, got {kind}")
    if lowrank_features.ndim != 3 or lowrank_features.shape[-1] != hidden_size or 0 in lowrank_features.shape:
        raise ValueError(
            f"lowrank_features must have shape (batch, num_patches, {hidden_size}) with at least one image and one "
            f"patch, got {tuple(lowrank_features.shape)}"
        )
    check_input_values({"lowrank_features": lowrank_features})


def check_grid_size(grid_size, num_patches: int) -> tuple[int, int]:
    """`grid_size` checked to hold `num_patches` patches, or the square grid when it is `None`; else `ValueError`."""
    if grid_size is None:
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise ValueError(f"{num_patches} patches are not a square grid; pass grid_size=(height, width)")
        return side, side
    if (
        not isinstance(grid_size, (tuple, list))
        or len(grid_size) != 2
        or not all(isinstance(side, int) and not isinstance(side, bool) and side > 0 for side in grid_size)
        or grid_size[0] * grid_size[1] != num_patches
    ):
        raise ValueError(
            f"grid_size must be (height, width), positive integers with height * width = {num_patches} (the "
            f"rows of spatial_map), got {grid_size}"
        )
    return tuple(grid_size)


def check_class_labels(labels: torch.Tensor, num_labels: int) -> None:
    """Integer labels are class indices: each in `[0, num_labels)`, or -100 (ignored by the loss); else `ValueError`."""
    if labels.is_floating_point() or not labels.numel():
        return
    valid = ((labels >= 0) & (labels < num_labels)) | (labels == -100)
    if not bool(valid.all()):
        raise ValueError(f"labels must lie in [0, {num_labels}) (or be -100, ignored), got {labels.tolist()}")


def grid_size_of(pixel_values: torch.Tensor, patch_size: int) -> tuple[int, int]:
    """`(B, C, H, W)` -> the patch grid `(H / p, W / p)`."""
    return pixel_values.shape[-2] // patch_size, pixel_values.shape[-1] // patch_size


def unnormalize(pixel_values: torch.Tensor, config: StellarConfig) -> torch.Tensor:
    """Undo the image processor's normalisation: `(B, C, H, W)` normalised -> `(B, C, H, W)` on the [0, 1] scale."""
    return unnormalize_images(pixel_values, config.image_mean, config.image_std)


# ----------------------------------------------------------------------------------------------------------------------
# Encoder pieces
# ----------------------------------------------------------------------------------------------------------------------


class StellarPatchEmbeddings(nn.Module):
    """Conv patchifier: `(B, C, H, W)` -> `(B, (H/p)*(W/p), d)`, patches in row-major order."""

    def __init__(self, config: StellarConfig):
        super().__init__()
        self.projection = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(B, C, H, W)` -> `(B, N, d)`; a remainder of H or W beyond a multiple of the patch size is ignored, as
        the strided convolution does."""
        return self.projection(pixel_values).flatten(2).transpose(1, 2)

    def embed_kept_patches(self, pixel_values: torch.Tensor, keep_indices: torch.LongTensor) -> torch.Tensor:
        """
        `forward(pixel_values)` gathered at `keep_indices` `(B, N_keep)` (row-major patch indices), computing only
        those rows: `(B, N_keep, d)`.

        The strided convolution is one matmul per patch, so the kept patches (masked views keep 20%) are projected
        straight from the unfolded view, and only they are copied.
        """
        batch_size = pixel_values.shape[0]
        size = self.projection.kernel_size[0]
        patches = pixel_values.unfold(2, size, size).unfold(3, size, size)  # (B, C, h, w, p, p), a view
        grid_width = patches.shape[3]
        image_index = torch.arange(batch_size, device=keep_indices.device).unsqueeze(1)
        kept = patches[image_index, :, keep_indices // grid_width, keep_indices % grid_width]  # (B, N_keep, C, p, p)
        return F.linear(kept.reshape(*keep_indices.shape, -1), self.projection.weight.flatten(1), self.projection.bias)


class StellarEmbeddings(nn.Module):
    """
    Builds the encoder sequence `[CLS, patches, sparse tokens]`.

    CLS and patches get learned absolute position embeddings; the r sparse tokens are appended afterwards with none,
    like registers. As in `ViTMAEEmbeddings`, masking happens here: masked views keep a subset of the patches, after
    their position embeddings are added.
    """

    def __init__(self, config: StellarConfig):
        super().__init__()
        num_patches = (config.image_size // config.patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, 1 + num_patches, config.hidden_size))
        self.sparse_tokens = nn.Parameter(torch.zeros(config.num_sparse_tokens, config.hidden_size))
        self.patch_embeddings = StellarPatchEmbeddings(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.patch_size = config.patch_size
        self.image_size = config.image_size

    def interpolate_pos_encoding(self, num_patches: int, height: int, width: int) -> torch.Tensor:
        """
        Position embeddings for an image of `height x width` pixels, `(1, 1 + num_patches, d)`.

        Same algorithm as transformers 4.57's ViT, which the original runs: skipped when the patch count already
        matches and the image is square, otherwise bicubic resizing of the square grid to `(H/p, W/p)`.
        """
        num_positions = self.position_embeddings.shape[1] - 1
        if not torch.jit.is_tracing() and num_patches == num_positions and height == width:
            return self.position_embeddings
        class_position = self.position_embeddings[:, :1]
        patch_positions = self.position_embeddings[:, 1:]
        dim = patch_positions.shape[-1]
        side = int(math.sqrt(num_positions))
        patch_positions = patch_positions.reshape(1, side, side, dim).permute(0, 3, 1, 2)
        # Bicubic resampling in bf16/fp16 is inaccurate (and unsupported on some backends): resize in fp32.
        patch_positions = F.interpolate(
            patch_positions.float(),
            size=(height // self.patch_size, width // self.patch_size),
            mode="bicubic",
            align_corners=False,
        ).to(self.position_embeddings.dtype)
        patch_positions = patch_positions.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((class_position, patch_positions), dim=1)

    def forward(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool | None = None,
        patch_keep_indices: torch.LongTensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            pixel_values: `(B, C, H, W)`, normalised.
            interpolate_pos_encoding: as in [`StellarModel.forward`]: `None` interpolates whenever the size differs
                from `config.image_size`, `False` refuses other sizes.
            patch_keep_indices: `(B, N_keep)` indices of the patches a masked view keeps, or `None` for all.

        Returns:
            `(B, 1 + N_keep + r, d)` embeddings.
        """
        batch_size, _, height, width = pixel_values.shape
        if patch_keep_indices is None:
            patches = self.patch_embeddings(pixel_values)
        else:
            patches = self.patch_embeddings.embed_kept_patches(pixel_values, patch_keep_indices)
        num_patches = (height // self.patch_size) * (width // self.patch_size)
        same_size = height == self.image_size and width == self.image_size
        if interpolate_pos_encoding is False and not same_size:
            raise ValueError(
                f"Input image size ({height}x{width}) doesn't match the model ({self.image_size}x{self.image_size}); "
                "pass interpolate_pos_encoding=True (or None) to resize the position embeddings"
            )
        positions = self.interpolate_pos_encoding(num_patches, height, width)
        cls_token = self.cls_token.expand(batch_size, -1, -1) + positions[:, :1]
        patch_positions = positions[:, 1:]
        if patch_keep_indices is not None:
            patch_positions = patch_positions[0][patch_keep_indices]  # (B, N_keep, d)
        patches = patches + patch_positions
        sparse_tokens = self.sparse_tokens.unsqueeze(0).expand(batch_size, -1, -1).to(patches.dtype)
        embeddings = torch.cat((cls_token, patches, sparse_tokens), dim=1)
        return self.dropout(embeddings)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Unpack[TransformersKwargs],
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Plain softmax attention.

    Args:
        query: `(B, heads, S_q, head_dim)`; key, value: `(B, heads, S, head_dim)`.
        attention_mask: additive mask broadcastable to `(B, heads, S_q, S)`, or `None`.

    Returns:
        output `(B, S_q, heads, head_dim)` and probabilities `(B, heads, S_q, S)`.
    """
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probabilities = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probabilities = F.dropout(probabilities, p=dropout, training=module.training)
    output = torch.matmul(probabilities, value).transpose(1, 2).contiguous()
    return output, probabilities


class StellarAttention(nn.Module):
    """Multi-head self-attention (scale 1/sqrt(head_dim)) through transformers' attention interface."""

    def __init__(self, config: StellarConfig, hidden_size: int, num_heads: int):
        super().__init__()
        self.config = config
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_probs_dropout_prob
        self.is_causal = False
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=config.qkv_bias)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=config.qkv_bias)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(hidden_size, hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_value_states: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        `(B, S, D)` -> `(B, S, D)` and the attention probabilities `(B, heads, S, S)` (`None` from fused kernels).
        With `key_value_states` `(B, S_kv, D)` the keys and values come from those rows instead (probabilities
        `(B, heads, S, S_kv)`); the pretraining path uses it to compute only some rows of a layer.
        """
        if key_value_states is None:
            key_value_states = hidden_states
        batch_size, length, _ = hidden_states.shape
        query = self.q_proj(hidden_states).view(batch_size, length, self.num_heads, self.head_dim).transpose(1, 2)
        shape = (batch_size, key_value_states.shape[1], self.num_heads, self.head_dim)
        key = self.k_proj(key_value_states).view(shape).transpose(1, 2)
        value = self.v_proj(key_value_states).view(shape).transpose(1, 2)
        attention_function: Callable = eager_attention_forward
        # Fused kernels do not return the probabilities, so a call that asks for them runs the eager path.
        if not kwargs.get("output_attentions", self.config.output_attentions):
            attention_function = ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, eager_attention_forward
            )
        output, probabilities = attention_function(
            self,
            query,
            key,
            value,
            None,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        return self.o_proj(output.reshape(batch_size, length, -1)), probabilities


class StellarMLP(nn.Module):
    """Two-layer MLP `(..., D) -> (..., D)` with the configured activation."""

    def __init__(self, config: StellarConfig, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.activation = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(hidden_states)))


class StellarLayer(GradientCheckpointingLayer):
    """Pre-norm transformer block shared by the encoder and the decoder: `(B, S, D) -> (B, S, D)`."""

    def __init__(self, config: StellarConfig, hidden_size: int, num_heads: int, intermediate_size: int):
        super().__init__()
        self.layernorm_before = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.attention = StellarAttention(config, hidden_size, num_heads)
        self.layernorm_after = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.mlp = StellarMLP(config, hidden_size, intermediate_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, **kwargs: Unpack[TransformersKwargs]) -> torch.Tensor:
        attention_output, _ = self.attention(self.layernorm_before(hidden_states), **kwargs)
        hidden_states = hidden_states + self.dropout(attention_output)
        return hidden_states + self.dropout(self.mlp(self.layernorm_after(hidden_states)))


class StellarTransformer(nn.Module):
    """A stack of [`StellarLayer`] followed by a LayerNorm, `(B, S, D) -> (B, S, D)`; used as encoder and decoder."""

    def __init__(self, config: StellarConfig, hidden_size: int, num_layers: int, num_heads: int, intermediate_size: int):
        super().__init__()
        self.layers = nn.ModuleList(
            StellarLayer(config, hidden_size, num_heads, intermediate_size) for _ in range(num_layers)
        )
        self.layernorm = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor, **kwargs: Unpack[TransformersKwargs]) -> torch.Tensor:
        for layer in self.layers:
            hidden_states = layer(hidden_states, **kwargs)
        return self.layernorm(hidden_states)


class StellarFactorization(nn.Module):
    """
    Spatial-semantic factorization: each patch distributes one unit of mass over the r sparse tokens.

    With a temperature, the map is a softmax over cosine similarities of the projected tokens divided by the
    temperature; without one, over raw dot products divided by sqrt(d).
    """

    def __init__(self, config: StellarConfig):
        super().__init__()
        self.dense_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.sparse_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.temperature = config.spatial_temperature
        self.hidden_size = config.hidden_size

    def forward(self, dense_features: torch.Tensor, sparse_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            dense_features: `(B, N, d)`; sparse_tokens: `(B, r, d)`.

        Returns:
            spatial_map `(B, N, r)` and lowrank_features `(B, N, d)` = `spatial_map @ sparse_tokens`.
        """
        dense_projected = self.dense_proj(dense_features)
        sparse_projected = self.sparse_proj(sparse_tokens)
        if self.temperature is not None:
            dense_projected = F.normalize(dense_projected, dim=-1, eps=1e-7)
            sparse_projected = F.normalize(sparse_projected, dim=-1, eps=1e-7)
            scale = self.temperature
        else:
            scale = self.hidden_size**0.5
        spatial_map = (torch.bmm(dense_projected, sparse_projected.transpose(1, 2)) / scale).softmax(dim=-1)
        return spatial_map, torch.bmm(spatial_map, sparse_tokens)


# ----------------------------------------------------------------------------------------------------------------------
# Decoder and heads
# ----------------------------------------------------------------------------------------------------------------------


class StellarFourierPositionEncoding(nn.Module):
    """
    Fixed random Fourier features of patch centres: `(h, w)` -> `(h*w, D)`, rows in row-major patch order.

    A Gaussian matrix G `(2, D/2)` is drawn once and saved with the model (a buffer, not a parameter).
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.register_buffer("gaussian_matrix", torch.zeros(2, hidden_size // 2))

    def forward(self, height: int, width: int) -> torch.Tensor:
        device = self.gaussian_matrix.device
        rows = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
        columns = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
        grid_y, grid_x = torch.meshgrid(rows, columns, indexing="ij")
        coordinates = torch.stack((grid_x, grid_y), dim=-1).reshape(-1, 2) * 2 - 1
        phases = 2 * math.pi * (coordinates.to(self.gaussian_matrix.dtype) @ self.gaussian_matrix)
        # Interleaved (sin0, cos0, sin1, cos1, ...) as in the original, so released decoders keep working.
        return torch.stack((phases.sin(), phases.cos()), dim=-1).flatten(1)


class StellarDecoder(nn.Module):
    """Reconstruction decoder: low-rank features `(B, N, d)` -> decoder tokens `(B, N, d_dec)`."""

    def __init__(self, config: StellarConfig):
        super().__init__()
        self.decoder_proj = nn.Linear(config.hidden_size, config.decoder_hidden_size)
        self.position_encoding = StellarFourierPositionEncoding(config.decoder_hidden_size)
        self.transformer = StellarTransformer(
            config,
            config.decoder_hidden_size,
            config.decoder_num_hidden_layers,
            config.decoder_num_attention_heads,
            config.decoder_intermediate_size,
        )

    def forward(self, lowrank_features: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
        """`lowrank_features` `(B, h*w, d)` on a `grid_size = (h, w)` grid -> `(B, h*w, d_dec)`."""
        height, width = grid_size
        if lowrank_features.shape[1] != height * width:
            raise ValueError(f"{lowrank_features.shape[1]} tokens do not fill a {height}x{width} grid")
        hidden_states = self.decoder_proj(lowrank_features)
        hidden_states = hidden_states + self.position_encoding(height, width).to(hidden_states.dtype)
        return self.transformer(hidden_states)


def reconstruction_head_for(config: StellarConfig) -> nn.Module:
    """
    The head on the decoder tokens: pixel target, `ConvTranspose2d(d_dec -> C, kernel p, stride p)` on the token grid
    (p the encoder's patch size); VQ target, `Linear(d_dec -> V)` logits per patch.
    """
    if config.reconstruction_target == "pixel":
        return nn.ConvTranspose2d(
            config.decoder_hidden_size, config.num_channels, kernel_size=config.patch_size, stride=config.patch_size
        )
    return nn.Linear(config.decoder_hidden_size, config.vq_codebook_size)


class StellarPrototypes(nn.Linear):
    """Bias-free prototype layer `(..., prototype_dim) -> (..., num_prototypes)`; its own type so that
    `_init_weights` can give it the original's unit-Gaussian initialisation."""

    def __init__(self, prototype_dim: int, num_prototypes: int):
        super().__init__(prototype_dim, num_prototypes, bias=False)


class StellarClusteringHead(nn.Module):
    """
    Online-clustering head: predictor MLP, L2 normalisation, then bias-free prototypes.

    `(..., d)` -> logits `(..., num_prototypes)` in float32. The predictor has `predictor_num_layers` Linear layers
    with GELU between them (one Linear when 1).
    """

    def __init__(self, config: StellarConfig):
        super().__init__()
        layers = []
        in_features = config.hidden_size
        for _ in range(config.predictor_num_layers - 1):
            layers += [nn.Linear(in_features, config.predictor_hidden_size), nn.GELU()]
            in_features = config.predictor_hidden_size
        layers.append(nn.Linear(in_features, config.prototype_dim))
        self.predictor = nn.Sequential(*layers)
        self.prototypes = StellarPrototypes(config.prototype_dim, config.num_prototypes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        projected = F.normalize(self.predictor(tokens), dim=-1, eps=1e-7)
        return self.prototypes(projected).float()


# ----------------------------------------------------------------------------------------------------------------------
# Pretrained models
# ----------------------------------------------------------------------------------------------------------------------


# Every STELLAR head, by the transformers Auto class that loads it (written into each saved config).
STELLAR_AUTO_MAP = {
    "AutoConfig": "configuration_stellar.StellarConfig",
    "AutoModel": "modeling_stellar.StellarModel",
    "AutoModelForImageClassification": "modeling_stellar.StellarForImageClassification",
    "AutoModelForImageToImage": "modeling_stellar.StellarForImageReconstruction",
    "AutoModelForPreTraining": "modeling_stellar.StellarForPreTraining",
}

# Saved weights that belong to no model class: the EMA teacher of a pretraining run (`teacher.*`), training state
# that `stellar_hf.pretraining.StellarEMATeacher.from_pretrained` reads. Every class skips it without a report.
TRAINING_STATE_KEYS = [r"^teacher\."]
# Weights of the larger heads, which a smaller class loaded from their folders leaves behind on purpose.
DECODER_KEYS = [r"^decoder\.", r"^reconstruction_head\."]
CLUSTERING_KEYS = [r"clustering_head\."]


class StellarPreTrainedModel(PreTrainedModel):
    """Weight initialisation and the transformers contract shared by every STELLAR model."""

    config_class = StellarConfig
    config: StellarConfig
    base_model_prefix = "stellar"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["StellarEmbeddings", "StellarLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    _can_record_outputs = {"hidden_states": StellarLayer, "attentions": StellarAttention}
    _keys_to_ignore_on_load_unexpected = TRAINING_STATE_KEYS

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, StellarPrototypes):
            # Unit Gaussians, not normalised, as in the original.
            init.normal_(module.weight, mean=0.0, std=1.0)
        elif isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            init.trunc_normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, StellarEmbeddings):
            init.trunc_normal_(module.position_embeddings, mean=0.0, std=std)
            init.trunc_normal_(module.cls_token, mean=0.0, std=std)
            init.normal_(module.sparse_tokens, mean=0.0, std=self.config.hidden_size**-0.5)
        elif isinstance(module, StellarFourierPositionEncoding):
            init.normal_(module.gaussian_matrix, mean=0.0, std=1.0)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """
        `PreTrainedModel.save_pretrained`, with an `auto_map` in the saved config that names every STELLAR head, so
        that a folder saved from any of them loads each head with `trust_remote_code=True` in a process without
        stellar_hf. The model's own config is left as it was.
        """
        had_auto_map = hasattr(self.config, "auto_map")
        auto_map = getattr(self.config, "auto_map", None)
        self.config.auto_map = {**(auto_map or {}), **STELLAR_AUTO_MAP}
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            if had_auto_map:
                self.config.auto_map = auto_map
            else:
                del self.config.auto_map


class StellarModel(StellarPreTrainedModel):
    """
    STELLAR encoder plus the spatial-semantic factorization.

    Takes normalised `pixel_values` `(B, C, H, W)` (see [`StellarImageProcessor`]) and returns a
    [`StellarModelOutput`]: sparse tokens `(B, r, d)`, spatial map `(B, N, r)`, their product `(B, N, d)`, the dense
    patch tokens, the CLS token and `pooler_output`, the mean of the sparse tokens.
    """

    _keys_to_ignore_on_load_unexpected = TRAINING_STATE_KEYS + DECODER_KEYS + CLUSTERING_KEYS

    def __init__(self, config: StellarConfig, add_factorization: bool = True):
        r"""
        add_factorization (`bool`, defaults to `True`): build the spatial-semantic factorization. Heads that read
            only tokens (the linear probe, the EMA teacher) leave it out, so that every parameter they hold is used.
        """
        super().__init__(config)
        self.embeddings = StellarEmbeddings(config)
        self.encoder = StellarTransformer(
            config, config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.intermediate_size
        )
        self.factorization = StellarFactorization(config) if add_factorization else None
        self.post_init()

    def get_input_embeddings(self) -> StellarPatchEmbeddings:
        return self.embeddings.patch_embeddings

    def split_sequence(self, sequence: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(B, 1 + N + r, d)` -> CLS `(B, d)`, patches `(B, N, d)`, sparse tokens `(B, r, d)`."""
        num_sparse = self.config.num_sparse_tokens
        prefix = self.config.num_prefix_tokens
        return sequence[:, 0], sequence[:, prefix:-num_sparse], sequence[:, -num_sparse:]

    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        check_values: bool = True,
        **kwargs: Unpack[TransformersKwargs],
    ) -> StellarModelOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, C, H, W)`): normalised images; H and W multiples of the
                patch size.
            interpolate_pos_encoding (`bool`, *optional*): unlike ViT, whose default `False` refuses other sizes,
                the default `None` resizes the position embeddings whenever the image differs from
                `config.image_size` (as `True` does); `False` refuses other sizes, as in ViT.
            check_values (`bool`, defaults to `True`): refuse NaN, infinite and absurdly large pixel values with a
                `ValueError` (one reduction and a host sync). The pretraining step checks all its images at once
                and passes `False`.
            output_attentions, output_hidden_states, return_dict: as in every transformers model.
        """
        check_pixel_values(pixel_values, self.config.num_channels, self.config.patch_size, values=check_values)
        pixel_values = pixel_values.to(self.embeddings.patch_embeddings.projection.weight.dtype)
        embeddings = self.embeddings(pixel_values, interpolate_pos_encoding)
        sequence = self.encoder(embeddings, **kwargs)
        cls_embedding, dense_features, sparse_tokens = self.split_sequence(sequence)
        spatial_map = lowrank_features = None
        if self.factorization is not None:
            spatial_map, lowrank_features = self.factorization(dense_features, sparse_tokens)
        return StellarModelOutput(
            last_hidden_state=sequence,
            pooler_output=sparse_tokens.mean(dim=1),
            sparse_tokens=sparse_tokens,
            spatial_map=spatial_map,
            lowrank_features=lowrank_features,
            dense_features=dense_features,
            cls_embedding=cls_embedding,
        )

    def encode(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool | None = None,
        patch_keep_indices: torch.LongTensor | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        output_rows: torch.LongTensor | slice | None = None,
    ) -> tuple[torch.Tensor, tuple | None, tuple | None]:
        """Deprecated: `forward(...).last_hidden_state` (with `hidden_states` and `attentions`); the masked-view path
        (`patch_keep_indices`, `output_rows`) is `encode_view_rows`."""
        warnings.warn(
            "StellarModel.encode is deprecated: use model(pixel_values).last_hidden_state, or "
            "stellar_hf.modeling_stellar.encode_view_rows for the rows of masked views",
            FutureWarning,
            stacklevel=2,
        )
        if patch_keep_indices is not None or output_rows is not None:
            if output_attentions or output_hidden_states:
                raise ValueError("output_rows cannot be combined with output_attentions or output_hidden_states")
            check_pixel_values(pixel_values, self.config.num_channels, self.config.patch_size)
            rows = slice(None) if output_rows is None else output_rows
            return encode_view_rows(self, pixel_values, rows, patch_keep_indices), None, None
        output = self(
            pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        return output.last_hidden_state, output.hidden_states, output.attentions


class StellarForImageClassification(StellarPreTrainedModel):
    """
    The paper's linear probe: LayerNorm + Linear on `pooler_output` (the mean of the sparse tokens).

    `labels` `(B,)` give the loss of `self.loss_function` (cross-entropy, or MSE / BCE following
    `config.problem_type`, as in every transformers classifier).
    """

    # The probe reads the sparse tokens only; checkpoints of the other heads carry the factorization and more.
    _keys_to_ignore_on_load_unexpected = TRAINING_STATE_KEYS + DECODER_KEYS + CLUSTERING_KEYS + [r"factorization\."]

    def __init__(self, config: StellarConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.stellar = StellarModel(config, add_factorization=False)
        self.classifier_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ImageClassifierOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, C, H, W)`): normalised images.
            labels (`torch.LongTensor` of shape `(B,)`, *optional*): class indices in `[0, num_labels)` (-100 is
                ignored), or float targets for regression and multi-label problems.

        Returns:
            [`ImageClassifierOutput`] with `logits` `(B, num_labels)`.
        """
        outputs = self.stellar(
            pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, return_dict=True, **kwargs
        )
        logits = self.classifier(self.classifier_norm(outputs.pooler_output))
        loss = None
        if labels is not None:
            check_class_labels(labels, self.num_labels)
            # In float32 whatever the model's dtype, as the other STELLAR losses.
            loss = self.loss_function(labels, logits.float(), self.config, **kwargs)
        return ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


# ----------------------------------------------------------------------------------------------------------------------
# Decoding: low-rank features (or factors) -> image
# ----------------------------------------------------------------------------------------------------------------------


class StellarDecodingModel(StellarPreTrainedModel):
    """
    Base of the two classes with the reconstruction decoder, [`StellarForImageReconstruction`] and
    [`StellarForPreTraining`]: the encoder (`stellar`), the decoder and its head, and the one decode path.

    - [`decode_lowrank`]: low-rank features `(B, N, d)` -> the head's prediction (pixel target: the image; VQ target:
      code logits). Training losses read this.
    - [`reconstruct`]: factors (or low-rank features) -> image `(B, C, H, W)` on the [0, 1] scale; for the VQ target
      through the attached MaskGIT VQGAN ([`set_vq_tokenizer`], [`load_vq_tokenizer`]).
    - [`reconstruction_loss`]: MSE against the un-normalised input, or cross-entropy against VQ codes (`labels`, or
      the attached tokenizer's codes of the input).

    The VQGAN is attached explicitly and is never part of the weights, never loaded inside `forward`.
    """

    def __init__(self, config: StellarConfig):
        super().__init__(config)
        self.stellar = StellarModel(config)
        self.decoder = StellarDecoder(config)
        self.reconstruction_head = reconstruction_head_for(config)

    # -- the MaskGIT VQGAN tokenizer ---------------------------------------------------------------------------------

    # The frozen VQGAN is attached with `set_vq_tokenizer`, outside the module tree: state dicts, optimisers and
    # `.to()` never see it (it follows the features' device when used).
    _vq_tokenizer = None

    @property
    def vq_tokenizer(self):
        """The attached MaskGIT VQGAN (`MaskGitVQGANModel`), or `None`."""
        return self._vq_tokenizer

    def set_vq_tokenizer(self, tokenizer) -> None:
        """
        Attach a MaskGIT VQGAN for the VQ target: a `MaskGitVQGANModel`, or a folder / Hub id to load one from
        (`None` detaches). It is frozen and put in eval mode; it makes the codes of the input when no `labels` are
        given, and turns predicted codes into pixels.
        """
        if isinstance(tokenizer, (str, bytes)) or hasattr(tokenizer, "__fspath__"):
            from .modeling_maskgit_vqgan import MaskGitVQGANModel

            tokenizer = MaskGitVQGANModel.from_pretrained(tokenizer)
        if tokenizer is not None:
            tokenizer.eval().requires_grad_(False)
        # Set on the instance directly: as an `nn.Module` attribute it would become a submodule.
        object.__setattr__(self, "_vq_tokenizer", tokenizer)

    def load_vq_tokenizer(self, tokenizer=None):
        """
        Attach `tokenizer` (as [`set_vq_tokenizer`]) or, when it is `None` and none is attached, the one
        `config.vq_tokenizer_name_or_path` names; returns the attached tokenizer (`None` when there is none).
        """
        if tokenizer is not None:
            self.set_vq_tokenizer(tokenizer)
        elif self.vq_tokenizer is None and self.config.vq_tokenizer_name_or_path:
            self.set_vq_tokenizer(self.config.vq_tokenizer_name_or_path)
        return self.vq_tokenizer

    def _vq_tokenizer_on(self, device: torch.device):
        """The attached tokenizer, moved to `device`; `None` (with a one-time warning if the config names one)."""
        tokenizer = self.vq_tokenizer
        if tokenizer is None:
            if self.config.vq_tokenizer_name_or_path:
                logger.warning_once(
                    "config.vq_tokenizer_name_or_path names %s but no tokenizer is attached, so there are no pixels "
                    "(and no loss without labels); call model.load_vq_tokenizer() once: it is no longer loaded on "
                    "first use",
                    self.config.vq_tokenizer_name_or_path,
                )
            return None
        if tokenizer.device != device:
            tokenizer.to(device)
        return tokenizer

    def vq_labels(self, pixel_values: torch.Tensor) -> torch.LongTensor:
        """
        The VQ target's labels: the attached tokenizer's codes `(B, N)` of the un-normalised `pixel_values`
        `(B, C, H, W)`, resized to `config.vq_image_size` for 14-px patches (the released VQGAN's grid).
        """
        tokenizer = self._vq_tokenizer_on(pixel_values.device)
        if tokenizer is None:
            raise ValueError(
                "the VQ target's labels come from a MaskGIT VQGAN: attach one with model.set_vq_tokenizer(...) or "
                "model.load_vq_tokenizer(), or pass the codes as labels"
            )
        images = unnormalize(pixel_values, self.config)
        if self.config.patch_size == 14:
            size = self.config.vq_image_size
            images = F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False)
        with torch.no_grad():
            return tokenizer.encode(images.float())

    # -- the decode path ---------------------------------------------------------------------------------------------

    def decode_lowrank(self, lowrank_features: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
        """
        Decoder and head on low-rank features `(B, h*w, d)` laid out on a `grid_size = (h, w)` patch grid.

        Returns:
            pixel target: images `(B, C, h*p, w*p)` on the [0, 1] scale (raw, unclamped); VQ target: code logits
            `(B, h*w, V)`.
        """
        decoder_tokens = self.decoder(lowrank_features, grid_size)
        if self.config.reconstruction_target == "vq":
            return self.reconstruction_head(decoder_tokens)
        grid = decoder_tokens.transpose(1, 2).reshape(decoder_tokens.shape[0], -1, *grid_size)
        return self.reconstruction_head(grid)

    def prediction_to_pixels(self, prediction: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor | None:
        """
        Images `(B, C, H, W)` on the [0, 1] scale from [`decode_lowrank`]'s prediction: the prediction itself for the
        pixel target; for the VQ target the attached VQGAN's decoding of the argmax codes (`(B, 3, 16h, 16w)` for
        the released f16 tokenizer), or `None` without a tokenizer.
        """
        if self.config.reconstruction_target == "pixel":
            return prediction
        tokenizer = self._vq_tokenizer_on(prediction.device)
        if tokenizer is None:
            return None
        return tokenizer.decode(prediction.argmax(dim=-1).view(prediction.shape[0], *grid_size))

    def reconstruct(
        self,
        sparse_tokens: torch.Tensor | None = None,
        spatial_map: torch.Tensor | None = None,
        grid_size: tuple[int, int] | None = None,
        *,
        lowrank_features: torch.Tensor | None = None,
        vq_tokenizer=None,
    ) -> torch.Tensor:
        """
        Decode an image from its two factors, e.g. after editing "what" (tokens) or "where" (map), or from the
        low-rank features (their product, as `forward` returns them).

        Args:
            sparse_tokens: `(B, r, d)`, d = `config.hidden_size`; r may differ from `config.num_sparse_tokens` (tokens
                added or removed), as long as the map has one column per token.
            spatial_map: `(B, N, r)`, patch n's weights over the tokens in row n; rows need not be renormalised after
                editing.
            grid_size: `(h, w)` with `h * w = N`; defaults to a square grid.
            lowrank_features: `(B, N, d)`, instead of the two factors.
            vq_tokenizer: deprecated; attach the tokenizer once with [`set_vq_tokenizer`].

        Inputs are cast to the decoder's dtype, as `forward` casts `pixel_values` (float64 factors work).

        Returns:
            images `(B, C, H, W)` on the [0, 1] scale (VQ target: needs an attached tokenizer).

        Raises:
            `ValueError` naming the argument: not a floating-point tensor, wrong rank, mismatched batch or token
            count, d other than `config.hidden_size`, an empty dimension, NaN or infinite entries, a `grid_size`
            that does not hold N patches, or a VQ target without a tokenizer.
        """
        if vq_tokenizer is not None:
            warnings.warn(
                "reconstruct(vq_tokenizer=...) is deprecated: attach the tokenizer once with set_vq_tokenizer(...)",
                FutureWarning,
                stacklevel=2,
            )
            self.set_vq_tokenizer(vq_tokenizer)
        dtype = self.decoder.decoder_proj.weight.dtype
        if lowrank_features is None:
            check_factors(sparse_tokens, spatial_map, self.config.hidden_size)
            lowrank_features = torch.bmm(spatial_map.to(dtype), sparse_tokens.to(dtype))
        elif sparse_tokens is not None or spatial_map is not None:
            raise ValueError("pass either sparse_tokens and spatial_map, or lowrank_features, not both")
        else:
            check_lowrank_features(lowrank_features, self.config.hidden_size)
            lowrank_features = lowrank_features.to(dtype)
        grid_size = check_grid_size(grid_size, lowrank_features.shape[1])
        images = self.prediction_to_pixels(self.decode_lowrank(lowrank_features, grid_size), grid_size)
        if images is None:
            raise ValueError(
                "decoding VQ predictions to pixels needs the MaskGIT VQGAN: call model.set_vq_tokenizer(...) or "
                "model.load_vq_tokenizer() (which loads config.vq_tokenizer_name_or_path) first"
            )
        return images

    def reconstruction_loss(
        self, prediction: torch.Tensor, pixel_values: torch.Tensor, labels: torch.LongTensor | None = None
    ) -> torch.Tensor | None:
        """
        Pixel target: MSE of the image `prediction` `(B, C, H, W)` against the un-normalised `pixel_values`. VQ
        target: cross-entropy of the logits `(B, N, V)` against `labels` `(B, N)`, or against [`vq_labels`] when
        none are given and a tokenizer is attached; `None` without either.
        """
        if self.config.reconstruction_target == "pixel":
            return F.mse_loss(prediction.float(), unnormalize(pixel_values, self.config).float())
        if labels is None:
            if self._vq_tokenizer_on(pixel_values.device) is None:
                return None
            labels = self.vq_labels(pixel_values)
        if labels.shape != prediction.shape[:2]:
            raise ValueError(
                f"labels (VQ codes) of shape {tuple(labels.shape)} do not match the {prediction.shape[1]} predicted "
                "patches; the VQ grid must equal the encoder's patch grid"
            )
        return F.cross_entropy(prediction.float().transpose(1, 2), labels)

    # -- deprecated names --------------------------------------------------------------------------------------------

    def decode_tokens(self, decoder_tokens: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
        """Deprecated: [`decode_lowrank`] runs the decoder and this head together."""
        warnings.warn("decode_tokens is deprecated: use decode_lowrank(lowrank_features, grid_size)", FutureWarning, 2)
        if self.config.reconstruction_target == "vq":
            return self.reconstruction_head(decoder_tokens)
        return self.reconstruction_head(decoder_tokens.transpose(1, 2).reshape(decoder_tokens.shape[0], -1, *grid_size))

    def reconstruct_from_lowrank(self, lowrank_features, grid_size, vq_tokenizer=None):
        """Deprecated: `(images or None, logits or None)`; use [`decode_lowrank`] and [`reconstruct`]."""
        warnings.warn(
            "reconstruct_from_lowrank is deprecated: use decode_lowrank(...) for the prediction and "
            "reconstruct(lowrank_features=..., grid_size=...) for images",
            FutureWarning,
            stacklevel=2,
        )
        if vq_tokenizer is not None:
            self.set_vq_tokenizer(vq_tokenizer)
        prediction = self.decode_lowrank(lowrank_features, grid_size)
        logits = prediction if self.config.reconstruction_target == "vq" else None
        return self.prediction_to_pixels(prediction, grid_size), logits

    def get_vq_tokenizer(self, tokenizer=None, device: torch.device | None = None):
        """Deprecated: [`load_vq_tokenizer`] (attaches `tokenizer`, else the config's), moved to `device`."""
        warnings.warn("get_vq_tokenizer is deprecated: use load_vq_tokenizer(...)", FutureWarning, stacklevel=2)
        tokenizer = self.load_vq_tokenizer(tokenizer)
        if tokenizer is not None and device is not None:
            tokenizer.to(device)
        return tokenizer


def take_deprecated_vq_arguments(model: StellarDecodingModel, labels, kwargs: dict):
    """
    `labels`, after the deprecated keyword arguments of `forward` are taken out of `kwargs`: `target_codes` (now
    `labels`) and `vq_tokenizer` (now attached once with `set_vq_tokenizer`; a tokenizer instance is attached, a
    path is refused, since `forward` never loads one).
    """
    target_codes = kwargs.pop("target_codes", None)
    if target_codes is not None:
        warnings.warn("target_codes is deprecated: pass the VQ codes as labels", FutureWarning, stacklevel=3)
        if labels is None:
            labels = target_codes
    tokenizer = kwargs.pop("vq_tokenizer", None)
    if tokenizer is not None:
        if isinstance(tokenizer, (str, bytes)) or hasattr(tokenizer, "__fspath__"):
            raise ValueError(
                f"forward does not load tokenizers: attach it once with model.set_vq_tokenizer({str(tokenizer)!r})"
            )
        warnings.warn(
            "forward(vq_tokenizer=...) is deprecated: attach the tokenizer once with set_vq_tokenizer(...)",
            FutureWarning,
            stacklevel=3,
        )
        model.set_vq_tokenizer(tokenizer)
    return labels


class StellarForImageReconstruction(StellarDecodingModel):
    """
    STELLAR with its reconstruction decoder: image -> sparse tokens x spatial map -> decoder -> pixels or VQ logits.

    Use [`~StellarDecodingModel.reconstruct`] to decode edited factors. The VQ target takes the input's VQGAN codes as
    `labels` (as BEiT takes its tokenizer's codes), or makes them with an attached tokenizer.
    """

    # A pretraining folder also holds the clustering heads, unused here.
    _keys_to_ignore_on_load_unexpected = TRAINING_STATE_KEYS + CLUSTERING_KEYS

    def __init__(self, config: StellarConfig):
        super().__init__(config)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> StellarReconstructionOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, C, H, W)`): normalised images.
            labels (`torch.LongTensor` of shape `(B, N)`, *optional*): VQ target only: the VQGAN codes of the input,
                one per patch in row-major order; made with the attached tokenizer when omitted.
            interpolate_pos_encoding: as in [`StellarModel.forward`].
        """
        labels = take_deprecated_vq_arguments(self, labels, kwargs)
        outputs = self.stellar(
            pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, return_dict=True, **kwargs
        )
        grid_size = grid_size_of(pixel_values, self.config.patch_size)
        prediction = self.decode_lowrank(outputs.lowrank_features, grid_size)
        return StellarReconstructionOutput(
            loss=self.reconstruction_loss(prediction, pixel_values, labels),
            reconstruction=self.prediction_to_pixels(prediction, grid_size),
            logits=prediction if self.config.reconstruction_target == "vq" else None,
            sparse_tokens=outputs.sparse_tokens,
            spatial_map=outputs.spatial_map,
            lowrank_features=outputs.lowrank_features,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


# ----------------------------------------------------------------------------------------------------------------------
# Pretraining
# ----------------------------------------------------------------------------------------------------------------------


def last_layer_rows(layer: StellarLayer, hidden_states: torch.Tensor, rows: torch.LongTensor | slice) -> torch.Tensor:
    """
    `layer(hidden_states)[:, rows]`, computing only those rows: `(B, S, D) -> (B, R, D)`.

    Keys and values still come from every row; the queries, residuals and MLP run on `rows` only. Masked and local
    views read only their CLS and sparse tokens, so their last encoder layer needs no more. Under gradient
    checkpointing the rows are recomputed in backward, as the layer itself would be.
    """

    def rows_forward(hidden_states: torch.Tensor) -> torch.Tensor:
        normed = layer.layernorm_before(hidden_states)
        attention_output, _ = layer.attention(normed[:, rows], key_value_states=normed)
        hidden_states = hidden_states[:, rows] + layer.dropout(attention_output)
        return hidden_states + layer.dropout(layer.mlp(layer.layernorm_after(hidden_states)))

    if layer.gradient_checkpointing and layer.training and torch.is_grad_enabled():
        return checkpoint(rows_forward, hidden_states, use_reentrant=False)
    return rows_forward(hidden_states)


def encode_view_rows(
    model: StellarModel,
    pixel_values: torch.Tensor,
    rows: torch.LongTensor | slice,
    patch_keep_indices: torch.LongTensor | None = None,
) -> torch.Tensor:
    """
    The encoder sequence of views, only at `rows`, after the final LayerNorm: `(V, C, H, W)` -> `(V, R, d)`.

    Every layer but the last runs on the whole sequence `[CLS, kept patches, sparse]`; the last computes only `rows`
    ([`last_layer_rows`]). Position embeddings are interpolated for other sizes (local views). The values of
    `pixel_values` are not checked here: [`StellarForPreTraining.forward`] checks every view once.

    Args:
        model: the encoder.
        pixel_values: `(V, C, H, W)` views, normalised.
        rows: positions in the sequence (an index tensor or a slice).
        patch_keep_indices: `(V, N_keep)` patches each view keeps, or `None` for all.
    """
    pixel_values = pixel_values.to(model.embeddings.patch_embeddings.projection.weight.dtype)
    hidden_states = model.embeddings(pixel_values, patch_keep_indices=patch_keep_indices)
    *layers, last = model.encoder.layers
    for layer in layers:
        hidden_states = layer(hidden_states)
    return model.encoder.layernorm(last_layer_rows(last, hidden_states, rows))


_TEACHER_MOVED = (
    "the EMA teacher is no longer part of StellarForPreTraining: build it with "
    "stellar_hf.pretraining.StellarEMATeacher.from_student(model) (or .from_pretrained(folder, model) to keep a saved "
    "one), pass teacher_targets=teacher(pixel_values, global_views) to forward, and call "
    "teacher.update(model, teacher.momentum(step, total_steps)) after each optimiser step"
)


class StellarForPreTraining(StellarDecodingModel):
    """
    The full STELLAR objective (spec section 4): reconstruction of the main image from its own factors, online
    clustering of its sparse and CLS tokens with Sinkhorn-Knopp targets, masked global views whose sparse tokens are
    matched to the main image's by optimal transport, local views predicting the CLS targets, and KoLeo. `forward`
    runs these steps in order; each is a method or a `losses_stellar` function with its shapes in its docstring.

    Views are made by the data pipeline (see `stellar_hf.data.MultiViewTransform`); masking noise comes from the
    `mask_noise` argument or an explicit `generator`, so a step is reproducible. Sinkhorn statistics are all-reduced
    across processes when `torch.distributed` is initialised, so every rank must call `forward`.

    The targets come from the model itself (the paper's recipe), or, with `config.use_ema_teacher`, from an EMA
    teacher that the training loop owns and passes in as `teacher_targets` (`stellar_hf.pretraining`, as DINOv2
    keeps its teacher in the training side, not in the backbone). With `config.do_global_align` (spec section 4.1,
    off by default) the second global view of each image is also encoded, and the clustering losses of steps 2-3
    become the average of the two cross-view terms ([`global_alignment_losses`]).
    """

    # The EMA teacher's `teacher.*` tensors in a folder are training state: `StellarEMATeacher.from_pretrained`
    # reads them.
    _keys_to_ignore_on_load_unexpected = TRAINING_STATE_KEYS

    def __init__(self, config: StellarConfig):
        super().__init__(config)
        self.sparse_clustering_head = StellarClusteringHead(config)
        self.cls_clustering_head = StellarClusteringHead(config) if config.use_cls_clustering else None
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        global_views: torch.Tensor | None = None,
        local_views: torch.Tensor | None = None,
        mask_noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        labels: torch.LongTensor | None = None,
        teacher_targets: StellarPreTrainingTargets | None = None,
        **kwargs,
    ) -> StellarForPreTrainingOutput:
        r"""
        Args:
            pixel_values (`(B, C, H, W)`): the main images, normalised, without colour augmentation.
            global_views (`(B, M, C, H, W)`, *optional*): colour-augmented global views; the first
                `config.num_masked_views` are masked and encoded.
            local_views (`(B, K, C, s, s)`, *optional*): colour-augmented local views; the first
                `config.num_local_views` are encoded (a remainder of s beyond a multiple of the patch size is
                dropped, as the original's strided convolution does).
            mask_noise (`(B * M, N)`, *optional*): per-patch noise of each masked view (rows image-major); the
                lowest-noise patches are kept.
            generator (`torch.Generator`, *optional*): source of the masking noise when `mask_noise` is not given.
            labels (`(B, N)`, *optional*): VQ target only: the VQGAN codes of the main images, as in
                [`StellarForImageReconstruction`].
            teacher_targets ([`StellarPreTrainingTargets`], *optional*): targets made by an EMA teacher (required
                when `config.use_ema_teacher`); the model's own targets otherwise. Refused with
                `config.do_global_align`, whose targets come from the main image and its second global view.
        """
        labels = take_deprecated_vq_arguments(self, labels, kwargs)
        if self.config.use_ema_teacher and teacher_targets is None:
            raise ValueError(f"config.use_ema_teacher=True but no teacher_targets were passed; {_TEACHER_MOVED}")
        if self.config.do_global_align and teacher_targets is not None:
            raise ValueError(
                "config.do_global_align=True makes its targets from the main image and its second global view; "
                "teacher_targets cannot be used with it (spec section 4.1: only without the EMA teacher)"
            )
        config = self.config
        masked_views, local_crops = self.views_to_encode(pixel_values, global_views, local_views)
        image = self.stellar(pixel_values, check_values=False, return_dict=True)  # checked with the views above
        zero = image.sparse_tokens.new_zeros((), dtype=torch.float32)

        # 1. Reconstruction of the main image from its own low-rank features; KoLeo on its sparse tokens.
        prediction = self.decode_lowrank(image.lowrank_features, grid_size_of(pixel_values, config.patch_size))
        reconstruction_loss = self.reconstruction_loss(prediction, pixel_values, labels)
        if reconstruction_loss is None:
            raise ValueError(
                "the VQ reconstruction target needs labels (the VQGAN codes of pixel_values) or an attached MaskGIT "
                "VQGAN (model.set_vq_tokenizer(...) or model.load_vq_tokenizer())"
            )
        koleo = config.koleo_weight * koleo_loss(image.sparse_tokens)

        # 2-3. Online clustering of the main image's sparse and CLS tokens, against its own or a teacher's targets;
        # with second-view global alignment, across the main image and its second global view.
        if config.do_global_align:
            second_view = self.encode_second_view(self.second_global_view(global_views))
            targets, clustering_loss, cls_clustering_loss = self.global_alignment_losses(image, second_view)
        else:
            targets, clustering_loss, cls_clustering_loss = self.image_clustering_losses(image, teacher_targets)

        # 4. Masked global views: their sparse tokens predict the targets of the tokens they are matched to.
        mask_loss, masked_cls = zero, None
        if masked_views is not None:
            if mask_noise is None:
                mask_noise = self.draw_mask_noise(global_views, generator, masked_views.device)
            with_cls = targets.cls_assignments is not None
            masked_sparse, masked_cls = self.encode_masked_views(masked_views, mask_noise, with_cls)
            koleo = koleo + config.koleo_weight * koleo_loss(masked_sparse)
            masked_logits = self.sparse_clustering_head(masked_sparse)
            mask_loss = self.matched_clustering_loss(masked_sparse, masked_logits, targets.tokens, targets.assignments)

        # 5. The CLS of the masked and of the local views predicts the CLS targets.
        cls_loss = zero
        if targets.cls_assignments is not None:
            view_cls = [masked_cls] if masked_cls is not None else []
            if local_crops is not None:
                view_cls.append(self.encode_local_views(local_crops))
            if view_cls:
                cls_loss = self.view_cls_loss(view_cls, targets.cls_assignments)

        loss = (
            config.effective_reconstruction_weight * reconstruction_loss
            + koleo
            + clustering_loss
            + cls_clustering_loss
            + mask_loss
            + cls_loss
        )
        is_vq = config.reconstruction_target == "vq"
        return StellarForPreTrainingOutput(
            loss=loss,
            reconstruction_loss=reconstruction_loss,
            koleo_loss=koleo,
            clustering_loss=clustering_loss,
            cls_clustering_loss=cls_clustering_loss,
            mask_loss=mask_loss,
            cls_loss=cls_loss,
            reconstruction=None if is_vq else prediction,
            logits=prediction if is_vq else None,
            sparse_tokens=image.sparse_tokens,
            spatial_map=image.spatial_map,
            cls_embedding=image.cls_embedding,
            assignments=targets.assignments,
        )

    # -- the steps of `forward`, in order ----------------------------------------------------------------------------

    def views_to_encode(
        self,
        pixel_values: torch.Tensor,
        global_views: torch.Tensor | None,
        local_views: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """
        The views a step encodes, checked with the main images: every shape, then all values with one reduction per
        tensor and one host sync for the whole step (`ValueError` naming the argument).

        Args:
            pixel_values: `(B, C, H, W)`; global_views: `(B, M, C, H, W)` or `None`; local_views: `(B, K, C, s, s)`
                or `None`.

        Returns:
            the masked views `(B * M', C, H, W)`, M' = [`num_masked_views_in`], and the local views
            `(B * K', C, s', s')`, K' = min(K, `config.num_local_views`), s' the largest multiple of the patch size
            in s; rows image-major, `None` for no view.
        """
        config = self.config
        check_pixel_values(pixel_values, config.num_channels, config.patch_size, values=False)
        for name, views in (("global_views", global_views), ("local_views", local_views)):
            if views is not None and (
                not isinstance(views, torch.Tensor) or views.ndim != 5 or views.shape[0] != pixel_values.shape[0]
            ):
                shape = tuple(views.shape) if isinstance(views, torch.Tensor) else type(views).__name__
                raise ValueError(
                    f"{name} must be a 5-D tensor (batch={pixel_values.shape[0]}, views, channels, height, width), "
                    f"got {shape}"
                )
        masked_views = local_crops = None
        num_masked = self.num_masked_views_in(global_views)
        if num_masked > 0:
            masked_views = global_views[:, :num_masked].flatten(0, 1)
        num_local = min(config.num_local_views, local_views.shape[1]) if local_views is not None else 0
        if num_local > 0:
            # Local crops need not be a multiple of the patch size (96 px with 14-px patches): the original's strided
            # patch convolution ignores the remainder, so drop it here too.
            crops = local_views[:, :num_local].flatten(0, 1)
            height, width = (side - side % config.patch_size for side in crops.shape[-2:])
            local_crops = crops[..., :height, :width]
        encoded = {"pixel_values": pixel_values, "global_views": masked_views, "local_views": local_crops}
        encoded = {name: views for name, views in encoded.items() if views is not None}
        for name, views in encoded.items():
            check_pixel_values(views, config.num_channels, config.patch_size, name=name, values=False)
        check_input_values(encoded, PIXEL_VALUE_LIMIT, PIXEL_VALUE_LIMIT_REASON)
        return masked_views, local_crops

    def self_distillation_targets(
        self, sparse_tokens: torch.Tensor, sparse_logits: torch.Tensor, cls_logits: torch.Tensor | None
    ) -> StellarPreTrainingTargets:
        """
        The model's own targets (no teacher): its detached sparse tokens `(B, r, d)` and the Sinkhorn-Knopp
        assignments of its logits, `(B, r, C)` from `sparse_logits` and `(B, 1, C)` from `cls_logits` (`None`
        without CLS clustering), each over every token of the global batch.
        """
        temperature, iterations = self.config.sinkhorn_temperature, self.config.sinkhorn_iterations
        return StellarPreTrainingTargets(
            tokens=sparse_tokens.detach(),
            assignments=clustering_targets(sparse_logits, temperature, iterations),
            cls_assignments=clustering_targets(cls_logits, temperature, iterations) if cls_logits is not None else None,
        )

    def image_clustering_losses(
        self, image: StellarModelOutput, teacher_targets: StellarPreTrainingTargets | None
    ) -> tuple[StellarPreTrainingTargets, torch.Tensor, torch.Tensor]:
        """
        Online clustering of the main images (spec section 4, items 2-3): the sparse tokens `(B, r, d)` and CLS
        `(B, d)` of `image` through their heads, against `teacher_targets` or, without them, against the
        [`self_distillation_targets`] of those same logits.

        Returns:
            the targets every other loss of the step uses, the sparse-token loss (with a teacher, after matching the
            tokens to the teacher's, which read another view) and the CLS loss (0 without CLS clustering).
        """
        temperature = self.config.prediction_temperature
        sparse_logits = self.sparse_clustering_head(image.sparse_tokens)
        cls_logits = None
        if self.cls_clustering_head is not None:
            cls_logits = self.cls_clustering_head(image.cls_embedding.unsqueeze(1))
        if teacher_targets is None:
            targets = self.self_distillation_targets(image.sparse_tokens, sparse_logits, cls_logits)
            clustering_loss = clustering_cross_entropy(sparse_logits, targets.assignments, temperature)
        else:
            targets = teacher_targets
            if cls_logits is not None and targets.cls_assignments is None:
                raise ValueError("teacher_targets has no cls_assignments, but config.use_cls_clustering is on")
            clustering_loss = self.matched_clustering_loss(
                image.sparse_tokens, sparse_logits, targets.tokens, targets.assignments
            )
        cls_clustering_loss = sparse_logits.new_zeros((), dtype=torch.float32)
        if cls_logits is not None:
            cls_clustering_loss = clustering_cross_entropy(cls_logits, targets.cls_assignments, temperature)
        return targets, clustering_loss, cls_clustering_loss

    def second_global_view(self, global_views: torch.Tensor | None) -> torch.Tensor:
        """
        The second global view y of each image for [`global_alignment_losses`]: global view 1 of `global_views`
        `(B, M, C, H, W)` (colour-augmented, as the masked views see it), `(B, C, H, W)`. `ValueError` when there is
        none. Its shape and values were checked with the masked views (it is one of them when
        `config.num_masked_views >= 2`, which the config asks for); otherwise they are checked here.
        """
        if global_views is None or global_views.shape[1] < 2:
            found = "no global_views" if global_views is None else f"global_views of shape {tuple(global_views.shape)}"
            raise ValueError(
                "config.do_global_align=True needs a second global view of each image (global view 1): pass "
                f"global_views with at least 2 views per image, got {found}"
            )
        second_view = global_views[:, 1]
        if self.num_masked_views_in(global_views) < 2:
            check_pixel_values(second_view, self.config.num_channels, self.config.patch_size, name="global_views[:, 1]")
        return second_view

    def encode_second_view(self, view: torch.Tensor) -> StellarModelOutput:
        """
        The second global view `(B, C, H, W)` encoded in full (all patches kept): its CLS `(B, d)` as
        `cls_embedding` and its sparse tokens `(B, r, d)` as `sparse_tokens`, the only rows of the last layer computed
        (nothing else of this view is used).
        """
        config = self.config
        num_patches = math.prod(grid_size_of(view, config.patch_size))
        length = config.num_prefix_tokens + num_patches + config.num_sparse_tokens
        rows = torch.cat(
            (
                torch.zeros(1, dtype=torch.long, device=view.device),
                torch.arange(length - config.num_sparse_tokens, length, device=view.device),
            )
        )
        sequence = encode_view_rows(self.stellar, view, rows)
        return StellarModelOutput(cls_embedding=sequence[:, 0], sparse_tokens=sequence[:, 1:])

    def global_alignment_losses(
        self, image: StellarModelOutput, second_view: StellarModelOutput
    ) -> tuple[StellarPreTrainingTargets, torch.Tensor, torch.Tensor]:
        """
        Second-view global alignment (spec section 4.1, upstream `do_global_align`): steps 2-3 across the main
        images x and their second global views y, in place of [`image_clustering_losses`].

        Each view's sparse tokens `(B, r, d)` go through the sparse head, logits z_x and z_y `(B, r, C)`, and get
        their own Sinkhorn-Knopp targets Q_x and Q_y (each over every token of the global batch). The matcher pairs
        y's tokens (predictions) with x's detached tokens (targets): `idx[b, j]` is the token of x matched to token
        j of y. Then

            clustering_loss = (CE(z_x, Q_y gathered by idx) + CE(z_y, Q_x gathered by idx)) / 2,

        where "Q gathered by idx" has row j equal to `Q[b, idx[b, j]]`. The first term uses that same y -> x index
        to gather Q_y for the rows of x, as upstream does: it is a true re-pairing only when the match is an
        involution, and is kept as written. The CLS loss, without matching, is
        `(CE(cls_z_x, cls_Q_y) + CE(cls_z_y, cls_Q_x)) / 2` (0 without CLS clustering).

        Returns:
            x's own targets (its detached sparse tokens, Q_x and cls_Q_x), which the masked and local views keep
            predicting, the sparse-token loss and the CLS loss.
        """
        config = self.config
        temperature = config.prediction_temperature
        heads = [self.sparse_clustering_head(view.sparse_tokens) for view in (image, second_view)]
        cls_heads = [None, None]
        if self.cls_clustering_head is not None:
            cls_heads = [self.cls_clustering_head(view.cls_embedding.unsqueeze(1)) for view in (image, second_view)]
        (logits_x, logits_y), (cls_logits_x, cls_logits_y) = heads, cls_heads
        targets_x = self.self_distillation_targets(image.sparse_tokens, logits_x, cls_logits_x)
        targets_y = self.self_distillation_targets(second_view.sparse_tokens, logits_y, cls_logits_y)
        index, _ = match_tokens(
            second_view.sparse_tokens,
            targets_x.tokens,
            epsilon=config.matcher_epsilon,
            num_iterations=config.matcher_iterations,
        )  # (B, r): the token of x matched to each token of y
        clustering_loss = (
            clustering_cross_entropy(logits_x, gather_matched_targets(targets_y.assignments, index), temperature)
            + clustering_cross_entropy(logits_y, gather_matched_targets(targets_x.assignments, index), temperature)
        ) / 2
        cls_clustering_loss = logits_x.new_zeros((), dtype=torch.float32)
        if cls_logits_x is not None:
            cls_clustering_loss = (
                clustering_cross_entropy(cls_logits_x, targets_y.cls_assignments, temperature)
                + clustering_cross_entropy(cls_logits_y, targets_x.cls_assignments, temperature)
            ) / 2
        return targets_x, clustering_loss, cls_clustering_loss

    def matched_clustering_loss(
        self,
        predicted_tokens: torch.Tensor,
        predicted_logits: torch.Tensor,
        target_tokens: torch.Tensor,
        assignments: torch.Tensor,
    ) -> torch.Tensor:
        """
        `losses_stellar.matched_clustering_loss` with the config's temperature and matcher: each predicted token
        learns the clustering target of the target token it is matched to.

        Args:
            predicted_tokens: `(B * V, r, d)`, rows image-major; predicted_logits: `(B * V, r, C)`.
            target_tokens: `(B, r, d)`; assignments: `(B, r, C)`.
        """
        config = self.config
        return matched_clustering_loss(
            predicted_tokens,
            predicted_logits,
            target_tokens,
            assignments,
            temperature=config.prediction_temperature,
            epsilon=config.matcher_epsilon,
            num_iterations=config.matcher_iterations,
        )

    def num_masked_views_in(self, global_views: torch.Tensor | None) -> int:
        """How many of the `(B, M, C, H, W)` global views are masked and encoded (the first ones, at most
        `config.num_masked_views`)."""
        return min(self.config.num_masked_views, global_views.shape[1]) if global_views is not None else 0

    def draw_mask_noise(
        self,
        global_views: torch.Tensor | None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor | None:
        """
        Focal masking noise for the masked views among `global_views` `(B, M, C, H, W)`: `(B * M', N)` with M' of
        [`num_masked_views_in`] and N the patches of a view, rows image-major; `None` when no view is masked. Uses the
        config's focal probability and sigma range and draws from `generator` (see `losses_stellar.masking_noise`).

        Training loops can draw it outside the model and pass it as `mask_noise`, which keeps `forward` free of
        random number generators (one graph under `torch.compile`).
        """
        num_masked = self.num_masked_views_in(global_views)
        if num_masked == 0:
            return None
        grid_height, grid_width = grid_size_of(global_views[:, 0], self.config.patch_size)
        return masking_noise(
            global_views.shape[0] * num_masked,
            grid_height,
            grid_width,
            focal_probability=self.config.focal_masking_probability,
            sigma_range=tuple(self.config.focal_sigma_range),
            generator=generator,
            device=device,
        )

    def encode_masked_views(
        self, views: torch.Tensor, mask_noise: torch.Tensor, with_cls: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        Masked views (spec section 4, item 4): each of the `(V, C, H, W)` views keeps the `1 - mask_ratio` fraction of
        its patches with the lowest `mask_noise` `(V, N)`, and is encoded as `[CLS, kept patches, sparse]`.

        Returns:
            the views' sparse tokens `(V, r, d)` and, `with_cls`, their CLS `(V, d)` (else `None`). Only those rows
            of the last layer are computed.
        """
        config = self.config
        grid_height, grid_width = grid_size_of(views, config.patch_size)
        num_patches = grid_height * grid_width
        if mask_noise.shape != (views.shape[0], num_patches):
            raise ValueError(
                f"mask_noise must have shape {(views.shape[0], num_patches)} (views, patches), got "
                f"{tuple(mask_noise.shape)}"
            )
        keep_indices = kept_patch_indices(mask_noise.to(views.device), config.mask_ratio)
        length = config.num_prefix_tokens + keep_indices.shape[1] + config.num_sparse_tokens
        rows = torch.arange(length - config.num_sparse_tokens, length, device=views.device)
        if with_cls:
            rows = torch.cat((torch.zeros(1, dtype=torch.long, device=views.device), rows))
        sequence = encode_view_rows(self.stellar, views, rows, keep_indices)
        return sequence[:, -config.num_sparse_tokens :], (sequence[:, 0] if with_cls else None)

    def encode_local_views(self, views: torch.Tensor) -> torch.Tensor:
        """Local views (spec section 4, item 5) `(V, C, s, s)` -> their CLS `(V, d)`, the only row computed in the
        last layer; position embeddings interpolated to s."""
        return encode_view_rows(self.stellar, views, slice(0, 1))[:, 0]

    def view_cls_loss(self, view_cls: list[torch.Tensor], cls_assignments: torch.Tensor) -> torch.Tensor:
        """
        CLS tokens of groups of views predicting their image's CLS targets; the loss is the sum of each group's mean.

        Args:
            view_cls: one `(B * V_g, d)` tensor per group (masked views, local views), rows image-major.
            cls_assignments: `(B, 1, C)` targets of the B images.
        """
        # One head call for every group, then each group's mean on its own rows.
        logits = self.cls_clustering_head(torch.cat(view_cls).unsqueeze(1))
        loss = cls_assignments.new_zeros(())
        for group_logits, group in zip(logits.split([len(tokens) for tokens in view_cls]), view_cls):
            targets = cls_assignments.repeat_interleave(len(group) // len(cls_assignments), dim=0)
            loss = loss + clustering_cross_entropy(group_logits, targets, self.config.prediction_temperature)
        return loss

    # -- deprecated: the EMA teacher moved to `stellar_hf.pretraining` -----------------------------------------------

    @property
    def teacher(self) -> None:
        """Deprecated: always `None`; the EMA teacher lives in `stellar_hf.pretraining.StellarEMATeacher`."""
        warnings.warn(f"StellarForPreTraining.teacher is deprecated: {_TEACHER_MOVED}", FutureWarning, stacklevel=2)

    def update_teacher(self, momentum: float) -> None:
        """Removed: `StellarEMATeacher.update(model, momentum)`."""
        raise AttributeError(f"StellarForPreTraining.update_teacher was removed: {_TEACHER_MOVED}")

    def reset_teacher(self) -> None:
        """Removed: `StellarEMATeacher.from_student(model)`."""
        raise AttributeError(f"StellarForPreTraining.reset_teacher was removed: {_TEACHER_MOVED}")

    def teacher_momentum(self, step: int, total_steps: int) -> float:
        """Removed: `StellarEMATeacher.momentum(step, total_steps)`."""
        raise AttributeError(f"StellarForPreTraining.teacher_momentum was removed: {_TEACHER_MOVED}")


# Names of earlier versions, importable with a deprecation warning: the new name, in the module that holds it.
_DEPRECATED_NAMES = {
    "StellarTeacher": ("pretraining", "StellarEMATeacher"),
    "StellarReconstructionHeadMixin": ("modeling_stellar", "StellarDecodingModel"),
}


def __getattr__(name: str):
    if name not in _DEPRECATED_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module_name, new_name = _DEPRECATED_NAMES[name]
    warnings.warn(
        f"{name} is deprecated: use stellar_hf.{module_name}.{new_name}", FutureWarning, stacklevel=2
    )
    # Not a relative import statement: a remote-code copy of this file must not need the training-side module.
    module = importlib.import_module(f"{__package__}.{module_name}")
    return getattr(module, new_name)


__all__ = [
    "STELLAR_AUTO_MAP",
    "StellarClusteringHead",
    "StellarDecodingModel",
    "StellarForImageClassification",
    "StellarForImageReconstruction",
    "StellarForPreTraining",
    "StellarForPreTrainingOutput",
    "StellarModel",
    "StellarModelOutput",
    "StellarPreTrainedModel",
    "StellarPreTrainingTargets",
    "StellarPrototypes",
    "StellarReconstructionOutput",
]
