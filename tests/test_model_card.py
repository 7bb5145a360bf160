"""The model card template and its renderer: the filled card parses with huggingface_hub and has no placeholder left."""

import re

import pytest
import yaml
from huggingface_hub import ModelCard
from stellar_tester import TINY_CONFIG

from stellar_hf import StellarConfig
from stellar_hf.model_card import (
    IMAGENET_1K,
    PAPER_RESULTS,
    TEMPLATE_PATH,
    architecture_table,
    render_model_card,
)

TINY = TINY_CONFIG
RESULTS = [
    dict(task="image-classification", dataset=IMAGENET_1K, split="validation", metric="accuracy", value=61.5,
         name="kNN top-1 (%)"),
    dict(task="image-classification", dataset=IMAGENET_1K, split="validation", metric="accuracy", value=70.25,
         name="Linear probe top-1 (%)"),
    dict(task="image-to-image", dataset=IMAGENET_1K, split="validation", metric="fid", value=3.5, name="rFID"),
    dict(task="image-to-image", dataset=IMAGENET_1K, split="validation", metric="lpips", value=0.21),
    dict(task="image-to-image", dataset=IMAGENET_1K, split="validation", metric="psnr", value=21.3),
]  # fmt: skip


@pytest.fixture
def config():
    return StellarConfig(**TINY)


def header_of(text: str) -> dict:
    match = re.match(r"\A---\n(.*?)\n---\n", text, flags=re.DOTALL)
    assert match, "the card must start with a YAML header"
    return yaml.safe_load(match.group(1))


def test_template_is_reachable_from_the_package():
    assert TEMPLATE_PATH.is_file(), f"{TEMPLATE_PATH} (a symlink to the repository's MODEL_CARD.md) is missing"
    text = TEMPLATE_PATH.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    for placeholder in ("model_id", "architecture_table", "training_details", "model_index", "datasets", "base_model"):
        assert "{{" + placeholder + "}}" in text


def test_render_without_results(config):
    text = render_model_card(config, training_details="Ten steps on *synthetic scenes*.", model_id="me/stellar-tiny")
    assert "{{" not in text and "}}" not in text
    card = ModelCard(text)
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "image-feature-extraction"
    assert card.data.license == "mit"
    assert card.data.base_model == "facebook/vit-mae-base"
    for tag in ("vision", "self-supervised-learning", "image-feature-extraction", "stellar", "custom_code"):
        assert tag in card.data.tags
    assert not card.data.eval_results
    header = header_of(text)
    assert "model-index" not in header
    assert "datasets" not in header  # none given: nothing claimed
    assert "Ten steps on *synthetic scenes*." in card.text
    assert "me/stellar-tiny" in card.text
    assert "No evaluation results are recorded" in card.text


def test_render_with_results(config):
    text = render_model_card(
        config, model_id="me/stellar-tiny", datasets=[IMAGENET_1K], base_model="facebook/vit-mae-large", results=RESULTS
    )
    assert "{{" not in text
    card = ModelCard(text)
    assert card.data.datasets == [IMAGENET_1K]
    assert card.data.base_model == "facebook/vit-mae-large"
    assert card.data.model_name == "me/stellar-tiny"
    assert len(card.data.eval_results) == len(RESULTS)
    by_value = {result.metric_value: result for result in card.data.eval_results}
    for expected in RESULTS:
        result = by_value[expected["value"]]
        assert result.task_type == expected["task"]
        assert result.dataset_type == expected["dataset"]
        assert result.dataset_split == expected["split"]
        assert result.metric_type == expected["metric"]
        if "name" in expected:
            assert result.metric_name == expected["name"]
    # The numbers also appear in the body's table.
    assert "| kNN top-1 (%) | accuracy |" in card.text
    assert "21.3" in card.text


def test_paper_results_render(config):
    text = render_model_card(StellarConfig(), model_id="me/stellar-b16", results=PAPER_RESULTS["stellar-b16"])
    card = ModelCard(text)
    values = sorted(result.metric_value for result in card.data.eval_results)
    assert values == sorted([73.26, 67.25, 3.06, 0.2077])
    assert all(result.source_url == "https://arxiv.org/abs/2602.01905" for result in card.data.eval_results)


def test_architecture_and_shapes_come_from_the_config(config):
    text = render_model_card(config)
    # 32 px / 8 px patches -> 16 patches; sequence 1 + 16 + 4.
    assert "(B, 21, 32)" in text
    assert "(B, 16, 4)" in text
    table = architecture_table(config)
    assert "width 32, 2 layers, 4 heads, MLP 64" in table
    assert "4 x 4 = 16 patches" in table
    assert "| Sparse tokens r | 4 |" in table
    assert "32 prototypes of width 16" in table
    assert "pixels" in table
    vq_table = architecture_table(StellarConfig())
    assert "ViT-B/16" in vq_table and "1024 codes" in vq_table


def test_no_base_model_and_no_datasets(config):
    text = render_model_card(config, base_model=None, datasets=[])
    header = header_of(text)
    assert "base_model" not in header and "datasets" not in header
    assert ModelCard(text).data.base_model is None
    assert "none (random initialisation)" in text


@pytest.mark.parametrize(
    "results, message",
    [
        ([dict(task="image-classification", dataset=IMAGENET_1K, metric="accuracy")], "value"),
        ([dict(dataset=IMAGENET_1K, metric="accuracy", value=1.0)], "task"),
        ([dict(task="t", dataset="d", metric="m", value="high")], "number"),
        ([dict(task="t", dataset="d", metric="m", value=1.0, colour="red")], "unknown keys"),
        (["accuracy"], "dict"),
    ],
)
def test_bad_results_are_refused(config, results, message):
    with pytest.raises(ValueError, match=message):
        render_model_card(config, results=results)


def test_bad_arguments_are_refused(config):
    with pytest.raises(ValueError, match="StellarConfig"):
        render_model_card({"hidden_size": 32})
    with pytest.raises(ValueError, match="model_id"):
        render_model_card(config, model_id="")
    with pytest.raises(ValueError, match="datasets"):
        render_model_card(config, datasets=[""])


def test_unknown_placeholder_in_template_is_reported(config, monkeypatch, tmp_path):
    import stellar_hf.model_card as model_card

    template = tmp_path / "MODEL_CARD.md"
    template.write_text(TEMPLATE_PATH.read_text(encoding="utf-8") + "\n{{not_a_field}}\n", encoding="utf-8")
    monkeypatch.setattr(model_card, "TEMPLATE_PATH", template)
    with pytest.raises(ValueError, match="not_a_field"):
        render_model_card(config)
