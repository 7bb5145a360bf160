"""STELLAR model configuration, with a rule for every field (see `STELLAR_FIELD_RULES`)."""

import inspect
import math
import numbers
import os
from collections.abc import Collection, Mapping, Set
from dataclasses import dataclass

from transformers import PretrainedConfig
from transformers.activations import ACT2FN

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)

RECONSTRUCTION_TARGETS = ("pixel", "vq")
# The original picks the reconstruction weight by target when none is given.
DEFAULT_RECONSTRUCTION_WEIGHTS = {"pixel": 10.0, "vq": 0.05}


# ----------------------------------------------------------------------------------------------------------------------
# Field rules
#
# Every `__init__` parameter of `StellarConfig` has exactly one rule below (checked when this module is imported). A
# rule checks the type, finiteness and range of one field on its own and returns the value to store (Python `int`,
# `float`, `list` or `str`, so the config always serialises to JSON); checks that tie fields together live in
# `StellarConfig.validate_stellar_fields`.
# ----------------------------------------------------------------------------------------------------------------------


def _refusal(name: str, expected: str, value, reason: str = "") -> ValueError:
    """The `ValueError` of a refused field value: names the field, what it accepts and what it got."""
    return ValueError(f"StellarConfig.{name} must be {expected}, got {value!r} ({type(value).__name__}){reason}")


@dataclass(frozen=True)
class IntegerRule:
    """An integer (a real `int`; `bool`, floats such as 2.0 and strings are refused) of at least `minimum`."""

    minimum: int = 1

    def describe(self) -> str:
        return {0: "a non-negative integer", 1: "a positive integer"}.get(self.minimum, f"an integer >= {self.minimum}")

    def check(self, name: str, value) -> int:
        """`value` as a Python `int`, or `ValueError` naming `name`."""
        # bool is an int subclass: `True` would silently mean 1.
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < self.minimum:
            raise _refusal(name, self.describe(), value)
        return int(value)


@dataclass(frozen=True)
class NumberRule:
    """A finite real number (an `int` or `float`, not a `bool` or a string) within the given bounds, or `None` when
    `optional`."""

    minimum: float = -math.inf
    maximum: float = math.inf
    minimum_excluded: bool = False
    maximum_excluded: bool = False
    optional: bool = False

    def describe(self) -> str:
        bounds = []
        if self.minimum > -math.inf:
            bounds.append(f"{'>' if self.minimum_excluded else '>='} {self.minimum:g}")
        if self.maximum < math.inf:
            bounds.append(f"{'<' if self.maximum_excluded else '<='} {self.maximum:g}")
        text = "a finite number" + (" " + " and ".join(bounds) if bounds else "")
        return text + (" or None" if self.optional else "")

    def check(self, name: str, value) -> float | None:
        """`value` as a Python `float` (or `None` when optional), or `ValueError` naming `name`."""
        if value is None and self.optional:
            return None
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise _refusal(name, self.describe(), value)
        number = float(value)
        # NaN fails every comparison below, so it is refused here with the reason spelled out.
        if not math.isfinite(number):
            raise _refusal(name, self.describe(), value, ": NaN and infinities are refused")
        too_low = number <= self.minimum if self.minimum_excluded else number < self.minimum
        too_high = number >= self.maximum if self.maximum_excluded else number > self.maximum
        if too_low or too_high:
            raise _refusal(name, self.describe(), value)
        return number


@dataclass(frozen=True)
class BooleanRule:
    """A real `bool`: the string `"false"` (truthy) and the numbers 0 and 1 are refused."""

    def describe(self) -> str:
        return "True or False (a JSON boolean, not a string or a number)"

    def check(self, name: str, value) -> bool:
        """`value` itself, or `ValueError` naming `name`."""
        if not isinstance(value, bool):
            raise _refusal(name, self.describe(), value)
        return value


@dataclass(frozen=True)
class ChoiceRule:
    """One string out of `choices`."""

    choices: tuple[str, ...]

    def describe(self) -> str:
        return f"one of {self.choices}"

    def check(self, name: str, value) -> str:
        """`value` itself, or `ValueError` naming `name`."""
        if not isinstance(value, str) or value not in self.choices:
            raise _refusal(name, self.describe(), value)
        return value


@dataclass(frozen=True)
class PathRule:
    """A non-empty folder path or Hub id (a `str` or `os.PathLike`, stored as `str`), or `None`."""

    def describe(self) -> str:
        return "a folder or Hub id (a non-empty string or path) or None"

    def check(self, name: str, value) -> str | None:
        """`value` as a `str` (or `None`), or `ValueError` naming `name`."""
        if value is None:
            return None
        if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
            raise _refusal(name, self.describe(), value)
        # Stored as str: the model tells a name (str) from a tokenizer instance by type, and JSON needs a str.
        return str(os.fspath(value))


@dataclass(frozen=True)
class NumberSequenceRule:
    """
    A sequence (list, tuple, array) of numbers, each checked by `element`, stored as a `list` of floats.

    `length` fixes the number of entries (`None`: any positive number; the per-channel length is a cross-field check);
    `non_decreasing` asks for `low <= high` order.
    """

    element: NumberRule
    length: int | None = None
    non_decreasing: bool = False

    def describe(self) -> str:
        count = f"{self.length} numbers" if self.length is not None else "numbers"
        order = ", non-decreasing" if self.non_decreasing else ""
        return f"a list of {count} (each {self.element.describe()}{order})"

    def check(self, name: str, value) -> list[float]:
        """`value` as a list of Python floats, or `ValueError` naming `name` (and the entry, for a bad entry)."""
        # Strings are collections of characters and sets have no order: neither is a list of numbers.
        if isinstance(value, (str, bytes, Mapping, Set)) or not isinstance(value, Collection):
            raise _refusal(name, self.describe(), value)
        if (self.length is not None and len(value) != self.length) or len(value) == 0:
            raise _refusal(name, self.describe(), value, f": it has {len(value)} entries")
        entries = [self.element.check(f"{name}[{index}]", entry) for index, entry in enumerate(value)]
        if self.non_decreasing and any(low > high for low, high in zip(entries, entries[1:])):
            raise _refusal(name, self.describe(), value, ": entries must satisfy low <= high")
        return entries


POSITIVE_INTEGER = IntegerRule(minimum=1)
NON_NEGATIVE_INTEGER = IntegerRule(minimum=0)
POSITIVE_NUMBER = NumberRule(minimum=0.0, minimum_excluded=True)
NON_NEGATIVE_NUMBER = NumberRule(minimum=0.0)
PROBABILITY = NumberRule(minimum=0.0, maximum=1.0)
BOOLEAN = BooleanRule()

# One rule per `StellarConfig.__init__` parameter, in signature order.
STELLAR_FIELD_RULES = {
    "hidden_size": POSITIVE_INTEGER,
    "num_hidden_layers": POSITIVE_INTEGER,
    "num_attention_heads": POSITIVE_INTEGER,
    "intermediate_size": POSITIVE_INTEGER,
    "hidden_act": ChoiceRule(tuple(ACT2FN)),
    "layer_norm_eps": POSITIVE_NUMBER,
    "qkv_bias": BOOLEAN,
    "image_size": POSITIVE_INTEGER,
    "patch_size": POSITIVE_INTEGER,
    "num_channels": POSITIVE_INTEGER,
    "initializer_range": POSITIVE_NUMBER,
    "hidden_dropout_prob": PROBABILITY,
    "attention_probs_dropout_prob": PROBABILITY,
    "num_sparse_tokens": POSITIVE_INTEGER,
    "spatial_temperature": NumberRule(minimum=0.0, minimum_excluded=True, optional=True),
    "decoder_hidden_size": POSITIVE_INTEGER,
    "decoder_num_hidden_layers": POSITIVE_INTEGER,
    "decoder_num_attention_heads": POSITIVE_INTEGER,
    "decoder_intermediate_size": POSITIVE_INTEGER,
    "reconstruction_target": ChoiceRule(RECONSTRUCTION_TARGETS),
    "vq_codebook_size": POSITIVE_INTEGER,
    "vq_image_size": POSITIVE_INTEGER,
    "vq_tokenizer_name_or_path": PathRule(),
    "image_mean": NumberSequenceRule(NumberRule()),
    "image_std": NumberSequenceRule(POSITIVE_NUMBER),
    "num_prototypes": POSITIVE_INTEGER,
    "prototype_dim": POSITIVE_INTEGER,
    "predictor_num_layers": POSITIVE_INTEGER,
    "predictor_hidden_size": POSITIVE_INTEGER,
    "sinkhorn_temperature": POSITIVE_NUMBER,
    "prediction_temperature": POSITIVE_NUMBER,
    "sinkhorn_iterations": POSITIVE_INTEGER,
    "matcher_epsilon": POSITIVE_NUMBER,
    "matcher_iterations": POSITIVE_INTEGER,
    "num_masked_views": NON_NEGATIVE_INTEGER,
    # 1.0 would keep no patch of a masked view.
    "mask_ratio": NumberRule(minimum=0.0, maximum=1.0, maximum_excluded=True),
    "focal_masking_probability": PROBABILITY,
    "focal_sigma_range": NumberSequenceRule(POSITIVE_NUMBER, length=2, non_decreasing=True),
    "num_local_views": NON_NEGATIVE_INTEGER,
    "local_image_size": POSITIVE_INTEGER,
    "koleo_weight": NON_NEGATIVE_NUMBER,
    "reconstruction_weight": NumberRule(minimum=0.0, optional=True),
    "use_cls_clustering": BOOLEAN,
    "use_ema_teacher": BOOLEAN,
    "ema_momentum": PROBABILITY,
    "ema_momentum_end": PROBABILITY,
}


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

    Every field has a rule in `STELLAR_FIELD_RULES` (type, finiteness, range; e.g. a `bool` field refuses the string
    `"false"`, a float field refuses NaN and infinities). A field is checked whenever it is assigned (in `__init__`,
    by `from_pretrained(..., field=value)` and afterwards), and the checks that tie fields together (divisibility,
    one mean and std per channel) run at the end of `__init__`, of `from_dict` / `from_pretrained` and of
    `save_pretrained`. A refused value raises `ValueError` naming the field.
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
        self.image_mean = image_mean
        self.image_std = image_std
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
        self.focal_sigma_range = focal_sigma_range
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

    def __setattr__(self, name: str, value) -> None:
        # Checking on assignment covers every way in: the constructor, `from_pretrained(..., field=value)` and
        # `from_dict` keyword overrides (which assign after construction) and later edits. The stored value is the
        # rule's normalised one (Python int / float / list), so the config always serialises to JSON.
        rule = STELLAR_FIELD_RULES.get(name)
        if rule is not None:
            value = rule.check(name, value)
        super().__setattr__(name, value)

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """
        `PretrainedConfig.from_dict` (the path of `from_pretrained`, `AutoConfig` and every model's
        `from_pretrained`), then [`validate_stellar_fields`] on the result: keyword overrides are assigned one at a
        time after construction, so only the finished config can be checked as a whole.
        """
        loaded = super().from_dict(config_dict, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        config.validate_stellar_fields()
        return loaded

    def validate(self) -> None:
        """transformers' own checks, then [`validate_stellar_fields`]; `save_pretrained` calls it, so a config edited
        after construction is checked as a whole before it is written."""
        super().validate()
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
        """
        Raise `ValueError` naming the first field whose value cannot build a working model: every field against its
        rule in `STELLAR_FIELD_RULES`, then the rules that tie fields together.
        """
        for name, rule in STELLAR_FIELD_RULES.items():
            rule.check(name, getattr(self, name))
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
        if self.local_image_size < self.patch_size:
            raise ValueError(
                f"StellarConfig.local_image_size ({self.local_image_size}) is smaller than one patch ({self.patch_size})"
            )
        for name in ("image_mean", "image_std"):
            if len(getattr(self, name)) != self.num_channels:
                raise ValueError(
                    f"StellarConfig.{name} needs one value per channel ({self.num_channels}), got {getattr(self, name)}"
                )


def stellar_init_field_names() -> list[str]:
    """The parameters of `StellarConfig.__init__` that are config fields (all but `self` and `**kwargs`)."""
    parameters = inspect.signature(StellarConfig.__init__).parameters.values()
    return [
        parameter.name
        for parameter in parameters
        if parameter.name != "self" and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
    ]


def _check_every_field_has_a_rule() -> None:
    # Run at import: a field added to `__init__` without a rule (or a rule left for a removed field) is a bug that
    # would let unchecked values in, so the module refuses to load until the table is completed.
    fields = stellar_init_field_names()
    without_rule = [name for name in fields if name not in STELLAR_FIELD_RULES]
    without_field = [name for name in STELLAR_FIELD_RULES if name not in fields]
    if without_rule or without_field:
        raise TypeError(
            f"STELLAR_FIELD_RULES must have one rule per StellarConfig.__init__ parameter: no rule for "
            f"{without_rule}, no parameter for {without_field}"
        )


_check_every_field_has_a_rule()


__all__ = ["StellarConfig"]
