"""FLUX Finetune Studio: dataset → fine-tune → compare, in one Gradio app.

Run ``python app.py`` (or ``make run``). In a notebook::

    from app import create_app
    demo = create_app()
    demo.launch()
    ...
    demo.close()  # also stops the job tracker and any local training (at a checkpoint)

Importing this module builds nothing: ``app.demo`` (for ``gradio app.py``) is built on first use.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import gradio as gr
from gradio import utils as gr_utils
from starlette.middleware import Middleware

from components import api, compare_tab, dataset_tab, session_panel, train_tab
from components.identity import VisitorGate
from services.config import Settings
from services.errors import ConfigError
from services.providers.base import Provider
from services.studio import Studio

TITLE = "FLUX Finetune Studio"
CSS = """
#dataset-report ul { max-height: 14rem; overflow-y: auto; }
"""


class StudioBlocks(gr.Blocks):
    """The app's Blocks: closing it also closes the studio it made (job tracker, local trainings at a
    checkpoint, provider connections), so nothing of this app still runs or writes. A studio passed in
    by its owner (a notebook) is theirs to close."""

    studio: Studio | None = None
    owns_studio: bool = False

    def close(self, verbose: bool = True) -> None:
        try:
            super().close(verbose)
        finally:
            self.stop_background_work()

    def stop_background_work(self) -> None:
        if self.studio is not None and self.owns_studio:
            self.studio.close()


def create_app(
    settings: Settings | None = None,
    *,
    providers: dict[str, Provider] | None = None,
    track_interval: float = 3.0,
    studio: Studio | None = None,
) -> gr.Blocks:
    """Build the whole app over ``studio`` (the Python API's object: a notebook shares its jobs with
    the pages), or over a new one made from ``settings`` and ``providers`` (tests plug in providers
    wired to a fake)."""
    owns_studio = studio is None
    if studio is None:
        studio = Studio(settings, providers=providers, track_interval=track_interval, background=False)
    settings = studio.settings
    # Gradio copies every served file into its cache; sweep copies older than a day, hourly.
    with StudioBlocks(title=TITLE, analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        gr.Markdown(f"# {TITLE}\nTurn a folder of photos into your own fine-tuned FLUX model, and see what it learned.")
        session_key = session_panel.build(settings, on_key=studio.adopt)
        with gr.Tabs():
            # Each page fills itself in for the visitor on load (and when its tab is opened: a dataset made a
            # moment ago, or a fine-tune that became ready while the person was elsewhere, shows up there).
            with gr.Tab("1 · Dataset", id="dataset"):
                dataset_tab.build(studio, session_key, demo)
            with gr.Tab("2 · Train", id="train") as train_page:
                train_tab.build(studio, session_key, demo, train_page)
            with gr.Tab("3 · Compare", id="compare") as compare_page:
                compare_tab.build(studio, studio.placeholder_tile(), session_key, demo, compare_page)
        api.build(studio)
    for fn in demo.fns.values():
        if fn.api_name not in api.PUBLIC_API:
            fn.api_visibility = "undocumented"  # the page's own events: callable by the page, not listed
    # Polling ticks are cheap and must never wait behind uploads; heavy events set their own limits.
    demo.queue(default_concurrency_limit=4, max_size=64)
    studio.start()
    demo.studio = studio
    demo.owns_studio = owns_studio
    return demo


def launch_options(settings: Settings) -> dict:
    """Arguments for ``Blocks.launch`` that every way of starting the app shares."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    options = {
        # Nothing of the data dir is served: pages get copies in Gradio's cache (components/serving.py).
        # deep_links/ holds whole sessions' component values, written by a route anyone can call.
        "blocked_paths": [str(settings.data_dir.resolve()), str(Path(gr_utils.get_upload_folder()) / "deep_links"),
                          *([str(settings.db_dir.resolve())] if settings.db_dir else [])],
        "max_file_size": settings.max_upload_bytes,
        "theme": gr.themes.Soft(),
        "css": CSS,
        # The same endpoints as tools for an assistant, with the same owners, keys and budget rules:
        # Gradio's MCP server calls them over HTTP with the assistant's own headers (cookie included).
        "mcp_server": settings.mcp,
    }
    if settings.hosted:  # server-minted visitor cookies; other sites' pages may not act as a visitor
        options["app_kwargs"] = {"middleware": [Middleware(VisitorGate, settings=settings)]}
    return options


def parse_auth(raw: str) -> tuple[str, str] | None:
    if not raw:
        return None
    user, sep, password = raw.partition(":")
    if not sep or not user or not password:
        raise ConfigError("--auth / FLUX_STUDIO_AUTH must look like user:password.")
    return user, password


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=TITLE)
    parser.add_argument("--share", action="store_true", help="create a public gradio.live link")
    parser.add_argument("--auth", default=None, help="user:password required to open the app (or FLUX_STUDIO_AUTH)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", os.environ.get("GRADIO_SERVER_PORT", 7860))))
    parser.add_argument("--mcp", action="store_true", default=None,
                        help="also serve the API as MCP tools at /gradio_api/mcp/ (or FLUX_STUDIO_MCP=true)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings.from_env()
    if args.mcp:
        settings = settings.with_(mcp=True)
    try:
        auth = parse_auth(args.auth if args.auth is not None else settings.auth)
    except ConfigError as exc:
        sys.exit(str(exc))
    global demo  # the launched app is the module's ``demo``: `gradio app.py` (hot reload) looks for it there
    try:
        demo = create_app(settings)
    except ConfigError as exc:
        sys.exit(exc.user_message())
    try:
        demo.launch(server_name=args.host, server_port=args.port, share=args.share, auth=auth,
                    **launch_options(settings))
    finally:  # Ctrl+C: stop local trainings at a checkpoint, so they resume after the next start
        demo.stop_background_work()


def __getattr__(name: str):
    """``app.demo``, built on first use: ``gradio app.py`` looks it up; a plain import starts nothing."""
    if name == "demo":
        global demo
        demo = create_app()
        return demo
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    main()
