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

import app as app_module
from services.errors import ConfigError
from tests import imagefactory as fx
from tests.browser import running_app

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
            result = client.predict(
                [handle_file(str(p)) for p in [*photos, junk]], None, api_name="/add_images"
            )
            picker, _upload, report, gallery, table, warnings, _trigger, export_file, export_info = result
            assert "Added 3 image(s)" in report
            assert "junk.jpg: not a readable image" in report
            assert len(gallery) == 3
            assert [r[0] for r in table["data"]] == ["photo_00.jpg", "photo_01.jpg", "photo_02.jpg"]
            assert "Only 3 image(s)" in warnings
            name = picker["value"]  # the picker comes back as an update with the new choices
            zip_path, info = client.predict(name, api_name="/export_zip")
            assert "3 images, 0 captions" in info
            with zipfile.ZipFile(zip_path) as zf:
                assert sorted(zf.namelist()) == ["photo_00.jpg", "photo_01.jpg", "photo_02.jpg"]
            # Adding more makes that zip stale: the page stops offering it.
            more = fx.good_set(tmp_path / "more", count=1, size=(900, 900))
            *_, export_file, export_info = client.predict([handle_file(str(more[0]))], name, api_name="/add_images")
            assert export_file is None and export_info == ""
        finally:
            client.close()


def test_api_errors_are_clear_messages(settings):
    from gradio_client.exceptions import AppError

    with running_app(settings) as url:
        client = Client(url, verbose=False)
        try:
            with pytest.raises(AppError, match="No files were uploaded"):
                client.predict([], None, api_name="/add_images")
            with pytest.raises(AppError, match="No dataset is selected"):
                client.predict(None, api_name="/export_zip")
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
            picker, *_ = client.predict([handle_file(str(p)) for p in photos], None, api_name="/add_images")
            report, _gallery, table, _warnings, _trigger = client.predict(
                picker["value"], "product", True, api_name="/auto_caption")
            assert "Captioned 2 image(s)" in report
            assert all(row[1].startswith("TOK, ") for row in table["data"])
        finally:
            client.close()


def test_api_compare_and_grid_against_fake(settings, fake_cometapi):
    from gradio_client.exceptions import AppError

    from services.config import Secret
    from tests.conftest import FAKE_COMETAPI_KEY

    settings = settings.with_(cometapi_base_url=fake_cometapi.url, cometapi_key=Secret(FAKE_COMETAPI_KEY))
    fake_cometapi.pending_polls = 0
    finetune = fake_cometapi.add_finetune()
    fields = ["a photo of TOK", 7, 1.1, "1:1", 1024, 768, 28, 2.5, 2, "png"]
    with running_app(settings) as url:
        client = Client(url, verbose=False)
        try:
            base, tuned, info, history = client.predict(
                None, finetune, "flux-pro-1.1-ultra-finetuned", *fields, api_name="/compare")
            assert Path(base).exists() and Path(tuned).exists() and base != tuned
            assert "seed 7" in info and "strength 1.1" in info
            assert len(history) == 2
            gallery, summary, history = client.predict(  # gr.State outputs are not part of the API
                None, finetune, "flux-pro-1.1-ultra-finetuned", "TOK one\nTOK two", "0.5, 1.5", False,
                *fields, api_name="/grid")
            assert "2 prompt(s) × 2 column(s)" in summary and len(gallery) == 4 and len(history) == 6
            with pytest.raises(AppError, match="strength 3 is out of range"):
                client.predict(None, finetune, "flux-pro-1.1-ultra-finetuned", "TOK", "3", False, *fields,
                               api_name="/grid")
            with pytest.raises(AppError, match="No fine-tune is selected"):
                client.predict(None, "", "flux-pro-1.1-ultra-finetuned", *fields, api_name="/compare")
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
        assert len(trackers()) == 1 and first.studio_tracker.polling and not second.studio_tracker.polling
        first.close()
        assert len(trackers()) == 1 and second.studio_tracker.polling  # it took over
    finally:
        first.close()
        second.close()
    assert trackers() == []


def test_with_a_separate_database_dir_closing_the_app_leaves_a_copy_in_the_data_dir(settings, tmp_path):
    settings = settings.with_(db_dir=tmp_path / "local-db", db_backup_every_s=3600)
    demo = app_module.create_app(settings)
    try:
        demo.studio_training.jobs.create("local", "local", "finetune", "cup-v1", "cup", "h", {})
        assert not settings.db_backup_path.exists()
    finally:
        demo.close()  # stops the db-backup thread (the fixture checks) after a last copy
    from services.jobs import JobStore

    copy = JobStore(settings.db_backup_path)
    assert [j.name for j in copy.list("local")] == ["cup-v1"]
    copy.close()


def test_a_script_drives_the_workflow_by_name_and_sees_only_its_steps(settings, tmp_path):
    """The dataset pickers' choices are filled per visitor, so a script's dataset name was refused
    ('not in the list of choices: []'); and the API page listed the page's plumbing too."""
    photos = fx.good_set(tmp_path / "g", count=3, size=(900, 900))
    with running_app(settings) as url:
        client = Client(url, verbose=False)
        try:
            endpoints = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
            assert endpoints == {f"/{name}" for name in app_module.PUBLIC_API}, endpoints
            picker, *_ = client.predict([handle_file(str(p)) for p in photos], None, api_name="/add_images")
            name = picker["value"]
            zip_path, info = client.predict(name, api_name="/export_zip")
            assert "3 images" in info and Path(zip_path).is_file()
            with pytest.raises(Exception, match="not found"):
                client.predict("no-such-dataset", api_name="/export_zip")
            if importlib.util.find_spec("diffusers"):  # the local engine: launch it by the dataset's name
                result, *_ = client.predict("local", name, "product", "TOK", "cup-api", 100, "", 16, "lora",
                                            "quality", False, "auto", api_name="/launch_finetune")
                assert "Launched" in result, result
        finally:
            client.close()
