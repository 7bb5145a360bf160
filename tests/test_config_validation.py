"""
`StellarConfig` refuses every value that cannot build a working model, on every way in.

The walk is over the parameters of `StellarConfig.__init__` (not over the rule table), so a field added later without
a rule fails here (and at import). Each field gets the values no field accepts (NaN, infinities, arbitrary objects),
the wrong types for its kind (the kind read from its default: `"false"` for a bool, 2.5 for an int, a string for a
float, a scalar for a sequence) and the values just outside its range; each must raise a `ValueError` naming the field
through the constructor, `from_dict` (config.json contents), `from_dict` keyword overrides (the path of
`from_pretrained(..., field=value)`) and assignment. Then the transformers machinery (defaults, diff dict, Auto
classes, JSON round trip, copies) must still work.
"""

import copy
import inspect
import json
import math
import pickle
import re

import pytest
import torch
from stellar_tester import TINY_CONFIG, tiny_config
from transformers import AutoConfig, PretrainedConfig

from stellar_hf import StellarConfig, StellarModel
from stellar_hf.configuration_stellar import (
    STELLAR_FIELD_RULES,
    BooleanRule,
    ChoiceRule,
    IntegerRule,
    NumberRule,
    NumberSequenceRule,
    PathRule,
    stellar_init_field_names,
)

INIT_PARAMETERS = {
    name: parameter
    for name, parameter in inspect.signature(StellarConfig.__init__).parameters.items()
    if name != "self" and parameter.kind is not parameter.VAR_KEYWORD
}
NAN, INF = float("nan"), float("inf")
# No field of any kind accepts these.
UNIVERSAL_PROBES = [NAN, INF, -INF, object(), {"value": 1}]


def field_error(name: str) -> str:
    """Pattern of a `ValueError` naming `name` as the refused field (`image_std[1]` names `image_std`)."""
    return re.escape(f"StellarConfig.{name}") + r"\b"


def outside_range(rule: NumberRule) -> list[float]:
    """The closest values just outside the range of `rule`."""
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


def bad_values(name: str) -> list:
    """Every value field `name` must refuse: the universal probes, wrong types for its kind, values out of range."""
    default = INIT_PARAMETERS[name].default
    rule = STELLAR_FIELD_RULES[name]
    probes = list(UNIVERSAL_PROBES)
    # The kind is read from the default where it has one, so a rule of the wrong kind is caught too.
    if isinstance(default, bool):
        assert isinstance(rule, BooleanRule), f"{name} defaults to a bool but its rule is {rule}"
        probes += ["false", "true", "False", 0, 1, 1.0, None]
    elif isinstance(default, int):
        assert isinstance(rule, IntegerRule), f"{name} defaults to an int but its rule is {rule}"
        probes += [2.5, 4.0, "4", True, False, None, rule.minimum - 1]
    elif isinstance(default, float) or isinstance(rule, NumberRule):
        assert isinstance(rule, NumberRule), f"{name} defaults to a float but its rule is {rule}"
        probes += ["0.1", True, False, 1j, *outside_range(rule)]
        if not rule.optional:
            probes.append(None)
    elif isinstance(default, (tuple, list)):
        assert isinstance(rule, NumberSequenceRule), f"{name} defaults to a sequence but its rule is {rule}"
        length = len(default)
        probes += [0.5, "abc", None, set(default), [], [NAN] * length, [INF] * length, [-INF] * length]
        probes += [["0.1"] * length, [True] * length, [None] * length]
        if rule.length is not None:  # the per-channel length is a cross-field rule, tested on its own below
            probes.append(list(default) + [list(default)[-1]])
        probes += [[value] * length for value in outside_range(rule.element)]
    elif isinstance(rule, ChoiceRule):
        probes += [3, None, True, "", "not-a-choice"]
    elif isinstance(rule, PathRule):
        probes += [3, True, "", 0.5]
    else:
        pytest.fail(f"{name}: no probes for a field of default {default!r} and rule {rule!r}; add them here")
    return probes


# ---------------------------------------------------------------------------------------------- the rule table


def test_every_init_parameter_has_exactly_one_rule():
    assert list(INIT_PARAMETERS) == stellar_init_field_names()
    assert list(INIT_PARAMETERS) == list(STELLAR_FIELD_RULES), (
        "STELLAR_FIELD_RULES must list every StellarConfig.__init__ parameter, in signature order: "
        f"{set(INIT_PARAMETERS) ^ set(STELLAR_FIELD_RULES)}"
    )


def test_every_default_passes_its_rule():
    for name, parameter in INIT_PARAMETERS.items():
        STELLAR_FIELD_RULES[name].check(name, parameter.default)


def test_a_field_added_without_a_rule_stops_the_import(monkeypatch):
    from stellar_hf import configuration_stellar

    monkeypatch.delitem(configuration_stellar.STELLAR_FIELD_RULES, "koleo_weight")
    with pytest.raises(TypeError, match="koleo_weight"):
        configuration_stellar._check_every_field_has_a_rule()


# ---------------------------------------------------------------------------------------------- every field, every path


@pytest.mark.parametrize("name", list(INIT_PARAMETERS))
def test_constructor_refuses_bad_values_naming_the_field(name):
    for value in bad_values(name):
        with pytest.raises(ValueError, match=field_error(name)):
            tiny_config(**{name: value})


@pytest.mark.parametrize("name", list(INIT_PARAMETERS))
def test_config_json_contents_are_checked_like_the_constructor(name):
    config_dict = tiny_config().to_dict()
    for value in bad_values(name):
        with pytest.raises(ValueError, match=field_error(name)):
            StellarConfig.from_dict({**config_dict, name: value})


@pytest.mark.parametrize("name", list(INIT_PARAMETERS))
def test_from_pretrained_keyword_overrides_are_checked(name):
    # `from_pretrained(folder, field=value)` assigns the override after building the config (from_dict's kwargs).
    config_dict = tiny_config().to_dict()
    for value in bad_values(name):
        with pytest.raises(ValueError, match=field_error(name)):
            StellarConfig.from_dict(dict(config_dict), **{name: value})


@pytest.mark.parametrize("name", list(INIT_PARAMETERS))
def test_assignment_after_construction_is_checked(name):
    config = tiny_config()
    before = config.to_dict()
    for value in bad_values(name):
        with pytest.raises(ValueError, match=field_error(name)):
            setattr(config, name, value)
    assert config.to_dict() == before, "a refused assignment changed the config"


@pytest.mark.parametrize("name", [name for name, rule in STELLAR_FIELD_RULES.items() if isinstance(rule, NumberRule)])
def test_range_boundaries_inside_are_accepted(name):
    config = tiny_config()
    for value in inside_range(STELLAR_FIELD_RULES[name]):
        setattr(config, name, value)
        assert getattr(config, name) == value


def test_values_are_stored_as_plain_json_types():
    config = tiny_config(koleo_weight=1, image_mean=(0, 0.5, 1), focal_sigma_range=(0.2, 0.2))
    assert config.koleo_weight == 1.0 and isinstance(config.koleo_weight, float)
    assert config.image_mean == [0.0, 0.5, 1.0] and all(isinstance(value, float) for value in config.image_mean)
    assert config.focal_sigma_range == [0.2, 0.2]
    assert isinstance(config.hidden_size, int)
    json.loads(config.to_json_string())  # no NaN, no tuples, no numpy scalars


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
    with pytest.raises(ValueError, match=field_error(field)):
        load(tmp_path)


def test_cross_field_rules_run_after_keyword_overrides(tmp_path):
    # 32 is not divisible by 5: each value passes on its own, the pair does not.
    tiny_config().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=field_error("hidden_size")):
        StellarConfig.from_pretrained(tmp_path, num_attention_heads=5)
    with pytest.raises(ValueError, match=field_error("hidden_size")):
        StellarModel.from_pretrained(tmp_path, num_attention_heads=5)


def test_cross_field_rules_run_again_on_save(tmp_path):
    config = tiny_config()
    config.num_channels = 1  # fine alone; image_mean and image_std still have 3 entries
    with pytest.raises(ValueError, match=field_error("image_mean")):
        config.save_pretrained(tmp_path)


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
    assert PretrainedConfig().to_dict()["return_dict"] is True
    default = StellarConfig()
    assert default.to_diff_dict()["hidden_size"] == 768
    diff = tiny_config(koleo_weight=0.25).to_diff_dict()
    assert diff["koleo_weight"] == 0.25 and diff["model_type"] == "stellar"


def test_json_round_trip_through_every_loader(tmp_path):
    config = tiny_config(spatial_temperature=None, reconstruction_weight=3, image_std=(0.5, 0.25, 0.125))
    config.save_pretrained(tmp_path)
    for loaded in (StellarConfig.from_pretrained(tmp_path), AutoConfig.from_pretrained(tmp_path)):
        assert type(loaded) is StellarConfig
        fields = {key: value for key, value in loaded.to_dict().items() if key != "_name_or_path"}
        assert fields == {key: value for key, value in config.to_dict().items() if key != "_name_or_path"}
    assert AutoConfig.for_model("stellar", **TINY_CONFIG).to_dict() == tiny_config().to_dict()
    assert StellarConfig(**config.to_dict()).to_dict() == config.to_dict()


def test_copies_keep_every_field():
    config = tiny_config(qkv_bias=False, focal_sigma_range=(0.2, 0.4))
    for copied in (copy.deepcopy(config), pickle.loads(pickle.dumps(config))):
        assert copied.to_dict() == config.to_dict()
        with pytest.raises(ValueError, match=field_error("qkv_bias")):
            copied.qkv_bias = "no"


def test_model_from_valid_config_still_builds():
    model = StellarModel(tiny_config())
    assert model.config.image_mean == list(tiny_config().image_mean)
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 32, 32)).sparse_tokens.shape == (1, 4, 32)
