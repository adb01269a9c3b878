"""The CometAPI client against the contract-faithful fake (real loopback HTTP), plus edge cases
on ``httpx.MockTransport`` / respx. Backoff sleeps are recorded, never slept."""
from __future__ import annotations

import base64
import email.utils
import hashlib
import io
import json
import logging
import os
import socket
import subprocess
import sys
import time
import tracemalloc
import zipfile
from pathlib import Path

import httpx
import pytest
import respx
from PIL import Image

from services.providers.cometapi.client import CometAPIClient
from services.providers.cometapi.tasks import TaskResult, TaskStatus
from services.config import Secret, Settings
from services.providers.base import TrainRequest
from services.errors import (
    AuthError,
    ConfigError,
    EndpointUnavailableError,
    InputError,
    InsufficientCreditsError,
    ModeratedError,
    NetworkError,
    ProviderError,
    RateLimitedError,
    ResultExpiredError,
    ServerError,
    TaskNotFoundError,
    ValidationError,
    WaitTimeoutError,
)
from tests.conftest import FAKE_COMETAPI_KEY as KEY
from tests.fake_cometapi import FakeCometAPI, sample_colour

ROOT = Path(__file__).resolve().parent.parent
FT = "/flux/v1/finetune"
RESULT = "/flux/v1/get_result"


# --------------------------------------------------------------------------- helpers


class FakeClock:
    """A clock that only moves when the client 'sleeps' (or a test advances it)."""

    def __init__(self, start: float = 1_000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def make_client(url: str, key: str | None = KEY, *, clock: FakeClock | None = None, read: float = 2.0,
                transport: httpx.BaseTransport | None = None, **kw) -> CometAPIClient:
    clock = clock or FakeClock()
    return CometAPIClient(
        url, Secret(key), transport=transport, sleep=clock.sleep, clock=clock, rand=lambda: 0.5,
        timeout=httpx.Timeout(read, connect=2.0), **kw,
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def client(fake_cometapi: FakeCometAPI, clock: FakeClock):
    with make_client(fake_cometapi.url, clock=clock) as c:
        yield c


def jpeg(size=(64, 48), colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG")
    return buf.getvalue()


def dataset_zip(path: Path, images: int = 3, captions: bool = True) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(images):
            zf.writestr(f"img{i}.jpg", jpeg(colour=(i * 40, 90, 160)))
            if captions:
                zf.writestr(f"img{i}.txt", f"a photo of TOK, number {i}")
        if not images:
            zf.writestr("readme.txt", "no images here")
    return path


def ready_finetune(fake: FakeCometAPI) -> str:
    return fake.add_finetune(comment="seeded", ready=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_no_key(*things: object) -> None:
    for thing in things:
        assert KEY not in str(thing) and KEY not in repr(thing), thing


# --------------------------------------------------------------------------- happy paths


def test_submit_finetune_streams_the_zip_with_content_length(client, fake_cometapi, tmp_path):
    zpath = dataset_zip(tmp_path / "ds.zip", images=4)
    progress: list[tuple[int, int]] = []
    finetune_id = client.finetunes.submit(
        zpath, comment="my cat", mode="character", trigger_word="MYCAT", iterations=500,
        finetune_type="lora", lora_rank=16, on_upload_progress=lambda s, t: progress.append((s, t)),
    )
    [rec] = fake_cometapi.requests(FT)
    assert rec.extra["finetune_id"] == finetune_id
    assert rec.extra["file_sha256"] == hashlib.sha256(zpath.read_bytes()).hexdigest()
    assert rec.extra["images"] == 4 and rec.extra["captions"] == 4
    assert int(rec.headers["content-length"]) == rec.body_bytes
    assert "transfer-encoding" not in rec.headers
    assert rec.json["mode"] == "character" and rec.json["trigger_word"] == "MYCAT" and rec.json["lora_rank"] == 16
    assert "learning_rate" not in rec.json_keys and "webhook_url" not in rec.json_keys  # None = server default
    assert progress[0] == (0, rec.body_bytes) and progress[-1] == (rec.body_bytes, rec.body_bytes)
    assert [s for s, _ in progress] == sorted(s for s, _ in progress)


def test_finetune_lifecycle_wait_details_list_delete(client, fake_cometapi, clock, tmp_path):
    fake_cometapi.finetune_pending_polls = 3
    finetune_id = client.finetunes.submit(dataset_zip(tmp_path / "ds.zip"), comment="dogs", mode="general",
                                          learning_rate=2e-5)
    seen: list[TaskResult] = []
    result = client.tasks.wait(finetune_id, on_progress=seen.append)
    assert result.is_ready and result.id == finetune_id
    assert [r.status for r in seen] == ["Pending"] * 3 + ["Ready"]
    assert seen[0].progress is None  # fine-tunes may not report progress at first
    fractions = [r.progress_fraction for r in seen[1:]]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert clock.sleeps == [1.0, 1.5, 2.25]  # rand=0.5 -> no jitter; grows x1.5

    details = client.finetunes.details(finetune_id)
    assert (details.comment, details.mode, details.trigger_word, details.learning_rate) == ("dogs", "general", "TOK", 2e-5)
    assert details.finetune_type == "full" and details.lora_rank == 32 and details.iterations == 300
    assert client.finetunes.list_ids() == [finetune_id]
    deleted = client.finetunes.delete(finetune_id)
    assert deleted["deleted_finetune_id"] == finetune_id
    assert client.finetunes.list_ids() == []


def test_generate_base_and_finetuned_then_download(client, fake_cometapi, tmp_path):
    finetune_id = ready_finetune(fake_cometapi)
    base_id = client.images.generate("flux-pro-1.1", prompt="a TOK cat on a sofa", seed=7, width=512, height=384)
    tuned_id = client.images.generate_finetuned("flux-pro-finetuned", finetune_id, 1.2, prompt="a TOK cat on a sofa",
                                                seed=7, width=512, height=384, steps=30)
    base, tuned = client.tasks.wait(base_id), client.tasks.wait(tuned_id)
    assert base.seed == tuned.seed == 7 and base.prompt == "a TOK cat on a sofa"
    assert base.sample_url and tuned.sample_url and base.duration is not None

    base_img = Image.open(client.images.download_to(base.sample_url, tmp_path / "base.jpeg"))
    out = client.images.download_to(tuned.sample_url, tmp_path / "out" / "tuned.jpeg")
    tuned_img = Image.open(out)
    assert base_img.format == "JPEG" and base_img.size == tuned_img.size == (512, 384)
    assert base_img.getpixel((5, 5)) != tuned_img.getpixel((5, 5))  # the fine-tune changed the image
    rec = fake_cometapi.requests("/flux/v1/flux-pro-finetuned")[0]
    assert rec.json["finetune_id"] == finetune_id and rec.json["finetune_strength"] == 1.2
    # Sample links are signed URLs on a storage host: the key must not go there.
    assert {r.auth for r in fake_cometapi.requests() if r.path.startswith("/samples/")} == {"none"}
    assert not list(out.parent.glob("*.part"))


def test_fake_sample_colour_is_deterministic_and_strength_dependent():
    assert sample_colour("p", 1) == sample_colour("p", 1) != sample_colour("p", 2)
    assert sample_colour("p", 1, "ft", 0.0) == sample_colour("p", 1)
    assert sample_colour("p", 1, "ft", 1.0) != sample_colour("p", 1, "ft", 2.0)


def test_ultra_finetuned_uses_aspect_ratio(client, fake_cometapi, tmp_path):
    finetune_id = ready_finetune(fake_cometapi)
    task = client.images.generate_finetuned("flux-pro-1.1-ultra-finetuned", finetune_id, 0.9, prompt="x", aspect_ratio="9:16")
    img = Image.open(client.images.download_to(client.tasks.wait(task).sample_url, tmp_path / "ultra.jpeg"))
    assert img.height > img.width


def test_chat_completion_captions_an_image(client, fake_cometapi):
    data_url = "data:image/jpeg;base64," + base64.b64encode(jpeg((320, 200))).decode()
    caption = client.chat.complete(
        "gpt-4o-mini",
        [{"role": "user", "content": [{"type": "text", "text": "Caption this."},
                                      {"type": "image_url", "image_url": {"url": data_url}}]}],
        max_tokens=100,
    )
    assert "320x200" in caption and caption.startswith("Image 1")
    rec = fake_cometapi.requests("/v1/chat/completions")[0]
    assert rec.json["max_tokens"] == 100 and rec.auth == "ok"


def test_from_settings(fake_cometapi):
    settings = Settings(cometapi_base_url=fake_cometapi.url, cometapi_key=Secret(KEY))
    with CometAPIClient.from_settings(settings, sleep=lambda s: None) as c:
        assert c.finetunes.list_ids() == []
        assert c.has_key


# --------------------------------------------------------------------------- streaming memory


def test_streamed_upload_of_20mb_zip_stays_small_in_memory(tmp_path):
    """The fake runs in its own process here, so only the client's memory is measured."""
    zpath = tmp_path / "big.zip"
    with zipfile.ZipFile(zpath, "w", zipfile.ZIP_STORED) as zf:
        for i in range(4):  # incompressible, 5 MB each
            zf.writestr(f"img{i}.jpg", os.urandom(5 * 1024 * 1024))
    size = zpath.stat().st_size
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fake_cometapi", "--port", "0", "--key", KEY, "--log-level", "warning"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stdout.readline()
        url = line.split("listening on ", 1)[1].split()[0]
        with make_client(url, read=30.0) as c:
            tracemalloc.start()
            try:
                c.finetunes.submit(zpath, comment="big", mode="style")
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            records = httpx.get(f"{url}/_fake/requests").json()
            # The control routes work across processes too.
            assert httpx.post(f"{url}/_fake/settings", json={"finetune_unavailable": "html"}).status_code == 200
            with pytest.raises(EndpointUnavailableError):
                c.finetunes.list_ids()
            httpx.post(f"{url}/_fake/fault", json={"action": "fail", "path": "/flux/v1/flux-dev", "status": 402})
            with pytest.raises(InsufficientCreditsError):
                c.images.generate("flux-dev", prompt="x")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert peak < size / 5, f"peak {peak} bytes while uploading {size} bytes"
    [rec] = [r for r in records if r["path"] == FT]
    assert rec["extra"]["file_sha256"] == hashlib.sha256(zpath.read_bytes()).hexdigest()
    assert int(rec["headers"]["content-length"]) == rec["body_bytes"] == 14 + 4 * -(-size // 3) + len(
        '","finetune_comment":"big","mode":"style","trigger_word":"TOK","iterations":300,"captioning":true,'
        '"priority":"quality","finetune_type":"full","lora_rank":32}'
    )
    assert "transfer-encoding" not in rec["headers"]


# --------------------------------------------------------------------------- auth & key hygiene


def test_missing_key_fails_before_sending(fake_cometapi):
    with make_client(fake_cometapi.url, key="") as c:
        with pytest.raises(AuthError, match="No CometAPI key is set. Set COMETAPI_KEY or enter a key"):
            c.finetunes.list_ids()
        assert repr(c).endswith("api_key=missing)")
    assert fake_cometapi.requests() == []


def test_wrong_key_is_auth_error(fake_cometapi):
    with make_client(fake_cometapi.url, key="sk-wrong") as c:
        with pytest.raises(AuthError, match="did not accept the API key") as info:
            c.images.generate("flux-dev", prompt="x")
    assert "sk-wrong" not in str(info.value)
    assert [r.auth for r in fake_cometapi.requests()] == ["wrong"]


def test_forbidden_is_auth_error(client, fake_cometapi):
    fake_cometapi.fail_next("/flux/v1/flux-dev", 403)
    with pytest.raises(AuthError, match="403"):
        client.images.generate("flux-dev", prompt="x")


def test_key_never_leaks(fake_cometapi, caplog, tmp_path):
    caplog.set_level(logging.DEBUG)
    errors: list[Exception] = []
    with make_client(fake_cometapi.url) as c:
        assert_no_key(c, c.__dict__)
        # A server that echoes the key back in its error must not get it into our message.
        fake_cometapi.fail_next("/flux/v1/my_finetunes", 401, json={"error": {"message": f"bad token {KEY}"}})
        fake_cometapi.fail_next("/flux/v1/flux-dev", 422, json={"detail": [{"loc": ["body", "prompt"], "msg": KEY}]})
        fake_cometapi.fail_next("/flux/v1/flux-pro", 503, json={"error": {"message": KEY}})
        for call in (c.finetunes.list_ids, lambda: c.images.generate("flux-dev", prompt="x"),
                     lambda: c.images.generate("flux-pro", prompt="x"), lambda: c.tasks.wait("nope")):
            with pytest.raises(ProviderError) as info:
                call()
            errors.append(info.value)
        c.finetunes.submit(dataset_zip(tmp_path / "d.zip"), comment="c", mode="style")
    for err in errors:
        assert_no_key(err, err.args, err.user_message(), getattr(err, "fields", ""))
    assert "[key hidden]" in str(errors[0])
    assert_no_key(*fake_cometapi.requests())
    assert all(r.auth == "ok" for r in fake_cometapi.requests())
    assert_no_key(*(r.getMessage() for r in caplog.records))


def test_client_cannot_be_pickled(client):
    import pickle

    with pytest.raises(TypeError):
        pickle.dumps(client)


# --------------------------------------------------------------------------- validation errors


def test_422_field_messages_from_the_server(client, fake_cometapi):
    with pytest.raises(ValidationError) as info:
        client.images.generate("flux-pro-1.1", prompt="x", width=1000, height=2000)
    assert "multiple of 32" in info.value.fields["width"]
    assert "between 256 and 1440" in info.value.fields["height"]
    assert "width" in str(info.value)

    finetune_id = ready_finetune(fake_cometapi)
    with pytest.raises(ValidationError) as info:
        client.images.generate_finetuned("flux-pro-finetuned", finetune_id, 1.0, prompt="x", steps=99, guidance=9)
    assert set(info.value.fields) == {"steps", "guidance"}


def test_unknown_or_unready_finetune_is_rejected(client, fake_cometapi):
    with pytest.raises(ValidationError) as info:
        client.images.generate_finetuned("flux-pro-finetuned", "no-such-id", 1.0, prompt="x")
    assert "not found" in info.value.fields["finetune_id"]
    pending = fake_cometapi.add_finetune(ready=False)
    with pytest.raises(ValidationError, match="not ready"):
        client.images.generate_finetuned("flux-pro-1.1-ultra-finetuned", pending, 1.0, prompt="x")


def test_400_envelope_with_param(client, fake_cometapi):
    fake_cometapi.fail_next("/v1/chat/completions", 400,
                            json={"error": {"message": "image too large", "type": "comet_api_error",
                                            "param": "messages", "code": "invalid_request"}})
    with pytest.raises(ValidationError) as info:
        client.chat.complete("gpt-4o-mini", [{"role": "user", "content": "hi"}])
    assert info.value.fields == {"messages": "image too large"}
    assert len(fake_cometapi.requests("/v1/chat/completions")) == 1


def test_client_checks_finetune_settings_before_uploading(client, fake_cometapi, tmp_path):
    zpath = dataset_zip(tmp_path / "d.zip")
    with pytest.raises(ValidationError) as info:
        client.finetunes.submit(zpath, comment="", mode="portrait", iterations=5000, lora_rank=8, priority="fast",
                                 learning_rate=1.0, finetune_type="dora")
    assert set(info.value.fields) == {"finetune_comment", "mode", "iterations", "lora_rank", "priority",
                                      "learning_rate", "finetune_type"}
    with pytest.raises(ValidationError, match="Fine-tune strength must be between 0 and 2"):
        client.images.generate_finetuned("flux-pro-finetuned", "id", 2.5, prompt="x")
    with pytest.raises(ValidationError, match="cannot use a fine-tune"):
        client.images.generate_finetuned("flux-dev", "id", 1.0, prompt="x")
    with pytest.raises(ValidationError, match="not a FLUX model"):
        client.images.generate("../v1/chat/completions", prompt="x")
    with pytest.raises(InputError, match="could not be read"):
        client.finetunes.submit(tmp_path / "missing.zip", comment="c", mode="style")
    assert fake_cometapi.requests() == []


def test_client_checks_settings_by_the_apps_rule(client, fake_cometapi, tmp_path):
    """The client applies TrainRequest's rule for training settings: same fields, same advice."""
    settings = dict(mode="style", trigger_word="my dog", iterations=50)
    with pytest.raises(ValidationError) as info:
        client.finetunes.submit(dataset_zip(tmp_path / "d.zip"), comment="c", **settings)
    assert info.value.fields == TrainRequest(name="c", **settings).problems()
    assert set(info.value.fields) == {"trigger_word", "iterations"}
    assert fake_cometapi.requests() == []


def test_server_checks_the_zip(client, fake_cometapi, tmp_path):
    with pytest.raises(ValidationError) as info:
        client.finetunes.submit(dataset_zip(tmp_path / "none.zip", images=0), comment="c", mode="style")
    assert "0" in info.value.fields["file_data"]
    fake_cometapi.max_images = 2
    with pytest.raises(ValidationError, match="1 to 2 images"):
        client.finetunes.submit(dataset_zip(tmp_path / "three.zip", images=3), comment="c", mode="style")
    not_zip = tmp_path / "not.zip"
    not_zip.write_bytes(b"hello, not a zip")
    with pytest.raises(ValidationError, match="not a ZIP"):
        client.finetunes.submit(not_zip, comment="c", mode="style")
    assert fake_cometapi.requests("/flux/v1/my_finetunes") == [] and client.finetunes.list_ids() == []


def test_500_invalid_request_is_not_retried(client, fake_cometapi, clock):
    fake_cometapi.fail_next("/flux/v1/finetune_details", 500, code="invalid_request")
    with pytest.raises(ValidationError, match="unchanged will fail the same way"):
        client.finetunes.details("abc")
    assert len(fake_cometapi.requests("/flux/v1/finetune_details")) == 1 and clock.sleeps == []


# --------------------------------------------------------------------------- credits & rate limits


def test_402_insufficient_credits(client, fake_cometapi):
    fake_cometapi.fail_next("/flux/v1/flux-pro-1.1", 402)
    with pytest.raises(InsufficientCreditsError, match="Add credits"):
        client.images.generate("flux-pro-1.1", prompt="x")


def test_429_on_get_honours_retry_after(client, fake_cometapi, clock):
    task = client.images.generate("flux-dev", prompt="x")
    fake_cometapi.fail_next(RESULT, 429, headers={"Retry-After": "7"}, times=2)
    assert client.tasks.get(task).status == "Pending"
    assert clock.sleeps == [7.0, 7.0]
    assert len(fake_cometapi.requests(RESULT)) == 3


def test_429_retry_after_from_the_bfl_body(client, fake_cometapi, clock):
    fake_cometapi.fail_next("/flux/v1/my_finetunes", 429)  # body says retry_after: 5
    client.finetunes.list_ids()
    assert clock.sleeps == [5.0]


def test_429_that_never_ends_gives_up(client, fake_cometapi, clock):
    fake_cometapi.fail_next("/flux/v1/my_finetunes", 429, headers={"Retry-After": "2"}, times=99)
    with pytest.raises(RateLimitedError) as info:
        client.finetunes.list_ids()
    assert info.value.retry_after == 2.0 and "Wait 2 seconds" in str(info.value)
    assert len(fake_cometapi.requests()) == 5 and clock.sleeps == [2.0] * 4


def test_429_asking_for_too_long_is_raised_at_once(client, fake_cometapi, clock):
    fake_cometapi.fail_next("/flux/v1/my_finetunes", 429, headers={"Retry-After": "3600"})
    with pytest.raises(RateLimitedError) as info:
        client.finetunes.list_ids()
    assert info.value.retry_after == 3600 and clock.sleeps == []


def test_429_with_retry_after_on_a_paid_post_is_sent_again_after_the_wait(client, fake_cometapi, clock):
    """A 429 means nothing was processed: the client waits as told and sends it again itself."""
    fake_cometapi.fail_next("/flux/v1/flux-dev", 429, headers={"Retry-After": "3"})
    assert client.images.generate("flux-dev", prompt="x")
    assert len(fake_cometapi.requests("/flux/v1/flux-dev")) == 2 and clock.sleeps == [3.0]
    assert len(fake_cometapi.task_ids()) == 1  # one paid generation, not two


def test_429_on_a_post_waits_within_a_bounded_total_then_says_so(client, fake_cometapi, clock):
    fake_cometapi.fail_next("/flux/v1/flux-dev", 429, headers={"Retry-After": "50"}, times=99)
    with pytest.raises(RateLimitedError) as info:
        client.images.generate("flux-dev", prompt="x")
    assert clock.sleeps == [50.0, 50.0] and sum(clock.sleeps) <= 120  # max_retry_after in all
    assert len(fake_cometapi.requests("/flux/v1/flux-dev")) == 3 and "Wait 50 seconds" in str(info.value)


# --------------------------------------------------------------------------- server errors


@pytest.mark.parametrize("status", [500, 502, 503, 504, 524])
def test_5xx_on_get_is_retried(client, fake_cometapi, clock, status):
    fake_cometapi.fail_next("/flux/v1/my_finetunes", status, times=2)
    assert client.finetunes.list_ids() == []
    assert len(fake_cometapi.requests()) == 3
    assert clock.sleeps == [0.75, 1.5]  # 1 s, 2 s with rand=0.5 'equal jitter'


@pytest.mark.parametrize("status", [500, 503, 524])
def test_5xx_on_post_is_not_resent(client, fake_cometapi, clock, status, tmp_path):
    fake_cometapi.fail_next("/flux/v1/flux-dev", status)
    with pytest.raises(ServerError, match="may have reached CometAPI"):
        client.images.generate("flux-dev", prompt="x")
    fake_cometapi.fail_next(FT, status)
    with pytest.raises(ServerError, match="My fine-tunes"):
        client.finetunes.submit(dataset_zip(tmp_path / "d.zip"), comment="c", mode="style")
    fake_cometapi.fail_next("/flux/v1/delete_finetune", status)
    with pytest.raises(ServerError):
        client.finetunes.delete("abc")
    assert [r.path for r in fake_cometapi.requests()] == ["/flux/v1/flux-dev", FT, "/flux/v1/delete_finetune"]
    assert clock.sleeps == []


def test_5xx_that_never_ends_gives_up(client, fake_cometapi):
    fake_cometapi.fail_next(RESULT, 503, times=99)
    with pytest.raises(ServerError, match="Wait a minute"):
        client.tasks.get("abc")
    assert len(fake_cometapi.requests()) == 5


def test_chat_completion_is_retried_like_a_read(client, fake_cometapi, clock):
    fake_cometapi.fail_next("/v1/chat/completions", 503)
    assert client.chat.complete("m", [{"role": "user", "content": "hi"}])
    assert len(fake_cometapi.requests()) == 2


# --------------------------------------------------------------------------- network faults


def test_read_timeout_on_get_is_retried(fake_cometapi, clock):
    with make_client(fake_cometapi.url, clock=clock, read=0.2) as c:
        fake_cometapi.delay_next("/flux/v1/my_finetunes", 0.6)
        assert c.finetunes.list_ids() == []
    assert len(fake_cometapi.requests()) == 2 and len(clock.sleeps) == 1


def test_read_timeout_on_post_is_not_resent(fake_cometapi, clock):
    with make_client(fake_cometapi.url, clock=clock, read=0.2) as c:
        fake_cometapi.delay_next("/flux/v1/flux-dev", 0.5)
        with pytest.raises(NetworkError, match="may have reached CometAPI") as info:
            c.images.generate("flux-dev", prompt="x")
    assert "did not answer" in str(info.value)
    assert len(fake_cometapi.requests("/flux/v1/flux-dev")) == 1 and clock.sleeps == []
    # The server did start the job after all: exactly why it must not be re-sent.
    assert fake_cometapi.wait_for_tasks(1), "the delayed request never created its task"
    assert len(fake_cometapi.task_ids()) == 1 and len(fake_cometapi.requests("/flux/v1/flux-dev")) == 1


def test_connection_reset_on_get_is_retried(client, fake_cometapi, clock):
    fake_cometapi.reset_next("/flux/v1/my_finetunes")
    assert client.finetunes.list_ids() == []
    assert len(fake_cometapi.requests()) == 2 and clock.sleeps == [0.75]


def test_connection_reset_on_upload_is_not_resent(client, fake_cometapi, clock, tmp_path):
    fake_cometapi.reset_next(FT)
    with pytest.raises(NetworkError, match="may have reached CometAPI") as info:
        client.finetunes.submit(dataset_zip(tmp_path / "d.zip"), comment="c", mode="style")
    assert "closed before the answer" in str(info.value)
    assert len(fake_cometapi.requests(FT)) == 1 and clock.sleeps == []
    assert len(client.finetunes.list_ids()) == 1  # the job exists: re-sending would have made two


def test_unreachable_server(clock):
    with make_client(f"http://127.0.0.1:{free_port()}", clock=clock) as c:
        with pytest.raises(NetworkError, match="Could not reach CometAPI") as info:
            c.finetunes.list_ids()
        assert "COMETAPI_BASE_URL" in str(info.value) and len(clock.sleeps) == 4
        # Connecting failed, so nothing was sent: a POST may be retried too.
        clock.sleeps.clear()
        with pytest.raises(NetworkError, match="could not connect"):
            c.images.generate("flux-dev", prompt="x")
        assert clock.sleeps == [0.75, 1.5, 3.0, 6.0]


def test_post_is_resent_only_when_the_connection_failed_first():
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if len(calls) == 1:
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(200, json={"id": "t1", "polling_url": "x"})

    with make_client("https://api.example", transport=httpx.MockTransport(handler)) as c:
        assert c.images.generate("flux-dev", prompt="x") == "t1"
    assert calls == ["/flux/v1/flux-dev"] * 2


def test_upload_progress_callback_can_cancel(client, fake_cometapi, tmp_path):
    class Cancelled(Exception):
        pass

    def cancel(sent: int, total: int) -> None:
        if sent > 0:
            raise Cancelled

    with pytest.raises(Cancelled):
        client.finetunes.submit(dataset_zip(tmp_path / "d.zip"), comment="c", mode="style", on_upload_progress=cancel)
    assert client.finetunes.list_ids() == []


# --------------------------------------------------------------------------- endpoint unavailable


FINETUNE_CALLS = {
    "submit": lambda c, z: c.finetunes.submit(z, comment="c", mode="style"),
    "details": lambda c, z: c.finetunes.details("abc"),
    "list": lambda c, z: c.finetunes.list_ids(),
    "delete": lambda c, z: c.finetunes.delete("abc"),
    "generate": lambda c, z: c.images.generate_finetuned("flux-pro-finetuned", "abc", 1.1, prompt="x"),
}


@pytest.mark.parametrize("mode", ["404", "301", "html", "no_channel"])
@pytest.mark.parametrize("call", sorted(FINETUNE_CALLS))
def test_finetune_unavailable_is_explained(client, fake_cometapi, clock, tmp_path, mode, call):
    fake_cometapi.finetune_unavailable = mode
    with pytest.raises(EndpointUnavailableError) as info:
        FINETUNE_CALLS[call](client, dataset_zip(tmp_path / "d.zip"))
    text = str(info.value)
    assert "does not exist or is switched off" in text
    assert "temporarily unavailable" in text and "Local engine" in text
    assert {"301": "redirect", "html": "web page", "no_channel": "no provider serves"}.get(mode, "404") in text
    assert len(fake_cometapi.requests()) == 1 and clock.sleeps == []  # not retried


def test_unknown_model_is_unavailable_not_finetune(client, fake_cometapi):
    with pytest.raises(EndpointUnavailableError) as info:
        client.images.generate("flux-nonexistent", prompt="x")
    assert "COMETAPI_BASE_URL" in str(info.value) and "Local engine" not in str(info.value)


@pytest.mark.parametrize("status", [200, 404])
def test_a_web_page_on_a_generation_route_is_passing_until_it_repeats(client, fake_cometapi, status):
    """A gateway's one-off web page is not a retired model: the next call works. Only a page
    answered twice in a row says the model may be gone."""
    fake_cometapi.fail_next("/flux/v1/flux-dev", status, text="<html><body>Welcome</body></html>")
    with pytest.raises(ServerError, match="with a web page.*passing fault") as once:
        client.images.generate("flux-dev", prompt="x")
    assert "retired" not in str(once.value) and "may have reached CometAPI" in str(once.value)
    assert client.images.generate("flux-dev", prompt="x")  # the next call works
    fake_cometapi.fail_next("/flux/v1/flux-dev", status, text="<html><body>Welcome</body></html>", times=2)
    with pytest.raises(ServerError):
        client.images.generate("flux-dev", prompt="x")
    with pytest.raises(EndpointUnavailableError, match="web page") as twice:
        client.images.generate("flux-dev", prompt="x")
    assert "may have retired this model" in str(twice.value)
    assert len(fake_cometapi.requests("/flux/v1/flux-dev")) == 4  # a paid POST is never re-sent by itself


def test_a_poll_answered_by_a_passing_web_page_asks_again(client, fake_cometapi):
    task = client.images.generate("flux-dev", prompt="x")
    fake_cometapi.fail_next(RESULT, 200, text="<html><body>Welcome</body></html>")
    assert client.tasks.wait(task).is_ready
    fake_cometapi.fail_next(RESULT, 200, text="<html><body>Welcome</body></html>", times=2)
    with pytest.raises(EndpointUnavailableError, match="may have retired"):
        client.tasks.get(task)


def test_unknown_finetune_id_is_task_not_found(client, fake_cometapi):
    with pytest.raises(TaskNotFoundError, match="does not know fine-tune 'nope'"):
        client.finetunes.details("nope")
    with pytest.raises(TaskNotFoundError, match="already deleted"):
        client.finetunes.delete("nope")


# --------------------------------------------------------------------------- task outcomes


def test_request_moderated(client, fake_cometapi):
    task = client.images.generate("flux-pro-1.1", prompt="something FORBIDDEN here")
    assert client.tasks.get(task).status == TaskStatus.REQUEST_MODERATED  # get_result reports, never raises
    with pytest.raises(ModeratedError, match="Request Moderated") as info:
        client.tasks.wait(task)
    assert info.value.kind == "request"


def test_content_moderated(client, fake_cometapi):
    task = client.images.generate("flux-pro-1.1", prompt="a calm lake", seed=fake_cometapi.content_moderation_seed)
    with pytest.raises(ModeratedError, match="finished image") as info:
        client.tasks.wait(task)
    assert info.value.kind == "content"


def test_task_error_carries_the_message(client, fake_cometapi):
    task = client.images.generate("flux-dev", prompt="please explode")
    with pytest.raises(ProviderError, match="worker crashed") as info:
        client.tasks.wait(task)
    assert type(info.value) is ProviderError


def test_failed_finetune(client, fake_cometapi, tmp_path):
    finetune_id = client.finetunes.submit(dataset_zip(tmp_path / "d.zip"), comment="c", mode="style")
    fake_cometapi.set_status(finetune_id, "Error", "Training diverged")
    with pytest.raises(ProviderError, match="Training diverged"):
        client.tasks.wait(finetune_id)


def test_task_not_found(client, fake_cometapi):
    assert client.tasks.get("nope").status == TaskStatus.NOT_FOUND
    with pytest.raises(TaskNotFoundError, match="Task not found"):
        client.tasks.wait("nope")


def test_wait_rides_out_a_longer_outage(client, fake_cometapi, clock):
    task = client.images.generate("flux-dev", prompt="x")
    fake_cometapi.fail_next(RESULT, 503, times=7)  # more than one get_result's own retries
    assert client.tasks.wait(task).is_ready
    assert len(fake_cometapi.requests(RESULT)) == 7 + 3


def test_wait_gives_up_on_an_outage_at_the_deadline(client, fake_cometapi, clock):
    fake_cometapi.fail_next(RESULT, 503, times=999)
    with pytest.raises(ServerError):
        client.tasks.wait("t", timeout=60)
    assert 60 <= sum(clock.sleeps) < 120


def test_wait_times_out(client, fake_cometapi, clock):
    fake_cometapi.pending_polls = 1000
    task = client.images.generate("flux-dev", prompt="x")
    with pytest.raises(WaitTimeoutError, match="still pending after 30 seconds"):
        client.tasks.wait(task, timeout=30)
    assert sum(clock.sleeps) == pytest.approx(30)
    assert max(clock.sleeps) <= 10.0  # polling interval capped


def test_expired_sample_link(client, fake_cometapi, tmp_path):
    now = [5_000.0]
    fake_cometapi.clock = lambda: now[0]
    result = client.tasks.wait(client.images.generate("flux-dev", prompt="x"))
    now[0] += 599
    assert client.images.download_to(result.sample_url, tmp_path / "a.jpeg").read_bytes()[:2] == b"\xff\xd8"  # JPEG
    now[0] += 2
    with pytest.raises(ResultExpiredError, match="expired") as info:
        client.images.download_to(result.sample_url, tmp_path / "b.jpeg")
    assert "403" in str(info.value) and "Generate the image again" in str(info.value)
    with pytest.raises(ResultExpiredError, match="404"):
        client.images.download_to(fake_cometapi.url + "/samples/unknown.jpeg", tmp_path / "c.jpeg")


# --------------------------------------------------------------------------- MockTransport / respx edges


def mock_client(handler, **kw) -> tuple[CometAPIClient, FakeClock]:
    clock = FakeClock()
    return make_client("https://api.example", clock=clock, transport=httpx.MockTransport(handler), **kw), clock


def test_malformed_json_on_2xx_is_unavailable():
    c, _ = mock_client(lambda r: httpx.Response(200, content=b'{"finetunes": [', headers={"content-type": "application/json"}))
    with c, pytest.raises(EndpointUnavailableError, match="not JSON"):
        c.finetunes.list_ids()


def test_retry_after_as_http_date():
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    answers = iter([httpx.Response(429, headers={"Retry-After": when}), httpx.Response(200, json={"finetunes": ["a"]})])
    c, clock = mock_client(lambda r: next(answers))
    with c:
        assert c.finetunes.list_ids() == ["a"]
    assert len(clock.sleeps) == 1 and 27 <= clock.sleeps[0] <= 31


def test_get_result_404_json_task_not_found_and_percent_progress():
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.params["id"] == "gone":
            return httpx.Response(404, json={"id": "gone", "status": "Task not found"})
        return httpx.Response(200, json={"id": "t", "status": "Pending", "progress": 40})

    c, _ = mock_client(handler)
    with c:
        assert c.tasks.get("gone").status == TaskStatus.NOT_FOUND
        assert c.tasks.get("t").progress_fraction == pytest.approx(0.4)


def test_route_404_on_get_result_is_unavailable():
    c, _ = mock_client(lambda r: httpx.Response(404, json={"detail": "Not Found"}))
    with c, pytest.raises(EndpointUnavailableError):
        c.tasks.get("t")


def test_302_is_not_followed():
    c, _ = mock_client(lambda r: httpx.Response(302, headers={"Location": "https://www.cometapi.com/login"}))
    with c, pytest.raises(EndpointUnavailableError, match="redirect .*www.cometapi.com"):
        c.finetunes.list_ids()


@respx.mock
def test_respx_submit_without_finetune_id_and_chat_parts(tmp_path):
    respx.post("https://api.example/flux/v1/finetune").mock(return_value=httpx.Response(200, json={"status": "ok"}))
    respx.post("https://api.example/v1/chat/completions").mock(return_value=httpx.Response(200, json={
        "choices": [{"message": {"role": "assistant", "content": [{"type": "text", "text": "a red "},
                                                                  {"type": "text", "text": "square"}]}}]}))
    with make_client("https://api.example") as c:
        with pytest.raises(ProviderError, match="did not say which fine-tune"):
            c.finetunes.submit(dataset_zip(tmp_path / "d.zip"), comment="c", mode="style")
        assert c.chat.complete("m", [{"role": "user", "content": "hi"}]) == "a red square"
    sent = respx.calls[0].request
    assert sent.headers["authorization"] == f"Bearer {KEY}"
    body = json.loads(sent.read())
    assert zipfile.ZipFile(io.BytesIO(base64.b64decode(body["file_data"]))).namelist()[0] == "img0.jpg"


def test_empty_chat_answer_is_an_error():
    c, _ = mock_client(lambda r: httpx.Response(200, json={"choices": [{"message": {"content": "  "}}]}))
    with c, pytest.raises(ProviderError, match="empty answer"):
        c.chat.complete("m", [{"role": "user", "content": "hi"}])


def test_413_names_the_file():
    c, _ = mock_client(lambda r: httpx.Response(413, text="too big"))
    with c, pytest.raises(ValidationError) as info:
        c.finetunes.delete("x")
    assert "file_data" in info.value.fields


def test_bad_base_url_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="COMETAPI_BASE_URL"):
        CometAPIClient("api.cometapi.com", Secret(KEY))
    with pytest.raises(InputError):
        make_client("https://api.example").images.download_to("file:///etc/passwd", tmp_path / "passwd")


def test_download_answering_html_is_expired(tmp_path):
    c, _ = mock_client(lambda r: httpx.Response(200, html="<html>Sign in</html>"))
    with c, pytest.raises(ResultExpiredError, match="web page"):
        c.images.download_to("https://cdn.example/sample.jpeg", tmp_path / "sample.jpeg")


class _StorageHost:
    """A loopback 'storage host' for result links: /moved redirects to /image, which streams a body
    (chunked, no Content-Length) of ``size`` bytes; it counts how many bytes it managed to send."""

    def __init__(self, size: int) -> None:
        import http.server
        import threading

        host = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                if self.path == "/moved":
                    self.send_response(302)
                    self.send_header("Location", "/image")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                chunk = b"\xff" * 65536
                try:
                    while host.sent < host.size:
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        host.sent += len(chunk)
                    self.wfile.write(b"0\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        self.size, self.sent = size, 0
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="test-storage-host")
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


def test_a_download_follows_redirects_streams_to_disk_and_stops_at_the_cap(tmp_path):
    host = _StorageHost(size=256 * 2**20)  # it would send 256 MiB
    try:
        with make_client("https://api.example") as c:
            with pytest.raises(ProviderError, match="larger than 1 MB"):
                c.images.download_to(f"{host.url}/moved", tmp_path / "big.jpg", max_bytes=2**20)
        assert not (tmp_path / "big.jpg").exists() and list(tmp_path.iterdir()) == []  # no partial file
        assert host.sent < 32 * 2**20  # it stopped reading at the cap, not at the end
        host.size, host.sent = 300_000, 0
        with make_client("https://api.example") as c:
            path = c.images.download_to(f"{host.url}/moved", tmp_path / "ok.jpg")
        assert path.stat().st_size == 300_000 // 65536 * 65536 + (65536 if 300_000 % 65536 else 0)
    finally:
        host.close()


def test_api_calls_never_follow_a_redirect():
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        return httpx.Response(302, headers={"Location": "https://elsewhere.example/steal"})

    with make_client("https://api.example", transport=httpx.MockTransport(handler)) as c:
        with pytest.raises(ProviderError):
            c.finetunes.list_ids()
    assert "/steal" not in seen
