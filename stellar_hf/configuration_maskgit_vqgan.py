"""
MaskGIT VQGAN tokenizer configuration: a transformers 5.24 `@strict` dataclass config, declared and checked as
`StellarConfig` is (fields with their rules, `validate_*` class validators, `ValueError`s naming the field).
"""

from huggingface_hub.dataclasses import strict, validated_field
from transformers import PreTrainedConfig

from .configuration_stellar import (
    POSITIVE_INTEGER,
    POSITIVE_NUMBER,
    NumberRule,
    SequenceRule,
    refusals_name_the_field,
)


@refusals_name_the_field
@strict
class MaskGitVQGANConfig(PreTrainedConfig):
    r"""
    Configuration of the MaskGIT VQGAN image tokenizer (the TiTok project's re-implementation of VQGAN without
    non-local layers), used by STELLAR as a frozen reconstruction target.

    The encoder maps an image (B, num_channels, H, W) to latents (B, z_channels, H / f, W / f) with
    f = 2 ** (len(channel_mult) - 1); every latent vector is replaced by its nearest codebook entry; the decoder maps
    the quantized latents back to an image. Defaults reproduce the released `maskgit-vqgan-imagenet-f16-256.bin`
    (f = 16, 256 px images, 16 x 16 codes over a 1024 x 256 codebook).

    Args:
        num_channels (`int`, *optional*, defaults to 3):
            Channels of the input and reconstructed images.
        hidden_channels (`int`, *optional*, defaults to 128):
            Base width; level i of the encoder and decoder is `hidden_channels * channel_mult[i]` wide.
        channel_mult (`list[int]`, *optional*, defaults to `[1, 1, 2, 2, 4]`):
            Width multiplier of each resolution level. Every level but the last halves the resolution in the encoder
            (and doubles it in the decoder).
        num_res_blocks (`int`, *optional*, defaults to 2):
            Residual blocks per level, and in each middle stage.
        z_channels (`int`, *optional*, defaults to 256):
            Channels of the latents the quantizer reads.
        codebook_size (`int`, *optional*, defaults to 1024):
            Number of codebook entries (the code vocabulary).
        codebook_dim (`int`, *optional*, defaults to 256):
            Width of a codebook entry. The quantizer compares codebook entries with the encoder's latents directly, so
            this must equal `z_channels`.
        dropout (`float`, *optional*, defaults to 0.0):
            Dropout inside the residual blocks, in [0, 1) (0 in the released tokenizer, which makes training and eval
            mode identical).
        image_size (`int`, *optional*, defaults to 256):
            Side of the square images the tokenizer was trained on, so its code grid is `image_size / f` per side
            (`grid_size`); a multiple of f. The weights do not record it: `python -m stellar_hf.convert_vqgan` writes
            the checkpoint's own (from `--image_size`, the checkpoint's tokenizer config, or 256 only for the released
            architecture) and never falls back to this default. Encoding accepts any side that is a multiple of the
            downsampling factor.
        norm_num_groups (`int`, *optional*, defaults to 32):
            Groups of every GroupNorm; must divide every level's width. Fixed at 32 in the original code, and not
            recorded in the weights.
        norm_eps (`float`, *optional*, defaults to 1e-6):
            Epsilon of every GroupNorm (fixed at 1e-6 in the original code).
        initializer_range (`float`, *optional*, defaults to 0.02):
            Std of the normal init of convolutions (the codebook starts uniform in [-1 / codebook_size,
            1 / codebook_size], as in the original). Only matters for untrained models.

    Validation: each field is checked on every assignment (constructor, `from_pretrained(..., field=value)`, later
    edits) and the `validate_*` class validators run at the end of the constructor, of `from_dict` / `from_pretrained`
    and of `save_pretrained`; a refused value raises a `ValueError` that starts with `MaskGitVQGANConfig.<field>`.
    Fields are keyword-only.

    Example:
    ```python
    >>> from stellar_hf.configuration_maskgit_vqgan import MaskGitVQGANConfig
    >>> config = MaskGitVQGANConfig()
    >>> config.downsample_factor, config.num_resolutions, config.grid_size
    (16, 5, 16)
    ```
    """

    model_type = "maskgit_vqgan"

    num_channels: int = validated_field(POSITIVE_INTEGER, default=3)
    hidden_channels: int = validated_field(POSITIVE_INTEGER, default=128)
    channel_mult: list[int] = validated_field(SequenceRule(POSITIVE_INTEGER), default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = validated_field(POSITIVE_INTEGER, default=2)
    z_channels: int = validated_field(POSITIVE_INTEGER, default=256)
    codebook_size: int = validated_field(POSITIVE_INTEGER, default=1024)
    codebook_dim: int = validated_field(POSITIVE_INTEGER, default=256)
    dropout: float = validated_field(NumberRule(minimum=0.0, maximum=1.0, maximum_excluded=True), default=0.0)
    image_size: int = validated_field(POSITIVE_INTEGER, default=256)
    norm_num_groups: int = validated_field(POSITIVE_INTEGER, default=32)
    norm_eps: float = validated_field(POSITIVE_NUMBER, default=1e-6)
    initializer_range: float = validated_field(POSITIVE_NUMBER, default=0.02)

    @property
    def num_resolutions(self) -> int:
        """Number of resolution levels (the original's `num_resolutions`), one per entry of `channel_mult`."""
        return len(self.channel_mult)

    @property
    def downsample_factor(self) -> int:
        """Ratio f between an image side and its latent grid side (16 for the released tokenizer)."""
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def grid_size(self) -> int:
        """Codes per side for an `image_size` image: `image_size / downsample_factor` (16 for the released one)."""
        return self.image_size // self.downsample_factor

    # Class validators: `@strict` runs every `validate_*` method (in name order) at the end of the constructor, and
    # `validate()` (`from_dict`, `save_pretrained`) runs them again. Each field is already valid on its own here.

    def validate_codebook_width(self) -> None:
        """The quantizer compares codebook entries with the encoder's latents directly."""
        if self.codebook_dim != self.z_channels:
            raise ValueError(
                f"MaskGitVQGANConfig.codebook_dim ({self.codebook_dim}) must equal z_channels ({self.z_channels}): "
                "the quantizer compares codebook entries with the encoder's latents directly"
            )

    def validate_group_norm(self) -> None:
        """Every level's width splits into `norm_num_groups` groups."""
        for level, multiplier in enumerate(self.channel_mult):
            if (self.hidden_channels * multiplier) % self.norm_num_groups != 0:
                raise ValueError(
                    f"MaskGitVQGANConfig.norm_num_groups ({self.norm_num_groups}) must divide the width of every "
                    f"level, but level {level} has hidden_channels * channel_mult[{level}] = "
                    f"{self.hidden_channels * multiplier}"
                )

    def validate_image_grid(self) -> None:
        """An `image_size` image tiles into whole latent cells."""
        if self.image_size % self.downsample_factor != 0:
            raise ValueError(
                f"MaskGitVQGANConfig.image_size ({self.image_size}) must be a multiple of the downsampling factor "
                f"{self.downsample_factor} (2 ** (len(channel_mult) - 1))"
            )


__all__ = ["MaskGitVQGANConfig"]
