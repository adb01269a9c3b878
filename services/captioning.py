"""Auto-captions through CometAPI's OpenAI-compatible chat endpoint with a vision model.

Captions are saved one by one as they arrive, so a failure half way (a bad image, a
rate limit, a dropped connection) keeps every caption already written.
"""
from __future__ import annotations

import base64
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

from services.providers.cometapi.client import CometAPIClient
from services.config import THREAD_PREFIX
from services.storage.captions import trigger_first
from services.storage.datasets import Dataset, DatasetStore
from services.errors import AuthError, EndpointUnavailableError, InputError, InsufficientCreditsError, StudioError

ProgressFn = Callable[[int, int, str], None]

_COMMON = (
    "Write one caption for this training image of a FLUX fine-tune. One sentence, at most 40 words, "
    "plain text, no quotes, no preamble. Refer to the main subject only as '{trigger}'."
)
INSTRUCTIONS = {
    "character": "The subject is a person or character called {trigger}. Describe pose, expression, clothing, "
                 "framing, setting and lighting; do not describe their face or identity in detail.",
    "product": "The subject is a product called {trigger}. Describe its placement, angle, surroundings, "
               "background and lighting; do not describe the product's own design in detail.",
    "style": "The image shows a visual style called {trigger}. Describe the content (objects, scene, layout) "
             "plainly and end with 'in the style of {trigger}'; do not describe the style itself.",
    "general": "Describe the image plainly: the subject {trigger}, what it is doing, where, and the lighting.",
}
# Any model output that would wreck a caption table: stray quotes, markdown, line breaks.
_JUNK = re.compile(r"^(caption:\s*)", re.I)


@dataclass
class CaptionReport:
    captioned: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    stopped: str = ""  # why the run stopped early, if it did

    def summary(self) -> str:
        parts = [f"Captioned {len(self.captioned)} image(s)"]
        if self.skipped:
            parts.append(f"kept {len(self.skipped)} existing caption(s)")
        if self.failed:
            parts.append(f"{len(self.failed)} failed")
        text = ", ".join(parts) + "."
        if self.stopped:
            text += f" Stopped early: {self.stopped}"
        return text


# What a dataset may show, each with its own captioning instructions (the Dataset tab's choices).
CAPTION_MODES: tuple[str, ...] = tuple(INSTRUCTIONS)


def images_to_caption(ds: Dataset, only_empty: bool) -> list[str]:
    """The files a captioning run sends, one paid vision call each."""
    return [item.file for item in ds.items if not (only_empty and item.caption.strip())]


def instruction(mode: str, trigger: str) -> str:
    if mode not in INSTRUCTIONS:
        raise InputError(f"Unknown captioning mode '{mode}'.", hint=f"Pick one of {', '.join(INSTRUCTIONS)}.")
    return _COMMON.format(trigger=trigger) + " " + INSTRUCTIONS[mode].format(trigger=trigger)


def clean_caption(text: str, trigger: str) -> str:
    text = " ".join((text or "").split())
    text = _JUNK.sub("", text).strip().strip('"“”\'`').strip()
    return trigger_first(text, trigger) if text else ""


def _data_url(path) -> str:
    mime = "image/png" if str(path).lower().endswith(".png") else "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


class Captioner:
    def __init__(self, client_factory: Callable[[], CometAPIClient], model: str, concurrency: int = 4) -> None:
        self._client_factory = client_factory
        self.model = model
        self.concurrency = max(1, concurrency)

    def caption_dataset(
        self,
        store: DatasetStore,
        name: str,
        *,
        mode: str,
        only_empty: bool = True,
        progress: ProgressFn | None = None,
    ) -> CaptionReport:
        ds = store.open(name)
        if not ds.items:
            raise InputError("The dataset has no images to caption.", hint="Upload images first.")
        trigger = ds.trigger_word or "TOK"
        prompt = instruction(mode, trigger)
        report = CaptionReport()
        todo = images_to_caption(ds, only_empty)
        sending = set(todo)
        report.skipped.extend(item.file for item in ds.items if item.file not in sending)
        if not todo:
            return report
        total = len(todo)
        if progress:
            progress(0, total, "Captioning")
        with self._client_factory() as client, ThreadPoolExecutor(self.concurrency, thread_name_prefix=f"{THREAD_PREFIX}caption") as pool:
            futures = {pool.submit(self._one, client, ds.image_path(f), prompt, trigger): f for f in todo}
            for done, fut in enumerate(as_completed(futures), start=1):
                file = futures[fut]
                try:
                    caption = fut.result()
                except (AuthError, InsufficientCreditsError, EndpointUnavailableError) as exc:
                    # Every other image would fail the same way: stop and say why.
                    report.stopped = exc.user_message()
                    report.failed[file] = exc.message
                    for other in futures:
                        other.cancel()
                    break
                except StudioError as exc:
                    report.failed[file] = exc.message
                except OSError as exc:
                    report.failed[file] = f"could not read the image ({exc.__class__.__name__})"
                else:
                    if caption:
                        store.set_captions(name, {file: caption})
                        report.captioned.append(file)
                    else:
                        report.failed[file] = "the model answered with an empty caption"
                if progress:
                    progress(done, total, f"Captioned {file}")
        return report

    def _one(self, client: CometAPIClient, path, prompt: str, trigger: str) -> str:
        messages = [{
            "role": "user",
            "content": [
                {"type": "text", "text": prompt},
                {"type": "image_url", "image_url": {"url": _data_url(path)}},
            ],
        }]
        return clean_caption(client.chat.complete(self.model, messages, max_tokens=120, temperature=0.2), trigger)
