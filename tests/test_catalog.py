"""The model catalog: the shipped models.toml, user catalogs, LoRA and embedding folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bot.catalog import BUILTIN_TINY, BUILTIN_TINY_XL, Catalog, ModelEntry, is_hub_id
from bot.errors import InvalidRequest, SettingsError

SEED_APP_MODELS = {
    "OFA-Sys/small-stable-diffusion-v0",
    "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "Lykon/DreamShaper",
    "prompthero/openjourney-v4",
    "wavymulder/portraitplus",
    "stabilityai/stable-diffusion-2-1",
}
#: Few-step and SDXL models (issue 12), and the offline models that stand in for them in tests.
NEWER_MODELS = {
    "stabilityai/sd-turbo",
    "stabilityai/sdxl-turbo",
    "SimianLuo/LCM_Dreamshaper_v7",
    "stabilityai/stable-diffusion-xl-base-1.0",
    "Lykon/dreamshaper-xl-1-0",
}
BUILTIN = {BUILTIN_TINY, BUILTIN_TINY_XL}
NATIVE = {
    "stabilityai/stable-diffusion-2-1": 768,
    "stabilityai/stable-diffusion-xl-base-1.0": 1024,
    "Lykon/dreamshaper-xl-1-0": 1024,
}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_shipped_catalog_lists_the_seed_apps_models_with_tiny_first(tmp_path: Path) -> None:
    catalog = Catalog.load(None, tmp_path)
    assert catalog.entries[0].source == BUILTIN_TINY
    assert catalog.default.name == "tiny"
    assert {e.source for e in catalog.entries} == SEED_APP_MODELS | NEWER_MODELS | BUILTIN
    for entry in catalog.entries:
        assert entry.size and entry.speed and entry.quality and entry.description, entry.name
        expected = 64 if entry.source in BUILTIN else NATIVE.get(entry.source, 512)
        assert entry.native_size == expected, entry.name
    assert len(set(catalog.names())) == len(catalog.entries)


def test_get_is_case_insensitive_and_names_the_choices(tmp_path: Path) -> None:
    catalog = Catalog.load(None, tmp_path)
    assert catalog.get("TINY").name == "tiny"
    with pytest.raises(InvalidRequest) as info:
        catalog.get("dremshaper")
    assert info.value.message.startswith("Unknown model 'dremshaper'. Available: tiny, ")
    assert "dreamshaper" in info.value.message


def test_resolve_accepts_names_and_sources(tmp_path: Path) -> None:
    catalog = Catalog.load(None, tmp_path)
    # A source already in the catalog maps to its entry (one loaded pipeline for both).
    assert catalog.resolve(BUILTIN_TINY).name == "tiny"
    assert catalog.resolve("sd15").source == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    adhoc = catalog.resolve("someone/some-model")
    assert (adhoc.name, adhoc.source, adhoc.native_size) == (
        "someone/some-model",
        "someone/some-model",
        512,
    )
    assert catalog.resolve(str(tmp_path / "model.safetensors")).is_single_file
    with pytest.raises(InvalidRequest, match="Unknown model 'nonsense'"):
        catalog.resolve("nonsense")


def test_resolve_reads_native_size_of_a_local_folder(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    (folder / "unet").mkdir(parents=True)
    (folder / "vae").mkdir()
    (folder / "unet" / "config.json").write_text('{"sample_size": 96}')
    (folder / "vae" / "config.json").write_text('{"block_out_channels": [1, 2, 3, 4]}')
    assert Catalog.load(None, tmp_path).resolve(str(folder)).native_size == 768


def test_user_catalog_with_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "mine.safetensors").write_bytes(b"x")
    path = write(
        tmp_path,
        """
[models.mine]
source = "ckpt/mine.safetensors"
config = "configs/sd15"
native_size = 512
size = "2 GB"

[models.hub]
source = "owner/name"
""",
    )
    catalog = Catalog.load(path, tmp_path / "loras")
    mine = catalog.get("mine")
    assert mine == ModelEntry(
        name="mine",
        source=str(tmp_path / "ckpt" / "mine.safetensors"),
        native_size=512,
        size="2 GB",
        config=str(tmp_path / "configs" / "sd15"),
    )
    assert catalog.get("hub").source == "owner/name"  # a Hub id is not a path
    assert catalog.names() == ["mine", "hub"]
    assert catalog.embeddings_dir == tmp_path / "loras" / "embeddings"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[models.a\nsource = 1", "is not valid TOML"),
        ("", "lists no models"),
        ("title = 'x'\n[models.a]\nsource = 'builtin:tiny'", "unknown top-level keys title"),
        ("[models.a]\nsize = '1 GB'", "model 'a': `source` is missing"),
        ("[models.a]\nsource = ''", "model 'a': `source` is missing"),
        ("[models.a]\nsource = 'x/y'\nsorce = 'x'", "model 'a': unknown field(s) sorce"),
        ("[models.a]\nsource = 'x/y'\nnative_size = 500", "`native_size` 500 must be a multiple"),
        ("[models.a]\nsource = 'x/y'\nnative_size = '512'", "`native_size` must be a whole"),
        ("[models.a]\nsource = 'x/y'\nspeed = 3", "`speed` must be text"),
        ("[models.a]\nsource = 'x/y'\nconfig = 'c'", "`config` is only for single-file"),
        ('[models."bad name!"]\nsource = "x/y"', "model 'bad name!': the name must be"),
        ("models = 3", "lists no models"),
        ("[models]\na = 3", "model 'a': expected a table"),
    ],
)
def test_malformed_catalog_names_file_and_entry(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(SettingsError) as info:
        Catalog.load(path, tmp_path)
    assert str(path) in info.value.message
    assert message in info.value.message


def test_missing_catalog_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"does not exist\. Fix SDBOT_MODELS_FILE"):
        Catalog.load(tmp_path / "nope.toml", tmp_path)


def test_loras_and_embeddings_are_listed_from_their_folders(tmp_path: Path) -> None:
    loras = tmp_path / "loras"
    (loras / "embeddings").mkdir(parents=True)
    for name in ("b-style.safetensors", "A.safetensors", "notes.txt", "old.ckpt"):
        (loras / name).write_bytes(b"x")
    (loras / "embeddings" / "bad-hands.pt").write_bytes(b"x")
    catalog = Catalog.load(None, loras)
    assert catalog.loras() == ["A", "b-style"]
    assert catalog.lora_path("b-style") == loras / "b-style.safetensors"
    assert catalog.embeddings() == ["bad-hands"]
    with pytest.raises(InvalidRequest, match=r"Unknown LoRA 'old'. Available: A, b-style\."):
        catalog.lora_path("old")
    with pytest.raises(InvalidRequest, match="Unknown LoRA"):
        catalog.lora_path("../loras/A")
    empty = Catalog.load(None, tmp_path / "none")
    assert empty.loras() == []
    with pytest.raises(InvalidRequest, match="no LoRAs are installed"):
        empty.lora_path("A")


def test_native_size_comes_from_the_catalog_else_from_the_source(tmp_path: Path) -> None:
    # What the removed bot.models.native_size shim answered, asked of the catalog itself.
    shipped = Catalog.load(None, tmp_path)
    assert shipped.resolve(BUILTIN_TINY).native_size == 64
    assert shipped.resolve("sd21").native_size == 768
    assert shipped.resolve("someone/else").native_size == 512
    custom = Catalog.load(
        write(tmp_path, "[models.big]\nsource = 'a/b'\nnative_size = 1024"), tmp_path
    )
    assert custom.resolve("big").native_size == 1024


def test_hub_ids_are_owner_slash_name() -> None:
    assert is_hub_id("stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert is_hub_id("Lykon/DreamShaper") and is_hub_id("a.b/c_d-1")
    for text in ("tiny", "a/b/c", "/abs/path", "./x/y", "-a/b", "a/", "owner/na me"):
        assert not is_hub_id(text), text


def test_public_name_never_shows_a_local_path(tmp_path: Path) -> None:
    catalog = Catalog.load(None, tmp_path)
    assert catalog.get("tiny").public_name == "tiny"
    assert catalog.resolve("owner/name").public_name == "owner/name"  # a Hub id is public
    assert catalog.resolve(BUILTIN_TINY).public_name == "tiny"
    folder = tmp_path / "server" / "sd15"
    assert catalog.resolve(str(folder)).public_name == "sd15"
    assert catalog.resolve(f"{folder}/").public_name == "sd15"
    assert catalog.resolve("~/models/dream.safetensors").public_name == "dream.safetensors"
    assert catalog.resolve("C:\\models\\dream.ckpt").public_name == "dream.ckpt"


# -- availability: can this machine load it, asked cheaply and offline --------------------------


def fake_hub_snapshot(cache: Path, repo_id: str, *, weights: bool = True) -> Path:
    """The layout huggingface_hub leaves in its cache after downloading a diffusers model."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    for part, files in {
        "unet": ["config.json", "diffusion_pytorch_model.safetensors"],
        "vae": ["config.json", "diffusion_pytorch_model.safetensors"],
        "text_encoder": ["config.json", "model.safetensors"],
        "tokenizer": ["vocab.json", "merges.txt"],
        "scheduler": ["scheduler_config.json"],
    }.items():
        (snapshot / part).mkdir(parents=True)
        for name in files:
            if weights or not name.endswith(".safetensors"):
                (snapshot / part / name).write_text("{}")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "safety_checker": [None, None],
    }
    (snapshot / "model_index.json").write_text(json.dumps(index))
    return snapshot


def test_availability_says_which_models_this_machine_can_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    from bot.model_sources import availability

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    fake_hub_snapshot(cache, "OFA-Sys/small-stable-diffusion-v0")
    fake_hub_snapshot(cache, "Lykon/DreamShaper", weights=False)  # an interrupted download
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "model_index.json").write_text("{}")
    shipped = Catalog.load(None, tmp_path)

    assert availability(shipped, "tiny") is None
    assert availability(shipped, "small-sd") is None  # downloaded: in the cache
    for name in ("dreamshaper", "sd15"):
        reason = availability(shipped, name)
        assert reason is not None and reason.startswith(f"Model `{name}` (`"), name
        assert "is not downloaded yet and the Hugging Face Hub cannot be reached" in reason
    assert availability(shipped, str(tmp_path / "folder")) is None
    gone = availability(shipped, str(tmp_path / "gone.safetensors"))
    assert gone is not None and "model `gone.safetensors` does not exist" in gone
    assert str(tmp_path) not in gone  # members see it: no server paths
    assert availability(shipped, "tiyn") == shipped_unknown(shipped, "tiyn")

    # Online, a model not downloaded yet would be fetched: available as far as can be told.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert availability(shipped, "sd15") is None
    # The variable as set now counts too, as the owner means it.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert availability(shipped, "sd15") is not None


def shipped_unknown(catalog: Catalog, name: str) -> str:
    with pytest.raises(InvalidRequest) as info:
        catalog.resolve(name)
    return info.value.message
