"""MaskGIT VQGAN tokenizer configuration."""

from transformers import PretrainedConfig


class MaskGitVQGANConfig(PretrainedConfig):
    r"""
    Configuration of the MaskGIT VQGAN image tokenizer (the TiTok project's re-implementation of VQGAN without
    non-local layers), used by STELLAR as a frozen reconstruction target.

    The encoder maps an image (B, num_channels, H, W) to latents (B, z_channels, H / f, W / f) with
    f = 2 ** (len(channel_mult) - 1); every latent vector is replaced by its nearest codebook entry; the decoder maps
    the quantized latents back to an image. Defaults reproduce the released `maskgit-vqgan-imagenet-f16-256.bin`
    (f = 16, 256 px images, 16 x 16 codes over a 1024 x 256 codebook).

    Args:
        num_channels (`int`, defaults to 3): channels of the input and reconstructed images.
        hidden_channels (`int`, defaults to 128): base width; level i of the encoder and decoder is
            `hidden_channels * channel_mult[i]` wide.
        channel_mult (`list[int]`, defaults to `[1, 1, 2, 2, 4]`): width multiplier of each resolution level. Every
            level but the last halves the resolution in the encoder (and doubles it in the decoder).
        num_res_blocks (`int`, defaults to 2): residual blocks per level, and in each middle stage.
        z_channels (`int`, defaults to 256): channels of the latents the quantizer reads.
        codebook_size (`int`, defaults to 1024): number of codebook entries (the code vocabulary).
        codebook_dim (`int`, defaults to 256): width of a codebook entry. The quantizer compares codebook entries with
            the encoder's latents directly, so this must equal `z_channels`.
        dropout (`float`, defaults to 0.0): dropout inside the residual blocks (0 in the released tokenizer, which
            makes training and eval mode identical).
        image_size (`int`, defaults to 256): side of the square images the tokenizer was trained on, so its code grid
            is `image_size / f` per side (`grid_size`). The weights do not record it: `python -m
            stellar_hf.convert_vqgan` writes the checkpoint's own (from `--image_size`, the checkpoint's tokenizer
            config, or 256 only for the released architecture) and never falls back to this default. Encoding
            accepts any side that is a multiple of the downsampling factor.
        norm_num_groups (`int`, defaults to 32): groups of every GroupNorm; must divide every level's width. Fixed
            at 32 in the original code, and not recorded in the weights.
        norm_eps (`float`, defaults to 1e-6): epsilon of every GroupNorm (fixed at 1e-6 in the original code).
        initializer_range (`float`, defaults to 0.02): std of the normal init of convolutions (the codebook starts
            uniform in [-1 / codebook_size, 1 / codebook_size], as in the original). Only matters for untrained models.

    Example:
    ```python
    >>> from stellar_hf.configuration_maskgit_vqgan import MaskGitVQGANConfig
    >>> config = MaskGitVQGANConfig()
    >>> config.downsample_factor, config.num_resolutions, config.grid_size
    (16, 5, 16)
    ```
    """

    model_type = "maskgit_vqgan"

    def __init__(
        self,
        num_channels=3,
        hidden_channels=128,
        channel_mult=(1, 1, 2, 2, 4),
        num_res_blocks=2,
        z_channels=256,
        codebook_size=1024,
        codebook_dim=256,
        dropout=0.0,
        image_size=256,
        norm_num_groups=32,
        norm_eps=1e-6,
        initializer_range=0.02,
        **kwargs,
    ):
        self.num_channels = num_channels
        self.hidden_channels = hidden_channels
        # A list, not a tuple, so that the JSON round trip returns an equal value.
        self.channel_mult = list(channel_mult) if isinstance(channel_mult, (list, tuple)) else channel_mult
        self.num_res_blocks = num_res_blocks
        self.z_channels = z_channels
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim
        self.dropout = dropout
        self.image_size = image_size
        self.norm_num_groups = norm_num_groups
        self.norm_eps = norm_eps
        self.initializer_range = initializer_range
        super().__init__(**kwargs)
        self.validate_maskgit_vqgan_fields()

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

    def validate_maskgit_vqgan_fields(self) -> None:
        """Raise `ValueError` naming the first field whose value cannot build a working tokenizer."""
        for name in (
            "num_channels", "hidden_channels", "num_res_blocks", "z_channels", "codebook_size", "codebook_dim",
            "image_size", "norm_num_groups",
        ):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MaskGitVQGANConfig.{name} must be a positive integer, got {value!r}")

        mult = self.channel_mult
        if (
            not isinstance(mult, list)
            or not mult
            or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in mult)
        ):
            raise ValueError(
                f"MaskGitVQGANConfig.channel_mult must be a non-empty list of positive integers, got {mult!r}"
            )
        for level, m in enumerate(mult):
            if (self.hidden_channels * m) % self.norm_num_groups != 0:
                raise ValueError(
                    f"MaskGitVQGANConfig.norm_num_groups ({self.norm_num_groups}) must divide the width of every "
                    f"level, but level {level} has hidden_channels * channel_mult[{level}] = "
                    f"{self.hidden_channels * m}"
                )

        if self.codebook_dim != self.z_channels:
            raise ValueError(
                f"MaskGitVQGANConfig.codebook_dim ({self.codebook_dim}) must equal z_channels ({self.z_channels}): "
                "the quantizer compares codebook entries with the encoder's latents directly"
            )
        if self.image_size % self.downsample_factor != 0:
            raise ValueError(
                f"MaskGitVQGANConfig.image_size ({self.image_size}) must be a multiple of the downsampling factor "
                f"{self.downsample_factor} (2 ** (len(channel_mult) - 1))"
            )

        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"MaskGitVQGANConfig.dropout must be a number in [0, 1), got {self.dropout!r}")
        for name in ("norm_eps", "initializer_range"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"MaskGitVQGANConfig.{name} must be a positive number, got {value!r}")


__all__ = ["MaskGitVQGANConfig"]
