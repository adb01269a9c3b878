"""A fake Hugging Face for tests: an autospec'd ``HfApi`` with a little state (jobs, their stages and
logs, a repo's files) and the Jobs hardware catalogue, shared by the provider's tests and the browser's."""
from __future__ import annotations

import importlib
from datetime import datetime, timedelta, timezone
from pathlib import Path
from unittest.mock import create_autospec

from huggingface_hub import HfApi, JobHardwareInfo, JobInfo
from huggingface_hub.errors import HfHubHTTPError

from services.providers.base import job_tag

# Looks like a real token on purpose, so that the checks that it never leaks mean something.
TOKEN = "hf_FAKEtokenAbCdEf0123456789SECRETxyz"
NS = "alice"
JOB_ID = "0123456789abcdef0123456789abcdef"  # our job id (TrainingService's are uuid4 hex)
TAG = job_tag(JOB_ID)
REMOTE = f"hf-job:{NS}/{TAG}"
REPO = f"{NS}/flux-lora-mug-v1-{TAG}"
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def _hw(name: str, model: str | None, vram: str = "", usd_h: float = 1.0, ram: str = "62 GB", qty: str = "1"):
    acc = {"type": "gpu", "model": model, "quantity": qty, "vram": vram, "manufacturer": "Nvidia"} if model else None
    return JobHardwareInfo(name=name, prettyName=name, cpu="8 vCPU", ram=ram, accelerator=acc,
                           unitCostMicroUSD=round(usd_h / 60 * 1e6), unitCostUSD=usd_h / 60, unitLabel="minute")


# Hugging Face Jobs' flavours as list_jobs_hardware answers (prices as published when written).
CATALOGUE = [
    _hw("cpu-basic", None, usd_h=0.01, ram="16 GB"),
    _hw("t4-small", "T4", "16 GB", 0.40, ram="15 GB"),
    _hw("a10g-small", "A10G", "24 GB", 1.00, ram="15 GB"),
    _hw("a10g-large", "A10G", "24 GB", 1.50, ram="46 GB"),
    _hw("l4x1", "L4", "24 GB", 0.80, ram="30 GB"),
    _hw("l40sx1", "L40S", "48 GB", 1.80, ram="62 GB"),
    _hw("a100-large", "A100", "80 GB", 2.50, ram="142 GB"),
    _hw("a100x4", "A100", "80 GB", 10.00, ram="568 GB", qty="4"),
    _hw("h200", "H200", "141 GB", 5.00, ram="256 GB"),
]


def _content(op) -> bytes:
    """What a CommitOperationAdd uploads."""
    src = op.path_or_fileobj
    return src if isinstance(src, bytes) else Path(src).read_bytes()


def _http_error(code: int, message: str = "", cls=HfHubHTTPError):
    response_cls = importlib.import_module("huggingface_hub.errors").Response
    http = importlib.import_module(response_cls.__module__.split(".")[0])
    request = http.Request("POST", f"https://huggingface.co/api/jobs/{NS}")
    return cls(f"{code} Client Error: {message}", response=response_cls(code, request=request), server_message=message)


class Hub:
    """An autospec'd HfApi with a little state: the jobs it started, their stages and logs, the repo's files."""

    def __init__(self, tmp: Path) -> None:
        self.api = create_autospec(HfApi, instance=True)
        self.specs: dict[str, dict] = {}  # HF job id -> what run_uv_job was given
        self.stage: dict[str, tuple[str, str | None]] = {}
        self.logs: dict[str, list[str]] = {}
        self.repo_files: dict[str, bytes] = {}
        self.fail_after_run: Exception | None = None
        api = self.api
        api.whoami.return_value = {"name": NS}
        api.list_jobs_hardware.return_value = CATALOGUE
        api.run_uv_job.side_effect = self._run
        api.list_jobs.side_effect = self._list
        api.inspect_job.side_effect = lambda *, job_id, namespace=None, token=None: self._info(job_id)
        api.fetch_job_logs.side_effect = \
            lambda *, job_id, namespace=None, follow=False, tail=None, token=None: iter(list(self.logs[job_id]))
        api.cancel_job.side_effect = self._cancel
        api.hf_hub_download.side_effect = self._download

    def _run(self, script, **kw):
        job_id = f"hfjob{len(self.specs) + 1:03d}"
        self.specs[job_id] = {"script": script, **kw}
        self.stage[job_id] = ("SCHEDULING", None)
        self.logs[job_id] = []
        if self.fail_after_run is not None:
            raise self.fail_after_run  # created on the Hub, but the answer never arrived
        return self._info(job_id)

    def _info(self, job_id: str) -> JobInfo:
        if job_id not in self.specs:
            raise _http_error(404, "Job not found")
        spec = self.specs[job_id]
        stage, message = self.stage[job_id]
        n = int(job_id[-3:])
        return JobInfo(id=job_id, createdAt=(T0 + timedelta(minutes=n)).isoformat().replace("+00:00", "Z"),
                       owner={"id": "u1", "name": NS, "type": "user"}, flavor=spec["flavor"],
                       labels=spec["labels"], status={"stage": stage, "message": message},
                       dockerImage="ghcr.io/astral-sh/uv:python3.12-bookworm")

    def _list(self, *, status=None, labels=None, timeout=None, namespace=None, token=None):
        for job_id, spec in self.specs.items():
            if all(spec["labels"].get(k) == v for k, v in (labels or {}).items()):
                yield self._info(job_id)

    def _cancel(self, *, job_id, namespace=None, token=None):
        self.stage[job_id] = ("CANCELED", None)

    def _download(self, repo_id, filename, *, repo_type=None, local_dir=None, **kw):
        target = Path(local_dir) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(self.repo_files[f"{repo_id}/{filename}"])
        return str(target)

    @property
    def only_job(self) -> str:
        [job_id] = self.specs
        return job_id

    def say(self, job_id: str, *lines: str) -> None:
        """The job prints these lines (after a timestamp, as HF's log service may show them)."""
        self.logs[job_id] += [f"2026-01-01T00:00:00Z {ln}" for ln in lines]
