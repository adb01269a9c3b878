"""The app as a whole: factory, launch options, flags, and its API driven by gradio_client."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from PIL import Image

import httpx

import app as app_module
from components import api
from services.errors import ConfigError
from tests import imagefactory as fx
from tests.browser import launched, running_app

ROOT = Path(__file__).resolve().parent.parent


def test_parse_auth():
    assert app_module.parse_auth("") is None
    assert app_module.parse_auth("ann:s3cret:x") == ("ann", "s3cret:x")
    for bad in ("nopassword", ":x", "user:"):
        with pytest.raises(ConfigError):
            app_module.parse_auth(bad)


def test_launch_options_serve_nothing_of_the_data_dir(settings):
    opts = app_module.launch_options(settings)
    assert "allowed_paths" not in opts
    assert str(settings.data_dir.resolve()) in opts["blocked_paths"]
    assert any(p.endswith("deep_links") for p in opts["blocked_paths"])
    assert opts["max_file_size"] == settings.max_upload_bytes


def test_importing_the_app_builds_and_starts_nothing(tmp_path):
    """`import app` in a notebook must not start a second tracker or create a database."""
    code = ("import threading, app; print(sorted(t.name for t in threading.enumerate())); "
            "print('demo' in vars(app))")
    env = {**os.environ, "FLUX_STUDIO_DATA_DIR": str(tmp_path / "data")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["['MainThread']", "False"]
    assert not (tmp_path / "data").exists()


def test_cli_help_lists_flags():
    out = subprocess.run([sys.executable, "app.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for flag in ("--share", "--auth", "--port"):
        assert flag in out.stdout


def test_api_add_images_and_export(settings, tmp_path):
    photos = fx.good_set(tmp_path / "g", count=3, size=(1200, 900))
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not a photo")
    with running_app(settings) as url:
        client = Client(url, verbose=False)
        try:
            added = client.predict("mugs", [handle_file(str(p)) for p in [*photos, junk]], api_name="/add_images")
            assert added["name"] == "mugs" and added["images"] == 3
            assert added["report"][0] == "Added 3 image(s)."
            assert any("junk.jpg: not a readable image" in line for line in added["report"])
            described = client.predict("mugs", api_name="/describe_dataset")
            assert [i["file"] for i in described["items"]] == ["photo_00.jpg", "photo_01.jpg", "photo_02.jpg"]
            assert any("Only 3 image(s)" in w for w in described["warnings"])
            zip_path = client.predict("mugs", api_name="/export_zip")
            with zipfile.ZipFile(zip_path) as zf:
                assert sorted(zf.namelist()) == ["photo_00.jpg", "photo_01.jpg", "photo_02.jpg"]
        finally:
            client.close()


def test_api_errors_are_clear_messages(settings):
    from gradio_client.exceptions import AppError

    with running_app(settings) as url:
        client = Client(url, verbose=False)
        try:
            with pytest.raises(AppError, match="No files were uploaded"):
                client.predict("mugs", [], api_name="/add_images")
            with pytest.raises(AppError, match="No dataset name was given"):
                client.predict("", api_name="/export_zip")
            with pytest.raises(AppError, match="Dataset 'nope' was not found"):
                client.predict("nope", api_name="/describe_dataset")
            with pytest.raises(AppError, match="No job of yours is called or numbered 'nope'"):
                client.predict("nope", api_name="/get_job")
            with pytest.raises(AppError, match="Iterations must be a whole number from 100 to 1000"):
                client.predict("mugs", api_name="/create_dataset")
                client.predict("mugs", "v1", "local", "product", "", 5, api_name="/launch_finetune")
        finally:
            client.close()


def test_api_auto_caption_against_fake(settings, tmp_path, fake_cometapi):
    from services.config import Secret
    from tests.conftest import FAKE_COMETAPI_KEY

    settings = settings.with_(cometapi_base_url=fake_cometapi.url, cometapi_key=Secret(FAKE_COMETAPI_KEY))
    photos = fx.good_set(tmp_path / "g", count=2, size=(640, 480))
    with running_app(settings) as url:
        client = Client(url, verbose=False)
        try:
            client.predict("mugs", [handle_file(str(p)) for p in photos], api_name="/add_images")
            report = client.predict("mugs", "product", True, api_name="/auto_caption")
            assert report == {"summary": "Captioned 2 image(s).", "failed": {}}
            items = client.predict("mugs", api_name="/describe_dataset")["items"]
            assert all(i["caption"].startswith("TOK, ") for i in items)
        finally:
            client.close()


def test_api_compare_and_grid_against_fake(settings, fake_cometapi):
    from gradio_client.exceptions import AppError

    from services.config import Secret
    from tests.conftest import FAKE_COMETAPI_KEY

    settings = settings.with_(cometapi_base_url=fake_cometapi.url, cometapi_key=Secret(FAKE_COMETAPI_KEY))
    fake_cometapi.pending_polls = 0
    finetune = fake_cometapi.add_finetune()
    with running_app(settings) as url:
        client = Client(url, verbose=False)
        try:
            base, tuned, details = client.predict(finetune, "a photo of TOK", 7, 1.1, 1024, 768, api_name="/compare")
            assert Path(base).exists() and Path(tuned).exists() and base != tuned
            assert details["seed"] == 7 and details["strength"] == 1.1
            assert details["base"]["status"] == details["tuned"]["status"] == "ok"
            assert details["tuned"]["model"] == "flux-pro-1.1-ultra-finetuned"
            sheet, cells = client.predict(finetune, "TOK one\nTOK two", "0.5, 1.5", False, 7, 1024, 768,
                                          api_name="/grid")
            assert cells["columns"] == ["strength 0.5", "strength 1.5"] and cells["failed"] == 0
            assert len(cells["cells"]) == 4 and Image.open(sheet).width > 2 * 256
            with pytest.raises(AppError, match="strength 3 is out of range"):
                client.predict(finetune, "TOK", "3", False, 7, 1024, 768, api_name="/grid")
            with pytest.raises(AppError, match="No fine-tune is given"):
                client.predict("", "a photo of TOK", 7, 1.1, 1024, 768, api_name="/compare")
        finally:
            client.close()
    tuned_sent = fake_cometapi.requests("/flux/v1/flux-pro-1.1-ultra-finetuned")
    assert sorted(r.json["finetune_strength"] for r in tuned_sent) == [0.5, 0.5, 1.1, 1.5, 1.5]


def test_queue_limits_per_event(settings):
    demo = app_module.create_app(settings)
    try:
        limits = {fn.api_name: fn.concurrency_limit for fn in demo.fns.values()}
        assert limits["add_images"] == 2 and limits["auto_caption"] == 2  # CPU- and credit-heavy
        assert limits["compare"] == 8 and limits["grid"] == 4 and limits["launch_finetune"] == 4
        assert limits["list_jobs"] is None
        ticks = [fn for fn in demo.fns.values() if any(t[1] == "tick" for t in fn.targets)]
        assert ticks and all(fn.concurrency_limit is None for fn in ticks)  # polling never waits
        assert demo._queue.max_size == 64
    finally:
        demo.close()


def test_two_apps_on_one_data_dir_poll_with_one_tracker(settings):
    """A notebook that builds the app twice once ran two trackers on one database."""
    import threading

    def trackers() -> list[str]:
        return [t.name for t in threading.enumerate() if t.name == "studio-job-tracker"]

    first = app_module.create_app(settings)
    second = app_module.create_app(settings)
    try:
        assert len(trackers()) == 1 and first.studio.tracker.polling and not second.studio.tracker.polling
        first.close()
        assert len(trackers()) == 1 and second.studio.tracker.polling  # it took over
    finally:
        first.close()
        second.close()
    assert trackers() == []


def test_with_a_separate_database_dir_closing_the_app_leaves_a_copy_in_the_data_dir(settings, tmp_path):
    settings = settings.with_(db_dir=tmp_path / "local-db", db_backup_every_s=3600)
    demo = app_module.create_app(settings)
    try:
        demo.studio.jobs.create("local", "local", "finetune", "cup-v1", "cup", "h", {})
        assert not settings.db_backup_path.exists()
    finally:
        demo.close()  # stops the db-backup thread (the fixture checks) after a last copy
    from services.storage.jobs import JobStore

    copy = JobStore(settings.db_backup_path)
    assert [j.name for j in copy.list("local")] == ["cup-v1"]
    copy.close()


needs_local_engine = pytest.mark.skipif(not importlib.util.find_spec("diffusers"),
                                        reason="the local engine (requirements-local.txt) is not installed")


@needs_local_engine
def test_a_script_drives_the_whole_workflow_by_name(settings, tmp_path):
    """create, add, caption, launch, wait for ready, compare, grid: gradio_client alone, every dataset
    and fine-tune named as the user named it (the pickers' choices were once empty for a script)."""
    photos = fx.good_set(tmp_path / "g", count=3, size=(640, 640))
    with launched(settings) as (demo, url):
        client = Client(url, verbose=False)
        try:
            endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
            assert set(endpoints) == {f"/{name}" for name in api.PUBLIC_API}, set(endpoints)
            launch = {p["parameter_name"]: p["python_type"]["type"] for p in endpoints["/launch_finetune"]["parameters"]}
            assert launch["iterations"] == "None | int" and launch["dataset"] == "str"
            assert endpoints["/launch_finetune"]["description"].startswith("Start fine-tuning FLUX")

            assert client.predict("cup", api_name="/create_dataset")["images"] == 0
            client.predict("cup", [handle_file(str(p)) for p in photos], api_name="/add_images")
            client.predict("cup", "CUPX", False, api_name="/set_trigger_word")
            files = [i["file"] for i in client.predict("cup", api_name="/describe_dataset")["items"]]
            done = client.predict("cup", {f: f"a photo of a red cup, view {n}" for n, f in enumerate(files)},
                                  api_name="/set_captions")
            assert done == {"name": "cup", "images": 3, "captioned": 3, "trigger_word": "CUPX"}
            client.predict("cup", "CUPX", True, api_name="/set_trigger_word")  # now first in every caption
            items = client.predict("cup", api_name="/describe_dataset")["items"]
            assert all(i["caption"].startswith("CUPX") for i in items)

            job = client.predict("cup", "cup-v1", "local", "product", "", 100, api_name="/launch_finetune")
            assert job["name"] == "cup-v1" and job["provider"] == "local" and job["trigger_word"] == "CUPX"
            assert client.predict("cup-v1", api_name="/get_job")["id"] == job["id"]  # found by its name
            # The signal: the run's own thread has ended; one tracking pass then records how it went.
            assert demo.studio.providers["local"].join(job["finetune_id"], timeout=240)
            demo.studio.training.track_once()
            assert client.predict("cup-v1", api_name="/get_job")["status"] == "ready"
            assert [j["name"] for j in client.predict(api_name="/list_jobs")] == ["cup-v1"]

            base, tuned, details = client.predict("cup-v1", "a photo of CUPX cup", 3, 1.0, 128, 128,
                                                  api_name="/compare")
            with Image.open(base) as b, Image.open(tuned) as t:
                assert b.size == t.size == (128, 128)
            assert details["base"]["status"] == details["tuned"]["status"] == "ok"
            sheet, cells = client.predict("cup-v1", "CUPX cup\nCUPX cup on grass", "0.5, 1.0", True, 3, 128, 128,
                                          api_name="/grid")
            assert cells["columns"] == ["base", "strength 0.5", "strength 1"] and cells["failed"] == 0
            with Image.open(sheet) as im:
                assert im.width > 3 * 128 and im.height > 2 * 128
        finally:
            client.close()


def test_scripts_see_only_their_own_records_by_name(settings, tmp_path):
    """Hosted: a name another visitor uses means nothing to this one."""
    from gradio_client.exceptions import AppError

    settings = settings.with_(hosted=True)
    photo = fx.good_set(tmp_path / "g", count=1, size=(640, 640))
    with running_app(settings) as url:
        alice, bob = Client(url, verbose=False), Client(url, verbose=False)
        try:
            alice.predict("cup", [handle_file(str(photo[0]))], api_name="/add_images")
            for endpoint in ("/describe_dataset", "/export_zip", "/delete_dataset"):
                with pytest.raises(AppError, match="Dataset 'cup' was not found"):
                    bob.predict("cup", api_name=endpoint)
            with pytest.raises(AppError, match="Dataset 'cup' was not found"):
                bob.predict("cup", {"photo_00.jpg": "mine now"}, api_name="/set_captions")
            assert alice.predict("cup", api_name="/describe_dataset")["images"] == 1
        finally:
            alice.close()
            bob.close()


def test_with_mcp_on_the_tools_are_the_api_with_their_parameters(settings):
    settings = settings.with_(mcp=True)
    with running_app(settings) as url:
        tools = {t["name"]: t for t in httpx.get(url + "gradio_api/mcp/schema", timeout=30).json()}
    assert set(tools) == set(api.PUBLIC_API)
    launch = tools["launch_finetune"]
    assert launch["description"].startswith("Start fine-tuning FLUX")
    props = launch["inputSchema"]["properties"]
    assert props["mode"]["enum"] == ["character", "product", "style", "general"]
    assert props["dataset"]["description"] == "the dataset's name"
    assert set(launch["inputSchema"]["required"]) == {"dataset", "name"}
    assert tools["get_job"]["inputSchema"]["properties"]["job"]["type"] == "string"
    assert set(tools["compare"]["inputSchema"]["properties"]) == {"finetune", "prompt", "seed", "strength", "width",
                                                                  "height"}


def test_an_assistant_adds_images_over_mcp(settings, tmp_path):
    """add_images over MCP: the file list's schema resolves (it failed every call with
    ``PointerToNowhere: '/$defs/FileData'``), a data: URI becomes an image of the dataset, and a
    string that would make the server read this machine is refused: a loopback link, a bare path."""
    import base64

    from tests.test_hostile_visitors import _mcp_calls

    photo = fx.good_set(tmp_path / "g", count=1, size=(640, 640))[0]
    data_uri = "data:image/jpeg;base64," + base64.b64encode(photo.read_bytes()).decode()
    with running_app(settings.with_(mcp=True)) as url:
        added, loopback, bare, described = _mcp_calls(url, [
            ("add_images", {"dataset": "cup", "files": [data_uri]}),
            ("add_images", {"dataset": "cup", "files": [f"{url}gradio_api/file={photo}"]}),
            ("add_images", {"dataset": "cup", "files": [str(photo)]}),
            ("describe_dataset", {"dataset": "cup"})])
    assert added == (False, "{'name': 'cup', 'images': 1, 'captioned': 0, 'trigger_word': '', "
                            "'report': ['Added 1 image(s).']}")
    assert loopback[0] and "Could not fetch" in loopback[1] and "public http(s) URL" in loopback[1]
    assert bare[0] and "is not a file" in bare[1]
    assert not described[0] and "'images': 1," in described[1]
