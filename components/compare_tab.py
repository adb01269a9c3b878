"""The Compare tab: the same prompt and seed through the base and the tuned model, side by side."""
from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
from PIL import Image

from components import feedback
from components.feedback import plain, shows_errors
from components.identity import client_address, hf_token_of, owner_for
from components.serving import servable, servable_items
from services import compare as cmp
from services.access import ProviderAccess
from services.providers.cometapi.images import BASE_FOR
from services.config import THREAD_PREFIX, Settings
from services.errors import InputError
from services.targets import Target, authorize_target, guess_provider, ready_targets
from services.storage.jobs import JobStore
from services.providers.base import ASPECT_RATIOS, OUTPUT_FORMATS, GenerateRequest, Provider
from services.storage.results import ResultStore

TUNED_MODELS = list(BASE_FOR)  # flux-pro-1.1-ultra-finetuned, flux-pro-finetuned
PASTED = "__pasted__"
# The picker's hint starts as this; on_load replaces it, which also tells that the lists have arrived.
LOADING_FINETUNES = "Loading your fine-tunes…"


@dataclass
class CompareTab:
    finetune: gr.Dropdown
    history: gr.Gallery
    on_load: Callable  # (request) -> (finetune update, history items)


def target_choices(targets: list[Target]) -> list[tuple[str, str]]:
    return [(t.label, f"{t.provider_key}|{t.finetune_id}") for t in targets]


def finetunes_info(count: int) -> str:
    if not count:
        return "None of yours is ready yet: train one on the Train tab, or paste a fine-tune id."
    return f"{count} ready fine-tune(s) of yours, newest first."


def parse_target(choice: str | None, pasted: str, provider_keys: list[str]) -> Target:
    pasted = (pasted or "").strip()
    if pasted:
        return Target(guess_provider(pasted, provider_keys), pasted)
    if not choice or "|" not in choice:
        raise InputError("No fine-tune is selected.", hint="Pick a ready fine-tune, or paste a fine-tune id.")
    provider_key, finetune_id = choice.split("|", 1)
    return Target(provider_key, finetune_id)


def provider_views(provider: Provider | None) -> tuple[dict, dict, dict]:
    """What names or depends on the fine-tune's provider: the tuned-model choice (shown where the
    provider offers several models), and the base and fine-tune panels' labels."""
    if provider is None:
        return gr.update(), gr.update(), gr.update()
    return (gr.update(visible=provider.picks_tuned_model), gr.update(label=f"Base model · {provider.label}"),
            gr.update(label=f"Fine-tune · {provider.label}"))


def pair_panels(pair: "cmp.PairResult", provider: Provider, request: GenerateRequest) -> tuple[dict, dict]:
    """The two panels after a comparison. A failed image is replaced by its reason, drawn at the size of
    the image beside it (the request's, if both failed), so the panels keep one height."""
    def view(cell: "cmp.CellResult", other: "cmp.CellResult", what: str) -> dict:
        label = f"{what} · {provider.label}"
        if cell.status == "ok" and cell.path:
            return gr.update(value=servable(cell.path), label=label)
        size = (request.width, request.height)
        if other.status == "ok" and other.path:
            with Image.open(other.path) as im:
                size = im.size
        return gr.update(value=cmp.failure_card(cell, size), label=f"{label} · {cell.status}")

    return view(pair.base, pair.tuned, "Base model"), view(pair.tuned, pair.base, "Fine-tune")


def cell_caption(cell: "cmp.CellResult") -> str:
    head = "base" if cell.strength is None else f"strength {cell.strength:g}"
    if cell.status == "ok":
        return f"{head} · {cell.latency_s:.1f}s · seed {cell.seed}"
    return f"{head} · {'🚫 moderated' if cell.status == 'moderated' else '❌ error'}: {cell.error}"


def history_items(results: ResultStore, owner: str) -> list[tuple[str, str]]:
    items = []
    for r in results.list(owner, limit=60):
        if r.status != "ok":
            continue
        when = dt.datetime.fromtimestamp(r.created_at).strftime("%m-%d %H:%M")
        strength = "" if r.finetune_id is None else f" · strength {r.strength:g}"
        items.append((str(results.path_for(owner, r)), f"{when} · {r.model}{strength} · seed {r.seed} · {r.prompt[:60]}"))
    return servable_items(items)


def build(access: ProviderAccess, jobs: JobStore, results: ResultStore, settings: Settings,
          placeholder: Path, session_key: gr.State) -> CompareTab:
    provider_keys = list(access.providers)
    gr.Markdown("Run one prompt with one seed through the base model and your fine-tune, side by side.")
    with gr.Row():
        finetune = gr.Dropdown(choices=[], value=None, label="Ready fine-tune", scale=3, elem_id="compare-finetune",
                               info=LOADING_FINETUNES)
        pasted = gr.Textbox(label="…or paste a fine-tune id", scale=2, elem_id="compare-pasted")
        tuned_model = gr.Radio(TUNED_MODELS, value=TUNED_MODELS[0], label="Tuned model (CometAPI)", scale=2,
                               elem_id="compare-model")
        refresh = gr.Button("↻", size="sm", scale=0, min_width=40)
    prompt = gr.Textbox(label="Prompt", lines=2, elem_id="compare-prompt",
                        placeholder="a photo of TOK on a marble table, soft light",
                        info="Use the trigger word so the fine-tune knows what to draw.")
    with gr.Row():
        seed = gr.Number(value=42, precision=0, label="Seed (fixed)", minimum=0, maximum=2**31 - 1, elem_id="compare-seed")
        dice = gr.Button("🎲 Random seed", size="sm", scale=0)
        strength = gr.Slider(0, 2, value=1.2, step=0.05, label="Fine-tune strength", elem_id="compare-strength")
    with gr.Accordion("More settings", open=False):
        with gr.Row():
            aspect = gr.Dropdown(list(ASPECT_RATIOS), value="1:1", label="Aspect ratio (ultra models)")
            width = gr.Slider(256, 1440, value=1024, step=32, label="Width (flux-pro / local)")
            height = gr.Slider(256, 1440, value=768, step=32, label="Height (flux-pro / local)")
        with gr.Row():
            steps = gr.Slider(1, 50, value=40, step=1, label="Steps (flux-pro-finetuned / local)")
            guidance = gr.Slider(1.5, 5, value=2.5, step=0.1, label="Guidance (flux-pro-finetuned / local)")
            safety = gr.Slider(0, 6, value=2, step=1, label="Safety tolerance")
            fmt = gr.Radio(list(OUTPUT_FORMATS), value="jpeg", label="Output format")
    go = gr.Button("Generate base and tuned", variant="primary", elem_id="compare-go")
    with gr.Row():
        base_img = gr.Image(label="Base model", type="filepath", interactive=False, elem_id="compare-base",
                            buttons=["download"])
        tuned_img = gr.Image(label="Fine-tune", type="filepath", interactive=False, elem_id="compare-tuned",
                             buttons=["download"])
    pair_info = gr.Markdown(elem_id="compare-pair-info")

    gr.Markdown("### Strength sweep and prompt list")
    with gr.Row():
        prompts = gr.Textbox(label="Prompts (one per line)", lines=3, elem_id="grid-prompts", scale=3)
        with gr.Column(scale=2):
            strengths = gr.Textbox(value="0.6, 0.9, 1.2, 1.5", label="Strengths (columns)", elem_id="grid-strengths")
            include_base = gr.Checkbox(value=True, label="Include a base-model column")
    grid_go = gr.Button("Run grid", variant="primary", elem_id="grid-go")
    grid = gr.Gallery(label="Grid (rows = prompts, columns = base + strengths)", columns=5, height="auto",
                      object_fit="contain", elem_id="grid-gallery")
    grid_info = gr.Markdown(elem_id="grid-info")
    with gr.Row():
        sheet_btn = gr.Button("Export contact sheet (PNG)", elem_id="grid-sheet")
        sheet_file = gr.File(label="Contact sheet", interactive=False, elem_id="grid-sheet-file")
    last_grid = gr.State(None)

    gr.Markdown("### History")
    history = gr.Gallery(label="Every image generated here (saved locally at once; links from the service expire)",
                         columns=6, height=320, buttons=["download"], elem_id="compare-history")

    def request_from(prompt_, seed_, strength_, aspect_, width_, height_, steps_, guidance_, safety_, fmt_):
        if not (prompt_ or "").strip():
            raise InputError("The prompt is empty.", hint="Describe the picture, with the trigger word.")
        return GenerateRequest(
            prompt=prompt_.strip(), seed=int(seed_ or 0), width=int(width_), height=int(height_),
            aspect_ratio=aspect_, steps=int(steps_), guidance=float(guidance_), safety_tolerance=int(safety_),
            output_format=fmt_, strength=float(strength_),
        )

    def on_load(request: gr.Request = None):
        owner = owner_for(request, settings)
        targets = ready_targets(jobs, owner)
        choices = target_choices(targets)
        return gr.update(choices=choices, value=choices[0][1] if targets else None, info=finetunes_info(len(targets))), \
            history_items(results, owner)

    def on_pick(choice: str | None, request: gr.Request = None):
        owner = owner_for(request, settings)
        target = next((t for t in ready_targets(jobs, owner) if f"{t.provider_key}|{t.finetune_id}" == choice), None)
        views = provider_views(access.providers.get(target.provider_key) if target else None)
        if target and target.trigger:
            return gr.update(info=f"Use the trigger word “{target.trigger}” so the fine-tune knows what to draw."), *views
        return gr.update(), *views

    def own_target(target: Target, owner: str, key, request) -> Target:
        """The target if this visitor may use it; their own credentials are their CometAPI key or, for
        Hugging Face, their sign-in."""
        own = bool(key) if target.provider_key == "cometapi" else hf_token_of(request) is not None
        return authorize_target(target, jobs, owner, settings, own)

    def budget_note(target: Target, key, owner: str, request) -> str:
        """Hosted, on the shared key: how many paid calls this visitor has left this hour."""
        if not settings.hosted or target.provider_key != "cometapi" or key:
            return ""
        left = access.budget.remaining(owner, client_address(request, settings))
        return f"\n\nShared key: {left} paid call(s) left for you this hour."

    @shows_errors
    # Explicit parameters, not *args: Gradio injects gr.Request / gr.Progress by position.
    def on_compare(choice, pasted_, model_, key, prompt_, seed_, strength_, aspect_, width_, height_, steps_,
                   guidance_, safety_, fmt_, request: gr.Request = None):
        owner = owner_for(request, settings)
        target = own_target(parse_target(choice, pasted_, provider_keys), owner, key, request)
        req = request_from(prompt_, seed_, strength_, aspect_, width_, height_, steps_, guidance_, safety_, fmt_)
        provider = access.get(target.provider_key, owner, key, cost=2, address=client_address(request, settings),
                              hf_token=hf_token_of(request))
        result = cmp.compare_pair(
            provider, req, finetune_id=target.finetune_id, tuned_model=model_,
            out_dir=results.out_dir(owner), owner=owner, results=results,
        )
        for cell in (result.base, result.tuned):
            if cell.status != "ok":
                feedback.warning(f"{'Base' if cell is result.base else 'Fine-tune'}: {cell.error}")
        # A hosted service renders both at once; a local engine with one pipeline takes turns.
        overlapped = result.wall_s < 0.9 * (result.base.latency_s + result.tuned.latency_s)
        info = (f"Same prompt, seed {req.seed}. Base `{result.base.model}`: {_cell_summary(result.base)} · "
                f"Tuned `{result.tuned.model}` at strength {req.strength:g}: {_cell_summary(result.tuned)} · "
                f"wall time {result.wall_s:.1f}s" + (" (both ran at once)." if overlapped else "."))
        if trained_on_tiny(provider, target.finetune_id):
            info += ("\n\n*Local engine on a tiny test model: its images are noise by design; train on a real base "
                     "model (the Train tab's picker, or FLUX_LOCAL_MODEL) for real ones.*")
        fixed = provider.strength_fixed(target.finetune_id)
        if fixed and abs(req.strength - 1.0) > 1e-9:
            info += f"\n\n*{plain(fixed)} The tuned image is at strength 1, not {req.strength:g}.*"
        info += budget_note(target, key, owner, request)
        return *pair_panels(result, provider, req), info, history_items(results, owner)

    @shows_errors
    def on_grid(choice, pasted_, model_, key, prompts_, strengths_, include_base_, prompt_, seed_, strength_,
                aspect_, width_, height_, steps_, guidance_, safety_, fmt_, request: gr.Request = None,
                progress=gr.Progress()):
        owner = owner_for(request, settings)
        target = own_target(parse_target(choice, pasted_, provider_keys), owner, key, request)
        strengths_list = cmp.parse_strengths(strengths_)
        # Validated before the shared-key limit is charged for it.
        lines, columns = cmp.plan_grid((prompts_ or "").splitlines(), strengths_list, include_base_,
                                       target.finetune_id)
        template = request_from(lines[0], seed_, strength_, aspect_, width_, height_, steps_, guidance_, safety_,
                                fmt_)
        total = len(lines) * len(columns)
        provider = access.get(target.provider_key, owner, key, cost=total, address=client_address(request, settings),
                              hf_token=hf_token_of(request))
        waiting = servable(placeholder)
        cells: list = [(waiting, f"{lines[i // len(columns)][:40]} · {columns[i % len(columns)]} · waiting…")
                       for i in range(total)]
        updates: list = []
        lock = threading.Lock()
        done_event = threading.Event()

        def on_cell(cell, grid_progress):
            with lock:
                idx = cell.row * len(columns) + cell.col
                path = servable(cell.path) if cell.path else waiting
                cells[idx] = (path, f"{cell.prompt[:40]} · {cell_caption(cell)}")
                updates.append(grid_progress.done)

        outcome: dict = {}
        page_gone = threading.Event()

        def run():
            try:
                outcome["grid"] = cmp.run_grid(
                    provider, lines, strengths_list, template,
                    finetune_id=target.finetune_id, tuned_model=model_, include_base=include_base_,
                    max_concurrency=4, on_cell=on_cell, out_dir=results.out_dir(owner), owner=owner, results=results,
                    cancel=page_gone,
                )
            except Exception as exc:  # surfaced below, in the handler's thread
                outcome["error"] = exc
            finally:
                done_event.set()

        worker = threading.Thread(target=run, name=f"{THREAD_PREFIX}grid", daemon=True)
        worker.start()
        shown = -1
        # Stream cells to the page as they finish. If the page goes away (Gradio closes this
        # generator), the grid stops starting cells: nobody would see them, and each one is paid for.
        try:
            while not done_event.wait(0.25):
                with lock:
                    n = len(updates)
                    snapshot = list(cells)
                if n != shown:
                    shown = n
                    progress((n, total), desc=f"{n} of {total} cells")
                    yield snapshot, f"{n} of {total} cells done…", gr.update(), gr.update()
        except GeneratorExit:
            page_gone.set()
            raise
        if "error" in outcome:
            raise outcome["error"]
        grid_result = outcome["grid"]
        failed = sum(1 for row in grid_result.cells for c in row if c.status != "ok")
        summary = (f"{len(lines)} prompt(s) × {len(columns)} column(s), seed {template.seed}, "
                   f"wall time {grid_result.wall_s:.1f}s" + (f"; {failed} cell(s) failed (reason in the caption)." if failed else "."))
        problems = [f"- row {c.row + 1} ({plain(c.prompt[:40])}), {columns[c.col]}: **{c.status}**: {plain(c.error)}"
                    for row in grid_result.cells for c in row if c.status != "ok"]
        if problems:
            summary += "\n\n" + "\n".join(problems[:12]) + ("\n- …" if len(problems) > 12 else "")
        summary += budget_note(target, key, owner, request)
        yield list(cells), summary, grid_result, history_items(results, owner)

    @shows_errors
    def on_sheet(grid_result, request: gr.Request = None):
        if grid_result is None:
            raise InputError("There is no grid yet.", hint="Run a grid first.")
        owner = owner_for(request, settings)
        return servable(cmp.contact_sheet(grid_result, results.contact_sheet_path(owner, grid_result.group_id)))

    fields = [prompt, seed, strength, aspect, width, height, steps, guidance, safety, fmt]
    finetune.change(on_pick, [finetune], [prompt, tuned_model, base_img, tuned_img])
    dice.click(lambda: cmp.random_seed(), None, [seed])
    go.click(on_compare, [finetune, pasted, tuned_model, session_key, *fields], [base_img, tuned_img, pair_info, history],
             concurrency_limit=8)
    grid_go.click(on_grid, [finetune, pasted, tuned_model, session_key, prompts, strengths, include_base, *fields],
                  [grid, grid_info, last_grid, history], concurrency_limit=4)
    sheet_btn.click(on_sheet, [last_grid], [sheet_file])
    refresh.click(on_load, None, [finetune, history])
    return CompareTab(finetune=finetune, history=history, on_load=on_load)


def trained_on_tiny(provider, finetune_id: str) -> bool:
    """Whether a local fine-tune's base model is a tiny test model (whose images are noise)."""
    return provider.is_tiny_model(provider.base_model_of(finetune_id))


def _cell_summary(cell: "cmp.CellResult") -> str:
    if cell.status == "ok":
        return f"{cell.latency_s:.1f}s"
    return f"{cell.status}: {plain(cell.error)}"
