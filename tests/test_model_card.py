"""
The model card template and its renderer: the filled card parses with huggingface_hub, has no placeholder left, is
true to its model (size, preprocessing, pixel or VQ target, token count, data, the run's figures next to their
baselines) and its Python snippets run as written, in order, against saved models (executed in a subprocess).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from PIL import Image
from stellar_tester import TINY_CONFIG

from stellar_hf import MaskGitVQGANConfig, MaskGitVQGANModel, StellarConfig, StellarImageProcessor
from stellar_hf.model_card import (
    EXAMPLE_IMAGE,
    IMAGENET_1K,
    PAPER_RESULTS,
    TEMPLATE_PATH,
    ProbeResults,
    ProbeTask,
    TrainingRun,
    architecture_table,
    hub_id_or_none,
    python_blocks,
    render_model_card,
)
from stellar_hf.modeling_stellar import StellarForPreTraining

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
# What `run_probes` of examples/pretrain.py returns on the synthetic scenes (fractions in [0, 1]).
PRETRAIN_PROBES = {
    "dominant_color": dict(chance=0.125, knn_top1=0.743, linear_probe_top1=0.670, random_init_knn_top1=0.300,
                           random_init_linear_probe_top1=0.298),
    "dominant_shape": dict(chance=1 / 6, knn_top1=0.160, linear_probe_top1=0.167, random_init_knn_top1=0.169,
                           random_init_linear_probe_top1=0.148),
    "num_probe_images": {"train": 2048, "eval": 1024},
}  # fmt: skip
FIGURES = ("images/reconstructions_final.png", "images/spatial_maps_final.png")
# A tiny MaskGIT VQGAN whose downsampling (2 ** 3 = 8) equals the tiny STELLAR's patch size and whose codebook is its
# `vq_codebook_size`, so that a VQ model decodes its predicted codes with it.
TINY_VQGAN = dict(hidden_channels=32, channel_mult=[1, 1, 1, 1], num_res_blocks=1, z_channels=16, codebook_size=16,
                  codebook_dim=16, image_size=32)  # fmt: skip
SNIPPET_TIMEOUT = 600


@pytest.fixture
def config():
    return StellarConfig(**TINY)


def header_of(text: str) -> dict:
    match = re.match(r"\A---\n(.*?)\n---\n", text, flags=re.DOTALL)
    assert match, "the card must start with a YAML header"
    return yaml.safe_load(match.group(1))


def section(text: str, title: str) -> str:
    """The body of the `## title` section."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, flags=re.DOTALL | re.MULTILINE)
    assert match, f"no section {title!r}"
    return match.group(1)


def make_run(**overrides) -> TrainingRun:
    """A complete description of a (fake) pretraining run on the synthetic scenes."""
    fields = dict(
        data="built-in synthetic scenes (8192 images, 32 px)",
        synthetic=True,
        steps=450,
        planned_steps=450,
        global_batch_size=64,
        learning_rate=1e-3,
        base_learning_rate=4e-3,
        weight_decay=0.04,
        lr_schedule="cosine",
        warmup_steps=22,
        max_grad_norm=3.0,
        seed=0,
        num_processes=1,
        mixed_precision="no",
        device="cpu, 2 threads per process",
        wall_minutes=4.85,
        skipped_images={"count": 0, "substituted_slots": 0, "first": []},
        probes=ProbeResults.from_pretrain_results(
            PRETRAIN_PROBES, "held-out synthetic scenes", preprocessing="resized to 32 px and centre-cropped to 32 px"
        ),
        figures=FIGURES,
    )
    fields.update(overrides)
    return TrainingRun(**fields)


# ---------------------------------------------------------------------------------------------- saved models


def save_pretraining_folder(folder: Path, config: StellarConfig) -> Path:
    """What examples/pretrain.py saves: the pretraining model (with its code) and the processor for its config."""
    torch.manual_seed(0)
    StellarForPreTraining(config).save_pretrained(folder)
    StellarImageProcessor.from_model_config(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("card_models")
    torch.manual_seed(0)
    tokenizer_folder = root / "tiny-vqgan"
    MaskGitVQGANModel(MaskGitVQGANConfig(**TINY_VQGAN)).save_pretrained(tokenizer_folder)
    configs = {
        "pixel": StellarConfig(**TINY),
        "vq": StellarConfig(**{**TINY, "reconstruction_target": "vq", "vq_tokenizer_name_or_path": str(tokenizer_folder)}),
        "vq_no_tokenizer": StellarConfig(**{**TINY, "reconstruction_target": "vq"}),
    }
    return {name: (save_pretraining_folder(root / f"stellar-{name}", config), config) for name, config in configs.items()}


RUNNER = r'''
import json, re, sys, traceback

# A line `expression  # (2, 3)` states a shape or value; it is checked right after its block ran.
STATED = re.compile(r"^(?P<expression>[^#\s][^#]*?)\s*#\s*(?P<stated>\((?:\d+,\s*)*\d+\)|True)(?=\s|:|$)")

blocks = json.load(open(sys.argv[1]))
session = {"__name__": "__main__"}
checked = 0
for index, block in enumerate(blocks):
    try:
        exec(compile(block, f"<card block {index}>", "exec"), session)
    except BaseException:
        print(f"BLOCK {index} FAILED:\n{block}", file=sys.stderr)
        traceback.print_exc()
        sys.exit(1)
    for line in block.splitlines():
        match = STATED.match(line)
        if match is None:
            continue
        value = eval(match.group("expression"), session)
        value = tuple(value) if match.group("stated") != "True" else value
        stated = eval(match.group("stated"))
        if value != stated:
            print(f"BLOCK {index}: `{match.group('expression')}` is {value}, the card says {stated}", file=sys.stderr)
            sys.exit(1)
        checked += 1
print(json.dumps({"blocks": len(blocks), "checked": checked}))
'''


def run_snippets(text: str, workdir: Path) -> dict:
    """Execute the card's Python blocks in order, as one session, in a fresh interpreter in `workdir`."""
    blocks = python_blocks(text)
    assert blocks, "the card has no Python code"
    workdir.mkdir(parents=True, exist_ok=True)
    # The image the snippets read: a smooth, non-square photo-like image, so that resize and crop both act.
    values = (torch.rand(6, 8, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8).numpy()
    Image.fromarray(values).resize((80, 60), Image.BICUBIC).save(workdir / EXAMPLE_IMAGE)
    (workdir / "blocks.json").write_text(json.dumps(blocks))
    (workdir / "runner.py").write_text(RUNNER)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(workdir / "hf_home"),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    process = subprocess.run(
        [sys.executable, "runner.py", "blocks.json"],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=SNIPPET_TIMEOUT,
    )  # fmt: skip
    assert process.returncode == 0, f"the card's snippets fail as written:\n{process.stderr[-6000:]}"
    return json.loads(process.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- the template


def test_template_is_reachable_from_the_package():
    assert TEMPLATE_PATH.is_file(), f"{TEMPLATE_PATH} (a symlink to the repository's MODEL_CARD.md) is missing"
    text = TEMPLATE_PATH.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    for placeholder in ("model_id", "architecture_table", "training_details", "model_index", "datasets", "base_model",
                        "preprocessing", "reconstruction_section", "evaluation", "figures_section"):  # fmt: skip
        assert "{{" + placeholder + "}}" in text
    # The snippets are generated per checkpoint; the template itself holds no code that could not run.
    assert not python_blocks(text)
    assert "maskgit-vqgan\")" not in text and "cat.jpg" not in text


# ---------------------------------------------------------------------------------------------- released-style path


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


def test_released_style_card_states_the_imagenet_facts():
    """A converted release (defaults: ViT-B/16, 224 px, VQ target, no tokenizer named) keeps its true ImageNet facts."""
    config = StellarConfig()
    text = render_model_card(
        config, model_id="me/stellar-b16", datasets=[IMAGENET_1K], results=PAPER_RESULTS["stellar-b16"],
        training_details="Converted from the original checkpoint `stellar-b16.ckpt` with `python -m stellar_hf.convert`.",
    )  # fmt: skip
    card = ModelCard(text)
    assert card.data.datasets == [IMAGENET_1K]
    assert card.data.base_model == "facebook/vit-mae-base"
    values = sorted(result.metric_value for result in card.data.eval_results)
    assert values == sorted([73.26, 67.25, 3.06, 0.2077])
    assert all(result.source_url == "https://arxiv.org/abs/2602.01905" for result in card.data.eval_results)
    preprocessing = section(text, "Preprocessing and normalisation")
    assert "shorter side to 256 px (bicubic), centre crop 224 x 224" in preprocessing
    assert "ImageNet mean (0.485, 0.456, 0.406)" in preprocessing
    assert "Trained on ImageNet-1k only" in text
    blocks = python_blocks(text)
    assert "shorter side 256 px, centre crop 224 x 224" in blocks[0]
    assert "(1, 196, 16)" in blocks[0] and "(1, 768)" in blocks[0]  # 14 x 14 patches, 16 tokens, width 768
    # No tokenizer is named by the config: the card says so and its VQ snippet works with the codes, inventing no
    # tokenizer folder; the converter command for the public VQGAN is given in prose.
    reconstruction = section(text, "How to use").split("### Reconstruction", 1)[1]
    assert "names **no** tokenizer" in reconstruction
    assert "MaskGitVQGANModel.from_pretrained" not in text and "set_vq_tokenizer(\"maskgit-vqgan\")" not in text
    assert "python -m stellar_hf.convert_vqgan" in reconstruction
    assert "(1, 196, 1024)" in blocks[-1]
    assert "MaskGIT VQGAN tokenizer" in section(text, "Licences")


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


# ---------------------------------------------------------------------------------------------- a training run


def test_run_card_is_true_to_a_small_pixel_run(config):
    text = render_model_card(config, run=make_run(), model_id="me/stellar-tiny")
    assert "{{" not in text and "}}" not in text
    card = ModelCard(text)
    header = header_of(text)
    # Synthetic scenes are not a Hub dataset, the probe figures are not on one, and the encoder started at random.
    assert "datasets" not in header and "model-index" not in header and "base_model" not in header
    assert not card.data.eval_results
    assert card.data.tags and "custom_code" in card.data.tags

    # Sizes and preprocessing of this 32 px model, from its config and processor; nothing about 224 / 256 px.
    preprocessing = section(text, "Preprocessing and normalisation")
    assert "fed 32 x 32 px images" in preprocessing
    assert "shorter side to 36 px (bicubic), centre crop 32 x 32" in preprocessing
    assert "resized to 32 px and centre-cropped to 32 px" in preprocessing
    usage = section(text, "How to use")
    assert not re.search(r"\b(224|256) ?(px|x)", usage + preprocessing)
    assert "ImageNet-1k validation, 224" not in text

    # Data, steps, settings, time.
    assert "built-in synthetic scenes (8192 images, 32 px)" in section(text, "Training data")
    assert "not a Hub dataset" in section(text, "Training data")
    procedure = section(text, "Training procedure")
    for expected in ("| Optimiser steps | 450 |", "| Global batch | 64 images per step |", "0.001 peak (base 0.004 x 64 / 256)",
                     "cosine, 22 warmup steps", "| Seed | 0 |", "1 process(es) on cpu, 2 threads per process",
                     "| Mixed precision | no |", "4.8 min", "| Unreadable images | none |",
                     "2 masked global views of 32 px (mask ratio 0.75), 2 local views of 16 px"):  # fmt: skip
        assert expected in procedure, expected
    assert "none (random initialisation)" in procedure

    # Measured figures next to chance and the untrained encoder, and the shape task called for what it is.
    evaluation = section(text, "Evaluation")
    assert "| `dominant_color` | 8 | 12.5% | 30.0% | 74.3% | 29.8% | 67.0% |" in evaluation
    assert "| `dominant_shape` | 6 | 16.7% | 16.9% | 16.0% | 14.8% | 16.7% |" in evaluation
    assert "2048 images fit the probes, 1024 validation images score them" in evaluation
    # Shape: 16.0 / 16.7 against chance 16.7 and untrained 16.9 / 14.8 on 1024 images; colour is far above.
    assert "On `dominant_shape` neither probe is clearly above" in evaluation and "On `dominant_color`" not in evaluation
    assert "not in the `model-index`" in evaluation

    # The run's pictures, by relative path, so that they render on the Hub after upload.
    figures = section(text, "Figures of this run")
    for path in FIGURES:
        assert f"]({path})" in figures
    assert "4-token latent" in figures

    # Pixel target: no tokenizer anywhere in the snippets; every edit uses a token of the 4.
    code = "\n".join(python_blocks(text))
    assert "MaskGitVQGAN" not in code and "maskgit" not in code.lower() and "vq_tokenizer" not in code
    indices = [int(index) for index in re.findall(r"where\[\.\.\., (\d+)\]", code)]
    assert indices and max(indices) < config.num_sparse_tokens
    assert "synthetic scenes of coloured shapes at 32 px" in section(text, "Intended uses and limitations")
    assert "No third-party weights take part" in section(text, "Licences")


def test_snippets_use_the_hub_id(config, tmp_path):
    text = render_model_card(config, run=make_run(), model_id="me/stellar-tiny")
    loads = re.findall(r"from_pretrained\(([^,)]+)", "\n".join(python_blocks(text)))
    loads += re.findall(r"model=([^,)]+)", "\n".join(python_blocks(text)))
    assert len(loads) >= 5 and set(loads) == {'"me/stellar-tiny"'}
    assert "local folder" not in text
    # A bare name is not a Hub id, a path is a path: the card says what the snippets then load.
    bare = render_model_card(config, run=make_run(), model_id="stellar-pretrain")
    assert "`stellar-pretrain` is not a full Hub repository id" in bare
    path = render_model_card(config, run=make_run(), model_id=str(tmp_path))
    assert f"`{tmp_path}` is a local folder path" in path


def test_run_on_a_hub_dataset_with_hub_probes_fills_the_metadata(config):
    probes = ProbeResults.from_pretrain_results(
        {"class": dict(chance=0.1, knn_top1=0.5, linear_probe_top1=0.6), "num_probe_images": {"train": 500, "eval": 100}},
        "CIFAR-10", dataset_hub_id="uoft-cs/cifar10", split="test",
    )  # fmt: skip
    run = make_run(data="uoft-cs/cifar10 (train)", data_hub_id="uoft-cs/cifar10", synthetic=False, probes=probes,
                   encoder_init="facebook/vit-mae-base")  # fmt: skip
    text = render_model_card(config, run=run, model_id="me/stellar-cifar")
    card = ModelCard(text)
    assert card.data.datasets == ["uoft-cs/cifar10"]
    assert card.data.base_model == "facebook/vit-mae-base"
    results = {result.metric_name: result for result in card.data.eval_results}
    assert results["Linear probe top-1 (%)"].metric_value == 60.0
    assert results["kNN top-1 (%), k=20"].metric_value == 50.0
    assert {result.dataset_type for result in card.data.eval_results} == {"uoft-cs/cifar10"}
    assert {result.dataset_split for result in card.data.eval_results} == {"test"}
    assert "| `class` | 10 | 10.0% | – | 50.0% | – | 60.0% |" in text  # no untrained baseline measured: a dash


def test_no_learning_claimed_from_a_handful_of_probe_images(config):
    """18.8% against a 16.7% chance on 16 images is one image: not a sign of learning."""
    probes = ProbeResults.from_pretrain_results(
        {"shape": dict(chance=1 / 6, knn_top1=0.1875, linear_probe_top1=0.125, random_init_knn_top1=0.125,
                       random_init_linear_probe_top1=0.125),
         "colour": dict(chance=0.125, knn_top1=0.75, linear_probe_top1=0.5, random_init_knn_top1=0.25,
                        random_init_linear_probe_top1=0.1875),
         "num_probe_images": {"train": 32, "eval": 16}},
        "synthetic scenes",
    )  # fmt: skip
    evaluation = section(render_model_card(config, run=make_run(probes=probes), model_id="me/x"), "Evaluation")
    assert "On `shape` neither probe is clearly above" in evaluation and "On `colour`" not in evaluation


def test_local_encoder_init_is_named_but_not_claimed_as_base_model(config, tmp_path):
    weights = tmp_path / "mae.pth"
    weights.write_bytes(b"")
    text = render_model_card(config, run=make_run(encoder_init=str(weights)), model_id="me/stellar-tiny")
    assert "base_model" not in header_of(text)
    assert f"`{weights}` (a local file or folder)" in text


def test_stopped_and_resumed_runs_say_so(config):
    run = make_run(steps=300, planned_steps=450, resumed_from_step=200, wall_minutes=0.5,
                   skipped_images={"count": 2, "substituted_slots": 3, "first": ["a.jpg", "b.png"]})  # fmt: skip
    procedure = section(render_model_card(config, run=run, model_id="me/stellar-tiny"), "Training procedure")
    assert "300 (of 450 planned; the run stopped early), resumed at step 200" in procedure
    assert "30 s (" in procedure and "this session only, since the resume" in procedure
    assert "2 skipped; 3 batch slot(s) took the next readable image instead (first: `a.jpg`, `b.png`)" in procedure


@pytest.mark.parametrize("num_sparse_tokens", [1, 2, 3, 16])
def test_edit_snippets_index_existing_tokens(num_sparse_tokens):
    for target in ("pixel", "vq"):
        config = StellarConfig(**{**TINY, "num_sparse_tokens": num_sparse_tokens, "reconstruction_target": target})
        code = "\n".join(python_blocks(render_model_card(config, run=make_run(), model_id="me/stellar-tiny")))
        indices = [int(index) for index in re.findall(r"where\[\.\.\., (\d+)\]", code)]
        assert all(index < num_sparse_tokens for index in indices), (target, indices)
        assert (len(indices) > 0) == (num_sparse_tokens > 1)


def test_vq_card_names_the_configured_tokenizer_and_no_other(tmp_path):
    config = StellarConfig(**{**TINY, "reconstruction_target": "vq", "vq_tokenizer_name_or_path": "me/tiny-vqgan"})
    text = render_model_card(config, run=make_run(), model_id="me/stellar-tiny")
    reconstruction = section(text, "How to use").split("### Reconstruction", 1)[1]
    assert 'vq_tokenizer_name_or_path = "me/tiny-vqgan"' in reconstruction
    assert "maskgit-vqgan" not in reconstruction  # a 16-code model: the public 1024-code VQGAN is not mentioned
    assert "(1, 16, 16)" in python_blocks(text)[-1]  # 16 patches x 16 codes
    # Pixel-only figures are not invented: the captions follow what the run passed.
    assert "MaskGIT VQGAN tokenizer" in section(text, "Licences")


# ---------------------------------------------------------------------------------------------- the snippets run


def test_pixel_run_card_snippets_run_as_written(saved, tmp_path):
    folder, config = saved["pixel"]
    text = render_model_card(config, run=make_run(), model_id=str(folder))
    report = run_snippets(text, tmp_path / "work")
    # Feature extraction (3 shapes), package (1), pipeline (2), reconstruction and both edits (3): every shape the
    # card states was compared with the real output.
    assert report == {"blocks": 4, "checked": 9}


def test_released_path_snippets_run_as_written(saved, tmp_path):
    """The card `python -m stellar_hf.convert` writes (no run); the old one indexed token 5 of 4 and loaded a VQGAN
    for a pixel model."""
    folder, config = saved["pixel"]
    text = render_model_card(config, model_id=str(folder), training_details="Converted.")
    assert run_snippets(text, tmp_path / "work") == {"blocks": 4, "checked": 9}


def test_vq_card_snippets_run_as_written(saved, tmp_path):
    folder, config = saved["vq"]
    text = render_model_card(config, run=make_run(figures=()), model_id=str(folder))
    # The reconstruction block decodes through the tiny VQGAN the config names (`.clamp` of a None would fail).
    assert run_snippets(text, tmp_path / "work") == {"blocks": 4, "checked": 7}


def test_vq_card_without_tokenizer_snippets_run_as_written(saved, tmp_path):
    folder, config = saved["vq_no_tokenizer"]
    text = render_model_card(config, run=make_run(figures=()), model_id=str(folder))
    assert run_snippets(text, tmp_path / "work") == {"blocks": 4, "checked": 11}


# ---------------------------------------------------------------------------------------------- refusals


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


def test_bad_arguments_are_refused(config, tmp_path):
    with pytest.raises(ValueError, match="StellarConfig"):
        render_model_card({"hidden_size": 32})
    with pytest.raises(ValueError, match="model_id"):
        render_model_card(config, model_id="")
    with pytest.raises(ValueError, match="datasets"):
        render_model_card(config, datasets=[""])
    with pytest.raises(ValueError, match="come from it"):
        render_model_card(config, run=make_run(), results=RESULTS)
    with pytest.raises(ValueError, match="come from it"):
        render_model_card(config, run=make_run(), training_details="free text")
    with pytest.raises(ValueError, match="contradicts"):
        render_model_card(config, run=make_run(), base_model="facebook/vit-mae-base")
    with pytest.raises(ValueError, match="crops 224 x 224"):
        render_model_card(config, image_processor=StellarImageProcessor())  # a 224 px processor for a 32 px model


def test_bad_run_descriptions_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not a Hub dataset id"):
        make_run(synthetic=False, data_hub_id=str(tmp_path))  # a local folder is not a Hub dataset
    with pytest.raises(ValueError, match="not a Hub dataset"):
        make_run(data_hub_id="ILSVRC/imagenet-1k")  # synthetic and a Hub dataset at once
    with pytest.raises(ValueError, match="relative"):
        make_run(figures=["/abs/images/spatial_maps_final.png"])
    with pytest.raises(ValueError, match="relative"):
        make_run(figures=["../images/spatial_maps_final.png"])
    with pytest.raises(ValueError, match="fraction"):
        ProbeTask(name="colour", chance=0.125, knn_top1=74.3, linear_probe_top1=0.67)  # a percentage, not a fraction
    with pytest.raises(ValueError, match="unknown figures"):
        ProbeResults.from_pretrain_results({"colour": {"chance": 0.1, "knn_top5": 0.2}}, "scenes")
    assert ProbeResults.from_pretrain_results(None, "scenes") is None


def test_hub_id_or_none(tmp_path):
    assert hub_id_or_none("facebook/vit-mae-base") == "facebook/vit-mae-base"
    assert hub_id_or_none(str(tmp_path)) is None
    assert hub_id_or_none("/data/mae.pth") is None
    assert hub_id_or_none("not a valid//id") is None
    assert hub_id_or_none(None) is None


def test_unknown_placeholder_in_template_is_reported(config, monkeypatch, tmp_path):
    import stellar_hf.model_card as model_card

    template = tmp_path / "MODEL_CARD.md"
    template.write_text(TEMPLATE_PATH.read_text(encoding="utf-8") + "\n{{not_a_field}}\n", encoding="utf-8")
    monkeypatch.setattr(model_card, "TEMPLATE_PATH", template)
    with pytest.raises(ValueError, match="not_a_field"):
        render_model_card(config)
