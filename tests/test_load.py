"""20 visitors at once on the hosted app: everyone's work completes, each sees only their own,
and a cheap call stays quick while generation queues (loopback app + fake CometAPI only)."""
from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path

from gradio_client import Client

from services.config import Secret
from services.storage.jobs import JobStore
from services.storage.results import ResultStore
from tests.browser import client_owner, running_app
from tests.conftest import FAKE_COMETAPI_KEY

SESSIONS = 20


def test_twenty_sessions_stay_responsive_and_isolated(settings, fake_cometapi):
    settings = settings.with_(cometapi_base_url=fake_cometapi.url, cometapi_key=Secret(FAKE_COMETAPI_KEY),
                              hosted=True, shared_key_limit=10)
    fake_cometapi.pending_polls = 0
    # Each image takes the "service" 0.5 s to render.
    fake_cometapi.set_latency("/flux/v1/flux-pro-1.1-ultra", 0.5)
    fake_cometapi.set_latency("/flux/v1/flux-pro-1.1-ultra-finetuned", 0.5)
    finetune = fake_cometapi.add_finetune()
    fields = ["a photo of TOK", 5, 1.0, 1024, 768]

    with running_app(settings) as url:
        clients = [Client(url, verbose=False) for _ in range(SESSIONS + 1)]
        probe_client, visitors = clients[0], clients[1:]
        jobs = JobStore.from_settings(settings)
        owners = [client_owner(settings, client) for client in visitors]
        for client in visitors:  # each compares a ready fine-tune of their own (a pasted id must be theirs)
            owner = client_owner(settings, client)
            job = jobs.create(owner, "cometapi", "finetune", "mine", "ds", "h", {})
            jobs.update(owner, job.id, remote_id=finetune, status="ready", result={"finetune_id": finetune})
        jobs.close()
        outcomes: dict[int, object] = {}
        probe_latencies: list[float] = []
        stop = threading.Event()

        def visit(i: int, client: Client) -> None:
            try:
                base, tuned, _details = client.predict(finetune, *fields, api_name="/compare")
                outcomes[i] = (base, tuned)
            except Exception as exc:  # recorded and asserted below
                outcomes[i] = exc

        def probe() -> None:
            while not stop.is_set():
                t0 = time.monotonic()
                probe_client.predict(api_name="/list_jobs")
                probe_latencies.append(time.monotonic() - t0)
                stop.wait(0.1)

        try:
            prober = threading.Thread(target=probe, daemon=True)
            prober.start()
            started = time.monotonic()
            threads = [threading.Thread(target=visit, args=(i, c)) for i, c in enumerate(visitors)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=120)
            wall = time.monotonic() - started
            stop.set()
            prober.join(timeout=10)
        finally:
            for c in clients:
                c.close()

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
    # 40 renders of 0.5 s, 8 compares at a time: about 3 s; a serial queue would need 20 s (plus overhead).
    assert wall < 30, wall
    assert len(probe_latencies) >= 5
    p95 = statistics.quantiles(probe_latencies, n=20)[-1]
    print(f"load: {SESSIONS} sessions, wall {wall:.2f}s, /list_jobs p95 {p95 * 1000:.0f} ms over {len(probe_latencies)} calls")
    assert p95 < 3.0, (p95, probe_latencies)  # generous: app, fake and 21 clients share 2 cores and one GIL
