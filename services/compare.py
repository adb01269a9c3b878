"""Base vs tuned: one prompt and seed through both models at once, and grids of them.

Generation is I/O-bound for a hosted provider (submit, poll, download) so threads give real
concurrency: a pair takes about as long as the slower image, a grid about
``ceil(cells / max_concurrency)`` image times. Every image is saved and recorded as soon as
it exists; a failed cell records its reason and never stops the others.
"""
from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

from services.storage import atomic
from services.config import THREAD_PREFIX
from services.errors import InputError, ModeratedError, StudioError
from services.providers.base import STRENGTH_RANGE, GenerateRequest, Provider
from services.storage.results import ResultStore

log = logging.getLogger(__name__)

MAX_GRID_CELLS = 48


@dataclass(frozen=True)
class CellResult:
    row: int
    col: int
    prompt: str
    strength: float | None  # None: the base model
    model: str
    seed: int
    path: Path | None
    latency_s: float
    status: str  # "ok" | "moderated" | "error"
    error: str = ""
    record_id: str = ""


@dataclass(frozen=True)
class PairResult:
    group_id: str
    base: CellResult
    tuned: CellResult
    wall_s: float


@dataclass(frozen=True)
class GridProgress:
    done: int
    total: int


@dataclass(frozen=True)
class GridResult:
    group_id: str
    prompts: list[str]
    columns: list[str]  # "base", "strength 0.6", ...
    cells: list[list[CellResult]]
    wall_s: float

    @property
    def failed(self) -> int:
        return sum(1 for row in self.cells for c in row if c.status != "ok")


def random_seed() -> int:
    return secrets.randbelow(2**31 - 1)


def models_for(provider: Provider, tuned_model: str | None,
               finetune_id: str | None = None) -> tuple[str | None, str | None]:
    """(base model, tuned model) names; providers with one pipeline answer (None, None).

    Where each fine-tune has its own base model (the local engine), the base image is made with
    the model the fine-tune was trained on, not the provider's default."""
    base, tuned = provider.compare_models(tuned_model)
    if base is None and tuned is None and (finetune_id or "").strip():
        base = tuned = provider.base_model_of(finetune_id.strip())
    return base, tuned


def check_strength(value: float) -> float:
    lo, hi = STRENGTH_RANGE
    if not lo <= value <= hi:
        raise InputError(f"Fine-tune strength {value:g} is out of range.", hint=f"Use a value from {lo:g} to {hi:g}.")
    return value


@dataclass(frozen=True)
class _Cell:
    row: int
    col: int
    request: GenerateRequest
    tuned: bool


def _run_cell(provider: Provider, cell: _Cell, *, finetune_id: str, models: tuple[str | None, str | None],
              out_dir: Path, owner: str, results: ResultStore | None, group_id: str) -> CellResult:
    req = cell.request
    model = models[1] if cell.tuned else models[0]
    started = time.monotonic()
    path, status, error, seed, used = None, "ok", "", req.seed, model or ""
    try:
        image = provider.generate(req, out_dir, finetune=finetune_id if cell.tuned else None, model=model)
        path, seed, used = image.path, image.seed, image.model
    except ModeratedError as exc:
        status, error = "moderated", exc.user_message()
    except StudioError as exc:
        status, error = "error", exc.user_message()
    except Exception as exc:  # one broken cell must not sink the grid
        log.exception("Unexpected error generating a cell")
        status, error = "error", f"Unexpected error ({exc.__class__.__name__}); the other images are unaffected."
    latency = time.monotonic() - started
    strength = req.strength if cell.tuned else None
    record_id = ""
    if results is not None:
        record = results.add(
            owner, group_id=group_id, provider=provider.key, model=used or ("tuned" if cell.tuned else "base"),
            seed=seed, prompt=req.prompt, status=status, finetune_id=finetune_id if cell.tuned else None,
            strength=strength, file=str(path) if path else "", latency_s=round(latency, 3), error=error,
            params=_params(req, cell.tuned),
        )
        record_id = record.id
    return CellResult(cell.row, cell.col, req.prompt, strength, used, seed, path, latency, status, error, record_id)


def _params(req: GenerateRequest, tuned: bool) -> dict:
    p = {"width": req.width, "height": req.height, "aspect_ratio": req.aspect_ratio, "steps": req.steps,
         "guidance": req.guidance, "safety_tolerance": req.safety_tolerance, "output_format": req.output_format}
    if tuned:
        p["strength"] = req.strength
    return p


def compare_pair(provider: Provider, request: GenerateRequest, *, finetune_id: str, tuned_model: str | None = None,
                 out_dir: Path, owner: str, results: ResultStore | None = None) -> PairResult:
    """Base and tuned with the same prompt and seed, concurrently."""
    if not (finetune_id or "").strip():
        raise InputError("No fine-tune is selected.", hint="Pick a ready fine-tune, or paste a fine-tune id.")
    check_strength(request.strength)
    results_group = results.new_group() if results else time.strftime("%Y%m%d-%H%M%S")
    group_dir = out_dir / results_group
    models = models_for(provider, tuned_model, finetune_id)
    kw = dict(finetune_id=finetune_id.strip(), models=models, out_dir=group_dir, owner=owner, results=results,
              group_id=results_group)
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"{THREAD_PREFIX}compare") as pool:
        base = pool.submit(_run_cell, provider, _Cell(0, 0, request, False), **kw)
        tuned = pool.submit(_run_cell, provider, _Cell(0, 1, request, True), **kw)
        pair = base.result(), tuned.result()
    return PairResult(results_group, pair[0], pair[1], time.monotonic() - started)


def parse_strengths(raw: str) -> list[float]:
    try:
        values = [float(x) for x in (raw or "").replace(";", ",").split(",") if x.strip()]
    except ValueError:
        raise InputError(f"Strengths {raw!r} are not numbers.", hint="Type numbers separated by commas, e.g. 0.6, 0.9, 1.2.") from None
    if not values:
        raise InputError("No strengths given.", hint="Type numbers separated by commas, e.g. 0.6, 0.9, 1.2.")
    return values


def grid_columns(strengths: Sequence[float], include_base: bool) -> list[str]:
    return (["base"] if include_base else []) + [f"strength {s:g}" for s in strengths]


def plan_grid(prompts: Sequence[str], strengths: Sequence[float], include_base: bool,
              finetune_id: str | None) -> tuple[list[str], list[str]]:
    """Check a grid before anything is spent on it; returns (clean prompts, column names)."""
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if not prompts:
        raise InputError("The grid has no prompts.", hint="Type one prompt per line.")
    if not strengths and not include_base:
        raise InputError("The grid has no columns.", hint="Add strengths, or include the base model.")
    if not (finetune_id or "").strip() and strengths:
        raise InputError("No fine-tune is selected.", hint="Pick a ready fine-tune, or paste a fine-tune id.")
    for s in strengths:
        check_strength(s)
    columns = grid_columns(strengths, include_base)
    total = len(prompts) * len(columns)
    if total > MAX_GRID_CELLS:
        raise InputError(f"That grid has {total} cells; the limit is {MAX_GRID_CELLS}.",
                         hint="Use fewer prompts or strengths.")
    return prompts, columns


def check_sweep(provider: Provider, finetune_id: str, strengths: Sequence[float]) -> None:
    """Refuse, before anything is paid for, a strength sweep on a provider that serves the fine-tune at
    one strength only (its cells would all be the same picture)."""
    fixed = provider.strength_fixed(finetune_id) if strengths else ""
    if fixed and any(abs(s - 1.0) > 1e-9 for s in strengths):
        raise InputError(f"{fixed} A strength sweep would draw the same image in every column.",
                         hint="Keep the strength at 1 here, or sweep strengths on the local engine, which sets them "
                              "(the LoRA's repo has the weights; see the README, 'Hugging Face').")


def run_grid(provider: Provider, prompts: Sequence[str], strengths: Sequence[float], template: GenerateRequest, *,
             finetune_id: str, tuned_model: str | None = None, include_base: bool = True, max_concurrency: int = 4,
             on_cell: Callable[[CellResult, GridProgress], None] | None = None, out_dir: Path, owner: str,
             results: ResultStore | None = None, cancel: threading.Event | None = None) -> GridResult:
    """Rows = prompts, columns = base (optional) + strengths; one seed for every cell.

    ``on_cell`` is called from worker threads as each cell finishes, in completion order.
    ``cancel``: once set (the page went away), no further cell is started, so nothing more is paid
    for; cells already running finish. Cells never started are left out of the result.
    """
    prompts, columns = plan_grid(prompts, strengths, include_base, finetune_id)
    check_sweep(provider, finetune_id, strengths)
    total = len(prompts) * len(columns)
    group_id = results.new_group() if results else time.strftime("%Y%m%d-%H%M%S")
    models = models_for(provider, tuned_model, finetune_id)
    jobs: list[_Cell] = []
    for r, prompt in enumerate(prompts):
        c = 0
        if include_base:
            jobs.append(_Cell(r, c, replace(template, prompt=prompt), False))
            c += 1
        for s in strengths:
            jobs.append(_Cell(r, c, replace(template, prompt=prompt, strength=float(s)), True))
            c += 1

    grid: list[list[CellResult | None]] = [[None] * len(columns) for _ in prompts]
    lock = threading.Lock()
    done = 0
    kw = dict(finetune_id=(finetune_id or "").strip(), models=models, out_dir=out_dir / group_id, owner=owner,
              results=results, group_id=group_id)

    def work(cell: _Cell) -> None:
        nonlocal done
        if cancel is not None and cancel.is_set():
            return
        result = _run_cell(provider, cell, **kw)
        with lock:
            grid[cell.row][cell.col] = result
            done += 1
            progress = GridProgress(done, total)
        if on_cell is not None:
            try:
                on_cell(result, progress)
            except Exception:  # a display callback must not lose the result
                log.exception("on_cell callback failed")

    started = time.monotonic()
    pool = ThreadPoolExecutor(max_workers=max(1, min(max_concurrency, total)), thread_name_prefix=f"{THREAD_PREFIX}grid")
    try:
        for future in [pool.submit(work, job) for job in jobs]:
            future.result()
    finally:
        # On an error or a cancel, cells not started yet are dropped rather than paid for.
        pool.shutdown(wait=True, cancel_futures=True)
    cells = [[c for c in row if c is not None] for row in grid]
    return GridResult(group_id, list(prompts), columns, cells, time.monotonic() - started)


# --------------------------------------------------------------------------- contact sheet

def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow built without FreeType
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int, max_lines: int) -> list[str]:
    words, lines, line = text.split(), [], ""
    for word in words:
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1].rstrip(".") + "…"
    return lines


def _draw_failure(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], result: CellResult, size: int) -> None:
    """A failed cell in ``box`` (x, y, width, height): what went wrong and why, with ``size`` px titles."""
    x, y, w, h = box
    small, line = round(size * 13 / 16), round(size * 18 / 16)
    draw.rectangle((x, y, x + w, y + h), fill="#eeeeee", outline="#cc3333", width=max(2, size // 8))
    title = "moderated" if result.status == "moderated" else "error"
    draw.text((x + size // 2, y + size // 2), title, fill="#cc3333", font=_font(size))
    top = y + round(size * 34 / 16)
    for i, text in enumerate(_wrap(draw, result.error or "no details", _font(small), w - size,
                                   max_lines=max(1, (h - top + y - size // 2) // line))):
        draw.text((x + size // 2, top + i * line), text, fill="black", font=_font(small))


def failure_card(result: CellResult, size: tuple[int, int]) -> Image.Image:
    """A failed cell drawn as an image of ``size``, to stand where its image would: the reason in place,
    at the size of the image beside it."""
    width, height = max(64, size[0]), max(64, size[1])
    card = Image.new("RGB", (width, height), "white")
    _draw_failure(ImageDraw.Draw(card), (0, 0, width - 1, height - 1), result, max(16, min(width, height) // 16))
    return card


def contact_sheet(grid: GridResult, path: Path, *, cell: int = 256, label_width: int = 220) -> Path:
    """One labelled PNG: a header row of column names, a prompt label per row, errors in place."""
    pad, header = 8, 36
    rows, cols = len(grid.prompts), len(grid.columns)
    width = label_width + cols * (cell + pad) + pad
    height = header + rows * (cell + pad) + pad
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    font, small = _font(16), _font(13)
    for c, name in enumerate(grid.columns):
        x = label_width + pad + c * (cell + pad)
        draw.text((x + cell / 2, header / 2), name, fill="black", font=font, anchor="mm")
    for r, prompt in enumerate(grid.prompts):
        y = header + r * (cell + pad)
        for i, line in enumerate(_wrap(draw, prompt, small, label_width - 2 * pad, max_lines=math.floor(cell / 18))):
            draw.text((pad, y + pad + i * 18), line, fill="black", font=small)
        for result in grid.cells[r]:
            x = label_width + pad + result.col * (cell + pad)
            if result.status == "ok" and result.path and Path(result.path).exists():
                with Image.open(result.path) as im:
                    thumb = ImageOps.contain(im.convert("RGB"), (cell, cell))
                sheet.paste(thumb, (x + (cell - thumb.width) // 2, y + (cell - thumb.height) // 2))
                draw.text((x + 4, y + cell - 18), f"seed {result.seed}", fill="white", font=small,
                          stroke_width=2, stroke_fill="black")
            else:
                _draw_failure(draw, (x, y, cell, cell), result, 16)
    with atomic.replacing(path) as tmp:
        sheet.save(tmp, "PNG", optimize=False)
    return path
