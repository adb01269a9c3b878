"""The whole app in a real browser: upload → captions → launch → track → compare grid → history after a
restart; two visitors that never see each other's work; and a known key that shows up nowhere."""
from __future__ import annotations

import logging
import re

import httpx
import pytest
from playwright.sync_api import expect

from services.config import Secret
from tests import imagefactory as fx
from tests.browser import chromium, click_launch, running_app, upload_files, wait_for_train_dataset
from tests.conftest import FAKE_COMETAPI_KEY

pytestmark = pytest.mark.browser


def _tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def _upload(page, paths, dataset_name: str) -> None:
    page.locator("#dataset-new-name textarea, #dataset-new-name input").first.fill(dataset_name)
    page.click("#dataset-new")
    expect(page.locator("#dataset-picker input")).to_have_value(re.compile(dataset_name), timeout=15_000)
    upload_files(page, "dataset-upload", paths)
    page.click("#dataset-add")
    page.locator("#dataset-report").get_by_text(f"Added {len(paths)} image(s)").wait_for(timeout=60_000)


def _use_key(page, key: str) -> None:
    page.locator("#session-key input").fill(key)
    page.click("#session-key-use")
    page.locator("#session-key-status").get_by_text("Your key is set").wait_for(timeout=10_000)
    assert page.locator("#session-key input").input_value() == ""  # the box is cleared at once


def _launch_and_wait_ready(page, name: str, provider: str | None = None, iterations: int | None = None) -> None:
    _tab(page, "2 · Train")
    page.locator("#train-launch").wait_for()
    wait_for_train_dataset(page)
    if provider:
        page.locator("#train-provider").get_by_label(provider).check()
    page.locator("#train-mode").get_by_label("product").check()
    name_box = page.locator("#train-name textarea, #train-name input").first
    expect(name_box).to_have_value(re.compile("product"), timeout=10_000)  # the mode suggests a name first
    name_box.fill(name)
    if iterations:
        box = page.locator("#train-iterations input[type=number]")
        box.fill(str(iterations))
        box.press("Enter")
    click_launch(page)
    page.locator("#train-jobs [role=gridcell]").filter(has_text="ready").first.wait_for(timeout=60_000)


def _grid(page, prompts: str, strengths: str) -> str:
    _tab(page, "3 · Compare")
    expect(page.locator("#compare-finetune input")).not_to_have_value("", timeout=15_000)
    page.locator("#grid-prompts textarea").fill(prompts)
    page.locator("#grid-strengths textarea, #grid-strengths input").first.fill(strengths)
    page.click("#grid-go")
    info = page.locator("#grid-info")
    info.get_by_text("wall time").wait_for(timeout=60_000)
    return info.inner_text()


def test_full_workflow_with_cometapi_and_a_restart(settings, fake_cometapi, tmp_path):
    settings = settings.with_(cometapi_base_url=fake_cometapi.url, cometapi_key=Secret(FAKE_COMETAPI_KEY))
    fake_cometapi.finetune_pending_polls = 2
    fake_cometapi.pending_polls = 0
    photos = fx.good_set(tmp_path / "g", count=5, size=(900, 700))
    with chromium() as browser:
        with running_app(settings, track_interval=0.5) as url:
            page = browser.new_page()
            page.goto(url)
            _upload(page, photos, "mug")
            page.fill("#dataset-trigger textarea, #dataset-trigger input", "MUG")
            page.get_by_text("Auto-caption with a vision model").click()
            page.click("#dataset-autocaption")
            page.locator("#dataset-report").get_by_text("Captioned 5 image(s)").wait_for(timeout=60_000)
            page.locator('#dataset-table [role=gridcell]').filter(has_text="MUG").first.wait_for()

            _launch_and_wait_ready(page, "mug-v1")
            [submitted] = fake_cometapi.requests("/flux/v1/finetune")
            assert submitted.json["trigger_word"] == "MUG"

            text = _grid(page, "MUG on a desk\nMUG at the beach", "0.7, 1.3")
            assert "2 prompt(s) × 3 column(s)" in text and "failed" not in text
            assert page.locator("#grid-gallery img").count() == 6
            page.close()

        with running_app(settings) as url:  # everything is still there after a restart
            page = browser.new_page()
            page.goto(url)
            _tab(page, "3 · Compare")
            page.locator("#compare-history img").nth(5).wait_for(timeout=15_000)
            assert page.locator("#compare-history img").count() == 6
            expect(page.locator("#compare-finetune input")).to_have_value(re.compile("mug-v1"))
            _tab(page, "2 · Train")
            page.locator("#train-jobs [role=gridcell]").filter(has_text="mug-v1").first.wait_for()
    assert len(fake_cometapi.requests("/flux/v1/finetune")) == 1


def test_two_visitors_never_see_each_others_work_and_the_key_leaks_nowhere(settings, fake_cometapi, tmp_path, caplog):
    """Hosted, no shared key: each visitor brings their own. Then grep everything for the key."""
    caplog.set_level(logging.DEBUG)
    settings = settings.with_(cometapi_base_url=fake_cometapi.url, cometapi_key=Secret(""), hosted=True)
    fake_cometapi.finetune_pending_polls = 1
    fake_cometapi.pending_polls = 0
    photos = fx.good_set(tmp_path / "g", count=5, size=(700, 700))
    seen_bodies: list[str] = []
    with chromium() as browser, running_app(settings, track_interval=0.5) as url:
        alice = browser.new_context().new_page()
        bob = browser.new_context().new_page()
        for page in (alice, bob):
            page.on("response", lambda r: seen_bodies.append(_body(r)))
        alice.goto(url)
        bob.goto(url)
        _use_key(alice, FAKE_COMETAPI_KEY)
        _upload(alice, photos, "alice-secret-set")
        _launch_and_wait_ready(alice, "alice-v1", provider="CometAPI")
        assert "1 failed" not in _grid(alice, "TOK portrait", "1.0")

        # Bob sees none of it: not the dataset, not the job, not the fine-tune, not the images.
        _tab(bob, "2 · Train")
        # The page has loaded Bob's lists (empty) when the line over the jobs table says so.
        bob.locator("#train-queue").get_by_text("No jobs yet.").wait_for(timeout=15_000)
        assert bob.locator("#train-dataset input").input_value() == ""  # no dataset to pick at all
        assert "alice" not in " ".join(bob.locator("#train-jobs [role=gridcell]").all_inner_texts())
        _tab(bob, "3 · Compare")
        bob.locator("#compare-finetune").get_by_text("None of yours is ready yet").wait_for(timeout=15_000)
        assert bob.locator("#compare-finetune input").input_value() == ""
        assert bob.locator("#compare-history img").count() == 0
        # Bob has no key of his own and there is no shared key: he is told so, and nothing is sent.
        before = len(fake_cometapi.requests())
        bob.locator("#compare-pasted textarea, #compare-pasted input").first.fill("some-finetune-id")
        bob.locator("#compare-prompt textarea").fill("TOK")
        bob.click("#compare-go")
        bob.get_by_text("No CometAPI key").first.wait_for(timeout=15_000)
        assert len(fake_cometapi.requests()) == before

        # Alice's images reach her page through Gradio's cache under a content hash, and live on disk
        # under an unguessable per-owner folder: neither URL can be guessed from a name or a session.
        src = alice.locator("#compare-history img").first.get_attribute("src")
        assert re.search(r"/[0-9a-f]{64}/[^/]+$", src) and str(settings.data_dir) not in src, src
        owned = {p.relative_to(settings.data_dir).parts[:2] for p in settings.data_dir.rglob("*.jpg")}
        assert len(owned) == 1 and re.fullmatch(r"[0-9a-f]{32}", next(iter(owned))[1]), owned
        # A reload is a new page session, but the same browser: Alice finds her work again.
        alice.reload()
        _tab(alice, "2 · Train")  # its dataset list is filled when the tab opens
        expect(alice.locator("#train-dataset input")).to_have_value(re.compile("alice-secret-set"), timeout=15_000)
        _tab(alice, "3 · Compare")
        alice.locator("#compare-history img").first.wait_for(timeout=15_000)
        expect(alice.locator("#compare-finetune input")).to_have_value(re.compile("alice-v1"))
        pages_html = alice.content() + bob.content()
        api_info = httpx.get(f"{url}/gradio_api/info", timeout=10).text + httpx.get(f"{url}/config", timeout=10).text

    key = FAKE_COMETAPI_KEY
    assert key not in pages_html and key not in api_info
    assert not [b for b in seen_bodies if key in b]
    assert key not in caplog.text
    for path in settings.data_dir.rglob("*"):
        if path.is_file():
            assert key.encode() not in path.read_bytes(), path
    # ...and the fake did receive it (so the greps above were looking for something real).
    assert {r.auth for r in fake_cometapi.requests() if r.path.startswith("/flux/")} == {"ok"}


def _body(response) -> str:
    try:
        return response.text()
    except Exception:  # redirects, streams and binary bodies
        return ""


def test_full_workflow_with_the_local_engine(settings, tmp_path):
    """No key at all: the local engine (tiny random FLUX) is the default and runs the whole workflow."""
    pytest.importorskip("diffusers")
    photos = fx.good_set(tmp_path / "g", count=5, size=(640, 480))
    with chromium() as browser:
        with running_app(settings, track_interval=0.5) as url:
            page = browser.new_page()
            page.goto(url)
            _upload(page, photos, "cup")
            _tab(page, "2 · Train")
            banner = page.locator("#train-banner")
            banner.get_by_text("Local engine").wait_for(timeout=15_000)
            assert "noise" in banner.inner_text()  # the tiny model is labelled honestly
            _launch_and_wait_ready(page, "cup-local", iterations=100)
            # Loss and samples came back from the engine while it trained.
            page.locator("#train-samples img").first.wait_for(timeout=15_000)
            # Two lines drawn (per step and smoothed): an empty first frame once left the plot blank.
            expect(page.locator('#train-loss [aria-roledescription="line mark"]')).to_have_count(2, timeout=15_000)
            assert "smoothed" in page.locator("#train-loss").inner_text()

            text = _grid(page, "TOK cup on a table", "0, 1.0")
            assert "1 prompt(s) × 3 column(s)" in text and "failed" not in text
            page.locator("#compare-prompt textarea").fill("TOK cup")
            page.click("#compare-go")
            page.locator("#compare-pair-info").get_by_text("noise by design").wait_for(timeout=60_000)
            page.close()

        with running_app(settings) as url:
            page = browser.new_page()
            page.goto(url)
            _tab(page, "3 · Compare")
            page.locator("#compare-history img").nth(4).wait_for(timeout=15_000)  # grid 3 + pair 2
            expect(page.locator("#compare-finetune input")).to_have_value(re.compile("cup-local"))


def test_a_page_on_another_site_cannot_act_as_the_visitor(settings, tmp_path):
    """Hosted: a page elsewhere makes the visitor's own browser post to the app (to delete her
    dataset). The app refuses it by its Origin, and her dataset is still there."""
    import http.server
    import threading

    settings = settings.with_(hosted=True)
    photos = fx.good_set(tmp_path / "g", count=1, size=(640, 640))
    with chromium() as browser, running_app(settings) as url:
        app = url.rstrip("/")
        config = httpx.get(f"{app}/config", timeout=10).json()
        fn_index = next(i for i, d in enumerate(config["dependencies"]) if d.get("api_name") == "delete_dataset")
        evil_html = f"""<html><body><script>
fetch("{app}/gradio_api/queue/join", {{method: "POST", credentials: "include",
      headers: {{"Content-Type": "application/json"}},
      body: JSON.stringify({{data: ["alice-set"], fn_index: {fn_index}, session_hash: "evil0001"}})}})
  .then(r => document.body.setAttribute("data-result", "status " + r.status))
  .catch(e => document.body.setAttribute("data-result", "blocked " + e));
</script></body></html>""".encode()

        class Evil(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.end_headers()
                self.wfile.write(evil_html)

            def log_message(self, *args):
                pass

        evil = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Evil)
        server = threading.Thread(target=evil.serve_forever, name="evil-site")
        server.start()
        try:
            context = browser.new_context()
            alice = context.new_page()
            alice.goto(url)
            _upload(alice, photos, "alice-set")
            other_site = context.new_page()  # another origin: localhost, not 127.0.0.1
            other_site.goto(f"http://localhost:{evil.server_address[1]}/")
            other_site.locator("body[data-result]").wait_for(timeout=15_000)
            result = other_site.locator("body").get_attribute("data-result")
            assert result == "status 403" or result.startswith("blocked"), result
            alice.reload()  # her list, fresh from the server: the dataset is still offered
            alice.locator("#dataset-picker input").click()
            alice.get_by_role("option", name=re.compile("alice-set")).wait_for(timeout=15_000)
        finally:
            evil.shutdown()
            evil.server_close()
            server.join(10)
    print(f"cross-site post: {result}")
