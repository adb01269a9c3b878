"""A studio on the tiny FLUX.1 model with one ready local fine-tune, for the tests of what is done with one
(export, import, the pages' downloads). The run is 30 steps, recorded as ``Studio.launch`` records a job
(launch itself takes 100 steps at least: too slow for a test).

A test module imports the fixtures ``trained`` (one run per module) and ``studio`` (the trained studio, its
imported LoRAs removed after each test)."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from services.config import Settings
from services.providers.base import TrainRequest
from services.providers.huggingface.provider import HuggingFaceProvider
from services.providers.local.base_models import LocalOptions
from services.providers.local.provider import LocalProvider
from services.storage.owners import LOCAL_OWNER
from services.studio import Studio
from tests.imagefactory import training_zip


@contextmanager
def studio_with_a_finetune(root: Path, tag: str) -> Iterator[tuple[Studio, str, str]]:
    """(studio, job id, the local engine's id of its fine-tune); the studio has the local engine and Hugging Face."""
    settings = Settings(data_dir=root / "data", workers=2)
    local = LocalProvider(settings, steps_per_sample=30, checkpoint_every=30)
    studio = Studio(settings, providers={"local": local, "huggingface": HuggingFaceProvider(settings)},
                    background=False)
    try:
        request = TrainRequest(name="cup-v1", mode="product", trigger_word="TOK", iterations=30, learning_rate=1e-2,
                               lora_rank=16, options=LocalOptions())
        remote_id = local.submit(training_zip(root / "ds.zip"), request, tag=tag)
        assert local.join(remote_id, 120) and local.status(remote_id).state == "ready"
        job = studio.jobs.create(LOCAL_OWNER, "local", "finetune", "cup-v1", "cups", "h", request.record())
        studio.jobs.update(LOCAL_OWNER, job.id, remote_id=remote_id, status="ready",
                           result={"finetune_id": remote_id})
        yield studio, job.id, remote_id
    finally:
        studio.close()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, request):
    """(studio, job id, fine-tune id) of one ready tiny fine-tune, trained once for the requesting module."""
    # The module's name as the job's tag: each module's fine-tune is a LoRA of its own in the shared pipelines.
    tag = request.module.__name__.rpartition(".")[2]
    with studio_with_a_finetune(tmp_path_factory.mktemp("finetune"), tag) as trained:
        yield trained


@pytest.fixture
def studio(trained):
    """The trained studio, its imported LoRAs removed after each test."""
    studio = trained[0]
    yield studio
    for lora in studio.imported_loras():
        studio.delete_imported(lora)
