"""The Dataset tab: upload, look, label, fix, export.

``DatasetPage`` is the page over ``Studio``: each handler is a step of the caller's dataset
(``Studio.dataset(name, caller=...)``), so the page, the API and a notebook edit a dataset the same way."""
from __future__ import annotations

import time
from pathlib import Path

import gradio as gr
import pandas as pd

from components import feedback
from components.feedback import plain, progress_callback, shows_errors
from components.identity import caller_for
from components.serving import servable, servable_items
from services.caller import Caller
from services.config import Secret, Settings
from services.errors import InputError
from services.studio import CAPTION_MODES, Dataset, DatasetHandle, ImportReport, Studio, dataset_warnings

COLUMNS = ["file", "caption", "width", "height", "notes"]


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


# ---------------------------------------------------------------- the page


def _view(ds: Dataset | None, settings: Settings):
    """Outputs shared by most events: gallery, table, warnings, trigger word."""
    return gallery_items(ds), captions_frame(ds), warnings_markdown(ds, settings), (ds.trigger_word if ds else "")


def _view_without_export(ds: Dataset | None, settings: Settings):
    """The view, and the export outputs cleared: a zip made before this dataset changed (or for another
    one) no longer matches it, so it is not offered."""
    return (*_view(ds, settings), None, "")


def require(name: str | None) -> str:
    if not name:
        raise InputError("No dataset is selected.", hint="Pick one from the Dataset list or upload images first.")
    return name


class DatasetPage:
    """The Dataset tab over ``studio``; ``session_key`` is the session's own CometAPI key (hosted)."""

    def __init__(self, studio: Studio, session_key: gr.State) -> None:
        self.studio = studio
        self.settings = studio.settings
        self.session_key = session_key
        self._layout()
        self._wire()

    def caller(self, request: gr.Request | None, key: Secret | None = None) -> Caller:
        return caller_for(request, self.settings, key)

    def handle(self, name: str | None, request: gr.Request | None) -> DatasetHandle:
        """The caller's dataset ``name`` (it must exist)."""
        return self.studio.dataset(require(name), create=False, caller=self.caller(request))

    def _layout(self) -> None:
        settings = self.settings
        gr.Markdown(
            "Upload photos of your subject (JPG, PNG or WebP), or one .zip with images and optional "
            "same-name `.txt` captions. Images are rotated upright, converted to RGB and scaled down to "
            f"at most {settings.target_megapixels:g} megapixel. Aim for {settings.recommended_min_images}–"
            f"{settings.max_images} varied images."
        )
        with gr.Row():
            self.dataset = gr.Dropdown(
                choices=[], value=None, label="Dataset", info="Saved datasets; reopen one any time.",
                elem_id="dataset-picker", scale=3, allow_custom_value=True,  # scripts name their datasets (see Train)
            )
            self.new_name = gr.Textbox(label="New dataset name", placeholder="my-product", scale=2,
                                       elem_id="dataset-new-name")
            self.new_btn = gr.Button("New dataset", scale=1, elem_id="dataset-new")
            self.refresh_btn = gr.Button("↻ Refresh list", scale=1, size="sm")
            self.delete_btn = gr.Button("Delete dataset", scale=1, size="sm", variant="stop", elem_id="dataset-delete")
        self.upload = gr.File(label="Images or .zip (drop many at once)", file_count="multiple", type="filepath",
                              elem_id="dataset-upload")
        self.add_btn = gr.Button("Add to dataset", variant="primary", elem_id="dataset-add")
        self.report = gr.Markdown(elem_id="dataset-report")
        self.gallery = gr.Gallery(label="Images", columns=6, height=360, object_fit="cover", fit_columns=False,
                                  elem_id="dataset-gallery")
        self.selected = gr.State(value=None)
        with gr.Row():
            self.remove_btn = gr.Button("Remove selected image", size="sm", variant="stop", elem_id="dataset-remove")
        with gr.Row():
            self.trigger = gr.Textbox(label="Trigger word", placeholder="TOK", scale=2, elem_id="dataset-trigger",
                                      info="A rare word that will stand for your subject in prompts.")
            self.trigger_btn = gr.Button("Put trigger word first in every caption", scale=2,
                                         elem_id="dataset-trigger-first")
        with gr.Accordion("Bulk caption edits", open=False):
            with gr.Row():
                self.find = gr.Textbox(label="Find", scale=2)
                self.replace = gr.Textbox(label="Replace with", scale=2)
                self.replace_btn = gr.Button("Replace in all captions", scale=1)
            with gr.Row():
                self.prefix = gr.Textbox(label="Prefix", scale=2)
                self.suffix = gr.Textbox(label="Suffix", scale=2)
                self.affix_btn = gr.Button("Add to all captions", scale=1)
            self.clear_btn = gr.Button("Clear all captions", variant="stop", size="sm")
        with gr.Accordion("Auto-caption with a vision model (CometAPI)", open=False):
            gr.Markdown(
                f"Captions each image with `{settings.caption_model}` through CometAPI, trigger word first. "
                + ("" if settings.cometapi_key else (
                    "**Needs a CometAPI key:** enter yours at the top of the page." if settings.hosted
                    else "**Needs a CometAPI key:** set `COMETAPI_KEY` and restart the app."))
            )
            with gr.Row():
                self.caption_mode = gr.Radio(list(CAPTION_MODES), value="general", label="What the dataset shows",
                                             elem_id="dataset-caption-mode")
                self.only_empty = gr.Checkbox(value=True, label="Only fill empty captions",
                                              elem_id="dataset-caption-only-empty")
                self.caption_btn = gr.Button("Auto-caption", elem_id="dataset-autocaption")
        self.table = gr.Dataframe(
            value=captions_frame(None), headers=COLUMNS, label="Captions (click a caption to edit; saved as you type)",
            interactive=True, static_columns=[0, 2, 3, 4], wrap=True, elem_id="dataset-table",
            column_widths=["18%", "52%", "8%", "8%", "14%"],
        )
        self.warnings = gr.Markdown(warnings_markdown(None, settings), elem_id="dataset-warnings")
        with gr.Row():
            self.export_btn = gr.Button("Export training zip", variant="primary", elem_id="dataset-export")
            self.export_file = gr.File(label="Training zip", interactive=False, elem_id="dataset-export-file")
        self.export_info = gr.Markdown(elem_id="dataset-export-info")

    def _wire(self) -> None:
        view = [self.gallery, self.table, self.warnings, self.trigger]
        export = [self.export_file, self.export_info]
        self.refresh_btn.click(self.on_refresh, [self.dataset], [self.dataset])
        # .input, not .change: only a user's pick reloads the view. Handlers that set the picker themselves
        # (new, add) return the view too, so no second, late reload can overwrite what the user did since.
        self.dataset.input(self.on_pick, [self.dataset], [*view, *export])
        self.new_btn.click(self.on_new, [self.new_name], [self.dataset, self.new_name, *view, *export])
        self.delete_btn.click(self.on_delete, [self.dataset], [self.dataset, self.report, *view, *export],
                              js="(n) => { if (n && !confirm('Delete this dataset and its images? This cannot be "
                                 "undone.')) throw new Error('cancelled'); return n; }")
        self.new_name.submit(self.on_new, [self.new_name], [self.dataset, self.new_name, *view, *export])
        self.add_btn.click(self.on_add, [self.upload, self.dataset],
                           [self.dataset, self.upload, self.report, *view, *export], concurrency_limit=2)
        self.table.edit(self.on_cell_edit, [self.table, self.dataset], [self.gallery, self.warnings])
        self.trigger.blur(self.on_trigger_saved, [self.trigger, self.dataset], [self.warnings])
        self.trigger.submit(self.on_trigger_saved, [self.trigger, self.dataset], [self.warnings])
        self.trigger_btn.click(self.on_trigger_first, [self.trigger, self.dataset], view)
        self.replace_btn.click(self.on_replace, [self.find, self.replace, self.dataset], view)
        self.affix_btn.click(self.on_affix, [self.prefix, self.suffix, self.dataset], view)
        self.clear_btn.click(self.on_clear, [self.dataset], view,
                             js="(n) => { if (!confirm('Clear every caption in this dataset?')) "
                                "throw new Error('cancelled'); return n; }")
        self.gallery.select(self.on_select, [self.dataset], [self.selected])
        self.remove_btn.click(self.on_remove, [self.dataset, self.selected], [*view, self.selected])
        self.export_btn.click(self.on_export, [self.dataset], export)
        self.caption_btn.click(self.on_caption, [self.dataset, self.caption_mode, self.only_empty, self.session_key],
                               [self.report, *view], concurrency_limit=2)

    def load_on(self, *triggers) -> "DatasetPage":
        """Fill the picker in for the visitor on each of ``triggers``: datasets made since the app started."""
        gr.on(list(triggers), self.on_refresh, [self.dataset], [self.dataset], show_progress="hidden")
        return self

    # -- handlers

    def on_refresh(self, current: str | None = None, request: gr.Request = None):
        """This visitor's saved datasets (the annotation is what makes Gradio pass the request)."""
        names = self.studio.list_datasets(caller=self.caller(request))
        return gr.update(choices=names, value=current if current in names else None)

    def picker(self, request: gr.Request | None, value: str | None):
        return gr.update(choices=self.studio.list_datasets(caller=self.caller(request)), value=value)

    @shows_errors
    def on_pick(self, name: str | None, request: gr.Request = None):
        return _view_without_export(self.handle(name, request).info() if name else None, self.settings)

    @shows_errors
    def on_delete(self, name: str | None, request: gr.Request = None):
        self.handle(name, request).delete()
        feedback.info(f"Deleted dataset {name}.")
        return (self.picker(request, None), f"Deleted **{plain(name)}**.", *_view_without_export(None, self.settings))

    @shows_errors
    def on_new(self, name: str, request: gr.Request = None):
        if not (name or "").strip():
            raise InputError("The new dataset needs a name.", hint="Type one next to the button, e.g. my-product.")
        handle = self.studio.new_dataset(name, caller=self.caller(request))
        return self.picker(request, handle.name), "", *_view_without_export(handle.info(), self.settings)

    @shows_errors
    def on_add(self, files: list[str] | None, name: str | None, progress=gr.Progress(), request: gr.Request = None):
        if not files:
            raise InputError("No files were uploaded.",
                             hint="Drop images (JPG, PNG, WebP) or a .zip on the upload box first.")
        if name:
            handle = self.handle(name, request)
        else:  # a dataset named after the first upload (a .zip's name), else after the hour
            first = Path(files[0])
            base = first.stem if first.suffix.lower() == ".zip" else f"dataset-{time.strftime('%Y%m%d-%H%M')}"
            handle = self.studio.new_dataset(base, caller=self.caller(request))
        report = handle.add(*files, progress=progress_callback(progress)).last_report
        if report.rejected:
            feedback.warning(f"{len(report.rejected)} file(s) could not be used; see the import report for why.")
        return (self.picker(request, handle.name), None, report_markdown(report),
                *_view_without_export(handle.info(), self.settings))

    @shows_errors
    def on_cell_edit(self, table: pd.DataFrame, name: str | None, evt: gr.EditData, request: gr.Request = None):
        """Save the one caption the person edited. The table the page sends may be stale (an
        auto-caption run or another tab saved since): writing all of it would undo their work."""
        row, col = evt.index if isinstance(evt.index, (list, tuple)) else (evt.index, COLUMNS.index("caption"))
        if COLUMNS[col] != "caption" or table is None or not 0 <= row < len(table):
            return gr.update(), gr.update()
        caption = "" if evt.value is None else str(evt.value)
        ds = self.handle(name, request).set_captions({str(table.iloc[row]["file"]): caption}).info()
        return gallery_items(ds), warnings_markdown(ds, self.settings)

    @shows_errors
    def on_trigger_saved(self, word: str, name: str | None, request: gr.Request = None):
        if not name or not (word or "").strip():
            return gr.update()
        return warnings_markdown(self.handle(name, request).set_trigger_word(word).info(), self.settings)

    @shows_errors
    def on_trigger_first(self, word: str, name: str | None, request: gr.Request = None):
        return _view(self.handle(name, request).set_trigger_word(word).trigger_first().info(), self.settings)

    @shows_errors
    def on_replace(self, find: str, replace: str, name: str | None, request: gr.Request = None):
        if not find:
            raise InputError("Nothing to find.", hint="Type the text to replace in 'Find'.")
        return _view(self.handle(name, request).find_replace(find, replace).info(), self.settings)

    @shows_errors
    def on_affix(self, prefix: str, suffix: str, name: str | None, request: gr.Request = None):
        if not prefix and not suffix:
            raise InputError("Prefix and suffix are both empty.", hint="Type a prefix, a suffix or both.")
        return _view(self.handle(name, request).add_affixes(prefix, suffix).info(), self.settings)

    @shows_errors
    def on_clear(self, name: str | None, request: gr.Request = None):
        return _view(self.handle(name, request).clear_captions().info(), self.settings)

    def on_select(self, name: str | None, evt: gr.SelectData, request: gr.Request = None):
        if not name or evt is None:
            return None
        ds = self.handle(name, request).info()
        return ds.items[evt.index].file if 0 <= evt.index < len(ds.items) else None

    @shows_errors
    def on_remove(self, name: str | None, file: str | None, request: gr.Request = None):
        if not file:
            raise InputError("No image is selected.", hint="Click an image in the gallery, then Remove.")
        ds = self.handle(name, request).remove(file).info()
        feedback.info(f"Removed {file}.")
        return (*_view(ds, self.settings), None)

    @shows_errors
    def on_export(self, name: str | None, request: gr.Request = None):
        result = self.handle(name, request).export_zip()
        ratio = (f" ({result.size_bytes / result.source_bytes:.0%} of the {human_size(result.source_bytes)} uploaded)"
                 if result.source_bytes else "")
        info = (f"**{result.path.name}**: {result.image_count} images, {result.caption_count} captions, "
                f"{human_size(result.size_bytes)}{ratio}.")
        return servable(result.path), info

    @shows_errors
    def on_caption(self, name: str | None, mode: str, only_empty: bool, key=None, progress=gr.Progress(),
                   request: gr.Request = None):
        report = self.studio.auto_caption(require(name), mode=mode, only_empty=bool(only_empty),
                                          caller=self.caller(request, key), progress=progress_callback(progress))
        lines = [f"**{plain(report.summary())}**"] + [f"- {plain(f)}: {plain(why)}" for f, why in report.failed.items()]
        if report.failed:
            feedback.warning(f"{len(report.failed)} image(s) could not be captioned; the others were saved.")
        return ("\n".join(lines), *_view(self.handle(name, request).info(), self.settings))


def build(studio: Studio, session_key: gr.State, demo: gr.Blocks) -> DatasetPage:
    """The Dataset tab; its picker is filled in for the visitor when the page loads."""
    return DatasetPage(studio, session_key).load_on(demo.load)
