"""The first thing a GPU run executes: the trainer's command line on both tiny families with every memory
preset, a few steps each, on CUDA. Each run must give finite losses, a sample image, and a LoRA file that
loads back into the pipeline. Skipped without CUDA (the quantised presets also need bitsandbytes).

Why these, on the tiny models: they are what broke on a real GPU while every CPU test passed (issue 21):
FLUX.1 diverged at step 1 under cuDNN attention, and the quantised presets failed at their first sample.
The helpers run on the CPU too (``test_the_checks_hold_on_the_cpu``), so they are known to work before a
GPU machine is paid for.
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")
torch = pytest.importorskip("torch")

from PIL import Image  # noqa: E402

from services.engine import models, tiny  # noqa: E402
from services.engine.card import LORA_FILE  # noqa: E402
from services.engine.memory import PRESETS  # noqa: E402
from tests.train_cli_run import CliRun, run_cli  # noqa: E402

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA GPU: these runs are for a GPU machine")
FAMILIES = {models.TINY_FLUX1: models.FLUX1, models.TINY_FLUX2: models.FLUX2}
STEPS = 4
SAMPLE_EVERY = 2


def tiny_config(model: str, preset: str, steps: int = STEPS) -> dict:
    """A config.json for a tiny model as a person would write it: ``_model`` names it, no family, no model_path."""
    seq = tiny.MAX_SEQUENCE_LENGTH if FAMILIES[model] == models.FLUX1 else tiny.FLUX2_MAX_SEQUENCE_LENGTH
    return {"_model": model, "steps": steps, "learning_rate": 1e-3, "rank": 4, "resolution": tiny.TRAIN_RESOLUTION,
            "bucket_step": 16, "max_sequence_length": seq, "sample_every": SAMPLE_EVERY, "sample_steps": 2,
            "checkpoint_every": 0, "memory_preset": preset}


def check_run(run: CliRun, steps: int = STEPS) -> Path:
    """Finite losses for every step, a sample image per ``SAMPLE_EVERY`` steps, the LoRA; returns the LoRA file."""
    log = run.log
    assert run.returncode == 0 and log.error == "", (log.error, run.stderr[-3000:])
    assert log.done == "ready" and sorted(log.losses) == list(range(1, steps + 1))
    assert all(math.isfinite(v) for v in log.losses.values()), log.losses
    assert log.samples == [f"samples/step_{s:06d}.png" for s in range(SAMPLE_EVERY, steps + 1, SAMPLE_EVERY)]
    for sample in log.samples:
        with Image.open(run.out_dir / sample) as img:
            assert img.size[0] % 16 == 0 and img.size[1] % 16 == 0 and img.getbbox() is not None  # not blank (NaN)
    lora = run.out_dir / "output" / LORA_FILE
    assert lora.is_file() and lora.stat().st_size > 0
    return lora


def load_back(model: str, lora: Path, data_dir: Path, device: str):
    """The base pipeline with the trained LoRA loaded, and one image from it (as a float array)."""
    import numpy as np

    from services.engine.families import adapter
    from services.engine.train import train_dtype

    folder = models.folder_of(model, data_dir=data_dir)
    pipe = adapter(FAMILIES[model]).pipeline_class().from_pretrained(folder, dtype=train_dtype(device)).to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="trained")
    assert "trained" in pipe.get_list_adapters()["transformer"]
    image = pipe(prompt="TOK, a red ball", width=32, height=32, num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert np.isfinite(image).all()
    return image


def train_tiny(tmp_path: Path, model: str, preset: str) -> tuple[CliRun, Path]:
    data_dir = tmp_path / "data"
    run = run_cli(tmp_path, STEPS, config=tiny_config(model, preset), env={"FLUX_STUDIO_DATA_DIR": str(data_dir)})
    return run, data_dir


@needs_cuda
@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("model", list(FAMILIES))
def test_every_preset_trains_both_tiny_families_on_the_gpu(tmp_path, model, preset):
    if PRESETS[preset].quantized and importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("the quantised presets need bitsandbytes")
    run, data_dir = train_tiny(tmp_path, model, preset)
    lora = check_run(run)
    load_back(model, lora, data_dir, "cuda")


def test_the_checks_hold_on_the_cpu(tmp_path):
    """The same helpers on the CPU (no memory preset there), so the GPU run is known to be set up right."""
    run, data_dir = train_tiny(tmp_path, models.TINY_FLUX2, "")
    lora = check_run(run)
    load_back(models.TINY_FLUX2, lora, data_dir, "cpu")
