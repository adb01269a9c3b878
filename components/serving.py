"""Files shown on a page: a copy in Gradio's cache, never a path inside the data dir.

The data dir holds every owner's files and the app's internals (the database, the owner secret,
local job folders), so it is neither an allowed path nor servable at all: ``launch_options``
blocks it. Whatever a handler shows goes through ``servable`` first, which copies it into
Gradio's cache under a keyed hash of its content, the same copy Gradio would make itself. A
handler that forgets fails loudly (Gradio refuses files in a blocked path) instead of leaking.
"""
from __future__ import annotations

from pathlib import Path

from gradio import processing_utils, utils


def servable(path: str | Path | None) -> str | None:
    """The cached copy of ``path`` to hand to a component (unchanged when there is no such file)."""
    if path is None:
        return None
    if not Path(path).is_file():
        return str(path)
    return processing_utils.save_file_to_cache(str(path), utils.get_upload_folder())


def servable_items(items: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Gallery items ``(path, caption)`` with each path made servable."""
    return [(servable(path), caption) for path, caption in items]
