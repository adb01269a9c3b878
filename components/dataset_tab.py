"""The Dataset tab: upload, look, label, fix, export."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pandas as pd

from components import feedback
from components.feedback import plain, progress_callback, shows_errors
from components.identity import client_address, owner_for
from components.serving import servable, servable_items
from services.storage import captions
from services.config import Settings
from services.storage.datasets import Dataset, DatasetStore, ImportReport, dataset_warnings
from services.captioning import CAPTION_MODES, Captioner, images_to_caption
from services.errors import InputError

COLUMNS = ["file", "caption", "width", "height", "notes"]


@dataclass
class DatasetTab:
    dataset: gr.Dropdown
    new_name: gr.Textbox
    upload: gr.File
    report: gr.Markdown
    gallery: gr.Gallery
    selected: gr.State
    trigger: gr.Textbox
    table: gr.Dataframe
    warnings: gr.Markdown
    export_file: gr.File
    export_info: gr.Markdown
    # Called on page load so a new visitor sees datasets created since the app started.
    refresh: Callable


# ---------------------------------------------------------------- views (plain functions)


def captions_frame(ds: Dataset | None) -> pd.DataFrame:
    rows = [[i.file, i.caption, i.width, i.height, i.notes] for i in ds.items] if ds else []
    return pd.DataFrame(rows, columns=COLUMNS)


def gallery_items(ds: Dataset | None) -> list[tuple[str, str]]:
    if not ds:
        return []
    return servable_items([(str(ds.image_path(i.file)), f"{i.file}: {i.caption}" if i.caption else i.file)
                           for i in ds.items])


def warnings_markdown(ds: Dataset | None, settings: Settings) -> str:
    if ds is None:
        return "Pick a saved dataset or upload images to start a new one."
    found = dataset_warnings(ds, settings)
    head = f"**{plain(ds.name)}**: {len(ds.items)} image(s), {sum(1 for i in ds.items if i.caption.strip())} captioned."
    if not found:
        return head + "\n\nReady to export: no problems found."
    return head + "\n\n" + "\n".join(f"- ⚠️ {plain(w)}" for w in found)


def report_markdown(report: ImportReport) -> str:
    lines = [plain(line) for line in report.lines()]  # they quote the uploaded files' own names
    return "\n".join([f"**{lines[0]}**"] + [f"- {line}" for line in lines[1:]])


def human_size(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


# ---------------------------------------------------------------- build


def build(stores: Callable[[str], DatasetStore], settings: Settings,
          captioner_for: Callable[..., Captioner | None] = lambda key, owner, address, images: None,
          session_key: gr.State | None = None) -> DatasetTab:
    gr.Markdown(
        "Upload photos of your subject (JPG, PNG or WebP), or one .zip with images and optional "
        "same-name `.txt` captions. Images are rotated upright, converted to RGB and scaled down to "
        f"at most {settings.target_megapixels:g} megapixel. Aim for {settings.recommended_min_images}–"
        f"{settings.max_images} varied images."
    )
    with gr.Row():
        dataset = gr.Dropdown(
            choices=[], value=None, label="Dataset", info="Saved datasets; reopen one any time.",
            elem_id="dataset-picker", scale=3, allow_custom_value=True,  # scripts name their datasets (see Train)
        )
        new_name = gr.Textbox(label="New dataset name", placeholder="my-product", scale=2, elem_id="dataset-new-name")
        new_btn = gr.Button("New dataset", scale=1, elem_id="dataset-new")
        refresh_btn = gr.Button("↻ Refresh list", scale=1, size="sm")
        delete_btn = gr.Button("Delete dataset", scale=1, size="sm", variant="stop", elem_id="dataset-delete")
    upload = gr.File(
        label="Images or .zip (drop many at once)", file_count="multiple", type="filepath", elem_id="dataset-upload",
    )
    add_btn = gr.Button("Add to dataset", variant="primary", elem_id="dataset-add")
    report = gr.Markdown(elem_id="dataset-report")
    gallery = gr.Gallery(label="Images", columns=6, height=360, object_fit="cover", fit_columns=False, elem_id="dataset-gallery")
    selected = gr.State(value=None)
    with gr.Row():
        remove_btn = gr.Button("Remove selected image", size="sm", variant="stop", elem_id="dataset-remove")
    with gr.Row():
        trigger = gr.Textbox(
            label="Trigger word", placeholder="TOK", scale=2, elem_id="dataset-trigger",
            info="A rare word that will stand for your subject in prompts.",
        )
        trigger_btn = gr.Button("Put trigger word first in every caption", scale=2, elem_id="dataset-trigger-first")
    with gr.Accordion("Bulk caption edits", open=False):
        with gr.Row():
            find = gr.Textbox(label="Find", scale=2)
            replace = gr.Textbox(label="Replace with", scale=2)
            replace_btn = gr.Button("Replace in all captions", scale=1)
        with gr.Row():
            prefix = gr.Textbox(label="Prefix", scale=2)
            suffix = gr.Textbox(label="Suffix", scale=2)
            affix_btn = gr.Button("Add to all captions", scale=1)
        clear_btn = gr.Button("Clear all captions", variant="stop", size="sm")
    with gr.Accordion("Auto-caption with a vision model (CometAPI)", open=False):
        gr.Markdown(
            f"Captions each image with `{settings.caption_model}` through CometAPI, trigger word first. "
            + ("" if settings.cometapi_key else (
                "**Needs a CometAPI key:** enter yours at the top of the page." if settings.hosted
                else "**Needs a CometAPI key:** set `COMETAPI_KEY` and restart the app."))
        )
        with gr.Row():
            caption_mode = gr.Radio(list(CAPTION_MODES), value="general",
                                    label="What the dataset shows", elem_id="dataset-caption-mode")
            only_empty = gr.Checkbox(value=True, label="Only fill empty captions", elem_id="dataset-caption-only-empty")
            caption_btn = gr.Button("Auto-caption", elem_id="dataset-autocaption")
    table = gr.Dataframe(
        value=captions_frame(None), headers=COLUMNS, label="Captions (click a caption to edit; saved as you type)",
        interactive=True, static_columns=[0, 2, 3, 4], wrap=True, elem_id="dataset-table",
        column_widths=["18%", "52%", "8%", "8%", "14%"],
    )
    warnings = gr.Markdown(warnings_markdown(None, settings), elem_id="dataset-warnings")
    with gr.Row():
        export_btn = gr.Button("Export training zip", variant="primary", elem_id="dataset-export")
        export_file = gr.File(label="Training zip", interactive=False, elem_id="dataset-export-file")
    export_info = gr.Markdown(elem_id="dataset-export-info")

    def refresh(current: str | None = None, request: gr.Request = None):
        """This visitor's saved datasets (the annotation is what makes Gradio pass the request)."""
        names = stores(owner_for(request, settings)).list_names()
        return gr.update(choices=names, value=current if current in names else None)

    tab = DatasetTab(dataset, new_name, upload, report, gallery, selected, trigger, table, warnings, export_file,
                     export_info, refresh=refresh)
    refresh_btn.click(refresh, [tab.dataset], [tab.dataset])
    _wire(tab, stores, settings, new_btn, delete_btn, add_btn, remove_btn, trigger_btn,
          find, replace, replace_btn, prefix, suffix, affix_btn, clear_btn, export_btn)
    _wire_captioning(tab, stores, settings, captioner_for, session_key, caption_mode, only_empty, caption_btn)
    return tab


def _view(ds: Dataset | None, settings: Settings):
    """Outputs shared by most events: gallery, table, warnings, trigger word."""
    return gallery_items(ds), captions_frame(ds), warnings_markdown(ds, settings), (ds.trigger_word if ds else "")


def _view_without_export(ds: Dataset | None, settings: Settings):
    """The view, and the export outputs cleared: a zip made before this dataset changed (or for another
    one) no longer matches it, so it is not offered."""
    return (*_view(ds, settings), None, "")


def _wire(tab: DatasetTab, stores: Callable[[str], DatasetStore], settings: Settings, new_btn, delete_btn, add_btn,
          remove_btn, trigger_btn, find, replace, replace_btn, prefix, suffix, affix_btn, clear_btn, export_btn) -> None:
    view = [tab.gallery, tab.table, tab.warnings, tab.trigger]

    def require(name: str | None) -> str:
        if not name:
            raise InputError("No dataset is selected.", hint="Pick one from the Dataset list or upload images first.")
        return name

    @shows_errors
    def on_pick(name: str | None, request: gr.Request = None):
        store = stores(owner_for(request, settings))
        ds = store.open(name) if name else None
        return _view_without_export(ds, settings)

    @shows_errors
    def on_delete(name: str | None, request: gr.Request = None):
        store = stores(owner_for(request, settings))
        store.delete(require(name))
        feedback.info(f"Deleted dataset {name}.")
        return (gr.update(choices=store.list_names(), value=None), f"Deleted **{plain(name)}**.",
                *_view_without_export(None, settings))

    @shows_errors
    def on_new(name: str, request: gr.Request = None):
        store = stores(owner_for(request, settings))
        if not (name or "").strip():
            raise InputError("The new dataset needs a name.", hint="Type one next to the button, e.g. my-product.")
        ds = store.create(name)
        return gr.update(choices=store.list_names(), value=ds.name), "", *_view_without_export(ds, settings)

    @shows_errors
    def on_add(files: list[str] | None, name: str | None, progress=gr.Progress(), request: gr.Request = None):
        store = stores(owner_for(request, settings))
        if not files:
            raise InputError("No files were uploaded.", hint="Drop images (JPG, PNG, WebP) or a .zip on the upload box first.")
        if not name:
            first = Path(files[0])
            base = first.stem if first.suffix.lower() == ".zip" else f"dataset-{time.strftime('%Y%m%d-%H%M')}"
            name = store.create(base).name
        ds, report = store.add_files(name, files, progress=progress_callback(progress))
        if report.rejected:
            feedback.warning(f"{len(report.rejected)} file(s) could not be used; see the import report for why.")
        return (gr.update(choices=store.list_names(), value=ds.name), None, report_markdown(report),
                *_view_without_export(ds, settings))

    @shows_errors
    def on_cell_edit(table: pd.DataFrame, name: str | None, evt: gr.EditData, request: gr.Request = None):
        """Save the one caption the person edited. The table the page sends may be stale (an
        auto-caption run or another tab saved since): writing all of it would undo their work."""
        row, col = evt.index if isinstance(evt.index, (list, tuple)) else (evt.index, COLUMNS.index("caption"))
        if COLUMNS[col] != "caption" or table is None or not 0 <= row < len(table):
            return gr.update(), gr.update()
        store = stores(owner_for(request, settings))
        ds = store.set_captions(require(name), {str(table.iloc[row]["file"]): "" if evt.value is None else str(evt.value)})
        return gallery_items(ds), warnings_markdown(ds, settings)

    @shows_errors
    def on_trigger_saved(word: str, name: str | None, request: gr.Request = None):
        store = stores(owner_for(request, settings))
        if not name or not (word or "").strip():
            return gr.update()
        ds = store.set_trigger_word(name, word)
        return warnings_markdown(ds, settings)

    @shows_errors
    def on_trigger_first(word: str, name: str | None, request: gr.Request = None):
        store = stores(owner_for(request, settings))
        ds = store.set_trigger_word(require(name), word)
        ds = store.map_captions(ds.name, lambda c: captions.trigger_first(c, ds.trigger_word))
        return _view(ds, settings)

    @shows_errors
    def on_replace(f: str, r: str, name: str | None, request: gr.Request = None):
        store = stores(owner_for(request, settings))
        if not f:
            raise InputError("Nothing to find.", hint="Type the text to replace in 'Find'.")
        return _view(store.map_captions(require(name), lambda c: captions.find_replace(c, f, r)), settings)

    @shows_errors
    def on_affix(p: str, s: str, name: str | None, request: gr.Request = None):
        store = stores(owner_for(request, settings))
        if not p and not s:
            raise InputError("Prefix and suffix are both empty.", hint="Type a prefix, a suffix or both.")
        return _view(store.map_captions(require(name), lambda c: captions.add_affixes(c, p, s)), settings)

    @shows_errors
    def on_clear(name: str | None, request: gr.Request = None):
        store = stores(owner_for(request, settings))
        return _view(store.map_captions(require(name), lambda c: ""), settings)

    def on_select(name: str | None, evt: gr.SelectData, request: gr.Request = None):
        store = stores(owner_for(request, settings))
        if not name or evt is None:
            return None
        ds = store.open(name)
        return ds.items[evt.index].file if 0 <= evt.index < len(ds.items) else None

    @shows_errors
    def on_remove(name: str | None, file: str | None, request: gr.Request = None):
        store = stores(owner_for(request, settings))
        if not file:
            raise InputError("No image is selected.", hint="Click an image in the gallery, then Remove.")
        ds = store.remove_images(require(name), [file])
        feedback.info(f"Removed {file}.")
        return (*_view(ds, settings), None)

    @shows_errors
    def on_export(name: str | None, request: gr.Request = None):
        store = stores(owner_for(request, settings))
        result = store.export_zip(require(name))
        ratio = f" ({result.size_bytes / result.source_bytes:.0%} of the {human_size(result.source_bytes)} uploaded)" if result.source_bytes else ""
        info = (f"**{result.path.name}**: {result.image_count} images, {result.caption_count} captions, "
                f"{human_size(result.size_bytes)}{ratio}.")
        return servable(result.path), info

    export = [tab.export_file, tab.export_info]
    # .input, not .change: only a user's pick reloads the view. Handlers that set the picker themselves
    # (new, add) return the view too, so no second, late reload can overwrite what the user did since.
    tab.dataset.input(on_pick, [tab.dataset], [*view, *export])
    new_btn.click(on_new, [tab.new_name], [tab.dataset, tab.new_name, *view, *export])
    delete_btn.click(on_delete, [tab.dataset], [tab.dataset, tab.report, *view, *export], js="(n) => { if (n && !confirm('Delete this dataset and its images? This cannot be undone.')) "
                        "throw new Error('cancelled'); return n; }")
    tab.new_name.submit(on_new, [tab.new_name], [tab.dataset, tab.new_name, *view, *export])
    add_btn.click(on_add, [tab.upload, tab.dataset], [tab.dataset, tab.upload, tab.report, *view, *export],
                  concurrency_limit=2)
    tab.table.edit(on_cell_edit, [tab.table, tab.dataset], [tab.gallery, tab.warnings])
    tab.trigger.blur(on_trigger_saved, [tab.trigger, tab.dataset], [tab.warnings])
    tab.trigger.submit(on_trigger_saved, [tab.trigger, tab.dataset], [tab.warnings])
    trigger_btn.click(on_trigger_first, [tab.trigger, tab.dataset], view)
    replace_btn.click(on_replace, [find, replace, tab.dataset], view)
    affix_btn.click(on_affix, [prefix, suffix, tab.dataset], view)
    clear_btn.click(on_clear, [tab.dataset], view, js="(n) => { if (!confirm('Clear every caption in this dataset?')) throw new Error('cancelled'); return n; }")
    tab.gallery.select(on_select, [tab.dataset], [tab.selected])
    remove_btn.click(on_remove, [tab.dataset, tab.selected], [*view, tab.selected])
    export_btn.click(on_export, [tab.dataset], [tab.export_file, tab.export_info])


def _wire_captioning(tab: DatasetTab, stores, settings: Settings, captioner_for, session_key: gr.State | None,
                     mode: gr.Radio, only_empty: gr.Checkbox, button: gr.Button) -> None:
    @shows_errors
    def on_caption(name: str | None, mode_: str, only_empty_: bool, key=None, progress=gr.Progress(),
                   request: gr.Request = None):
        if not name:
            raise InputError("No dataset is selected.", hint="Pick one from the Dataset list or upload images first.")
        owner = owner_for(request, settings)
        store = stores(owner)
        images = len(images_to_caption(store.open(name), bool(only_empty_)))  # one paid call each
        captioner = captioner_for(key, owner, client_address(request, settings), images)
        if captioner is None:
            raise InputError("Auto-captioning needs a CometAPI key.",
                             hint="Set COMETAPI_KEY and restart the app, or write captions in the table.")
        report = captioner.caption_dataset(store, name, mode=mode_, only_empty=only_empty_,
                                           progress=progress_callback(progress))
        lines = [f"**{plain(report.summary())}**"] + [f"- {plain(f)}: {plain(why)}" for f, why in report.failed.items()]
        if report.failed:
            feedback.warning(f"{len(report.failed)} image(s) could not be captioned; the others were saved.")
        return ("\n".join(lines), *_view(store.open(name), settings))

    inputs = [tab.dataset, mode, only_empty] + ([session_key] if session_key is not None else [])
    button.click(on_caption, inputs, [tab.report, tab.gallery, tab.table, tab.warnings, tab.trigger],
                 concurrency_limit=2)
