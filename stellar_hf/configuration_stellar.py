"""STELLAR model configuration."""

from transformers import PretrainedConfig
from transformers.activations import ACT2FN

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)

RECONSTRUCTION_TARGETS = ("pixel", "vq")
# The original picks the reconstruction weight by target when none is given.
DEFAULT_RECONSTRUCTION_WEIGHTS = {"pixel": 10.0, "vq": 0.05}


class StellarConfig(PretrainedConfig):
    r"""
    Configuration of a STELLAR model: a ViT encoder that also reads `num_sparse_tokens` learnable sparse tokens, the
    spatial-semantic factorization, the reconstruction decoder and the pretraining heads.

    Defaults reproduce the released STELLAR-B16 (ViT-B/16 at 224 px, 16 sparse tokens, VQ reconstruction target).

    Args:
        hidden_size (`int`, defaults to 768): width d of the encoder.
        num_hidden_layers (`int`, defaults to 12): encoder depth.
        num_attention_heads (`int`, defaults to 12): encoder heads; must divide `hidden_size`.
        intermediate_size (`int`, defaults to 3072): encoder MLP width.
        hidden_act (`str`, defaults to `"gelu"`): activation of every MLP (exact erf GELU in the original).
        layer_norm_eps (`float`, defaults to 1e-12): epsilon of every LayerNorm, encoder and decoder.
        qkv_bias (`bool`, defaults to `True`): bias on the query, key and value projections.
        image_size (`int`, defaults to 224): side of the square image the position embeddings are learned for.
        patch_size (`int`, defaults to 16): patch side p of the encoder (and stride of the pixel head).
        num_channels (`int`, defaults to 3): input channels.
        initializer_range (`float`, defaults to 0.02): std of the truncated normal used for linear layers.
        hidden_dropout_prob (`float`, defaults to 0.0): dropout after attention and MLP.
        attention_probs_dropout_prob (`float`, defaults to 0.0): dropout on attention probabilities.
        num_sparse_tokens (`int`, defaults to 16): number r of sparse semantic tokens.
        spatial_temperature (`float` or `None`, defaults to 0.06): temperature of the cosine spatial map; `None`
            uses raw dot products divided by sqrt(d).
        decoder_hidden_size (`int`, defaults to 512), decoder_num_hidden_layers (`int`, defaults to 6),
        decoder_num_attention_heads (`int`, defaults to 8), decoder_intermediate_size (`int`, defaults to 2048):
            sizes of the reconstruction decoder.
        reconstruction_target (`str`, defaults to `"vq"`): `"pixel"` (ConvTranspose2d head, MSE) or `"vq"`
            (per-patch logits over the MaskGIT VQGAN codebook, cross-entropy).
        vq_codebook_size (`int`, defaults to 1024): size of the VQGAN codebook (VQ target only).
        vq_image_size (`int`, defaults to 256): resolution the VQGAN tokenizes at when the patch size is 14.
        vq_tokenizer_name_or_path (`str`, *optional*): a MaskGIT VQGAN folder or Hub id used to decode VQ
            predictions to pixels and to make VQ targets when none is passed in the call.
        image_mean, image_std (`tuple[float]`): normalisation applied by the image processor; the model undoes it
            to compare reconstructions with the input.
        num_prototypes (`int`, defaults to 16384): prototypes C of the online clustering heads.
        prototype_dim (`int`, defaults to 256): width of the L2-normalised prototype space.
        predictor_num_layers (`int`, defaults to 2): Linear layers in the clustering predictor (1 = one Linear).
        predictor_hidden_size (`int`, defaults to 2048): hidden width of the clustering predictor.
        sinkhorn_temperature (`float`, defaults to 0.06): temperature of the Sinkhorn-Knopp targets.
        prediction_temperature (`float`, defaults to 0.12): temperature of the predicted distributions.
        sinkhorn_iterations (`int`, defaults to 3): Sinkhorn-Knopp iterations.
        matcher_epsilon (`float`, defaults to 0.1), matcher_iterations (`int`, defaults to 5): entropic optimal
            transport that matches masked-view tokens to the main image's tokens.
        num_masked_views (`int`, defaults to 8): global views encoded with masking.
        mask_ratio (`float`, defaults to 0.8): fraction of patches removed in a masked view.
        focal_masking_probability (`float`, defaults to 0.5): chance that a masked view keeps a clustered region.
        focal_sigma_range (`tuple[float, float]`, defaults to (0.1, 0.5)): width of the focal bump, in grid sides.
        num_local_views (`int`, defaults to 8): local crops whose CLS predicts the CLS targets.
        local_image_size (`int`, defaults to 96): side of the local crops.
        koleo_weight (`float`, defaults to 0.1): weight of the KoLeo regulariser (applied per term).
        reconstruction_weight (`float`, *optional*): weight of the reconstruction loss; `None` picks 10 for the
            pixel target and 0.05 for the VQ target, as the original does.
        use_cls_clustering (`bool`, defaults to `True`): train the CLS clustering head and its losses.
        use_ema_teacher (`bool`, defaults to `False`): make targets with an EMA teacher instead of the student.
        ema_momentum (`float`, defaults to 0.996): starting momentum of the EMA teacher.
        ema_momentum_end (`float`, defaults to 0.996): final momentum (cosine schedule from `ema_momentum`).
    """

    model_type = "stellar"

    def __init__(
        self,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        hidden_act="gelu",
        layer_norm_eps=1e-12,
        qkv_bias=True,
        image_size=224,
        patch_size=16,
        num_channels=3,
        initializer_range=0.02,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_sparse_tokens=16,
        spatial_temperature=0.06,
        decoder_hidden_size=512,
        decoder_num_hidden_layers=6,
        decoder_num_attention_heads=8,
        decoder_intermediate_size=2048,
        reconstruction_target="vq",
        vq_codebook_size=1024,
        vq_image_size=256,
        vq_tokenizer_name_or_path=None,
        image_mean=IMAGENET_DEFAULT_MEAN,
        image_std=IMAGENET_DEFAULT_STD,
        num_prototypes=16384,
        prototype_dim=256,
        predictor_num_layers=2,
        predictor_hidden_size=2048,
        sinkhorn_temperature=0.06,
        prediction_temperature=0.12,
        sinkhorn_iterations=3,
        matcher_epsilon=0.1,
        matcher_iterations=5,
        num_masked_views=8,
        mask_ratio=0.8,
        focal_masking_probability=0.5,
        focal_sigma_range=(0.1, 0.5),
        num_local_views=8,
        local_image_size=96,
        koleo_weight=0.1,
        reconstruction_weight=None,
        use_cls_clustering=True,
        use_ema_teacher=False,
        ema_momentum=0.996,
        ema_momentum_end=0.996,
        **kwargs,
    ):
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.qkv_bias = qkv_bias
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.initializer_range = initializer_range
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.num_sparse_tokens = num_sparse_tokens
        self.spatial_temperature = spatial_temperature
        self.decoder_hidden_size = decoder_hidden_size
        self.decoder_num_hidden_layers = decoder_num_hidden_layers
        self.decoder_num_attention_heads = decoder_num_attention_heads
        self.decoder_intermediate_size = decoder_intermediate_size
        self.reconstruction_target = reconstruction_target
        self.vq_codebook_size = vq_codebook_size
        self.vq_image_size = vq_image_size
        self.vq_tokenizer_name_or_path = vq_tokenizer_name_or_path
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.num_prototypes = num_prototypes
        self.prototype_dim = prototype_dim
        self.predictor_num_layers = predictor_num_layers
        self.predictor_hidden_size = predictor_hidden_size
        self.sinkhorn_temperature = sinkhorn_temperature
        self.prediction_temperature = prediction_temperature
        self.sinkhorn_iterations = sinkhorn_iterations
        self.matcher_epsilon = matcher_epsilon
        self.matcher_iterations = matcher_iterations
        self.num_masked_views = num_masked_views
        self.mask_ratio = mask_ratio
        self.focal_masking_probability = focal_masking_probability
        self.focal_sigma_range = list(focal_sigma_range)
        self.num_local_views = num_local_views
        self.local_image_size = local_image_size
        self.koleo_weight = koleo_weight
        self.reconstruction_weight = reconstruction_weight
        self.use_cls_clustering = use_cls_clustering
        self.use_ema_teacher = use_ema_teacher
        self.ema_momentum = ema_momentum
        self.ema_momentum_end = ema_momentum_end
        super().__init__(**kwargs)
        self.validate_stellar_fields()

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches in the encoder sequence (the CLS token)."""
        return 1

    @property
    def effective_reconstruction_weight(self) -> float:
        """`reconstruction_weight`, or the original's default for the configured target."""
        if self.reconstruction_weight is not None:
            return float(self.reconstruction_weight)
        return DEFAULT_RECONSTRUCTION_WEIGHTS[self.reconstruction_target]

    def validate_stellar_fields(self) -> None:
        """Raise `ValueError` naming the first field whose value cannot build a working model."""
        positive_ints = (
            "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size",
            "patch_size", "num_channels", "num_sparse_tokens", "decoder_hidden_size", "decoder_num_hidden_layers",
            "decoder_num_attention_heads", "decoder_intermediate_size", "vq_codebook_size", "vq_image_size",
            "num_prototypes", "prototype_dim", "predictor_num_layers", "predictor_hidden_size",
            "sinkhorn_iterations", "matcher_iterations", "local_image_size",
        )  # fmt: skip
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"StellarConfig.{name} must be a positive integer, got {value!r}")
        for name in ("num_masked_views", "num_local_views"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"StellarConfig.{name} must be a non-negative integer, got {value!r}")
        positive_floats = (
            "layer_norm_eps", "initializer_range", "sinkhorn_temperature", "prediction_temperature", "matcher_epsilon",
        )  # fmt: skip
        for name in positive_floats:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"StellarConfig.{name} must be a positive number, got {value!r}")
        if self.spatial_temperature is not None and not (
            isinstance(self.spatial_temperature, (int, float)) and self.spatial_temperature > 0
        ):
            raise ValueError(
                f"StellarConfig.spatial_temperature must be a positive number or None, got {self.spatial_temperature!r}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"StellarConfig.hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.decoder_hidden_size % self.decoder_num_attention_heads:
            raise ValueError(
                f"StellarConfig.decoder_hidden_size ({self.decoder_hidden_size}) must be divisible by "
                f"decoder_num_attention_heads ({self.decoder_num_attention_heads})"
            )
        if self.decoder_hidden_size % 2:
            raise ValueError(
                "StellarConfig.decoder_hidden_size must be even: the Fourier position encoding pairs sin and cos, "
                f"got {self.decoder_hidden_size}"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"StellarConfig.image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})"
            )
        if self.hidden_act not in ACT2FN:
            raise ValueError(f"StellarConfig.hidden_act {self.hidden_act!r} is not a known activation")
        if self.local_image_size < self.patch_size:
            raise ValueError(
                f"StellarConfig.local_image_size ({self.local_image_size}) is smaller than one patch ({self.patch_size})"
            )
        if self.reconstruction_target not in RECONSTRUCTION_TARGETS:
            raise ValueError(
                f"StellarConfig.reconstruction_target must be one of {RECONSTRUCTION_TARGETS}, "
                f"got {self.reconstruction_target!r}"
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "focal_masking_probability"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"StellarConfig.{name} must be in [0, 1], got {value!r}")
        if not isinstance(self.mask_ratio, (int, float)) or not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"StellarConfig.mask_ratio must be in [0, 1), got {self.mask_ratio!r}")
        for name in ("ema_momentum", "ema_momentum_end"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"StellarConfig.{name} must be in [0, 1], got {value!r}")
        if len(self.focal_sigma_range) != 2:
            raise ValueError(
                f"StellarConfig.focal_sigma_range must be a (low, high) pair, got {self.focal_sigma_range}"
            )
        low, high = self.focal_sigma_range
        if not 0 < low <= high:
            raise ValueError(f"StellarConfig.focal_sigma_range must satisfy 0 < low <= high, got {self.focal_sigma_range}")
        for name in ("image_mean", "image_std"):
            if len(getattr(self, name)) != self.num_channels:
                raise ValueError(
                    f"StellarConfig.{name} needs one value per channel ({self.num_channels}), got {getattr(self, name)}"
                )
        if any(value <= 0 for value in self.image_std):
            raise ValueError(f"StellarConfig.image_std must be positive, got {self.image_std}")
        if self.koleo_weight < 0:
            raise ValueError(f"StellarConfig.koleo_weight must be non-negative, got {self.koleo_weight!r}")
        if self.reconstruction_weight is not None and self.reconstruction_weight < 0:
            raise ValueError(
                f"StellarConfig.reconstruction_weight must be non-negative or None, got {self.reconstruction_weight!r}"
            )


__all__ = ["StellarConfig"]
