"""benchmarks/local_train_gpu.py: its CPU path (what CI runs), that it times the product's Trainer.run,
that a failing row keeps its own error, and its measuring functions."""
from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")
torch = pytest.importorskip("torch")

from benchmarks import local_train_gpu as bench  # noqa: E402
from services.engine import memory  # noqa: E402
from services.engine.train import Trainer  # noqa: E402

TINY_LABELS = ("FLUX.1 (tiny)", "FLUX.2-klein (tiny)")


def test_without_cuda_it_says_so_and_times_the_trainers_own_run_on_both_tiny_families(monkeypatch, tmp_path,
                                                                                          capsys):
    # CI has no GPU; a developer's machine might: force the CPU path either way.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    runs: list[Trainer] = []
    real_run = Trainer.run

    def run(self, *args, **kwargs):
        runs.append(self)
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "run", run)
    out_json = tmp_path / "results.json"

    assert bench.main(["--resolutions", "512", "--json", str(out_json)]) == 0

    out = capsys.readouterr().out
    assert bench.SKIP_LINE in out
    assert "| model | preset | res |" in out  # the Markdown table
    doc = json.loads(out_json.read_text())
    assert [r["model_label"] for r in doc["rows"]] == list(TINY_LABELS)
    assert len(runs) == 2 and {t.cfg.family for t in runs} == {"flux1", "flux2"}  # the product's loop, twice
    for r in doc["rows"]:
        assert r["status"] == "ok", r
        assert len(r["step_times"]) == bench.TINY_WARMUP + bench.TINY_STEPS == len(r["losses"])
        assert r["s_per_step"] > 0 and r["prepare_s"] > 0 and r["sample_s"] > 0 and r["build_s"] >= 0
        assert r["flops"] > 0 and r["lora_mb"] > 0
        assert all(math.isfinite(v) for v in r["losses"])
        assert r["image_tokens"] == (32 // 2) ** 2  # the tiny VAEs do not downsample; 2x2 patches
    assert [t["verdict"] for t in doc["targets"]] == ["not run"] * 3


def _tiny_row(monkeypatch, tmp_path, build, free_memory=None) -> list[bench.Row]:
    specs = bench._tiny_specs()
    broken = {**specs, "tiny-flux1": bench.replace(specs["tiny-flux1"], build=build)}
    monkeypatch.setattr(bench, "_tiny_specs", lambda: broken)
    if free_memory is not None:
        monkeypatch.setattr(bench, "free_memory", free_memory)
    plan = bench.Plan(steps=1, warmup=0, images=1, sample_steps=1, device="cpu", peak_tflops=None)
    return bench.run_all(list(broken.values()), ["none"], [32], plan, isolate=False, work=tmp_path)


def test_a_failing_row_keeps_its_own_first_error_and_the_others_still_run(monkeypatch, tmp_path):
    def build():
        raise RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling cublasSgemm")

    cleanups: list[int] = []

    def free_memory(device):  # after a CUDA error, freeing memory fails too: it must not mask the first error
        cleanups.append(1)
        if len(cleanups) == 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    failed, other = _tiny_row(monkeypatch, tmp_path, build, free_memory)
    assert (failed.status, failed.error) == ("error", "RuntimeError")
    assert failed.message.startswith("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED")
    assert failed.where.startswith("tests/test_benchmarks_gpu.py:") and failed.where.endswith(" in build")
    assert "illegal memory access" in failed.cleanup_error
    assert other.status == "ok" and other.model_label == TINY_LABELS[1]
    table = bench.format_table([failed, other])
    assert "error: RuntimeError: CUDA error: CUBLAS_STATUS_EXECUTION_FAILED" in table
    assert "cleanup: RuntimeError: CUDA error: an illegal memory access" in table


def test_a_row_runs_in_its_own_process_and_a_dead_one_is_recorded(tmp_path):
    plan = bench.Plan(steps=1, warmup=0, images=1, sample_steps=1, device="cpu", peak_tflops=None)
    spec = bench.spec_named("tiny-flux1")
    row = bench.measure_isolated(spec, "none", 32, plan, tmp_path / "ok")
    assert row.status == "ok" and row.s_per_step > 0 and len(row.losses) == 1

    gone = bench.replace(spec, key="no-such-model")  # the child cannot find it: it dies before writing a row
    dead = bench.measure_isolated(gone, "none", 32, plan, tmp_path / "dead")
    assert dead.status == "error" and dead.error == "exit status 1" and "KeyError" in dead.message


def test_the_in_memory_factory_quantises_the_transformer_as_the_preset_says():
    bnb = pytest.importorskip("bitsandbytes")  # its CPU backend quantises here
    factory = bench.in_memory_factory(bench._tiny("flux2"), "cpu")
    pipe = factory(None, torch.bfloat16, memory.pipeline_quantization_config(memory.PRESETS["24gb"]))
    linears = [m for m in pipe.transformer.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, bnb.nn.Linear4bit) for m in linears)
    assert {m.weight.quant_type for m in linears} == {"nf4"}
    assert pipe.vae.dtype == pipe.text_encoder.dtype == torch.bfloat16  # only the transformer is quantised
    plain = factory(None, torch.bfloat16, None)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in plain.transformer.modules())


def test_flop_counter_counts_a_linear_exactly():
    m, k, n = 8, 32, 16
    lin = torch.nn.Linear(k, n, bias=False)
    x = torch.randn(m, k, requires_grad=True)
    assert bench.count_flops(lambda: lin(x)) == 2 * m * n * k
    # Full training: forward + grad of the input + grad of the weight.
    assert bench.count_flops(lambda: lin(x).sum().backward()) == 3 * 2 * m * n * k
    # A frozen (LoRA base) weight gets no gradient: the step is 2x the forward, not 3x.
    lin.requires_grad_(False)
    assert bench.count_flops(lambda: lin(x).sum().backward()) == 2 * 2 * m * n * k


def test_step_flops_are_the_trainers_step_with_the_attention_the_cpu_count_misses(tmp_path):
    plan = bench.Plan(steps=1, warmup=0, images=1, sample_steps=1, device="cpu", peak_tflops=None)
    spec = bench.spec_named("tiny-flux1")
    cfg = bench.row_config(spec, "none", 32, plan)
    trainer = Trainer(cfg, bench.dataset_zip(tmp_path / "d.zip", 1, 32), tmp_path / "job",
                      pipeline_factory=bench.in_memory_factory(spec.build, "cpu"))
    trainer.prepare()
    c = trainer.cache[0]
    gen = torch.Generator().manual_seed(0)
    on_cpu = bench.count_flops(lambda: trainer.flow_loss(c.mean.float(), [c.embeds], trainer.latent_ids(c.bucket),
                                                         gen).backward())
    tokens = c.mean.shape[1] + c.prompt_embeds.shape[1]
    t = trainer.transformer.config
    width = t.num_attention_heads * t.attention_head_dim
    # Per layer: QK^T and PV are 2 * L^2 * width each forward; backward doubles that.
    attention = 3 * 4 * tokens**2 * width * (t.num_layers + t.num_single_layers)
    assert bench.step_flops(trainer) == on_cpu + attention


@pytest.mark.parametrize(("key", "billions"), [
    ("flux1", {"transformer": 11.90, "text_encoder": 0.123, "text_encoder_2": 4.76, "vae": 0.084}),
    ("klein", {"transformer": 3.88, "text_encoder": 4.02, "vae": 0.084}),
    ("klein9b", {"transformer": 9.08, "text_encoder": 8.19, "vae": 0.084}),
])
def test_published_configs_have_the_published_sizes(key, billions):
    pipe = bench.build_on(bench.MODELS[key].build, "meta", torch.bfloat16)  # shapes only, no memory
    sizes = {name: sum(p.numel() for p in getattr(pipe, name).parameters()) / 1e9 for name in billions}
    assert sizes == pytest.approx(billions, rel=0.01)
    assert pipe.transformer.dtype == torch.bfloat16


def test_mfu_and_the_peak_table():
    assert bench.mfu(0.5 * 989e12, 1.0, 989.0) == pytest.approx(0.5)
    assert bench.mfu(0.5 * 989e12, 2.0, 989.0) == pytest.approx(0.25)
    assert bench.peak_tflops_for("NVIDIA H100 80GB HBM3") == 989.0
    assert bench.peak_tflops_for("NVIDIA H100 PCIe") == 756.0
    assert bench.peak_tflops_for("NVIDIA H200") == 989.0
    assert bench.peak_tflops_for("Tesla T4") is None


def test_memory_is_reported_only_where_cuda_measures_it():
    assert bench.peak_bytes("cpu") is None
    assert bench.gib(None) == "n/a"
    assert bench.gib(9 * 2**30) == "9.0"


def _row(preset: str, res: int, status: str = "ok", **kw) -> bench.Row:
    return bench.Row(model="flux1", model_label="FLUX.1-dev", preset=preset, resolution=res, status=status, **kw)


def test_targets_pass_fail_and_not_run():
    rows = [
        _row("bf16", 512, s_per_step=0.55),
        _row("24gb", 512, peak_bytes=12 * 2**30),
        _row("16gb", 512, peak_bytes=11 * 2**30),  # the smallest NF4 peak counts
        _row("bf16", 1024, status="oom"),
    ]
    verdicts = [t.verdict for t in bench.evaluate_targets(rows, real_size=True)]
    assert verdicts == ["PASS", "FAIL", "not run"]
    assert [t.verdict for t in bench.evaluate_targets(rows, real_size=False)] == ["not run"] * 3


def test_unknown_preset_is_refused_with_the_choices(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--presets", "nf4"])
    assert "bf16, 24gb, 16gb, 12gb" in capsys.readouterr().err
