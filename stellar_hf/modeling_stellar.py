"""PyTorch STELLAR: sparse semantic tokens ("what") times a spatial assignment map ("where")."""

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput

from .configuration_stellar import StellarConfig
from .losses_stellar import (
    clustering_cross_entropy,
    gather_matched_targets,
    koleo_loss,
    masking_noise,
    match_tokens,
    num_kept_patches,
    sinkhorn_knopp,
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
            cross-entropy against the VQGAN codes of the input (VQ target, when codes or a tokenizer are available).
        reconstruction (`torch.FloatTensor` of shape `(B, C, H, W)`, *optional*): the image on the [0, 1] scale. Pixel
            target: the head's raw, unclamped output. VQ target: the VQGAN decoding of the argmax codes, when a
            tokenizer is available.
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


def check_finite(tensor: torch.Tensor, name: str, limit: float | None = None, why: str = "") -> None:
    """
    Raise `ValueError` when `tensor` (non-empty, floating point) holds NaN, an infinity or, with `limit`, a value of
    magnitude above `limit`; the message says what was found and, for the bound, `why` it is refused.

    One `aminmax` reduction and one host sync on the passing path: NaN propagates through min and max, and fails
    every comparison, so the single bound test below also catches NaN and infinities.
    """
    lowest, highest = torch.aminmax(tensor.detach())
    bound = torch.finfo(tensor.dtype).max if limit is None else limit
    if bool((lowest >= -bound) & (highest <= bound)):
        return
    lowest, highest = lowest.item(), highest.item()
    if not (math.isfinite(lowest) and math.isfinite(highest)):
        raise ValueError(f"{name} contains NaN or infinite values (min {lowest}, max {highest})")
    raise ValueError(
        f"{name} holds values of magnitude up to {max(-lowest, highest):.3g} (min {lowest:.3g}, max {highest:.3g}), "
        f"beyond the limit of {limit:g}{why}"
    )


def check_pixel_values(pixel_values: torch.Tensor, num_channels: int, patch_size: int) -> None:
    """
    Raise `ValueError` with the reason when `pixel_values` cannot be encoded.

    Args:
        pixel_values: expected `(B, num_channels, H, W)` with B >= 1, H and W positive multiples of `patch_size`,
            floating point, finite and within `PIXEL_VALUE_LIMIT` in magnitude (normalised images; see the constant
            for why larger values are refused). The value checks cost one reduction and are skipped under
            `torch.compile` (a data-dependent branch would break the graph).
    """
    if not isinstance(pixel_values, torch.Tensor):
        raise ValueError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
    if not pixel_values.is_floating_point():
        raise ValueError(
            f"pixel_values must be a floating-point tensor of normalised images, got {pixel_values.dtype}; "
            "use StellarImageProcessor to turn images into pixel_values"
        )
    if pixel_values.ndim != 4:
        raise ValueError(
            f"pixel_values must be a 4-D tensor (batch, channels, height, width), got shape {tuple(pixel_values.shape)}"
        )
    batch_size, channels, height, width = pixel_values.shape
    if batch_size == 0:
        # Refused rather than answered with empty outputs: the pretraining losses (means, Sinkhorn) have no value
        # for an empty batch, and one rule for every model class is simpler to rely on.
        raise ValueError(
            f"pixel_values has an empty batch (shape {tuple(pixel_values.shape)}); pass at least one image"
        )
    if channels != num_channels:
        raise ValueError(f"pixel_values has {channels} channels but the model expects {num_channels}")
    if height < patch_size or width < patch_size:
        raise ValueError(f"image of {height}x{width} pixels is smaller than one {patch_size}x{patch_size} patch")
    if height % patch_size or width % patch_size:
        raise ValueError(f"image sides ({height}x{width}) must be multiples of the patch size {patch_size}")
    if not torch.compiler.is_compiling():
        check_finite(
            pixel_values,
            "pixel_values",
            PIXEL_VALUE_LIMIT,
            why=(
                ": normalised images lie within a few units of 0 (ImageNet statistics map [0, 1] images to "
                "[-2.12, 2.64]), and values this large overflow the encoder (its LayerNorm squares the patch "
                "embeddings) to NaN; normalise the images with StellarImageProcessor"
            ),
        )


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
    if not torch.compiler.is_compiling():
        check_finite(sparse_tokens, "sparse_tokens")
        check_finite(spatial_map, "spatial_map")


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

    def forward(self, pixel_values: torch.Tensor, keep_indices: torch.LongTensor | None = None) -> torch.Tensor:
        """
        Args:
            pixel_values: `(B, C, H, W)`; a remainder of H or W beyond a multiple of the patch size is ignored, as
                the strided convolution does.
            keep_indices: `(B, N_keep)` row-major indices of the patches to embed, or `None` for all N.

        Returns:
            `(B, N, d)`, or `(B, N_keep, d)` in the order of `keep_indices`.
        """
        if keep_indices is None:
            return self.projection(pixel_values).flatten(2).transpose(1, 2)
        # The strided convolution is one matmul per patch: project only the kept patches (masked views keep 20%),
        # read straight from the unfolded view so that only they are copied.
        batch_size, channels = pixel_values.shape[:2]
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
    like registers. Masked views keep a subset of the patches after the position embeddings are added.
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
            interpolate_pos_encoding: `None` interpolates whenever the size differs from `config.image_size`;
                `False` refuses other sizes.
            patch_keep_indices: `(B, N_keep)` indices of the patches to keep (masked views), or `None` for all.

        Returns:
            `(B, 1 + N_keep + r, d)` embeddings.
        """
        batch_size, _, height, width = pixel_values.shape
        patches = self.patch_embeddings(pixel_values, patch_keep_indices)
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
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Plain softmax attention.

    Args:
        query, key, value: `(B, heads, S, head_dim)`.
        attention_mask: additive mask broadcastable to `(B, heads, S, S)`, or `None`.

    Returns:
        output `(B, S, heads, head_dim)` and probabilities `(B, heads, S, S)`.
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
        output_attentions: bool = False,
        query_rows: torch.LongTensor | slice | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        `(B, S, D)` -> `(B, S, D)` and, when asked, the attention probabilities `(B, heads, S, S)`. With
        `query_rows` (an index tensor or slice over S), only those rows attend, to every row: `(B, S_q, D)` and
        probabilities `(B, heads, S_q, S)`.
        """
        batch_size, length, _ = hidden_states.shape
        queries = hidden_states if query_rows is None else hidden_states[:, query_rows]
        shape = (batch_size, length, self.num_heads, self.head_dim)
        query = self.q_proj(queries).view(batch_size, queries.shape[1], self.num_heads, self.head_dim).transpose(1, 2)
        key = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        attention_function: Callable = eager_attention_forward
        # Fused kernels do not return the probabilities, so a call that asks for them runs the eager path.
        if not output_attentions:
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
        )
        output = self.o_proj(output.reshape(batch_size, queries.shape[1], -1))
        return output, probabilities if output_attentions else None


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

    def forward(
        self,
        hidden_states: torch.Tensor,
        output_attentions: bool = False,
        output_rows: torch.LongTensor | slice | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`(B, S, D)` -> `(B, S, D)`, or `(B, S_out, D)` for `output_rows` (keys and values still use every row)."""
        attention_output, probabilities = self.attention(
            self.layernorm_before(hidden_states), output_attentions, query_rows=output_rows
        )
        if output_rows is not None:
            hidden_states = hidden_states[:, output_rows]
        hidden_states = hidden_states + self.dropout(attention_output)
        hidden_states = hidden_states + self.dropout(self.mlp(self.layernorm_after(hidden_states)))
        return hidden_states, probabilities


class StellarTransformer(nn.Module):
    """A stack of [`StellarLayer`] followed by a LayerNorm; used as encoder and as decoder."""

    def __init__(self, config: StellarConfig, hidden_size: int, num_layers: int, num_heads: int, intermediate_size: int):
        super().__init__()
        self.layers = nn.ModuleList(
            StellarLayer(config, hidden_size, num_heads, intermediate_size) for _ in range(num_layers)
        )
        self.layernorm = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        output_rows: torch.LongTensor | slice | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None, tuple[torch.Tensor, ...] | None]:
        """
        Args:
            hidden_states: `(B, S, D)`.
            output_rows: the rows to return (an index tensor or a slice over S), or `None` for all. Only the last
                layer skips the other rows (its keys and values still come from every row). Refused together with
                `output_attentions` or `output_hidden_states`.

        Returns:
            the normalised sequence `(B, S, D)` (`(B, S_out, D)` with `output_rows`); the input and each layer's
            output (`num_layers + 1` tensors, the last before the final LayerNorm) when `output_hidden_states`; each
            layer's attention probabilities when `output_attentions`.
        """
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        if output_rows is not None and (output_attentions or output_hidden_states):
            raise ValueError("output_rows cannot be combined with output_attentions or output_hidden_states")
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            # Only the last layer can skip rows: every earlier output is a key and value of the next layer.
            rows = output_rows if index == last else None
            hidden_states, probabilities = layer(hidden_states, output_attentions=output_attentions, output_rows=rows)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (probabilities,)
        return self.layernorm(hidden_states), all_hidden_states, all_attentions


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
        return self.transformer(hidden_states)[0]


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
        """`PreTrainedModel.save_pretrained`, plus an `auto_map` naming every STELLAR head, so that a folder saved
        from any of them loads each head with `trust_remote_code=True` in a process without stellar_hf."""
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **STELLAR_AUTO_MAP}
        return super().save_pretrained(save_directory, *args, **kwargs)


class StellarModel(StellarPreTrainedModel):
    """
    STELLAR encoder plus the spatial-semantic factorization.

    Takes normalised `pixel_values` `(B, C, H, W)` (see [`StellarImageProcessor`]) and returns a
    [`StellarModelOutput`]: sparse tokens `(B, r, d)`, spatial map `(B, N, r)`, their product `(B, N, d)`, the dense
    patch tokens, the CLS token and `pooler_output`, the mean of the sparse tokens.
    """

    # Loading the encoder out of a reconstruction or pretraining folder leaves these behind on purpose.
    _keys_to_ignore_on_load_unexpected = [r"^decoder\.", r"^reconstruction_head\.", r"clustering_head\.", r"^teacher\."]

    def __init__(self, config: StellarConfig, add_factorization: bool = True):
        r"""
        add_factorization (`bool`, defaults to `True`): build the spatial-semantic factorization. Heads that read
            only tokens (the linear probe) leave it out, so that every parameter they hold gets a gradient.
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

    def encode(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool | None = None,
        patch_keep_indices: torch.LongTensor | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        output_rows: torch.LongTensor | slice | None = None,
    ) -> tuple[torch.Tensor, tuple | None, tuple | None]:
        """
        Run the encoder only (no factorization), as masked and local views need.

        Args:
            pixel_values: `(B, C, H, W)`, normalised.
            patch_keep_indices: `(B, N_keep)` patches to keep, or `None` for all N.
            output_rows: positions of the sequence to return (an index tensor or a slice), or `None` for all. The
                last layer then computes only those rows (its keys and values still come from every row), which
                is what masked and local views need: their CLS and sparse tokens. Not with attentions or hidden
                states.

        Returns:
            the sequence `(B, 1 + N_keep + r, d)` (or `(B, len(output_rows), d)`) after the final LayerNorm, hidden
            states and attentions.
        """
        check_pixel_values(pixel_values, self.config.num_channels, self.config.patch_size)
        pixel_values = pixel_values.to(self.embeddings.patch_embeddings.projection.weight.dtype)
        embeddings = self.embeddings(pixel_values, interpolate_pos_encoding, patch_keep_indices)
        return self.encoder(embeddings, output_attentions, output_hidden_states, output_rows=output_rows)

    def split_sequence(self, sequence: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(B, 1 + N + r, d)` -> CLS `(B, d)`, patches `(B, N, d)`, sparse tokens `(B, r, d)`."""
        num_sparse = self.config.num_sparse_tokens
        prefix = self.config.num_prefix_tokens
        return sequence[:, 0], sequence[:, prefix:-num_sparse], sequence[:, -num_sparse:]

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> StellarModelOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, C, H, W)`): normalised images; H and W multiples of the
                patch size.
            interpolate_pos_encoding (`bool`, *optional*): `None` (default) resizes the position embeddings whenever
                the image differs from `config.image_size`; `False` refuses other sizes.
            output_attentions, output_hidden_states, return_dict: as in every transformers model.
        """
        if pixel_values is None:
            raise ValueError("pixel_values is required")
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        return_dict = self.config.return_dict if return_dict is None else return_dict
        sequence, hidden_states, attentions = self.encode(
            pixel_values,
            interpolate_pos_encoding,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        cls_embedding, dense_features, sparse_tokens = self.split_sequence(sequence)
        spatial_map = lowrank_features = None
        if self.factorization is not None:
            spatial_map, lowrank_features = self.factorization(dense_features, sparse_tokens)
        output = StellarModelOutput(
            last_hidden_state=sequence,
            pooler_output=sparse_tokens.mean(dim=1),
            sparse_tokens=sparse_tokens,
            spatial_map=spatial_map,
            lowrank_features=lowrank_features,
            dense_features=dense_features,
            cls_embedding=cls_embedding,
            hidden_states=hidden_states,
            attentions=attentions,
        )
        return output if return_dict else output.to_tuple()


# Every STELLAR head, by the transformers Auto class that loads it (written into each saved config).
STELLAR_AUTO_MAP = {
    "AutoConfig": "configuration_stellar.StellarConfig",
    "AutoModel": "modeling_stellar.StellarModel",
    "AutoModelForImageClassification": "modeling_stellar.StellarForImageClassification",
    "AutoModelForImageToImage": "modeling_stellar.StellarForImageReconstruction",
    "AutoModelForPreTraining": "modeling_stellar.StellarForPreTraining",
}


def grid_size_of(pixel_values: torch.Tensor, patch_size: int) -> tuple[int, int]:
    """`(B, C, H, W)` -> the patch grid `(H / p, W / p)`."""
    return pixel_values.shape[-2] // patch_size, pixel_values.shape[-1] // patch_size


def unnormalize(pixel_values: torch.Tensor, config: StellarConfig) -> torch.Tensor:
    """Undo the image processor's normalisation: `(B, C, H, W)` normalised -> `(B, C, H, W)` on the [0, 1] scale."""
    mean = torch.tensor(config.image_mean, device=pixel_values.device, dtype=pixel_values.dtype).view(1, -1, 1, 1)
    std = torch.tensor(config.image_std, device=pixel_values.device, dtype=pixel_values.dtype).view(1, -1, 1, 1)
    return pixel_values * std + mean


class StellarReconstructionHeadMixin:
    """
    The decoder, the reconstruction head and the VQ tokenizer plumbing, shared by the reconstruction and
    pretraining models. Expects `self.config`, `self.decoder` and `self.reconstruction_head`.
    """

    def build_reconstruction_modules(self, config: StellarConfig) -> None:
        self.decoder = StellarDecoder(config)
        if config.reconstruction_target == "pixel":
            self.reconstruction_head = nn.ConvTranspose2d(
                config.decoder_hidden_size, config.num_channels, kernel_size=config.patch_size, stride=config.patch_size
            )
        else:
            self.reconstruction_head = nn.Linear(config.decoder_hidden_size, config.vq_codebook_size)
        # The frozen VQGAN is not part of this model's weights; kept outside the module tree so that
        # state dicts, `.to()` and optimisers never see it.
        self.__dict__["_vq_tokenizer"] = None

    def set_vq_tokenizer(self, tokenizer) -> None:
        """Attach a MaskGIT VQGAN (a `MaskGitVQGANModel` or a folder / Hub id) for VQ targets and decoding."""
        if isinstance(tokenizer, str):
            from .modeling_maskgit_vqgan import MaskGitVQGANModel

            tokenizer = MaskGitVQGANModel.from_pretrained(tokenizer)
        if tokenizer is not None:
            tokenizer.eval().requires_grad_(False)
        self.__dict__["_vq_tokenizer"] = tokenizer

    def get_vq_tokenizer(self, tokenizer=None, device: torch.device | None = None):
        """
        The tokenizer to use: the one passed in (an instance, or a folder / Hub id, which is then attached), else the
        attached one, else the one named by `config.vq_tokenizer_name_or_path` (loaded once); `None` if there is none.
        """
        if tokenizer is None and self.__dict__["_vq_tokenizer"] is None:
            tokenizer = self.config.vq_tokenizer_name_or_path
        if isinstance(tokenizer, str):
            self.set_vq_tokenizer(tokenizer)
            tokenizer = None
        if tokenizer is None:
            tokenizer = self.__dict__["_vq_tokenizer"]
        else:
            tokenizer.eval().requires_grad_(False)
        if tokenizer is not None and device is not None and tokenizer.device != device:
            tokenizer.to(device)
        return tokenizer

    def decode_tokens(self, decoder_tokens: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
        """
        Apply the reconstruction head.

        Args:
            decoder_tokens: `(B, h*w, d_dec)`.

        Returns:
            pixel target: images `(B, C, h*p, w*p)` on the [0, 1] scale (raw, unclamped); VQ target: logits
            `(B, h*w, codebook_size)`.
        """
        if self.config.reconstruction_target == "vq":
            return self.reconstruction_head(decoder_tokens)
        height, width = grid_size
        grid = decoder_tokens.transpose(1, 2).reshape(decoder_tokens.shape[0], -1, height, width)
        return self.reconstruction_head(grid)

    def reconstruct_from_lowrank(
        self, lowrank_features: torch.Tensor, grid_size: tuple[int, int], vq_tokenizer=None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """
        Decode low-rank features `(B, h*w, d)` on a `(h, w)` grid.

        Returns:
            `(reconstruction, logits)`: pixel target -> images `(B, C, h*p, w*p)` and `None`; VQ target -> the VQGAN
            decoding `(B, C, H, W)` of the argmax codes (or `None` without a tokenizer) and logits `(B, h*w, V)`.
        """
        prediction = self.decode_tokens(self.decoder(lowrank_features, grid_size), grid_size)
        if self.config.reconstruction_target == "pixel":
            return prediction, None
        tokenizer = self.get_vq_tokenizer(vq_tokenizer, prediction.device)
        if tokenizer is None:
            return None, prediction
        codes = prediction.argmax(dim=-1).view(prediction.shape[0], *grid_size)
        return tokenizer.decode(codes), prediction

    def vq_targets(self, images: torch.Tensor, tokenizer) -> torch.LongTensor:
        """VQGAN codes `(B, N)` of `images` `(B, C, H, W)` in [0, 1]; resized to `vq_image_size` for 14-px patches."""
        if self.config.patch_size == 14:
            size = self.config.vq_image_size
            images = F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False)
        with torch.no_grad():
            return tokenizer.encode(images.float())

    def reconstruction_loss(
        self,
        prediction: torch.Tensor,
        pixel_values: torch.Tensor,
        target_codes: torch.LongTensor | None = None,
        vq_tokenizer=None,
    ) -> torch.Tensor | None:
        """
        Pixel target: MSE of `prediction` `(B, C, H, W)` against the un-normalised `pixel_values`. VQ target:
        cross-entropy of the logits `(B, N, V)` against `target_codes` `(B, N)`, made with the tokenizer when not
        given; `None` when neither codes nor a tokenizer are available.
        """
        if self.config.reconstruction_target == "pixel":
            return F.mse_loss(prediction.float(), unnormalize(pixel_values, self.config).float())
        if target_codes is None:
            tokenizer = self.get_vq_tokenizer(vq_tokenizer, pixel_values.device)
            if tokenizer is None:
                return None
            target_codes = self.vq_targets(unnormalize(pixel_values, self.config), tokenizer)
        if target_codes.shape != prediction.shape[:2]:
            raise ValueError(
                f"target_codes of shape {tuple(target_codes.shape)} do not match the {prediction.shape[1]} "
                "predicted patches; the VQ grid must equal the encoder's patch grid"
            )
        return F.cross_entropy(prediction.float().transpose(1, 2), target_codes)


class StellarForImageReconstruction(StellarReconstructionHeadMixin, StellarPreTrainedModel):
    """
    STELLAR with its reconstruction decoder: image -> sparse tokens x spatial map -> decoder -> pixels or VQ logits.

    Use [`~StellarForImageReconstruction.reconstruct`] to decode edited factors.
    """

    # A pretraining folder also holds the clustering heads (and maybe the EMA teacher), unused here.
    _keys_to_ignore_on_load_unexpected = [r"clustering_head\.", r"^teacher\."]

    def __init__(self, config: StellarConfig):
        super().__init__(config)
        self.stellar = StellarModel(config)
        self.build_reconstruction_modules(config)
        self.post_init()

    def reconstruct(
        self,
        sparse_tokens: torch.Tensor,
        spatial_map: torch.Tensor,
        grid_size: tuple[int, int] | None = None,
        vq_tokenizer=None,
    ) -> torch.Tensor:
        """
        Decode an image from its two factors, e.g. after editing "what" (tokens) or "where" (map).

        Args:
            sparse_tokens: `(B, r, d)`, d = `config.hidden_size`; r may differ from `config.num_sparse_tokens` (tokens
                added or removed), as long as the map has one column per token.
            spatial_map: `(B, N, r)`, patch n's weights over the tokens in row n; rows need not be renormalised after
                editing.
            grid_size: `(h, w)` with `h * w = N`; defaults to a square grid.

        Both factors are cast to the decoder's dtype, as `forward` casts `pixel_values` (float64 factors work).

        Returns:
            images `(B, C, H, W)` on the [0, 1] scale (VQ target: needs a tokenizer).

        Raises:
            `ValueError` naming the argument: not a floating-point tensor, wrong rank, mismatched batch or token
            count, d other than `config.hidden_size`, an empty dimension, NaN or infinite entries, or a `grid_size`
            that does not hold N patches.
        """
        check_factors(sparse_tokens, spatial_map, self.config.hidden_size)
        num_patches = spatial_map.shape[1]
        if grid_size is None:
            side = math.isqrt(num_patches)
            if side * side != num_patches:
                raise ValueError(f"{num_patches} patches are not a square grid; pass grid_size=(height, width)")
            grid_size = (side, side)
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
        dtype = self.decoder.decoder_proj.weight.dtype
        lowrank_features = torch.bmm(spatial_map.to(dtype), sparse_tokens.to(dtype))
        reconstruction, _ = self.reconstruct_from_lowrank(lowrank_features, grid_size, vq_tokenizer)
        if reconstruction is None:
            raise ValueError(
                "decoding VQ predictions to pixels needs the MaskGIT VQGAN: pass vq_tokenizer=..., call "
                "set_vq_tokenizer(...) or set config.vq_tokenizer_name_or_path"
            )
        return reconstruction

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        target_codes: torch.LongTensor | None = None,
        vq_tokenizer=None,
        interpolate_pos_encoding: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> StellarReconstructionOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, C, H, W)`): normalised images.
            target_codes (`torch.LongTensor` of shape `(B, N)`, *optional*): VQ target only: the VQGAN codes of the
                input; made with the tokenizer when omitted and one is available.
            vq_tokenizer (`MaskGitVQGANModel` or `str`, *optional*): VQ target only: the tokenizer to use.
        """
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.stellar(
            pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        grid_size = grid_size_of(pixel_values, self.config.patch_size)
        reconstruction, logits = self.reconstruct_from_lowrank(outputs.lowrank_features, grid_size, vq_tokenizer)
        prediction = reconstruction if self.config.reconstruction_target == "pixel" else logits
        loss = self.reconstruction_loss(prediction, pixel_values, target_codes, vq_tokenizer)
        output = StellarReconstructionOutput(
            loss=loss,
            reconstruction=reconstruction,
            logits=logits,
            sparse_tokens=outputs.sparse_tokens,
            spatial_map=outputs.spatial_map,
            lowrank_features=outputs.lowrank_features,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return output if return_dict else output.to_tuple()


class StellarForImageClassification(StellarPreTrainedModel):
    """
    The paper's linear probe: LayerNorm + Linear on `pooler_output` (the mean of the sparse tokens).

    `labels` `(B,)` give a cross-entropy loss (or MSE / BCE following `config.problem_type`, as in transformers).
    """

    # The probe reads the sparse tokens only; checkpoints of the other heads carry the factorization and more.
    _keys_to_ignore_on_load_unexpected = [
        r"factorization\.", r"^decoder\.", r"^reconstruction_head\.", r"clustering_head\.", r"^teacher\."
    ]

    def __init__(self, config: StellarConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.stellar = StellarModel(config, add_factorization=False)
        self.classifier_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, C, H, W)`): normalised images.
            labels (`torch.LongTensor` of shape `(B,)`, *optional*): class indices in `[0, num_labels)`.

        Returns:
            [`ImageClassifierOutput`] with `logits` `(B, num_labels)`.
        """
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.stellar(
            pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        logits = self.classifier(self.classifier_norm(outputs.pooler_output))
        loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            problem_type = self.config.problem_type
            if problem_type is None:
                if self.num_labels == 1:
                    problem_type = "regression"
                elif labels.dtype in (torch.long, torch.int):
                    problem_type = "single_label_classification"
                else:
                    problem_type = "multi_label_classification"
            if problem_type == "regression":
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.float().view(-1))
            elif problem_type == "single_label_classification":
                if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_labels):
                    raise ValueError(f"labels must lie in [0, {self.num_labels}), got {labels.tolist()}")
                loss = F.cross_entropy(logits.float(), labels.view(-1))
            else:
                loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float())
        output = ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
        return output if return_dict else output.to_tuple()


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
        clustering_loss, cls_clustering_loss (`()`): online clustering of the main image's sparse / CLS tokens.
        mask_loss (`()`): masked-view sparse tokens predicting their matched targets (0 without global views).
        cls_loss (`()`): masked-view and local-view CLS predicting the CLS targets (0 without views).
        reconstruction (`(B, C, H, W)`, *optional*): pixel target: the raw reconstruction on the [0, 1] scale.
        logits (`(B, N, V)`, *optional*): VQ target: per-patch code logits.
        sparse_tokens (`(B, r, d)`), spatial_map (`(B, N, r)`), cls_embedding (`(B, d)`): of the main image.
        assignments (`(B, r, C)`): the Sinkhorn-Knopp targets of the sparse tokens.
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


class StellarTeacher(nn.Module):
    """EMA copy of the student's encoder and clustering heads; never trained by gradients."""

    def __init__(self, config: StellarConfig):
        super().__init__()
        self.stellar = StellarModel(config)
        self.sparse_clustering_head = StellarClusteringHead(config)
        self.cls_clustering_head = StellarClusteringHead(config) if config.use_cls_clustering else None
        self.requires_grad_(False)


class StellarForPreTraining(StellarReconstructionHeadMixin, StellarPreTrainedModel):
    """
    The full STELLAR objective (spec section 4): reconstruction of the main image from its own factors, online
    clustering of its sparse and CLS tokens with Sinkhorn-Knopp targets, masked global views whose sparse tokens are
    matched to the main image's by optimal transport, local views predicting the CLS targets, and KoLeo.

    Views are made by the data pipeline (see `stellar_hf.data.MultiViewTransform`); masking noise comes from the
    `mask_noise` argument or an explicit `generator`, so a step is reproducible. Sinkhorn statistics are all-reduced
    across processes when `torch.distributed` is initialised, so every rank must call `forward`.

    With `config.use_ema_teacher`, the teacher starts as a copy of the student, also when loaded from a checkpoint
    without teacher weights (see [`from_pretrained`]), and [`update_teacher`] moves it; `examples/pretrain.py` calls
    that once per optimiser step, where the original updates it on every training forward (once per micro-batch
    under gradient accumulation).
    """

    def __init__(self, config: StellarConfig):
        super().__init__(config)
        self.stellar = StellarModel(config)
        self.build_reconstruction_modules(config)
        self.sparse_clustering_head = StellarClusteringHead(config)
        self.cls_clustering_head = StellarClusteringHead(config) if config.use_cls_clustering else None
        self.teacher = StellarTeacher(config) if config.use_ema_teacher else None
        self.post_init()
        if self.teacher is not None:
            self.reset_teacher()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """
        `PreTrainedModel.from_pretrained`, then two fixes for the EMA teacher (when `config.use_ema_teacher`):

        - A teacher not loaded from the checkpoint starts as a copy of the student, as in a fresh model, instead of
          its random initialisation, and a warning says so. This covers a student-only folder (a converted or
          pretrained checkpoint, or one saved without the teacher) and teacher tensors of another shape
          (`ignore_mismatched_sizes=True`). When only some teacher tensors are missing, the whole teacher is copied
          too and the warning names what was discarded: a teacher mixing loaded and freshly initialised tensors is
          an EMA of nothing, and the student is the only complete, consistent set.
        - The teacher stays frozen (loading re-creates every parameter as trainable).

        Returns the model, or `(model, loading_info)` with `output_loading_info=True`, as transformers does.
        """
        output_loading_info = kwargs.pop("output_loading_info", False)
        # The loading info is the only record of which tensors came from the checkpoint, so always ask for it.
        model, loading_info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        if model.teacher is not None:
            model.teacher.requires_grad_(False)
            source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            model.start_teacher_from_student_unless_loaded(loading_info, source)
        return (model, loading_info) if output_loading_info else model

    def start_teacher_from_student_unless_loaded(self, loading_info: dict, source=None) -> bool:
        """
        Copy the student into the EMA teacher ([`reset_teacher`]) when any teacher tensor was not loaded, i.e. is
        among `loading_info["missing_keys"]` or `loading_info["mismatched_keys"]` (as `from_pretrained` reports
        them), and log a warning naming `source` and the reason. Returns whether the teacher was reset.
        """
        teacher_keys = [key for key in self.state_dict() if key.startswith("teacher.")]
        not_loaded = set(loading_info.get("missing_keys", ())) | {
            mismatch[0] for mismatch in loading_info.get("mismatched_keys", ())
        }
        missing = [key for key in teacher_keys if key in not_loaded]
        if not missing:
            return False
        self.reset_teacher()
        if len(missing) == len(teacher_keys):
            logger.warning(
                "The checkpoint %s holds no EMA teacher weights (config.use_ema_teacher=True): the teacher starts as "
                "a copy of the student, not from its random initialisation.",
                source,
            )
        else:
            logger.warning(
                "The checkpoint %s holds only %d of the %d EMA teacher tensors (missing: %s): the whole teacher "
                "starts as a copy of the student, discarding the %d loaded teacher tensors, because a teacher mixing "
                "loaded and freshly initialised tensors is not an EMA of the student.",
                source,
                len(teacher_keys) - len(missing),
                len(teacher_keys),
                ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else ""),
                len(teacher_keys) - len(missing),
            )
        return True

    @torch.no_grad()
    def reset_teacher(self) -> None:
        """Copy the student's encoder and heads into the EMA teacher."""
        for teacher_module, student_module in self._teacher_pairs():
            teacher_module.load_state_dict(student_module.state_dict())

    def _teacher_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        pairs = [(self.teacher.stellar, self.stellar), (self.teacher.sparse_clustering_head, self.sparse_clustering_head)]
        if self.cls_clustering_head is not None:
            pairs.append((self.teacher.cls_clustering_head, self.cls_clustering_head))
        return pairs

    def teacher_momentum(self, step: int, total_steps: int) -> float:
        """Cosine schedule from `ema_momentum` at step 0 to `ema_momentum_end` at `total_steps`."""
        start, end = self.config.ema_momentum, self.config.ema_momentum_end
        progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
        return end - (end - start) * (math.cos(math.pi * progress) + 1) / 2

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """
        EMA update `teacher = momentum * teacher + (1 - momentum) * student`, over every teacher parameter; call after
        each optimiser step.

        `examples/pretrain.py` calls it once per optimiser step, i.e. once per accumulated batch; the original updates
        the teacher on every training forward, i.e. once per micro-batch under gradient accumulation, so runs with
        accumulation move the teacher fewer times per epoch than the original does.
        """
        if self.teacher is None:
            raise ValueError("update_teacher needs config.use_ema_teacher=True")
        for teacher_module, student_module in self._teacher_pairs():
            teacher_parameters = list(teacher_module.parameters())
            student_parameters = [parameter.detach() for parameter in student_module.parameters()]
            torch._foreach_lerp_(teacher_parameters, student_parameters, 1.0 - momentum)

    def clustering_targets(self, logits: torch.Tensor) -> torch.Tensor:
        """Sinkhorn-Knopp targets over every token of the global batch: logits `(B, T, C)` -> `(B, T, C)`."""
        scores = logits.detach().flatten(0, -2) / self.config.sinkhorn_temperature
        return sinkhorn_knopp(scores, self.config.sinkhorn_iterations).view_as(logits).float()

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

    def masked_keep_indices(
        self, mask_noise: torch.Tensor, num_views: int, grid_size: tuple[int, int]
    ) -> torch.LongTensor:
        """
        Patches each masked view keeps: the `(1 - mask_ratio)` fraction with the lowest `mask_noise` `(V, N)`,
        `(V, N_keep)`.
        """
        num_patches = grid_size[0] * grid_size[1]
        if mask_noise.shape != (num_views, num_patches):
            raise ValueError(
                f"mask_noise must have shape {(num_views, num_patches)} (views, patches), got {tuple(mask_noise.shape)}"
            )
        num_kept = num_kept_patches(num_patches, self.config.mask_ratio)
        return torch.argsort(mask_noise, dim=1, stable=True)[:, :num_kept]

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        global_views: torch.Tensor | None = None,
        local_views: torch.Tensor | None = None,
        mask_noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        target_codes: torch.LongTensor | None = None,
        vq_tokenizer=None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> StellarForPreTrainingOutput | tuple:
        r"""
        Args:
            pixel_values (`(B, C, H, W)`): the main images, normalised, without colour augmentation.
            global_views (`(B, M, C, H, W)`, *optional*): colour-augmented global views; the first
                `config.num_masked_views` are masked and encoded.
            local_views (`(B, K, C, s, s)`, *optional*): colour-augmented local views; the first
                `config.num_local_views` are encoded.
            mask_noise (`(B * M, N)`, *optional*): per-patch noise of each masked view (rows image-major); the
                lowest-noise patches are kept.
            generator (`torch.Generator`, *optional*): source of the masking noise when `mask_noise` is not given.
            target_codes (`(B, N)`, *optional*), vq_tokenizer: VQ target only, as in
                [`StellarForImageReconstruction`].
        """
        return_dict = self.config.return_dict if return_dict is None else return_dict
        config = self.config
        outputs = self.stellar(pixel_values, return_dict=True)
        sparse_tokens, cls_tokens = outputs.sparse_tokens, outputs.cls_embedding.unsqueeze(1)
        grid_size = grid_size_of(pixel_values, config.patch_size)
        zero = sparse_tokens.new_zeros((), dtype=torch.float32)

        prediction = self.decode_tokens(self.decoder(outputs.lowrank_features, grid_size), grid_size)
        reconstruction_loss = self.reconstruction_loss(prediction, pixel_values, target_codes, vq_tokenizer)
        if reconstruction_loss is None:
            raise ValueError(
                "the VQ reconstruction target needs target_codes or a MaskGIT VQGAN (vq_tokenizer=..., "
                "set_vq_tokenizer(...) or config.vq_tokenizer_name_or_path)"
            )
        total_koleo = config.koleo_weight * koleo_loss(sparse_tokens)

        sparse_logits = self.sparse_clustering_head(sparse_tokens)
        cls_logits = self.cls_clustering_head(cls_tokens) if self.cls_clustering_head is not None else None
        if self.teacher is None:
            assignments = self.clustering_targets(sparse_logits)
            cls_assignments = self.clustering_targets(cls_logits) if cls_logits is not None else None
            target_tokens = sparse_tokens.detach()
            clustering_loss = clustering_cross_entropy(sparse_logits, assignments, config.prediction_temperature)
        else:
            # The teacher reads the second global view when there is one, as the original does.
            with torch.no_grad():
                teacher_input = global_views[:, 1] if global_views is not None and global_views.shape[1] > 1 else pixel_values
                teacher_outputs = self.teacher.stellar(teacher_input, return_dict=True)
                target_tokens = teacher_outputs.sparse_tokens
                assignments = self.clustering_targets(self.teacher.sparse_clustering_head(target_tokens))
                cls_assignments = None
                if cls_logits is not None:
                    teacher_cls = teacher_outputs.cls_embedding.unsqueeze(1)
                    cls_assignments = self.clustering_targets(self.teacher.cls_clustering_head(teacher_cls))
            clustering_loss = self.matched_clustering_loss(sparse_tokens, sparse_logits, target_tokens, assignments)
        cls_clustering_loss = zero
        if cls_logits is not None:
            cls_clustering_loss = clustering_cross_entropy(cls_logits, cls_assignments, config.prediction_temperature)

        mask_loss, cls_loss = zero, zero
        view_cls = []  # CLS tokens of the masked and of the local views, each (B * V, d)
        num_masked = self.num_masked_views_in(global_views)
        if num_masked > 0:
            views = global_views[:, :num_masked].flatten(0, 1)
            if mask_noise is None:
                mask_noise = self.draw_mask_noise(global_views, generator, views.device)
            keep_indices = self.masked_keep_indices(
                mask_noise.to(views.device), views.shape[0], grid_size_of(views, config.patch_size)
            )
            # Only the sparse tokens (and CLS, when it is clustered) of a masked view are read, so the last layer
            # computes just those rows.
            length = config.num_prefix_tokens + keep_indices.shape[1] + config.num_sparse_tokens
            rows = torch.arange(length - config.num_sparse_tokens, length, device=views.device)
            if cls_assignments is not None:
                rows = torch.cat((torch.zeros(1, dtype=torch.long, device=views.device), rows))
            masked_sequence = self.stellar.encode(views, patch_keep_indices=keep_indices, output_rows=rows)[0]
            masked_sparse = masked_sequence[:, -config.num_sparse_tokens :]
            if cls_assignments is not None:
                view_cls.append(masked_sequence[:, 0])
            total_koleo = total_koleo + config.koleo_weight * koleo_loss(masked_sparse)
            masked_logits = self.sparse_clustering_head(masked_sparse)
            mask_loss = self.matched_clustering_loss(masked_sparse, masked_logits, target_tokens, assignments)
        num_local = min(config.num_local_views, local_views.shape[1]) if local_views is not None else 0
        if num_local > 0 and cls_assignments is not None:
            views = local_views[:, :num_local].flatten(0, 1)
            # Local crops need not be a multiple of the patch size (96 px with 14-px patches): the original's
            # strided patch convolution ignores the remainder, so drop it here too. Only CLS is read.
            height, width = (side - side % config.patch_size for side in views.shape[-2:])
            view_cls.append(self.stellar.encode(views[..., :height, :width], output_rows=slice(0, 1))[0][:, 0])
        if cls_assignments is not None and view_cls:
            cls_loss = self.view_cls_loss(view_cls, cls_assignments)

        loss = (
            config.effective_reconstruction_weight * reconstruction_loss
            + total_koleo
            + clustering_loss
            + cls_clustering_loss
            + mask_loss
            + cls_loss
        )
        output = StellarForPreTrainingOutput(
            loss=loss,
            reconstruction_loss=reconstruction_loss,
            koleo_loss=total_koleo,
            clustering_loss=clustering_loss,
            cls_clustering_loss=cls_clustering_loss,
            mask_loss=mask_loss,
            cls_loss=cls_loss,
            reconstruction=prediction if config.reconstruction_target == "pixel" else None,
            logits=prediction if config.reconstruction_target == "vq" else None,
            sparse_tokens=sparse_tokens,
            spatial_map=outputs.spatial_map,
            cls_embedding=outputs.cls_embedding,
            assignments=assignments,
        )
        return output if return_dict else output.to_tuple()

    def matched_clustering_loss(
        self,
        predicted_tokens: torch.Tensor,
        predicted_logits: torch.Tensor,
        target_tokens: torch.Tensor,
        assignments: torch.Tensor,
    ) -> torch.Tensor:
        """
        Each predicted token learns the clustering target of the target token it is matched to.

        Args:
            predicted_tokens: `(B * V, r, d)`, rows image-major; predicted_logits: `(B * V, r, C)`.
            target_tokens: `(B, r, d)`; assignments: `(B, r, C)`.
        """
        num_views = predicted_tokens.shape[0] // target_tokens.shape[0]
        index, _ = match_tokens(
            predicted_tokens,
            target_tokens.repeat_interleave(num_views, dim=0),
            epsilon=self.config.matcher_epsilon,
            num_iterations=self.config.matcher_iterations,
        )
        targets = gather_matched_targets(assignments, index)
        return clustering_cross_entropy(predicted_logits, targets, self.config.prediction_temperature)

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


__all__ = [
    "StellarForPreTraining",
    "StellarForPreTrainingOutput",
    "StellarPreTrainedModel",
    "StellarModel",
    "StellarForImageReconstruction",
    "StellarForImageClassification",
    "StellarModelOutput",
    "StellarReconstructionOutput",
    "StellarClusteringHead",
    "StellarPrototypes",
    "STELLAR_AUTO_MAP",
]
