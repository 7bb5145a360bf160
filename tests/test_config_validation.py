"""
`StellarConfig` and `MaskGitVQGANConfig` refuse every value that cannot build a working model, on every way in.

Both are transformers 5.24 `@strict` dataclass configs: each field is declared once with its type, default and rule
(`validated_field(RULE, default=...)`), and the checks that tie fields together are `validate_*` class validators. The
walk is over the declared fields (`dataclasses.fields`), so a field added later is probed too. Each field gets the
values no field accepts (NaN, infinities, arbitrary objects), the wrong types for its kind (the kind read from its
default: `"false"` for a bool, 2.5 for an int, a string for a float, a scalar for a sequence) and the values just
outside its range; each must raise a `ValueError` that starts with `<Config>.<field>` and says what the field accepts
and what it got, through the constructor, `from_dict` (config.json contents), `from_dict` keyword overrides (the path
of `from_pretrained(..., field=value)`) and assignment. Then the transformers machinery (defaults, diff dict, Auto
classes, JSON round trip, copies) must still work, and config.json files saved before the rewrite
(`tests/fixtures/config_json/`) must load to the same config and save to the same file (fields declared since, listed
in `FIELDS_ADDED_SINCE`, load at their default and are set aside for the comparison).
"""

import copy
import dataclasses
import json
import math
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub.dataclasses import strict, validated_field
from huggingface_hub.errors import StrictDataclassError
from stellar_tester import TINY_CONFIG, tiny_config
from transformers import AutoConfig, PreTrainedConfig

from stellar_hf import MaskGitVQGANConfig, StellarConfig, StellarModel
from stellar_hf.configuration_stellar import (
    POSITIVE_INTEGER,
    STELLAR_FIELD_RULES,
    BooleanRule,
    ChoiceRule,
    IntegerRule,
    NumberRule,
    PathRule,
    SequenceRule,
    field_default,
    field_rules,
    refusals_name_the_field,
)

FIXTURES = Path(__file__).parent / "fixtures" / "config_json"
NAN, INF = float("nan"), float("inf")
# No field of any kind accepts these.
UNIVERSAL_PROBES = [NAN, INF, -INF, object(), {"value": 1}]
# `tests/test_vqgan.py`'s tiny tokenizer.
TINY_VQGAN_CONFIG = {
    "hidden_channels": 32,
    "channel_mult": [1, 2],
    "num_res_blocks": 1,
    "z_channels": 32,
    "codebook_size": 16,
    "codebook_dim": 32,
    "image_size": 32,
}


def tiny_vqgan_config(**overrides) -> MaskGitVQGANConfig:
    return MaskGitVQGANConfig(**{**TINY_VQGAN_CONFIG, **overrides})


# Each config class, with a small valid instance of it.
BUILDERS = {StellarConfig: tiny_config, MaskGitVQGANConfig: tiny_vqgan_config}
INHERITED_FIELDS = {field.name for field in dataclasses.fields(PreTrainedConfig)}


def declared_fields(config_class) -> list[str]:
    """The fields `config_class` declares itself (beyond `PreTrainedConfig`'s), in declaration order."""
    return [field.name for field in dataclasses.fields(config_class) if field.name not in INHERITED_FIELDS]


FIELD_CASES = [
    pytest.param(config_class, name, id=f"{config_class.__name__}.{name}")
    for config_class in BUILDERS
    for name in declared_fields(config_class)
]


def field_error(name: str, config_class=StellarConfig) -> str:
    """Pattern of a `ValueError` naming `name` as the refused field (`image_std[1]` names `image_std`)."""
    return re.escape(f"{config_class.__name__}.{name}") + r"\b"


def outside_range(rule: NumberRule | IntegerRule) -> list[float]:
    """The closest values just outside the range of `rule`."""
    if isinstance(rule, IntegerRule):
        return [rule.minimum - 1]
    values = []
    if rule.minimum > -math.inf:
        values.append(rule.minimum if rule.minimum_excluded else math.nextafter(rule.minimum, -math.inf))
    if rule.maximum < math.inf:
        values.append(rule.maximum if rule.maximum_excluded else math.nextafter(rule.maximum, math.inf))
    return values


def inside_range(rule: NumberRule) -> list[float]:
    """The boundary values of `rule` that it accepts."""
    values = []
    if rule.minimum > -math.inf:
        values.append(math.nextafter(rule.minimum, math.inf) if rule.minimum_excluded else rule.minimum)
    if rule.maximum < math.inf:
        values.append(math.nextafter(rule.maximum, -math.inf) if rule.maximum_excluded else rule.maximum)
    return values


def scalar_probes(rule) -> list:
    """Values of the wrong type for a scalar field of `rule`, and values just outside its range."""
    if isinstance(rule, BooleanRule):
        return ["false", "true", "False", 0, 1, 1.0, None, np.bool_(True)]
    if isinstance(rule, IntegerRule):
        return [2.5, 4.0, "4", True, False, None, np.float64(4.0), *outside_range(rule)]
    if isinstance(rule, NumberRule):
        return ["0.1", True, False, 1j, 10**400, *outside_range(rule)] + ([] if rule.optional else [None])
    if isinstance(rule, ChoiceRule):
        return [3, None, True, "", "not-a-choice"]
    if isinstance(rule, PathRule):
        return [3, True, "", 0.5, b"folder"]
    pytest.fail(f"no probes for a field with rule {rule!r}; add them here")


def bad_values(config_class, name: str) -> list:
    """Every value field `name` must refuse: the universal probes, wrong types for its kind, values out of range."""
    default = field_default(config_class, name)
    rule = field_rules(config_class)[name]
    probes = list(UNIVERSAL_PROBES)
    # The kind is read from the default, so a rule of the wrong kind is caught too.
    if isinstance(default, bool):
        assert isinstance(rule, BooleanRule), f"{name} defaults to a bool but its rule is {rule}"
    elif isinstance(default, int):
        assert isinstance(rule, IntegerRule), f"{name} defaults to an int but its rule is {rule}"
    elif isinstance(default, float):
        assert isinstance(rule, NumberRule), f"{name} defaults to a float but its rule is {rule}"
    elif isinstance(default, (tuple, list)):
        assert isinstance(rule, SequenceRule), f"{name} defaults to a sequence but its rule is {rule}"
    if not isinstance(rule, SequenceRule):
        return probes + scalar_probes(rule)
    length = len(default)
    probes += [0.5, "abc", None, set(default), [], torch.tensor(default)]
    probes += [[value] * length for value in UNIVERSAL_PROBES + scalar_probes(rule.element)]
    if rule.length is not None:  # a per-channel length is a class validator, tested on its own below
        probes.append(list(default) + [list(default)[-1]])
    return probes


def assert_names_the_field(error: pytest.ExceptionInfo, config_class, name: str, value) -> None:
    """The refusal is a `ValueError` starting with `<Config>.<field>` that says what it accepts and what it got."""
    message = str(error.value)
    assert type(error.value) is ValueError and not isinstance(error.value, StrictDataclassError), repr(error.value)
    prefix = f"{config_class.__name__}.{name}"
    assert message.startswith(prefix), message
    rule = field_rules(config_class)[name]
    entry = re.match(re.escape(prefix) + r"\[(\d+)\]", message)
    if entry:  # one entry of a list is named: the message is about that entry
        rule, value = rule.element, list(value)[int(entry.group(1))]
    assert f"must be {rule.describe()}, got {value!r} ({type(value).__name__})" in message, message


# ---------------------------------------------------------------------------------------------- the declarations


@pytest.mark.parametrize("config_class", list(BUILDERS))
def test_every_declared_field_has_exactly_one_rule_and_its_type(config_class):
    rules = field_rules(config_class)
    assert list(rules) == declared_fields(config_class)
    for field in dataclasses.fields(config_class):
        if field.name in rules:
            assert field.type == rules[field.name].annotation, field.name
            assert field.metadata["validator"].count(rules[field.name]) == 1
    assert dict(STELLAR_FIELD_RULES) == field_rules(StellarConfig)


@pytest.mark.parametrize("config_class", list(BUILDERS))
def test_every_default_passes_its_rule_and_is_stored_plain(config_class):
    config = config_class()
    for name, rule in field_rules(config_class).items():
        rule(field_default(config_class, name))
        value = getattr(config, name)
        assert value == field_default(config_class, name)
        assert type(value) is type(rule.to_plain(value)), name


@pytest.mark.parametrize("config_class", list(BUILDERS))
def test_docstring_documents_every_field(config_class):
    for name in declared_fields(config_class):
        assert re.search(rf"^ {{8}}{name} \(`", config_class.__doc__, re.MULTILINE), f"{name} is not documented"


def test_a_field_declared_without_a_rule_stops_the_import():
    with pytest.raises(TypeError, match=r"Broken\.koleo_weight must be declared with exactly one field rule"):

        @refusals_name_the_field
        @strict
        class Broken(PreTrainedConfig):
            model_type = "broken"
            hidden_size: int = validated_field(POSITIVE_INTEGER, default=8)
            koleo_weight: float = 0.1


def test_a_field_whose_type_is_not_its_rule_stops_the_import():
    with pytest.raises(TypeError, match=r"Broken\.hidden_size is annotated"):

        @refusals_name_the_field
        @strict
        class Broken(PreTrainedConfig):
            model_type = "broken"
            hidden_size: float = validated_field(POSITIVE_INTEGER, default=8)


def test_the_decorator_needs_strict_underneath():
    with pytest.raises(TypeError, match="over @strict"):

        @refusals_name_the_field
        class Broken(PreTrainedConfig):
            model_type = "broken"
            hidden_size: int = validated_field(POSITIVE_INTEGER, default=8)


def test_a_strict_subclass_keeps_the_checks_and_names_itself():
    @refusals_name_the_field
    @strict
    class Wider(StellarConfig):
        extra_width: int = validated_field(POSITIVE_INTEGER, default=2)

    config = Wider(**TINY_CONFIG)
    assert config.extra_width == 2 and config.hidden_size == 32
    with pytest.raises(ValueError, match=field_error("extra_width", Wider)):
        Wider(extra_width=0)
    with pytest.raises(ValueError, match=field_error("koleo_weight", Wider)):
        config.koleo_weight = NAN
    with pytest.raises(ValueError, match=field_error("hidden_size")):
        Wider(**{**TINY_CONFIG, "num_attention_heads": 5})


# ---------------------------------------------------------------------------------------------- every field, every path


@pytest.mark.parametrize("config_class, name", FIELD_CASES)
def test_constructor_refuses_bad_values_naming_the_field(config_class, name):
    for value in bad_values(config_class, name):
        with pytest.raises(ValueError) as error:
            BUILDERS[config_class](**{name: value})
        assert_names_the_field(error, config_class, name, value)


@pytest.mark.parametrize("config_class, name", FIELD_CASES)
def test_config_json_contents_are_checked_like_the_constructor(config_class, name):
    config_dict = BUILDERS[config_class]().to_dict()
    for value in bad_values(config_class, name):
        with pytest.raises(ValueError) as error:
            config_class.from_dict({**config_dict, name: value})
        assert_names_the_field(error, config_class, name, value)


@pytest.mark.parametrize("config_class, name", FIELD_CASES)
def test_from_pretrained_keyword_overrides_are_checked(config_class, name):
    # `from_pretrained(folder, field=value)` assigns the override after building the config (from_dict's kwargs).
    config_dict = BUILDERS[config_class]().to_dict()
    for value in bad_values(config_class, name):
        with pytest.raises(ValueError) as error:
            config_class.from_dict(dict(config_dict), **{name: value})
        assert_names_the_field(error, config_class, name, value)


@pytest.mark.parametrize("config_class, name", FIELD_CASES)
def test_assignment_after_construction_is_checked(config_class, name):
    config = BUILDERS[config_class]()
    before = config.to_dict()
    for value in bad_values(config_class, name):
        with pytest.raises(ValueError) as error:
            setattr(config, name, value)
        assert_names_the_field(error, config_class, name, value)
    assert config.to_dict() == before, "a refused assignment changed the config"


@pytest.mark.parametrize(
    "config_class, name",
    [case for case in FIELD_CASES if isinstance(field_rules(case.values[0])[case.values[1]], NumberRule)],
)
def test_range_boundaries_inside_are_accepted(config_class, name):
    config = BUILDERS[config_class]()
    for value in inside_range(field_rules(config_class)[name]):
        setattr(config, name, value)
        assert getattr(config, name) == value


def test_values_are_stored_as_plain_json_types():
    config = tiny_config(koleo_weight=1, image_mean=(0, 0.5, 1), focal_sigma_range=(0.2, 0.2))
    assert config.koleo_weight == 1.0 and isinstance(config.koleo_weight, float)
    assert config.image_mean == [0.0, 0.5, 1.0] and all(isinstance(value, float) for value in config.image_mean)
    assert config.focal_sigma_range == [0.2, 0.2]
    assert isinstance(config.hidden_size, int)
    json.loads(config.to_json_string())  # no NaN, no tuples, no numpy scalars
    vqgan = tiny_vqgan_config(channel_mult=(1, 2), dropout=0)
    assert vqgan.channel_mult == [1, 2] and vqgan.dropout == 0.0 and isinstance(vqgan.dropout, float)


def test_numpy_values_are_accepted_and_stored_as_python_types():
    config = tiny_config(hidden_size=np.int64(32), koleo_weight=np.float32(0.5), image_std=np.array([0.5, 0.25, 0.125]))
    assert type(config.hidden_size) is int and type(config.koleo_weight) is float
    assert config.image_std == [0.5, 0.25, 0.125] and all(type(value) is float for value in config.image_std)
    config.num_sparse_tokens = np.int32(2)
    assert type(config.num_sparse_tokens) is int
    assert type(tiny_vqgan_config(channel_mult=np.array([1, 2])).channel_mult[1]) is int
    json.loads(config.to_json_string())


def test_path_like_tokenizer_location_is_stored_as_a_string(tmp_path):
    assert tiny_config(vq_tokenizer_name_or_path=tmp_path).vq_tokenizer_name_or_path == str(tmp_path)


# ---------------------------------------------------------------------------------------------- the issue's cases


@pytest.mark.parametrize(
    "field, value",
    [
        ("reconstruction_weight", NAN),
        ("koleo_weight", NAN),
        ("layer_norm_eps", INF),
        ("initializer_range", INF),
        ("sinkhorn_temperature", INF),
        ("prediction_temperature", INF),
        ("spatial_temperature", INF),
        ("qkv_bias", "false"),
        ("use_ema_teacher", "false"),
        ("image_mean", 0.5),
        ("image_std", 0.2),
        ("focal_sigma_range", 0.3),
    ],
)
def test_issue_cases_raise_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field_error(field)):
        tiny_config(**{field: value})


def test_refusal_messages_read_as_before():
    cases = {
        "hidden_size": (2.5, "StellarConfig.hidden_size must be a positive integer, got 2.5 (float)"),
        "koleo_weight": (
            NAN,
            "StellarConfig.koleo_weight must be a finite number >= 0, got nan (float): NaN and infinities are refused",
        ),
        "image_std": ((0.5, -1, 0.2), "StellarConfig.image_std[1] must be a finite number > 0, got -1 (int)"),
        "focal_sigma_range": (
            (0.5, 0.1),
            "StellarConfig.focal_sigma_range must be a list of 2 numbers (each a finite number > 0, non-decreasing), "
            "got (0.5, 0.1) (tuple): entries must satisfy low <= high",
        ),
        "qkv_bias": (
            "false",
            "StellarConfig.qkv_bias must be True or False (a JSON boolean, not a string or a number), "
            "got 'false' (str)",
        ),
    }
    for name, (value, message) in cases.items():
        with pytest.raises(ValueError) as error:
            tiny_config(**{name: value})
        assert str(error.value) == message


def write_config_json(folder, **changes) -> None:
    """A saved tiny config with `changes` written straight into its config.json (NaN as Python's json writes it)."""
    tiny_config().save_pretrained(folder)
    path = folder / "config.json"
    contents = json.loads(path.read_text())
    path.write_text(json.dumps({**contents, **changes}))


@pytest.mark.parametrize(
    "field, value", [("qkv_bias", "false"), ("koleo_weight", NAN), ("image_mean", 0.5), ("num_sparse_tokens", 4.0)]
)
@pytest.mark.parametrize("loader", ["StellarConfig", "AutoConfig", "StellarModel"])
def test_bad_config_json_fails_every_loader_naming_the_field(field, value, loader, tmp_path):
    write_config_json(tmp_path, **{field: value})
    load = {
        "StellarConfig": StellarConfig.from_pretrained,
        "AutoConfig": AutoConfig.from_pretrained,
        "StellarModel": StellarModel.from_pretrained,
    }[loader]
    with pytest.raises(ValueError) as error:
        load(tmp_path)
    assert_names_the_field(error, StellarConfig, field, value)


def test_cross_field_rules_run_after_keyword_overrides(tmp_path):
    # 32 is not divisible by 5: each value passes on its own, the pair does not.
    tiny_config().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="^" + field_error("hidden_size")):
        StellarConfig.from_pretrained(tmp_path, num_attention_heads=5)
    with pytest.raises(ValueError, match="^" + field_error("hidden_size")):
        StellarModel.from_pretrained(tmp_path, num_attention_heads=5)
    with pytest.raises(ValueError, match="^" + field_error("hidden_size")):
        StellarConfig.from_pretrained(tmp_path, num_attention_heads=5, return_unused_kwargs=True)
    tiny_vqgan_config().save_pretrained(tmp_path / "vqgan")
    with pytest.raises(ValueError, match="^" + field_error("codebook_dim", MaskGitVQGANConfig)):
        MaskGitVQGANConfig.from_pretrained(tmp_path / "vqgan", codebook_dim=64)


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"hidden_size": 30}, "hidden_size"),
        ({"decoder_num_attention_heads": 3}, "decoder_hidden_size"),
        ({"decoder_hidden_size": 33, "decoder_num_attention_heads": 1}, "decoder_hidden_size"),
        ({"image_size": 36}, "image_size"),
        ({"local_image_size": 4}, "local_image_size"),
        ({"num_channels": 1}, "image_mean"),
        ({"do_global_align": True, "use_ema_teacher": True}, "do_global_align"),
        ({"do_global_align": True, "num_masked_views": 1}, "do_global_align"),
        ({"do_global_align": True, "num_masked_views": 0}, "do_global_align"),
    ],
)
def test_class_validators_refuse_with_a_value_error_naming_the_field(changes, field):
    with pytest.raises(ValueError) as error:
        tiny_config(**changes)
    assert type(error.value) is ValueError and str(error.value).startswith(f"StellarConfig.{field}"), error.value


def test_cross_field_rules_run_again_on_save(tmp_path):
    config = tiny_config()
    config.num_channels = 1  # fine alone; image_mean and image_std still have 3 entries
    with pytest.raises(ValueError, match="^" + field_error("image_mean")):
        config.save_pretrained(tmp_path)


def test_lists_edited_in_place_are_checked_on_save(tmp_path):
    config = tiny_config()
    config.image_std[1] = -1.0  # no assignment to the field: only the check before saving sees it
    with pytest.raises(ValueError, match=re.escape("StellarConfig.image_std[1] must be a finite number > 0")):
        config.save_pretrained(tmp_path)
    config = tiny_config()
    config.focal_sigma_range.reverse()
    with pytest.raises(ValueError, match="^" + field_error("focal_sigma_range")):
        config.validate()
    assert not (tmp_path / "config.json").exists()


@pytest.mark.parametrize("name", ["image_mean", "image_std"])
def test_per_channel_lists_need_one_entry_per_channel(name, tmp_path):
    four = [0.5, 0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match=field_error(name)):
        tiny_config(**{name: four})
    with pytest.raises(ValueError, match=field_error(name)):
        StellarConfig.from_dict({**tiny_config().to_dict(), name: four})
    with pytest.raises(ValueError, match=field_error(name)):
        StellarConfig.from_dict(tiny_config().to_dict(), **{name: four})
    config = tiny_config()
    setattr(config, name, four)  # each field alone is fine; the pair is checked before saving
    with pytest.raises(ValueError, match=field_error(name)):
        config.save_pretrained(tmp_path)


def test_update_from_string_is_checked():
    config = tiny_config()
    with pytest.raises(ValueError, match=field_error("koleo_weight")):
        config.update_from_string("koleo_weight=nan")
    config.update_from_string("koleo_weight=0.5,qkv_bias=false")
    assert config.koleo_weight == 0.5 and config.qkv_bias is False


# ---------------------------------------------------------------------------------------------- transformers machinery


def test_transformers_defaults_and_diff_dict_still_work():
    assert PreTrainedConfig().to_dict()["return_dict"] is True
    default = StellarConfig()
    assert default.to_diff_dict()["hidden_size"] == 768
    diff = tiny_config(koleo_weight=0.25).to_diff_dict()
    assert diff["koleo_weight"] == 0.25 and diff["model_type"] == "stellar"
    # Every STELLAR field is written, defaults included, as before.
    assert set(declared_fields(StellarConfig)) <= set(default.to_diff_dict())


def test_extra_keyword_arguments_are_kept_as_before():
    config = tiny_config(my_note="kept", num_labels=5)
    assert config.my_note == "kept" and config.num_labels == 5
    assert StellarConfig.from_dict(config.to_dict()).my_note == "kept"


def test_json_round_trip_through_every_loader(tmp_path):
    config = tiny_config(spatial_temperature=None, reconstruction_weight=3, image_std=(0.5, 0.25, 0.125))
    config.save_pretrained(tmp_path)
    for loaded in (StellarConfig.from_pretrained(tmp_path), AutoConfig.from_pretrained(tmp_path)):
        assert type(loaded) is StellarConfig
        fields = {key: value for key, value in loaded.to_dict().items() if key != "_name_or_path"}
        assert fields == {key: value for key, value in config.to_dict().items() if key != "_name_or_path"}
    assert AutoConfig.for_model("stellar", **TINY_CONFIG).to_dict() == tiny_config().to_dict()
    assert StellarConfig(**config.to_dict()).to_dict() == config.to_dict()
    assert StellarConfig(**config.to_dict()) == StellarConfig.from_dict(config.to_dict())


def test_equality_compares_the_stellar_fields():
    assert tiny_config() == tiny_config()
    assert tiny_config() != tiny_config(koleo_weight=0.25)
    assert tiny_vqgan_config() != tiny_vqgan_config(num_res_blocks=2)


@pytest.mark.parametrize("config_class", list(BUILDERS))
def test_copies_keep_every_field_and_the_checks(config_class):
    config = tiny_config(qkv_bias=False, focal_sigma_range=(0.2, 0.4)) if config_class is StellarConfig else None
    config = config or tiny_vqgan_config(dropout=0.25)
    name = "qkv_bias" if config_class is StellarConfig else "num_res_blocks"
    for copied in (copy.deepcopy(config), pickle.loads(pickle.dumps(config))):
        assert copied.to_dict() == config.to_dict() and copied == config
        with pytest.raises(ValueError, match=field_error(name, config_class)):
            setattr(copied, name, "no")


def test_model_from_valid_config_still_builds():
    model = StellarModel(tiny_config())
    assert model.config.image_mean == list(tiny_config().image_mean)
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 32, 32)).sparse_tokens.shape == (1, 4, 32)


# ---------------------------------------------------------------------------------------------- configs saved before

# The folders of `tests/fixtures/config_json/` written by `config.save_pretrained` before the rewrite, and how to build
# the same config today.
SAVED_BEFORE = {
    "stellar_default": lambda: StellarConfig(),
    "stellar_tiny": lambda: tiny_config(),
    "stellar_tiny_variant": lambda: tiny_config(
        spatial_temperature=None,
        reconstruction_weight=3,
        image_std=(0.5, 0.25, 0.125),
        qkv_bias=False,
        use_ema_teacher=True,
        ema_momentum_end=1,
        focal_sigma_range=(0.2, 0.4),
        vq_tokenizer_name_or_path="org/vqgan",
        reconstruction_target="vq",
        hidden_act="gelu_new",
        koleo_weight=0,
        mask_ratio=0.5,
        num_local_views=0,
        image_mean=[0, 0.5, 1],
    ),
    "stellar_tiny_one_channel": lambda: tiny_config(
        num_channels=1, image_mean=[0.5], image_std=[0.25], layer_norm_eps=1e-6
    ),
    "maskgit_vqgan_default": lambda: MaskGitVQGANConfig(),
    "maskgit_vqgan_tiny": lambda: tiny_vqgan_config(),
}
FIXTURE_FOLDERS = sorted(path.name for path in FIXTURES.iterdir() if (path / "config.json").is_file())


def config_class_of(folder: str):
    return MaskGitVQGANConfig if folder.startswith("maskgit_vqgan") else StellarConfig


# Fields declared after the fixtures were written, with the default a file saved before loads them to. At the default
# they are left out of `config.json` (transformers saves the difference from the defaults), so the files stay the same.
FIELDS_ADDED_SINCE = {StellarConfig: {"do_global_align": False}}


def without_name(config: PreTrainedConfig) -> dict:
    """
    `to_dict()` as JSON reads it back (int label ids become strings), without the folder it was loaded from, and as
    the fixtures saw it: each field added since must hold its default, and is then left out.
    """
    contents = {key: value for key, value in json.loads(json.dumps(config.to_dict())).items() if key != "_name_or_path"}
    for name, default in FIELDS_ADDED_SINCE.get(type(config), {}).items():
        assert contents.pop(name) == default, f"{name} of a config saved before must load to its default {default!r}"
    return contents


def file_as_saved_before(path: Path, config_class) -> str:
    """
    The text of the `config.json` at `path` as the fixtures saw it: the line of each field added since (written at its
    default, in its sorted place) is taken out, and the rest must match the old file byte for byte.
    """
    text = path.read_text()
    for name, default in FIELDS_ADDED_SINCE.get(config_class, {}).items():
        line = f"  {json.dumps(name)}: {json.dumps(default)},\n"
        assert text.count(line) == 1, f"{path} should hold {line!r} once"
        text = text.replace(line, "")
    return text


def test_every_fixture_folder_is_covered():
    assert set(SAVED_BEFORE) | {"stellar_model_tiny"} == set(FIXTURE_FOLDERS)


@pytest.mark.parametrize("folder", FIXTURE_FOLDERS)
@pytest.mark.parametrize("loader", ["class", "AutoConfig"])
def test_config_saved_before_loads_to_the_same_config_and_saves_the_same_file(folder, loader, tmp_path):
    config_class = config_class_of(folder)
    load = config_class.from_pretrained if loader == "class" else AutoConfig.from_pretrained
    loaded = load(FIXTURES / folder)
    assert type(loaded) is config_class
    assert without_name(loaded) == json.loads((FIXTURES / folder / "to_dict.json").read_text())
    loaded.save_pretrained(tmp_path)
    assert file_as_saved_before(tmp_path / "config.json", config_class) == (FIXTURES / folder / "config.json").read_text()


@pytest.mark.parametrize("folder", sorted(SAVED_BEFORE))
def test_config_built_today_saves_the_file_saved_before(folder, tmp_path):
    config = SAVED_BEFORE[folder]()
    config.save_pretrained(tmp_path)
    saved = file_as_saved_before(tmp_path / "config.json", config_class_of(folder))
    assert saved == (FIXTURES / folder / "config.json").read_text()
    assert without_name(config) == json.loads((FIXTURES / folder / "to_dict.json").read_text())
    loaded = config_class_of(folder).from_pretrained(FIXTURES / folder)
    assert loaded == config_class_of(folder).from_dict(config.to_dict())
