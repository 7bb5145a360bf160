"""The MaskGIT VQGAN image tokenizer (from the TiTok project), STELLAR's frozen VQ reconstruction target.

A convolutional encoder maps an image to a grid of latent vectors, each vector is replaced by its nearest codebook
entry (squared L2), and a convolutional decoder maps the quantized grid back to pixels. Module and parameter names
follow the released `maskgit-vqgan-imagenet-f16-256.bin` exactly, so its state dict loads without renaming.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_maskgit_vqgan import MaskGitVQGANConfig


@dataclass
class MaskGitVQGANModelOutput(ModelOutput):
    r"""
    Output of [`MaskGitVQGANModel`]: the codes of the input images and their reconstruction.

    Args:
        codes (`torch.LongTensor` of shape `(batch_size, height * width)`):
            Index of the nearest codebook entry at each latent position, flattened row-major (h = H / f, w = W / f).
        latents (`torch.FloatTensor` of shape `(batch_size, z_channels, height, width)`):
            Encoder output, before quantization.
        quantized_latents (`torch.FloatTensor` of shape `(batch_size, codebook_dim, height, width)`):
            The codebook entries of `codes`, laid out as the latent grid.
        reconstruction (`torch.FloatTensor` of shape `(batch_size, num_channels, H, W)`):
            Decoder output of `quantized_latents`, clamped to [0, 1].
    """

    codes: torch.LongTensor | None = None
    latents: torch.FloatTensor | None = None
    quantized_latents: torch.FloatTensor | None = None
    reconstruction: torch.FloatTensor | None = None


def _conv(in_channels: int, out_channels: int, kernel_size: int, bias: bool = True) -> nn.Conv2d:
    # The original pads "same" dynamically; every convolution here has stride 1 and an odd kernel, for which that is
    # exactly kernel_size // 2 zeros on each side.
    return nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)


def _group_norm(config: MaskGitVQGANConfig, num_channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=config.norm_num_groups, num_channels=num_channels, eps=config.norm_eps)


def _level_width(config: MaskGitVQGANConfig, level: int) -> int:
    return config.hidden_channels * config.channel_mult[level]


class MaskGitVQGANResnetBlock(nn.Module):
    """
    GroupNorm → SiLU → 3x3 conv, twice, plus a residual. Convolutions have no bias.

    When the width changes, the original adds a 1x1 projection of the block's *own output* (`nin_shortcut`, out → out
    channels) instead of a projection of its input, so the input does not reach the output directly. We keep that
    quirk: the released weights were trained with it.
    """

    def __init__(self, config: MaskGitVQGANConfig, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _group_norm(config, in_channels)
        self.conv1 = _conv(in_channels, out_channels, 3, bias=False)
        self.norm2 = _group_norm(config, out_channels)
        self.dropout = nn.Dropout(config.dropout)
        self.conv2 = _conv(out_channels, out_channels, 3, bias=False)
        self.nin_shortcut = _conv(out_channels, out_channels, 1, bias=False) if in_channels != out_channels else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, h, w) → (B, out_channels, h, w)."""
        residual = hidden_states
        hidden_states = self.conv1(F.silu(self.norm1(hidden_states)))
        hidden_states = self.conv2(self.dropout(F.silu(self.norm2(hidden_states))))
        if self.nin_shortcut is not None:
            residual = self.nin_shortcut(hidden_states)
        return hidden_states + residual


def _resnet_stack(config: MaskGitVQGANConfig, in_channels: int, out_channels: int) -> nn.ModuleList:
    """`num_res_blocks` residual blocks; the first one changes the width from `in_channels` to `out_channels`."""
    widths = [in_channels] + [out_channels] * config.num_res_blocks
    return nn.ModuleList(
        MaskGitVQGANResnetBlock(config, widths[i], widths[i + 1]) for i in range(config.num_res_blocks)
    )


class MaskGitVQGANDownBlock(nn.Module):
    """One encoder level: residual blocks, then a 2x2 average pool on every level but the last."""

    def __init__(self, config: MaskGitVQGANConfig, level: int):
        super().__init__()
        in_channels = config.hidden_channels if level == 0 else _level_width(config, level - 1)
        self.block = _resnet_stack(config, in_channels, _level_width(config, level))
        self.downsample = level != config.num_resolutions - 1

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, C_in, h, w) → (B, C_out, h / 2, w / 2), or (B, C_out, h, w) on the last level."""
        for block in self.block:
            hidden_states = block(hidden_states)
        if self.downsample:
            hidden_states = F.avg_pool2d(hidden_states, kernel_size=2, stride=2)
        return hidden_states


class MaskGitVQGANUpBlock(nn.Module):
    """One decoder level: residual blocks, then (on every level but the first) nearest 2x upsampling and a 3x3 conv."""

    def __init__(self, config: MaskGitVQGANConfig, level: int):
        super().__init__()
        # The decoder runs from the last level to the first, so level i reads the output of level i + 1.
        in_channels = _level_width(config, min(level + 1, config.num_resolutions - 1))
        out_channels = _level_width(config, level)
        self.block = _resnet_stack(config, in_channels, out_channels)
        self.upsample_conv = _conv(out_channels, out_channels, 3) if level != 0 else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, C_in, h, w) → (B, C_out, 2h, 2w), or (B, C_out, h, w) on the first level."""
        for block in self.block:
            hidden_states = block(hidden_states)
        if self.upsample_conv is not None:
            hidden_states = self.upsample_conv(F.interpolate(hidden_states, scale_factor=2.0, mode="nearest"))
        return hidden_states


class MaskGitVQGANEncoder(nn.Module):
    """Image (B, num_channels, H, W) → latents (B, z_channels, H / f, W / f)."""

    def __init__(self, config: MaskGitVQGANConfig):
        super().__init__()
        mid_channels = _level_width(config, -1)
        self.conv_in = _conv(config.num_channels, config.hidden_channels, 3, bias=False)
        self.down = nn.ModuleList(MaskGitVQGANDownBlock(config, level) for level in range(config.num_resolutions))
        self.mid = _resnet_stack(config, mid_channels, mid_channels)
        self.norm_out = _group_norm(config, mid_channels)
        self.conv_out = _conv(mid_channels, config.z_channels, 1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden_states = self.conv_in(pixel_values)
        for block in self.down:
            hidden_states = block(hidden_states)
        for block in self.mid:
            hidden_states = block(hidden_states)
        return self.conv_out(F.silu(self.norm_out(hidden_states)))


class MaskGitVQGANDecoder(nn.Module):
    """Quantized latents (B, z_channels, h, w) → image (B, num_channels, h * f, w * f), not clamped."""

    def __init__(self, config: MaskGitVQGANConfig):
        super().__init__()
        mid_channels = _level_width(config, -1)
        self.conv_in = _conv(config.z_channels, mid_channels, 3)
        self.mid = _resnet_stack(config, mid_channels, mid_channels)
        # Stored in level order (`up.0` is the full-resolution level) to match the checkpoint, run in reverse.
        self.up = nn.ModuleList(MaskGitVQGANUpBlock(config, level) for level in range(config.num_resolutions))
        self.norm_out = _group_norm(config, _level_width(config, 0))
        self.conv_out = _conv(_level_width(config, 0), config.num_channels, 3)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        hidden_states = self.conv_in(latents)
        for block in self.mid:
            hidden_states = block(hidden_states)
        for block in reversed(self.up):
            hidden_states = block(hidden_states)
        return self.conv_out(F.silu(self.norm_out(hidden_states)))


class MaskGitVQGANVectorQuantizer(nn.Module):
    """Nearest-neighbour lookup (squared L2) in a learned codebook of shape (codebook_size, codebook_dim)."""

    def __init__(self, config: MaskGitVQGANConfig):
        super().__init__()
        self.embedding = nn.Embedding(config.codebook_size, config.codebook_dim)

    def forward(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.LongTensor]:
        """
        Args:
            latents (`torch.Tensor` of shape `(B, codebook_dim, h, w)`): encoder output.

        Returns:
            `(quantized, codes)`: the codebook entries (B, codebook_dim, h, w) and their indices (B, h, w). The
            argmin is not differentiable; gradients reach the codebook through `quantized`, not the latents.
        """
        batch_size, dim, height, width = latents.shape
        flat = latents.permute(0, 2, 3, 1).reshape(-1, dim)
        codebook = self.embedding.weight
        # ||z - e||^2 = ||z||^2 + ||e||^2 - 2 z.e as one fused GEMM: the original's formula and rounding, so that
        # near-ties resolve to the same code.
        distances = torch.addmm(
            flat.pow(2).sum(dim=1, keepdim=True) + codebook.pow(2).sum(dim=1)[None, :], flat, codebook.t(), alpha=-2.0
        )
        codes = distances.argmin(dim=1).view(batch_size, height, width)
        return self.embed_codes(codes), codes

    def embed_codes(self, codes: torch.LongTensor) -> torch.Tensor:
        """Codes (B, h, w) → their codebook entries as a latent grid (B, codebook_dim, h, w)."""
        # A channels-last view, not a contiguous copy: the original decodes from this layout, and convolutions pick
        # their kernel by memory layout, so keeping it reproduces the original's reconstructions bit for bit.
        return self.embedding(codes).permute(0, 3, 1, 2)


class MaskGitVQGANPreTrainedModel(PreTrainedModel):
    """Weight initialisation and `from_pretrained` / `save_pretrained` for the MaskGIT VQGAN tokenizer."""

    config_class = MaskGitVQGANConfig
    base_model_prefix = "vqgan"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = False
    _no_split_modules = ["MaskGitVQGANResnetBlock"]

    def _init_weights(self, module: nn.Module) -> None:
        """Normal(0, initializer_range) convolutions and unit GroupNorms (the default); a uniform codebook."""
        if isinstance(module, nn.Embedding):
            # The only embedding is the codebook; the original starts it uniform in +-1 / codebook_size.
            bound = 1.0 / self.config.codebook_size
            init.uniform_(module.weight, -bound, bound)
        else:
            super()._init_weights(module)


class MaskGitVQGANModel(MaskGitVQGANPreTrainedModel):
    r"""
    The MaskGIT VQGAN tokenizer: images in [0, 1] ⇄ grids of discrete codes.

    Images of any size whose sides are multiples of the downsampling factor f (16 for the released tokenizer) are
    accepted; a (B, 3, H, W) batch gives (H / f) * (W / f) codes per image. Inputs are not normalised: the tokenizer
    was trained on pixel values in [0, 1] (values slightly outside, as left by bicubic resizing, are fine).

    Example:
    ```python
    >>> import torch
    >>> from stellar_hf.modeling_maskgit_vqgan import MaskGitVQGANModel
    >>> model = MaskGitVQGANModel.from_pretrained("path/to/converted-maskgit-vqgan")
    >>> images = torch.rand(2, 3, 256, 256)
    >>> codes = model.encode(images)  # (2, 256), values in [0, 1024)
    >>> reconstruction = model.decode(codes)  # (2, 3, 256, 256), in [0, 1]
    ```
    """

    def __init__(self, config: MaskGitVQGANConfig):
        super().__init__(config)
        self.encoder = MaskGitVQGANEncoder(config)
        self.decoder = MaskGitVQGANDecoder(config)
        self.quantize = MaskGitVQGANVectorQuantizer(config)
        self.post_init()

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Validate a (B, num_channels, H, W) image batch and cast it to the model's dtype."""
        if not isinstance(pixel_values, torch.Tensor):
            raise ValueError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
        if pixel_values.ndim != 4:
            raise ValueError(
                "pixel_values must have shape (batch_size, num_channels, height, width), got "
                f"{tuple(pixel_values.shape)}"
            )
        if pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"pixel_values must have {self.config.num_channels} channels (dimension 1), got shape "
                f"{tuple(pixel_values.shape)}"
            )
        if not pixel_values.is_floating_point():
            raise ValueError(
                f"pixel_values must be floating point images in [0, 1], got dtype {pixel_values.dtype} "
                "(convert uint8 images with `images.float() / 255`)"
            )
        factor = self.config.downsample_factor
        height, width = pixel_values.shape[-2:]
        if height % factor != 0 or width % factor != 0:
            raise ValueError(
                f"pixel_values height and width must be multiples of the downsampling factor {factor}, got "
                f"{height} x {width}; resize or crop the images first"
            )
        if not torch.isfinite(pixel_values).all():
            raise ValueError("pixel_values contains NaN or infinite values")
        # Cast explicitly: bf16 images against fp32 weights would otherwise fail inside the first convolution.
        return pixel_values.to(self.dtype)

    def encode_to_latents(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """
        Run the encoder only.

        Args:
            pixel_values (`torch.Tensor` of shape `(B, num_channels, H, W)`): images in [0, 1]; H and W multiples of f.

        Returns:
            `torch.Tensor` of shape `(B, z_channels, H / f, W / f)`: continuous latents, before quantization.
        """
        return self.encoder(self._check_pixel_values(pixel_values))

    def quantize_latents(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.LongTensor]:
        """
        Replace each latent vector by its nearest codebook entry (squared L2; the lowest index wins a tie).

        Args:
            latents (`torch.Tensor` of shape `(B, z_channels, h, w)`).

        Returns:
            `(quantized_latents, codes)` of shapes `(B, codebook_dim, h, w)` and `(B, h, w)`.
        """
        if latents.ndim != 4 or latents.shape[1] != self.config.codebook_dim:
            raise ValueError(
                f"latents must have shape (batch_size, {self.config.codebook_dim}, height, width), got "
                f"{tuple(latents.shape)}"
            )
        return self.quantize(latents)

    def encode(self, pixel_values: torch.Tensor) -> torch.LongTensor:
        """
        Tokenize images.

        Args:
            pixel_values (`torch.Tensor` of shape `(B, num_channels, H, W)`): images in [0, 1]; H and W multiples of f.

        Returns:
            `torch.LongTensor` of shape `(B, (H / f) * (W / f))`: code indices in [0, codebook_size), row-major.
        """
        _, codes = self.quantize(self.encode_to_latents(pixel_values))
        return codes.flatten(1)

    def embed_codes(self, codes: torch.LongTensor) -> torch.Tensor:
        """
        Look up codebook entries.

        Args:
            codes (`torch.LongTensor` of shape `(B, h, w)`, or `(B, h * w)` for a square grid (row-major)).

        Returns:
            `torch.Tensor` of shape `(B, codebook_dim, h, w)`: the quantized latent grid.
        """
        if not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.is_complex():
            raise ValueError(f"codes must be an integer tensor, got {getattr(codes, 'dtype', type(codes).__name__)}")
        if codes.ndim == 2:
            side = math.isqrt(codes.shape[1])
            if side * side != codes.shape[1]:
                raise ValueError(
                    f"codes of shape (batch_size, num_tokens) must form a square grid, but {codes.shape[1]} is not a "
                    "perfect square; pass codes of shape (batch_size, height, width) for a rectangular grid"
                )
            codes = codes.view(codes.shape[0], side, side)
        elif codes.ndim != 3:
            raise ValueError(
                f"codes must have shape (batch_size, height * width) or (batch_size, height, width), got "
                f"{tuple(codes.shape)}"
            )
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.config.codebook_size):
            raise ValueError(
                f"codes must lie in [0, {self.config.codebook_size}), got values in "
                f"[{codes.min().item()}, {codes.max().item()}]"
            )
        return self.quantize.embed_codes(codes.long())

    def decode(self, codes: torch.LongTensor) -> torch.Tensor:
        """
        Decode codes to images.

        Args:
            codes (`torch.LongTensor` of shape `(B, h, w)`, or `(B, h * w)` for a square grid (row-major)).

        Returns:
            `torch.Tensor` of shape `(B, num_channels, h * f, w * f)`: images clamped to [0, 1].
        """
        return self.decoder(self.embed_codes(codes)).clamp(0.0, 1.0)

    def forward(
        self, pixel_values: torch.Tensor, return_dict: bool | None = None
    ) -> MaskGitVQGANModelOutput | tuple[torch.Tensor, ...]:
        """
        Tokenize images and reconstruct them from their codes.

        Args:
            pixel_values (`torch.Tensor` of shape `(B, num_channels, H, W)`): images in [0, 1]; H and W multiples of f.
            return_dict (`bool`, *optional*): return a [`MaskGitVQGANModelOutput`] (default) or a plain tuple.

        Returns:
            [`MaskGitVQGANModelOutput`] with `codes` (B, h * w), `latents` (B, z_channels, h, w), `quantized_latents`
            (B, codebook_dim, h, w) and `reconstruction` (B, num_channels, H, W) in [0, 1], where h = H / f, w = W / f.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        latents = self.encode_to_latents(pixel_values)
        quantized_latents, codes = self.quantize(latents)
        reconstruction = self.decoder(quantized_latents).clamp(0.0, 1.0)
        output = MaskGitVQGANModelOutput(
            codes=codes.flatten(1),
            latents=latents,
            quantized_latents=quantized_latents,
            reconstruction=reconstruction,
        )
        return output if return_dict else output.to_tuple()


__all__ = ["MaskGitVQGANModel", "MaskGitVQGANModelOutput", "MaskGitVQGANPreTrainedModel"]
