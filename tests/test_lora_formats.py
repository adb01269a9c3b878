"""LoRA export formats and foreign LoRA files, proven against diffusers' own readers on the tiny models.

The independent reader is diffusers' ``load_lora_weights``, which converts kohya (``lora_unet_*``) and
BFL (``diffusion_model.*``) FLUX LoRAs to its layout itself. One concession, made visibly: diffusers'
kohya FLUX.1 reader splits a single-stream ``linear1`` at FLUX.1 [dev]'s widths (3072 x 3 + 12288),
written into its code; for the tiny model (width 32) the test runs that very code with the tiny
widths put in (``tiny_kohya_reader``), and checks the real widths with the untouched reader separately.
"""
from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from unittest.mock import create_autospec

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")
torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from services.config import APP_NAME, APP_VERSION, Secret  # noqa: E402
from services.errors import InputError  # noqa: E402
from services.engine import lora_formats as lf  # noqa: E402
from services.engine import tiny  # noqa: E402
from services.engine.card import LORA_FILE, model_card  # noqa: E402
from services.engine.config import TrainConfig  # noqa: E402
from services.engine.families import adapter  # noqa: E402
from services.engine.models import FLUX1, FLUX2  # noqa: E402

FAMILIES = (FLUX1, FLUX2)
BUILD = {FLUX1: tiny.build_tiny_pipeline, FLUX2: tiny.build_tiny_flux2_pipeline}
MAX_SEQ = {FLUX1: tiny.MAX_SEQUENCE_LENGTH, FLUX2: tiny.FLUX2_MAX_SEQUENCE_LENGTH}
RANK = 4
STRENGTHS = (0.7, 1.0)
ATOL = 2e-5  # float32 on the CPU: the fused matrices add the same products in another order
DIFF, KOHYA, BFL = "diffusers", "kohya", "bfl"


# --------------------------------------------------------------------------- helpers


def make_lora(family: str, folder: Path, *, rank: int = RANK, alpha: int | None = None, seed: int = 1) -> Path:
    """A LoRA saved as the trainer saves it (train.py's save_lora), with random non-zero up matrices."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = BUILD[family]()
    tr = pipe.transformer
    torch.manual_seed(seed)
    tr.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                              target_modules=adapter(family).lora_targets(tr)))
    with torch.no_grad():
        for name, p in tr.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    config = json.loads(json.dumps(tr.peft_config["default"].to_dict(),
                                   default=lambda o: sorted(o) if isinstance(o, set) else str(o)))
    adapter(family).pipeline_class().save_lora_weights(
        folder, transformer_lora_layers=get_peft_model_state_dict(tr), transformer_lora_adapter_metadata=config)
    return folder / LORA_FILE


def render(pipe, family: str, seed: int = 3):
    return pipe(prompt="TOK, a red ball", width=32, height=32, num_inference_steps=2,
                max_sequence_length=MAX_SEQ[family], output_type="np",
                generator=torch.Generator().manual_seed(seed)).images[0]


def render_with(pipe, family: str, name: str, strength: float):
    pipe.enable_lora()
    pipe.set_adapters([name], [strength])
    return render(pipe, family)


def deltas(pipe, name: str) -> dict[str, torch.Tensor]:
    """{layer: scaling * B @ A} of adapter ``name`` as loaded into the pipeline's transformer."""
    out = {}
    for layer_name, module in pipe.transformer.named_modules():
        if name in getattr(module, "lora_A", {}):
            a, b = module.lora_A[name].weight, module.lora_B[name].weight
            out["transformer." + layer_name] = (b @ a * module.scaling[name]).detach()
    return out


def file_deltas(path: Path) -> dict[str, torch.Tensor]:
    """{layer: B @ A} of a diffusers file written at scale 1 (lora_alpha == r, as the trainer does)."""
    sd = load_file(str(path))
    return {k[: -len(".lora_A.weight")]: sd[k.replace("lora_A", "lora_B")] @ sd[k]
            for k in sd if k.endswith(".lora_A.weight")}


class WarningLog(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        # FluxPipeline says so for every transformer-only LoRA: a note that the text encoder gets none.
        if not record.getMessage().startswith("No LoRA keys associated to CLIPTextModel"):
            self.records.append(record)


@pytest.fixture
def diffusers_warnings(monkeypatch):
    """Every warning diffusers and peft log while the test runs (an unloaded key is one). The tiny
    builders quiet the libraries down to errors: not while this watches."""
    import diffusers.utils.logging as dlog

    import services.engine

    monkeypatch.setattr(services.engine, "quiet_libraries", lambda: None)
    handler = WarningLog()
    loggers = [logging.getLogger("diffusers"), logging.getLogger("peft")]
    old = dlog.get_verbosity()
    dlog.set_verbosity_warning()
    for lg in loggers:
        lg.addHandler(handler)
    yield handler.records
    for lg in loggers:
        lg.removeHandler(handler)
    dlog.set_verbosity(old)


@pytest.fixture
def tiny_kohya_reader(monkeypatch):
    """diffusers' kohya FLUX.1 reader, its code unchanged but for FLUX.1 [dev]'s linear1 widths, which
    become the tiny model's (32 x 3 + 128)."""
    from diffusers.loaders import lora_conversion_utils as conv
    from diffusers.loaders import lora_pipeline

    source = inspect.getsource(conv._convert_kohya_flux_lora_to_diffusers)
    real = "dims=[3072, 3072, 3072, 12288]"
    assert source.count(real) == 1, "diffusers' kohya reader changed: look again at what this test patches"
    namespace = dict(vars(conv))
    exec(compile(source.replace(real, "dims=[32, 32, 32, 128]"), conv.__file__, "exec"), namespace)
    monkeypatch.setattr(lora_pipeline, "_convert_kohya_flux_lora_to_diffusers",
                        namespace["_convert_kohya_flux_lora_to_diffusers"])


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """One trained-style LoRA per family."""
    root = tmp_path_factory.mktemp("loras")
    return {f: make_lora(f, root / f) for f in FAMILIES}


def info(family: str) -> lf.ExportInfo:
    return lf.ExportInfo(family=family, base_model="black-forest-labs/FLUX.1-dev", trigger_word="TOK",
                         rank=RANK, steps=30)


# --------------------------------------------------------------------------- export round trips


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fmt", lf.EXPORT_FORMATS)
def test_each_export_renders_what_the_diffusers_file_renders_in_diffusers(
        family, fmt, loras, tmp_path, diffusers_warnings, tiny_kohya_reader):
    src = loras[family]
    exported = lf.export_lora(src, tmp_path, fmt, info(family))
    assert exported.name == f"TOK-{'flux1' if family == FLUX1 else 'flux2-klein'}-{fmt}.safetensors"
    keys = list(load_file(str(exported)))
    expected_prefix = {DIFF: "transformer.", KOHYA: "lora_unet_", BFL: "diffusion_model."}[lf.LAYOUTS[fmt][family]]
    assert all(k.startswith(expected_prefix) for k in keys), keys[:3]

    pipe = BUILD[family]()
    base = render(pipe, family)
    pipe.load_lora_weights(str(src.parent), weight_name=src.name, adapter_name="ours")
    pipe.load_lora_weights(str(exported.parent), weight_name=exported.name, adapter_name="exported")
    assert not diffusers_warnings, [r.getMessage()[:200] for r in diffusers_warnings]
    for strength in STRENGTHS:
        want = render_with(pipe, family, "ours", strength)
        got = render_with(pipe, family, "exported", strength)
        assert np.abs(want - base).max() > 1e-2  # the LoRA does change the image
        np.testing.assert_allclose(got, want, atol=ATOL)

    # Every weight accounted for: each layer's delta as diffusers loaded it equals ours; a layer
    # diffusers added for a fused part that had no LoRA (FLUX.1's proj_mlp) carries zero.
    ours, loaded = file_deltas(src), deltas(pipe, "exported")
    assert set(ours) <= set(loaded), set(ours) - set(loaded)
    for name, delta in loaded.items():
        torch.testing.assert_close(delta, ours.get(name, torch.zeros_like(delta)), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_fuses_qkv_exactly_and_writes_scale_one_and_the_metadata(family, loras, tmp_path):
    src = loras[family]
    ours = load_file(str(src))
    exported = lf.export_lora(src, tmp_path, lf.COMFYUI, info(family))
    sd = load_file(str(exported))
    if family == FLUX1:
        down, up = sd["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"], \
            sd["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"]
        assert float(sd["lora_unet_double_blocks_0_img_attn_qkv.alpha"]) == 3 * RANK  # kohya scale alpha/rank = 1
        linear1_up = sd["lora_unet_single_blocks_0_linear1.lora_up.weight"]
        assert linear1_up.shape == (32 * 3 + 128, 3 * RANK)
        assert torch.count_nonzero(linear1_up[96:]) == 0  # the MLP part had no LoRA: zero rows
    else:
        down, up = sd["diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight"], \
            sd["diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight"]
        assert not [k for k in sd if k.endswith(".alpha")]  # BFL: no alpha = scale 1 (diffusers refuses one)
        torch.testing.assert_close(sd["diffusion_model.single_blocks.0.linear1.lora_B.weight"],
                                   ours["transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_B.weight"])
    assert down.shape == (3 * RANK, 32) and up.shape == (96, 3 * RANK)
    parts = [f"transformer.transformer_blocks.0.attn.to_{p}" for p in "qkv"]
    torch.testing.assert_close(down, torch.cat([ours[f"{p}.lora_A.weight"] for p in parts]), atol=0, rtol=0)
    torch.testing.assert_close(up, torch.block_diag(*[ours[f"{p}.lora_B.weight"] for p in parts]), atol=0, rtol=0)
    assert down.dtype == ours[f"{parts[0]}.lora_A.weight"].dtype

    with safe_open(str(exported), "pt") as f:
        meta = f.metadata()
    assert meta["base_model"] == "black-forest-labs/FLUX.1-dev" and meta["trigger_word"] == "TOK"
    assert (meta["rank"], meta["steps"]) == (str(RANK), "30")
    assert meta["app_name"] == APP_NAME and meta["app_version"] == APP_VERSION
    assert meta["key_layout"] == lf.LAYOUTS[lf.COMFYUI][family]
    assert "lora_adapter_metadata" not in meta  # its PEFT ranks would be wrong for the fused layers
    with safe_open(str(lf.export_lora(src, tmp_path, lf.DIFFUSERS, info(family))), "pt") as f:
        diffusers_meta = f.metadata()
    assert "lora_adapter_metadata" in diffusers_meta and diffusers_meta["trigger_word"] == "TOK"


def test_the_warning_watch_sees_a_key_diffusers_leaves_unloaded(diffusers_warnings):
    pipe = BUILD[FLUX2]()
    stem = "lora_unet_double_blocks_0_img_attn_proj"
    pipe.load_lora_weights({f"{stem}.lora_down.weight": torch.ones(2, 32), f"{stem}.lora_up.weight": torch.ones(32, 2),
                            "lora_unet_double_blocks_0_img_attn_norm.lora_up.weight": torch.ones(32, 2)})
    assert any("img_attn_norm" in r.getMessage() for r in diffusers_warnings)


def test_kohya_export_at_flux1_dev_widths_reads_back_exactly_with_diffusers_untouched_reader():
    """The real widths (3072, MLP 12288), through diffusers' kohya reader as it is, on two blocks'
    worth of layers (small rank: a few MB)."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    g = torch.Generator().manual_seed(0)
    h, r = 3072, 2
    ours = {}
    for name in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v",
                 "transformer_blocks.0.attn.add_v_proj", "transformer_blocks.0.attn.to_out.0",
                 "single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_k",
                 "single_transformer_blocks.0.attn.to_v"):
        ours["transformer." + name] = (torch.randn(r, h, generator=g), torch.randn(h, r, generator=g))
    read = _convert_kohya_flux_lora_to_diffusers(lf.to_layout(ours, FLUX1, "kohya"))
    got = {k[: -len(".lora_A.weight")]: read[k.replace("lora_A", "lora_B")] @ read[k]
           for k in read if k.endswith(".lora_A.weight")}
    for name, (down, up) in ours.items():
        torch.testing.assert_close(got.pop(name), up @ down)
    for name, delta in got.items():  # the fused parts that had no LoRA (add_q/add_k, proj_mlp)
        assert torch.count_nonzero(delta) == 0, name
    assert "transformer.single_transformer_blocks.0.proj_mlp" in got


# --------------------------------------------------------------------------- other trainers' files


def kohya_flux1_file(path: Path, *, text_encoder: bool = False) -> dict:
    """A FLUX.1 LoRA in kohya sd-scripts' layout (networks/lora_flux.py): dense fused qkv and linear1,
    alphas that are not the rank; ``text_encoder``: CLIP-L layers too."""
    g = torch.Generator().manual_seed(5)
    shapes = {  # module: (in, out), FLUX.1 at width 32 (MLP 128, modulation 6 x 32)
        "double_blocks_0_img_attn_qkv": (32, 96), "double_blocks_0_txt_attn_qkv": (32, 96),
        "double_blocks_0_img_attn_proj": (32, 32), "double_blocks_0_img_mlp_0": (32, 128),
        "double_blocks_0_txt_mlp_2": (128, 32), "double_blocks_0_img_mod_lin": (32, 192),
        "single_blocks_0_linear1": (32, 224), "single_blocks_0_linear2": (160, 32),
    }
    if text_encoder:  # CLIP-L, FLUX.1's first text encoder (width 32, MLP 37 in the tiny model)
        shapes.update({"te1_text_model_encoder_layers_0_self_attn_q_proj": (32, 32),
                       "te1_text_model_encoder_layers_1_mlp_fc1": (32, 37)})
    sd = {}
    for module, (n_in, n_out) in shapes.items():
        stem = f"lora_{module}" if module.startswith("te1_") else f"lora_unet_{module}"
        sd[f"{stem}.lora_down.weight"] = torch.randn(8, n_in, generator=g) * 0.3
        sd[f"{stem}.lora_up.weight"] = torch.randn(n_out, 8, generator=g) * 0.3
        sd[f"{stem}.alpha"] = torch.tensor(4.0)
    save_file(sd, str(path), metadata={"ss_network_dim": "8", "ss_network_alpha": "4"})
    return sd


def ai_toolkit_flux2_file(path: Path) -> dict:
    """A FLUX.2 LoRA in ai-toolkit's layout: the original BFL names, lora_A/lora_B, no alpha."""
    g = torch.Generator().manual_seed(6)
    shapes = {
        "double_blocks.0.img_attn.qkv": (32, 96), "double_blocks.0.txt_attn.qkv": (32, 96),
        "double_blocks.0.txt_attn.proj": (32, 32), "double_blocks.0.img_mlp.0": (32, 192),
        "double_blocks.0.img_mlp.2": (96, 32), "single_blocks.0.linear1": (32, 288),
        "single_blocks.0.linear2": (128, 32),
    }
    sd = {}
    for module, (n_in, n_out) in shapes.items():
        sd[f"diffusion_model.{module}.lora_A.weight"] = torch.randn(8, n_in, generator=g) * 0.3
        sd[f"diffusion_model.{module}.lora_B.weight"] = torch.randn(n_out, 8, generator=g) * 0.3
    save_file(sd, str(path))
    return sd


FOREIGN = {FLUX1: kohya_flux1_file, FLUX2: ai_toolkit_flux2_file}


@pytest.mark.parametrize("family", FAMILIES)
def test_another_trainers_file_is_recognised_and_renders_as_diffusers_renders_it(
        family, tmp_path, tiny_kohya_reader, diffusers_warnings):
    path = tmp_path / "theirs.safetensors"
    FOREIGN[family](path)
    found = lf.inspect_lora(path)
    assert (found.family, found.layout) == (family, "kohya" if family == FLUX1 else "bfl")
    assert lf.recognise(path) == family and found.rank == 8

    pipe = BUILD[family]()
    base = render(pipe, family)
    pipe.load_lora_weights(str(tmp_path), weight_name=path.name, adapter_name="diffusers_read")
    assert not diffusers_warnings, [r.getMessage()[:200] for r in diffusers_warnings]
    lf.load_into(pipe, path, "studio_read", family=family)
    for strength in STRENGTHS:
        want = render_with(pipe, family, "diffusers_read", strength)
        assert np.abs(want - base).max() > 1e-2
        np.testing.assert_allclose(render_with(pipe, family, "studio_read", strength), want, atol=ATOL)
    theirs, ours = deltas(pipe, "diffusers_read"), deltas(pipe, "studio_read")
    for name in set(theirs) | set(ours):
        zero = torch.zeros_like(theirs.get(name, ours.get(name)))
        torch.testing.assert_close(ours.get(name, zero), theirs.get(name, zero), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fmt", lf.EXPORT_FORMATS)
def test_the_local_engine_reads_every_export_back_to_the_same_layers(family, fmt, loras, tmp_path):
    exported = lf.export_lora(loras[family], tmp_path, fmt, info(family))
    _, modules = lf.read_lora(exported, family=family)
    ours = file_deltas(loras[family])
    assert set(modules) == set(ours)  # the fused parts without a LoRA are not made into layers
    for name, (down, up) in modules.items():
        assert down.shape[0] == RANK  # split back to the parts' own ranks
        torch.testing.assert_close(up @ down, ours[name], atol=1e-6, rtol=1e-5)


def test_alpha_other_than_rank_is_kept_in_the_strength(tmp_path):
    """A diffusers file with lora_alpha = 2r (scale 2): the export bakes the 2 in, so the same strength
    is the same image."""
    src = make_lora(FLUX2, tmp_path / "a", alpha=2 * RANK)
    exported = lf.export_lora(src, tmp_path, lf.COMFYUI, info(FLUX2))
    pipe = BUILD[FLUX2]()
    pipe.load_lora_weights(str(src.parent), weight_name=src.name, adapter_name="ours")
    pipe.load_lora_weights(str(exported.parent), weight_name=exported.name, adapter_name="exported")
    np.testing.assert_allclose(render_with(pipe, FLUX2, "exported", 0.7), render_with(pipe, FLUX2, "ours", 0.7),
                               atol=ATOL)


def test_generate_renders_a_comfyui_file_like_the_diffusers_file(loras, tmp_path):
    """The local engine's generate() takes a LoRA in any layout (infer._activate loads it via load_into)."""
    from services.engine import infer

    model = tiny.ensure_tiny_model(tmp_path / "tiny-flux")
    exported = lf.export_lora(loras[FLUX1], tmp_path / "exp", lf.COMFYUI, info(FLUX1))
    try:
        kw = dict(prompt="TOK, a red ball", seed=4, width=64, height=64, steps=2, device="cpu", strength=0.7)
        a, _ = infer.generate(str(model), tmp_path / "out", lora_path=loras[FLUX1], finetune_id="a", **kw)
        b, _ = infer.generate(str(model), tmp_path / "out", lora_path=exported, finetune_id="b", **kw)
        base, _ = infer.generate(str(model), tmp_path / "out", prompt=kw["prompt"], seed=4, width=64, height=64,
                                 steps=2, device="cpu")
    finally:
        infer.clear_cache()
    from PIL import Image

    def px(p):
        with Image.open(p) as im:
            return np.asarray(im.convert("RGB"), dtype=np.int16)

    assert np.abs(px(a) - px(b)).max() <= 1
    assert np.abs(px(a) - px(base)).mean() > 1.0


# --------------------------------------------------------------------------- bad input


def no_lora_left(pipe) -> bool:
    return not lf.adapters_of(pipe) and not any(hasattr(m, "lora_A") and len(m.lora_A)
                                                for m in pipe.transformer.modules())


@pytest.fixture(scope="module")
def flux1_pipe():
    return BUILD[FLUX1]()


def refused(pipe, path: Path, *words: str, family: str = FLUX1) -> str:
    with pytest.raises(InputError) as caught:
        lf.load_into(pipe, path, "bad", family=family)
    message = caught.value.user_message()
    for word in words:
        assert word in message, message
    assert no_lora_left(pipe)
    return message


def test_a_file_that_is_not_a_lora_is_refused(tmp_path, flux1_pipe):
    path = tmp_path / "model.safetensors"
    save_file({"transformer_blocks.0.attn.to_q.weight": torch.zeros(32, 32)}, str(path))
    refused(flux1_pipe, path, "is not a LoRA", "transformer_blocks.0.attn.to_q.weight")


def test_an_sdxl_lora_is_refused_as_one(tmp_path, flux1_pipe):
    path = tmp_path / "sdxl.safetensors"
    stem = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{stem}.lora_down.weight": torch.zeros(4, 640), f"{stem}.lora_up.weight": torch.zeros(640, 4),
               f"{stem}.alpha": torch.tensor(4.0)}, str(path))
    refused(flux1_pipe, path, "Stable Diffusion", "not for FLUX")


def test_a_lora_of_another_family_is_refused_before_loading(loras, tmp_path, flux1_pipe):
    exported = lf.export_lora(loras[FLUX2], tmp_path, lf.COMFYUI, info(FLUX2))
    refused(flux1_pipe, exported, "for FLUX.2 [klein]", "is FLUX.1")
    refused(flux1_pipe, loras[FLUX2], "for FLUX.2 [klein]")


def test_shape_and_rank_mismatches_are_refused(tmp_path, flux1_pipe):
    wider = tmp_path / "wider.safetensors"  # a LoRA for a model of width 64 (another size)
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.ones(4, 64),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.ones(64, 4)}, str(wider))
    refused(flux1_pipe, wider, "64 -> 64", "32 -> 32")
    deeper = tmp_path / "deeper.safetensors"  # block 3 of a model with one double-stream block
    save_file({"transformer.transformer_blocks.3.attn.to_q.lora_A.weight": torch.ones(4, 32),
               "transformer.transformer_blocks.3.attn.to_q.lora_B.weight": torch.ones(32, 4)}, str(deeper))
    refused(flux1_pipe, deeper, "transformer_blocks.3.attn.to_q", "does not have")
    ranks = tmp_path / "ranks.safetensors"
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.ones(4, 32),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.ones(32, 8)}, str(ranks))
    refused(flux1_pipe, ranks, "share a rank")
    fused = tmp_path / "fused.safetensors"  # a kohya linear1 of FLUX.2's width ratio under FLUX.1's...
    save_file({"lora_unet_single_blocks_0_linear1.lora_down.weight": torch.ones(4, 32),
               "lora_unet_single_blocks_0_linear1.lora_up.weight": torch.ones(200, 4)}, str(fused))
    refused(flux1_pipe, fused, "match neither")  # ... that is neither model's (7 x 32 or 9 x 32 rows)


def test_truncated_and_garbage_bytes_are_refused_before_any_tensor_is_read(loras, tmp_path, flux1_pipe):
    data = loras[FLUX1].read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-100])
    refused(flux1_pipe, cut, "cut short", "fetch it again")
    (tmp_path / "head.safetensors").write_bytes(data[:200])
    refused(flux1_pipe, tmp_path / "head.safetensors", "cut short")
    (tmp_path / "tiny.safetensors").write_bytes(b"\x01\x02")
    refused(flux1_pipe, tmp_path / "tiny.safetensors", "cut short")
    (tmp_path / "text.safetensors").write_bytes(b"hello world, this is no LoRA at all" * 10)
    refused(flux1_pipe, tmp_path / "text.safetensors", "not a safetensors file")


def test_pickles_are_never_loaded(loras, tmp_path, flux1_pipe, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("a pickle was unpickled")

    monkeypatch.setattr(torch, "load", never)
    import pickle

    monkeypatch.setattr(pickle, "load", never)
    monkeypatch.setattr(pickle, "loads", never)
    for name in ("lora.ckpt", "lora.pt", "pytorch_lora_weights.bin", "lora.pth"):
        (tmp_path / name).write_bytes(b"\x80\x04anything")
        refused(flux1_pipe, tmp_path / name, "pickle", "never loaded")
    disguised = tmp_path / "disguised.safetensors"  # a torch.save zip under the safetensors name
    disguised.write_bytes(b"PK\x03\x04" + b"\x00" * 200)
    refused(flux1_pipe, disguised, "pickle", "never loaded")
    (tmp_path / "lora.txt").write_text("x")
    refused(flux1_pipe, tmp_path / "lora.txt", "not a .safetensors file")


def test_the_size_cap_is_checked_before_reading(loras, tmp_path):
    with pytest.raises(InputError, match="accepted up to"):
        lf.inspect_lora(loras[FLUX1], max_bytes=1000)
    assert lf.MAX_LORA_BYTES >= 1024 * 2**20


def test_a_kohya_file_with_clip_layers_puts_them_on_the_text_encoder_exactly(tmp_path):
    """(diffusers' own kohya reader, with transformers 5's CLIPTextModel, loads the MLP layers but
    leaves self_attn out, so this is checked against the file's weights, not against diffusers.)"""
    path = tmp_path / "with_te.safetensors"
    sd = kohya_flux1_file(path, text_encoder=True)
    pipe = BUILD[FLUX1]()
    lf.load_into(pipe, path, "te", family=FLUX1)
    for stem, layer in (("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "encoder.layers.0.self_attn.q_proj"),
                        ("lora_te1_text_model_encoder_layers_1_mlp_fc1", "encoder.layers.1.mlp.fc1")):
        module = pipe.text_encoder.get_submodule(layer)
        got = module.lora_B["te"].weight @ module.lora_A["te"].weight * module.scaling["te"]
        want = sd[f"{stem}.lora_up.weight"] @ sd[f"{stem}.lora_down.weight"] * (4.0 / 8)
        torch.testing.assert_close(got, want)


def test_a_t5_text_encoder_lora_is_refused(tmp_path, flux1_pipe):
    path = tmp_path / "t5.safetensors"
    stem = "lora_te2_encoder_block_0_layer_0_SelfAttention_q"
    save_file({f"{stem}.lora_down.weight": torch.ones(4, 32), f"{stem}.lora_up.weight": torch.ones(32, 4)}, str(path))
    refused(flux1_pipe, path, "text encoder the local engine does not apply LoRAs to", stem)


def test_lycoris_and_half_modules_are_refused(tmp_path, flux1_pipe):
    lokr = tmp_path / "lokr.safetensors"
    save_file({"lycoris_double_blocks_0_img_attn_qkv.lokr_w1": torch.ones(4, 4)}, str(lokr))
    refused(flux1_pipe, lokr, "LoKr")
    half = tmp_path / "half.safetensors"
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.ones(4, 32)}, str(half))
    refused(flux1_pipe, half, "half of its LoRA weights")


def test_ambiguous_keys_are_settled_by_the_model(tmp_path, flux1_pipe):
    """Double-block attention only: both families have it at the same shapes."""
    path = tmp_path / "attn.safetensors"
    save_file({"transformer.transformer_blocks.0.attn.to_k.lora_A.weight": torch.ones(2, 32) * 0.1,
               "transformer.transformer_blocks.0.attn.to_k.lora_B.weight": torch.ones(32, 2) * 0.1}, str(path))
    found = lf.inspect_lora(path)
    assert found.family is None and found.families == (FLUX1, FLUX2)
    with pytest.raises(InputError, match="cannot be told"):
        lf.recognise(path)
    lf.load_into(flux1_pipe, path, "either", family=FLUX1)
    assert "either" in lf.adapters_of(flux1_pipe)
    lf.unload(flux1_pipe, "either")
    assert no_lora_left(flux1_pipe)


def test_a_load_that_fails_half_way_leaves_nothing_loaded(loras, monkeypatch):
    pipe = BUILD[FLUX1]()
    base = render(pipe, FLUX1)
    original = type(pipe.transformer).load_lora_adapter

    def half_then_fail(self, *args, **kwargs):
        original(self, *args, **kwargs)  # the layers are in the model now
        raise RuntimeError("out of memory")

    monkeypatch.setattr(type(pipe.transformer), "load_lora_adapter", half_then_fail)
    with pytest.raises(InputError, match="could not be applied.*out of memory"):
        lf.load_into(pipe, loras[FLUX1], "broken", family=FLUX1)
    assert no_lora_left(pipe)
    monkeypatch.undo()
    np.testing.assert_array_equal(render(pipe, FLUX1), base)
    lf.load_into(pipe, loras[FLUX1], "broken", family=FLUX1)  # the same name loads cleanly afterwards
    assert np.abs(render_with(pipe, FLUX1, "broken", 1.0) - base).max() > 1e-2


# --------------------------------------------------------------------------- folders and Hub repos


def hf_job_repo(folder: Path, lora: Path) -> Path:
    """What a Hugging Face job leaves in its repo (services/engine/push.py)."""
    (folder / "checkpoints" / "step_000010").mkdir(parents=True)
    (folder / "samples").mkdir()
    (folder / LORA_FILE).write_bytes(lora.read_bytes())
    (folder / "checkpoints" / "step_000010" / "lora.safetensors").write_bytes(lora.read_bytes())
    (folder / "README.md").write_text("card")
    (folder / "samples" / "step_000010.png").write_bytes(b"png")
    return folder


def test_the_lora_file_of_a_folder_is_found(loras, tmp_path):
    repo = hf_job_repo(tmp_path / "job", loras[FLUX1])
    assert lf.find_lora_file(repo) == repo / LORA_FILE
    other = tmp_path / "civitai"
    other.mkdir()
    (other / "my_style.safetensors").write_bytes(loras[FLUX1].read_bytes())
    (other / "preview.png").write_bytes(b"png")
    assert lf.find_lora_file(other) == other / "my_style.safetensors"
    (other / "my_style_v2.safetensors").write_bytes(b"x")
    with pytest.raises(InputError, match="several .safetensors files: my_style.safetensors, my_style_v2"):
        lf.find_lora_file(other)
    assert lf.find_lora_file(other, "my_style_v2.safetensors").name == "my_style_v2.safetensors"
    pickles = tmp_path / "old"
    pickles.mkdir()
    (pickles / "adapter_model.bin").write_bytes(b"\x80")
    with pytest.raises(InputError, match="pickles, which are never loaded"):
        lf.find_lora_file(pickles)


def fake_hub(lora: Path, cache: Path, files: dict[str, int] | None = None):
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoSibling

    api = create_autospec(HfApi, instance=True)
    size = lora.stat().st_size
    files = files if files is not None else {LORA_FILE: size, "README.md": 10,
                                             "checkpoints/step_000010/lora.safetensors": size}
    api.model_info.return_value.siblings = [RepoSibling(rfilename=n, size=s) for n, s in files.items()]
    api.model_info.return_value.sha = "a" * 40

    def download(repo_id, filename, *, revision=None, cache_dir=None, token=None, tqdm_class=None, **kw):
        bar = tqdm_class(total=size, unit="B", desc=filename) if tqdm_class else None
        data = lora.read_bytes()
        target = cache / repo_id.replace("/", "--") / revision / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        for i in range(0, len(data), 4096):
            with target.open("ab") as f:
                f.write(data[i:i + 4096])
            if bar:
                bar.update(len(data[i:i + 4096]))
        return str(target)

    api.hf_hub_download.side_effect = download
    return api


def test_a_hub_repo_made_by_a_hugging_face_job_is_downloaded_with_progress_and_the_token(loras, tmp_path):
    api = fake_hub(loras[FLUX2], tmp_path / "cache")
    seen: list[tuple[int, int]] = []
    token = Secret("hf_SECRETtoken123")
    path = lf.download_lora("someone/my-lora", token=token, cache_dir=tmp_path / "cache",
                            on_progress=lambda done, total: seen.append((done, total)), api=api)
    assert path.read_bytes() == loras[FLUX2].read_bytes() and lf.recognise(path) == FLUX2
    api.model_info.assert_called_once_with("someone/my-lora", files_metadata=True)
    call = api.hf_hub_download.call_args
    assert call.args == ("someone/my-lora", LORA_FILE)  # the root file, not the checkpoint's
    assert call.kwargs["token"] == "hf_SECRETtoken123" and call.kwargs["revision"] == "a" * 40
    size = loras[FLUX2].stat().st_size
    assert seen[-1] == (size, size) and len(seen) > 2
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_hub_repos_without_one_lora_or_with_too_big_a_file_are_refused(loras, tmp_path):
    api = fake_hub(loras[FLUX1], tmp_path, {"a.safetensors": 10, "b.safetensors": 10})
    with pytest.raises(InputError, match="several"):
        lf.download_lora("someone/two", api=api)
    api = fake_hub(loras[FLUX1], tmp_path, {LORA_FILE: lf.MAX_LORA_BYTES + 1})
    with pytest.raises(InputError, match="accepted up to"):
        lf.download_lora("someone/huge", api=api)
    api.hf_hub_download.assert_not_called()


def test_a_missing_or_private_repo_says_so_without_the_token(tmp_path):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    api = create_autospec(HfApi, instance=True)
    api.model_info.side_effect = RepositoryNotFoundError("404 hf_SECRETtoken123", response=_response(404))
    with pytest.raises(InputError) as caught:
        lf.download_lora("someone/private", token=Secret("hf_SECRETtoken123"), api=api)
    assert "no model someone/private" in str(caught.value) and "SECRET" not in str(caught.value)


def _response(status: int):
    import httpx

    return httpx.Response(status, request=httpx.Request("GET", "https://huggingface.co/api/models/x"))


# --------------------------------------------------------------------------- the model card


@pytest.mark.parametrize("family", FAMILIES)
def test_the_model_card_says_which_file_is_for_which_tool(family):
    cfg = TrainConfig(model_path="/models/x", steps=30, trigger_word="TOK", family=family,
                      base_model_id="black-forest-labs/FLUX.1-dev")
    card = model_card(cfg, 3, [], [0.5])
    comfy = lf.export_filename(lf.COMFYUI, family, "TOK")
    assert "## Files" in card and LORA_FILE in card and comfy in card and "ComfyUI" in card
    assert ("kohya" in card and "Forge" in card) if family == FLUX1 else "diffusion_model." in card
