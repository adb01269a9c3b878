"""The Train tab: launch a fine-tune through a provider and track it until it is ready.

``TrainPage`` is the page over ``Studio``: each handler builds the event's caller and asks Studio for the
step; the launch settings arrive as one named form (``TrainForm``). The handlers can be called without a
browser (``request=None`` is the local owner)."""
from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from typing import Any

import gradio as gr
import pandas as pd

from components import feedback
from components.feedback import plain, shows_errors
from components.forms import Form
from components.identity import caller_for
from components.serving import servable, servable_items
from components.train_hardware import HARDWARE_INFO, estimate_markdown, hardware_choices
from services.caller import Caller
from services.config import Secret
from services.errors import InputError, ProviderError
from services.providers import base as P
from services.providers.base import Provider, TrainRequest
from services.studio import Job, Studio, TrainingSlot

JOB_COLUMNS = ["job", "name", "provider", "dataset", "status", "progress", "elapsed", "created"]
TICK_SECONDS = 2.0
# Polling goes on this long after the last change to any of the visitor's jobs. A tick that read the
# jobs just before a Resume or a Launch can reach the page after that event's own reply; were it
# allowed to switch the timer off, the page would stop updating while the job runs.
LINGER_SECONDS = 30.0
LOADING = "Loading your jobs…"


@dataclass
class TrainForm(Form):
    """What a launch reads, in the order a script calling the page's ``on_launch`` passes it."""

    provider: Any
    dataset: Any
    mode: Any
    trigger: Any
    name: Any
    iterations: Any
    learning_rate: Any
    lora_rank: Any
    finetune_type: Any
    priority: Any
    captioning: Any
    checkpointing: Any
    base_model: Any
    memory_preset: Any
    hardware: Any


# ---------------------------------------------------------------- views


def fmt_elapsed(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def jobs_frame(jobs: list[Job], now: float | None = None) -> pd.DataFrame:
    now = now or time.time()
    rows = []
    for j in jobs:
        end = j.finished_at or now
        rows.append([
            j.id[:8], j.name, j.provider, j.dataset_name, j.status,
            "" if j.progress is None else f"{j.progress:.0%}",
            fmt_elapsed(end - j.created_at),
            dt.datetime.fromtimestamp(j.created_at).strftime("%Y-%m-%d %H:%M"),
        ])
    return pd.DataFrame(rows, columns=JOB_COLUMNS)


def job_markdown(job: Job | None, now: float | None = None) -> str:
    if job is None:
        return "Select a job in the table to see its details."
    now = now or time.time()
    lines = [f"### {plain(job.name)}",
             f"**Status:** {job.status}" + (f" ({job.progress:.0%})" if job.progress is not None else "")]
    if job.message:
        lines.append(f"**Latest:** {plain(job.message)}")
    if job.error:
        lines.append(f"**Error:** {plain(job.error)}")
    if job.eta_s and job.is_active:  # a finished job's last estimate is no longer news
        lines.append(f"**ETA:** {fmt_elapsed(job.eta_s)}")
    lines.append(f"**Elapsed:** {fmt_elapsed((job.finished_at or now) - job.created_at)}")
    lines.append(f"**Provider:** {job.provider}" + (f", id `{job.remote_id}`" if job.remote_id else ""))
    lines.append(f"**Dataset:** {plain(job.dataset_name)} (hash `{job.dataset_hash[:12]}`)")
    if job.result:
        lines.append("**Result:** " + ", ".join(f"{k} `{v}`" for k, v in job.result.items()))
    params = {k: v for k, v in job.params.items() if v not in (None, "")}
    lines.append("**Settings:** " + ", ".join(f"{k}={plain(v)}" for k, v in params.items()))
    return "\n\n".join(lines)


def job_controls(provider: Provider | None, selected: bool = True, ready: bool = False,
                 exports: bool = True) -> tuple[dict, dict, dict, dict]:
    """Visibility of what only some providers offer, for the selected job: its loss plot and samples
    (``reports_steps``), Resume (``can_resume``), publishing (``can_publish``) and, once it is ``ready``,
    the LoRA downloads (``can_export``). With no job selected, all show: they say what the app can do
    (the downloads where a provider of this app ``exports``)."""
    if not selected:
        return (gr.update(visible=True), gr.update(visible=True), gr.update(visible=True),
                gr.update(visible=exports))
    offers = (provider is not None and provider.reports_steps, provider is not None and provider.can_resume,
              provider is not None and provider.can_publish, provider is not None and provider.can_export and ready)
    return tuple(gr.update(visible=bool(flag)) for flag in offers)


def keep_polling(jobs: list[Job], now: float | None = None) -> bool:
    """Whether the page should go on polling: a job is moving, or one changed a moment ago."""
    now = time.time() if now is None else now
    return any(j.is_active or now - j.updated_at < LINGER_SECONDS for j in jobs)




def queue_markdown(slots: list[TrainingSlot], jobs: list[Job]) -> str:
    """One line over the jobs table: how many jobs, and which job the local engine is busy with.

    The engine trains one job at a time for everyone on this server, so a queued job waits for
    whichever holds it; naming it (when it is the visitor's own) says what to cancel to go first."""
    moving = sum(1 for j in jobs if j.is_active)
    parts = [f"{len(jobs)} job(s), {moving} queued or running." if jobs else "No jobs yet."]
    for slot in slots:
        holder, mine = slot.holder, slot.mine
        if holder is None:
            parts.append(f"{slot.label}: idle.")
            continue
        what = f"'{plain(mine.name)}'" if mine else "a job that is not in your list"
        doing = "stopping" if holder.cancelling else (
            f"step {holder.step} of {holder.total}" if holder.step is not None and holder.total else "preparing")
        line = f"{slot.label}: busy with {what} ({doing})"
        if holder.waiting:
            line += f"; {holder.waiting} job(s) wait for it" + (", cancel it to start the next" if mine else "")
        parts.append(line + ".")
    return " ".join(parts)


RAW, SMOOTHED = "per step", "smoothed"
SMOOTHING = 0.9  # TensorBoard's default: per-step flow-matching loss is noisy, the trend is what matters


def loss_plot_value(events: list[dict]) -> pd.DataFrame | None:
    """None until there is a point: the page builds the plot's colours from the first frame it gets,
    and an empty one leaves it drawing no lines at all."""
    frame = loss_frame(events)
    return None if frame.empty else frame


def loss_frame(events: list[dict]) -> pd.DataFrame:
    """The loss plot's data, long form: ``step, loss, series`` with a per-step and a smoothed line."""
    rows = [(e["data"].get("step"), e["data"].get("loss")) for e in events
            if e["data"].get("step") is not None and e["data"].get("loss") is not None]
    frame = pd.DataFrame(rows, columns=["step", "loss"])
    # Numeric dtypes, or the plot treats the axis as categories; one point per step (ticks may repeat one).
    frame = frame.apply(pd.to_numeric, errors="coerce").dropna().astype({"step": "int64", "loss": "float64"})
    frame = frame.drop_duplicates("step", keep="last").sort_values("step").reset_index(drop=True)
    # Debiased exponential moving average, so the first points are not pulled towards zero.
    ema = frame["loss"].ewm(alpha=1 - SMOOTHING, adjust=True).mean()
    return pd.concat([frame.assign(series=RAW), frame.assign(loss=ema, series=SMOOTHED)], ignore_index=True)


def sample_items(events: list[dict], limit: int = 12) -> list[tuple[str, str]]:
    """Each sample image once, captioned with the first step it was reported at (providers resend the list)."""
    first_seen: dict[str, object] = {}
    for e in events:
        for path in e["data"].get("samples") or []:
            first_seen.setdefault(path, e["data"].get("step"))
    return [(path, f"step {step}") for path, step in first_seen.items()][-limit:]


# Which downloaded file goes where (services.engine.lora_formats writes them; the Studio's formats).
EXPORT_INFO = ("**Use your LoRA elsewhere.** *ComfyUI / Forge*: for FLUX.1 the kohya `lora_unet_*` keys that "
               "ComfyUI and Forge load; for FLUX.2 [klein] the original BFL `diffusion_model.*` keys that ComfyUI "
               "and BFL's LoRA inference take. *diffusers*: the PEFT keys `load_lora_weights` reads. A strength "
               "means the same in each; the base model and trigger word are in the file's metadata.")
CHECKPOINTING = {"auto": None, "on": True, "off": False}  # the Train tab's choice -> TrainRequest
BASE_MODEL_INFO = ("Local engine: what it fine-tunes. Real models are downloaded on first use (FLUX.1 [dev] and "
                   "[klein] 9B need an accepted licence); the tiny test models make noise, by design.")
NO_DATASET = "No dataset picked yet: save one on the Dataset tab, then pick it here."


def memory_summary(studio: Studio, provider_key: str | None, base_model: str | None, preset: str, rank,
                   priority: str, checkpointing: str) -> str:
    """The preset, its estimated peak memory and the GPU, or why the base model can't be used."""
    if provider_key is None:
        return ""
    summary, problem = studio.memory_check(provider_key, base_model=base_model, memory_preset=preset, lora_rank=rank,
                                           priority=priority,
                                           gradient_checkpointing=CHECKPOINTING.get(checkpointing or "auto"))
    return "\n\n".join(part for part in (plain(summary), problem and f"⚠️ {plain(problem)}") if part)


def hardware_request(studio: Studio, provider_key: str, iterations, rank, priority: str | None,
                     hardware: str | None) -> TrainRequest:
    """What the hardware row prices: the settings that change a job's time and memory."""
    return studio.train_request("-", provider=provider_key, trigger_word="TOK",
                                iterations=int(iterations or P.PRESETS["general"]["iterations"]),
                                lora_rank=int(rank or 32), priority=priority or "quality", hardware=hardware or "")


def suggest_name(dataset: str | None, mode: str, typed: str | None):
    """``<dataset>-<mode>`` for the name box, unless the user typed a name of their own (kept as is)."""
    typed = (typed or "").strip()
    if not dataset or (typed and not any(typed.endswith(f"-{m}") for m in P.MODES)):
        return gr.update()
    return f"{dataset}-{mode}"


def parse_learning_rate(raw: str) -> float | None:
    raw = (raw or "").strip()
    if not raw:
        return None
    try:
        return float(raw)
    except ValueError:
        raise InputError(f"Learning rate {raw!r} is not a number.",
                         hint="Type a number such as 0.0001 or 1e-4, or leave it empty for the default.") from None




# ---------------------------------------------------------------- the page


class TrainPage:
    """The Train tab over ``studio``; ``session_key`` is the session's own CometAPI key (hosted)."""

    def __init__(self, studio: Studio, session_key: gr.State) -> None:
        self.studio = studio
        self.settings = studio.settings
        self.session_key = session_key
        self.choices = {key: studio.train_choices(key) for key in studio.providers}
        # The provider whose base model and memory preset the page picks (the local engine).
        self.picker = next((k for k, c in self.choices.items() if "base_model" in c.fields), None)
        self._layout()
        self._wire()

    def caller(self, request: gr.Request | None, key: Secret | None = None) -> Caller:
        return caller_for(request, self.settings, key)

    def offers(self, provider_key: str, field: str) -> bool:
        """Whether the Train tab shows ``field`` (a ``TrainChoices`` field) for the provider."""
        choices = self.choices.get(provider_key)
        return choices is not None and field in choices.fields

    def _layout(self) -> None:
        studio, default = self.studio, self.studio.default_provider
        picker = self.choices.get(self.picker) if self.picker else None
        # Both Markdowns start with text so that filling them in later does not shift the Launch button
        # under a user's (or a test's) pointer.
        self.banner = gr.Markdown(studio.banner(default), elem_id="train-banner")
        with gr.Row():
            provider = gr.Radio(choices=[(p.label, key) for key, p in studio.providers.items()], value=default,
                                label="Provider", elem_id="train-provider", scale=1)
            # allow_custom_value: a script names a dataset it made through the API (the page's choices are
            # filled per visitor later); the name is checked against the caller's own datasets anyway.
            dataset = gr.Dropdown(choices=[], value=None, label="Dataset", elem_id="train-dataset", scale=2,
                                  info="Saved on the Dataset tab.", allow_custom_value=True)
            self.refresh = gr.Button("↻", size="sm", scale=0, min_width=40)
        self.dataset_info = gr.Markdown(NO_DATASET, elem_id="train-dataset-info")
        # The registry's models (and FLUX_LOCAL_MODEL); custom values reach the server, which checks them.
        picks = self.offers(default, "base_model")
        base_model = gr.Dropdown(
            choices=list(picker.base_models) if picker else [], value=picker.default_base_model if picker else None,
            label="Base model", elem_id="train-base-model", info=BASE_MODEL_INFO, allow_custom_value=True,
            visible=picks,
        )
        with gr.Row(visible=picks) as self.memory_row:
            memory_preset = gr.Dropdown(list(picker.memory_presets) if picker else [], value="",
                                        label="Memory preset", elem_id="train-memory-preset", scale=1,
                                        info="Auto picks one from the GPU's memory.")
            self.memory_info = gr.Markdown(memory_summary(studio, self.picker, None, "", 32, "quality", "auto"),
                                           elem_id="train-memory-info")
        with gr.Row(visible=self.offers(default, "hardware")) as self.hardware_row:
            hardware = gr.Dropdown([("Cheapest that fits", "")], value="", label="Hardware", elem_id="train-hardware",
                                   scale=1, info=HARDWARE_INFO)
            self.hardware_info = gr.Markdown("💳 Pick the provider to see prices.", elem_id="train-hardware-info")
        preset = P.PRESETS["character"]
        with gr.Row():
            mode = gr.Radio(list(P.MODES), value="character", label="Mode", elem_id="train-mode",
                            info="Sets sensible defaults below.")
            trigger = gr.Textbox(label="Trigger word", value="TOK", elem_id="train-trigger")
            name = gr.Textbox(label="Fine-tune name", placeholder="my-product-v1", elem_id="train-name")
        with gr.Row():
            iterations = gr.Slider(*P.ITERATIONS_RANGE, value=preset["iterations"], step=10, label="Iterations",
                                   elem_id="train-iterations")
            learning_rate = gr.Textbox(label="Learning rate", placeholder="empty = default (1e-4 LoRA, 1e-5 full)",
                                       elem_id="train-lr")
            checkpointing = gr.Radio(list(CHECKPOINTING), value="auto", label="Gradient checkpointing",
                                     elem_id="train-checkpointing",
                                     info="Local engine: much less GPU memory for slower steps. Auto: on for real models.")
        with gr.Row():
            lora_rank = gr.Radio(list(P.LORA_RANKS), value=preset["lora_rank"], label="LoRA rank")
            finetune_type = gr.Radio(list(P.FINETUNE_TYPES), value=preset["finetune_type"], label="Fine-tune type",
                                     info="The local engine always trains a LoRA.")
            priority = gr.Radio(list(P.PRIORITIES), value=preset["priority"], label="Priority",
                                info="CometAPI; the local engine reads high_res_only as 1024 px training.")
            captioning = gr.Checkbox(value=preset["captioning"], label="Server-side captioning",
                                     info="CometAPI only: let the service caption images that have no caption.")
        self.form = TrainForm(provider, dataset, mode, trigger, name, iterations, learning_rate, lora_rank,
                              finetune_type, priority, captioning, checkpointing, base_model, memory_preset, hardware)
        self.launch = gr.Button("Launch fine-tune", variant="primary", elem_id="train-launch")
        self.launch_result = gr.Markdown(elem_id="train-launch-result")
        gr.Markdown("### Jobs")
        # Starts with text, like the other lines, so that filling it in shifts nothing; its change from
        # LOADING also tells that the visitor's lists have arrived.
        self.queue = gr.Markdown(LOADING, elem_id="train-queue")
        self.jobs = gr.Dataframe(value=jobs_frame([]), headers=JOB_COLUMNS, interactive=False, elem_id="train-jobs",
                                 label="History (click a row for details; click a header to sort)")
        self.detail = gr.Markdown(job_markdown(None), elem_id="train-job-detail")
        with gr.Row() as self.progress_row:
            self.loss_plot = gr.LinePlot(None, x="step", y="loss", color="series", title="Training loss", height=240,
                                         color_map={RAW: "#c7d2fe", SMOOTHED: "#4338ca"}, color_title="",
                                         elem_id="train-loss", scale=1)
            self.samples = gr.Gallery(label="Samples during training (fixed seed)", columns=4, height=240,
                                      elem_id="train-samples", scale=1)
        with gr.Row():
            self.resume = gr.Button("Resume from last checkpoint", size="sm", elem_id="train-resume")
            self.cancel = gr.Button("Cancel", size="sm", elem_id="train-cancel")
            self.delete = gr.Button("Delete selected job", variant="stop", size="sm", elem_id="train-delete")
        exports = any(p.can_export for p in self.studio.providers.values())
        with gr.Column(visible=exports, elem_id="train-export-box") as self.export_box:
            gr.Markdown(EXPORT_INFO)
            with gr.Row():
                self.export_comfyui = gr.Button("⬇ LoRA for ComfyUI / Forge", size="sm", elem_id="train-export-comfyui")
                self.export_diffusers = gr.Button("⬇ LoRA for diffusers", size="sm", elem_id="train-export-diffusers")
            self.export_file = gr.File(label="LoRA file of the selected job", interactive=False,
                                       elem_id="train-export-file")
        with gr.Accordion("Publish a local LoRA to the Hugging Face Hub", open=False,
                          elem_id="train-publish-box") as self.publish_box:
            with gr.Row():
                self.repo_id = gr.Textbox(label="Repository", placeholder="your-name/my-flux-lora",
                                          elem_id="train-publish-repo")
                self.hf_token = gr.Textbox(label="Hugging Face token (write access)", type="password",
                                           elem_id="train-publish-token",
                                           info="Used for this upload only; never stored, logged or shown again.")
                self.private = gr.Checkbox(value=True, label="Private repository")
            self.publish = gr.Button("Publish selected job", size="sm", elem_id="train-publish")
            self.publish_result = gr.Markdown(elem_id="train-publish-result")
        self.selected = gr.State(None)
        self.seen = gr.State({})
        self.timer = gr.Timer(TICK_SECONDS, active=False)

    def _wire(self) -> None:
        f = self.form
        selection = [self.loss_plot, self.samples, self.progress_row, self.resume, self.publish_box, self.export_box]
        self.export_comfyui.click(self.on_export_comfyui, [self.selected], [self.export_file], concurrency_limit=2)
        self.export_diffusers.click(self.on_export_diffusers, [self.selected], [self.export_file],
                                    concurrency_limit=2)
        self.publish.click(self.on_publish, [self.selected, self.repo_id, self.hf_token, self.private],
                           [self.publish_result, self.hf_token], concurrency_limit=2)
        f.provider.change(self.on_provider, [f.provider, self.session_key, f.iterations, f.lora_rank, f.priority],
                          [self.banner, f.base_model, self.memory_row, self.hardware_row, f.hardware,
                           self.hardware_info])
        gr.on([f.hardware.change, f.iterations.release, f.lora_rank.change, f.priority.change], self.on_hardware,
              [f.provider, self.session_key, f.iterations, f.lora_rank, f.priority, f.hardware], [self.hardware_info],
              show_progress="hidden")
        gr.on([f.base_model.change, f.memory_preset.change, f.lora_rank.change, f.priority.change,
               f.checkpointing.change], self.on_memory,
              [f.base_model, f.memory_preset, f.lora_rank, f.priority, f.checkpointing], [self.memory_info],
              show_progress="hidden")
        self.refresh.click(self.on_refresh, [f.dataset], [f.dataset])
        f.dataset.change(self.on_dataset, [f.dataset, f.mode, f.name], [f.trigger, f.name, self.dataset_info])
        f.mode.change(self.on_mode, [f.mode, f.dataset, f.name],
                      [f.iterations, f.lora_rank, f.finetune_type, f.priority, f.captioning, f.name])
        self.launch.click(self.on_launch, f.inputs(self.seen, self.session_key),
                          [self.launch_result, self.jobs, self.detail, self.selected, self.timer, self.seen,
                           self.banner], concurrency_limit=4)
        self.timer.tick(self.on_tick, [self.selected, self.seen, f.provider, self.session_key],
                        [self.jobs, self.queue, self.detail, *selection, self.timer, self.seen, self.banner],
                        concurrency_limit=None, show_progress="hidden")
        self.jobs.select(self.on_select, [self.jobs], [self.selected, self.detail, *selection, self.export_file])
        self.resume.click(self.on_resume, [self.selected], [self.jobs, self.detail, self.timer])
        self.cancel.click(self.on_cancel, [self.selected], [self.jobs, self.detail])
        self.delete.click(self.on_delete, [self.selected], [self.jobs, self.detail, self.selected],
                          js="(s) => { if (!confirm('Delete this job? A finished fine-tune is deleted on the provider "
                             "too.')) throw new Error('cancelled'); return s; }")

    def load_on(self, *triggers) -> "TrainPage":
        """Fill the page in for the visitor on each of ``triggers`` (the page's load, opening the tab):
        a dataset made a moment ago, or a job that moved while they were elsewhere, shows up."""
        gr.on(list(triggers), self.on_load, [self.form.provider, self.form.dataset, self.session_key],
              [self.banner, self.form.dataset, self.jobs, self.queue, self.timer, self.seen], show_progress="hidden")
        return self

    # -- handlers

    def dataset_choices(self, caller: Caller, current: str | None):
        names = self.studio.list_datasets(caller=caller)
        return gr.update(choices=names, value=current if current in names else (names[0] if names else None))

    def on_load(self, provider_key: str, current: str | None, key=None, request: gr.Request = None):
        caller = self.caller(request, key)
        self.studio.adopt(caller)  # jobs launched on their own account before a restart: tracked again from now
        owned = self.studio.list_jobs(caller=caller)
        return (
            self.studio.banner(provider_key, caller),
            self.dataset_choices(caller, current),
            jobs_frame(owned),
            queue_markdown(self.studio.training_slots(caller), owned),
            gr.Timer(active=keep_polling(owned)),
            {j.id: j.status for j in owned},
        )

    def on_provider(self, provider_key: str, key, iterations, rank, priority, request: gr.Request = None):
        caller = self.caller(request, key)
        picks, hw = self.offers(provider_key, "base_model"), self.offers(provider_key, "hardware")
        views = (self.studio.banner(provider_key, caller), gr.update(visible=picks), gr.update(visible=picks),
                 gr.update(visible=hw))
        if not hw:
            return (*views, gr.update(), gr.update())
        provider = self.studio.provider_for(provider_key, caller)
        req = hardware_request(self.studio, provider_key, iterations, rank, priority, "")
        choices, note = hardware_choices(provider, req)
        return (*views, gr.update(choices=choices, value=""), estimate_markdown(provider, req, note))

    def on_hardware(self, provider_key: str, key, iterations, rank, priority, hardware, request: gr.Request = None):
        if not self.offers(provider_key, "hardware"):
            return gr.update()
        return estimate_markdown(self.studio.provider_for(provider_key, self.caller(request, key)),
                                 hardware_request(self.studio, provider_key, iterations, rank, priority, hardware))

    def on_memory(self, base_model: str | None, preset: str, rank, priority: str, checkpointing: str) -> str:
        return memory_summary(self.studio, self.picker, base_model, preset, rank, priority, checkpointing)

    def on_refresh(self, current: str | None, request: gr.Request = None):
        return self.dataset_choices(self.caller(request), current)

    @shows_errors
    def on_dataset(self, name: str | None, mode: str, typed: str, request: gr.Request = None):
        if not name:
            return gr.update(), gr.update(), NO_DATASET
        ds = self.studio.dataset(name, create=False, caller=self.caller(request)).info()
        captioned = sum(1 for i in ds.items if i.caption.strip())
        info = f"{len(ds.items)} image(s), {captioned} captioned, trigger word `{ds.trigger_word or '—'}`."
        return (ds.trigger_word or gr.update()), suggest_name(ds.name, mode, typed), info

    @staticmethod
    def on_mode(mode: str, dataset: str | None, typed: str):
        p = P.PRESETS.get(mode, P.PRESETS["general"])
        return (p["iterations"], p["lora_rank"], p["finetune_type"], p["priority"], p["captioning"],
                suggest_name(dataset, mode, typed))

    @shows_errors
    def on_launch(self, data: dict, request: gr.Request = None, progress=gr.Progress()):
        """``data``: the values of ``form.inputs(seen, session_key)``, keyed by component."""
        form, seen = self.form.read(data), data[self.seen]
        caller = self.caller(request, data[self.session_key])
        name = form.name or ""
        settings = dict(
            provider=form.provider, mode=form.mode, trigger_word=(form.trigger or "").strip(),
            iterations=int(form.iterations), learning_rate=parse_learning_rate(form.learning_rate),
            lora_rank=int(form.lora_rank), finetune_type=form.finetune_type, priority=form.priority,
            captioning=bool(form.captioning), gradient_checkpointing=CHECKPOINTING.get(form.checkpointing or "auto"),
            base_model=form.base_model, memory_preset=form.memory_preset or "", hardware=form.hardware or "")
        # The whole form is checked first, and as typed: an empty trigger word is a mistake to fix here,
        # not a cue to use the dataset's (as Studio does for a script).
        self.studio.train_request(name, **settings)
        progress(0, desc="Exporting dataset")

        def uploaded(sent: int, total: int) -> None:
            progress(sent / total if total else 1.0,
                     desc=f"Uploading dataset ({sent / 2**20:.1f} of {total / 2**20:.1f} MB)")

        try:
            job = self.studio.launch(form.dataset, name, caller=caller, on_upload=uploaded, **settings).job
        except ProviderError as exc:
            # The job row records the failure; show it in place, not only as a toast.
            feedback.warning(exc.user_message())
            owned = self.studio.list_jobs(caller=caller)
            failed = owned[0] if owned and owned[0].status == "failed" else None
            return (f"❌ Launch failed: {plain(exc.user_message())}", jobs_frame(owned), job_markdown(failed),
                    failed.id if failed else None, gr.Timer(), seen, self.studio.banner(form.provider, caller))
        if job.remote_id:
            msg = f"🚀 Launched **{plain(job.name)}** on {job.provider} (id `{job.remote_id}`). Tracking it below."
            feedback.info(f"Launched {job.name}.")
        else:
            msg = f"⏳ {plain(job.message)}"
        return (msg, jobs_frame(self.studio.list_jobs(caller=caller)), job_markdown(job), job.id,
                gr.Timer(active=True), {**seen, job.id: job.status}, self.studio.banner(form.provider, caller))

    def on_tick(self, selected: str | None, seen: dict, provider_key: str, key=None, request: gr.Request = None):
        caller = self.caller(request, key)
        owned = self.studio.list_jobs(caller=caller)
        for j in owned:
            before = seen.get(j.id)
            if before is not None and before != j.status:
                if j.status == "ready":
                    feedback.info(f"Fine-tune '{j.name}' is ready. Try it on the Compare tab.")
                elif j.status == "failed":
                    feedback.warning(f"Fine-tune '{j.name}' failed: {j.error}")
        current = next((j for j in owned if j.id == selected), None)
        return (
            jobs_frame(owned),
            queue_markdown(self.studio.training_slots(caller), owned),
            job_markdown(current) if current else gr.update(),
            *self.progress_views(caller, current),
            gr.Timer(active=keep_polling(owned)),
            {j.id: j.status for j in owned},
            self.studio.banner(provider_key, caller),
        )

    def progress_views(self, caller: Caller, job: Job | None):
        """The selected job's plot and samples, and what applies to it: (plot, gallery, progress row,
        Resume, publish box, downloads)."""
        controls = job_controls(self.studio.providers.get(job.provider) if job else None, selected=job is not None,
                                ready=job is not None and job.status == "ready",
                                exports=any(p.can_export for p in self.studio.providers.values()))
        if job is None:
            return gr.update(), gr.update(), *controls
        events = self.studio.jobs.events(caller.owner, job.id, "step")
        return loss_plot_value(events), servable_items(sample_items(events)), *controls

    def on_select(self, table: pd.DataFrame, evt: gr.SelectData, request: gr.Request = None):
        caller = self.caller(request)
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        short = str(table.iloc[row]["job"]) if table is not None and 0 <= row < len(table) else ""
        try:
            job = self.studio.job(short, caller=caller).job if short else None
        except InputError:  # gone since the table was drawn
            job = None
        # Another job's file must not stay beside this one's details.
        return (job.id if job else None), job_markdown(job), *self.progress_views(caller, job), None

    @shows_errors
    def on_resume(self, selected: str | None, request: gr.Request = None):
        caller = self.caller(request)
        job = self.studio.resume(require_selection(selected), caller=caller)
        feedback.info(f"Resuming '{job.name}' from its last checkpoint.")
        return jobs_frame(self.studio.list_jobs(caller=caller)), job_markdown(job), gr.Timer(active=True)

    @shows_errors
    def on_cancel(self, selected: str | None, request: gr.Request = None):
        caller = self.caller(request)
        job = self.studio.cancel(require_selection(selected), caller=caller)
        trained_on = self.studio.providers.get(job.provider)
        feedback.info(f"Cancelled '{job.name}'." + (" Its last checkpoint is kept: Resume continues from it."
                                                   if trained_on is not None and trained_on.can_resume else ""))
        return jobs_frame(self.studio.list_jobs(caller=caller)), job_markdown(job)

    @shows_errors
    def on_delete(self, selected: str | None, request: gr.Request = None):
        caller = self.caller(request)
        job = self.studio.delete(require_selection(selected), caller=caller)
        feedback.info(f"Deleted '{job.name}'.")
        return jobs_frame(self.studio.list_jobs(caller=caller)), job_markdown(None), None

    def export(self, selected: str | None, fmt: P.ExportFormat, request: gr.Request | None) -> str | None:
        """The selected job's LoRA in ``fmt``, as a file the page can serve."""
        caller = self.caller(request)
        handle = self.studio.job(require_selection(selected), caller=caller)
        path = self.studio.export_lora(handle, fmt, caller=caller)
        feedback.info(f"'{handle.job.name}': {path.name} is ready to download.")
        return servable(path)

    @shows_errors
    def on_export_comfyui(self, selected: str | None, request: gr.Request = None):
        return self.export(selected, "comfyui", request)

    @shows_errors
    def on_export_diffusers(self, selected: str | None, request: gr.Request = None):
        return self.export(selected, "diffusers", request)

    def on_publish(self, selected: str | None, repo: str, token: str, private: bool, request: gr.Request = None):
        """Publish, and clear the token box whatever happens: a token must not wait in the page."""
        try:
            handle = self.studio.job(require_selection(selected), caller=self.caller(request))
            url = self.studio.publish(handle, repo, Secret(token), private=bool(private))
        except Exception as exc:
            msg = feedback.message_for(exc, "on_publish")
            feedback.warning(f"Publish failed: {msg}")
            return f"❌ Publish failed: {plain(msg)} Paste the token again to retry.", ""
        feedback.info(f"Published '{handle.job.name}'.")
        return f"✅ Published to [{repo.strip()}]({url}) ({'private' if private else 'public'}).", ""


def require_selection(selected: str | None) -> str:
    if not selected:
        raise InputError("No job is selected.", hint="Click a row in the jobs table first.")
    return selected


def build(studio: Studio, session_key: gr.State, demo: gr.Blocks, tab: gr.Tab) -> TrainPage:
    """The Train tab, filled in for the visitor when the page loads and each time the tab is opened."""
    return TrainPage(studio, session_key).load_on(demo.load, tab.select)
