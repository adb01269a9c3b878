"""The HTTP API (gradio_client, "Use via API") and the MCP tools: the workflow's steps, nothing else.

Each endpoint is one function whose name is the endpoint's and the MCP tool's name, whose typed
parameters are what a script passes, and whose docstring is what the API page and an assistant
read. They call the same ``Studio`` the pages use, as the caller's owner: a dataset, job or
fine-tune is named by its name or id and looked up among the caller's own, never anyone else's.
Endpoints that take or give files use hidden components, so Gradio checks uploads and serves
results from its cache as it does for the pages.
"""

from typing import Any, get_args

import gradio as gr
from gradio import processing_utils
from gradio.context import get_blocks_context
from gradio.data_classes import FileData, GradioRootModel
from gradio_client import utils as client_utils

from components.feedback import shows_errors
from components.identity import caller_for, owner_for
from components.serving import servable
from services.errors import InputError
from services.providers.base import ExportFormat, ImportedLora, Mode
from services.studio import STRENGTH_RANGE, CellResult, Dataset, Job, Studio, dataset_warnings, parse_strengths

# The endpoints on the API page and the MCP server. Every other event is the page's own plumbing
# (ticks, picks, cell edits): callable by the page, not listed.
PUBLIC_API = frozenset({
    "list_datasets", "create_dataset", "add_images", "describe_dataset", "set_trigger_word", "set_captions",
    "auto_caption", "export_zip", "delete_dataset",
    "launch_finetune", "list_jobs", "get_job", "cancel_job",
    "compare", "grid", "export_lora", "import_lora", "list_loras",
})


class FilesOrLinks(GradioRootModel):
    """What a file list may carry: uploaded files, or the links an MCP assistant sends."""
    root: list[FileData | str]


def _inlined(schema: Any, defs: dict | None = None) -> Any:
    """``schema`` with every ``#/$defs/...`` reference replaced by its definition."""
    defs = {**(defs or {}), **(schema.get("$defs", {}) if isinstance(schema, dict) else {})}
    if isinstance(schema, dict):
        if "$ref" in schema:
            return _inlined(defs[schema["$ref"].rsplit("/", 1)[-1]], defs)
        return {k: _inlined(v, defs) for k, v in schema.items() if k != "$defs"}
    if isinstance(schema, list):
        return [_inlined(v, defs) for v in schema]
    return schema


def file_list(label: str) -> gr.File:
    """A multiple-file input that an MCP assistant can fill as well as a script.

    Gradio 6.31 turns a file list's schema into MCP's with the items' ``$ref`` left pointing at a
    ``$defs`` it has moved, so every call failed validation (``PointerToNowhere``); and it turns an
    assistant's link into a file only for a top-level file parameter, so a list's items arrive as
    the strings sent. Here the schema has no references, and a string is fetched as Gradio fetches a
    single file parameter's: an http(s) URL through its SSRF-checked download (never this machine or
    its network), a ``data:`` URI into the cache. Any other string (a path on this machine) is refused.
    The component is adjusted rather than subclassed: Gradio writes a ``.pyi`` stub beside the source
    of every component subclass when it is imported.
    """
    files = gr.File(label=label, file_count="multiple", type="filepath")
    files.data_model = FilesOrLinks

    def api_info_as_input() -> dict[str, Any]:
        return {"type": "array", "title": "ListFiles", "items": _inlined(FileData.model_json_schema())}

    def preprocess(payload: FilesOrLinks | None) -> list[str] | None:
        if payload is None:
            return None
        return [files._process_single_file(f if isinstance(f, FileData) else FileData(path=fetch(f)))
                for f in payload.root]

    def fetch(link: str) -> str:
        try:
            if link.startswith("data:"):
                return processing_utils.save_base64_to_cache(link, files.GRADIO_CACHE)
            if client_utils.is_http_url_like(link):
                return processing_utils.ssrf_protected_download(link, files.GRADIO_CACHE)
        except Exception as exc:  # the fetch's own reason: a refused address, a 404, bad base64
            raise gr.Error(f"Could not fetch {link[:200]!r}: {exc}. Send a public http(s) URL or a data: URI.",
                           print_exception=False) from exc
        raise gr.Error(f"{link[:200]!r} is not a file: send an uploaded file, a public http(s) URL or a data: URI.",
                       print_exception=False)

    files.api_info_as_input = api_info_as_input
    files.preprocess = preprocess
    return files


def dataset_summary(ds: Dataset) -> dict:
    captioned = sum(1 for i in ds.items if i.caption.strip())
    return {"name": ds.name, "images": len(ds.items), "captioned": captioned, "trigger_word": ds.trigger_word}


def lora_summary(lora: ImportedLora) -> dict:
    return {"id": lora.id, "name": lora.name, "family": lora.family_label, "base_model": lora.base_model,
            "base_model_label": lora.base_model_label, "layout": lora.layout, "rank": lora.rank,
            "source": lora.source, "trigger_word": lora.trigger_word}


def job_summary(job: Job) -> dict:
    return {"id": job.id, "name": job.name, "provider": job.provider, "dataset": job.dataset_name,
            "status": job.status, "progress": job.progress, "eta_s": job.eta_s, "message": job.message,
            "error": job.error, "finetune_id": job.result.get("finetune_id") or job.remote_id,
            "trigger_word": job.params.get("trigger_word", "")}


def build(studio: Studio) -> None:
    """Register the endpoints in the Blocks being built."""
    settings = studio.settings

    def owner(request: gr.Request | None) -> str:
        return owner_for(request, settings)

    def caller(request: gr.Request | None):
        """The request's caller: its owner, their Hugging Face sign-in (hosted) and address; a script
        has no page session, so no pasted key of its own."""
        return caller_for(request, settings)

    # ------------------------------------------------------------ datasets

    @shows_errors
    def list_datasets(request: gr.Request) -> list[str]:
        """List the names of your datasets.

        Returns:
            dataset names, alphabetically
        """
        return studio.list_datasets(caller=caller(request))

    @shows_errors
    def create_dataset(name: str, request: gr.Request) -> dict:
        """Create an empty dataset (or open it, if one of yours has that name).

        Args:
            name: the dataset's name: letters, digits, '-' and '_' (other characters are replaced)
        Returns:
            the dataset: name, images, captioned, trigger_word
        """
        return dataset_summary(studio.dataset(name, caller=caller(request)).info())

    @shows_errors
    def add_images(dataset: str, files: list[str], request: gr.Request) -> dict:
        """Add images (JPG, PNG, WebP, GIF), .zip files (with optional same-name .txt captions) and .txt captions
        to a dataset, which is created if it doesn't exist. Files that can't be used are reported, not fatal.

        Args:
            dataset: the dataset's name
            files: the files to add (an assistant sends each as a public http(s) URL or a data: URI)
        Returns:
            the dataset, and the import report: one line per file added, rejected or skipped with why
        """
        if not files:
            raise InputError("No files were uploaded.", hint="Send images (JPG, PNG, WebP) or a .zip.")
        handle = studio.dataset(dataset, owner=owner(request))
        handle.add(*files)
        return {**dataset_summary(handle.info()), "report": handle.last_report.lines()}

    @shows_errors
    def describe_dataset(dataset: str, request: gr.Request) -> dict:
        """A dataset's images with their captions, its trigger word, and what is worth fixing before training.

        Args:
            dataset: the dataset's name
        Returns:
            name, images, captioned, trigger_word, items (file, caption, width, height) and warnings
        """
        ds = studio.dataset(dataset, create=False, caller=caller(request)).info()
        return {**dataset_summary(ds), "warnings": dataset_warnings(ds, settings),
                "items": [{"file": i.file, "caption": i.caption, "width": i.width, "height": i.height}
                          for i in ds.items]}

    @shows_errors
    def set_trigger_word(dataset: str, trigger_word: str, put_first: bool = True, request: gr.Request = None) -> dict:
        """Set a dataset's trigger word, the token that names your subject in prompts.

        Args:
            dataset: the dataset's name
            trigger_word: 1-40 letters, digits, '_' or '-', no spaces (for example TOK)
            put_first: also put it first in every caption (added where it is missing)
        Returns:
            the dataset: name, images, captioned, trigger_word
        """
        handle = studio.dataset(dataset, create=False, caller=caller(request)).set_trigger_word(trigger_word)
        if put_first:
            handle.trigger_first()
        return dataset_summary(handle.info())

    @shows_errors
    def set_captions(dataset: str, captions: dict[str, str], request: gr.Request) -> dict:
        """Set the captions of some images; the others keep theirs.

        Args:
            dataset: the dataset's name
            captions: image file name (as describe_dataset lists it) -> caption
        Returns:
            the dataset: name, images, captioned, trigger_word
        """
        handle = studio.dataset(dataset, create=False, caller=caller(request)).set_captions(captions)
        return dataset_summary(handle.info())

    @shows_errors
    def auto_caption(dataset: str, mode: Mode = "general", only_empty: bool = True, request: gr.Request = None) -> dict:
        """Caption a dataset's images with a vision model through CometAPI (needs the app's CometAPI key;
        one paid call per image).

        Args:
            dataset: the dataset's name
            mode: what the images show, which sets the captioning instructions
            only_empty: caption only the images without a caption
        Returns:
            a summary, and the images that failed with why (they keep their old caption)
        """
        report = studio.auto_caption(dataset, mode=mode, only_empty=only_empty, caller=caller(request))
        return {"summary": report.summary(), "failed": report.failed}

    @shows_errors
    def export_zip(dataset: str, request: gr.Request) -> str:
        """The training zip of a dataset: its images and same-name .txt captions.

        Args:
            dataset: the dataset's name
        Returns:
            the zip file
        """
        return servable(studio.dataset(dataset, create=False, caller=caller(request)).export_zip().path)

    @shows_errors
    def delete_dataset(dataset: str, request: gr.Request) -> str:
        """Delete a dataset and its images. This cannot be undone.

        Args:
            dataset: the dataset's name
        Returns:
            a confirmation
        """
        studio.dataset(dataset, create=False, caller=caller(request)).delete()
        return f"Deleted dataset {dataset}."

    # ------------------------------------------------------------ training

    @shows_errors
    def launch_finetune(dataset: str, name: str, provider: str = "", mode: Mode = "general", trigger_word: str = "",
                        iterations: int | None = None, learning_rate: float | None = None,
                        lora_rank: int | None = None, finetune_type: str = "", priority: str = "",
                        base_model: str = "", hardware: str = "", request: gr.Request = None) -> dict:
        """Start fine-tuning FLUX on a dataset. It returns at once; poll get_job until the status is ready.

        Args:
            dataset: the dataset's name
            name: a name for the fine-tune, to find it later
            provider: "local" (this machine's engine), "cometapi" or "huggingface" (HF Jobs, billed to the
                account that runs it: the app's HF_TOKEN locally; hosted, only the caller's own Hugging Face
                sign-in, carried by the session cookie of the page where they signed in); empty for the app's
                default
            mode: what the dataset is; sets the defaults of the settings left empty
            trigger_word: empty for the dataset's own
            iterations: training steps, 100-1000 (empty: the mode's default)
            learning_rate: empty for the default (1e-4 for LoRA)
            lora_rank: 16 or 32 (empty: the mode's default)
            finetune_type: "lora" or "full" (CometAPI; empty: the mode's default)
            priority: "speed", "quality" or "high_res_only" (CometAPI; empty: the mode's default)
            base_model: the local engine's base model, e.g. "flux1-dev" or "flux2-klein-base-4b" (empty: the app's)
            hardware: Hugging Face only: the Jobs flavour, e.g. "a100-large" (empty: the cheapest that fits)
        Returns:
            the job: id, name, provider, status, progress, message
        """
        job = studio.launch(dataset, name, provider=provider or None, mode=mode, trigger_word=trigger_word,
                            caller=caller(request), iterations=iterations, learning_rate=learning_rate, lora_rank=lora_rank,
                            finetune_type=finetune_type or None, priority=priority or None,
                            base_model=base_model or None, hardware=hardware)
        return job_summary(job.job)

    @shows_errors
    def list_jobs(request: gr.Request) -> list[dict]:
        """List your fine-tune jobs, newest first.

        Returns:
            each job's id, name, provider, dataset, status, progress, message, error and finetune_id
        """
        return [job_summary(j) for j in studio.list_jobs(caller=caller(request))]

    @shows_errors
    def get_job(job: str, request: gr.Request) -> dict:
        """One of your jobs as it is now: status (submitting, pending, running, ready, failed, cancelled,
        interrupted), progress from 0 to 1, and its message.

        Args:
            job: the job's id or name
        Returns:
            the job: id, name, provider, status, progress, eta_s, message, error, finetune_id
        """
        handle = studio.job(job, caller=caller(request))
        return job_summary(handle.refresh())

    @shows_errors
    def cancel_job(job: str, request: gr.Request) -> dict:
        """Cancel one of your running or queued jobs (the local engine keeps its last checkpoint).

        Args:
            job: the job's id or name
        Returns:
            the job
        """
        return job_summary(studio.cancel(job, caller=caller(request)))

    # ------------------------------------------------------------ comparing

    @shows_errors
    def compare(finetune: str, prompt: str, seed: int = 42, strength: float = 1.0, width: int = 1024,
                height: int = 768, request: gr.Request = None):
        """Generate the same prompt and seed with the base model and with your fine-tune, side by side.

        Args:
            finetune: the fine-tune: a ready job's name or id, or a fine-tune id
            prompt: what to draw; use the trigger word
            seed: the seed both images share
            strength: how strongly the fine-tune applies, 0-2 (0 is the base model)
            width: image width (flux-pro and the local engine)
            height: image height (flux-pro and the local engine)
        Returns:
            the base image, the tuned image, and their details (models, latencies, errors)
        """
        result = studio.compare(finetune, prompt, seed=seed, strength=strength, width=width, height=height,
                                caller=caller(request))
        details = {"seed": seed, "strength": strength, "wall_s": round(result.pair.wall_s, 2),
                   **{name: cell_summary(cell) for name, cell in (("base", result.base), ("tuned", result.tuned))}}
        return servable(result.base.path), servable(result.tuned.path), details

    @shows_errors
    def grid(finetune: str, prompts: str, strengths: str = "0.6, 0.9, 1.2", include_base: bool = True,
             seed: int = 42, width: int = 1024, height: int = 768, request: gr.Request = None):
        """A strength sweep: rows = prompts, columns = the base model and each strength, one seed; drawn as one
        labelled contact sheet.

        Args:
            finetune: the fine-tune: a ready job's name or id, or a fine-tune id
            prompts: one prompt per line
            strengths: fine-tune strengths (0-2), separated by commas
            include_base: add a base-model column
            seed: the seed every cell shares
            width: image width (flux-pro and the local engine)
            height: image height (flux-pro and the local engine)
        Returns:
            the contact sheet (PNG), and each cell's details
        """
        values = parse_strengths(strengths)
        result = studio.grid(finetune, (prompts or "").splitlines(), values, include_base=include_base, seed=seed,
                             width=width, height=height, caller=caller(request))
        sheet = result.save_contact_sheet()
        cells = [{"row": c.row, "column": result.result.columns[c.col], **cell_summary(c)}
                 for row in result.result.cells for c in row]
        return servable(sheet), {"columns": result.result.columns, "prompts": result.result.prompts,
                                 "failed": result.failed, "cells": cells}

    # ------------------------------------------------------------ LoRA files in and out

    @shows_errors
    def export_lora(finetune: str, format: ExportFormat = "comfyui", request: gr.Request = None) -> str:
        """Your ready fine-tune's LoRA as a .safetensors file for the tool you render in. Made once, then reused.

        Args:
            finetune: the fine-tune: one of your ready jobs' name or id, or a LoRA you imported (a Hugging Face
                job's LoRA once you have imported its repo)
            format: "comfyui": for FLUX.1 the kohya lora_unet_* keys ComfyUI and Forge load, for FLUX.2 [klein]
                the original BFL diffusion_model.* keys ComfyUI and BFL's LoRA inference take; "diffusers": the
                diffusers / PEFT keys load_lora_weights reads. Every file is at scale 1: a strength means the
                same in every tool
        Returns:
            the LoRA file, with the base model, trigger word, rank and steps in its metadata
        """
        return servable(studio.export_lora(finetune, format, caller=caller(request)))

    @shows_errors
    def import_lora(file: str | None, repo: str = "", name: str = "", base_model: str = "",
                    request: gr.Request = None) -> dict:
        """Import a FLUX.1 or FLUX.2 [klein] LoRA made elsewhere, so that compare and grid render it on the local
        engine against a base model of its family (base vs tuned, strength sweeps), as a fine-tune made here.

        Args:
            file: the LoRA's .safetensors file (diffusers, kohya / FluxGym / musubi or ComfyUI / BFL keys; pickles
                such as .ckpt/.pt/.bin are refused unread); leave empty to fetch `repo` instead
            repo: a Hugging Face model repo, owner/name, holding the LoRA (a Hugging Face job's repo too); on a
                hosted app it is fetched with your own Hugging Face sign-in only
            name: a name to find it by (empty: the file's or the repo's)
            base_model: the local engine's base model to render it on, of the LoRA's family (empty: the app's
                model if it is of that family, else one of that family)
        Returns:
            the imported LoRA: id (give it to compare or grid as the finetune), name, family, base_model,
            layout (diffusers, kohya or bfl), rank, source
        """
        return lora_summary(studio.import_lora_from(file, repo, name=name, base_model=base_model or None,
                                                    caller=caller(request)))

    @shows_errors
    def list_loras(request: gr.Request) -> list[dict]:
        """List the LoRAs you imported, newest first (compare and grid take their ids).

        Returns:
            each imported LoRA's id, name, family, base_model, layout, rank and source
        """
        return [lora_summary(lora) for lora in studio.imported_loras(caller=caller(request))]

    for fn in (list_datasets, create_dataset, describe_dataset, set_trigger_word, set_captions, delete_dataset,
               get_job, cancel_job, list_loras):
        gr.api(fn, api_name=fn.__name__)
    gr.api(launch_finetune, api_name="launch_finetune", concurrency_limit=4)  # exports and uploads a zip
    gr.api(list_jobs, api_name="list_jobs", concurrency_limit=None)  # cheap: never waits behind generation
    gr.api(auto_caption, api_name="auto_caption", concurrency_limit=2)  # paid calls, one per image
    # Files in or out: hidden components, so uploads are checked and results served from the cache.
    with gr.Column(visible=False):
        dataset_in = gr.Textbox(label="dataset")
        files_in = file_list("files")
        summary_out = gr.JSON(label="dataset")
        zip_out = gr.File(label="zip")
        finetune_in = gr.Textbox(label="finetune")
        prompt_in = gr.Textbox(label="prompt")
        seed_in = gr.Number(label="seed", value=42, precision=0, minimum=0, maximum=2**31 - 1)
        strength_in = gr.Number(label="strength", value=1.0, minimum=STRENGTH_RANGE[0],
                                maximum=STRENGTH_RANGE[1])
        width_in = gr.Number(label="width", value=1024, precision=0, minimum=64, maximum=2048)
        height_in = gr.Number(label="height", value=768, precision=0, minimum=64, maximum=2048)
        base_out = gr.Image(label="base", type="filepath")
        tuned_out = gr.Image(label="tuned", type="filepath")
        details_out = gr.JSON(label="details")
        prompts_in = gr.Textbox(label="prompts", lines=3)
        strengths_in = gr.Textbox(label="strengths", value="0.6, 0.9, 1.2")
        include_base_in = gr.Checkbox(label="include_base", value=True)
        sheet_out = gr.Image(label="contact_sheet", type="filepath")
        format_in = gr.Dropdown(label="format", choices=list(get_args(ExportFormat)), value="comfyui")
        lora_file_out = gr.File(label="lora")
        lora_file_in = gr.File(label="file", file_count="single", type="filepath")
        repo_in = gr.Textbox(label="repo")
        lora_name_in = gr.Textbox(label="name")
        base_model_in = gr.Textbox(label="base_model")
        lora_out = gr.JSON(label="lora")
    gr.on([], add_images, [dataset_in, files_in], [summary_out], api_name="add_images", concurrency_limit=2)
    gr.on([], export_zip, [dataset_in], [zip_out], api_name="export_zip")
    gr.on([], compare, [finetune_in, prompt_in, seed_in, strength_in, width_in, height_in],
          [base_out, tuned_out, details_out], api_name="compare", concurrency_limit=8)
    gr.on([], grid, [finetune_in, prompts_in, strengths_in, include_base_in, seed_in, width_in, height_in],
          [sheet_out, details_out], api_name="grid", concurrency_limit=4)
    gr.on([], export_lora, [finetune_in, format_in], [lora_file_out], api_name="export_lora", concurrency_limit=2)
    gr.on([], import_lora, [lora_file_in, repo_in, lora_name_in, base_model_in], [lora_out], api_name="import_lora",
          concurrency_limit=2)  # a copy and a read of up to lora_formats.MAX_LORA_BYTES; a Hub download
    registered = {fn.api_name for fn in get_blocks_context().fns.values()}
    assert PUBLIC_API <= registered, PUBLIC_API - registered  # noqa: S101  the list and the code agree


def cell_summary(cell: CellResult) -> dict:
    return {"model": cell.model, "status": cell.status, "latency_s": round(cell.latency_s, 2), "error": cell.error}
