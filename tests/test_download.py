"""Fetching a base model from the Hub: gated, missing, offline, disk space, progress, the cache, the token.

The Hub is never reached: ``HfApi`` methods and ``snapshot_download`` are replaced at the method
level (autospec, so a call with a wrong signature fails), and a fake download writes files into a
temporary huggingface_hub cache laid out as the real one is.
"""
from __future__ import annotations

import importlib
import logging
from pathlib import Path
from unittest.mock import patch

import pytest

huggingface_hub = pytest.importorskip("huggingface_hub")

from huggingface_hub import HfApi  # noqa: E402
from huggingface_hub.errors import (  # noqa: E402
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)
from huggingface_hub.hf_api import ModelInfo, RepoFile  # noqa: E402

from services.config import Secret, Settings  # noqa: E402
from services.errors import InputError, NetworkError  # noqa: E402
from services.engine import download  # noqa: E402
from services.engine.download import fetch_base_model, pipeline_files, plan_download  # noqa: E402

REPO = "black-forest-labs/FLUX.1-dev"
SHA = "0123456789abcdef0123456789abcdef01234567"
HF_TOKEN = "hf_FAKEtoken0123456789abcdefSECRET"
# A FLUX.1-dev-like repo, sizes in bytes: the pipeline folders plus what a pipeline does not load.
PIPELINE = {
    "model_index.json": 536,
    "scheduler/scheduler_config.json": 273,
    "text_encoder/config.json": 613,
    "text_encoder/model.safetensors": 4_000,
    "text_encoder_2/model-00001-of-00002.safetensors": 9_000,
    "text_encoder_2/model-00002-of-00002.safetensors": 5_000,
    "text_encoder_2/model.safetensors.index.json": 400,
    "tokenizer/vocab.json": 1_000,
    "tokenizer_2/spiece.model": 700,
    "transformer/config.json": 378,
    "transformer/diffusion_pytorch_model-00001-of-00002.safetensors": 20_000,
    "transformer/diffusion_pytorch_model-00002-of-00002.safetensors": 12_000,
    "transformer/diffusion_pytorch_model.safetensors.index.json": 500,
    "vae/config.json": 820,
    "vae/diffusion_pytorch_model.safetensors": 3_000,
}
EXTRA = {
    "flux1-dev.safetensors": 23_000_000,  # the single-file checkpoint diffusers does not load
    "ae.safetensors": 300_000,
    "README.md": 100,
    "dev_grid.jpg": 9_000,
    ".gitattributes": 50,
    "text_encoder/pytorch_model.bin": 4_000,  # another format beside safetensors
    "vae/diffusion_pytorch_model.fp16.safetensors": 1_500,  # a precision variant
}
PIPELINE_BYTES = sum(PIPELINE.values())


def client():
    """The HTTP client module huggingface_hub's errors are built on (httpx, or httpx2 in 2.x)."""
    return importlib.import_module(HfHubHTTPError.__mro__[1].__module__)


def http_error(cls, code: int, message: str = ""):
    c = client()
    return cls(message or f"{code} error", response=c.Response(code, request=c.Request("GET", f"https://huggingface.co/api/models/{REPO}")))


def model_info(files: dict[str, int] | None = None, gated: bool | str = False) -> ModelInfo:
    files = {**PIPELINE, **EXTRA} if files is None else files
    return ModelInfo(id=REPO, sha=SHA, gated=gated, private=False, downloads=0, likes=0, tags=[],
                     siblings=[{"rfilename": f, "size": s} for f, s in files.items()])


def snapshot_dir(cache: Path) -> Path:
    return cache / "models--black-forest-labs--FLUX.1-dev" / "snapshots" / SHA


def write_cached(cache: Path, files) -> None:
    """Files as huggingface_hub leaves them in its cache (a ref, and the files in the commit's snapshot)."""
    repo = cache / "models--black-forest-labs--FLUX.1-dev"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(SHA)
    for name in files:
        path = snapshot_dir(cache) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * PIPELINE.get(name, 1))


class FakeSnapshot:
    """``snapshot_download`` as huggingface_hub does it, minus the network: files land in the cache, and
    progress goes through ``tqdm_class`` as one byte bar fed per file."""

    def __init__(self) -> None:
        self.downloaded: list[str] = []

    def __call__(self, repo_id, *, revision=None, cache_dir=None, token=None, allow_patterns=None,
                 tqdm_class=None, local_files_only=False, **kwargs):
        cache = Path(cache_dir or huggingface_hub.constants.HF_HUB_CACHE)
        if local_files_only:
            if not (snapshot_dir(cache) / "model_index.json").is_file():
                raise LocalEntryNotFoundError("not cached")
            return str(snapshot_dir(cache))
        wanted = [f for f in PIPELINE if any(Path(f).match(p) or f == p for p in allow_patterns or [f])]
        bar = tqdm_class(total=0, initial=0, unit="B", desc="Downloading") if tqdm_class else None
        for name in wanted:
            if (snapshot_dir(cache) / name).is_file():
                continue
            if bar:
                bar.total += PIPELINE[name]
                bar.update(PIPELINE[name] // 2)
                bar.update(PIPELINE[name] - PIPELINE[name] // 2)
            write_cached(cache, [name])
            self.downloaded.append(name)
        return str(snapshot_dir(cache))


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "hub-cache"


@pytest.fixture
def hub():
    """HfApi.model_info / auth_check and snapshot_download, autospecced; a FLUX.1-dev-like public repo."""
    fake = FakeSnapshot()
    with patch.object(HfApi, "model_info", autospec=True, return_value=model_info()) as info, \
            patch.object(HfApi, "auth_check", autospec=True, return_value=None) as auth, \
            patch("huggingface_hub.snapshot_download", autospec=True, side_effect=fake) as snap:
        yield type("Hub", (), {"info": info, "auth": auth, "snapshot": snap, "fake": fake})


# --------------------------------------------------------------------------- what is fetched


def test_only_what_a_diffusers_pipeline_loads_is_fetched():
    files = pipeline_files({**PIPELINE, **EXTRA})
    assert files == PIPELINE  # no root checkpoint, no README/images, no .bin or fp16 twin beside safetensors
    assert pipeline_files({"flux1-dev.safetensors": 10, "ae.safetensors": 5}) == {}  # not a diffusers repo
    # A folder with only .bin weights keeps them (diffusers would load them).
    assert "unet/diffusion_pytorch_model.bin" in pipeline_files({"model_index.json": 1, "unet/diffusion_pytorch_model.bin": 9})


def test_a_repo_that_is_not_a_diffusers_pipeline_is_refused(hub, cache):
    hub.info.return_value = model_info({"flux1-dev.safetensors": 10, "README.md": 1})
    with pytest.raises(InputError, match="model_index.json"):
        fetch_base_model(REPO, cache_dir=cache)
    hub.snapshot.assert_not_called()


# --------------------------------------------------------------------------- errors


def test_gated_repo_says_where_to_accept_the_licence_and_to_set_hf_token(hub, cache):
    hub.info.return_value = model_info(gated="manual")
    hub.auth.side_effect = http_error(GatedRepoError, 403, f"Access to model {REPO} is restricted")
    with pytest.raises(InputError) as err:
        fetch_base_model(REPO, cache_dir=cache)
    text = str(err.value)
    assert f"https://huggingface.co/{REPO}" in text and "HF_TOKEN" in text and "licence" in text
    assert "no HF_TOKEN is set" in text
    hub.snapshot.assert_not_called()  # found out before a byte was downloaded

    # With a token whose account has not accepted it, it says that instead.
    with pytest.raises(InputError, match="has not been granted access") as err:
        fetch_base_model(REPO, token=Secret(HF_TOKEN), cache_dir=cache)
    assert HF_TOKEN not in str(err.value)


def test_gated_refusal_from_the_download_itself_is_the_same_message(hub, cache):
    hub.snapshot.side_effect = http_error(GatedRepoError, 401, "Cannot access gated repo")
    with pytest.raises(InputError, match=f"https://huggingface.co/{REPO}"):
        fetch_base_model(REPO, cache_dir=cache)


def test_missing_repo_is_a_clear_error(hub, cache):
    hub.info.side_effect = http_error(RepositoryNotFoundError, 404, "Repository Not Found")
    with pytest.raises(InputError, match="There is no model black-forest-labs/FLUX.1-dev on the Hugging Face Hub") as err:
        fetch_base_model(REPO, cache_dir=cache)
    assert "FLUX_LOCAL_MODEL" in err.value.hint
    with pytest.raises(InputError, match="not a Hub repository name"):
        fetch_base_model("bad/na me", cache_dir=cache)


def test_wrong_token_is_refused_without_showing_it(hub, cache):
    hub.info.side_effect = http_error(HfHubHTTPError, 401, f"401 Unauthorized: token {HF_TOKEN} is invalid")
    with pytest.raises(InputError, match="refused HF_TOKEN") as err:
        fetch_base_model(REPO, token=Secret(HF_TOKEN), cache_dir=cache)
    assert HF_TOKEN not in str(err.value) and HF_TOKEN not in repr(err.value.args)


@pytest.mark.parametrize("failure", [
    lambda: client().ConnectError("[Errno -3] Temporary failure in name resolution"),
    lambda: OfflineModeIsEnabled("HF_HUB_OFFLINE=1"),
    lambda: TimeoutError("timed out"),
])
def test_no_network_says_so_and_points_at_an_offline_folder(hub, cache, failure):
    hub.info.side_effect = failure()
    with pytest.raises(NetworkError, match="cannot be reached") as err:
        fetch_base_model(REPO, cache_dir=cache)
    assert "FLUX_LOCAL_MODEL" in err.value.hint


def test_no_network_uses_a_snapshot_cached_earlier(hub, cache):
    write_cached(cache, PIPELINE)
    hub.info.side_effect = client().ConnectError("offline")
    assert fetch_base_model(REPO, cache_dir=cache) == snapshot_dir(cache)
    _, kwargs = hub.snapshot.call_args
    assert kwargs["local_files_only"] is True  # looked in the cache only


def test_unexpected_failure_never_carries_the_token(hub, cache, caplog):
    caplog.set_level(logging.DEBUG)
    hub.snapshot.side_effect = RuntimeError(f"something odd with Authorization: Bearer {HF_TOKEN}")
    with pytest.raises(Exception) as err:
        fetch_base_model(REPO, token=Secret(HF_TOKEN), cache_dir=cache)
    assert HF_TOKEN not in str(err.value) and err.value.__cause__ is None and err.value.__suppress_context__
    assert HF_TOKEN not in caplog.text
    _, kwargs = hub.snapshot.call_args
    assert kwargs["token"] == HF_TOKEN  # handed to the Hub client, and only there


# --------------------------------------------------------------------------- disk space


def test_not_enough_disk_is_refused_before_downloading_with_both_numbers(hub, cache):
    huge = {**PIPELINE, "transformer/diffusion_pytorch_model-00001-of-00002.safetensors": 2**60}
    hub.info.return_value = model_info(huge)
    with pytest.raises(InputError) as err:
        fetch_base_model(REPO, cache_dir=cache)
    text = str(err.value)
    assert "needs 1073741824.0 GB more disk space" in text
    free = download.free_bytes(cache) / 2**30
    assert f"has {free:.1f} GB free" in text and "HF_HUB_CACHE" in text
    hub.snapshot.assert_not_called()


def test_disk_check_counts_only_what_is_not_cached(hub, cache):
    big = "transformer/diffusion_pytorch_model-00001-of-00002.safetensors"
    write_cached(cache, [big])
    plan = plan_download(REPO, Secret(""), cache_dir=cache)
    assert plan.total_bytes == PIPELINE_BYTES
    assert plan.missing_bytes == PIPELINE_BYTES - PIPELINE[big]
    assert plan.revision == SHA and set(plan.files) == set(PIPELINE)


# --------------------------------------------------------------------------- progress and the cache


def test_progress_is_reported_in_bytes_up_to_the_total(hub, cache):
    seen: list[tuple[int, int]] = []
    fetch_base_model(REPO, cache_dir=cache, on_progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (PIPELINE_BYTES, PIPELINE_BYTES)
    dones = [d for d, _ in seen]
    assert dones == sorted(dones) and len(set(dones)) == len(dones) > len(PIPELINE)  # per chunk, never backwards
    assert {t for _, t in seen} == {PIPELINE_BYTES}


def test_progress_through_huggingface_hubs_own_snapshot_download(cache):
    """The real snapshot_download (its bars, its threads) with only the network calls replaced: the
    tree listing, and each file's download, which feeds the bar class it is given as the Hub's does."""
    from huggingface_hub import _snapshot_download

    def one_file(repo_id, *, filename, revision, cache_dir, tqdm_class=None, **kwargs):
        size = PIPELINE[filename]
        if tqdm_class is not None:
            bar = tqdm_class(total=size, initial=0, unit="B", unit_scale=True, desc=filename)
            bar.update(size // 3)
            bar.update(size - size // 3)
        write_cached(Path(cache_dir), [filename])
        return str(snapshot_dir(Path(cache_dir)) / filename)

    tree = [RepoFile(path=f, size=s, oid=f"blob{i}") for i, (f, s) in enumerate({**PIPELINE, **EXTRA}.items())]
    seen: list[tuple[int, int]] = []
    with patch.object(HfApi, "model_info", autospec=True, return_value=model_info()), \
            patch.object(HfApi, "repo_info", autospec=True, return_value=model_info()), \
            patch.object(HfApi, "list_repo_tree", autospec=True, return_value=iter(tree)), \
            patch.object(_snapshot_download, "hf_hub_download", autospec=True, side_effect=one_file) as fetched:
        folder = fetch_base_model(REPO, cache_dir=cache, on_progress=lambda d, t: seen.append((d, t)))
    assert folder == snapshot_dir(cache)
    assert sorted(c.kwargs["filename"] for c in fetched.call_args_list) == sorted(PIPELINE)  # nothing extra
    assert seen[-1] == (PIPELINE_BYTES, PIPELINE_BYTES)
    assert any(0 < d < PIPELINE_BYTES for d, _ in seen)  # in between, not only at the end
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_a_cached_model_is_not_downloaded_again(hub, cache):
    first = fetch_base_model(REPO, cache_dir=cache)
    assert sorted(hub.fake.downloaded) == sorted(PIPELINE)
    seen: list = []
    second = fetch_base_model(REPO, cache_dir=cache, on_progress=lambda d, t: seen.append((d, t)))
    assert first == second == snapshot_dir(cache)
    assert hub.snapshot.call_count == 1  # the second call found everything in the cache
    assert seen == []  # nothing to download, no progress to show


def test_only_the_missing_files_are_downloaded(hub, cache):
    write_cached(cache, ["model_index.json", "vae/config.json", "vae/diffusion_pytorch_model.safetensors"])
    seen: list = []
    fetch_base_model(REPO, cache_dir=cache, on_progress=lambda d, t: seen.append((d, t)))
    assert "vae/diffusion_pytorch_model.safetensors" not in hub.fake.downloaded
    missing = PIPELINE_BYTES - PIPELINE["model_index.json"] - PIPELINE["vae/config.json"] \
        - PIPELINE["vae/diffusion_pytorch_model.safetensors"]
    assert seen[-1] == (missing, missing)
    _, kwargs = hub.snapshot.call_args
    assert kwargs["revision"] == SHA and kwargs["cache_dir"] == cache  # the commit that was measured


def test_the_default_cache_is_huggingface_hubs_own(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "default-cache"))
    plan = plan_download(REPO, Secret(""))
    assert plan.cache_dir == tmp_path / "default-cache"
    assert fetch_base_model(REPO) == snapshot_dir(tmp_path / "default-cache")
    _, kwargs = hub.snapshot.call_args
    assert kwargs["cache_dir"] is None  # huggingface_hub picks it (HF_HUB_CACHE / HF_HOME)


# --------------------------------------------------------------------------- local folders and settings


def test_an_offline_folder_is_used_as_is(hub, tmp_path):
    folder = tmp_path / "FLUX.1-dev"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    assert fetch_base_model(str(folder)) == folder
    hub.info.assert_not_called()
    hub.snapshot.assert_not_called()
    (folder / "model_index.json").unlink()
    with pytest.raises(InputError, match="not a diffusers pipeline folder"):
        fetch_base_model(str(folder))
    with pytest.raises(InputError, match="not a folder"):
        fetch_base_model(str(tmp_path / "nowhere" / "model"))


def test_hf_token_comes_from_settings_as_a_secret():
    settings = Settings.from_env({"HF_TOKEN": HF_TOKEN})
    assert isinstance(settings.hf_token, Secret) and settings.hf_token.reveal() == HF_TOKEN
    assert HF_TOKEN not in repr(settings)
    assert not Settings.from_env({}).hf_token
