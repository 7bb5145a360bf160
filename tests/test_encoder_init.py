"""Tests of `stellar_hf.encoder_init`: a STELLAR encoder initialised from transformers (4.x and 5.x names) and timm
ViT / MAE backbones holds exactly their weights and computes what they compute."""

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import ViTConfig, ViTMAEConfig, ViTMAEModel, ViTModel

from stellar_hf import encoder_init
from stellar_hf.configuration_stellar import StellarConfig
from stellar_hf.convert import CheckpointError
from stellar_hf.encoder_init import load_encoder_weights, resize_position_embeddings
from stellar_hf.modeling_stellar import StellarForImageClassification, StellarForPreTraining, StellarModel

WIDTH, DEPTH, HEADS, MLP, IMAGE, PATCH = 32, 2, 4, 64, 32, 8
NUM_PATCHES = (IMAGE // PATCH) ** 2
# 5.x `ViTModel` names -> 4.x names, as in checkpoints saved with transformers 4 (e.g. `facebook/vit-mae-base`).
_TO_4X = [
    (r"^layers\.(\d+)\.attention\.q_proj\.", r"encoder.layer.\1.attention.attention.query."),
    (r"^layers\.(\d+)\.attention\.k_proj\.", r"encoder.layer.\1.attention.attention.key."),
    (r"^layers\.(\d+)\.attention\.v_proj\.", r"encoder.layer.\1.attention.attention.value."),
    (r"^layers\.(\d+)\.attention\.o_proj\.", r"encoder.layer.\1.attention.output.dense."),
    (r"^layers\.(\d+)\.mlp\.fc1\.", r"encoder.layer.\1.intermediate.dense."),
    (r"^layers\.(\d+)\.mlp\.fc2\.", r"encoder.layer.\1.output.dense."),
    (r"^layers\.(\d+)\.", r"encoder.layer.\1."),
]


def stellar_config(**overrides) -> StellarConfig:
    kwargs = dict(
        hidden_size=WIDTH,
        num_hidden_layers=DEPTH,
        num_attention_heads=HEADS,
        intermediate_size=MLP,
        image_size=IMAGE,
        patch_size=PATCH,
        num_sparse_tokens=3,
        decoder_hidden_size=16,
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
        reconstruction_target="pixel",
        num_prototypes=8,
        prototype_dim=4,
        predictor_hidden_size=16,
    )
    kwargs.update(overrides)
    return StellarConfig(**kwargs)


def perturbed(model):
    """Every weight moved off its initial value, so that a tensor that is not copied is noticed."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model.eval()


def vit_mae(**overrides) -> ViTMAEModel:
    torch.manual_seed(0)
    config = ViTMAEConfig(
        hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=MLP,
        image_size=IMAGE, patch_size=PATCH, mask_ratio=0.0, **overrides,
    )  # fmt: skip
    model = ViTMAEModel(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name != "embeddings.position_embeddings":
                parameter.add_(0.05 * torch.randn_like(parameter))
        # MAE's position table is a fixed sin-cos one (requires_grad=False), copied like any weight. transformers 5.24
        # leaves it at zero in a freshly made ViTMAEModel (its sin-cos init returns early once the patch projection
        # is initialised), so write a sin-cos table here for the copy to be noticed.
        phases = torch.arange(1.0 + NUM_PATCHES).unsqueeze(1) * torch.linspace(0.1, 1.0, WIDTH // 2)
        model.embeddings.position_embeddings.copy_(torch.cat((phases.sin(), phases.cos()), dim=1).unsqueeze(0))
    return model


def vit(**overrides) -> ViTModel:
    torch.manual_seed(1)
    config = ViTConfig(
        hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=MLP,
        image_size=IMAGE, patch_size=PATCH, **overrides,
    )  # fmt: skip
    return perturbed(ViTModel(config, add_pooling_layer=True))


def to_4x_names(state_dict: dict[str, torch.Tensor], prefix: str = "vit.") -> dict[str, torch.Tensor]:
    renamed = {}
    for name, tensor in state_dict.items():
        for pattern, target in _TO_4X:
            if re.search(pattern, name):
                name = re.sub(pattern, target, name)
                break
        renamed[prefix + name] = tensor.clone()
    return renamed


def hf_embeddings(backbone, pixel_values: torch.Tensor) -> torch.Tensor:
    if isinstance(backbone, ViTMAEModel):  # mask ratio 0 and increasing noise: every patch, in order
        noise = torch.arange(NUM_PATCHES, dtype=torch.float32).expand(pixel_values.shape[0], -1)
        return backbone.embeddings(pixel_values, noise=noise)[0]
    return backbone.embeddings(pixel_values)


@torch.no_grad()
def assert_computes_like_hf(encoder: StellarModel, backbone, pixel_values: torch.Tensor) -> None:
    """
    Sparse tokens join the attention, so the backbone's own forward is no reference. Instead: our embeddings of CLS
    and patches equal the backbone's, and the backbone's layers and final LayerNorm applied to our full sequence
    [CLS, patches, sparse tokens] give our encoder's output.
    """
    embeddings = encoder.embeddings(pixel_values)
    assert torch.equal(embeddings[:, : 1 + NUM_PATCHES], hf_embeddings(backbone, pixel_values))
    hidden_states = embeddings
    for layer in backbone.layers:
        hidden_states = layer(hidden_states)
    expected = backbone.layernorm(hidden_states)
    torch.testing.assert_close(encoder(pixel_values).last_hidden_state, expected, rtol=0, atol=1e-6)


def assert_weights_equal(encoder: StellarModel, backbone) -> None:
    """Every copied tensor equals the backbone's (names through the 5.x `ViTModel` layout)."""
    ours = encoder.state_dict()
    for name, tensor in backbone.state_dict().items():
        if name.startswith("pooler.") or name == "embeddings.mask_token":
            continue
        target = re.sub(r"^layers\.", "encoder.layers.", name)
        target = {"layernorm.weight": "encoder.layernorm.weight", "layernorm.bias": "encoder.layernorm.bias"}.get(
            target, target
        )
        assert torch.equal(ours[target], tensor), name


# ----------------------------------------------------------------------------------------------------------------------
# transformers backbones
# ----------------------------------------------------------------------------------------------------------------------


def test_vit_mae_folder_5x(tmp_path):
    backbone = vit_mae()
    assert not backbone.embeddings.position_embeddings.requires_grad  # MAE's fixed sin-cos table
    backbone.save_pretrained(tmp_path / "mae")
    torch.manual_seed(2)
    model = StellarForPreTraining(stellar_config()).eval()
    sparse_before = model.stellar.embeddings.sparse_tokens.clone()
    heads_before = model.sparse_clustering_head.state_dict()

    copied = load_encoder_weights(model, tmp_path / "mae")

    expected_names = {
        name for name, _ in model.named_parameters()
        if name.startswith("stellar.") and "sparse_tokens" not in name and ".factorization." not in name
    }  # fmt: skip
    assert set(copied) == expected_names
    assert_weights_equal(model.stellar, backbone)
    assert torch.equal(model.stellar.embeddings.sparse_tokens, sparse_before)  # STELLAR's own parts stay
    for name, tensor in model.sparse_clustering_head.state_dict().items():
        assert torch.equal(tensor, heads_before[name])
    assert_computes_like_hf(model.stellar, backbone, torch.randn(2, 3, IMAGE, IMAGE))


def test_vit_folder_5x_with_pooler_into_a_stellar_model(tmp_path):
    backbone = vit()
    backbone.save_pretrained(tmp_path / "vit")
    encoder = StellarModel(stellar_config()).eval()
    copied = load_encoder_weights(encoder, str(tmp_path / "vit"))
    assert "embeddings.cls_token" in copied and not any(name.startswith("stellar.") for name in copied)
    assert_weights_equal(encoder, backbone)
    assert_computes_like_hf(encoder, backbone, torch.randn(2, 3, IMAGE, IMAGE))


@pytest.mark.parametrize("form", ["dict", "bin", "safetensors-folder"])
def test_vit_mae_4x_names(form, tmp_path):
    """A transformers 4.x `ViTMAEForPreTraining` checkpoint: `vit.` prefix, old names, and an MAE decoder."""
    backbone = vit_mae()
    state_dict = to_4x_names(backbone.state_dict())
    assert "vit.encoder.layer.1.attention.attention.query.weight" in state_dict
    state_dict["decoder.decoder_embed.weight"] = torch.randn(16, WIDTH)
    state_dict["decoder.decoder_layers.0.attention.attention.query.weight"] = torch.randn(16, 16)
    state_dict["decoder.mask_token"] = torch.zeros(1, 1, 16)
    if form == "dict":
        source = state_dict
    elif form == "bin":
        source = tmp_path / "pytorch_model.bin"
        torch.save(state_dict, source)
    else:
        source = tmp_path / "folder"
        source.mkdir()
        save_file(state_dict, str(source / "model.safetensors"))
    model = StellarForImageClassification(stellar_config(num_labels=3)).eval()
    copied = load_encoder_weights(model, source)
    assert len(copied) == 4 + 16 * DEPTH + 2
    assert_weights_equal(model.stellar, backbone)
    assert_computes_like_hf(model.stellar, backbone, torch.randn(2, 3, IMAGE, IMAGE))


def test_position_embeddings_are_resized_like_transformers(tmp_path):
    backbone = vit()
    model = StellarModel(stellar_config(image_size=48)).eval()  # a 6 x 6 grid from a 4 x 4 one
    load_encoder_weights(model, backbone.state_dict())
    with torch.no_grad():
        expected = backbone.embeddings.interpolate_pos_encoding(torch.zeros(1, 1 + 36, WIDTH), 48, 48)
        assert torch.equal(model.embeddings.position_embeddings, expected)
        pixel_values = torch.randn(2, 3, 48, 48)
        ours = model.embeddings(pixel_values)[:, :37]
        theirs = backbone.embeddings(pixel_values, interpolate_pos_encoding=True)
        assert torch.equal(ours, theirs)
    grid = torch.randn(1, 1 + 16, 8)
    assert resize_position_embeddings(grid, (4, 4)) is grid
    assert resize_position_embeddings(grid, (2, 6)).shape == (1, 13, 8)


def test_backbone_without_qkv_bias_gives_zero_biases(tmp_path):
    backbone = vit(qkv_bias=False)
    model = StellarModel(stellar_config()).eval()
    copied = load_encoder_weights(model, backbone.state_dict())
    assert "encoder.layers.0.attention.q_proj.bias" in copied
    assert not model.encoder.layers[0].attention.q_proj.bias.any()
    assert_computes_like_hf(model, backbone, torch.randn(1, 3, IMAGE, IMAGE))


def test_hub_ids_go_through_huggingface_hub(tmp_path, monkeypatch):
    backbone = vit_mae()
    backbone.save_pretrained(tmp_path / "snapshot")
    requested = []

    def fake_download(repo_id, revision=None):
        requested.append((repo_id, revision))
        return tmp_path / "snapshot"

    monkeypatch.setattr(encoder_init, "_download", fake_download)
    model = StellarModel(stellar_config()).eval()
    load_encoder_weights(model, "facebook/vit-mae-base", revision="main")
    assert requested == [("facebook/vit-mae-base", "main")]
    assert_weights_equal(model, backbone)


# ----------------------------------------------------------------------------------------------------------------------
# timm backbones
# ----------------------------------------------------------------------------------------------------------------------


def timm_vit(**overrides):
    timm = pytest.importorskip("timm")
    torch.manual_seed(3)
    kwargs = dict(
        img_size=IMAGE, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, mlp_ratio=MLP / WIDTH
    )
    kwargs.update(overrides)
    return perturbed(timm.models.vision_transformer.VisionTransformer(**kwargs))


@torch.no_grad()
def assert_computes_like_timm(encoder: StellarModel, backbone, pixel_values: torch.Tensor) -> None:
    embeddings = encoder.embeddings(pixel_values)
    assert torch.equal(embeddings[:, : 1 + NUM_PATCHES], backbone._pos_embed(backbone.patch_embed(pixel_values)))
    hidden_states = embeddings
    for block in backbone.blocks:
        hidden_states = block(hidden_states)
    torch.testing.assert_close(encoder(pixel_values).last_hidden_state, backbone.norm(hidden_states), rtol=0, atol=1e-6)


@pytest.mark.parametrize("form", ["safetensors", "mae-release-pth"])
def test_timm_vit(form, tmp_path):
    backbone = timm_vit()
    state_dict = backbone.state_dict()
    if form == "safetensors":
        path = tmp_path / "model.safetensors"
        save_file(state_dict, str(path))
    else:  # the original MAE release: {"model": ...}, with the MAE decoder in the full variant
        path = tmp_path / "mae_pretrain_vit_tiny.pth"
        extra = {
            "mask_token": torch.zeros(1, 1, 16),
            "decoder_embed.weight": torch.randn(16, WIDTH),
            "decoder_blocks.0.attn.qkv.weight": torch.randn(48, 16),
            "decoder_pos_embed": torch.randn(1, 17, 16),
        }
        torch.save({"model": {**state_dict, **extra}}, path)
    # timm's LayerNorms use eps 1e-6 (transformers' ViT 1e-12): the config must say so for equal outputs.
    model = StellarForPreTraining(stellar_config(layer_norm_eps=1e-6)).eval()
    copied = load_encoder_weights(model, path)
    assert len(copied) == 4 + 16 * DEPTH + 2

    encoder = model.stellar
    for index, block in enumerate(backbone.blocks):
        attention = encoder.encoder.layers[index].attention
        query, key, value = block.attn.qkv.weight.chunk(3)
        assert torch.equal(attention.q_proj.weight, query)
        assert torch.equal(attention.k_proj.weight, key)
        assert torch.equal(attention.v_proj.weight, value)
        assert torch.equal(attention.v_proj.bias, block.attn.qkv.bias[2 * WIDTH :])
        assert torch.equal(attention.o_proj.weight, block.attn.proj.weight)
        assert torch.equal(encoder.encoder.layers[index].layernorm_before.weight, block.norm1.weight)
        assert torch.equal(encoder.encoder.layers[index].mlp.fc2.bias, block.mlp.fc2.bias)
    assert torch.equal(encoder.embeddings.position_embeddings, backbone.pos_embed)
    assert torch.equal(encoder.embeddings.cls_token, backbone.cls_token)
    assert torch.equal(encoder.encoder.layernorm.bias, backbone.norm.bias)
    assert_computes_like_timm(encoder, backbone, torch.randn(2, 3, IMAGE, IMAGE))


def test_timm_parts_a_stellar_encoder_lacks_are_refused():
    backbone = timm_vit(init_values=1e-5)  # layer scale: `blocks.N.ls1.gamma`
    model = StellarModel(stellar_config(layer_norm_eps=1e-6))
    with pytest.raises(CheckpointError, match=r"no place for: \['blocks\.0\.ls1\.gamma'"):
        load_encoder_weights(model, backbone.state_dict())
    copied = load_encoder_weights(model, backbone.state_dict(), strict=False)  # what fits, without layer scale
    assert len(copied) == 4 + 16 * DEPTH + 2


# ----------------------------------------------------------------------------------------------------------------------
# Mismatches
# ----------------------------------------------------------------------------------------------------------------------


def test_width_patch_and_depth_mismatches_are_explained(tmp_path):
    state_dict = vit().state_dict()
    with pytest.raises(CheckpointError, match="width mismatch: the backbone is 32 wide, the model's hidden_size is 64"):
        load_encoder_weights(StellarModel(stellar_config(hidden_size=64)), state_dict)
    with pytest.raises(CheckpointError, match="patch embedding mismatch"):
        load_encoder_weights(StellarModel(stellar_config(patch_size=4)), state_dict)
    with pytest.raises(CheckpointError, match=r"the model has 3 layers, the backbone 2.*missing.*encoder\.layers\.2\."):
        load_encoder_weights(StellarModel(stellar_config(num_hidden_layers=3)), state_dict)
    with pytest.raises(
        CheckpointError, match=r"the model has 1 layers, the backbone 2.*no place for: \['encoder\.layers\.1\."
    ):
        load_encoder_weights(StellarModel(stellar_config(num_hidden_layers=1)), state_dict)
    with pytest.raises(CheckpointError, match=r"shape mismatches: encoder\.layers\.0\.mlp\.fc1\.weight"):
        load_encoder_weights(StellarModel(stellar_config(intermediate_size=48)), state_dict)

    shallow = StellarModel(stellar_config(num_hidden_layers=3))
    untouched = shallow.encoder.layers[2].mlp.fc1.weight.clone()
    copied = load_encoder_weights(shallow, state_dict, strict=False)
    assert len(copied) == 4 + 16 * 2 + 2
    assert torch.equal(shallow.encoder.layers[2].mlp.fc1.weight, untouched)


def test_config_mismatches_in_a_transformers_folder(tmp_path):
    vit().save_pretrained(tmp_path / "vit")
    with pytest.raises(CheckpointError, match="num_attention_heads: backbone 4, model 2"):
        load_encoder_weights(StellarModel(stellar_config(num_attention_heads=2)), tmp_path / "vit")
    load_encoder_weights(StellarModel(stellar_config(num_attention_heads=2)), tmp_path / "vit", strict=False)


def test_sources_that_are_not_vit_backbones(tmp_path):
    model = StellarModel(stellar_config())
    with pytest.raises(CheckpointError, match="not a ViT / MAE backbone"):
        load_encoder_weights(model, torch.nn.Linear(3, 4).state_dict())
    with pytest.raises(CheckpointError, match="neither a weights file, a folder, nor a Hub id"):
        load_encoder_weights(model, str(tmp_path / "missing" / "model.bin"))
    with pytest.raises(CheckpointError, match="neither a weights file"):
        load_encoder_weights(model, "mae_pretrain_vit_base.pth")  # a missing file, not a Hub id
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="which file"):
        load_encoder_weights(model, tmp_path / "empty")
    with pytest.raises(TypeError, match="StellarModel"):
        load_encoder_weights(torch.nn.Linear(2, 2), {})
    # Two ViTs of one width in one file (e.g. a teacher and a student): the prefix must be named.
    state_dict = vit().state_dict()
    both = {**{"student." + k: v for k, v in state_dict.items()}, **{"teacher." + k: v for k, v in state_dict.items()}}
    with pytest.raises(CheckpointError, match="prefix="):
        load_encoder_weights(model, both)
    assert len(load_encoder_weights(model, both, prefix="teacher.")) == 4 + 16 * DEPTH + 2


# ----------------------------------------------------------------------------------------------------------------------
# Hub ids without network: offline mode reads the cache only; an unreachable Hub gives one clear error
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to resolve a host name or open a connection fails the test."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:2]}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache of this test's own, whatever this machine has downloaded."""
    from huggingface_hub import constants

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def cache_repository(cache: Path, repo_id: str, backbone) -> None:
    """Put `backbone` into `cache` in the layout `huggingface_hub` writes (refs/main -> snapshots/<commit>/)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repository = cache / f"models--{repo_id.replace('/', '--')}"
    (repository / "refs").mkdir(parents=True)
    (repository / "refs" / "main").write_text(commit)
    backbone.save_pretrained(repository / "snapshots" / commit)


def test_offline_mode_reads_the_cache_and_never_the_network(hub_cache, no_network, monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = StellarModel(stellar_config()).eval()
    started = time.monotonic()
    with pytest.raises(encoder_init.HubDownloadError) as error:
        load_encoder_weights(model, "facebook/vit-mae-base")
    assert time.monotonic() - started < 5
    message = str(error.value)
    assert "facebook/vit-mae-base" in message and "HF_HUB_OFFLINE is set" in message and str(hub_cache) in message
    assert "hf download facebook/vit-mae-base" in message and "local folder" in message
    assert isinstance(error.value, CheckpointError)  # callers that catch CheckpointError keep working

    backbone = vit_mae()
    cache_repository(hub_cache, "stellar-test/tiny-mae", backbone)
    load_encoder_weights(model, "stellar-test/tiny-mae")
    assert_weights_equal(model, backbone)


def transport_error(message: str) -> Exception:
    """A connection error of the HTTP client huggingface_hub uses here (httpx2, httpx, or the builtin one)."""
    for module_name in ("httpx2", "httpx"):
        try:
            module = __import__(module_name)
        except ImportError:
            continue
        return module.ConnectError(message)
    return ConnectionError(message)


def test_an_unreachable_hub_gives_one_clear_error_or_the_cached_copy(hub_cache, no_network, monkeypatch, caplog):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    requested = []

    def unreachable(self, repo_id, **kwargs):
        requested.append(repo_id)
        raise transport_error("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", unreachable)
    model = StellarModel(stellar_config()).eval()
    with pytest.raises(encoder_init.HubDownloadError) as error:
        load_encoder_weights(model, "facebook/vit-mae-base")
    assert requested == ["facebook/vit-mae-base"]
    message = str(error.value)
    assert "cannot download facebook/vit-mae-base" in message and "could not be reached" in message
    assert "Name or service not known" in message and "check the network" in message.lower()
    assert "hf download facebook/vit-mae-base" in message and "HF_HUB_OFFLINE=1" in message
    assert "local folder" in message and "Traceback" not in message

    backbone = vit_mae()
    cache_repository(hub_cache, "stellar-test/tiny-mae", backbone)
    with caplog.at_level("WARNING", logger="stellar_hf.encoder_init"):
        load_encoder_weights(model, "stellar-test/tiny-mae")
    assert_weights_equal(model, backbone)
    assert "using the cached copy of stellar-test/tiny-mae" in caplog.text


def test_a_cached_copy_without_weights_says_so(hub_cache, no_network, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repository = hub_cache / "models--stellar-test--config-only"
    (repository / "refs").mkdir(parents=True)
    (repository / "refs" / "main").write_text(commit)
    (repository / "snapshots" / commit).mkdir(parents=True)
    (repository / "snapshots" / commit / "config.json").write_text("{}")
    with pytest.raises(encoder_init.HubDownloadError, match="holds no weights file") as error:
        load_encoder_weights(StellarModel(stellar_config()), "stellar-test/config-only")
    assert "hf download stellar-test/config-only" in str(error.value)


def test_network_errors_are_told_from_answers():
    from huggingface_hub.errors import OfflineModeIsEnabled

    assert encoder_init.is_network_error(transport_error("refused"))
    assert encoder_init.is_network_error(OfflineModeIsEnabled("offline"))
    assert encoder_init.is_network_error(TimeoutError())
    assert not encoder_init.is_network_error(ValueError("bad id"))
    assert not encoder_init.is_network_error(FileNotFoundError("missing"))
