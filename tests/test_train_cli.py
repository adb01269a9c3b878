"""The trainer's command line (``engine.cli``): its progress lines, errors, cancel, resume, and the
pushes to a Hub repo (``engine.push``) that a Hugging Face job relies on.

One real subprocess run (the session's ``cli_run``) and a few in-process runs on the tiny FLUX.1
model; the Hub is an autospec'd ``HfApi``. Skipped where the local engine's extra is not installed.
"""
from __future__ import annotations

import math
import shutil
import signal
from pathlib import Path
from unittest.mock import create_autospec

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("torch")

from huggingface_hub import HfApi  # noqa: E402

from services.config import Secret  # noqa: E402
from services.errors import ProviderError  # noqa: E402
from services.engine import cli, events, push  # noqa: E402
from services.engine.card import LORA_FILE  # noqa: E402
from services.engine.push import RESUME_PATTERNS, RepoPusher  # noqa: E402
from services.engine.train import Trainer  # noqa: E402
from tests.train_cli_run import CliRun, cli_args, run_cli, write_inputs  # noqa: E402

HF_TOKEN = "hf_FAKEcliToken0123456789abcdefSECRET"
REPO = "someone/tiny-lora-run"


def run_here(tmp_path: Path, capsys, steps: int = 6, *, extra: tuple[str, ...] = (), api=None,
             sample_every: int = 3, checkpoint_every: int = 3) -> CliRun:
    """The CLI in this process (so the Hub can be mocked), its stdout captured."""
    config, dataset = write_inputs(tmp_path, steps, sample_every=sample_every, checkpoint_every=checkpoint_every)
    out = tmp_path / "job"
    code = cli.main(cli_args(config, dataset, out, *extra), api=api)
    captured = capsys.readouterr()
    return CliRun(captured.out.splitlines(), code, out, captured.err)


def kinds(run: CliRun) -> list[str]:
    return [events.event_of(text)[events.KEY] for text in run.lines if events.event_of(text)]


@pytest.fixture
def hub(monkeypatch):
    """An autospec'd HfApi, HF_TOKEN set, and ``order``: pushes and printed lines as they happen."""
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    api = create_autospec(HfApi, instance=True)
    order: list[tuple] = []
    api.upload_file.side_effect = lambda **kw: order.append(("push", kw["path_in_repo"]))
    api.upload_folder.side_effect = lambda **kw: order.append(
        ("push", kw["path_in_repo"], *(kw.get("allow_patterns") or ())))
    real_emit = events.emit

    def emit(kind, stream=None, **fields):
        order.append(("line", kind, fields.get("path") or fields.get("state") or ""))
        real_emit(kind, stream, **fields)

    monkeypatch.setattr(events, "emit", emit)
    api.order = order
    return api


# --------------------------------------------------------------------------- a real run, as a subprocess


def test_a_run_prints_lines_that_parse_reads_back(cli_run):
    log = cli_run.log
    assert all(events.event_of(text) for text in cli_run.lines), "stdout holds only progress lines"
    assert events.event_of(cli_run.lines[0]) == {events.KEY: "start", "total": 6, "resumed_from": 0}
    assert log.total == 6 and log.resumed_from == 0 and log.step == 6
    assert sorted(log.losses) == [1, 2, 3, 4, 5, 6] and all(math.isfinite(v) for v in log.losses.values())
    assert kinds(cli_run).count("step") == 6
    assert log.samples == ["samples/step_000003.png", "samples/step_000006.png"]
    assert all((cli_run.out_dir / s).is_file() for s in log.samples)
    assert (log.checkpoint_step, log.checkpoint_path) == (3, "checkpoints/step_000003")
    assert (cli_run.out_dir / log.checkpoint_path / "trainer_state.json").is_file()
    assert (log.done, log.lora, log.error) == ("ready", LORA_FILE, "")
    assert (cli_run.out_dir / "output" / LORA_FILE).is_file()
    # The sample and the checkpoint of step 3 come between steps 3 and 4; done is last.
    order = kinds(cli_run)
    assert order[order.index("sample") - 1] == "step" and order.index("checkpoint") < order.index("step", 5)
    assert order[-1] == "done"


def test_other_lines_in_a_jobs_log_do_not_confuse_parse(cli_run_lines):
    noisy: list[str] = ["Collecting diffusers", "Loading pipeline components...: 100%|██████| 7/7", ""]
    for i, text in enumerate(cli_run_lines):
        noisy.append(f"2026-11-25T04:00:{i:02d}Z {text}" if i % 2 else text)  # a log service's timestamps
        noisy += ['{"not": "ours"}', '{"flux_studio": "nonsense", "step": 99}', "{broken json", "Traceback (most"]
    assert events.parse(noisy) == events.parse(cli_run_lines)


def test_a_missing_dataset_is_an_error_line_and_exit_status_1(tmp_path):
    run = run_cli(tmp_path, dataset=tmp_path / "missing.zip")
    assert run.returncode == 1
    assert kinds(run) == ["error"]
    assert run.log.error.startswith("InputError: The dataset ") and "missing.zip does not exist" in run.log.error


def test_an_unreadable_config_is_an_error_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{not json", encoding="utf-8")
    code = cli.main(cli_args(tmp_path / "config.json", tmp_path / "d.zip", tmp_path / "job"))
    log = events.parse(capsys.readouterr().out.splitlines())
    assert code == 1 and "is not readable JSON" in log.error and log.done == ""


def test_download_progress_becomes_a_few_phase_lines(tmp_path, capsys, monkeypatch):
    from services.engine import models

    def folder_of(spec, *, data_dir, token=None, on_progress=None):
        for done in (1, 2, 3, 4):  # well within DOWNLOAD_REPORT_EVERY_S of each other
            on_progress(done * 2**29, 4 * 2**29)
        raise OSError("disk full")

    monkeypatch.setattr(models, "folder_of", folder_of)
    run = run_here(tmp_path, capsys)
    phases = [events.event_of(t)["message"] for t in run.lines if events.event_of(t)[events.KEY] == "phase"]
    assert phases == ["Downloading the base model: 0.5 of 2.0 GB…", "Downloading the base model: 2.0 of 2.0 GB…"]
    assert run.returncode == 1 and run.log.error == "OSError: disk full"


def test_resume_with_no_checkpoint_is_an_error(tmp_path, capsys):
    run = run_here(tmp_path, capsys, extra=("--resume",))
    assert run.returncode == 1 and "no checkpoint to resume from" in run.log.error
    assert "start" not in kinds(run)


# --------------------------------------------------------------------------- pushing to a Hub repo


def test_each_sample_and_checkpoint_is_pushed_before_its_line_and_the_lora_at_the_end(tmp_path, capsys, hub):
    run = run_here(tmp_path, capsys, extra=("--push-to", REPO), api=hub)
    assert run.returncode == 0 and run.log.done == "ready"
    assert f"Uploading the LoRA to {REPO}…" in [events.event_of(t).get("message") for t in run.lines]
    assert run.log.message == ""  # done ends the last phase
    hub.create_repo.assert_called_once_with(REPO, repo_type="model", private=True, exist_ok=True)
    pushes_and_outputs = [e for e in hub.order if e[0] == "push" or e[1] in ("sample", "checkpoint", "done")]
    assert pushes_and_outputs == [
        ("push", "samples/step_000003.png"), ("line", "sample", "samples/step_000003.png"),
        ("push", "checkpoints", "step_000003/*"), ("line", "checkpoint", "checkpoints/step_000003"),
        ("push", "samples/step_000006.png"), ("line", "sample", "samples/step_000006.png"),
        ("push", ""), ("line", "done", "ready"),
    ]
    checkpoint = hub.upload_folder.call_args_list[0].kwargs
    assert checkpoint["folder_path"] == str(run.out_dir / "checkpoints")
    assert checkpoint["delete_patterns"] == ["step_*"] and checkpoint["repo_id"] == REPO
    final = hub.upload_folder.call_args_list[1].kwargs
    assert final["folder_path"] == str(run.out_dir / "output") and (Path(final["folder_path"]) / LORA_FILE).is_file()
    sample = hub.upload_file.call_args_list[0].kwargs
    assert sample["path_or_fileobj"] == str(run.out_dir / "samples" / "step_000003.png")
    # The token went to no call (the client holds it) and into no line.
    assert HF_TOKEN not in repr(hub.mock_calls)
    assert HF_TOKEN not in "\n".join(run.lines) + run.stderr


def test_sigterm_stops_at_a_checkpoint_pushes_it_and_says_cancelled(tmp_path, capsys, hub, monkeypatch):
    original = Trainer.step_cached

    def step_then_sigterm(self, step, gen):  # HF's cancel_job stops the container with SIGTERM
        loss = original(self, step, gen)
        if step == 1:
            signal.raise_signal(signal.SIGTERM)
        return loss

    monkeypatch.setattr(Trainer, "step_cached", step_then_sigterm)
    before = signal.getsignal(signal.SIGTERM)
    run = run_here(tmp_path, capsys, steps=50, extra=("--push-to", REPO), api=hub, sample_every=0,
                   checkpoint_every=0)
    assert run.returncode == 0
    assert (run.log.done, run.log.step, run.log.checkpoint_step) == ("cancelled", 2, 2)
    assert sorted(run.log.losses) == [1, 2] and run.log.lora == ""
    tail = [e for e in hub.order if e[0] == "push" or e[1] in ("checkpoint", "done")]
    assert tail == [("push", "checkpoints", "step_000002/*"), ("line", "checkpoint", "checkpoints/step_000002"),
                    ("line", "done", "cancelled")]
    assert (run.out_dir / "checkpoints" / "step_000002" / "lora.safetensors").is_file()
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back


def test_resume_from_the_repo_fetches_the_checkpoint_then_goes_on(cli_run, tmp_path, capsys, hub):
    def snapshot_download(repo_id, *, local_dir, **kw):  # the repo holds the run's checkpoint and samples
        for folder in ("checkpoints", "samples"):
            shutil.copytree(cli_run.out_dir / folder, Path(local_dir) / folder, dirs_exist_ok=True)
        return local_dir

    hub.snapshot_download.side_effect = snapshot_download
    run = run_here(tmp_path, capsys, extra=("--resume", "--push-to", REPO), api=hub)
    hub.snapshot_download.assert_called_once_with(REPO, repo_type="model", local_dir=str(run.out_dir),
                                                  allow_patterns=RESUME_PATTERNS)
    assert RESUME_PATTERNS == ["checkpoints/*", "samples/*"]
    assert run.returncode == 0 and run.log.resumed_from == 3
    assert sorted(run.log.losses) == [4, 5, 6] and run.log.done == "ready"
    assert run.log.samples == ["samples/step_000006.png"]
    assert (run.out_dir / "output" / "samples" / "step_000003.png").is_file()  # the earlier sample is kept


def test_resume_from_a_repo_with_no_checkpoint_is_an_error(tmp_path, capsys, hub):
    run = run_here(tmp_path, capsys, extra=("--resume", "--push-to", REPO), api=hub)
    assert hub.snapshot_download.call_count == 1
    assert run.returncode == 1 and "no checkpoint to resume from" in run.log.error


def test_a_failed_final_push_is_an_error_without_the_token(tmp_path, capsys, hub, monkeypatch):
    monkeypatch.setattr(push, "PUSH_BACKOFF_S", 0.0)

    def upload_folder(**kw):
        if kw["path_in_repo"] == "":
            raise RuntimeError(f"connection reset while sending with token {HF_TOKEN}")

    hub.upload_folder.side_effect = upload_folder
    run = run_here(tmp_path, capsys, steps=2, extra=("--push-to", REPO), api=hub, sample_every=0, checkpoint_every=0)
    assert run.returncode == 1 and run.log.done == ""
    assert hub.upload_folder.call_count == push.PUSH_TRIES
    assert run.log.error.startswith("ProviderError: Publishing to the Hugging Face Hub failed")
    assert HF_TOKEN not in "\n".join(run.lines) + run.stderr


def test_push_to_needs_a_token(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    run = run_here(tmp_path, capsys, extra=("--push-to", REPO))
    assert run.returncode == 1 and "needs a Hugging Face token" in run.log.error


def test_a_failed_sample_push_is_retried_then_reported_and_skipped(tmp_path):
    api = create_autospec(HfApi, instance=True)
    api.upload_file.side_effect = [OSError(f"timed out ({HF_TOKEN})"), None]
    warnings: list[str] = []
    pusher = RepoPusher(REPO, api, token=Secret(HF_TOKEN), warn=warnings.append, backoff_s=0)
    sample = tmp_path / "step_000010.png"
    sample.write_bytes(b"png")
    assert pusher.push_sample(sample) is True and api.upload_file.call_count == 2
    assert len(warnings) == 1 and "try 1 of 3" in warnings[0]

    api.upload_file.side_effect = OSError(f"timed out ({HF_TOKEN})")
    warnings.clear()
    assert pusher.push_sample(sample) is False and api.upload_file.call_count == 2 + push.PUSH_TRIES
    assert "going on" in warnings[-1] and len(warnings) == push.PUSH_TRIES
    assert all(HF_TOKEN not in w for w in warnings)


def test_a_failed_output_push_raises_a_provider_error(tmp_path):
    api = create_autospec(HfApi, instance=True)
    api.upload_folder.side_effect = ConnectionError("refused")
    pusher = RepoPusher(REPO, api, token=Secret(HF_TOKEN), backoff_s=0, tries=2)
    with pytest.raises(ProviderError, match="Could not reach the Hugging Face Hub"):
        pusher.push_output(tmp_path)
    assert api.upload_folder.call_count == 2


# --------------------------------------------------------------------------- the README's example config


def readme_example_config() -> dict:
    """The JSON block of the README's "Training from the command line" section, as written."""
    import json
    import re

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Training from the command line", 1)[1].split("\n### ", 1)[0]
    blocks = re.findall(r"```json\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the section shows one example config"
    return json.loads(blocks[0])


def test_the_readmes_example_config_runs_as_written(tmp_path, capsys):
    example = readme_example_config()
    assert "model_path" not in example and "family" not in example  # _model alone names the base model
    config, dataset = write_inputs(tmp_path, example["steps"], config=example)
    code = cli.main(cli_args(config, dataset, tmp_path / "job"))
    captured = capsys.readouterr()
    run = CliRun(captured.out.splitlines(), code, tmp_path / "job", captured.err)
    assert run.returncode == 0, run.log.error
    assert (run.log.done, run.log.step, run.log.error) == ("ready", example["steps"], "")
    assert run.log.samples == ["samples/step_000004.png", "samples/step_000008.png"]
    assert all((run.out_dir / s).is_file() for s in run.log.samples)
    assert (run.out_dir / "output" / LORA_FILE).is_file()
    card = (run.out_dir / "output" / "README.md").read_text(encoding="utf-8")
    assert "flux2-klein" in card  # trained as FLUX.2 [klein], the family its model_index.json names
