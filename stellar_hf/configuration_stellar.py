"""
STELLAR model configuration, declared the transformers 5.24 way: a `@strict` dataclass config.

Every field is declared once, in the class body, with its type, its default and its rule:
`hidden_size: int = validated_field(POSITIVE_INTEGER, default=768)`. `huggingface_hub`'s `@strict` runs the type
check and the rule on every assignment (the constructor, `from_pretrained(..., field=value)` overrides, later edits),
and the class validators (the `validate_*` methods: the checks that tie fields together) at the end of the
constructor. `@refusals_name_the_field`, applied over `@strict`, makes every refusal a `ValueError` that starts with
`StellarConfig.<field>`, stores values as plain JSON types, and runs the whole check again after `from_dict` overrides
and before `save_pretrained` writes.
"""

import math
import numbers
import os
from collections.abc import Collection, Mapping, Set
from dataclasses import MISSING, dataclass, fields
from types import MappingProxyType

from huggingface_hub.dataclasses import strict, validated_field
from huggingface_hub.errors import StrictDataclassClassValidationError, StrictDataclassFieldValidationError
from transformers import PreTrainedConfig
from transformers.activations import ACT2FN
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


RECONSTRUCTION_TARGETS = ("pixel", "vq")
# The original picks the reconstruction weight by target when none is given.
DEFAULT_RECONSTRUCTION_WEIGHTS = {"pixel": 10.0, "vq": 0.05}


# ----------------------------------------------------------------------------------------------------------------------
# Field rules
#
# A rule is a `@strict` field validator (`validated_field(RULE, default=...)`) that also says what the field accepts
# (`describe`, for the error message), which Python type it stores (`annotation`, which must be the field's declared
# type) and how an accepted value becomes that plain type (`to_plain`: 1 -> 1.0 for a float, a tuple or array -> a
# list, a path -> a str, a NumPy integer -> an int), so the config always serialises to JSON. A rule judges the value
# as given, so a refusal reports what the caller passed.
# ----------------------------------------------------------------------------------------------------------------------


class FieldRefusal(ValueError):
    """
    A value refused by a field rule: what the field accepts, the value, why (`reason`) and, for an entry of a list,
    which one (`entry`, e.g. `"[1]"`). [`refusals_name_the_field`] names the config and the field in front of it.
    """

    def __init__(self, expected: str, value, reason: str = "", entry: str = ""):
        self.expected, self.value, self.reason, self.entry = expected, value, reason, entry
        super().__init__(self.message())

    def message(self, field: str = "") -> str:
        """The refusal as `'<field><entry> must be <expected>, got <value> (<type>)<reason>'`."""
        got = f"{self.value!r} ({type(self.value).__name__})"
        return f"{field}{self.entry} must be {self.expected}, got {got}{self.reason}".lstrip()

    def in_entry(self, index: int) -> "FieldRefusal":
        """The same refusal, about entry `index` of a list."""
        return FieldRefusal(self.expected, self.value, self.reason, f"[{index}]{self.entry}")


class FieldRule:
    """Base of the rules: a callable that raises [`FieldRefusal`] (a `ValueError`) for a value it refuses."""

    def describe(self) -> str:
        raise NotImplementedError

    @property
    def annotation(self):
        """The type a field with this rule is declared with (and stores)."""
        raise NotImplementedError

    def to_plain(self, value):
        """`value` as the plain Python type it is stored as, when it is of a kind the rule accepts; else unchanged."""
        return value

    def __call__(self, value) -> None:
        raise NotImplementedError

    def refuse(self, value, reason: str = "") -> FieldRefusal:
        return FieldRefusal(self.describe(), value, reason)


@dataclass(frozen=True)
class IntegerRule(FieldRule):
    """An integer (a real `int` or NumPy integer; `bool`, floats such as 2.0 and strings are refused) of at least
    `minimum`."""

    minimum: int = 1

    def describe(self) -> str:
        return {0: "a non-negative integer", 1: "a positive integer"}.get(self.minimum, f"an integer >= {self.minimum}")

    @property
    def annotation(self):
        return int

    def to_plain(self, value):
        return int(value) if _is_integer(value) else value

    def __call__(self, value) -> None:
        # bool is an int subclass: `True` would silently mean 1.
        if not _is_integer(value) or value < self.minimum:
            raise self.refuse(value)


@dataclass(frozen=True)
class NumberRule(FieldRule):
    """A finite real number (an `int` or `float`, not a `bool` or a string) within the given bounds, or `None` when
    `optional`. Stored as a `float`."""

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

    @property
    def annotation(self):
        return float | None if self.optional else float

    def to_plain(self, value):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or type(value) is float:
            return value
        try:
            return float(value)
        except OverflowError:  # an int too large for a float: refused by the type check, then by `__call__`
            return value

    def __call__(self, value) -> None:
        if value is None and self.optional:
            return
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise self.refuse(value)
        try:
            number = float(value)
        except OverflowError:
            raise self.refuse(value, ": it is too large for a float") from None
        # NaN fails every comparison below, so it is refused here with the reason spelled out.
        if not math.isfinite(number):
            raise self.refuse(value, ": NaN and infinities are refused")
        too_low = number <= self.minimum if self.minimum_excluded else number < self.minimum
        too_high = number >= self.maximum if self.maximum_excluded else number > self.maximum
        if too_low or too_high:
            raise self.refuse(value)


@dataclass(frozen=True)
class BooleanRule(FieldRule):
    """A real `bool`: the string `"false"` (truthy) and the numbers 0 and 1 are refused."""

    def describe(self) -> str:
        return "True or False (a JSON boolean, not a string or a number)"

    @property
    def annotation(self):
        return bool

    def __call__(self, value) -> None:
        if not isinstance(value, bool):
            raise self.refuse(value)


@dataclass(frozen=True)
class ChoiceRule(FieldRule):
    """One string out of `choices`."""

    choices: tuple[str, ...]

    def describe(self) -> str:
        return f"one of {self.choices}"

    @property
    def annotation(self):
        return str

    def __call__(self, value) -> None:
        if not isinstance(value, str) or value not in self.choices:
            raise self.refuse(value)


@dataclass(frozen=True)
class PathRule(FieldRule):
    """A non-empty folder path or Hub id (a `str` or `os.PathLike`, stored as `str`), or `None`."""

    def describe(self) -> str:
        return "a folder or Hub id (a non-empty string or path) or None"

    @property
    def annotation(self):
        return str | None

    def to_plain(self, value):
        # Stored as str: the model tells a name (str) from a tokenizer instance by type, and JSON needs a str.
        if isinstance(value, os.PathLike) and isinstance(os.fspath(value), str):
            return os.fspath(value)
        return value

    def __call__(self, value) -> None:
        if value is None:
            return
        if not isinstance(value, (str, os.PathLike)) or not isinstance(os.fspath(value), str) or not os.fspath(value):
            raise self.refuse(value)


@dataclass(frozen=True)
class SequenceRule(FieldRule):
    """
    A sequence (list, tuple, array) of numbers, each checked by `element` (an [`IntegerRule`] or a non-optional
    [`NumberRule`]), stored as a `list` of `int` or `float`.

    `length` fixes the number of entries (`None`: any positive number; a per-channel length is a class validator);
    `non_decreasing` asks for `low <= high` order.
    """

    element: IntegerRule | NumberRule
    length: int | None = None
    non_decreasing: bool = False

    def describe(self) -> str:
        noun = "integers" if isinstance(self.element, IntegerRule) else "numbers"
        count = f"{self.length} {noun}" if self.length is not None else noun
        order = ", non-decreasing" if self.non_decreasing else ""
        return f"a list of {count} (each {self.element.describe()}{order})"

    @property
    def annotation(self):
        return list[self.element.annotation]

    @staticmethod
    def _is_sequence(value) -> bool:
        # Strings are collections of characters and sets have no order: neither is a list of numbers.
        return isinstance(value, Collection) and not isinstance(value, (str, bytes, Mapping, Set))

    def to_plain(self, value):
        return [self.element.to_plain(entry) for entry in value] if self._is_sequence(value) else value

    def __call__(self, value) -> None:
        if not self._is_sequence(value):
            raise self.refuse(value)
        if (self.length is not None and len(value) != self.length) or len(value) == 0:
            raise self.refuse(value, f": it has {len(value)} entries")
        for index, entry in enumerate(value):
            try:
                self.element(entry)
            except FieldRefusal as refusal:
                raise refusal.in_entry(index) from None
        entries = list(value)
        if self.non_decreasing and any(low > high for low, high in zip(entries, entries[1:])):
            raise self.refuse(value, ": entries must satisfy low <= high")


def _is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


POSITIVE_INTEGER = IntegerRule(minimum=1)
NON_NEGATIVE_INTEGER = IntegerRule(minimum=0)
POSITIVE_NUMBER = NumberRule(minimum=0.0, minimum_excluded=True)
NON_NEGATIVE_NUMBER = NumberRule(minimum=0.0)
PROBABILITY = NumberRule(minimum=0.0, maximum=1.0)
BOOLEAN = BooleanRule()


def field_rules(config_class) -> dict[str, FieldRule]:
    """The rule of every field of `config_class` declared with one (`validated_field(RULE, ...)`), in field order."""
    rules = {}
    for field in fields(config_class):
        found = [validator for validator in field.metadata.get("validator", []) if isinstance(validator, FieldRule)]
        if found:
            rules[field.name] = found[0]
    return rules


def field_default(config_class, name: str):
    """The default of field `name` of `config_class` (a fresh one for a list field)."""
    field = config_class.__dataclass_fields__[name]
    return field.default_factory() if field.default is MISSING else field.default


def _named_refusal(owner: str, name: str, value, rule: FieldRule | None, cause: Exception) -> ValueError:
    """The `ValueError` for `owner.name = value` refused by `cause` (its rule, or `@strict`'s type check)."""
    got = f"got {value!r} ({type(value).__name__})"
    if rule is None:  # a field of `PreTrainedConfig` itself
        return ValueError(f"{owner}.{name} was refused, {got}: {cause}")
    try:
        rule(value)  # the value as given, so the message reports what the caller passed
    except FieldRefusal as refusal:
        return ValueError(refusal.message(f"{owner}.{name}"))
    # Only when a value of a kind the rule accepts is not made plain by `to_plain`: the type check refused it.
    return ValueError(f"{owner}.{name} must be {rule.describe()}, {got}: {cause}")


def refusals_name_the_field(cls):
    """
    Class decorator applied over `@strict` (`@refusals_name_the_field` above `@strict` above the class) for a config
    whose fields carry [`FieldRule`]s. It keeps `@strict` as the one place values are checked and adds:

    - at import, a `TypeError` unless every field the class declares (beyond `PreTrainedConfig`'s) has exactly one
      rule and is annotated with the type that rule stores;
    - on assignment, the value is first made plain (`FieldRule.to_plain`), so that what is stored is an `int`,
      `float`, `list` or `str`;
    - every refusal is a `ValueError` starting with `<Config>.<field>` and saying what the field accepts and what it
      got (`@strict` raises `StrictDataclassFieldValidationError`, which is not a `ValueError`, with a message of its
      own); a class validator's error comes out as a `ValueError` with its own message (ours start with
      `<Config>.<field>` too);
    - `validate()` (run by the constructor and by `save_pretrained`) checks every field again, so that a list edited
      in place is caught, then runs the class validators;
    - `from_dict` (the path of `from_pretrained` and `AutoConfig`) runs `validate()` after its keyword overrides,
      which it assigns one at a time after construction.
    """
    if not getattr(cls.__dict__.get("validate"), "__is_defined_by_strict_decorator__", False):
        raise TypeError(f"{cls.__name__}: apply @refusals_name_the_field over @strict")
    owner = cls.__name__
    inherited = {field.name for field in fields(PreTrainedConfig)}
    for field in fields(cls):
        if field.name in inherited:
            continue
        found = [validator for validator in field.metadata.get("validator", []) if isinstance(validator, FieldRule)]
        if len(found) != 1:
            raise TypeError(
                f"{owner}.{field.name} must be declared with exactly one field rule, as "
                f"`{field.name}: int = validated_field(POSITIVE_INTEGER, default=...)`; it has {len(found)}"
            )
        if field.type != found[0].annotation:
            raise TypeError(
                f"{owner}.{field.name} is annotated {field.type!r} but its rule {found[0]!r} stores "
                f"{found[0].annotation!r}"
            )
    rules = MappingProxyType(field_rules(cls))
    strict_setattr, strict_validate = cls.__setattr__, cls.validate

    def __setattr__(self, name: str, value) -> None:
        rule = rules.get(name)
        try:
            strict_setattr(self, name, value if rule is None else rule.to_plain(value))
        except StrictDataclassFieldValidationError as error:
            raise _named_refusal(owner, name, value, rule, error.__cause__) from error

    def validate(self) -> None:
        """Every field against its type and rule, then the class validators; `ValueError` naming the field."""
        validators = type(self).__validators__
        for name, rule in rules.items():
            value = getattr(self, name)
            plain = rule.to_plain(value)  # a list edited in place may hold an int: it is stored as a float
            for validator in validators[name]:
                try:
                    validator(plain)
                except (ValueError, TypeError) as cause:
                    raise _named_refusal(owner, name, value, rule, cause) from cause
        try:
            strict_validate(self)
        except StrictDataclassClassValidationError as error:
            raise ValueError(str(error.__cause__)) from error

    # `@strict` on a subclass replaces a `validate` it made itself; any other it refuses.
    validate.__is_defined_by_strict_decorator__ = True

    def from_dict(klass, config_dict: dict, **kwargs):
        """
        `PreTrainedConfig.from_dict` (the path of `from_pretrained`, `AutoConfig` and every model's
        `from_pretrained`), then `validate()` on the result: keyword overrides are assigned one at a time after
        construction, so only the finished config can be checked as a whole.
        """
        loaded = super(cls, klass).from_dict(config_dict, **kwargs)
        (loaded[0] if isinstance(loaded, tuple) else loaded).validate()
        return loaded

    cls.__setattr__, cls.validate = __setattr__, validate
    if "from_dict" not in cls.__dict__:
        cls.from_dict = classmethod(from_dict)
    return cls


@refusals_name_the_field
@strict
class StellarConfig(PreTrainedConfig):
    r"""
    Configuration of a STELLAR model: a ViT encoder that also reads `num_sparse_tokens` learnable sparse tokens, the
    spatial-semantic factorization, the reconstruction decoder and the pretraining heads.

    Defaults reproduce the released STELLAR-B16 (ViT-B/16 at 224 px, 16 sparse tokens, VQ reconstruction target).

    Args:
        hidden_size (`int`, *optional*, defaults to 768):
            Width d of the encoder.
        num_hidden_layers (`int`, *optional*, defaults to 12):
            Encoder depth.
        num_attention_heads (`int`, *optional*, defaults to 12):
            Encoder heads; must divide `hidden_size`.
        intermediate_size (`int`, *optional*, defaults to 3072):
            Encoder MLP width.
        hidden_act (`str`, *optional*, defaults to `"gelu"`):
            Activation of every MLP (exact erf GELU in the original); a key of `transformers.activations.ACT2FN`.
        layer_norm_eps (`float`, *optional*, defaults to 1e-12):
            Epsilon of every LayerNorm, encoder and decoder.
        qkv_bias (`bool`, *optional*, defaults to `True`):
            Bias on the query, key and value projections.
        image_size (`int`, *optional*, defaults to 224):
            Side of the square image the position embeddings are learned for; a multiple of `patch_size`.
        patch_size (`int`, *optional*, defaults to 16):
            Patch side p of the encoder (and stride of the pixel head).
        num_channels (`int`, *optional*, defaults to 3):
            Input channels.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Std of the truncated normal used for linear layers.
        hidden_dropout_prob (`float`, *optional*, defaults to 0.0):
            Dropout after attention and MLP.
        attention_probs_dropout_prob (`float`, *optional*, defaults to 0.0):
            Dropout on attention probabilities.
        num_sparse_tokens (`int`, *optional*, defaults to 16):
            Number r of sparse semantic tokens.
        spatial_temperature (`float`, *optional*, defaults to 0.06):
            Temperature of the cosine spatial map; `None` uses raw dot products divided by sqrt(d).
        decoder_hidden_size (`int`, *optional*, defaults to 512):
            Width of the reconstruction decoder; even (the Fourier position encoding pairs sin and cos).
        decoder_num_hidden_layers (`int`, *optional*, defaults to 6):
            Depth of the reconstruction decoder.
        decoder_num_attention_heads (`int`, *optional*, defaults to 8):
            Heads of the reconstruction decoder; must divide `decoder_hidden_size`.
        decoder_intermediate_size (`int`, *optional*, defaults to 2048):
            MLP width of the reconstruction decoder.
        reconstruction_target (`str`, *optional*, defaults to `"vq"`):
            `"pixel"` (ConvTranspose2d head, MSE) or `"vq"` (per-patch logits over the MaskGIT VQGAN codebook,
            cross-entropy).
        vq_codebook_size (`int`, *optional*, defaults to 1024):
            Size of the VQGAN codebook (VQ target only).
        vq_image_size (`int`, *optional*, defaults to 256):
            Resolution the VQGAN tokenizes at when the patch size is 14.
        vq_tokenizer_name_or_path (`str`, *optional*):
            A MaskGIT VQGAN folder or Hub id used to decode VQ predictions to pixels and to make VQ targets when none
            is passed in the call.
        image_mean (`list[float]`, *optional*, defaults to `[0.485, 0.456, 0.406]`):
            Normalisation mean applied by the image processor, one entry per channel; the model undoes it to compare
            reconstructions with the input.
        image_std (`list[float]`, *optional*, defaults to `[0.229, 0.224, 0.225]`):
            Normalisation std applied by the image processor, one positive entry per channel.
        num_prototypes (`int`, *optional*, defaults to 16384):
            Prototypes C of the online clustering heads.
        prototype_dim (`int`, *optional*, defaults to 256):
            Width of the L2-normalised prototype space.
        predictor_num_layers (`int`, *optional*, defaults to 2):
            Linear layers in the clustering predictor (1 = one Linear).
        predictor_hidden_size (`int`, *optional*, defaults to 2048):
            Hidden width of the clustering predictor.
        sinkhorn_temperature (`float`, *optional*, defaults to 0.06):
            Temperature of the Sinkhorn-Knopp targets.
        prediction_temperature (`float`, *optional*, defaults to 0.12):
            Temperature of the predicted distributions.
        sinkhorn_iterations (`int`, *optional*, defaults to 3):
            Sinkhorn-Knopp iterations.
        matcher_epsilon (`float`, *optional*, defaults to 0.1):
            Entropic regularisation of the optimal transport that matches masked-view tokens to the main image's
            tokens.
        matcher_iterations (`int`, *optional*, defaults to 5):
            Iterations of that optimal transport.
        num_masked_views (`int`, *optional*, defaults to 8):
            Global views encoded with masking.
        mask_ratio (`float`, *optional*, defaults to 0.8):
            Fraction of patches removed in a masked view, in [0, 1).
        focal_masking_probability (`float`, *optional*, defaults to 0.5):
            Chance that a masked view keeps a clustered region.
        focal_sigma_range (`list[float]`, *optional*, defaults to `[0.1, 0.5]`):
            Width of the focal bump, in grid sides: `[low, high]` with `0 < low <= high`.
        num_local_views (`int`, *optional*, defaults to 8):
            Local crops whose CLS predicts the CLS targets.
        local_image_size (`int`, *optional*, defaults to 96):
            Side of the local crops; at least one patch.
        koleo_weight (`float`, *optional*, defaults to 0.1):
            Weight of the KoLeo regulariser (applied per term).
        reconstruction_weight (`float`, *optional*):
            Weight of the reconstruction loss; `None` picks 10 for the pixel target and 0.05 for the VQ target, as the
            original does.
        use_cls_clustering (`bool`, *optional*, defaults to `True`):
            Train the CLS clustering head and its losses.
        use_ema_teacher (`bool`, *optional*, defaults to `False`):
            Make targets with an EMA teacher instead of the student.
        ema_momentum (`float`, *optional*, defaults to 0.996):
            Starting momentum of the EMA teacher.
        ema_momentum_end (`float`, *optional*, defaults to 0.996):
            Final momentum (cosine schedule from `ema_momentum`).
        do_global_align (`bool`, *optional*, defaults to `False`):
            Second-view global alignment (spec section 4.1, upstream `do_global_align`): the second global view of
            each image is also encoded in full, and the sparse and CLS clustering losses become the average of the two
            cross-view terms between it and the main image. Needs the student's own targets (`use_ema_teacher=False`)
            and a second global view (`num_masked_views >= 2`).

    Validation: every field is declared with its rule (`STELLAR_FIELD_RULES` lists them: type, finiteness, range; a
    `bool` field refuses the string `"false"`, a float field refuses NaN and infinities) and is checked whenever it is
    assigned: in the constructor, by `from_pretrained(..., field=value)` and afterwards. The class validators (the
    `validate_*` methods: divisibility, one mean and std per channel, a local crop of at least one patch) run at the
    end of the constructor, of `from_dict` / `from_pretrained` and of `save_pretrained`. A refused value raises a
    `ValueError` that starts with `StellarConfig.<field>` and says what the field accepts and what it got.
    Fields are keyword-only.

    Example:
    ```python
    >>> from stellar_hf import StellarConfig
    >>> config = StellarConfig(hidden_size=384, num_attention_heads=6)
    >>> config.hidden_size // config.num_attention_heads, config.image_mean
    (64, [0.485, 0.456, 0.406])
    ```
    """

    model_type = "stellar"

    # Encoder
    hidden_size: int = validated_field(POSITIVE_INTEGER, default=768)
    num_hidden_layers: int = validated_field(POSITIVE_INTEGER, default=12)
    num_attention_heads: int = validated_field(POSITIVE_INTEGER, default=12)
    intermediate_size: int = validated_field(POSITIVE_INTEGER, default=3072)
    hidden_act: str = validated_field(ChoiceRule(tuple(ACT2FN)), default="gelu")
    layer_norm_eps: float = validated_field(POSITIVE_NUMBER, default=1e-12)
    qkv_bias: bool = validated_field(BOOLEAN, default=True)
    image_size: int = validated_field(POSITIVE_INTEGER, default=224)
    patch_size: int = validated_field(POSITIVE_INTEGER, default=16)
    num_channels: int = validated_field(POSITIVE_INTEGER, default=3)
    initializer_range: float = validated_field(POSITIVE_NUMBER, default=0.02)
    hidden_dropout_prob: float = validated_field(PROBABILITY, default=0.0)
    attention_probs_dropout_prob: float = validated_field(PROBABILITY, default=0.0)
    # Sparse tokens and the spatial map
    num_sparse_tokens: int = validated_field(POSITIVE_INTEGER, default=16)
    spatial_temperature: float | None = validated_field(
        NumberRule(minimum=0.0, minimum_excluded=True, optional=True), default=0.06
    )
    # Reconstruction decoder and target
    decoder_hidden_size: int = validated_field(POSITIVE_INTEGER, default=512)
    decoder_num_hidden_layers: int = validated_field(POSITIVE_INTEGER, default=6)
    decoder_num_attention_heads: int = validated_field(POSITIVE_INTEGER, default=8)
    decoder_intermediate_size: int = validated_field(POSITIVE_INTEGER, default=2048)
    reconstruction_target: str = validated_field(ChoiceRule(RECONSTRUCTION_TARGETS), default="vq")
    vq_codebook_size: int = validated_field(POSITIVE_INTEGER, default=1024)
    vq_image_size: int = validated_field(POSITIVE_INTEGER, default=256)
    vq_tokenizer_name_or_path: str | None = validated_field(PathRule(), default=None)
    image_mean: list[float] = validated_field(
        SequenceRule(NumberRule()), default_factory=lambda: list(IMAGENET_DEFAULT_MEAN)
    )
    image_std: list[float] = validated_field(
        SequenceRule(POSITIVE_NUMBER), default_factory=lambda: list(IMAGENET_DEFAULT_STD)
    )
    # Online clustering heads
    num_prototypes: int = validated_field(POSITIVE_INTEGER, default=16384)
    prototype_dim: int = validated_field(POSITIVE_INTEGER, default=256)
    predictor_num_layers: int = validated_field(POSITIVE_INTEGER, default=2)
    predictor_hidden_size: int = validated_field(POSITIVE_INTEGER, default=2048)
    sinkhorn_temperature: float = validated_field(POSITIVE_NUMBER, default=0.06)
    prediction_temperature: float = validated_field(POSITIVE_NUMBER, default=0.12)
    sinkhorn_iterations: int = validated_field(POSITIVE_INTEGER, default=3)
    matcher_epsilon: float = validated_field(POSITIVE_NUMBER, default=0.1)
    matcher_iterations: int = validated_field(POSITIVE_INTEGER, default=5)
    # Views and masking
    num_masked_views: int = validated_field(NON_NEGATIVE_INTEGER, default=8)
    # 1.0 would keep no patch of a masked view.
    mask_ratio: float = validated_field(NumberRule(minimum=0.0, maximum=1.0, maximum_excluded=True), default=0.8)
    focal_masking_probability: float = validated_field(PROBABILITY, default=0.5)
    focal_sigma_range: list[float] = validated_field(
        SequenceRule(POSITIVE_NUMBER, length=2, non_decreasing=True), default_factory=lambda: [0.1, 0.5]
    )
    num_local_views: int = validated_field(NON_NEGATIVE_INTEGER, default=8)
    local_image_size: int = validated_field(POSITIVE_INTEGER, default=96)
    # Loss weights and the teacher
    koleo_weight: float = validated_field(NON_NEGATIVE_NUMBER, default=0.1)
    reconstruction_weight: float | None = validated_field(NumberRule(minimum=0.0, optional=True), default=None)
    use_cls_clustering: bool = validated_field(BOOLEAN, default=True)
    use_ema_teacher: bool = validated_field(BOOLEAN, default=False)
    ema_momentum: float = validated_field(PROBABILITY, default=0.996)
    ema_momentum_end: float = validated_field(PROBABILITY, default=0.996)
    do_global_align: bool = validated_field(BOOLEAN, default=False)

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

    # Class validators: `@strict` runs every `validate_*` method (in name order) at the end of the constructor, and
    # `validate()` (`from_dict`, `save_pretrained`) runs them again. Each field is already valid on its own here.

    def validate_attention_heads(self) -> None:
        """The encoder and decoder widths split evenly into their heads."""
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

    def validate_decoder_width(self) -> None:
        """The decoder's Fourier position encoding pairs sin and cos."""
        if self.decoder_hidden_size % 2:
            raise ValueError(
                "StellarConfig.decoder_hidden_size must be even: the Fourier position encoding pairs sin and cos, "
                f"got {self.decoder_hidden_size}"
            )

    def validate_global_alignment(self) -> None:
        """Second-view global alignment replaces the EMA teacher's targets and reads global view 1."""
        if not self.do_global_align:
            return
        if self.use_ema_teacher:
            raise ValueError(
                "StellarConfig.do_global_align=True cannot be combined with use_ema_teacher=True: the alignment makes "
                "the targets from the student's own two views (upstream uses it only without the momentum teacher); "
                "turn one of them off"
            )
        if self.num_masked_views < 2:
            raise ValueError(
                "StellarConfig.do_global_align=True needs a second global view (global view 1), so num_masked_views "
                f"must be at least 2 (the data pipeline makes max(num_masked_views, 1) global views), got "
                f"{self.num_masked_views}"
            )

    def validate_patch_grid(self) -> None:
        """Images tile into whole patches, and a local crop holds at least one."""
        if self.image_size % self.patch_size:
            raise ValueError(
                f"StellarConfig.image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})"
            )
        if self.local_image_size < self.patch_size:
            raise ValueError(
                f"StellarConfig.local_image_size ({self.local_image_size}) is smaller than one patch "
                f"({self.patch_size})"
            )

    def validate_per_channel_statistics(self) -> None:
        """One normalisation mean and std per input channel."""
        for name in ("image_mean", "image_std"):
            if len(getattr(self, name)) != self.num_channels:
                raise ValueError(
                    f"StellarConfig.{name} needs one value per channel ({self.num_channels}), got {getattr(self, name)}"
                )


# Every field's rule, read from the declarations above (a read-only view).
STELLAR_FIELD_RULES = MappingProxyType(field_rules(StellarConfig))


__all__ = ["StellarConfig"]
