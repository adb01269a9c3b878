"""20 visitors at once on the hosted app: everyone's work completes, each sees only their own, and a
cheap call is answered while generation is held up (loopback app + fake CometAPI only). How fast it
all is belongs to benchmarks/load.py, as ratios against a quiet app in the same run."""
from __future__ import annotations

import threading
from pathlib import Path

from gradio_client import Client

from services.config import Secret
from services.storage.jobs import JobStore
from services.storage.results import ResultStore
from tests.browser import client_owner, launched
from tests.conftest import FAKE_COMETAPI_KEY

SESSIONS = 20


def test_twenty_sessions_stay_responsive_and_isolated(settings, fake_cometapi):
    settings = settings.with_(cometapi_base_url=fake_cometapi.url, cometapi_key=Secret(FAKE_COMETAPI_KEY),
                              hosted=True, shared_key_limit=10)
    # Every render stays pending at the service until the test lets it finish.
    fake_cometapi.pending_polls = 10**6
    finetune = fake_cometapi.add_finetune()
    fields = ["a photo of TOK", 5, 1.0, 1024, 768]

    with launched(settings) as (demo, url):
        at_once = next(fn.concurrency_limit for fn in demo.fns.values() if fn.api_name == "compare")
        clients = [Client(url, verbose=False) for _ in range(SESSIONS + 1)]
        probe_client, visitors = clients[0], clients[1:]
        jobs = JobStore.from_settings(settings)
        owners = [client_owner(settings, client) for client in visitors]
        for owner in owners:  # each compares a ready fine-tune of their own (a pasted id must be theirs)
            job = jobs.create(owner, "cometapi", "finetune", "mine", "ds", "h", {})
            jobs.update(owner, job.id, remote_id=finetune, status="ready", result={"finetune_id": finetune})
        jobs.close()
        outcomes: dict[int, object] = {}

        def visit(i: int, client: Client) -> None:
            try:
                base, tuned, _details = client.predict(finetune, *fields, api_name="/compare")
                outcomes[i] = (base, tuned)
            except Exception as exc:  # recorded and asserted below
                outcomes[i] = exc

        threads = [threading.Thread(target=visit, args=(i, c)) for i, c in enumerate(visitors)]
        try:
            for t in threads:
                t.start()
            # As many compares as the app runs at once are rendering (base and tuned each), all held...
            assert fake_cometapi.wait_for_tasks(1 + 2 * at_once, timeout=120)  # 1: the seeded fine-tune
            # ...and a cheap call is answered meanwhile, not queued behind them.
            assert probe_client.submit(api_name="/list_jobs").result(timeout=120) == []  # bound: a hang, not speed
            assert outcomes == {}  # nothing could finish before it: every render is still held
            fake_cometapi.pending_polls = 0  # renders from now on finish at once; those held, at their next poll
            for task_id in fake_cometapi.task_ids():
                fake_cometapi.release(task_id)
            for t in threads:
                t.join(timeout=300)  # a hang's bound, not a speed limit
        finally:
            fake_cometapi.pending_polls = 0
            for task_id in fake_cometapi.task_ids():
                fake_cometapi.release(task_id)
            for c in clients:
                c.close()
    assert not any(t.is_alive() for t in threads)

    failures = {i: o for i, o in outcomes.items() if isinstance(o, Exception)}
    assert not failures and len(outcomes) == SESSIONS
    # Every visitor's history holds exactly their own two images, nobody else's.
    results = ResultStore(settings)
    seen: set[str] = set()
    for (base, tuned), owner in zip((outcomes[i] for i in range(SESSIONS)), owners):
        assert Path(base).exists() and Path(tuned).exists()
        names = {str(results.path_for(owner, r)) for r in results.list(owner)}
        assert len(names) == 2 and not names & seen
        seen |= names
    assert len(fake_cometapi.requests("/flux/v1/flux-pro-1.1-ultra")) == SESSIONS
