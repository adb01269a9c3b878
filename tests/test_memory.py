"""Memory presets: picked from the GPU's size, overridden by name, an estimate calibrated on published
figures, a refusal before launch when it does not fit, and the trainer's hooks (quantisation, optimizer)."""
from __future__ import annotations

import importlib.machinery
import logging
import sys
import types
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from services.errors import InputError
from services.engine import memory
from services.engine.memory import (
    PRESETS,
    GpuMemory,
    check_fits,
    estimate_training_memory,
    make_optimizer,
    pick_preset,
    pipeline_quantization_config,
    plan_memory,
    quantization_config,
    resolve_preset,
)

FLUX1_DEV = 11.9e9  # FLUX.1-dev's transformer parameters


def gpu(total_gb: float) -> GpuMemory:
    return GpuMemory("Test GPU", total_gb, None)


# --------------------------------------------------------------------------- which preset


@pytest.mark.parametrize(("nominal", "reported", "expected"), [
    (80, 79.1, "bf16"),   # H100 / A100 80 GB
    (48, 47.5, "bf16"),   # A6000 / L40S: a 48 GB card shows a bit less than 48
    (24, 23.6, "24gb"),   # 3090 / 4090
    (16, 15.6, "16gb"),   # 4060 Ti 16 GB / 4080
    (12, 11.7, "12gb"),   # 3060 12 GB / 4070
    (8, 7.6, "12gb"),     # too small for any: the smallest, and check_fits refuses it (below)
])
def test_preset_is_picked_from_the_gpu_size(nominal, reported, expected):
    assert pick_preset(reported).name == expected
    assert pick_preset(nominal).name == expected
    assert resolve_preset("", "cuda", gpu(reported)).name == expected
    assert resolve_preset("auto", "cuda:0", gpu(reported)).name == expected


def test_a_preset_can_be_named_instead():
    assert resolve_preset("16gb", "cuda", gpu(79.1)).name == "16gb"  # an 80 GB card told to save memory
    assert resolve_preset(" 12GB ", "cuda", gpu(79.1)).name == "12gb"
    assert resolve_preset("bf16", "cuda", gpu(23.6)).name == "bf16"  # check_fits is what refuses it
    with pytest.raises(InputError, match="no memory preset called 'tiny'") as err:
        resolve_preset("tiny", "cuda", gpu(23.6))
    assert "bf16, 24gb, 16gb, 12gb" in err.value.hint


def test_no_preset_on_the_cpu_nor_for_the_tiny_model():
    assert resolve_preset("", "cpu") is None  # the tiny test model trains as it always did
    assert resolve_preset("none", "cuda", gpu(11.7)) is None  # the tiny model on a small GPU: no bitsandbytes
    assert resolve_preset("none", "cpu") is None
    with pytest.raises(InputError, match="for CUDA GPUs"):
        resolve_preset("16gb", "cpu")
    assert memory.detect_gpu() is None  # this machine has no CUDA (torch's CPU build)
    plan = plan_memory("flux1", FLUX1_DEV, 1024, 16, device="cpu")
    assert plan.preset is None and "No CUDA GPU" in plan.summary()
    plan.check()  # nothing to refuse


def test_the_small_presets_cap_the_resolution_and_force_checkpointing():
    assert memory.training_resolution(PRESETS["12gb"], 1024) == 512
    assert memory.training_resolution(PRESETS["12gb"], 384) == 384
    assert memory.training_resolution(PRESETS["24gb"], 1024) == 1024
    assert memory.training_resolution(None, 1024) == 1024
    assert memory.checkpointing_for(PRESETS["16gb"], False) is True
    assert memory.checkpointing_for(PRESETS["bf16"], False) is False  # bf16 leaves it to the job
    assert memory.checkpointing_for(None, False) is False


# --------------------------------------------------------------------------- the estimate


# (weights, resolution, rank, published GB, source)
ANCHORS = [
    ("nf4", 512, 4, 9, "HF flux-qlora: NF4 QLoRA"),
    ("bf16", 512, 4, 26, "HF flux-qlora: bf16 LoRA"),
    ("bf16", 1024, 16, 30, "SimpleTuner: unquantised"),
    ("int8", 1024, 16, 18, "SimpleTuner: int8"),
    ("nf4", 1024, 16, 13, "SimpleTuner: int4 (same bits per weight as NF4)"),
    ("nf4", 1024, 16, 9, "SimpleTuner: NF4"),
]


@pytest.mark.parametrize(("weights", "resolution", "rank", "published", "source"), ANCHORS)
def test_estimate_is_within_20_percent_of_the_published_figures(weights, resolution, rank, published, source):
    preset = PRESETS["bf16"] if weights == "bf16" else replace(PRESETS["24gb"], weights=weights)
    est = estimate_training_memory("flux1", FLUX1_DEV, preset, resolution, rank, 1, gradient_checkpointing=True)
    # The anchors measured training with embeddings cached beforehand: the training phase.
    assert abs(est.training_gb - published) / published <= 0.20, f"{source}: {est.training_gb:.1f} GB"


def test_estimate_grows_with_what_costs_memory():
    def peak(preset="bf16", resolution=512, rank=16, batch=1, ckpt=True, family="flux1", params=FLUX1_DEV):
        return estimate_training_memory(family, params, preset, resolution, rank, batch,
                                        gradient_checkpointing=ckpt).peak_gb

    assert peak(resolution=1024) > peak(resolution=512)
    assert peak(rank=32) > peak(rank=16)
    assert peak(batch=2) > peak(batch=1)
    assert peak("bf16", ckpt=False) > peak("bf16", ckpt=True) + 5  # checkpointing matters at this scale
    assert peak("24gb", ckpt=False) == peak("24gb", ckpt=True)  # the preset forces it on
    assert peak("16gb") < peak("24gb") < peak("bf16")  # text encoders off the GPU; NF4 vs bf16
    assert peak(params=4e9, family="flux2") < peak(params=FLUX1_DEV)
    small = estimate_training_memory("flux1", FLUX1_DEV, "12gb", 1024, 16)
    assert small.resolution == 512 and small.peak_gb == pytest.approx(peak("12gb", resolution=512))
    with pytest.raises(InputError, match="Unknown model family"):
        estimate_training_memory("sd3", FLUX1_DEV, "bf16", 512, 16)


def test_each_preset_fits_the_card_it_is_for_at_the_train_tabs_resolutions():
    for preset in PRESETS.values():
        usable = preset.nominal_gb * memory.NOMINAL_TO_USABLE
        for resolution in (512, 1024):
            est = estimate_training_memory("flux1", FLUX1_DEV, preset, resolution, 32)
            assert est.peak_gb <= usable, (preset.name, resolution, est.peak_gb)


# --------------------------------------------------------------------------- refusing before launch


def refusal(preset: str, resolution: int, gpu_gb: float, rank: int = 16) -> InputError:
    est = estimate_training_memory("flux1", FLUX1_DEV, preset, resolution, rank)
    with pytest.raises(InputError) as err:
        check_fits(preset, est, gpu_gb)
    assert f"needs about {est.peak_gb:.1f} GB" in err.value.message
    assert f"your GPU has {gpu_gb:.1f} GB" in err.value.message
    return err.value


def test_check_fits_names_a_smaller_preset_that_fits():
    err = refusal("bf16", 512, 23.6)
    assert err.message.startswith("The bf16 (48 GB) memory preset needs about")
    assert err.hint == "Pick the 24 GB preset."
    assert refusal("24gb", 1024, 15.6).hint == "Pick the 16 GB preset."


def test_check_fits_offers_a_lower_resolution_too():
    err = refusal("bf16", 1024, 26.5)
    assert err.hint == "Pick the 24 GB preset or lower the resolution to 768 px."
    assert str(err) == f"{err.message} {err.hint}"  # what the Train tab shows


def test_check_fits_says_when_no_preset_fits():
    err = refusal(pick_preset(7.6).name, 512, 7.6)  # an 8 GB card
    assert "Even the 12 GB preset at 384 px needs about" in err.hint and "more memory" in err.hint


def test_check_fits_lets_a_fitting_training_through():
    est = estimate_training_memory("flux1", FLUX1_DEV, "16gb", 1024, 16)
    check_fits("16gb", est, 15.6)
    check_fits("16gb", est, None)  # no GPU known: nothing to check
    plan = plan_memory("flux1", FLUX1_DEV, 1024, 16, gpu=gpu(15.6))
    assert plan.preset.name == "16gb" and "16 GB" in plan.summary() and "(fits)" in plan.summary()
    plan.check()
    with pytest.raises(InputError, match="Pick the 16 GB preset"):
        plan_memory("flux1", FLUX1_DEV, 1024, 16, preset_name="24gb", gpu=gpu(15.6)).check()


# --------------------------------------------------------------------------- quantisation and the optimizer


@pytest.fixture
def no_bitsandbytes(monkeypatch):
    """bitsandbytes looks uninstalled (requirements-dev.txt installs it for the CPU tests of NF4)."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **kw: None if name == "bitsandbytes" else real(name, *a, **kw))


def test_quantising_presets_refuse_clearly_without_bitsandbytes(no_bitsandbytes):
    assert importlib.util.find_spec("bitsandbytes") is None
    assert quantization_config(None) is None and quantization_config(PRESETS["bf16"]) is None
    assert pipeline_quantization_config(PRESETS["bf16"]) is None
    for name in ("24gb", "16gb", "12gb"):
        with pytest.raises(InputError, match="bitsandbytes, which is not installed") as err:
            quantization_config(PRESETS[name])
        assert "pip install bitsandbytes" in err.value.hint
        with pytest.raises(InputError, match="NF4"):
            pipeline_quantization_config(PRESETS[name])


def test_make_optimizer_falls_back_to_torch_adamw(caplog, no_bitsandbytes):
    torch = pytest.importorskip("torch")
    params = [torch.nn.Parameter(torch.zeros(4))]
    assert type(make_optimizer(params, None, 1e-4)) is torch.optim.AdamW
    assert type(make_optimizer(params, PRESETS["bf16"], 1e-4)) is torch.optim.AdamW
    with caplog.at_level(logging.WARNING, logger="flux_studio.local_engine"):
        opt = make_optimizer(params, PRESETS["16gb"], 3e-4)
    assert type(opt) is torch.optim.AdamW and opt.defaults["lr"] == 3e-4
    assert "instead of 8-bit AdamW" in caplog.text


@pytest.fixture
def fake_bitsandbytes(monkeypatch):
    """A stand-in bitsandbytes whose AdamW8bit records that it was chosen."""
    torch = pytest.importorskip("torch")

    class AdamW8bit(torch.optim.AdamW):
        pass

    module = types.ModuleType("bitsandbytes")
    module.__spec__ = importlib.machinery.ModuleSpec("bitsandbytes", None)
    module.optim = types.SimpleNamespace(AdamW8bit=AdamW8bit)
    monkeypatch.setitem(sys.modules, "bitsandbytes", module)
    return AdamW8bit


def test_make_optimizer_uses_8bit_adamw_when_the_preset_asks(fake_bitsandbytes):
    torch = pytest.importorskip("torch")
    params = [torch.nn.Parameter(torch.zeros(4))]
    assert type(make_optimizer(params, PRESETS["24gb"], 1e-4)) is fake_bitsandbytes
    assert type(make_optimizer(params, PRESETS["bf16"], 1e-4)) is torch.optim.AdamW


# --------------------------------------------------------------------------- the trainer's hooks


def tiny_zip(path: Path) -> Path:
    from tests.imagefactory import jpeg_bytes, photo

    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("a.jpg", jpeg_bytes(photo(96, 64, seed=1)))
        zf.writestr("a.txt", "a red ball")
    return path


def test_trainer_applies_the_preset_it_is_given(tmp_path, no_bitsandbytes):
    pytest.importorskip("torch")
    from services.engine.train import Trainer, TrainConfig

    cfg = TrainConfig(model_path="unused", family="flux1", steps=1, resolution=1024, memory_preset="12gb")
    trainer = Trainer(cfg, tmp_path / "ds.zip", tmp_path / "job")
    trainer.device = "cuda"  # as load() would on a GPU; nothing here touches CUDA
    trainer.apply_memory_preset()
    assert trainer.preset.name == "12gb"
    assert cfg.resolution == 512 and cfg.gradient_checkpointing is True
    assert trainer.encode_device == "cpu"  # text encoders stay off the GPU the NF4 transformer is on
    with pytest.raises(InputError, match="pip install bitsandbytes"):
        # What load() asks before it calls the pipeline factory: refused before anything loads.
        memory.pipeline_quantization_config(trainer.preset)

    cpu = Trainer(TrainConfig(model_path="unused", family="flux1", steps=1, memory_preset="16gb", device="cpu"),
                  tmp_path / "ds.zip", tmp_path / "job2")
    cpu.device = "cpu"
    with pytest.raises(InputError, match="for CUDA GPUs"):
        cpu.apply_memory_preset()


def test_trainer_takes_its_optimizer_from_the_preset(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from services.engine import tiny
    from services.engine.train import Trainer, TrainConfig

    model = tiny.ensure_tiny_model(tmp_path / "tiny-flux")

    def loaded(name: str) -> Trainer:
        cfg = TrainConfig(model_path=str(model), steps=1, resolution=64, bucket_step=16,
                          max_sequence_length=tiny.MAX_SEQUENCE_LENGTH, device="cpu")
        trainer = Trainer(cfg, tiny_zip(tmp_path / f"{name}.zip"), tmp_path / name)
        trainer.load()
        return trainer

    cpu = loaded("cpu")
    assert cpu.preset is None and memory.pipeline_quantization_config(cpu.preset) is None  # the CPU: nothing changes
    cpu.add_lora()
    assert type(cpu.optimizer) is torch.optim.AdamW
    gpu_like = loaded("gpu")
    gpu_like.preset = PRESETS["24gb"]  # what a 24 GB GPU picks
    asked = []

    def spy(params, preset, lr):
        asked.append((preset, lr))
        return make_optimizer(params, preset, lr)

    monkeypatch.setattr(memory, "make_optimizer", spy)
    gpu_like.add_lora()
    assert asked == [(PRESETS["24gb"], gpu_like.cfg.learning_rate)]
    assert gpu_like.optimizer.param_groups[0]["params"] == gpu_like.params
