"""The explorer's logic (`stellar_hf.explorer`) and its command line (`examples/explorer.py`), without a browser."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from stellar_tester import tiny_config

from stellar_hf import (
    StellarForImageReconstruction,
    StellarImageProcessor,
    StellarModel,
)
from stellar_hf.explorer import (
    Edit,
    Factors,
    apply_edit,
    drop_token,
    edit_figure,
    load_explorer,
    load_factors,
    overlay_tiles,
    reassign_token,
    region_from_drawing,
    restrict_token,
    sample_images,
    save_factors,
    swap_token,
    write_space,
)
from stellar_hf.visualization import token_colors

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "examples" / "explorer.py"


def _random_map(num_patches=16, num_tokens=4, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(num_patches, num_tokens, generator=generator).mul(2).softmax(dim=-1)
    )


def _save_model(folder: Path, **overrides) -> Path:
    torch.manual_seed(0)
    config = tiny_config(**overrides)
    StellarForImageReconstruction(config).eval().save_pretrained(folder)
    StellarImageProcessor.from_model_config(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pixel_dir(tmp_path_factory) -> Path:
    return _save_model(tmp_path_factory.mktemp("explorer") / "pixel")


@pytest.fixture(scope="module")
def explorer(pixel_dir):
    return load_explorer(pixel_dir)


@pytest.fixture(scope="module")
def scenes():
    return sample_images(num_synthetic=2, image_size=48)


# -- edits: exact effect on the factors ------------------------------------------------------------------------------


def test_reassign_moves_the_column_and_keeps_row_sums():
    spatial_map = _random_map()
    edited = reassign_token(spatial_map, 0, 2)
    assert torch.equal(edited[:, 0], torch.zeros(16))
    torch.testing.assert_close(edited[:, 2], spatial_map[:, 2] + spatial_map[:, 0])
    assert torch.equal(edited[:, [1, 3]], spatial_map[:, [1, 3]])
    torch.testing.assert_close(edited.sum(dim=1), torch.ones(16))
    assert torch.equal(reassign_token(spatial_map, 1, 1), spatial_map)
    assert not torch.equal(spatial_map[:, 0], torch.zeros(16)), (
        "the input must not be modified"
    )


def test_drop_is_the_softmax_without_the_token():
    logits = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    edited = drop_token(logits.softmax(dim=-1), 1)
    keep = [0, 2, 3]
    assert torch.equal(edited[:, 1], torch.zeros(16))
    torch.testing.assert_close(edited[:, keep], logits[:, keep].softmax(dim=-1))
    torch.testing.assert_close(edited.sum(dim=1), torch.ones(16))


def test_drop_makes_rows_entirely_on_the_token_uniform():
    spatial_map = _random_map()
    spatial_map[3] = torch.tensor([0.0, 1.0, 0.0, 0.0])
    edited = drop_token(spatial_map, 1)
    torch.testing.assert_close(edited[3], torch.tensor([1 / 3, 0.0, 1 / 3, 1 / 3]))
    with pytest.raises(ValueError, match="only token"):
        drop_token(torch.ones(4, 1), 0)
    with pytest.raises(ValueError, match="out of range"):
        drop_token(spatial_map, 4)


def test_restrict_changes_only_the_patches_outside_the_region():
    spatial_map = _random_map()
    region = np.zeros((4, 4), dtype=bool)
    region[:2, :2] = True
    edited = restrict_token(spatial_map, 2, region)
    inside = torch.from_numpy(region.reshape(-1))
    assert torch.equal(edited[inside], spatial_map[inside])
    torch.testing.assert_close(edited[~inside], drop_token(spatial_map, 2)[~inside])
    assert torch.equal(
        restrict_token(spatial_map, 2, np.ones((4, 4), bool)), spatial_map
    )
    with pytest.raises(ValueError, match="covers 9 patches"):
        restrict_token(spatial_map, 2, np.ones((3, 3), bool))


def test_swap_replaces_one_token_vector():
    tokens, other = torch.randn(4, 8), torch.randn(5, 8)
    edited = swap_token(tokens, 1, other, 4)
    assert torch.equal(edited[1], other[4])
    assert torch.equal(edited[[0, 2, 3]], tokens[[0, 2, 3]])
    with pytest.raises(ValueError, match="same model"):
        swap_token(tokens, 0, torch.randn(4, 6), 0)


def test_region_from_drawing_uses_coverage_per_patch():
    drawing = np.zeros((64, 64, 4), dtype=np.uint8)
    drawing[:16, :32, 3] = 255  # the top row of patches 0 and 1 of a 4x4 grid, fully
    drawing[16:20, :16, 3] = 255  # a quarter of patch (1, 0)
    region = region_from_drawing(drawing, (4, 4))
    expected = np.zeros((4, 4), dtype=bool)
    expected[0, :2] = True
    assert np.array_equal(region, expected)
    assert region_from_drawing(drawing, (4, 4), min_coverage=0.25)[1, 0]
    # A drawing smaller than the grid still maps onto it.
    assert region_from_drawing(np.ones((2, 2)), (4, 4)).all()


def test_apply_edit_records_the_history_and_explains_missing_inputs():
    factors = Factors(torch.randn(4, 8), _random_map(), (4, 4))
    edited = apply_edit(
        apply_edit(factors, Edit("drop", 0)), Edit("reassign", 1, target=2)
    )
    assert [edit.kind for edit in edited.edits] == [
        "drop",
        "reassign",
    ] and factors.edits == []
    with pytest.raises(ValueError, match="second image"):
        apply_edit(factors, Edit("swap", 0, target=0))
    with pytest.raises(ValueError, match="region"):
        apply_edit(factors, Edit("restrict", 0))
    with pytest.raises(ValueError, match="unknown edit"):
        apply_edit(factors, Edit("blur", 0))


# -- the model: factorize once, decode only ----------------------------------------------------------------------------


def test_decoding_unedited_factors_is_the_models_reconstruction(explorer, scenes):
    image = scenes["synthetic scene 0"]
    factors = explorer.factorize(image)
    assert factors.sparse_tokens.shape == (4, 32) and factors.spatial_map.shape == (
        16,
        4,
    )
    assert factors.grid_size == (4, 4) and factors.image.shape == (3, 32, 32)
    pixel_values, _ = explorer.preprocess(image)
    with torch.no_grad():
        reference = (
            explorer.model(pixel_values=pixel_values).reconstruction[0].clamp(0, 1)
        )
    torch.testing.assert_close(
        explorer.decode(factors).image, reference, rtol=0, atol=1e-6
    )


def test_edits_run_the_decoder_only(explorer, scenes):
    encoder_calls, decoder_calls = [], []
    hooks = [
        explorer.model.stellar.register_forward_hook(
            lambda *_: encoder_calls.append(1)
        ),
        explorer.model.decoder.register_forward_hook(
            lambda *_: decoder_calls.append(1)
        ),
    ]
    try:
        factors = explorer.factorize(scenes["synthetic scene 0"])
        other = explorer.factorize(scenes["synthetic scene 1"])
        assert len(encoder_calls) == 2
        original = explorer.decode(factors).image
        edits = [
            Edit("drop", 0),
            Edit("reassign", 1, target=2),
            Edit("swap", 3, target=0),
        ]
        for edit in edits:
            factors = apply_edit(factors, edit, other=other)
            decoding = explorer.decode(factors)
            assert decoding.seconds > 0
        assert len(encoder_calls) == 2, "an edit ran the encoder"
        assert len(decoder_calls) == 1 + len(edits)
        assert not torch.equal(decoding.image, original)
    finally:
        for hook in hooks:
            hook.remove()


def test_vq_model_decodes_through_the_tokenizer(tmp_path, scenes):
    from doc_blocks import TINY_VQGAN_CONFIG

    from stellar_hf import MaskGitVQGANConfig, MaskGitVQGANModel

    model_dir = _save_model(
        tmp_path / "vq",
        reconstruction_target="vq",
        vq_codebook_size=16,
        image_size=64,
        patch_size=16,
    )
    MaskGitVQGANModel(MaskGitVQGANConfig(**TINY_VQGAN_CONFIG)).save_pretrained(
        tmp_path / "vqgan"
    )
    with pytest.raises(ValueError, match="vq_tokenizer"):
        load_explorer(model_dir)
    explorer = load_explorer(model_dir, vq_tokenizer=tmp_path / "vqgan")
    factors = explorer.factorize(scenes["synthetic scene 0"])
    decoded = explorer.decode(factors).image
    assert decoded.ndim == 3 and decoded.shape[0] == 3
    pixel_values, _ = explorer.preprocess(scenes["synthetic scene 0"])
    with torch.no_grad():
        labels = torch.zeros(
            1, 16, dtype=torch.long
        )  # any codes: only the reconstruction is compared
        reference = (
            explorer.model(pixel_values=pixel_values, labels=labels)
            .reconstruction[0]
            .clamp(0, 1)
        )
    torch.testing.assert_close(decoded, reference, rtol=0, atol=1e-5)


def test_load_refuses_a_folder_without_decoder(tmp_path):
    config = tiny_config()
    StellarModel(config).save_pretrained(tmp_path / "encoder-only")
    with pytest.raises(ValueError, match="no reconstruction decoder"):
        load_explorer(tmp_path / "encoder-only")


def test_load_refuses_a_tokenizer_for_a_pixel_model(pixel_dir):
    with pytest.raises(ValueError, match="reconstructs pixels"):
        load_explorer(pixel_dir, vq_tokenizer="maskgit-vqgan")


# -- pictures and files ----------------------------------------------------------------------------------------------


def test_overlays_and_figure(explorer, scenes):
    factors = explorer.factorize(scenes["synthetic scene 0"])
    tiles = overlay_tiles(factors, tile_size=64)
    assert [caption for _, caption in tiles][:2] == ["image", "hard assignment"]
    assert len(tiles) == 2 + factors.num_tokens
    assert all(picture.size == (64, 64) for picture, _ in tiles)
    assert all(caption.startswith(f"#{t} ") for t, (_, caption) in enumerate(tiles[2:]))
    # Every patch of the hard assignment tile is blended towards its argmax token's colour.
    hard = np.asarray(tiles[1][0], dtype=np.float32)
    base = np.asarray(tiles[0][0], dtype=np.float32)
    colors = token_colors(factors.num_tokens).astype(np.float32)
    argmax = factors.hard_assignment().numpy()
    for row in range(4):
        for column in range(4):
            y, x = row * 16 + 8, column * 16 + 8
            expected = 0.4 * base[y, x] + 0.6 * colors[argmax[row, column]]
            assert np.abs(hard[y, x] - expected).max() <= 1.0
    decoded = explorer.decode(factors).image
    edited = apply_edit(factors, Edit("drop", 0))
    figure = edit_figure(
        factors, edited, decoded, explorer.decode(edited).image, tile_size=64
    )
    assert figure.mode == "RGB" and figure.width > 5 * 64


def test_factors_round_trip_through_safetensors(tmp_path):
    factors = Factors(torch.randn(4, 8), _random_map(), (4, 4))
    region = tuple(tuple(bool(v) for v in row) for row in np.eye(4, dtype=bool))
    edited = apply_edit(
        apply_edit(factors, Edit("reassign", 0, target=1)),
        Edit("restrict", 2, region=region),
    )
    path = save_factors(
        tmp_path / "factors.safetensors", edited, original=factors, model="tiny"
    )
    loaded, original, metadata = load_factors(path)
    assert torch.equal(loaded.sparse_tokens, edited.sparse_tokens)
    assert torch.equal(loaded.spatial_map, edited.spatial_map)
    assert torch.equal(
        original.spatial_map, factors.spatial_map
    ) and loaded.grid_size == (4, 4)
    assert loaded.edits == edited.edits and metadata["model"] == "tiny"
    # Unedited factors share memory with the "original" ones: saved all the same.
    save_factors(tmp_path / "unedited.safetensors", factors, original=factors)


def test_samples_include_a_named_folder(tmp_path):
    Image.new("RGB", (20, 10), "red").save(tmp_path / "b.png")
    Image.new("RGB", (20, 10), "blue").save(tmp_path / "a.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    samples = sample_images(num_synthetic=1, image_size=32, samples_dir=tmp_path)
    assert list(samples) == ["synthetic scene 0", "a.jpg", "b.png"]
    assert samples["synthetic scene 0"].size == (32, 32)
    with pytest.raises(ValueError, match="does not exist"):
        sample_images(0, samples_dir=tmp_path / "missing")


# -- the Space export and the command line ---------------------------------------------------------------------------


def test_space_export_writes_a_loadable_space(tmp_path):
    folder = write_space(
        tmp_path / "space", "org/stellar-b16", SCRIPT, vq_tokenizer="org/maskgit-vqgan"
    )
    names = {path.name for path in folder.iterdir()}
    assert {
        "app.py",
        "explorer.py",
        "requirements.txt",
        "README.md",
        "stellar_hf",
    } <= names
    card = (folder / "README.md").read_text()
    front = card.split("---\n")[1]
    for line in (
        "sdk: gradio",
        "app_file: app.py",
        "  - org/stellar-b16",
        "  - org/maskgit-vqgan",
        "license: mit",
    ):
        assert line in front.splitlines(), line
    app = (folder / "app.py").read_text()
    assert "load_explorer('org/stellar-b16', vq_tokenizer='org/maskgit-vqgan')" in app
    compile(app, "app.py", "exec")
    requirements = (folder / "requirements.txt").read_text().splitlines()
    assert (
        any(line.startswith("gradio==") for line in requirements)
        and "torch>=2.4" in requirements
    )
    assert (folder / "stellar_hf" / "explorer.py").is_file() and not list(
        folder.rglob("__pycache__")
    )
    with pytest.raises(ValueError, match="Hub id"):
        write_space(tmp_path / "bad", "./local-folder", SCRIPT)


def test_space_export_does_not_guess_the_gradio_version(tmp_path, monkeypatch):
    import importlib.metadata

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    with pytest.raises(ValueError, match="gradio_version"):
        write_space(tmp_path / "space", "org/stellar-b16", SCRIPT)
    assert not (tmp_path / "space").exists()
    folder = write_space(tmp_path / "space", "org/stellar-b16", SCRIPT, gradio_version="6.31.0")
    assert "gradio==6.31.0" in (folder / "requirements.txt").read_text().splitlines()


def _tree(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def test_space_export_killed_at_every_write_leaves_whole_files(tmp_path):
    from fault_injection import WritePoints, run_in_child

    def export(argv):
        write_space(argv[0], argv[1], SCRIPT, gradio_version="6.31.0")

    first, second = tmp_path / "first", tmp_path / "second"
    write_space(first / "space", "org/old-model", SCRIPT, gradio_version="6.31.0")
    write_space(second / "space", "org/new-model", SCRIPT, gradio_version="6.31.0")
    old, new = _tree(first / "space"), _tree(second / "space")
    # The points of a re-export over a previous one: files written beside the folder, renames, removals.
    counting = tmp_path / "count"
    write_space(counting / "space", "org/old-model", SCRIPT, gradio_version="6.31.0")
    points = WritePoints(counting)
    outcome = run_in_child(export, [str(counting / "space"), "org/new-model"], tmp_path / "count.log", points,
                           tmp_path / "points.json")  # fmt: skip
    assert outcome.get("exit_code") == 0, outcome
    count = len(__import__("json").loads((tmp_path / "points.json").read_text()))
    assert count > 20
    for point in range(1, count + 1):
        work = tmp_path / f"kill{point}"
        write_space(work / "space", "org/old-model", SCRIPT, gradio_version="6.31.0")
        outcome = run_in_child(export, [str(work / "space"), "org/new-model"], tmp_path / "kill.log",
                               WritePoints(work, stop_at=point), None)  # fmt: skip
        assert outcome.get("signal") == 9, (point, outcome)
        found = _tree(work / "space")
        for name, content in found.items():
            assert content in (old.get(name), new.get(name)), (point, name)  # every file whole, old or new
        package = {name for name in old if name.startswith("stellar_hf/")}
        if not package <= set(found):  # only between the two renames of the package copy: it waits beside
            aside = work / ".space.stellar_hf.previous"
            assert {f"stellar_hf/{name}" for name in _tree(aside)} == package, point
        # Exporting again gives the new Space exactly, with nothing left beside it.
        write_space(work / "space", "org/new-model", SCRIPT, gradio_version="6.31.0")
        assert _tree(work / "space") == new, point
        assert sorted(path.name for path in work.iterdir()) == ["space"], point


def _load_script():
    spec = importlib.util.spec_from_file_location("stellar_explorer_cli", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_errors(tmp_path, monkeypatch, capsys):
    script = _load_script()
    monkeypatch.chdir(tmp_path)  # no outputs/stellar-pretrain here
    with pytest.raises(SystemExit):
        script.parse_args([])
    assert "run the Quick start" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.parse_args(["--export_space", "space"])
    assert "--export_space needs --hub_model_id" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.parse_args(["--model", "m", "--hub_model_id", "org/m"])
    assert "goes with --export_space" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.parse_args(["--model", "m", "--samples_dir", "missing"])
    assert "is not a folder" in capsys.readouterr().err
    (tmp_path / "outputs" / "stellar-pretrain").mkdir(parents=True)
    assert script.parse_args([]).model == str(Path("outputs/stellar-pretrain"))


def test_cli_exports_a_space(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--export_space",
            str(tmp_path / "space"),
            "--hub_model_id",
            "org/stellar",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "hf upload" in result.stdout and (tmp_path / "space" / "app.py").is_file()


def test_cli_names_a_model_it_cannot_load(tmp_path, monkeypatch):
    pytest.importorskip("gradio")
    script = _load_script()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit, match="cannot load"):
        script.main(["--model", str(tmp_path / "no-such-model")])


def test_page_builds(explorer):
    pytest.importorskip("gradio")
    demo = _load_script().build_demo(explorer, {"a": Image.new("RGB", (32, 32))})
    assert demo is not None
