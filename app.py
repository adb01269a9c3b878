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
from PIL import Image

from components import compare_tab, dataset_tab, session_panel, train_tab
from components.identity import VisitorGate
from services import atomic
from services.access import ProviderAccess
from services.captioning import Captioner
from services.cometapi import CometAPIClient
from services.cometapi_provider import CometAPIProvider
from services.config import Secret, Settings
from services.dataset import DatasetStores
from services.errors import ConfigError
from services.jobs import DatabaseBackup, JobStore
from services.local_provider import LocalProvider
from services.owners import installation_secret
from services.providers import Provider
from services.results import ResultStore
from services.training import Tracker, TrainingService

TITLE = "FLUX Finetune Studio"
# The endpoints a script may call (gradio_client, "Use via API"): the workflow's steps. Every other
# event is the page's own plumbing (ticks, picks, cell edits) and stays off the API page.
PUBLIC_API = frozenset({"add_images", "list_datasets", "delete_dataset", "export_zip", "auto_caption",
                        "launch_finetune", "list_jobs", "compare", "grid", "contact_sheet"})
CSS = """
#dataset-report ul { max-height: 14rem; overflow-y: auto; }
"""


def default_providers(settings: Settings) -> dict[str, Provider]:
    """Both providers; the first is the default: CometAPI with a key, else the local engine."""
    cometapi = CometAPIProvider.from_settings(settings)
    local = LocalProvider(settings)  # cheap: torch and diffusers load on first use
    if settings.cometapi_key:
        return {"cometapi": cometapi, "local": local}
    return {"local": local, "cometapi": cometapi}


def captioner_factory(settings: Settings, access: ProviderAccess):
    """``(visitor key, owner, address, images) -> Captioner | None``: the visitor's key, else the shared
    one, charged one paid call per image to caption when hosted."""

    def make(key: Secret | None, owner: str, address: str, images: int) -> Captioner | None:
        if key:
            return Captioner(lambda: CometAPIClient(settings.cometapi_base_url, key), settings.caption_model,
                             settings.caption_concurrency)
        if not settings.cometapi_key:
            return None
        if settings.hosted:
            access.budget.charge(owner, address, images)
        return Captioner(lambda: CometAPIClient.from_settings(settings), settings.caption_model,
                         settings.caption_concurrency)

    return make


class StudioBlocks(gr.Blocks):
    """The app's Blocks: closing it also stops what the app runs in the background.

    The job tracker is joined and each provider is closed (a local training stops at a checkpoint
    and stays resumable, as after a restart), so that nothing of this app still runs or writes."""

    studio_tracker: Tracker | None = None
    studio_training: TrainingService | None = None
    studio_access: ProviderAccess | None = None
    studio_backup: DatabaseBackup | None = None

    def close(self, verbose: bool = True) -> None:
        try:
            super().close(verbose)
        finally:
            self.stop_background_work()

    def stop_background_work(self) -> None:
        if self.studio_tracker is not None:
            self.studio_tracker.stop()
        if self.studio_backup is not None:  # after the tracker's last write: the copy has it
            self.studio_backup.stop()
            self.studio_backup = None
        if self.studio_training is not None:
            self.studio_training.close()
        if self.studio_access is not None:
            self.studio_access.close()


def create_app(
    settings: Settings | None = None,
    *,
    providers: dict[str, Provider] | None = None,
    track_interval: float = 3.0,
) -> gr.Blocks:
    """Build the whole app. Pass ``settings`` to point it at another data dir or service,
    ``providers`` to plug in other training back-ends (tests pass one wired to a fake)."""
    settings = settings or Settings.from_env()
    if settings.hosted:
        installation_secret(settings)  # a lost secret stops the app here, not on each visitor's request
    datasets = DatasetStores(settings)
    providers = providers if providers is not None else default_providers(settings)
    jobs = JobStore.from_settings(settings)  # one database: jobs, their events, generated images
    training = TrainingService(
        jobs, providers, datasets,
        max_images={key: getattr(p, "max_images", 0) for key, p in providers.items()},
        max_active={"local": settings.visitor_max_local_jobs} if settings.hosted else None,
    )
    default_provider = next(iter(providers))

    def cometapi_with_key(key: Secret) -> CometAPIProvider:
        return CometAPIProvider.from_settings(settings, key=key)

    access = ProviderAccess(settings, providers, cometapi_with_key)
    results = ResultStore(settings, jobs=jobs)
    # Gradio copies every served file into its cache; sweep copies older than a day, hourly.
    with StudioBlocks(title=TITLE, analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        gr.Markdown(f"# {TITLE}\nTurn a folder of photos into your own fine-tuned FLUX model, and see what it learned.")
        session_key = session_panel.build(settings, on_key=lambda owner, key: training.adopt(owner, access.own(key)))
        with gr.Tabs():
            with gr.Tab("1 · Dataset", id="dataset"):
                data = dataset_tab.build(datasets, settings, captioner_factory(settings, access), session_key)
            with gr.Tab("2 · Train", id="train") as train_page:
                train = train_tab.build(training, datasets, settings, default_provider, access, session_key)
            with gr.Tab("3 · Compare", id="compare") as compare_page:
                compare = compare_tab.build(access, training.jobs, results, settings, placeholder_image(settings),
                                            session_key)
        demo.load(data.refresh, [data.dataset], [data.dataset], show_progress="hidden")
        # Also on opening a tab: a dataset made a moment ago, or a fine-tune that became ready
        # while the person was elsewhere, shows up there.
        gr.on([demo.load, train_page.select], train.on_load, [train.provider, train.dataset, session_key],
              [train.banner, train.dataset, train.jobs, train.queue, train.timer, train.seen], show_progress="hidden")
        gr.on([demo.load, compare_page.select], compare.on_load, None, [compare.finetune, compare.history],
              show_progress="hidden")
    for fn in demo.fns.values():
        if fn.api_name not in PUBLIC_API:
            fn.api_visibility = "undocumented"
    # Polling ticks are cheap and must never wait behind uploads; heavy events set their own limits.
    demo.queue(default_concurrency_limit=4, max_size=64)
    training.resume_on_start()
    tracker = Tracker(training, interval=track_interval).start()
    demo.studio_settings = settings  # type: ignore[attr-defined]
    demo.studio_training = training
    demo.studio_tracker = tracker
    demo.studio_access = access
    if settings.db_backup_path is not None:
        demo.studio_backup = DatabaseBackup(jobs, settings.db_backup_path, settings.db_backup_every_s).start()
    demo.studio_results = results  # type: ignore[attr-defined]
    return demo


def placeholder_image(settings: Settings) -> Path:
    """A light grey tile shown in grid cells that are still rendering (served from the data dir)."""
    path = settings.data_dir / ".assets" / "pending.png"
    if not path.exists():
        with atomic.replacing(path) as tmp:
            Image.new("RGB", (64, 64), (236, 236, 240)).save(tmp, "PNG")
    return path


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
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings.from_env()
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
