"""Hosted mode as an attacker sees it, with two visitors and an anonymous client over real HTTP.

* No file of the data dir is served to anyone, by any path: two visitors do real work through the
  API, then an anonymous client asks the file route for every file under the data dir and for a
  session's deep-link dump. The visitors' own results still reach them (the positive control).
* Identity is the server's: a replayed session_hash or a made-up cookie gets nothing.
* Another site's page may not act as a visitor.
* A fine-tune id resolves against the caller's own jobs only."""
from __future__ import annotations

import zipfile
from pathlib import Path
from urllib.parse import quote

import httpx
from gradio import utils as gr_utils
from gradio_client import Client, handle_file

from tests import imagefactory as fx
from tests.browser import client_owner, running_app


def _file_url(url: str, path: Path | str) -> str:
    return f"{url.rstrip('/')}/gradio_api/file={quote(str(path))}"



def compare_once_each(settings, clients, finetune: str, fields: list) -> list[str]:
    """Give each client the same ready CometAPI fine-tune as its own job, then have each compare once
    (two paid calls each); the refusals' messages, in order."""
    from gradio_client.exceptions import AppError

    from services.storage.jobs import JobStore

    jobs = JobStore.from_settings(settings)
    for client in clients:
        owner = client_owner(settings, client)
        job = jobs.create(owner, "cometapi", "finetune", "mine", "ds", "h", {})
        jobs.update(owner, job.id, remote_id=finetune, status="ready", result={"finetune_id": finetune})
    jobs.close()
    refusals = []
    for client in clients:
        try:
            client.predict(finetune, *fields, api_name="/compare")
        except AppError as exc:
            refusals.append(str(exc))
    return refusals

def test_no_file_of_the_data_dir_is_served_and_deep_links_are_blocked(settings, tmp_path):
    settings = settings.with_(hosted=True)
    photos = fx.good_set(tmp_path / "g", count=3, size=(640, 640))
    with running_app(settings) as url:
        visitors = [Client(url, verbose=False) for _ in range(2)]
        try:
            exports = []
            for client in visitors:
                added = client.predict("cup", [handle_file(str(p)) for p in photos], api_name="/add_images")
                assert added["images"] == 3
                exports.append(client.predict("cup", api_name="/export_zip"))
            # A local job folder and a trained LoRA, as the local engine leaves them.
            job = settings.data_dir / "local_jobs" / "local-0123456789abcdef"
            (job / "output").mkdir(parents=True)
            (job / "dataset.zip").write_bytes(Path(exports[0]).read_bytes())
            (job / "output" / "pytorch_lora_weights.safetensors").write_bytes(b"lora")
            (job / "state.json").write_text("{}")

            files = sorted(p for p in settings.data_dir.rglob("*") if p.is_file())
            names = {p.name for p in files}
            assert {".owner-secret", "jobs.sqlite3", "dataset.zip", "dataset.json"} <= names, names
            assert sum(1 for p in files if p.suffix == ".jpg") >= 6  # both visitors' photos are there
            with httpx.Client(timeout=30) as anonymous:
                served = {str(p.relative_to(settings.data_dir)): anonymous.get(_file_url(url, p)).status_code
                          for p in files}
                assert {path: code for path, code in served.items() if code != 403} == {}

                # The visitor's own export reached her (gradio_client downloaded it from its cache copy)...
                with zipfile.ZipFile(exports[0]) as zf:
                    assert len(zf.namelist()) == 3
                # ...and a cache copy is served: the route does answer 200 where it should.
                cached = next(Path(gr_utils.get_upload_folder()).rglob(Path(exports[0]).name))
                assert anonymous.get(_file_url(url, cached)).status_code == 200

                # A deep link would dump a session's component values under the upload dir: the route is
                # gone, and the folder is blocked anyway (second fence, probed with a planted dump).
                session = visitors[0].session_hash
                link = anonymous.get(f"{url.rstrip('/')}/gradio_api/deep_link", params={"session_hash": session})
                assert link.status_code == 404
                planted = Path(gr_utils.get_upload_folder()) / "deep_links" / "probe" / "state.json"
                planted.parent.mkdir(parents=True, exist_ok=True)
                planted.write_text("[]")
                try:
                    dumps = list(planted.parent.parent.rglob("state.json"))
                    assert {anonymous.get(_file_url(url, d)).status_code for d in dumps} == {403}
                finally:
                    planted.unlink()
                    planted.parent.rmdir()
        finally:
            for client in visitors:
                client.close()
    print(f"probed {len(files)} data-dir files + {len(dumps)} deep-link dump(s): all refused")


def test_the_dataset_list_is_each_visitors_own_not_anonymous(settings, tmp_path):
    """The Dataset tab's list (on load and on Refresh) once came from the 'anonymous' owner for every
    visitor, so a dataset planted there showed in everyone's list and nobody saw their own."""
    from services.storage.datasets import DatasetStores

    settings = settings.with_(hosted=True)
    DatasetStores(settings)("anonymous").create("planted-by-anonymous")
    photo = fx.good_set(tmp_path / "g", count=1, size=(640, 640))[0]
    with running_app(settings) as url:
        alice, bob = Client(url, verbose=False), Client(url, verbose=False)
        try:
            mine = alice.predict("alices-set", [handle_file(str(photo))], api_name="/add_images")["name"]
            alice_list = alice.predict(api_name="/list_datasets")
            bob_list = bob.predict(api_name="/list_datasets")
            # Bob knows the name and asks to delete it: it is not his, so there is nothing to delete.
            from gradio_client.exceptions import AppError

            try:
                bob.predict(mine, api_name="/delete_dataset")
            except AppError as exc:  # his store has no such set
                assert "was not found" in str(exc)
            else:
                raise AssertionError("Bob deleted a dataset that is not his")
            still = alice.predict(api_name="/list_datasets")
            alice.predict(mine, api_name="/delete_dataset")  # her own: gone
            after = alice.predict(api_name="/list_datasets")
        finally:
            alice.close()
            bob.close()
    assert alice_list == [mine] == still
    assert bob_list == [] and after == []


def test_a_fine_tune_id_resolves_against_the_callers_own_jobs_only(settings, fake_cometapi):
    """Pasting another visitor's local job id, or a CometAPI id on the shared key, is refused before
    anything is charged or sent; one's own ready fine-tune works."""
    from gradio_client.exceptions import AppError

    from services.config import Secret
    from services.storage.jobs import JobStore
    from tests.conftest import FAKE_COMETAPI_KEY

    settings = settings.with_(hosted=True, cometapi_base_url=fake_cometapi.url,
                              cometapi_key=Secret(FAKE_COMETAPI_KEY), shared_key_limit=10)
    fake_cometapi.pending_polls = 0
    finetune = fake_cometapi.add_finetune()
    fields = ["a photo of TOK", 5, 1.0, 1024, 768]
    with running_app(settings) as url:
        alice, bob = Client(url, verbose=False), Client(url, verbose=False)
        try:
            jobs = JobStore.from_settings(settings)
            alice_owner = client_owner(settings, alice)
            for remote, result in ((finetune, {"finetune_id": finetune}), ("local-alicesjob", {})):
                job = jobs.create(alice_owner, "cometapi" if remote == finetune else "local", "finetune", "a", "d",
                                  "h", {})
                jobs.update(alice_owner, job.id, remote_id=remote, status="ready", result=result)
            jobs.close()
            before = len(fake_cometapi.requests())
            for pasted, why in (("local-alicesjob", "is not one of your fine-tunes"),
                                (finetune, "works only with your own key")):
                try:
                    bob.predict(pasted, *fields, api_name="/compare")
                except AppError as exc:
                    assert why in str(exc)
                else:
                    raise AssertionError(f"Bob used {pasted}")
            assert len(fake_cometapi.requests()) == before  # nothing was sent, nothing charged
            base, tuned, *_ = alice.predict(finetune, *fields, api_name="/compare")
            assert Path(base).is_file() and Path(tuned).is_file()
        finally:
            alice.close()
            bob.close()


def test_a_replayed_session_hash_or_a_made_up_cookie_gets_nothing(settings, tmp_path):
    from components.identity import VISITOR_COOKIE

    settings = settings.with_(hosted=True)
    photo = fx.good_set(tmp_path / "g", count=1, size=(640, 640))[0]
    with running_app(settings) as url:
        alice = Client(url, verbose=False)
        # Bob knows Alice's session hash, and makes up a cookie shaped like a token.
        bob = Client(url, verbose=False)
        mallory = Client(url, verbose=False, httpx_kwargs={"cookies": {VISITOR_COOKIE: "a" * 32 + "." + "b" * 32}})
        try:
            alice.predict("alices-set", [handle_file(str(photo))], api_name="/add_images")
            bob.session_hash = alice.session_hash
            mallory.session_hash = alice.session_hash
            lists = {who: c.predict(api_name="/list_datasets")
                     for who, c in (("alice", alice), ("bob", bob), ("mallory", mallory))}
            owners = {client_owner(settings, c) for c in (alice, bob)}
        finally:
            for c in (alice, bob, mallory):
                c.close()
    assert len(lists["alice"]) == 1 and lists["bob"] == [] and lists["mallory"] == []
    assert len(owners) == 2


def test_another_sites_page_may_not_act_as_a_visitor_and_the_cookie_is_out_of_scripts_reach(settings):
    settings = settings.with_(hosted=True)
    with running_app(settings) as url, httpx.Client(timeout=30) as http:
        base = url.rstrip("/")
        host = httpx.URL(base).netloc.decode()
        page = http.get(base + "/")
        cookie = page.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Lax" in cookie  # plain http: no Secure flag possible
        http.cookies.clear()
        behind_tls = http.get(base + "/", headers={"x-forwarded-proto": "https"}).headers["set-cookie"]
        assert all(flag in behind_tls for flag in ("HttpOnly", "Secure", "SameSite=None", "Partitioned"))
        body = {"data": [None], "fn_index": 0, "session_hash": "evil0001"}
        join = base + "/gradio_api/queue/join"
        refused = http.post(join, json=body, headers={"origin": "https://evil.example"})
        assert refused.status_code == 403 and "other sites" in refused.text
        for origin in (f"http://{host}", None):
            headers = {"origin": origin} if origin else {}
            assert http.post(join, json=body, headers=headers).status_code != 403, origin


def test_on_a_space_its_own_origins_are_the_same_site(settings):
    """A Space's page lives on <name>.hf.space, shown inside huggingface.co: both may act; others not."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from components.identity import VisitorGate

    async def ok(request):
        return PlainTextResponse("ok")

    space = settings.with_(hosted=True, space_id="someone/studio")
    app = VisitorGate(Starlette(routes=[Route("/", ok, methods=["POST"])]), space)
    with TestClient(app, base_url="https://someone-studio.hf.space") as client:
        codes = {origin: client.post("/", headers={"origin": origin}).status_code for origin in (
            "https://someone-studio.hf.space", "https://huggingface.co", "https://evil.example",
            "https://huggingface.co.evil.example", "http://huggingface.co")}
    assert codes == {"https://someone-studio.hf.space": 200, "https://huggingface.co": 200,
                     "https://evil.example": 403, "https://huggingface.co.evil.example": 403,
                     "http://huggingface.co": 403}


def test_the_shared_key_budget_holds_against_cookie_churn_and_counts_captions_per_image(
        settings, fake_cometapi, tmp_path):
    """The reported attack: a new cookie per request got 18 paid generations past a limit of 3."""
    from gradio_client.exceptions import AppError

    from services.config import Secret
    from services.storage.jobs import JobStore
    from tests.conftest import FAKE_COMETAPI_KEY

    settings = settings.with_(hosted=True, cometapi_base_url=fake_cometapi.url, cometapi_key=Secret(FAKE_COMETAPI_KEY),
                              shared_key_limit=3, shared_key_address_limit=6, shared_key_hourly_cap=100)
    fake_cometapi.pending_polls = 0
    finetune = fake_cometapi.add_finetune()
    fields = ["a photo of TOK", 5, 1.0, 1024, 768]
    photos = fx.good_set(tmp_path / "g", count=4, size=(640, 640))
    refusals: list[str] = []
    with running_app(settings) as url:
        churn = [Client(url, verbose=False) for _ in range(6)]  # six fresh cookies, one address
        try:
            refusals += compare_once_each(settings, churn, finetune, fields)
            generations = len(fake_cometapi.requests("/flux/v1/flux-pro-1.1-ultra")) + len(
                fake_cometapi.requests("/flux/v1/flux-pro-1.1-ultra-finetuned"))
            assert generations == 6 and len(refusals) == 3
            assert all("from your network" in r for r in refusals)
        finally:
            for client in churn:
                client.close()

    # Captions: one paid call per image, refused whole when the run does not fit.
    settings = settings.with_(shared_key_limit=5, shared_key_address_limit=100)
    fake_cometapi.reset()
    with running_app(settings) as url:
        visitor = Client(url, verbose=False)
        try:
            name = visitor.predict("set", [handle_file(str(p)) for p in photos], api_name="/add_images")["name"]
            report = visitor.predict(name, "product", True, api_name="/auto_caption")
            assert "Captioned 4" in report["summary"] and len(fake_cometapi.requests("/v1/chat/completions")) == 4
            try:
                visitor.predict(name, "product", False, api_name="/auto_caption")  # 4 more: 8 > 5
            except AppError as exc:
                assert "This needs 4 calls" in str(exc)
            else:
                raise AssertionError("a caption run past the budget was let through")
            assert len(fake_cometapi.requests("/v1/chat/completions")) == 4
        finally:
            visitor.close()


SPACE_SCRIPT = """
import base64, hashlib, json, sys, tempfile, time
from pathlib import Path
import itsdangerous
from gradio_client import Client, handle_file
import app as A
from services.config import Settings

photo = sys.argv[1]
settings = Settings.from_env().with_(data_dir=Path(tempfile.mkdtemp()) / "d")
demo = A.create_app(settings)
_, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, **A.launch_options(settings))
signer = itsdangerous.TimestampSigner(hashlib.sha256(b"fake-secret-v4").hexdigest())

def signed_in(user):  # the session cookie Gradio's OAuth callback leaves after "Sign in with Hugging Face"
    info = {"oauth_info": {"userinfo": {"preferred_username": user, "name": user, "profile": "", "picture": ""},
                           "access_token": "hf_oauth_" + user, "expires_at": time.time() + 3600}}
    value = signer.sign(base64.b64encode(json.dumps(info).encode())).decode()
    return Client(url, verbose=False, httpx_kwargs={"cookies": {"session": value}})

try:
    ann, ann_again, bob = signed_in("ann"), signed_in("ann"), signed_in("bob")
    ann.predict("anns-set", [handle_file(photo)], api_name="/add_images")
    lists = [c.predict(api_name="/list_datasets") for c in (ann, ann_again, bob)]
    print(json.dumps({"page_has_login": "Sign in" in __import__("httpx").get(url).text,
                      "lists": lists,
                      "owners": sorted(p.name for p in (settings.data_dir / "owners").iterdir())}))
finally:
    demo.close()
"""


def test_on_a_space_the_hugging_face_sign_in_is_the_identity(tmp_path):
    """On a Space (hf_oauth), a signed-in visitor is their HF account: the same on another browser,
    and never another account. Runs the app as a Space would, with Gradio's real OAuth wiring."""
    import json
    import os
    import subprocess
    import sys

    photo = fx.good_set(tmp_path / "g", count=1, size=(640, 640))[0]
    env = {**os.environ, "SYSTEM": "spaces", "SPACE_ID": "someone/studio", "OAUTH_CLIENT_ID": "fake-client",
           "OAUTH_CLIENT_SECRET": "fake-secret", "OPENID_PROVIDER_URL": "https://huggingface.co",
           "OAUTH_SCOPES": "openid profile", "SPACE_HOST": "someone-studio.hf.space"}
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", SPACE_SCRIPT, str(photo)], cwd=root, env=env, capture_output=True,
                         text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("{")))
    assert seen["page_has_login"]
    ann, ann_elsewhere, bob = seen["lists"]
    assert len(ann) == 1 and ann_elsewhere == ann and bob == []
    assert len(seen["owners"]) == 1  # one folder, keyed from hf-ann


def test_uploaded_file_names_reach_the_page_as_text(settings, tmp_path):
    """The import report quotes each upload's own names (Gradio cleans a file's name, not the names of
    the entries inside a zip): markup in a name must arrive escaped."""
    settings = settings.with_(hosted=True)
    shoot = tmp_path / "shoot.zip"
    with zipfile.ZipFile(shoot, "w") as zf:
        zf.writestr('<img src=x id=pwned onerror="alert(1)">.jpg', b"not an image")
    with running_app(settings) as url:
        client = Client(url, verbose=False)
        try:
            # The page's own upload event (undocumented: the API's add_images returns the report as data).
            _, _, report, *_ = client.predict([handle_file(str(shoot))], None, api_name="/on_add")
        finally:
            client.close()
    assert "not a readable image" in report
    assert "<img" not in report and '&lt;img src=x id=pwned onerror="alert(1)"&gt;.jpg' in report


def test_the_upload_route_is_for_known_visitors_and_capped_per_request(settings, tmp_path):
    settings = settings.with_(hosted=True, max_upload_bytes=2 * 2**20)
    photo = fx.good_set(tmp_path / "g", count=1, size=(640, 640))[0]
    with running_app(settings) as url, httpx.Client(timeout=30) as http:
        upload = url.rstrip("/") + "/gradio_api/upload"
        files = [("files", ("p.jpg", photo.read_bytes(), "image/jpeg"))]
        assert http.post(upload, files=files).status_code == 403  # no visitor cookie: not a visitor yet
        http.get(url)  # opening the app is what makes one a visitor
        ok = http.post(upload, files=files)
        assert ok.status_code == 200 and len(ok.json()) == 1  # the positive control
        many = [("files", (f"p{i}.jpg", b"x" * 100_000, "image/jpeg")) for i in range(30)]  # 3 MB in all
        assert http.post(upload, files=many).status_code == 413


def _mcp_calls(url: str, calls: list[tuple[str, dict]], *, keep_cookies: bool = True) -> list[tuple[bool, str]]:
    """One assistant's MCP session (streamable HTTP, as assistants connect): each call's (is_error, text)."""
    import asyncio

    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared._httpx_utils import create_mcp_http_client

    async def run() -> list[tuple[bool, str]]:
        client = create_mcp_http_client()
        if not keep_cookies:
            async def forget(_response) -> None:  # a client that keeps no cookie
                client.cookies.clear()

            client.event_hooks["response"].append(forget)
        async with client, streamable_http_client(url + "gradio_api/mcp/", http_client=client) as (read, write, _):
            async with ClientSession(read, write) as session:
                await session.initialize()
                out = []
                for name, args in calls:
                    result = await session.call_tool(name, args)
                    out.append((result.isError, " ".join(c.text for c in result.content if hasattr(c, "text"))))
                return out

    return asyncio.run(run())


def test_mcp_assistants_are_visitors_like_any_other(settings, fake_cometapi):
    """Gradio's MCP server calls the app through one shared client. Each assistant is the visitor its own
    cookie says; one that keeps no cookie reaches nobody's work, not the first assistant's; and the
    shared key's budget holds for tools as for the page."""
    from services.config import Secret
    from tests.conftest import FAKE_COMETAPI_KEY

    settings = settings.with_(hosted=True, mcp=True, cometapi_base_url=fake_cometapi.url,
                              cometapi_key=Secret(FAKE_COMETAPI_KEY), shared_key_limit=2)
    fake_cometapi.pending_polls = 0
    finetune = fake_cometapi.add_finetune()
    with running_app(settings) as url:
        alice = _mcp_calls(url, [("create_dataset", {"name": "alices"}), ("list_datasets", {})])
        forgetful = _mcp_calls(url, [("create_dataset", {"name": "forgotten"}), ("list_datasets", {}),
                                     ("describe_dataset", {"dataset": "alices"})], keep_cookies=False)
        other_forgetful = _mcp_calls(url, [("list_datasets", {})], keep_cookies=False)
        bob = _mcp_calls(url, [("list_datasets", {}), ("delete_dataset", {"dataset": "alices"}),
                               ("compare", {"finetune": finetune, "prompt": "TOK"})])
        alice_again = _mcp_calls(url, [("list_datasets", {})])
    assert alice == [(False, "{'name': 'alices', 'images': 0, 'captioned': 0, 'trigger_word': ''}"),
                     (False, "['alices']")]
    # No cookie: each call is its own throwaway owner, so not even its own dataset is listed a call later...
    assert forgetful[1] == (False, "[]") and forgetful[2][0] and "was not found" in forgetful[2][1]
    assert other_forgetful == [(False, "[]")]  # ...and never the shared client's cookie, the same for all
    assert bob[0] == (False, "[]") and bob[1][0] and "was not found" in bob[1][1]
    # A fine-tune id that is not his, on the shared key: refused before anything is sent.
    assert bob[2][0] and "works only with your own key" in bob[2][1]
    assert fake_cometapi.requests("/flux/v1/flux-pro-1.1-ultra") == []
    assert alice_again == [(False, "[]")]  # a new session is a new assistant: cookies are per session


def test_hugging_face_work_never_runs_on_the_owners_token_for_a_visitor(settings, tmp_path):
    """Hosted, with HF_TOKEN set on the server: a visitor who is not signed in with Hugging Face (a
    script, an anonymous client) is told to sign in, and nothing reaches the Hub on the owner's token."""
    from gradio_client.exceptions import AppError

    from services.config import Secret
    from services.providers.huggingface.provider import HuggingFaceProvider
    from services.providers.local.provider import LocalProvider
    from tests.fake_hf import TOKEN, Hub

    settings = settings.with_(hosted=True, hf_token=Secret(TOKEN))
    hub = Hub(tmp_path)
    providers = {"local": LocalProvider(settings), "huggingface": HuggingFaceProvider(settings, api=hub.api)}
    photos = fx.good_set(tmp_path / "g", count=3, size=(640, 640))
    with running_app(settings, providers=providers) as url:
        visitor = Client(url, verbose=False)
        try:
            visitor.predict("cup", [handle_file(str(p)) for p in photos], api_name="/add_images")
            try:
                visitor.predict("cup", "cup-hf", "huggingface", api_name="/launch_finetune")
            except AppError as exc:
                assert "Sign in with Hugging Face" in str(exc) and TOKEN not in str(exc)
            else:
                raise AssertionError("a visitor launched a paid job on the owner's Hugging Face token")
            try:
                visitor.predict("alice/flux-lora-someone-elses", "a photo of TOK", 5, 1.0, 1024, 768,
                                api_name="/compare")
            except AppError as exc:
                assert "not one of your fine-tunes" in str(exc)
            else:
                raise AssertionError("a visitor generated with a repo that is not theirs")
        finally:
            visitor.close()
    assert hub.api.mock_calls == []  # not one call to the Hub, with any token


def _local_engine(settings):
    """The app's local engine on the tiny model, without samples or checkpoints (the fastest run)."""
    import pytest

    for extra in ("torch", "diffusers", "peft"):
        pytest.importorskip(extra)
    from services.providers.local.provider import LocalProvider

    return {"local": LocalProvider(settings, steps_per_sample=0, checkpoint_every=0)}


def test_a_visitors_local_job_is_tracked_to_ready_and_compared(settings, tmp_path):
    """A hosted visitor's local job once read as 'no longer known' a tracking pass after its launch (its id,
    which names the visitor's folder, outgrew the id check) while the engine trained it to the end."""
    from gradio_client.exceptions import AppError
    from PIL import Image

    from tests.browser import launched

    settings = settings.with_(hosted=True)
    providers = _local_engine(settings)
    photos = fx.good_set(tmp_path / "g", count=3, size=(640, 640))
    with launched(settings, providers=providers) as (demo, url):
        alice, bob = Client(url, verbose=False), Client(url, verbose=False)
        try:
            alice.predict("cup", [handle_file(str(p)) for p in photos], api_name="/add_images")
            job = alice.predict("cup", "cup-v1", "local", "product", "CUPX", 100, api_name="/launch_finetune")
            remote_id = job["finetune_id"]
            assert remote_id.startswith("local-o") and len(remote_id) > 70  # the visitor's folder is in the id
            # The signal: the run's own thread has ended; one tracking pass then records how it went.
            assert providers["local"].join(remote_id, timeout=600), "the visitor's local job did not finish"
            demo.studio.training.track_once()
            seen = alice.predict("cup-v1", api_name="/get_job")
            assert seen["status"] == "ready", seen
            base, tuned, details = alice.predict("cup-v1", "a photo of CUPX cup", 3, 1.0, 128, 128,
                                                 api_name="/compare")
            with Image.open(base) as b, Image.open(tuned) as t:
                assert b.size == t.size == (128, 128)
            assert details["base"]["status"] == details["tuned"]["status"] == "ok"
            try:  # her fine-tune is hers: Bob, pasting its id, gets nothing
                bob.predict(remote_id, "a photo of CUPX cup", 3, 1.0, 128, 128, api_name="/compare")
            except AppError as exc:
                assert "not one of your fine-tunes" in str(exc)
            else:
                raise AssertionError("Bob generated with Alice's local fine-tune")
        finally:
            alice.close()
            bob.close()


def test_the_local_job_cap_holds_across_a_burst_of_launches(settings, tmp_path):
    """One visitor once queued 8 local jobs past a cap of 2: each read as finished a tracking pass after
    its launch, so none counted. A tracking pass runs between launches here, as the app's tracker would."""
    from gradio_client.exceptions import AppError

    from tests.browser import launched

    settings = settings.with_(hosted=True, visitor_max_local_jobs=2)
    photos = fx.good_set(tmp_path / "g", count=3, size=(640, 640))
    with launched(settings, providers=_local_engine(settings)) as (demo, url):
        alice, bob = Client(url, verbose=False), Client(url, verbose=False)
        try:
            for client in (alice, bob):
                client.predict("cup", [handle_file(str(p)) for p in photos], api_name="/add_images")
            accepted, refused = [], []
            for n in range(5):
                try:
                    accepted.append(alice.predict("cup", f"cup-{n}", "local", "product", "", 1000,
                                                  api_name="/launch_finetune"))
                except AppError as exc:
                    refused.append(str(exc))
                demo.studio.training.track_once()
            statuses = [j["status"] for j in alice.predict(api_name="/list_jobs")]
            # The cap is per visitor: Bob still may launch.
            bobs = bob.predict("cup", "bobs", "local", "product", "", 1000, api_name="/launch_finetune")
        finally:
            alice.close()
            bob.close()
    assert [j["name"] for j in accepted] == ["cup-0", "cup-1"] and len(refused) == 3
    assert all("already have 2 job(s) queued or running" in r for r in refused), refused
    assert len(statuses) == 2 and set(statuses) <= {"pending", "running"}, statuses  # neither read as failed
    assert bobs["status"] == "pending"


def test_a_visitors_local_job_id_is_one_the_engine_finds_again(settings, tmp_path):
    """The id a job gets names the visitor's folder; the check that finds it takes every id made
    (without torch: the folders are plain files)."""
    import uuid

    from services.providers.local.folders import JobFolders

    folders = JobFolders(settings.with_(hosted=True))
    zip_path = fx.training_zip(tmp_path / "ds.zip")
    made = [folders.new_id(uuid.uuid4().hex, "visitor-" + "a" * 32), folders.new_id("x" * 64, "hf-someone"),
            folders.new_id(uuid.uuid4().hex, "local"), folders.new_id("", "visitor-b")]
    for remote_id in made:
        folders.create(remote_id, zip_path, {}, {"state": "pending", "tag": remote_id[-8:]})
        assert folders.existing(remote_id) == folders.folder(remote_id)
        assert folders.read_state(remote_id)["state"] == "pending"
    assert sorted(folders.ids()) == sorted(made)
    assert folders.folder(made[0]).parent.parent.parent.name == "owners"  # a visitor's job is in their folder
    assert folders.folder(made[2]).parent == settings.data_dir / "local_jobs"


def test_launches_at_once_cannot_pass_the_cap_together(settings, fake_cometapi, tmp_path):
    """A script's burst of launches at once: each counted the same jobs before any was recorded, and all
    fit. A barrier holds every launch after its own count would have been made, before any records."""
    import threading

    from services.config import Secret
    from services.errors import InputError
    from services.providers.base import TrainRequest
    from services.providers.cometapi.provider import CometAPIProvider
    from services.storage.datasets import DatasetStore, DatasetStores
    from services.storage.jobs import JobStore
    from services.training import TrainingService
    from tests.conftest import FAKE_COMETAPI_KEY

    fake_cometapi.finetune_pending_polls = 10**6
    settings = settings.with_(hosted=True, cometapi_base_url=fake_cometapi.url, cometapi_key=Secret(FAKE_COMETAPI_KEY))
    stores = DatasetStores(settings)
    name = stores("visitor-x").create("mug").name
    stores("visitor-x").add_files(name, fx.good_set(tmp_path / "g", count=3, size=(640, 640)))
    service = TrainingService(JobStore.from_settings(settings), {"cometapi": CometAPIProvider.from_settings(settings)},
                              stores, max_active={"cometapi": 2})
    burst = 5
    together = threading.Barrier(burst, timeout=60)
    exported = DatasetStore.export_zip

    def export_then_wait(store, dataset):
        result = exported(store, dataset)
        together.wait()
        return result

    outcomes: list[str] = []

    def launch(n: int) -> None:
        request = TrainRequest(name=f"mug-{n}", mode="product", trigger_word="MUG", iterations=300)
        try:
            outcomes.append(service.launch("visitor-x", "cometapi", name, request).status)
        except InputError as exc:
            outcomes.append(exc.message)

    DatasetStore.export_zip = export_then_wait
    try:
        threads = [threading.Thread(target=launch, args=(n,), name=f"test-burst-{n}") for n in range(burst)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        DatasetStore.export_zip = exported
        service.close()
    refused = [o for o in outcomes if o != "pending"]
    assert len(outcomes) == burst and outcomes.count("pending") == 2, outcomes
    assert all("already have 2 job(s)" in o for o in refused), outcomes
    assert len(fake_cometapi.requests("/flux/v1/finetune")) == 2
    assert len(service.jobs.active_jobs("visitor-x")) == 2


def test_a_refused_launch_charges_nothing_to_the_shared_key(settings, fake_cometapi, tmp_path):
    """Three launches refused for a learning rate that is not a number once used up a visitor's hour on
    the shared key, and not one request had reached the service. The form is checked first; only what
    is sent is charged: through the Train tab and through Studio alike."""
    from gradio_client.exceptions import AppError

    from services.config import Secret
    from services.errors import InputError
    from tests.browser import launched
    from tests.conftest import FAKE_COMETAPI_KEY

    settings = settings.with_(hosted=True, cometapi_base_url=fake_cometapi.url, cometapi_key=Secret(FAKE_COMETAPI_KEY),
                              shared_key_limit=3, shared_key_address_limit=100)
    fake_cometapi.finetune_pending_polls = 10**6
    photos = fx.good_set(tmp_path / "g", count=3, size=(640, 640))
    # The Train tab's launch form as its endpoint takes it: its components in the order the page shows them
    # (provider, dataset, base model, memory preset, hardware, mode, trigger word, name, iterations,
    # learning rate, checkpointing, rank, type, priority, captioning).
    form = ["cometapi", "cup", "", "", "", "product", "CUPX", "cup-v1", 300, "", "auto", 16, "lora", "quality", True]
    refusals = []
    with launched(settings) as (demo, url):
        visitor = Client(url, verbose=False)
        try:
            visitor.predict("cup", [handle_file(str(p)) for p in photos], api_name="/add_images")
            owner = client_owner(settings, visitor)
            for field, bad in ((9, "not-a-number"), (9, "not-a-number"), (9, "not-a-number"), (6, "two words")):
                try:
                    visitor.predict(*form[:field], bad, *form[field + 1:], api_name="/on_launch")
                except AppError as exc:
                    refusals.append(str(exc))
            try:  # Studio's launch (the API's and notebooks'): an empty dataset is refused, uncharged
                demo.studio.dataset("empty", owner=owner)
                demo.studio.launch("empty", "nothing", provider="cometapi", owner=owner, address="127.0.0.1")
            except InputError as exc:
                refusals.append(exc.message)
            used_by_refusals = demo.studio.access.budget.visitor.used(owner)
            launched_ok = visitor.predict(*form, api_name="/on_launch")[0]
            used_after = demo.studio.access.budget.visitor.used(owner)
        finally:
            visitor.close()
    assert [r for r in refusals if "is not a number" in r] == refusals[:3], refusals
    assert "need fixing" in refusals[3] and "has no images" in refusals[4], refusals
    assert used_by_refusals == 0 and used_after == 1
    assert "Launched" in launched_ok and len(fake_cometapi.requests("/flux/v1/finetune")) == 1


def test_made_up_forwarded_addresses_cannot_pass_the_per_address_limit(settings, fake_cometapi, monkeypatch):
    """On a Space, five visitors who each wrote a made-up X-Forwarded-For got 15 paid calls past a
    per-address limit of 9: the first entry, which the client writes, was taken as their address. The
    header arrives here as Hugging Face's proxy passes it on: the client's own entries, then the address
    the proxy saw, appended. The app runs as on a Space (its sign-in button and all; nobody signs in)."""
    from gradio import oauth
    from gradio_client.exceptions import AppError

    from services.config import Secret
    from services.storage.jobs import JobStore
    from tests.conftest import FAKE_COMETAPI_KEY

    # Outside a Space, Gradio serves the sign-in button's routes with the machine's own HF login: a stand-in.
    monkeypatch.setattr(oauth, "_get_mocked_oauth_info", lambda: {"access_token": "unused", "userinfo": {}})
    settings = settings.with_(hosted=True, space_id="someone/studio", cometapi_base_url=fake_cometapi.url,
                              cometapi_key=Secret(FAKE_COMETAPI_KEY), shared_key_limit=10,
                              shared_key_address_limit=6, shared_key_hourly_cap=100)
    fake_cometapi.pending_polls = 0
    finetune = fake_cometapi.add_finetune()
    fields = ["a photo of TOK", 5, 1.0, 1024, 768]
    refusals: list[str] = []
    with running_app(settings) as url:
        forgers = [Client(url, verbose=False, headers={"x-forwarded-for": f"203.0.113.{n}, 10.{n}.0.1, 198.51.100.7"})
                   for n in range(5)]  # one network (198.51.100.7), five made-up addresses before it
        try:
            refusals += compare_once_each(settings, forgers, finetune, fields)
        finally:
            for client in forgers:
                client.close()
    generations = len(fake_cometapi.requests("/flux/v1/flux-pro-1.1-ultra")) + len(
        fake_cometapi.requests("/flux/v1/flux-pro-1.1-ultra-finetuned"))
    assert generations == 6 and len(refusals) == 2, refusals
    assert all("from your network" in r for r in refusals)


def _multipart(boundary: str, name: str, chunks, chunk_count: int):
    """A multipart upload body of one file, streamed: httpx sends an iterator without a length chunked."""
    yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
           "Content-Type: application/octet-stream\r\n\r\n").encode()
    for _ in range(chunk_count):
        yield chunks
    yield f"\r\n--{boundary}--\r\n".encode()


def test_an_over_size_upload_sent_chunked_is_refused_and_leaves_no_file(settings, tmp_path, monkeypatch):
    """With no Content-Length to refuse it by, an over-size upload once answered 500 and left its partial
    file in Gradio's upload folder: four tries left 200 MiB there."""
    uploads = tmp_path / "gradio-uploads"  # this test's own, so that what is left in it is this test's
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(uploads))
    settings = settings.with_(hosted=True, max_upload_bytes=2 * 2**20)
    boundary = "studio-test-boundary"
    headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
    chunk = bytes(range(256)) * 256  # 64 KiB
    with running_app(settings) as url, httpx.Client(timeout=60) as http:
        upload = url.rstrip("/") + "/gradio_api/upload"
        http.get(url)  # a visitor
        small = http.post(upload, content=_multipart(boundary, "small.bin", chunk, 16), headers=headers)  # 1 MiB
        assert small.status_code == 200, small.text  # the positive control: a chunked upload within the cap
        assert Path(small.json()[0]).read_bytes() == chunk * 16
        before = {p for p in uploads.rglob("*") if p.is_file()}
        for _ in range(3):
            big = http.post(upload, content=_multipart(boundary, "big.bin", chunk, 48), headers=headers)  # 3 MiB
            assert big.status_code == 413 and "at most 2 MB" in big.text, (big.status_code, big.text)
        left = {p for p in uploads.rglob("*") if p.is_file()} - before
        assert left == set(), left
        # The app still takes uploads after the refusals.
        assert http.post(upload, content=_multipart(boundary, "again.bin", chunk, 2), headers=headers).status_code == 200


def test_a_megabyte_caption_is_refused_through_the_api(settings, tmp_path):
    """Captions of 1, 20 and 100 MB were taken through the API: dataset.json grew to 100 MiB, and reading it
    slowed every visitor. Refused with the reason; what was saved stays."""
    from gradio_client.exceptions import AppError

    settings = settings.with_(hosted=True)
    photo = fx.good_set(tmp_path / "g", count=1, size=(640, 640))[0]
    with running_app(settings) as url:
        visitor = Client(url, verbose=False)
        try:
            visitor.predict("cup", [handle_file(str(photo))], api_name="/add_images")
            [item] = visitor.predict("cup", api_name="/describe_dataset")["items"]
            visitor.predict("cup", {item["file"]: "TOK, a red cup"}, api_name="/set_captions")
            try:
                visitor.predict("cup", {item["file"]: "TOK " * 2**18}, api_name="/set_captions")  # 1 MiB
            except AppError as exc:
                assert "A caption may have at most 3,000 characters" in str(exc)
            else:
                raise AssertionError("a 1 MiB caption was saved")
            [after] = visitor.predict("cup", api_name="/describe_dataset")["items"]
        finally:
            visitor.close()
    assert after["caption"] == "TOK, a red cup"
    dataset_json = next(settings.data_dir.rglob("dataset.json"))
    assert dataset_json.stat().st_size < 10_000


def test_calls_that_write_nothing_leave_no_owner_folder(settings):
    """Each cookie-less or forged-cookie call is an owner of its own, and each once left an empty folder
    (the Compare tab's history, read on load, made one): 20 calls, 20 orphans. A folder is now made by a
    first write only, and empty ones left from before are swept when the app starts."""
    from gradio_client.exceptions import AppError

    from components.identity import VISITOR_COOKIE
    from services.storage.owners import installation_secret
    from tests.browser import launched

    settings = settings.with_(hosted=True)
    installation_secret(settings)
    owners = settings.data_dir / "owners"
    orphan = owners / ("0" * 32)
    (orphan / "results").mkdir(parents=True)  # as the calls below once left them
    kept = owners / ("1" * 32) / "datasets" / "mine" / "dataset.json"
    kept.parent.mkdir(parents=True)
    kept.write_text("{}")
    with launched(settings) as (demo, url):
        assert sorted(owners.iterdir()) == [kept.parents[2]]  # the empty one went, the other is untouched
        loads = [f.api_name for f in demo.fns.values() if f.fn and f.fn.__name__ == "on_load" and not f.inputs]
        assert loads, "the page's load events without inputs (the Compare tab's history among them)"
        forged = Client(url, verbose=False, httpx_kwargs={"cookies": {VISITOR_COOKIE: "a" * 32 + "." + "b" * 32}})
        cookieless = Client(url, verbose=False)
        try:
            for _ in range(5):
                cookieless.cookies.clear()  # a client that keeps no cookie
                for client in (forged, cookieless):
                    for name in loads:
                        client.predict(api_name=f"/{name}")
                    assert client.predict(api_name="/list_datasets") == []
                    assert client.predict(api_name="/list_jobs") == []
                    try:
                        client.predict("someone-elses", api_name="/describe_dataset")
                    except AppError as exc:
                        assert "was not found" in str(exc)
            assert sorted(owners.iterdir()) == [kept.parents[2]]
            cookieless.cookies.clear()
            cookieless.predict("written", api_name="/create_dataset")  # the positive control: a write makes one
            assert len(list(owners.iterdir())) == 2
        finally:
            forged.close()
            cookieless.close()


def test_imported_loras_are_each_visitors_own_and_bad_files_are_refused_before_loading(settings, tmp_path,
                                                                                       monkeypatch):
    """Alice imports a LoRA file; Bob can neither render, export nor list it. A visitor without a Hugging Face
    sign-in can't make the server fetch a Hub repo (the Hub is never asked). An oversize file and a pickle
    are refused before anything is read, and nothing of them is kept."""
    import pytest

    pytest.importorskip("diffusers")
    torch = pytest.importorskip("torch")
    import huggingface_hub
    from gradio_client.exceptions import AppError

    from services.engine import lora_formats as lf
    from tests.test_lora_formats import make_lora

    settings = settings.with_(hosted=True)
    lora = make_lora("flux1", tmp_path / "made")
    pickle = tmp_path / "lora.pt"
    pickle.write_bytes(b"\x80\x04anything")
    hub_asked = []
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda *a, **kw: hub_asked.append(kw) or None)

    def never(*args, **kwargs):
        raise AssertionError("a pickle was unpickled")

    monkeypatch.setattr(torch, "load", never)
    with running_app(settings) as url:
        alice, bob, anonymous = (Client(url, verbose=False) for _ in range(3))
        try:
            mine = alice.predict(handle_file(str(lora)), "", "alices", "", api_name="/import_lora")
            fields = ["a photo of TOK", 5, 0.7, 64, 64]
            _, tuned, details = alice.predict(mine["id"], *fields, api_name="/compare")
            assert details["tuned"]["status"] == "ok" and Path(tuned).is_file()
            for call in (lambda: bob.predict(mine["id"], *fields, api_name="/compare"),
                         lambda: bob.predict(mine["id"], "comfyui", api_name="/export_lora")):
                with pytest.raises(AppError, match="is not one of your fine-tunes"):
                    call()
            assert bob.predict(api_name="/list_loras") == []
            assert [x["id"] for x in alice.predict(api_name="/list_loras")] == [mine["id"]]

            with pytest.raises(AppError, match="needs your own Hugging Face sign-in"):
                anonymous.predict(None, "alice/private-lora", "", "", api_name="/import_lora")
            assert hub_asked == []
            with pytest.raises(AppError, match="is a pickle file, which can run code"):
                anonymous.predict(handle_file(str(pickle)), "", "", "", api_name="/import_lora")
            monkeypatch.setattr(lf, "MAX_LORA_BYTES", lora.stat().st_size - 1)
            with pytest.raises(AppError, match="accepted up to"):
                anonymous.predict(handle_file(str(lora)), "", "", "", api_name="/import_lora")
            assert anonymous.predict(api_name="/list_loras") == []
        finally:
            for client in (alice, bob, anonymous):
                client.close()
    kept = sorted(p.name for p in settings.data_dir.rglob("lora.safetensors"))
    assert kept == ["lora.safetensors"]  # Alice's one import: nothing of the refused files
