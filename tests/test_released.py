"""Tests of `stellar_hf.released`: the released checkpoints in one call, offline.

The Hub is never reached: `hf_hub_download` is replaced by a function that lays a fixture file out as the Hugging
Face cache does (blob named by its sha256, snapshot link, ref) and enforces `local_files_only` / `HF_HUB_OFFLINE`
like the real one. The fixture is an original-format checkpoint of standard widths (384-wide encoder, the original's
512-wide decoder, VQ head), so it converts without options, as the released files do. `HfApi` is replaced for
`--push_to_hub`.
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fault_injection import WritePoints, run_in_child
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import LocalEntryNotFoundError
from test_convert import original_state_dict, random_model, write_checkpoint

import stellar_hf
import stellar_hf.convert as convert_module
import stellar_hf.released as released_module
from stellar_hf import (
    MaskGitVQGANConfig,
    MaskGitVQGANModel,
    StellarConfig,
    StellarForImageClassification,
    StellarForImageReconstruction,
    StellarForPreTraining,
    StellarModel,
    list_released_models,
    load_released_model,
)
from stellar_hf.convert import convert_checkpoint, model_outputs
from stellar_hf.released import MARKER_NAME, RELEASED_MODELS, download_released_file

REPO_ROOT = Path(__file__).resolve().parents[1]
# Standard widths (ViT-S 384 → 6 heads, the original's 512-wide decoder → 8), so no option is needed; a VQ head
# over the tiny tokenizer's 16 codes; 16-px patches at 32 px (a 2 x 2 grid).
RELEASED_LIKE = dict(
    hidden_size=384, num_hidden_layers=1, num_attention_heads=6, intermediate_size=64, image_size=32,
    patch_size=16, num_sparse_tokens=4, decoder_hidden_size=512, decoder_num_hidden_layers=1,
    decoder_num_attention_heads=8, decoder_intermediate_size=64, reconstruction_target="vq", vq_codebook_size=16,
    num_prototypes=32, prototype_dim=16, predictor_hidden_size=64,
)  # fmt: skip
# A MaskGIT VQGAN with the released downsampling (f = 16) and 16 codes.
TINY_VQGAN = dict(hidden_channels=32, channel_mult=[1, 1, 1, 1, 1], num_res_blocks=1, z_channels=32,
                  codebook_size=16, codebook_dim=32, image_size=32)  # fmt: skip
PARITY_SETTINGS = {"num_attention_heads": 4, "decoder_num_attention_heads": 4, "spatial_temperature": 0.06}
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def original_file(tmp_path_factory) -> Path:
    """An original-format `StellarForPreTraining` checkpoint of standard widths, as a released `.safetensors`."""
    model = random_model(StellarForPreTraining, StellarConfig(**RELEASED_LIKE))
    return write_checkpoint(original_state_dict(model), tmp_path_factory.mktemp("original") / "stellar-b16.safetensors")


@pytest.fixture(scope="module")
def reference_dir(original_file, tmp_path_factory) -> Path:
    """The same file converted by hand with `python -m stellar_hf.convert`'s function."""
    folder = tmp_path_factory.mktemp("by-hand") / "stellar-b16"
    convert_checkpoint(original_file, folder)
    return folder


class FakeHub:
    """`hf_hub_download` serving files from this machine, laid out in `cache_dir` as the Hugging Face cache is."""

    def __init__(self, files: dict[str, Path]):
        self.files = files  # revision -> file served
        self.calls: list[dict] = []

    def __call__(self, repo_id, filename, *, revision=None, cache_dir=None, local_files_only=False, token=None,
                 force_download=False, **kwargs):  # fmt: skip
        self.calls.append(dict(repo_id=repo_id, filename=filename, revision=revision, cache_dir=cache_dir,
                               local_files_only=local_files_only, token=token,
                               force_download=force_download))  # fmt: skip
        assert not kwargs, f"unexpected arguments {kwargs}"
        revision = revision or "main"
        repo = Path(cache_dir or hub_constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
        ref = repo / "refs" / revision
        if ref.is_file() and not force_download:
            snapshot = repo / "snapshots" / ref.read_text() / filename
            if snapshot.exists():
                return str(snapshot)
        if local_files_only or hub_constants.HF_HUB_OFFLINE:
            raise LocalEntryNotFoundError("Cannot find the requested files in the disk cache")
        data = self.files[revision].read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        commit = hashlib.sha1(f"{revision}{digest}".encode()).hexdigest()
        (repo / "blobs").mkdir(parents=True, exist_ok=True)
        (repo / "blobs" / digest).write_bytes(data)
        snapshot = repo / "snapshots" / commit / filename
        snapshot.parent.mkdir(parents=True, exist_ok=True)
        snapshot.unlink(missing_ok=True)
        snapshot.symlink_to(Path("../..") / "blobs" / digest)
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(commit)
        return str(snapshot)


@pytest.fixture
def hub(original_file, monkeypatch) -> FakeHub:
    fake = FakeHub({"main": original_file})
    monkeypatch.setattr(released_module, "hf_hub_download", fake)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    return fake


@pytest.fixture
def conversions(monkeypatch) -> list[Path]:
    """Counts the calls to the converter (the paths converted)."""
    calls, convert = [], convert_module.convert_checkpoint

    def counted(checkpoint_path, *args, **kwargs):
        calls.append(Path(checkpoint_path))
        return convert(checkpoint_path, *args, **kwargs)

    monkeypatch.setattr(convert_module, "convert_checkpoint", counted)
    return calls


def assert_same_outputs(model, reference) -> None:
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    got, expected = model_outputs(model, pixel_values), model_outputs(reference, pixel_values)
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


# ----------------------------------------------------------------------------------------------------------------------
# The list
# ----------------------------------------------------------------------------------------------------------------------


def test_list_released_models():
    models = list_released_models()
    assert [model.name for model in models] == [
        "stellar-b16",
        "stellar-l16",
        "stellar-h16",
        "stellar-b8",
        "stellar-b24",
    ]
    for model in models:
        assert (model.repo_id, model.filename) == ("microsoft/STELLAR", f"{model.name}.safetensors")
        assert model.file_size is None  # not published in the upstream sources we can read: never made up
        assert set(model.purposes) <= set(released_module.PURPOSES)
        counts = model.num_parameters
        assert counts["feature-extraction"] < counts["reconstruction"] < counts["pretraining"]
    by_name = {model.name: model for model in models}
    # The number in a name is the sparse-token count; H16 is a ViT-H/14.
    assert [by_name[name].num_sparse_tokens for name in ("stellar-b8", "stellar-b16", "stellar-b24")] == [8, 16, 24]
    assert (by_name["stellar-h16"].patch_size, by_name["stellar-h16"].hidden_size) == (14, 1280)
    # Counts are the configs' own: each sparse token is one 768-wide vector.
    features = {name: by_name[name].num_parameters["feature-extraction"] for name in ("stellar-b8", "stellar-b16")}
    assert features["stellar-b16"] - features["stellar-b8"] == 8 * 768
    with torch.device("meta"):
        built = StellarModel(StellarConfig())  # the defaults are the released B/16 recipe
    assert by_name["stellar-b16"].num_parameters["feature-extraction"] == sum(p.numel() for p in built.parameters())


def test_package_import_stays_light():
    """The names are on the package, but neither `released` nor the converter is imported until one is used."""
    code = (
        "import sys, stellar_hf; before = sorted(sys.modules); stellar_hf.list_released_models; "
        "print(json.dumps(['stellar_hf.released' in before, 'stellar_hf.convert' in sys.modules]))"
    )
    result = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True,
                            cwd=REPO_ROOT, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [False, False]
    assert {"list_released_models", "load_released_model"} <= set(stellar_hf.__all__)


# ----------------------------------------------------------------------------------------------------------------------
# A local original file
# ----------------------------------------------------------------------------------------------------------------------


def test_local_original_file_each_purpose(stellar_parity_dir, tmp_path, conversions):
    """The original's own checkpoint: every purpose gives the class asked for, equal to converting by hand."""
    by_hand = tmp_path / "by-hand"
    convert_checkpoint(stellar_parity_dir / "original.ckpt", by_hand, **PARITY_SETTINGS)
    for purpose, model_class in released_module.PURPOSES.items():
        model = load_released_model(stellar_parity_dir / "original.ckpt", purpose,
                                    converted_cache_dir=tmp_path / "cache",
                                    conversion_options=PARITY_SETTINGS)  # fmt: skip
        assert type(model) is model_class and not model.training
        assert_same_outputs(model, model_class.from_pretrained(by_hand))
    assert conversions == [stellar_parity_dir / "original.ckpt"]  # converted once, then served from the cache
    # The settings the file does not record are still never guessed, and other settings are another conversion.
    with pytest.raises(convert_module.MissingSettingError, match="--num_attention_heads"):
        load_released_model(stellar_parity_dir / "original.ckpt", converted_cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="revision"):
        load_released_model(stellar_parity_dir / "original.ckpt", revision="main", conversion_options=PARITY_SETTINGS)


def test_a_changed_local_file_is_converted_again(original_file, tmp_path, conversions):
    copy = tmp_path / "run.safetensors"
    copy.write_bytes(original_file.read_bytes())
    load_released_model(copy, converted_cache_dir=tmp_path / "cache")
    load_released_model(copy, converted_cache_dir=tmp_path / "cache")
    assert len(conversions) == 1
    os.utime(copy, ns=(copy.stat().st_atime_ns, copy.stat().st_mtime_ns + 10**9))
    load_released_model(copy, converted_cache_dir=tmp_path / "cache")
    assert len(conversions) == 2


# ----------------------------------------------------------------------------------------------------------------------
# A released name, through the (replaced) Hub
# ----------------------------------------------------------------------------------------------------------------------


def test_hub_download_conversion_and_cache(hub, reference_dir, tmp_path, conversions):
    cache, converted = tmp_path / "hub", tmp_path / "converted"
    first = load_released_model("stellar-b16", "pretraining", revision="main", cache_dir=cache, token="hf_x",
                                converted_cache_dir=converted)  # fmt: skip
    assert hub.calls[0] == dict(repo_id="microsoft/STELLAR", filename="stellar-b16.safetensors", revision="main",
                                cache_dir=cache, local_files_only=False, token="hf_x",
                                force_download=False)  # fmt: skip
    assert type(first) is StellarForPreTraining
    assert_same_outputs(first, StellarForPreTraining.from_pretrained(reference_dir))

    # The second call (any purpose, names are case-insensitive) converts nothing; it works offline too.
    for name, purpose, model_class in (("STELLAR-B16", "reconstruction", StellarForImageReconstruction),
                                       ("stellar-b16", None, StellarModel)):  # fmt: skip
        model = load_released_model(name, purpose, cache_dir=cache, local_files_only=True,
                                    converted_cache_dir=converted)  # fmt: skip
        assert type(model) is model_class
        assert_same_outputs(model, model_class.from_pretrained(reference_dir))
    assert hub.calls[-1]["local_files_only"] is True
    assert len(conversions) == 1
    folders = [path for path in converted.iterdir()]
    assert [path.name.split("--")[0] for path in folders] == ["stellar-b16"]  # nothing hidden left behind
    marker = json.loads((folders[0] / MARKER_NAME).read_text())
    assert marker["release"] == "stellar-b16" and marker["identity"].startswith("blob:")
    # The released name fills the card: the paper's numbers and ImageNet-1k.
    card = (folders[0] / "README.md").read_text()
    assert "ILSVRC/imagenet-1k" in card and "73.26" in card and "microsoft/STELLAR" in card

    # `model_class` instead of a purpose: a new classifier on the converted encoder.
    classifier = load_released_model("stellar-b16", model_class=StellarForImageClassification, cache_dir=cache,
                                     converted_cache_dir=converted, num_labels=3)  # fmt: skip
    assert type(classifier) is StellarForImageClassification and classifier.config.num_labels == 3
    assert len(conversions) == 1

    # Another revision with other content is another conversion; `force_download` converts again.
    other = tmp_path / "other.safetensors"
    write_checkpoint(original_state_dict(random_model(StellarForPreTraining, StellarConfig(**RELEASED_LIKE), 1)), other)
    hub.files["v2"] = other
    load_released_model("stellar-b16", revision="v2", cache_dir=cache, converted_cache_dir=converted)
    assert len(conversions) == 2
    load_released_model("stellar-b16", cache_dir=cache, converted_cache_dir=converted, force_download=True)
    assert len(conversions) == 3 and len(list(converted.iterdir())) == 2


def test_default_cache_locations(hub, monkeypatch, tmp_path, conversions):
    """Hub files in the Hub cache; converted folders beside it, not inside it (`hf cache scan` stays clean)."""
    monkeypatch.setattr(hub_constants, "HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.delenv("STELLAR_HF_CACHE", raising=False)
    load_released_model("stellar-b16")
    assert [path.name for path in (tmp_path / "hf" / "hub").iterdir()] == ["models--microsoft--STELLAR"]
    assert [path.name.split("--")[0] for path in (tmp_path / "hf" / "stellar_hf" / "converted").iterdir()] == [
        "stellar-b16"
    ]
    monkeypatch.setenv("STELLAR_HF_CACHE", str(tmp_path / "mine"))
    load_released_model("stellar-b16")
    assert len(list((tmp_path / "mine").iterdir())) == 1 and len(conversions) == 2


def test_offline_without_the_file_says_what_to_do(hub, monkeypatch, tmp_path):
    with pytest.raises(OSError, match=r"not in the Hugging Face cache .* downloads are off \(local_files_only=True\)"):
        load_released_model("stellar-b16", cache_dir=tmp_path / "hub", local_files_only=True)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match=r"HF_HUB_OFFLINE=1.*hf download microsoft/STELLAR stellar-b16\.safetensors"):
        download_released_file("stellar-b16", cache_dir=tmp_path / "hub")
    assert not (tmp_path / "converted").exists()


def test_unknown_names_missing_files_and_bad_requests(hub, original_file, tmp_path):
    with pytest.raises(ValueError, match="stellar-b16, stellar-l16, stellar-h16, stellar-b8, stellar-b24") as error:
        load_released_model("stellar-b32")
    assert "list_released_models" in str(error.value)
    with pytest.raises(FileNotFoundError, match="no such file.*Released models: stellar-b16"):
        load_released_model(tmp_path / "missing.ckpt")
    with pytest.raises(ValueError, match="is a folder"):
        load_released_model(tmp_path)
    with pytest.raises(ValueError, match="unknown purpose 'segmentation'"):
        load_released_model("stellar-b16", "segmentation")
    with pytest.raises(ValueError, match="not both"):
        load_released_model("stellar-b16", "pretraining", model_class=StellarModel)
    assert hub.calls == []  # all refused before any download

    # A file without a decoder serves feature extraction only.
    encoder_only = write_checkpoint(
        original_state_dict(random_model(StellarModel, StellarConfig(**RELEASED_LIKE))),
        tmp_path / "encoder.safetensors",
    )
    load_released_model(encoder_only, converted_cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="holds no reconstruction decoder"):
        load_released_model(encoder_only, "reconstruction", converted_cache_dir=tmp_path / "cache")
    # A tokenizer is only for a VQ model that decodes.
    with pytest.raises(ValueError, match="vq_tokenizer is for a model with the VQ reconstruction target"):
        load_released_model(original_file, vq_tokenizer=MaskGitVQGANModel(MaskGitVQGANConfig(**TINY_VQGAN)),
                            converted_cache_dir=tmp_path / "cache")  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# The VQ tokenizer
# ----------------------------------------------------------------------------------------------------------------------


def test_reconstruction_with_the_vq_tokenizer(hub, tmp_path, monkeypatch):
    torch.manual_seed(0)
    tokenizer = MaskGitVQGANModel(MaskGitVQGANConfig(**TINY_VQGAN)).eval()
    pixel_values = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    converted = tmp_path / "converted"
    with_model = load_released_model("stellar-b16", "reconstruction", vq_tokenizer=tokenizer, cache_dir=tmp_path,
                                     converted_cache_dir=converted)  # fmt: skip
    assert with_model.vq_tokenizer is tokenizer
    with torch.no_grad():
        expected = with_model(pixel_values).reconstruction
    assert expected.shape == (1, 3, 32, 32) and 0 <= expected.min() and expected.max() <= 1

    # The original tokenizer file (a training checkpoint whose hyper-parameters give its resolution) is converted
    # once and cached like the model.
    sizes = {"hidden_channels": 32, "channel_mult": [1, 1, 1, 1, 1], "num_res_blocks": 1, "z_channels": 32,
             "num_channels": 3, "resolution": 32}  # fmt: skip
    tokenizer_file = tmp_path / "maskgit-vqgan.ckpt"
    torch.save({"state_dict": tokenizer.state_dict(), "hyper_parameters": {"vq": sizes}}, tokenizer_file)
    import stellar_hf.convert_vqgan as convert_vqgan_module

    calls, original = [], convert_vqgan_module.convert_vqgan_checkpoint
    monkeypatch.setattr(convert_vqgan_module, "convert_vqgan_checkpoint",
                        lambda *args, **kwargs: calls.append(args) or original(*args, **kwargs))  # fmt: skip
    for purpose in ("reconstruction", "pretraining"):
        model = load_released_model("stellar-b16", purpose, vq_tokenizer=tokenizer_file, cache_dir=tmp_path,
                                    converted_cache_dir=converted)  # fmt: skip
        assert isinstance(model.vq_tokenizer, MaskGitVQGANModel)
    assert len(calls) == 1
    with torch.no_grad():
        outputs = model.stellar(pixel_values)
        assert torch.equal(model.reconstruct(outputs.sparse_tokens, outputs.spatial_map), expected)


# ----------------------------------------------------------------------------------------------------------------------
# A conversion cut short never leaves a folder that loads as complete
# ----------------------------------------------------------------------------------------------------------------------


def test_interrupted_cache_write(hub, original_file, reference_dir, tmp_path):
    """Kill the process (SIGKILL) at write points of the conversion, or fail there as a full disk would; the next
    call converts afresh and gives the model converted by hand."""
    cache = tmp_path / "hub"
    download_released_file("stellar-b16", cache_dir=cache)  # in the cache, so the child only converts

    def load(argv):
        load_released_model("stellar-b16", cache_dir=cache, converted_cache_dir=argv[0])
        return 0

    counted = WritePoints((tmp_path / "reference").resolve())
    reference = run_in_child(load, [str(tmp_path / "reference")], tmp_path / "reference.log", counted,
                             tmp_path / "points.json")  # fmt: skip
    assert reference == {"exit_code": 0, "log": reference["log"]}, reference["log"]
    points = json.loads((tmp_path / "points.json").read_text())
    assert any("safetensors" in point for point in points) and any("os.rename" in point for point in points)
    # Every point (the last is the rename that publishes the folder); a full disk at the last two.
    publish = max(index for index, point in enumerate(points, 1) if point.startswith("os.rename"))
    runs = [(number, "kill") for number in range(1, len(points) + 1)] + [(publish - 1, "enospc"), (publish, "enospc")]
    for number, action in runs:
        root = (tmp_path / f"{action}-{number}").resolve()
        outcome = run_in_child(load, [str(root)], tmp_path / f"{action}-{number}.log",
                               WritePoints(root, stop_at=number, action=action), None)  # fmt: skip
        where = (number, points[number - 1], outcome)
        visible = [path for path in root.iterdir() if not path.name.startswith(".")] if root.exists() else []
        for folder in visible:  # whatever carries a final name is complete
            assert released_module._read_marker(folder, folder.name.split("--")[1]) is not None, where
        if action == "kill":
            assert outcome.get("signal") == 9, where
            assert (visible != []) == (number > publish), where
        else:  # a failure, not a kill: nothing is left but a complete folder (a failed publish is retried once)
            # run_in_child's code for an exception: the injected OSError reached the caller.
            assert outcome.get("exit_code") == 3 and visible == [] or outcome.get("exit_code") == 0, where
            assert [path.name for path in root.iterdir() if path.name.startswith(".")] == [], where
        model = load_released_model("stellar-b16", "pretraining", cache_dir=cache, converted_cache_dir=root)
        assert_same_outputs(model, StellarForPreTraining.from_pretrained(reference_dir))
        assert [path.name for path in root.iterdir() if path.name.startswith(".")] == [], "leftovers not removed"


# ----------------------------------------------------------------------------------------------------------------------
# --push_to_hub
# ----------------------------------------------------------------------------------------------------------------------


class FakeHfApi:
    """Records `create_repo` and `upload_folder` (with the files as uploaded); adds the namespace like the Hub."""

    calls: list = []
    fail: Exception | None = None

    def __init__(self, *args, **kwargs):
        assert not args and not kwargs, "the token must come from the environment or the login, not an argument"

    def create_repo(self, repo_id, *, private=None, exist_ok=False, **kwargs):
        FakeHfApi.calls.append(("create_repo", repo_id, private, exist_ok))

        class RepoUrl:
            pass

        url = RepoUrl()
        url.repo_id = repo_id if "/" in repo_id else f"me/{repo_id}"
        return url

    def upload_folder(self, *, repo_id, folder_path, commit_message=None, **kwargs):
        if FakeHfApi.fail is not None:
            raise FakeHfApi.fail
        files = {path.name: path.read_bytes() for path in Path(folder_path).iterdir() if path.is_file()}
        FakeHfApi.calls.append(("upload_folder", repo_id, files, commit_message))


@pytest.fixture
def fake_api(monkeypatch):
    import huggingface_hub

    FakeHfApi.calls, FakeHfApi.fail = [], None
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    return FakeHfApi


def test_push_to_hub_uploads_the_checked_folder_with_its_card(hub, fake_api, tmp_path, capsys):
    out = tmp_path / "stellar-b16-hf"
    # A released name as --checkpoint: downloaded (through the replaced Hub), converted, uploaded.
    code = convert_module.main(["--checkpoint", "stellar-b16", "--output_dir", str(out), "--push_to_hub",
                                "--hub_model_id", "stellar-b16-hf", "--private"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert hub.calls[0]["revision"] is None and hub.calls[0]["filename"] == "stellar-b16.safetensors"
    (_, repo_id, private, exist_ok), (_, uploaded_to, files, message) = fake_api.calls
    assert (repo_id, private, exist_ok, uploaded_to) == ("stellar-b16-hf", True, True, "me/stellar-b16-hf")
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "README.md", "modeling_stellar.py"} <= set(
        files
    )
    card = files["README.md"].decode()
    assert 'from_pretrained("me/stellar-b16-hf"' in card  # the snippets load the published copy
    assert "ILSVRC/imagenet-1k" in card and "73.26" in card and "stellar-b16" in message
    assert files["model.safetensors"] == (out / "model.safetensors").read_bytes()

    # A local file, with the repository named by --push_to_hub itself; no release, so no paper numbers.
    fake_api.calls.clear()
    code = convert_module.main(["--checkpoint", str(hub.files["main"]), "--output_dir", str(tmp_path / "b"),
                                "--push_to_hub", "you/stellar-run"])  # fmt: skip
    assert code == 0
    (_, repo_id, private, _), (_, _, files, _) = fake_api.calls
    assert (repo_id, private) == ("you/stellar-run", None) and "model-index" not in files["README.md"].decode()

    # A failed upload is exit code 1 and says the folder is saved.
    fake_api.fail = OSError("401 Unauthorized")
    code = convert_module.main(["--checkpoint", str(hub.files["main"]), "--output_dir", str(tmp_path / "c"),
                                "--push_to_hub", "you/stellar-run"])  # fmt: skip
    error = capsys.readouterr().err
    assert code == 1 and "converted and saved to" in error and "401 Unauthorized" in error and "hf auth login" in error
    assert (tmp_path / "c" / "model.safetensors").is_file()


def test_push_to_hub_usage_errors(tmp_path, capsys):
    for argv in (["--hub_model_id", "me/x"], ["--private"], ["--push_to_hub", "me/x", "--hub_model_id", "me/y"],
                 ["--release", "stellar-b32"]):  # fmt: skip
        with pytest.raises(SystemExit) as exit_:
            convert_module.parse_args(["--checkpoint", "x.ckpt", "--output_dir", str(tmp_path), *argv])
        assert exit_.value.code == 2
    assert convert_module.parse_args(["--checkpoint", "x", "--output_dir", "o", "--push_to_hub"]).push_to_hub is True


def test_released_name_on_the_command_line_offline(hub, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    code = convert_module.main(["--checkpoint", "stellar-l16", "--output_dir", str(tmp_path / "out")])
    assert code == 1 and "HF_HUB_OFFLINE=1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert set(RELEASED_MODELS) == {"stellar-b16", "stellar-l16", "stellar-h16", "stellar-b8", "stellar-b24"}
