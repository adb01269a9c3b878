"""The Compare tab: the same prompt and seed through the base and the tuned model, side by side.

``ComparePage`` is the page over ``Studio``: a comparison is ``Studio.compare`` and a grid ``Studio.grid``
(its cells streamed to the page through ``on_cell``), both for the event's caller; the settings arrive
as one named form (``CompareForm``, ``GridForm``). The handlers can be called without a browser."""
from __future__ import annotations

import datetime as dt
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from components import feedback
from components.feedback import plain, shows_errors
from components.forms import Form
from components.identity import caller_for
from components.serving import servable, servable_items
from services.caller import Caller
from services.config import THREAD_PREFIX, Secret
from services.errors import InputError
from services.providers.base import ASPECT_RATIOS, OUTPUT_FORMATS, GenerateRequest, ImportedLora, Provider
from services.studio import (CellResult, Comparison, Grid, PairResult, ResultRecord, Studio, Target, failure_card,
                             parse_strengths, plan_grid, random_seed)

# The picker's hint starts as this; on_load replaces it, which also tells that the lists have arrived.
LOADING_FINETUNES = "Loading your fine-tunes…"
IMPORT_INFO = ("Render a FLUX.1 or FLUX.2 [klein] LoRA made elsewhere (another trainer, the Hub, Civitai, a "
               "Hugging Face job) on the local engine, as a fine-tune made here: a `.safetensors` file with "
               "diffusers, kohya / FluxGym / musubi or ComfyUI / BFL keys. Its family is read from the keys.")
HUB_INFO_LOCAL = "owner/name. Downloaded into the Hugging Face cache; HF_TOKEN for a gated or private repo."
HUB_INFO_HOSTED = ("owner/name. Needs your own sign-in: “Sign in with Hugging Face” at the top of the page "
                   "(it also opens your gated or private repos).")


@dataclass
class CompareForm(Form):
    """What a comparison reads: the fine-tune (picked or pasted) and the generation's settings."""

    finetune: Any
    pasted: Any
    tuned_model: Any
    prompt: Any
    seed: Any
    strength: Any
    aspect: Any
    width: Any
    height: Any
    steps: Any
    guidance: Any
    safety: Any
    fmt: Any


@dataclass
class GridForm(CompareForm):
    """What a grid reads besides: one prompt per line, the strengths (columns) and the base-model column."""

    prompts: Any = None
    strengths: Any = None
    include_base: Any = None


def target_value(target: Target) -> str:
    """The picker's value for ``target``: a fine-tune's job id, an imported LoRA's id (``Studio`` takes both)."""
    return target.job_id or target.finetune_id


def target_choices(targets: list[Target]) -> list[tuple[str, str]]:
    """The picker's (label, value), as ``Studio`` looks each one up."""
    return [(t.label, target_value(t)) for t in targets]


def picker_update(targets: list[Target], value: str | None = None) -> dict:
    """The refreshed picker, on ``value`` (else the newest fine-tune), with how many there are."""
    choices = target_choices(targets)
    values = [v for _, v in choices]
    return gr.update(choices=choices, value=value if value in values else (values[0] if values else None),
                     info=finetunes_info(sum(not t.imported for t in targets), sum(t.imported for t in targets)))


def import_summary(lora: ImportedLora) -> str:
    """What an import found in the file, and what it renders on."""
    trigger = f" Its trigger word is `{plain(lora.trigger_word)}`." if lora.trigger_word else ""
    return (f"✅ Imported **{plain(lora.name)}** from `{plain(lora.source)}`: a {plain(lora.family_label)} LoRA, "
            f"{plain(lora.layout)} keys, rank {lora.rank}. It renders on {plain(lora.base_model_label)} "
            f"(`{plain(lora.base_model)}`) and is picked above.{trigger}")


def finetunes_info(count: int, imported: int = 0) -> str:
    if not count + imported:
        return "None of yours is ready yet: train one on the Train tab, or paste a fine-tune id."
    more = f", then {imported} LoRA(s) you imported" if imported else ""
    return f"{count} ready fine-tune(s) of yours, newest first{more}."


def finetune_ref(form: CompareForm) -> str:
    """The fine-tune to use: a pasted id first, else the picked one."""
    ref = (form.pasted or "").strip() or (form.finetune or "")
    if not ref:
        raise InputError("No fine-tune is selected.", hint="Pick a ready fine-tune, or paste a fine-tune id.")
    return ref


def provider_views(provider: Provider | None) -> tuple[dict, dict, dict]:
    """What names or depends on the fine-tune's provider: the tuned-model choice (shown where the
    provider offers several models), and the base and fine-tune panels' labels."""
    if provider is None:
        return gr.update(), gr.update(), gr.update()
    return (gr.update(visible=provider.picks_tuned_model), gr.update(label=f"Base model · {provider.label}"),
            gr.update(label=f"Fine-tune · {provider.label}"))


def pair_panels(pair: PairResult, provider: Provider, request: GenerateRequest) -> tuple[dict, dict]:
    """The two panels after a comparison. A failed image is replaced by its reason, drawn at the size of
    the image beside it (the request's, if both failed), so the panels keep one height."""
    def view(cell: CellResult, other: CellResult, what: str) -> dict:
        label = f"{what} · {provider.label}"
        if cell.status == "ok" and cell.path:
            return gr.update(value=servable(cell.path), label=label)
        size = (request.width, request.height)
        if other.status == "ok" and other.path:
            with Image.open(other.path) as im:
                size = im.size
        return gr.update(value=failure_card(cell, size), label=f"{label} · {cell.status}")

    return view(pair.base, pair.tuned, "Base model"), view(pair.tuned, pair.base, "Fine-tune")


def pair_info(comparison: Comparison) -> str:
    """The line under the two panels: timings, and what the images can't show (noise, fixed strength, budget)."""
    pair, req = comparison.pair, comparison.request
    # A hosted service renders both at once; a local engine with one pipeline takes turns.
    overlapped = pair.wall_s < 0.9 * (pair.base.latency_s + pair.tuned.latency_s)
    info = (f"Same prompt, seed {req.seed}. Base `{pair.base.model}`: {_cell_summary(pair.base)} · "
            f"Tuned `{pair.tuned.model}` at strength {req.strength:g}: {_cell_summary(pair.tuned)} · "
            f"wall time {pair.wall_s:.1f}s" + (" (both ran at once)." if overlapped else "."))
    if comparison.tiny:
        info += ("\n\n*Local engine on a tiny test model: its images are noise by design; train on a real base "
                 "model (the Train tab's picker, or FLUX_LOCAL_MODEL) for real ones.*")
    fixed = comparison.strength_fixed
    if fixed and abs(req.strength - 1.0) > 1e-9:
        info += f"\n\n*{plain(fixed)} The tuned image is at strength 1, not {req.strength:g}.*"
    return info + budget_note(comparison.calls_left)


def grid_summary(grid: Grid, columns: list[str], seed: int) -> str:
    result = grid.result
    summary = (f"{len(result.prompts)} prompt(s) × {len(columns)} column(s), seed {seed}, "
               f"wall time {result.wall_s:.1f}s" + (f"; {grid.failed} cell(s) failed (reason in the caption)."
                                                    if grid.failed else "."))
    problems = [f"- row {c.row + 1} ({plain(c.prompt[:40])}), {columns[c.col]}: **{c.status}**: {plain(c.error)}"
                for row in result.cells for c in row if c.status != "ok"]
    if problems:
        summary += "\n\n" + "\n".join(problems[:12]) + ("\n- …" if len(problems) > 12 else "")
    return summary + budget_note(grid.calls_left)


def budget_note(calls_left: int | None) -> str:
    """Hosted, on the shared key: how many paid calls this visitor has left this hour."""
    return "" if calls_left is None else f"\n\nShared key: {calls_left} paid call(s) left for you this hour."


def cell_caption(cell: CellResult) -> str:
    head = "base" if cell.strength is None else f"strength {cell.strength:g}"
    if cell.status == "ok":
        return f"{head} · {cell.latency_s:.1f}s · seed {cell.seed}"
    return f"{head} · {'🚫 moderated' if cell.status == 'moderated' else '❌ error'}: {cell.error}"


def history_items(generated: list[tuple[Path, ResultRecord]]) -> list[tuple[str, str]]:
    items = []
    for path, r in generated:
        when = dt.datetime.fromtimestamp(r.created_at).strftime("%m-%d %H:%M")
        strength = "" if r.finetune_id is None else f" · strength {r.strength:g}"
        items.append((str(path), f"{when} · {r.model}{strength} · seed {r.seed} · {r.prompt[:60]}"))
    return servable_items(items)


class ComparePage:
    """The Compare tab over ``studio``; ``placeholder`` is the tile a grid cell shows until it is drawn."""

    def __init__(self, studio: Studio, placeholder: Path, session_key: gr.State) -> None:
        self.studio = studio
        self.settings = studio.settings
        self.placeholder = placeholder
        self.session_key = session_key
        self._layout()
        self._wire()

    def caller(self, request: gr.Request | None, key: Secret | None = None) -> Caller:
        return caller_for(request, self.settings, key)

    def _layout(self) -> None:
        tuned_models = self.studio.tuned_models()
        gr.Markdown("Run one prompt with one seed through the base model and your fine-tune, side by side.")
        with gr.Row():
            finetune = gr.Dropdown(choices=[], value=None, label="Ready fine-tune", scale=3,
                                   elem_id="compare-finetune", info=LOADING_FINETUNES)
            pasted = gr.Textbox(label="…or paste a fine-tune id", scale=2, elem_id="compare-pasted")
            tuned_model = gr.Radio(tuned_models, value=tuned_models[0] if tuned_models else None,
                                   label="Tuned model (CometAPI)", scale=2, elem_id="compare-model")
            self.refresh = gr.Button("↻", size="sm", scale=0, min_width=40)
        prompt = gr.Textbox(label="Prompt", lines=2, elem_id="compare-prompt",
                            placeholder="a photo of TOK on a marble table, soft light",
                            info="Use the trigger word so the fine-tune knows what to draw.")
        with gr.Row():
            seed = gr.Number(value=42, precision=0, label="Seed (fixed)", minimum=0, maximum=2**31 - 1,
                             elem_id="compare-seed")
            self.dice = gr.Button("🎲 Random seed", size="sm", scale=0)
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
        self.go = gr.Button("Generate base and tuned", variant="primary", elem_id="compare-go")
        with gr.Row():
            self.base_img = gr.Image(label="Base model", type="filepath", interactive=False, elem_id="compare-base",
                                     buttons=["download"])
            self.tuned_img = gr.Image(label="Fine-tune", type="filepath", interactive=False, elem_id="compare-tuned",
                                      buttons=["download"])
        self.pair_info = gr.Markdown(elem_id="compare-pair-info")
        self._import_layout()

        gr.Markdown("### Strength sweep and prompt list")
        with gr.Row():
            prompts = gr.Textbox(label="Prompts (one per line)", lines=3, elem_id="grid-prompts", scale=3)
            with gr.Column(scale=2):
                strengths = gr.Textbox(value="0.6, 0.9, 1.2, 1.5", label="Strengths (columns)",
                                       elem_id="grid-strengths")
                include_base = gr.Checkbox(value=True, label="Include a base-model column")
        self.grid_go = gr.Button("Run grid", variant="primary", elem_id="grid-go")
        self.grid = gr.Gallery(label="Grid (rows = prompts, columns = base + strengths)", columns=5, height="auto",
                               object_fit="contain", elem_id="grid-gallery")
        self.grid_info = gr.Markdown(elem_id="grid-info")
        with gr.Row():
            self.sheet_btn = gr.Button("Export contact sheet (PNG)", elem_id="grid-sheet")
            self.sheet_file = gr.File(label="Contact sheet", interactive=False, elem_id="grid-sheet-file")
        self.last_grid = gr.State(None)

        gr.Markdown("### History")
        self.history = gr.Gallery(
            label="Every image generated here (saved locally at once; links from the service expire)",
            columns=6, height=320, buttons=["download"], elem_id="compare-history")
        settings = (finetune, pasted, tuned_model, prompt, seed, strength, aspect, width, height, steps, guidance,
                    safety, fmt)
        self.form = CompareForm(*settings)
        self.grid_form = GridForm(*settings, prompts, strengths, include_base)

    def _import_layout(self) -> None:
        """The "Use any LoRA" box: shown where a provider of this app renders LoRA files (the local engine)."""
        imports = any(p.imports_loras for p in self.studio.providers.values())
        with gr.Accordion("Use any LoRA", open=False, visible=imports, elem_id="compare-import-box"):
            gr.Markdown(IMPORT_INFO)
            with gr.Row():
                self.import_file = gr.File(label="LoRA file (.safetensors)", file_types=[".safetensors"],
                                           type="filepath", file_count="single", elem_id="compare-import-file",
                                           scale=2)
                with gr.Column(scale=2):
                    self.import_repo = gr.Textbox(label="…or a Hugging Face model repo", elem_id="compare-import-repo",
                                                  placeholder="owner/flux-lora",
                                                  info=HUB_INFO_HOSTED if self.settings.hosted else HUB_INFO_LOCAL)
                    self.import_name = gr.Textbox(label="Name (optional)", elem_id="compare-import-name",
                                                  info="Empty: the file's or the repo's name.")
            with gr.Row():
                self.import_go = gr.Button("Import", variant="primary", size="sm", elem_id="compare-import-go")
                self.import_delete = gr.Button("Delete the picked imported LoRA", variant="stop", size="sm",
                                               elem_id="compare-import-delete")
            self.import_info = gr.Markdown(elem_id="compare-import-info")

    def _wire(self) -> None:
        f = self.form
        self.import_go.click(self.on_import, [self.import_file, self.import_repo, self.import_name],
                             [f.finetune, self.import_info, self.import_file], concurrency_limit=2)
        self.import_delete.click(self.on_delete_import, [f.finetune], [f.finetune, self.import_info],
                                 js="(c) => { if (!confirm('Delete this imported LoRA? Its file is removed from this "
                                    "app.')) throw new Error('cancelled'); return c; }")
        f.finetune.change(self.on_pick, [f.finetune], [f.prompt, f.tuned_model, self.base_img, self.tuned_img])
        self.dice.click(random_seed, None, [f.seed])
        self.go.click(self.on_compare, f.inputs(self.session_key),
                      [self.base_img, self.tuned_img, self.pair_info, self.history], concurrency_limit=8)
        self.grid_go.click(self.on_grid, self.grid_form.inputs(self.session_key),
                           [self.grid, self.grid_info, self.last_grid, self.history], concurrency_limit=4)
        self.sheet_btn.click(self.on_sheet, [self.last_grid], [self.sheet_file])
        self.refresh.click(self.on_load, None, [f.finetune, self.history])

    def load_on(self, *triggers) -> "ComparePage":
        """Fill the picker and the history in for the visitor on each of ``triggers`` (the page's load,
        opening the tab): a fine-tune that became ready while they were elsewhere shows up."""
        gr.on(list(triggers), self.on_load, None, [self.form.finetune, self.history], show_progress="hidden")
        return self

    # -- handlers

    def history_of(self, caller: Caller) -> list[tuple[str, str]]:
        return history_items(self.studio.generated(caller=caller))

    def on_load(self, request: gr.Request = None):
        caller = self.caller(request)
        return picker_update(self.studio.ready_finetunes(caller)), self.history_of(caller)

    def on_pick(self, choice: str | None, request: gr.Request = None):
        target = next((t for t in self.studio.ready_finetunes(self.caller(request)) if target_value(t) == choice),
                      None)
        views = provider_views(self.studio.providers.get(target.provider_key) if target else None)
        if target and target.trigger:
            return gr.update(info=f"Use the trigger word “{target.trigger}” so the fine-tune knows what to draw."), \
                *views
        return gr.update(), *views

    @shows_errors
    def on_compare(self, data: dict, request: gr.Request = None):
        """``data``: the values of ``form.inputs(session_key)``, keyed by component."""
        form = self.form.read(data)
        caller = self.caller(request, data[self.session_key])
        comparison = self.studio.compare(
            finetune_ref(form), form.prompt, seed=form.seed, strength=form.strength, aspect_ratio=form.aspect,
            width=form.width, height=form.height, steps=form.steps, guidance=form.guidance,
            safety_tolerance=form.safety, output_format=form.fmt, tuned_model=form.tuned_model, caller=caller)
        pair = comparison.pair
        for cell in (pair.base, pair.tuned):
            if cell.status != "ok":
                feedback.warning(f"{'Base' if cell is pair.base else 'Fine-tune'}: {cell.error}")
        provider = self.studio.provider_for(comparison.target.provider_key, caller)
        return (*pair_panels(pair, provider, comparison.request), pair_info(comparison), self.history_of(caller))

    @shows_errors
    def on_grid(self, data: dict, request: gr.Request = None, progress=gr.Progress()):
        """``data``: the values of ``grid_form.inputs(session_key)``, keyed by component. Streams the cells
        as they finish; if the page goes away (Gradio closes this generator), the grid starts no further
        cell: nobody would see it, and each one is paid for."""
        form = self.grid_form.read(data)
        caller = self.caller(request, data[self.session_key])
        ref = finetune_ref(form)
        strengths = parse_strengths(form.strengths)
        # Laid out (and checked) before anything is charged; Studio checks it again, whole.
        lines, columns = plan_grid((form.prompts or "").splitlines(), strengths, form.include_base, ref)
        total = len(lines) * len(columns)
        waiting = servable(self.placeholder)
        cells: list = [(waiting, f"{lines[i // len(columns)][:40]} · {columns[i % len(columns)]} · waiting…")
                       for i in range(total)]
        lock = threading.Lock()
        done = threading.Event()
        page_gone = threading.Event()
        outcome: dict = {}
        finished = 0

        def on_cell(cell: CellResult, grid_progress) -> None:
            nonlocal finished
            with lock:
                path = servable(cell.path) if cell.path else waiting
                cells[cell.row * len(columns) + cell.col] = (path, f"{cell.prompt[:40]} · {cell_caption(cell)}")
                finished = grid_progress.done

        def run() -> None:
            try:
                outcome["grid"] = self.studio.grid(
                    ref, lines, strengths, include_base=form.include_base, seed=form.seed, width=form.width,
                    height=form.height, aspect_ratio=form.aspect, steps=form.steps, guidance=form.guidance,
                    safety_tolerance=form.safety, output_format=form.fmt, tuned_model=form.tuned_model,
                    caller=caller, on_cell=on_cell, cancel=page_gone)
            except Exception as exc:  # surfaced below, in the handler's thread
                outcome["error"] = exc
            finally:
                done.set()

        threading.Thread(target=run, name=f"{THREAD_PREFIX}grid", daemon=True).start()
        shown = -1
        try:
            while not done.wait(0.25):
                with lock:
                    n, snapshot = finished, list(cells)
                if n != shown:
                    shown = n
                    progress((n, total), desc=f"{n} of {total} cells")
                    yield snapshot, f"{n} of {total} cells done…", gr.update(), gr.update()
        except GeneratorExit:
            page_gone.set()
            raise
        if "error" in outcome:
            raise outcome["error"]
        grid: Grid = outcome["grid"]
        yield list(cells), grid_summary(grid, columns, int(form.seed or 0)), grid, self.history_of(caller)

    @shows_errors
    def on_import(self, file: str | None, repo: str, name: str, request: gr.Request = None,
                  progress=gr.Progress()):
        """Import the uploaded file or the Hub repo, then pick it: (picker, summary, the emptied file box)."""
        caller = self.caller(request)
        progress(0, desc="Checking the LoRA")

        def downloaded(done: int, total: int) -> None:
            progress((done, total) if total else 1.0,
                     desc=f"Downloading the LoRA ({done / 2**20:.1f} of {total / 2**20:.1f} MB)")

        lora = self.studio.import_lora_from(file, repo, name=(name or "").strip(), caller=caller,
                                            on_progress=downloaded)
        feedback.info(f"Imported '{lora.name}'.")
        return picker_update(self.studio.ready_finetunes(caller), lora.id), import_summary(lora), None

    @shows_errors
    def on_delete_import(self, choice: str | None, request: gr.Request = None):
        caller = self.caller(request)
        picked = next((t for t in self.studio.ready_finetunes(caller) if target_value(t) == choice), None)
        if picked is None or not picked.imported:
            raise InputError("The picked fine-tune is not a LoRA you imported.",
                             hint="Pick the imported LoRA to delete in the list above.")
        self.studio.delete_imported(picked.finetune_id, caller=caller)
        feedback.info(f"Deleted '{picked.name}'.")
        return picker_update(self.studio.ready_finetunes(caller)), f"Deleted the imported LoRA **{plain(picked.name)}**."

    @shows_errors
    def on_sheet(self, grid: Grid | None):
        if grid is None:
            raise InputError("There is no grid yet.", hint="Run a grid first.")
        return servable(grid.save_contact_sheet())


def build(studio: Studio, placeholder: Path, session_key: gr.State, demo: gr.Blocks, tab: gr.Tab) -> ComparePage:
    """The Compare tab, filled in for the visitor when the page loads and each time the tab is opened."""
    return ComparePage(studio, placeholder, session_key).load_on(demo.load, tab.select)


def _cell_summary(cell: CellResult) -> str:
    if cell.status == "ok":
        return f"{cell.latency_s:.1f}s"
    return f"{cell.status}: {plain(cell.error)}"
