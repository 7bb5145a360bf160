"""
The Hub path: `save_pretrained` writes the code next to the weights, and a process that never imports stellar_hf
loads the folder with `trust_remote_code=True` and gets the same outputs; the `image-feature-extraction` pipeline
works on PIL images and file paths, per token by default and on `pooler_output` with `pool=True`. The saved
processor names both backends (`StellarImageProcessor`, torchvision; `StellarImageProcessorPil`), and the fresh process
gets the one it asks for, with the package's pixels.
"""

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from stellar_tester import HIDDEN, MODEL, NUM_SPARSE, build_model, make_pixel_values
from transformers import pipeline
from transformers.dynamic_module_utils import get_imports, get_relative_imports

import stellar_hf
from stellar_hf import StellarImageProcessor, StellarImageProcessorPil

REPO_ROOT = Path(__file__).resolve().parents[1]
CROP = 32  # the tiny model's native size, so the pipeline runs it without interpolation
NUM_TOKENS = 1 + (CROP // 8) ** 2 + NUM_SPARSE
# What a user has after `pip install transformers torch` (the base requirements), plus the standard library.
BASE_DISTRIBUTION_MODULES = {"torch", "transformers", "safetensors", "huggingface_hub", "numpy", "PIL"}
STELLAR_PROCESSORS = ("StellarImageProcessor", "StellarImageProcessorPil")  # torchvision, PIL
BACKEND_CLASSES = {"torchvision": StellarImageProcessor, "pil": StellarImageProcessorPil}


def smooth_image(width: int, height: int) -> Image.Image:
    coarse = torch.Generator().manual_seed(0)
    values = (torch.rand(height // 8, width // 8, 3, generator=coarse) * 255).to(torch.uint8).numpy()
    return Image.fromarray(values).resize((width, height), Image.BICUBIC)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny StellarModel and its processor saved with their code, inputs, and the in-process outputs."""
    root = tmp_path_factory.mktemp("remote")
    folder = root / "stellar-tiny"
    model = build_model(MODEL)
    model.save_pretrained(folder)
    # Saved by the PIL class: the folder is the same whichever backend saves it.
    processor = StellarImageProcessorPil(size={"shortest_edge": CROP + 4}, crop_size={"height": CROP, "width": CROP})
    processor.save_pretrained(folder)
    image = smooth_image(56, 40)
    image_path = root / "image.png"
    image.save(image_path)
    inputs = {"square": make_pixel_values(seed=3), "rectangle": make_pixel_values(height=48, width=32, seed=4)}
    save_file(inputs, str(root / "inputs.safetensors"))
    with torch.no_grad():
        expected = {name: model(pixel_values) for name, pixel_values in inputs.items()}
    return SimpleNamespace(
        root=root, folder=folder, model=model, processor=processor, image=image, image_path=image_path,
        inputs=inputs, expected=expected,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- the saved folder


def test_saved_folder_holds_the_code_and_auto_map(saved):
    files = {path.name for path in saved.folder.iterdir()}
    for name in ("modeling_stellar.py", "configuration_stellar.py", "image_processing_stellar.py", "model.safetensors"):
        assert name in files, f"{name} missing from {sorted(files)}"
    # Every relative import of every copied file, transitively, is there too.
    pending, seen = ["modeling_stellar", "image_processing_stellar"], set()
    while pending:
        module = pending.pop()
        if module in seen:
            continue
        seen.add(module)
        path = saved.folder / f"{module}.py"
        assert path.is_file(), f"{module}.py is imported by a copied file but was not saved"
        pending += get_relative_imports(str(path))
    assert {"configuration_stellar", "losses_stellar"} <= seen
    config = json.loads((saved.folder / "config.json").read_text())
    assert config["model_type"] == "stellar"
    assert config["auto_map"]["AutoConfig"] == "configuration_stellar.StellarConfig"
    assert config["auto_map"]["AutoModel"] == "modeling_stellar.StellarModel"
    preprocessor = json.loads((saved.folder / "preprocessor_config.json").read_text())
    # One type for both backends, and a {backend: class} map, as transformers 5.24 resolves `backend=`.
    assert preprocessor["image_processor_type"] == "StellarImageProcessor"
    assert preprocessor["auto_map"]["AutoImageProcessor"] == {
        "torchvision": "image_processing_stellar.StellarImageProcessor",
        "pil": "image_processing_stellar.StellarImageProcessorPil",
    }


def test_copied_code_is_the_package_code_and_needs_only_base_dependencies(saved):
    allowed = BASE_DISTRIBUTION_MODULES | set(sys.stdlib_module_names)
    for path in saved.folder.glob("*.py"):
        source = path.read_text()
        assert source == (REPO_ROOT / "stellar_hf" / path.name).read_text(), f"{path.name} differs from the package"
        # transformers' check_imports reads every import, top level or not, before loading remote code.
        extra = set(get_imports(str(path))) - allowed
        assert not extra, f"{path.name} imports {sorted(extra)}, which a base install lacks"
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert not (node.module or "").startswith("stellar_hf"), f"{path.name} imports stellar_hf absolutely"
            if isinstance(node, ast.Import):
                assert not any(alias.name.startswith("stellar_hf") for alias in node.names), path.name


# ---------------------------------------------------------------------------------------------- fresh process

SUBPROCESS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    import torch
    from PIL import Image
    from safetensors.torch import load_file, save_file
    from transformers import AutoImageProcessor, AutoModel, pipeline

    folder, root = Path(sys.argv[1]), Path(sys.argv[2])
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    inputs = load_file(str(root / "inputs.safetensors"))
    results = {}
    with torch.no_grad():
        for name, pixel_values in inputs.items():
            for key, value in model(pixel_values).items():
                results[f"{name}.{key}"] = value
        processed = processor(Image.open(root / "image.png"), return_tensors="pt")["pixel_values"]
        results["processed"] = processed
        results["processed.last_hidden_state"] = model(processed).last_hidden_state
    backend_classes = {}
    for backend in ("pil", "torchvision"):
        chosen = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True, backend=backend)
        backend_classes[backend] = [type(chosen).__name__, type(chosen).__module__, chosen.backend]
        results[f"processed.{backend}"] = chosen(Image.open(root / "image.png"), return_tensors="pt")["pixel_values"]
    extractor = pipeline("image-feature-extraction", model=str(folder), trust_remote_code=True)
    results["pipeline.tokens"] = torch.tensor(extractor(str(root / "image.png")))
    results["pipeline.pooled"] = extractor(Image.open(root / "image.png"), pool=True, return_tensors=True)
    save_file({key: value.contiguous() for key, value in results.items()}, str(root / "subprocess_outputs.safetensors"))
    repo = sys.argv[3]
    print(json.dumps({
        "stellar_hf_imported": sorted(name for name in sys.modules if name.split(".")[0] == "stellar_hf"),
        "model_module": type(model).__module__,
        "processor_class": type(processor).__name__,
        "backend_classes": backend_classes,
        "pipeline_processor_class": type(extractor.image_processor).__name__,
        "repo_on_path": [entry for entry in sys.path if entry and Path(entry).resolve() == Path(repo)],
    }))
    """
)


@pytest.fixture(scope="module")
def fresh_process(saved):
    """Runs SUBPROCESS_SCRIPT once: no stellar_hf on the path, offline, its own module cache."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_MODULES_CACHE=str(saved.root / "modules_cache"),
        # The parent's thread count, so that both processes run the same kernels (outputs are compared to 1e-6).
        OMP_NUM_THREADS=str(torch.get_num_threads()),
        MKL_NUM_THREADS=str(torch.get_num_threads()),
    )
    completed = subprocess.run(
        [sys.executable, "-c", SUBPROCESS_SCRIPT, str(saved.folder), str(saved.root), str(REPO_ROOT)],
        cwd=saved.root,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    return report, load_file(str(saved.root / "subprocess_outputs.safetensors"))


def test_fresh_process_never_imports_stellar_hf(fresh_process):
    report, _ = fresh_process
    assert report["stellar_hf_imported"] == []
    assert report["repo_on_path"] == []
    assert report["model_module"].startswith("transformers_modules."), report["model_module"]
    assert report["processor_class"] in STELLAR_PROCESSORS
    assert report["pipeline_processor_class"] == report["processor_class"]


def test_fresh_process_gets_the_backend_it_asks_for(saved, fresh_process):
    report, outputs = fresh_process
    assert report["processor_class"] == "StellarImageProcessor"  # transformers' default: torchvision, installed here
    image = saved.image
    for backend, processor_class in BACKEND_CLASSES.items():
        name, module, chosen_backend = report["backend_classes"][backend]
        assert (name, chosen_backend) == (processor_class.__name__, backend)
        assert module.startswith("transformers_modules."), module
        expected = processor_class.from_pretrained(saved.folder)(image, return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(outputs[f"processed.{backend}"], expected, rtol=0, atol=0)


def test_fresh_process_outputs_match(saved, fresh_process):
    _, outputs = fresh_process
    for name, expected in saved.expected.items():
        fields = {key: value for key, value in expected.items()}
        assert {key.split(".", 1)[1] for key in outputs if key.startswith(f"{name}.")} == set(fields)
        for key, value in fields.items():
            # rtol too: a thread count that differs after all changes reduction order (~1e-6 relative).
            torch.testing.assert_close(outputs[f"{name}.{key}"], value, rtol=1e-6, atol=1e-6, msg=f"{name}.{key}")


def test_fresh_process_processor_and_pipeline(saved, fresh_process):
    report, outputs = fresh_process
    # The same backend as the fresh process loaded, here from the package.
    processor = getattr(stellar_hf, report["processor_class"]).from_pretrained(saved.folder)
    processed = processor(saved.image, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(outputs["processed"], processed, rtol=0, atol=1e-6)
    with torch.no_grad():
        expected = saved.model(processed)
    torch.testing.assert_close(outputs["processed.last_hidden_state"], expected.last_hidden_state, rtol=0, atol=1e-6)
    assert outputs["pipeline.tokens"].shape == (1, NUM_TOKENS, HIDDEN)
    torch.testing.assert_close(outputs["pipeline.tokens"], expected.last_hidden_state, rtol=0, atol=1e-6)
    torch.testing.assert_close(outputs["pipeline.pooled"], expected.pooler_output, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- in-process pipeline


@pytest.fixture(scope="module")
def extractor(saved):
    return pipeline("image-feature-extraction", model=str(saved.folder), trust_remote_code=True)


def expected_features(saved, extractor, image):
    """The model's outputs on the pipeline's own preprocessing of `image`."""
    processed = extractor.image_processor(image.convert("RGB"), return_tensors="pt")["pixel_values"]
    assert processed.shape == (1, 3, CROP, CROP)
    with torch.no_grad():
        return saved.model(processed)


@pytest.mark.parametrize("source", ["pil", "path"])
def test_pipeline_per_token_features_by_default(saved, extractor, source):
    features = extractor(saved.image if source == "pil" else str(saved.image_path))
    assert isinstance(features, list)
    features = torch.tensor(features)
    assert features.shape == (1, NUM_TOKENS, HIDDEN)
    expected = expected_features(saved, extractor, Image.open(saved.image_path))
    torch.testing.assert_close(features, expected.last_hidden_state, rtol=0, atol=1e-6)


@pytest.mark.parametrize("source", ["pil", "path"])
def test_pipeline_pool_returns_pooler_output(saved, extractor, source):
    pooled = extractor(saved.image if source == "pil" else str(saved.image_path), pool=True, return_tensors=True)
    expected = expected_features(saved, extractor, Image.open(saved.image_path))
    assert pooled.shape == (1, HIDDEN)
    torch.testing.assert_close(pooled, expected.pooler_output, rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, expected.sparse_tokens.mean(1), rtol=0, atol=1e-6)


def test_pipeline_on_a_batch_of_images(saved, extractor):
    other = smooth_image(40, 72).convert("L")
    results = extractor([saved.image, other], pool=True)
    assert len(results) == 2
    for result, image in zip(results, [saved.image, other]):
        expected = expected_features(saved, extractor, image)
        torch.testing.assert_close(torch.tensor(result), expected.pooler_output, rtol=0, atol=1e-6)


def test_in_process_auto_model_with_trust_remote_code_matches(saved):
    from transformers import AutoModel

    loaded = AutoModel.from_pretrained(saved.folder, trust_remote_code=True).eval()
    with torch.no_grad():
        output = loaded(saved.inputs["square"])
    for key, value in saved.expected["square"].items():
        torch.testing.assert_close(output[key], value, rtol=0, atol=1e-6, msg=key)
    assert stellar_hf.StellarConfig.model_type == loaded.config.model_type
