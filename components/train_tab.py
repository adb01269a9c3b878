"""The Train tab: launch a fine-tune through a provider and track it until it is ready."""
from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass

import gradio as gr
import pandas as pd

from components import feedback
from components.feedback import plain, shows_errors
from components.identity import client_address, hf_token_of, owner_for
from components.train_hardware import HARDWARE_INFO, estimate_markdown, hardware_choices
from components.serving import servable_items
from services.providers import base as P
from services.providers import registry
from services.providers.base import Provider
from services.config import Secret, Settings
from services.storage.datasets import DatasetStore
from services.access import ProviderAccess
from services.errors import InputError, ProviderError, StudioError
from services.storage.jobs import Job
from services.engine import memory
from services.training import TrainingService

JOB_COLUMNS = ["job", "name", "provider", "dataset", "status", "progress", "elapsed", "created"]
TICK_SECONDS = 2.0
# Polling goes on this long after the last change to any of the visitor's jobs. A tick that read the
# jobs just before a Resume or a Launch can reach the page after that event's own reply; were it
# allowed to switch the timer off, the page would stop updating while the job runs.
LINGER_SECONDS = 30.0
LOADING = "Loading your jobs…"


@dataclass
class TrainTab:
    banner: gr.Markdown
    provider: gr.Radio
    dataset: gr.Dropdown
    mode: gr.Radio
    trigger: gr.Textbox
    name: gr.Textbox
    iterations: gr.Slider
    learning_rate: gr.Textbox
    lora_rank: gr.Radio
    finetune_type: gr.Radio
    priority: gr.Radio
    captioning: gr.Checkbox
    base_model: gr.Dropdown
    launch: gr.Button
    launch_result: gr.Markdown
    jobs: gr.Dataframe
    queue: gr.Markdown
    detail: gr.Markdown
    selected: gr.State
    timer: gr.Timer
    seen: gr.State
    on_load: Callable


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


def job_controls(provider: Provider | None, selected: bool = True) -> tuple[dict, dict, dict]:
    """Visibility of what only some providers offer, for the selected job: its loss plot and samples
    (``reports_steps``), Resume (``can_resume``) and publishing (``can_publish``). With no job
    selected, all show: they say what the app can do."""
    if not selected:
        return gr.update(visible=True), gr.update(visible=True), gr.update(visible=True)
    offers = (provider is not None and provider.reports_steps, provider is not None and provider.can_resume,
              provider is not None and provider.can_publish)
    return tuple(gr.update(visible=bool(flag)) for flag in offers)


def keep_polling(jobs: list[Job], now: float | None = None) -> bool:
    """Whether the page should go on polling: a job is moving, or one changed a moment ago."""
    now = time.time() if now is None else now
    return any(j.is_active or now - j.updated_at < LINGER_SECONDS for j in jobs)


def queue_markdown(service: TrainingService, owner: str, jobs: list[Job]) -> str:
    """One line over the jobs table: how many jobs, and which job the local engine is busy with.

    The engine trains one job at a time for everyone on this server, so a queued job waits for
    whichever holds it; naming it (when it is the visitor's own) says what to cancel to go first."""
    moving = sum(1 for j in jobs if j.is_active)
    parts = [f"{len(jobs)} job(s), {moving} queued or running." if jobs else "No jobs yet."]
    for key, provider in service.providers.items():
        if not provider.queues_training:
            continue
        holder = provider.training_now()
        if holder is None:
            parts.append(f"{provider.label}: idle.")
            continue
        mine = service.jobs.find_by_remote(owner, key, holder.remote_id)
        what = f"'{plain(mine.name)}'" if mine else "a job that is not in your list"
        doing = "stopping" if holder.cancelling else (
            f"step {holder.step} of {holder.total}" if holder.step is not None and holder.total else "preparing")
        line = f"{provider.label}: busy with {what} ({doing})"
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


def banner_markdown(service: TrainingService, provider_key: str, session_key=None, settings: Settings | None = None,
                    calls_left: int | None = None, signed_in: Provider | None = None) -> str:
    """The line over the Train tab: whether the provider can be used, and on whose key.
    ``calls_left``: this visitor's shared-key budget for the hour, hosted; ``signed_in``: the
    provider on the visitor's own Hugging Face sign-in, hosted."""
    provider = service.providers.get(provider_key)
    if provider is None:
        return ""
    if signed_in is not None and signed_in.key == provider_key:
        return (f"✅ {provider.label}: on your own Hugging Face account (you are signed in). Its jobs and "
                "generations are billed to you; this app never uses its owner's token for them.")
    notice = service.notices.get(provider_key)
    own_key = provider_key == "cometapi" and bool(session_key)
    ready, why = (True, "") if own_key else provider.readiness()
    if not ready:
        if settings is not None and settings.hosted and provider_key == "cometapi":
            why = "Enter your CometAPI key at the top of the page (kept for this session only), or use the local engine."
        return f"⚠️ **{provider.label} can't be used yet.** {why}"
    if notice:
        return f"⚠️ **{provider.label}: {notice}**"
    if own_key:
        return f"✅ {provider.label}: using your own key for this session."
    if settings is not None and settings.hosted and provider_key == "cometapi":
        left = "" if calls_left is None else f" {calls_left} left for you this hour."
        return (f"✅ {provider.label}: using this app's shared key, limited to {settings.shared_key_limit} paid "
                f"calls per hour per visitor.{left} Enter your own key at the top for more.")
    model = provider.model_label
    if model:  # the local engine says which model it runs (the tiny test model makes noise, by design)
        return f"✅ {provider.label}: {model}"
    return f"✅ {provider.label} is configured."


CHECKPOINTING = {"auto": None, "on": True, "off": False}  # the Train tab's choice -> TrainRequest
BASE_MODEL_INFO = ("Local engine: what it fine-tunes. Real models are downloaded on first use (FLUX.1 [dev] and "
                   "[klein] 9B need an accepted licence); the tiny test models make noise, by design.")


MEMORY_CHOICES = [("Auto (from the GPU)", "")] + [(p.label, name) for name, p in memory.PRESETS.items()]


def memory_summary(local, base_model: str | None, preset: str, rank, priority: str, checkpointing: str) -> str:
    """The preset, its estimated peak memory and the GPU, or why the base model can't be used."""
    if local is None:
        return ""
    options = registry.train_options(local.key, base_model=base_model, memory_preset=preset,
                                     gradient_checkpointing=CHECKPOINTING.get(checkpointing or "auto"))
    request = P.TrainRequest(name="-", mode="general", lora_rank=int(rank or 32), priority=priority or "quality",
                             options=options)
    try:
        plan = local.memory_plan(request)
    except StudioError as exc:
        return f"⚠️ {plain(exc.user_message())}"
    fits = ""
    if plan.preset is not None:
        try:
            plan.check()
        except StudioError as exc:
            fits = f"\n\n⚠️ {plain(exc.user_message())}"
    return plain(plan.summary()) + fits


NO_DATASET = "No dataset picked yet: save one on the Dataset tab, then pick it here."


def hardware_request(provider_key: str, iterations, rank, priority: str | None, hardware: str | None) -> P.TrainRequest:
    """What the hardware row prices: the settings that change a job's time and memory."""
    return P.TrainRequest(name="-", mode="general", iterations=int(iterations or P.PRESETS["general"]["iterations"]),
                          lora_rank=int(rank or 32), priority=priority or "quality",
                          options=registry.train_options(provider_key, hardware=hardware))


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


# ---------------------------------------------------------------- build


def build(service: TrainingService, datasets_for: Callable[[str], DatasetStore], settings: Settings,
          default_provider: str, access: ProviderAccess, session_key: gr.State) -> TrainTab:
    # Both Markdowns start with text so that filling them in later does not shift the Launch button
    # under a user's (or a test's) pointer.
    banner = gr.Markdown(banner_markdown(service, default_provider, None, settings), elem_id="train-banner")
    with gr.Row():
        provider = gr.Radio(
            choices=[(p.label, key) for key, p in service.providers.items()], value=default_provider,
            label="Provider", elem_id="train-provider", scale=1,
        )
        # allow_custom_value: a script names a dataset it made through the API (the page's choices are
        # filled per visitor later); the name is checked against the caller's own datasets anyway.
        dataset = gr.Dropdown(choices=[], value=None, label="Dataset", elem_id="train-dataset", scale=2,
                              info="Saved on the Dataset tab.", allow_custom_value=True)
        refresh = gr.Button("↻", size="sm", scale=0, min_width=40)
    dataset_info = gr.Markdown(NO_DATASET, elem_id="train-dataset-info")
    # The registry's models (and FLUX_LOCAL_MODEL); custom values reach the server, which checks them.
    local = next((p for p in service.providers.values() if p.picks_base_model), None)
    base_model = gr.Dropdown(
        choices=local.model_choices() if local else [], value=local.default_model_choice() if local else None,
        label="Base model", elem_id="train-base-model", info=BASE_MODEL_INFO, allow_custom_value=True,
        visible=local is not None and local.key == default_provider,
    )
    with gr.Row(visible=local is not None and local.key == default_provider) as memory_row:
        memory_preset = gr.Dropdown(MEMORY_CHOICES, value="", label="Memory preset", elem_id="train-memory-preset",
                                    scale=1, info="Auto picks one from the GPU's memory.")
        memory_info = gr.Markdown(memory_summary(local, None, "", 32, "quality", "auto"), elem_id="train-memory-info")
    default_hw = service.providers.get(default_provider)
    with gr.Row(visible=bool(default_hw and default_hw.picks_hardware)) as hardware_row:
        hardware = gr.Dropdown([("Cheapest that fits", "")], value="", label="Hardware", elem_id="train-hardware",
                               scale=1, info=HARDWARE_INFO)
        hardware_info = gr.Markdown("💳 Pick the provider to see prices.", elem_id="train-hardware-info")
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
    launch = gr.Button("Launch fine-tune", variant="primary", elem_id="train-launch")
    launch_result = gr.Markdown(elem_id="train-launch-result")
    gr.Markdown("### Jobs")
    # Starts with text, like the other lines, so that filling it in shifts nothing; its change from
    # LOADING also tells that the visitor's lists have arrived.
    queue = gr.Markdown(LOADING, elem_id="train-queue")
    jobs = gr.Dataframe(value=jobs_frame([]), headers=JOB_COLUMNS, interactive=False, elem_id="train-jobs",
                        label="History (click a row for details; click a header to sort)")
    detail = gr.Markdown(job_markdown(None), elem_id="train-job-detail")
    with gr.Row() as progress_row:
        loss_plot = gr.LinePlot(None, x="step", y="loss", color="series", title="Training loss", height=240,
                                color_map={RAW: "#c7d2fe", SMOOTHED: "#4338ca"}, color_title="",
                                elem_id="train-loss", scale=1)
        samples = gr.Gallery(label="Samples during training (fixed seed)", columns=4, height=240,
                             elem_id="train-samples", scale=1)
    with gr.Row():
        resume = gr.Button("Resume from last checkpoint", size="sm", elem_id="train-resume")
        cancel = gr.Button("Cancel", size="sm", elem_id="train-cancel")
        delete = gr.Button("Delete selected job", variant="stop", size="sm", elem_id="train-delete")
    with gr.Accordion("Publish a local LoRA to the Hugging Face Hub", open=False, elem_id="train-publish-box") as publish_box:
        with gr.Row():
            repo_id = gr.Textbox(label="Repository", placeholder="your-name/my-flux-lora", elem_id="train-publish-repo")
            hf_token = gr.Textbox(label="Hugging Face token (write access)", type="password",
                                  elem_id="train-publish-token",
                                  info="Used for this upload only; never stored, logged or shown again.")
            private = gr.Checkbox(value=True, label="Private repository")
        publish = gr.Button("Publish selected job", size="sm", elem_id="train-publish")
        publish_result = gr.Markdown(elem_id="train-publish-result")
    selected = gr.State(None)
    seen = gr.State({})
    timer = gr.Timer(TICK_SECONDS, active=False)

    def dataset_choices(owner: str, current: str | None):
        names = datasets_for(owner).list_names()
        return gr.update(choices=names, value=current if current in names else (names[0] if names else None))

    def calls_left(owner: str, request: gr.Request | None) -> int:
        return access.budget.remaining(owner, client_address(request, settings))

    def signed_in(request: gr.Request | None) -> Provider | None:
        """The provider on this visitor's own Hugging Face sign-in (hosted), None without one."""
        return access.own_hf(hf_token_of(request))

    def visitor_provider(provider_key: str, key, request: gr.Request | None) -> Provider | None:
        """The provider this visitor's requests go to (their own key or sign-in, else the app's)."""
        try:
            return access.get(provider_key, owner_for(request, settings), key, hf_token=hf_token_of(request))
        except StudioError:
            return service.providers.get(provider_key)

    def on_load(provider_key: str, current: str | None, key=None, request: gr.Request = None):
        owner = owner_for(request, settings)
        own_hf = signed_in(request)
        if own_hf is not None:  # jobs launched on their account before a restart: tracked again from now
            service.adopt(owner, own_hf)
        owned = service.jobs.list(owner)
        return (
            banner_markdown(service, provider_key, key, settings, calls_left(owner, request), own_hf),
            dataset_choices(owner, current),
            jobs_frame(owned),
            queue_markdown(service, owner, owned),
            gr.Timer(active=keep_polling(owned)),
            {j.id: j.status for j in owned},
        )

    tab = TrainTab(banner, provider, dataset, mode, trigger, name, iterations, learning_rate, lora_rank,
                   finetune_type, priority, captioning, base_model, launch, launch_result, jobs, queue, detail,
                   selected, timer, seen, on_load=on_load)

    # -- handlers

    def on_provider(provider_key: str, key, iterations_, rank_, priority_, request: gr.Request = None):
        left = calls_left(owner_for(request, settings), request)
        chosen = service.providers.get(provider_key)
        picks = chosen is not None and chosen.picks_base_model
        hw = chosen is not None and chosen.picks_hardware
        views = (banner_markdown(service, provider_key, key, settings, left, signed_in(request)),
                 gr.update(visible=picks), gr.update(visible=picks), gr.update(visible=hw))
        if not hw:
            return (*views, gr.update(), gr.update())
        provider_ = visitor_provider(provider_key, key, request)
        req = hardware_request(provider_key, iterations_, rank_, priority_, "")
        choices, note = hardware_choices(provider_, req)
        return (*views, gr.update(choices=choices, value=""), estimate_markdown(provider_, req, note))

    def on_hardware(provider_key: str, key, iterations_, rank_, priority_, hardware_, request: gr.Request = None):
        chosen = service.providers.get(provider_key)
        if chosen is None or not chosen.picks_hardware:
            return gr.update()
        return estimate_markdown(visitor_provider(provider_key, key, request),
                                 hardware_request(provider_key, iterations_, rank_, priority_, hardware_))

    def on_refresh(current: str | None, request: gr.Request = None):
        return dataset_choices(owner_for(request, settings), current)

    @shows_errors
    def on_dataset(name_: str | None, mode_: str, typed: str, request: gr.Request = None):
        if not name_:
            return gr.update(), gr.update(), NO_DATASET
        ds = datasets_for(owner_for(request, settings)).open(name_)
        captioned = sum(1 for i in ds.items if i.caption.strip())
        info = f"{len(ds.items)} image(s), {captioned} captioned, trigger word `{ds.trigger_word or '—'}`."
        return (ds.trigger_word or gr.update()), suggest_name(ds.name, mode_, typed), info

    def on_mode(mode_: str, dataset_: str | None, typed: str):
        p = P.PRESETS.get(mode_, P.PRESETS["general"])
        return (p["iterations"], p["lora_rank"], p["finetune_type"], p["priority"], p["captioning"],
                suggest_name(dataset_, mode_, typed))

    @shows_errors
    def on_launch(provider_key, dataset_, mode_, trigger_, name_, iterations_, lr_, rank_, type_, priority_,
                  captioning_, checkpointing_, base_model_, memory_preset_, hardware_, seen_, key,
                  request: gr.Request = None, progress=gr.Progress()):
        owner = owner_for(request, settings)
        provider, charge = access.resolve(provider_key, owner, key, cost=1, address=client_address(request, settings),
                                          hf_token=hf_token_of(request))
        req = P.TrainRequest(
            name=name_ or "", mode=mode_, trigger_word=(trigger_ or "").strip(), iterations=int(iterations_),
            learning_rate=parse_learning_rate(lr_), lora_rank=int(rank_), finetune_type=type_,
            priority=priority_, captioning=bool(captioning_),
            options=registry.train_options(
                provider_key, gradient_checkpointing=CHECKPOINTING.get(checkpointing_ or "auto"),
                base_model=base_model_ if provider.picks_base_model else None,
                memory_preset=memory_preset_ if provider.picks_base_model else "",
                hardware=hardware_ if provider.picks_hardware else ""),
        )
        progress(0, desc="Exporting dataset")

        def uploaded(sent: int, total: int) -> None:
            progress(sent / total if total else 1.0, desc=f"Uploading dataset ({sent / 2**20:.1f} of {total / 2**20:.1f} MB)")

        try:
            job = service.launch(owner, provider_key, dataset_, req, on_upload=uploaded, provider=provider,
                                 charge=charge)
        except ProviderError as exc:
            # The job row records the failure; show it in place, not only as a toast.
            feedback.warning(exc.user_message())
            owned = service.jobs.list(owner)
            failed = owned[0] if owned and owned[0].status == "failed" else None
            return (f"❌ Launch failed: {plain(exc.user_message())}", jobs_frame(owned), job_markdown(failed),
                    failed.id if failed else None, gr.Timer(), seen_,
                    banner_markdown(service, provider_key, key, settings, calls_left(owner, request), signed_in(request)))
        owned = service.jobs.list(owner)
        if job.remote_id:
            msg = f"🚀 Launched **{plain(job.name)}** on {job.provider} (id `{job.remote_id}`). Tracking it below."
            feedback.info(f"Launched {job.name}.")
        else:
            msg = f"⏳ {plain(job.message)}"
        return (msg, jobs_frame(owned), job_markdown(job), job.id, gr.Timer(active=True),
                {**seen_, job.id: job.status},
                banner_markdown(service, provider_key, key, settings, calls_left(owner, request), signed_in(request)))

    def on_tick(selected_: str | None, seen_: dict, provider_key: str, key=None, request: gr.Request = None):
        owner = owner_for(request, settings)
        owned = service.jobs.list(owner)
        for j in owned:
            before = seen_.get(j.id)
            if before is not None and before != j.status:
                if j.status == "ready":
                    feedback.info(f"Fine-tune '{j.name}' is ready. Try it on the Compare tab.")
                elif j.status == "failed":
                    feedback.warning(f"Fine-tune '{j.name}' failed: {j.error}")
        current = next((j for j in owned if j.id == selected_), None)
        return (
            jobs_frame(owned),
            queue_markdown(service, owner, owned),
            job_markdown(current) if current else gr.update(),
            *progress_views(owner, current),
            gr.Timer(active=keep_polling(owned)),
            {j.id: j.status for j in owned},
            banner_markdown(service, provider_key, key, settings, calls_left(owner, request), signed_in(request)),
        )

    def progress_views(owner: str, job: Job | None):
        """The selected job's plot and samples, and what applies to it: (plot, gallery, progress row,
        Resume, publish box)."""
        controls = job_controls(service.providers.get(job.provider) if job else None, selected=job is not None)
        if job is None:
            return gr.update(), gr.update(), *controls
        events = service.jobs.events(owner, job.id, "step")
        return loss_plot_value(events), servable_items(sample_items(events)), *controls

    def on_select(table: pd.DataFrame, evt: gr.SelectData, request: gr.Request = None):
        owner = owner_for(request, settings)
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        short = str(table.iloc[row]["job"]) if table is not None and 0 <= row < len(table) else ""
        job = next((j for j in service.jobs.list(owner) if j.id.startswith(short)), None) if short else None
        return (job.id if job else None), job_markdown(job), *progress_views(owner, job)

    def require_selection(selected_: str | None) -> None:
        if not selected_:
            raise InputError("No job is selected.", hint="Click a row in the jobs table first.")

    @shows_errors
    def on_resume(selected_: str | None, request: gr.Request = None):
        require_selection(selected_)
        owner = owner_for(request, settings)
        job = service.resume(owner, selected_)
        feedback.info(f"Resuming '{job.name}' from its last checkpoint.")
        return jobs_frame(service.jobs.list(owner)), job_markdown(job), gr.Timer(active=True)

    @shows_errors
    def on_cancel(selected_: str | None, request: gr.Request = None):
        require_selection(selected_)
        owner = owner_for(request, settings)
        job = service.cancel(owner, selected_)
        trained_on = service.providers.get(job.provider)
        feedback.info(f"Cancelled '{job.name}'." + (" Its last checkpoint is kept: Resume continues from it."
                                               if trained_on is not None and trained_on.can_resume else ""))
        return jobs_frame(service.jobs.list(owner)), job_markdown(job)

    @shows_errors
    def on_delete(selected_: str | None, request: gr.Request = None):
        require_selection(selected_)
        owner = owner_for(request, settings)
        job = service.delete(owner, selected_)
        feedback.info(f"Deleted '{job.name}'.")
        return jobs_frame(service.jobs.list(owner)), job_markdown(None), None

    def on_publish(selected_: str | None, repo: str, token: str, private_: bool, request: gr.Request = None):
        """Publish, and clear the token box whatever happens: a token must not wait in the page."""
        try:
            return publish_selected(selected_, repo, token, private_, request), ""
        except Exception as exc:
            msg = feedback.message_for(exc, "on_publish")
            feedback.warning(f"Publish failed: {msg}")
            return f"❌ Publish failed: {plain(msg)} Paste the token again to retry.", ""

    def publish_selected(selected_: str | None, repo: str, token: str, private_: bool, request) -> str:
        require_selection(selected_)
        owner = owner_for(request, settings)
        job = service.jobs.get(owner, selected_)
        local = service.providers.get(job.provider)
        if local is None or not local.can_publish:
            raise InputError(f"'{job.name}' was trained on {job.provider}; only local LoRAs can be published from here.")
        if job.status != "ready" or not job.remote_id:
            raise InputError(f"'{job.name}' is {job.status}.", hint="Publish it once it is ready.")
        if not (token or "").strip():
            raise InputError("The token is empty.", hint="Paste a Hugging Face token with write access.")
        url = local.publish(job.remote_id, repo.strip(), Secret(token), private=bool(private_))
        feedback.info(f"Published '{job.name}'.")
        return f"✅ Published to [{repo.strip()}]({url}) ({'private' if private_ else 'public'})."

    publish.click(on_publish, [selected, repo_id, hf_token, private], [publish_result, hf_token], concurrency_limit=2)
    provider.change(on_provider, [provider, session_key, iterations, lora_rank, priority],
                    [banner, base_model, memory_row, hardware_row, hardware, hardware_info])
    gr.on([hardware.change, iterations.release, lora_rank.change, priority.change], on_hardware,
          [provider, session_key, iterations, lora_rank, priority, hardware], [hardware_info], show_progress="hidden")
    gr.on([base_model.change, memory_preset.change, lora_rank.change, priority.change, checkpointing.change],
          lambda *values: memory_summary(local, *values), [base_model, memory_preset, lora_rank, priority, checkpointing],
          [memory_info], show_progress="hidden")
    refresh.click(on_refresh, [dataset], [dataset])
    dataset.change(on_dataset, [dataset, mode, name], [trigger, name, dataset_info])
    mode.change(on_mode, [mode, dataset, name], [iterations, lora_rank, finetune_type, priority, captioning, name])
    launch.click(
        on_launch,
        [provider, dataset, mode, trigger, name, iterations, learning_rate, lora_rank, finetune_type, priority,
         captioning, checkpointing, base_model, memory_preset, hardware, seen, session_key],
        [launch_result, jobs, detail, selected, timer, seen, banner],
        concurrency_limit=4,
    )
    timer.tick(on_tick, [selected, seen, provider, session_key],
               [jobs, queue, detail, loss_plot, samples, progress_row, resume, publish_box, timer, seen, banner],
               concurrency_limit=None, show_progress="hidden")
    jobs.select(on_select, [jobs], [selected, detail, loss_plot, samples, progress_row, resume, publish_box])
    resume.click(on_resume, [selected], [jobs, detail, timer])
    cancel.click(on_cancel, [selected], [jobs, detail])
    delete.click(on_delete, [selected], [jobs, detail, selected],
                 js="(s) => { if (!confirm('Delete this job? A finished fine-tune is deleted on the provider too.')) throw new Error('cancelled'); return s; }")
    return tab
