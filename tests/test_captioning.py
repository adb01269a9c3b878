"""Auto-captioning through the chat endpoint of the fake CometAPI."""
from __future__ import annotations

import pytest

from services.captioning import Captioner, clean_caption, instruction
from services.providers.cometapi.client import CometAPIClient
from services.config import Secret
from services.errors import InputError
from tests import imagefactory as fx
from tests.conftest import FAKE_COMETAPI_KEY


def _captioner(fake, key=FAKE_COMETAPI_KEY, concurrency=3) -> Captioner:
    return Captioner(lambda: CometAPIClient(fake.url, Secret(key), sleep=lambda s: None, rand=lambda: 0.5),
                     "gpt-4o-mini", concurrency)


@pytest.fixture
def dataset(store, tmp_path):
    name = store.create("cups").name
    store.add_files(name, fx.good_set(tmp_path / "g", count=5, size=(640, 480)))
    store.set_trigger_word(name, "CUP")
    return name


def test_captions_every_image_with_trigger_first(store, dataset, fake_cometapi):
    seen = []
    report = _captioner(fake_cometapi).caption_dataset(store, dataset, mode="product", only_empty=False,
                                                       progress=lambda d, t, m: seen.append((d, t)))
    assert len(report.captioned) == 5 and not report.failed
    ds = store.open(dataset)
    for item in ds.items:
        assert item.caption.startswith("CUP, ")
        assert f"{item.width}x{item.height} photo" in item.caption  # the model saw this very image
    assert seen[-1] == (5, 5)
    sent = fake_cometapi.requests("/v1/chat/completions")
    assert len(sent) == 5 and sent[0].json["model"] == "gpt-4o-mini"


def test_only_empty_keeps_existing_captions(store, dataset, fake_cometapi):
    store.set_captions(dataset, {"photo_00.jpg": "CUP, my own words"})
    report = _captioner(fake_cometapi).caption_dataset(store, dataset, mode="product", only_empty=True)
    assert report.skipped == ["photo_00.jpg"] and len(report.captioned) == 4
    assert store.open(dataset).items[0].caption == "CUP, my own words"
    assert len(fake_cometapi.requests("/v1/chat/completions")) == 4


def test_one_failure_leaves_other_captions(store, dataset, fake_cometapi):
    fake_cometapi.fail_next("/v1/chat/completions", status=400, times=1)
    report = _captioner(fake_cometapi, concurrency=1).caption_dataset(store, dataset, mode="general", only_empty=False)
    assert len(report.failed) == 1 and len(report.captioned) == 4
    failed = next(iter(report.failed))
    captions = {i.file: i.caption for i in store.open(dataset).items}
    assert captions[failed] == "" and all(c for f, c in captions.items() if f != failed)


def test_bad_key_stops_early_with_reason(store, dataset, fake_cometapi):
    report = _captioner(fake_cometapi, key="sk-wrong", concurrency=1).caption_dataset(
        store, dataset, mode="general", only_empty=False)
    assert report.stopped and "key" in report.stopped.lower()
    assert len(fake_cometapi.requests("/v1/chat/completions")) < 5
    assert all(i.caption == "" for i in store.open(dataset).items)


def test_instruction_and_cleaning():
    assert "in the style of ZZ" in instruction("style", "ZZ")
    assert "product called ZZ" in instruction("product", "ZZ")
    with pytest.raises(InputError):
        instruction("anime", "ZZ")
    assert clean_caption('Caption: "a cup on a table"\n', "CUP") == "CUP, a cup on a table"
    assert clean_caption("  ", "CUP") == ""


def test_empty_dataset_refused(store, fake_cometapi):
    name = store.create("empty").name
    with pytest.raises(InputError, match="no images"):
        _captioner(fake_cometapi).caption_dataset(store, name, mode="general")
