"""benchmarks/local_train_gpu.py: its CPU path (what CI runs) and its measuring functions."""
from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")
torch = pytest.importorskip("torch")

from benchmarks import local_train_gpu as bench

TINY_LABELS = ("FLUX.1 (tiny)", "FLUX.2-klein (tiny)")


def test_without_cuda_it_says_so_and_trains_both_tiny_families(monkeypatch, tmp_path, capsys):
    # CI has no GPU; a developer's machine might: force the CPU path either way.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out_json = tmp_path / "results.json"

    assert bench.main(["--json", str(out_json)]) == 0

    out = capsys.readouterr().out
    assert bench.SKIP_LINE in out
    assert "| model | preset | res |" in out  # the Markdown table
    doc = json.loads(out_json.read_text())
    for label in TINY_LABELS:
        ran = [r for r in doc["rows"] if r["model_label"] == label and r["status"] == "ok"]
        assert {r["preset"] for r in ran} >= {"bf16", "bf16+ckpt"}, label
        for r in ran:
            assert math.isfinite(r["s_per_step"]) and r["s_per_step"] > 0
            assert len(r["step_times"]) == bench.TINY_STEPS
            assert r["flops"] > 0
            assert math.isfinite(r["loss"])
    for r in doc["rows"]:
        # A quantised preset runs where its library is installed, else says which one is missing.
        assert r["status"] == "ok" or (r["status"] == "skipped" and r["note"].endswith("not installed")), r
    assert [t["verdict"] for t in doc["targets"]] == ["not run"] * 3


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


def test_model_flops_include_attention_that_the_cpu_count_misses():
    spec = bench.TINY["flux1"].with_blocks(2, 1)
    res = 64
    model = bench.build_transformer(spec, "cpu", torch.float32)
    bench.add_lora(model, spec, checkpointing=False)
    batch = bench.make_batch(spec, res, "cpu", torch.float32)
    gen = torch.Generator().manual_seed(0)
    on_cpu = bench.count_flops(lambda: bench.flow_loss(model, spec, batch, gen, "cpu", torch.float32).backward())

    tokens = (res // bench.PIXELS_PER_TOKEN) ** 2 + spec.text_tokens
    c = spec.config
    width = c["num_attention_heads"] * c["attention_head_dim"]
    # Per layer: QK^T and PV are 2 * L^2 * width each forward; backward doubles that.
    attention = 3 * 4 * tokens**2 * width * (c["num_layers"] + c["num_single_layers"])
    assert bench.model_flops(spec, res, torch.float32) == on_cpu + attention


@pytest.mark.parametrize(("spec", "billions"), [
    (bench.FLUX1_DEV, 11.9), (bench.KLEIN_4B, 3.88), (bench.KLEIN_9B, 9.08),
])
def test_published_configs_have_the_published_sizes(spec, billions):
    model = bench.build_transformer(spec, "meta", torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, rel=0.01)
    targets = bench.lora_targets(model, spec.family)
    assert "to_q" in targets and "add_q_proj" in targets
    assert ("to_qkv_mlp_proj" in targets) == (spec.family == "flux2")


def test_mfu_and_the_peak_table():
    assert bench.mfu(0.5 * 989e12, 1.0, 989.0) == pytest.approx(0.5)
    assert bench.mfu(0.5 * 989e12, 2.0, 989.0) == pytest.approx(0.25)
    assert bench.peak_tflops_for("NVIDIA H100 80GB HBM3") == 989.0
    assert bench.peak_tflops_for("NVIDIA H100 PCIe") == 756.0
    assert bench.peak_tflops_for("NVIDIA H200") == 989.0
    assert bench.peak_tflops_for("Tesla T4") is None


def test_memory_is_reported_only_where_cuda_measures_it():
    assert bench.peak_memory_bytes("cpu") is None
    assert bench.gib(None) == "n/a"
    assert bench.gib(9 * 2**30) == "9.0"


def _row(preset: str, res: int, status: str = "ok", **kw) -> bench.Row:
    return bench.Row(model="flux1", model_label="FLUX.1-dev", preset=preset, resolution=res, status=status, **kw)


def test_targets_pass_fail_and_not_run():
    rows = [
        _row("bf16", 512, s_per_step=0.7),
        _row("bf16+ckpt", 512, s_per_step=0.55),  # the best bf16 row at 512 px counts
        _row("nf4", 512, peak_bytes=11 * 2**30),
        _row("bf16", 1024, status="oom"),
    ]
    verdicts = [t.verdict for t in bench.evaluate_targets(rows, real_size=True)]
    assert verdicts == ["PASS", "FAIL", "not run"]
    assert [t.verdict for t in bench.evaluate_targets(rows, real_size=False)] == ["not run"] * 3


def test_unknown_preset_is_refused_with_the_choices(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--presets", "fp8"])
    assert "bf16+ckpt" in capsys.readouterr().err
