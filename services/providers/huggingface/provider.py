"""Hugging Face as a ``Provider``: trains on Hugging Face Jobs, generates through Inference Providers.

Everything runs on the user's own Hugging Face account and is billed there: a job's GPU time (at the
flavour's price, until it ends or ``FLUX_HF_JOB_TIMEOUT``) and each image from an inference provider.
Locally that account is HF_TOKEN's (or the saved ``hf auth login``'s); hosted, only a signed-in visitor's
own token: the app-wide provider of a Space holds no token at all, so the Space's owner never pays.

A launch uploads the dataset, the config and the project's code to the private dataset repo
``<user>/flux-studio-data``, creates the private model repo for the result and starts a job labelled
with the app's job tag; the trainer pushes samples, checkpoints and the LoRA to that repo as it goes.
Progress is read back from the job's logs (the trainer's JSON progress lines, ``engine.events``).
See ``jobs`` for the remote id and fine-tune id formats.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from services.config import Secret, Settings
from services.errors import AuthError, InputError, NotServedError, ProviderError, TaskNotFoundError
from services.providers.base import (CostEstimate, Credentials, GeneratedImage, GenerateRequest, HardwareOption,
                                     ProgressFn, ProviderBase, ProviderInfo, TrainRequest, TrainStatus, job_tag)
from services.providers.huggingface import hardware, inference, jobs, package
from services.providers.huggingface.hub import HOSTED_SIGN_IN, LOCAL_NO_TOKEN, call, make_api, resolve_token
from services.providers.local.base_models import BaseModels, EngineOptions
from services.engine import events, memory, models
from services.engine.hub import scrub

log = logging.getLogger("flux_studio.huggingface")

ACTIVE_STAGES = ("SCHEDULING", "RUNNING")
PRESET_LABEL = "flux-studio-preset"  # the memory preset a job trains with (a resume installs the same packages)
SERVING_TTL_S = 300.0  # how long who serves an adapter is remembered (making a repo public shows within minutes)
# A running job's log is read at most this often: a read without following waits for the log service
# (~5 s), and the tracker polls every few seconds, every job in turn.
LOG_EVERY_S = 10.0
SAMPLES_DIR = "hf_jobs"  # under the data dir: <tag>/samples/..., each sample downloaded once

InferenceFactory = Callable[[str, str], object]  # (provider, token) -> InferenceClient


@dataclass(frozen=True)
class HuggingFaceOptions(EngineOptions):
    """A Hugging Face job's: the trainer's, and the Jobs flavour to train on ("" = the cheapest that fits)."""

    hardware: str = ""


def default_inference_factory(provider: str, token: str):
    from huggingface_hub import InferenceClient

    return InferenceClient(provider=provider, api_key=token)


class HuggingFaceProvider(ProviderBase):
    """Resumable (checkpoints live in the model repo), hardware picked per job at a price, no base-model
    picker (``FLUX_HF_BASE_MODEL``), publishing not needed (the result is a Hub repo already)."""

    key = "huggingface"
    label = "Hugging Face"
    max_images = 50
    can_resume = True
    picks_hardware = True
    reports_steps = True

    def __init__(self, settings: Settings, *, token: Secret | None = None, api=None,
                 inference_factory: InferenceFactory | None = None,
                 clock: Callable[[], float] = time.monotonic, log_every_s: float = LOG_EVERY_S) -> None:
        """``token``: a signed-in visitor's own; None = HF_TOKEN or the saved login locally, none hosted.
        ``api`` (an ``HfApi``) and ``inference_factory`` are for tests; by default both act with the token."""
        self.settings = settings
        self._token = resolve_token(settings, token)
        self._api = api
        self._inference_factory = inference_factory or default_inference_factory
        self._clock = clock
        self._lock = threading.Lock()
        self._namespace: str | None = None
        self._current: dict[str, str] = {}  # remote id -> the HF job id of its newest attempt
        self._finished: dict[str, tuple[events.RunLog, list[str]]] = {}  # HF job id -> its final log
        self._log_every_s = log_every_s
        self._recent: dict[str, tuple[float, tuple[events.RunLog, list[str]]]] = {}  # HF job id -> (when, log)
        self._served: dict[str, tuple[float, inference.Serving]] = {}
        self.base_models = BaseModels(settings, settings.hf_base_model)
        self.catalogue = hardware.Catalogue(lambda: self._hub("jobs", lambda api: api.list_jobs_hardware()),
                                            clock=clock)

    def __repr__(self) -> str:
        return f"HuggingFaceProvider(token={self._token!r})"

    # ------------------------------------------------------------ account

    @property
    def api(self):
        if not self._token:
            raise AuthError(self.readiness()[1])
        if self._api is None:
            self._api = make_api(self._token)
        return self._api

    def _hub(self, action: str, fn: Callable, what: str = ""):
        return call(action, self._token, lambda: fn(self.api), what)

    @property
    def namespace(self) -> str:
        if self._namespace is None:
            self._namespace = str(self._hub("read", lambda api: api.whoami())["name"])
        return self._namespace

    def readiness(self) -> tuple[bool, str]:
        if not self._token:
            return False, HOSTED_SIGN_IN if self.settings.hosted else LOCAL_NO_TOKEN
        return True, ""

    def _require_ready(self) -> None:
        ok, why = self.readiness()
        if not ok:
            raise AuthError(why)

    # ------------------------------------------------------------ base model and hardware

    @property
    def base_spec(self) -> str:
        return models.default_choice(self.settings.hf_base_model)

    @property
    def model_label(self) -> str:
        return f"{self.base_models.label_of(self.base_spec)} on Hugging Face Jobs"

    def base_model_of(self, finetune_id: str) -> str | None:
        return self.settings.hf_base_model

    def compare_models(self, tuned_model: str | None) -> tuple[str, str]:
        """(base, tuned): the base model, and the model a fine-tune's LoRA is applied to (the same one)."""
        return self.settings.hf_base_model, tuned_model or self.settings.hf_base_model

    def _config(self, request: TrainRequest, preset: memory.MemoryPreset | None) -> dict:
        """The trainer's config (the local engine's one rule), sampling and checkpointing every
        ``FLUX_HF_CHECKPOINT_EVERY`` steps, with the preset the machine was picked for."""
        every = self.settings.hf_checkpoint_every
        config = self.base_models.job_config(request, self.base_spec, steps_per_sample=every, checkpoint_every=every)
        if preset is not None:
            config["memory_preset"] = preset.name
        return config

    def _workload(self, request: TrainRequest) -> hardware.Workload:
        base = models.resolve(self.base_spec)
        config = self._config(request, None)
        return hardware.Workload(
            model=base.key, family=base.family, transformer_params=base.transformer_params or 11.9e9,
            download_bytes=base.download_bytes, resolution=int(config["resolution"]), rank=request.lora_rank,
            iterations=request.iterations, samples=request.iterations // max(1, config["sample_every"]),
            sample_steps=int(config["sample_steps"]), memory_preset=HuggingFaceOptions.of(request).memory_preset)

    def hardware_options(self, request: TrainRequest) -> list[HardwareOption]:
        """Nothing without a token (the catalogue is read with it; readiness says what to do)."""
        if not self._token:
            return []
        return hardware.options(self.catalogue.get(), self._workload(request))

    def _machine(self, request: TrainRequest,
                 work: hardware.Workload | None = None) -> tuple[hardware.Machine, memory.MemoryPreset | None]:
        """The request's machine (``request.hardware``, else the cheapest that fits) and its preset;
        InputError where it is not offered or the training would not fit."""
        catalogue = {m.name: m for m in self.catalogue.get()}
        work = work or self._workload(request)
        wanted = HuggingFaceOptions.of(request).hardware
        if wanted:
            machine = catalogue.get(wanted)
            if machine is None:
                raise InputError(f"{wanted!r} is not a single-GPU machine of Hugging Face Jobs.",
                                 hint=f"Pick one of: {', '.join(sorted(catalogue)) or 'none listed'}.")
        else:
            fitting = [o for o in hardware.options(list(catalogue.values()), work) if o.fits]
            if not fitting:
                raise InputError("No Hugging Face Jobs machine fits this training.",
                                 hint="Lower the resolution or the LoRA rank.")
            machine = catalogue[fitting[0].name]
        fits, preset, note = hardware.fit(machine, work)
        if not fits:
            raise InputError(f"This training does not fit {machine.label} ({machine.name}): {note}.",
                             hint="Pick a machine with more memory.")
        return machine, preset

    def check_request(self, request: TrainRequest) -> None:
        if HuggingFaceOptions.of(request).hardware:
            self._machine(request)

    def estimate(self, request: TrainRequest) -> CostEstimate | None:
        """None without a token, on a machine the training does not fit (``check_request`` says why at
        launch) or one whose speed is not known."""
        if not self._token:
            return None
        try:
            work = self._workload(request)
            machine, preset = self._machine(request, work)
        except InputError:
            return None
        return hardware.cost_estimate(machine, work, preset)

    # ------------------------------------------------------------ training

    def submit(self, zip_path: Path, request: TrainRequest, *, tag: str, on_upload: ProgressFn | None = None,
               owner: str | None = None) -> str:
        """Reconcile first (a job with this tag means it was submitted already: never a second paid job),
        then upload the inputs, create the model repo and start the job."""
        self._require_ready()
        zip_path = Path(zip_path)
        if not zip_path.is_file():
            raise InputError("The training zip is missing.", hint="Export the dataset again.")
        existing = self.find_by_tag(tag)
        if existing:
            return existing
        machine, preset = self._machine(request)
        base = models.resolve(self.base_spec)
        if base.gated:  # refused now, not after a paid machine has started and failed to download it
            self._hub("read", lambda api: api.auth_check(base.repo_id), base.repo_id)
        short = job_tag(tag)
        names = jobs.Names(self.namespace, short, jobs.model_repo_name(request.name, short))
        self._upload_inputs(names, zip_path, self._config(request, preset), on_upload)
        self._hub("repos", lambda api: api.create_repo(names.model_repo, repo_type="model", private=True,
                                                      exist_ok=True))
        self._run(names, machine.name, preset.name if preset else "", resume=False, attempt=1)
        return names.remote_id

    def _upload_inputs(self, names: jobs.Names, zip_path: Path, config: dict, on_upload: ProgressFn | None) -> None:
        from huggingface_hub import CommitOperationAdd

        bundle = package.code_bundle()
        config_bytes = json.dumps(config, indent=2).encode()
        total = zip_path.stat().st_size + len(bundle) + len(config_bytes)
        if on_upload:
            on_upload(0, total)
        self._hub("repos", lambda api: api.create_repo(names.data_repo, repo_type="dataset", private=True,
                                                      exist_ok=True))
        operations = [CommitOperationAdd(f"{names.prefix}/dataset.zip", str(zip_path)),
                      CommitOperationAdd(f"{names.prefix}/config.json", config_bytes),
                      CommitOperationAdd(f"{names.prefix}/code.zip", bundle)]
        self._hub("repos", lambda api: api.create_commit(names.data_repo, operations, repo_type="dataset",
                                                        commit_message=f"FLUX Studio job {names.tag}: inputs"))
        if on_upload:
            on_upload(total, total)

    def _run(self, names: jobs.Names, flavor: str, preset: str, *, resume: bool, attempt: int):
        quantised = bool(preset) and memory.PRESETS.get(preset, memory.PRESETS["bf16"]).quantized
        labels = {**names.labels(attempt), **({PRESET_LABEL: preset} if preset else {})}
        job = self._hub("jobs", lambda api: api.run_uv_job(
            str(package.JOB_SCRIPT),
            script_args=package.script_args(names.data_repo, names.prefix, names.model_repo, resume=resume),
            dependencies=package.job_dependencies(quantised=quantised), flavor=flavor,
            timeout=self.settings.hf_job_timeout, labels=labels, namespace=names.namespace,
            secrets={"HF_TOKEN": self._token.reveal()}))
        with self._lock:
            self._current[names.remote_id] = job.id
        return job

    def _attempts(self, namespace: str, tag: str) -> list:
        return list(self._hub("jobs", lambda api: list(api.list_jobs(labels={jobs.TAG_LABEL: tag},
                                                                      namespace=namespace))))

    def _job(self, remote_id: str):
        """The newest HF job of a fine-tune (its cached id while it runs; looked up by label otherwise)."""
        namespace, tag = jobs.parse_remote_id(remote_id)
        with self._lock:
            job_id = self._current.get(remote_id)
        if job_id:
            job = self._hub("jobs", lambda api: api.inspect_job(job_id=job_id, namespace=namespace),
                            f"job {job_id}")
            if jobs.stage_of(job) in ACTIVE_STAGES:
                return job
        job = jobs.newest(self._attempts(namespace, tag))  # a resume elsewhere may have started a newer one
        if job is None:
            raise TaskNotFoundError(f"Hugging Face has no job tagged {tag} in {namespace}.",
                                    hint="It may have been deleted.")
        with self._lock:
            self._current[remote_id] = job.id
        return job

    def _names(self, remote_id: str, job) -> jobs.Names:
        namespace, tag = jobs.parse_remote_id(remote_id)
        repo_name = (job.labels or {}).get(jobs.REPO_LABEL) or jobs.model_repo_name("", tag)
        return jobs.Names(namespace, tag, repo_name)

    def _log(self, job, namespace: str) -> tuple[events.RunLog, list[str]]:
        """The job's progress so far, and its last other lines; a finished job's logs are read once."""
        with self._lock:
            if job.id in self._finished:
                return self._finished[job.id]
            recent = self._recent.get(job.id)
        stage = jobs.stage_of(job)
        if recent is not None and stage in ACTIVE_STAGES and self._clock() - recent[0] < self._log_every_s:
            return recent[1]
        lines: list[str] = []
        if stage != "SCHEDULING":
            lines = self._hub("jobs", lambda api: list(api.fetch_job_logs(job_id=job.id, namespace=namespace,
                                                                         follow=False)))
        secret = self._token.reveal()
        tail = [scrub(t, secret) for t in jobs.other_lines(lines, events.event_of)[-jobs.TAIL_LINES:]]
        found = (events.parse(lines), tail)
        with self._lock:
            if stage not in ACTIVE_STAGES:
                self._finished[job.id] = found
                self._recent.pop(job.id, None)
            else:
                self._recent[job.id] = (self._clock(), found)
        return found

    def _samples(self, names: jobs.Names, run: events.RunLog) -> tuple[str, ...]:
        """Local copies of the samples the job pushed, newest first; each is downloaded once."""
        folder = Path(self.settings.data_dir) / SAMPLES_DIR / names.tag
        out = []
        for path in run.samples:
            if not jobs.sample_path_ok(path):
                continue
            local = folder / path
            if not local.is_file():
                try:
                    self._hub("read", lambda api, path=path: api.hf_hub_download(
                        names.model_repo, path, repo_type="model", local_dir=str(folder)))
                except ProviderError as exc:  # not there yet, or a blip: the next poll tries again
                    log.info("Sample %s of %s not fetched yet: %s", path, names.tag, exc.message)
                    continue
            if local.is_file():
                out.append(str(local))
        return tuple(reversed(out))

    def status(self, remote_id: str) -> TrainStatus:
        job = self._job(remote_id)
        names = self._names(remote_id, job)
        run, tail = self._log(job, names.namespace)
        return jobs.train_status(job, run, names=names, samples=self._samples(names, run), tail=tail)

    def find_by_tag(self, tag: str) -> str | None:
        short = job_tag(tag)
        job = jobs.newest(self._attempts(self.namespace, short))
        if job is None:
            return None
        remote_id = jobs.Names(self.namespace, short, "").remote_id
        with self._lock:
            self._current[remote_id] = job.id
        return remote_id

    def list_remote(self) -> list[str]:
        found = self._hub("jobs", lambda api: list(api.list_jobs(namespace=self.namespace)))
        tags = {(j.labels or {}).get(jobs.TAG_LABEL) for j in found} - {None, ""}
        return sorted(jobs.Names(self.namespace, t, "").remote_id for t in tags)

    def cancel(self, remote_id: str) -> None:
        job = self._job(remote_id)
        if jobs.stage_of(job) in ACTIVE_STAGES:
            namespace, _ = jobs.parse_remote_id(remote_id)
            self._hub("jobs", lambda api: api.cancel_job(job_id=job.id, namespace=namespace), f"job {job.id}")

    def resume(self, remote_id: str) -> None:
        """Start a new job that continues from the checkpoint in the model repo (same tag label, next attempt)."""
        self._require_ready()
        job = self._job(remote_id)
        if jobs.stage_of(job) in ACTIVE_STAGES:
            raise InputError("This fine-tune is still running on Hugging Face.", hint="Cancel it first.")
        names = self._names(remote_id, job)
        attempt = len(self._attempts(names.namespace, names.tag)) + 1
        preset = (job.labels or {}).get(PRESET_LABEL, "")
        self._run(names, str(job.flavor or ""), preset, resume=True, attempt=attempt)

    def delete(self, remote_id: str) -> None:
        """Stop the job if it still runs and forget it here. The user's repos are kept: the model repo holds
        the LoRA (and checkpoints), the dataset repo the inputs; delete them on the Hub if unwanted."""
        try:
            self.cancel(remote_id)
        except TaskNotFoundError:
            pass
        with self._lock:
            self._current.pop(remote_id, None)

    # ------------------------------------------------------------ generating

    def _serving(self, repo_id: str) -> inference.Serving:
        with self._lock:
            hit = self._served.get(repo_id)
        if hit and self._clock() - hit[0] < SERVING_TTL_S:
            return hit[1]
        info = self._hub("read", lambda api: api.model_info(repo_id, expand=["inferenceProviderMapping"]),
                         f"model repo {repo_id}")
        serve = inference.serving(info, repo_id, self.settings.hf_inference_provider, self.settings.hf_base_model)
        with self._lock:
            self._served[repo_id] = (self._clock(), serve)
        return serve

    def strength_fixed(self, finetune_id: str) -> str:
        try:
            return inference.strength_reason(self._serving(finetune_id))
        except NotServedError as exc:
            return exc.user_message()
        except ProviderError:
            return ""  # can't tell now; generating will say what is wrong

    def generate(self, request: GenerateRequest, out_dir: Path, *, finetune: str | None = None,
                 model: str | None = None) -> GeneratedImage:
        """Base model: ``model`` or ``FLUX_HF_BASE_MODEL`` on ``FLUX_HF_INFERENCE_PROVIDER``. Fine-tune: its
        LoRA repo on the provider that serves it (NotServedError where none does), at the requested strength
        where that provider sets one, else at full strength (recorded in the image's params)."""
        self._require_ready()
        if not request.prompt or not request.prompt.strip():
            raise InputError("Type a prompt first.")
        if finetune:
            serve = self._serving(finetune)
            provider, used, strength = serve.provider, finetune, request.strength if serve.sets_strength else None
        else:
            provider, used, strength = self.settings.hf_inference_provider, model or self.settings.hf_base_model, None
        client = self._inference_factory(provider, self._token.reveal())
        return call("inference", self._token, lambda: inference.text_to_image(
            client, request, Path(out_dir), model=used, provider=provider, finetune=finetune, strength=strength),
            f"model {used}")


SIGN_IN = Credentials(
    kind="sign_in", name="Hugging Face sign-in", give_again="Sign in with Hugging Face again at the top of the page",
    waiting=("Waiting for you to sign in with Hugging Face again: this job runs on your account, and the app keeps "
             "no token. Sign in at the top of the page to go on tracking it."),
    own_banner=("✅ {label}: on your own Hugging Face account (you are signed in). Its jobs and generations are "
                "billed to you; this app never uses its owner's token for them."),
    foreign_id="{id} is not one of your fine-tunes.",
    foreign_id_hint=("Sign in with Hugging Face at the top of the page to use a LoRA repo of yours, or pick one of "
                     "your ready fine-tunes."),
)

INFO = ProviderInfo(
    key=HuggingFaceProvider.key, label=HuggingFaceProvider.label,
    make=HuggingFaceProvider,  # cheap: nothing is asked of the Hub until it is used
    credentials=SIGN_IN,
    with_credentials=lambda settings, token: HuggingFaceProvider(settings, token=token),
    owns_finetune_id=jobs.is_finetune_id,  # model repos, "owner/name"
    options=HuggingFaceOptions, choices=frozenset({"hardware", "gradient_checkpointing"}),
    # It spends money on the account whose token it runs with, so it is never picked for you.
    may_be_default=lambda settings: False,
)
