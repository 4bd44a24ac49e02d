"""Every public SD v1.x checkpoint format, written with seeded random weights in its exact layout, loaded by
`load_models` and compared with diffusers/transformers loading the same weights; and every refusal."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from make_tokenizer_golden import derive_hf_files
from reference import (
    SCHEDULE_KEYS,
    assert_close,
    ldm_key_shapes,
    original_config,
    random_checkpoint,
    random_diffusers_models,
    reference_clip,
    reference_unet,
    reference_vae,
)
from safetensors import safe_open
from safetensors.torch import save_file

from sd.autoencoder import VAEConfig
from sd.clip import CLIPConfig
from sd.diffusion import UNetConfig
from sd.files import new_file_mode
from sd.model_loader import load_models
from sd.models import CheckpointError

CLIP_CFG, VAE_CFG, UNET_CFG = CLIPConfig.tiny(), VAEConfig.tiny(), UNetConfig.tiny()
ROOT = Path(__file__).parents[1]


def inputs():
    gen = torch.Generator().manual_seed(9)
    tokens = torch.randint(0, 49408, (1, 77), generator=gen)
    return tokens, torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 3, 64, 64, generator=gen).clamp(-1, 1)


@torch.no_grad()
def our_outputs(clip, encoder, decoder, diffusion) -> dict[str, torch.Tensor]:
    tokens, latents, images = inputs()
    context = clip(tokens)
    return {
        "clip": context,
        "encoder": encoder(images)[0],
        "decoder": decoder(latents),
        "diffusion": diffusion(latents, torch.tensor([321]), context),
    }


@torch.no_grad()
def reference_outputs(unet, vae, text_encoder) -> dict[str, torch.Tensor]:
    tokens, latents, images = inputs()
    context = text_encoder(tokens).last_hidden_state
    return {
        "clip": context,
        "encoder": vae.encode(images).latent_dist.mean,
        "decoder": vae.decode(latents).sample,
        "diffusion": unet(latents, torch.tensor([321]), context).sample,
    }


def assert_same_outputs(models, expected: dict[str, torch.Tensor], what: str):
    for name, out in our_outputs(models.clip, models.encoder, models.decoder, models.diffusion).items():
        assert_close(out, expected[name], f"{what}: {name}")


def single_file_reference(checkpoint, tmp_path, unet_cfg=UNET_CFG, **kwargs):
    """diffusers' networks from a single-file state dict (kwargs: extract_ema)."""
    unet = reference_unet(checkpoint, VAE_CFG, unet_cfg) if not kwargs else None
    if kwargs:
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_single_file(
            checkpoint, original_config=original_config(VAE_CFG, unet_cfg), **kwargs
        )
    return reference_outputs(
        unet, reference_vae(checkpoint, VAE_CFG, unet_cfg), reference_clip(checkpoint, CLIP_CFG, tmp_path)
    )


@pytest.fixture(scope="module")
def checkpoint():
    return random_checkpoint(ldm_key_shapes(CLIP_CFG, VAE_CFG, UNET_CFG), seed=21)


@pytest.fixture(scope="module")
def expected(checkpoint, tmp_path_factory):
    return single_file_reference(checkpoint, tmp_path_factory.mktemp("ref"))


# -- single files -----------------------------------------------------------------------------------------------------


def test_emaonly_safetensors_loads_as_diffusers_loads_it(checkpoint, tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    path = tmp_path / "model.safetensors"
    save_file(checkpoint, path)
    yaml = original_config(VAE_CFG, UNET_CFG)
    unet = UNet2DConditionModel.from_single_file(str(path), original_config=yaml, local_files_only=True)
    vae = AutoencoderKL.from_single_file(str(path), original_config=yaml, local_files_only=True)
    models = load_models(path)
    assert models.format == "single-file" and (models.clip.cfg, models.encoder.cfg, models.diffusion.cfg) == (
        CLIP_CFG,
        VAE_CFG,
        UNET_CFG,
    )
    expected = reference_outputs(unet, vae, reference_clip(checkpoint, CLIP_CFG, tmp_path))
    assert_same_outputs(models, expected, "safetensors")
    assert set(models.ignored) == set(SCHEDULE_KEYS) | {
        "model_ema.decay",
        "model_ema.num_updates",
        "cond_stage_model.transformer.text_model.embeddings.position_ids",
    }


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_files_load_in_the_dtype_asked_for(checkpoint, tmp_path, dtype):
    halved = {k: v.to(dtype) if v.is_floating_point() else v for k, v in checkpoint.items()}
    save_file(halved, tmp_path / "half.safetensors")
    models = load_models(tmp_path / "half.safetensors", dtype=torch.float32)
    upcast = {k: v.float() if v.is_floating_point() else v for k, v in halved.items()}
    assert_same_outputs(models, single_file_reference(upcast, tmp_path), f"{dtype} file")
    in_dtype = load_models(tmp_path / "half.safetensors", dtype=dtype)
    assert {p.dtype for net in in_dtype.named().values() for p in net.parameters()} == {dtype}


@pytest.mark.parametrize(
    "wrap, legacy",
    [
        (lambda s: {"state_dict": s, "global_step": 470000}, False),
        (lambda s: s, False),
        (lambda s: {"state_dict": {"state_dict": s}}, False),
        (lambda s: {"state_dict": s}, True),
    ],
    ids=["state_dict-wrapper", "bare", "nested-wrappers", "legacy-pickle"],
)
def test_ckpt_pickles_load_with_or_without_wrappers(checkpoint, expected, tmp_path, wrap, legacy):
    torch.save(wrap(checkpoint), tmp_path / "model.ckpt", _use_new_zipfile_serialization=not legacy)
    assert_same_outputs(load_models(tmp_path / "model.ckpt"), expected, "ckpt")


def test_lightning_training_metadata_in_a_ckpt_is_read_without_running_anything(checkpoint, expected, tmp_path):
    """sd-v1-1..4.ckpt hold PyTorch Lightning's checkpoint callback (keyed by its class) and numpy scalars."""
    script = f"""
import sys, types, torch, numpy as np
sys.path.insert(0, {str(ROOT / "tests")!r})
from reference import *
module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")
class ModelCheckpoint: pass
ModelCheckpoint.__module__ = module.__name__
module.ModelCheckpoint = ModelCheckpoint
for name in ("pytorch_lightning", "pytorch_lightning.callbacks", module.__name__):
    sys.modules[name] = module
state = random_checkpoint(ldm_key_shapes(CLIPConfig.tiny(), VAEConfig.tiny(), UNetConfig.tiny()), seed=21)
torch.save({{"epoch": 6, "global_step": 470000, "pytorch-lightning_version": "1.4.2", "state_dict": state,
            "callbacks": {{ModelCheckpoint: {{"best_model_score": np.float64(0.5), "dirpath": "logs"}}}}}},
           {str(tmp_path / "lightning.ckpt")!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT)
    assert "pytorch_lightning" not in sys.modules
    assert_same_outputs(load_models(tmp_path / "lightning.ckpt"), expected, "Lightning ckpt")


def test_full_training_file_loads_the_raw_unet_by_default_and_the_ema_copy_on_request(checkpoint, expected, tmp_path):
    ema_copy = random_checkpoint(
        {
            k: v
            for k, v in ldm_key_shapes(CLIP_CFG, VAE_CFG, UNET_CFG).items()
            if k.startswith("model.diffusion_model.")
        },
        seed=5,
    )
    full = checkpoint | {"model_ema." + "".join(k.split(".")[1:]): v for k, v in ema_copy.items()}
    save_file(full, tmp_path / "full.safetensors")
    default = load_models(tmp_path / "full.safetensors")
    assert_same_outputs(default, single_file_reference(full, tmp_path), "full file, default")
    assert sum(reason.startswith("the UNet's EMA copy") for reason in default.ignored.values()) == len(ema_copy)
    ema = load_models(tmp_path / "full.safetensors", ema=True)
    assert_same_outputs(ema, single_file_reference(full, tmp_path, extract_ema=True), "full file, --ema")
    assert not torch.equal(ema.diffusion.out[2].weight, default.diffusion.out[2].weight)


def test_asking_for_ema_weights_a_file_lacks_is_an_error(checkpoint, tmp_path):
    save_file(checkpoint, tmp_path / "emaonly.safetensors")
    with pytest.raises(CheckpointError, match="no EMA copy of the UNet"):
        load_models(tmp_path / "emaonly.safetensors", ema=True)


def test_inpainting_checkpoint_is_detected_from_its_shapes(tmp_path):
    unet_cfg = UNetConfig(**{**UNET_CFG.__dict__, "in_channels": 9})
    state = random_checkpoint(ldm_key_shapes(CLIP_CFG, VAE_CFG, unet_cfg), seed=8)
    save_file(state, tmp_path / "inpainting.safetensors")
    models = load_models(tmp_path / "inpainting.safetensors")
    assert models.diffusion.cfg.in_channels == 9
    latents, context = torch.randn(1, 9, 8, 8), torch.randn(1, 77, CLIP_CFG.width)
    with torch.no_grad():
        expected = reference_unet(state, VAE_CFG, unet_cfg)(latents, 10, context).sample
        assert_close(models.diffusion(latents, 10, context), expected, "inpainting UNet")


# -- diffusers folders -----------------------------------------------------------------------------------------------


def save_diffusers_folder(folder: Path, unet, vae, text_encoder, safe: bool = True) -> Path:
    unet.save_pretrained(folder / "unet", safe_serialization=safe)
    vae.save_pretrained(folder / "vae", safe_serialization=safe)
    text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=safe)
    (folder / "tokenizer").mkdir()
    derive_hf_files(folder / "tokenizer")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


@pytest.fixture(scope="module")
def diffusers_models():
    return random_diffusers_models(CLIP_CFG, VAE_CFG, UNET_CFG, seed=31)


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_diffusers_folder_loads_as_diffusers_has_it(diffusers_models, tmp_path, safe):
    folder = save_diffusers_folder(tmp_path / "sd", *diffusers_models, safe=safe)
    models = load_models(folder)
    assert models.format == "diffusers" and models.diffusion.cfg == UNET_CFG and models.encoder.cfg == VAE_CFG
    assert models.clip.cfg == CLIP_CFG and models.tokenizer.vocab["cat</w>"] == 2368
    assert_same_outputs(models, reference_outputs(*diffusers_models), "diffusers folder")


def test_diffusers_folders_from_older_libraries_load_too(diffusers_models, tmp_path):
    """Before diffusers 0.14 the VAE's attention was query/key/value/proj_attn; before transformers 5.6 the text
    encoder's keys began with `text_model.`."""
    folder = save_diffusers_folder(tmp_path / "old", *diffusers_models)
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    for sub, rename in [("vae/diffusion_pytorch_model.safetensors", renames), ("text_encoder/model.safetensors", None)]:
        path = folder / sub
        with safe_open(path, framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
        if rename:
            state = {next((k.replace(a, b) for a, b in rename.items() if a in k), k): v for k, v in state.items()}
        else:
            state = {"text_model." + k: v for k, v in state.items()}
        save_file(state, path)
    assert_same_outputs(load_models(folder), reference_outputs(*diffusers_models), "older diffusers folder")


# -- our native file, and convert_weights.py -------------------------------------------------------------------------


def convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "convert_weights.py"), *args], capture_output=True, text=True, cwd=ROOT, timeout=300
    )


@pytest.mark.parametrize("source_format", ["single-file", "diffusers"])
def test_round_trip_through_convert_weights_gives_identical_outputs(
    checkpoint, diffusers_models, tmp_path, source_format
):
    if source_format == "single-file":
        source = tmp_path / "model.safetensors"
        save_file(checkpoint, source)
    else:
        source = save_diffusers_folder(tmp_path / "folder", *diffusers_models)
    before = load_models(source)
    result = convert(str(source), str(tmp_path / "native.safetensors"), "--dtype", "fp32")
    assert result.returncode == 0, result.stderr
    assert "diffusion  UNet" in result.stdout and "parameters" in result.stdout
    after = load_models(tmp_path / "native.safetensors")
    assert after.format == "native" and after.configs == before.configs
    for name, net in before.named().items():
        converted = after.named()[name].state_dict()
        for key, tensor in net.state_dict().items():
            assert torch.equal(converted[key], tensor), f"{name} {key} changed on the way"
    # the same weights at other memory alignments may take other vectorised kernels: equal up to float32 rounding
    reference = our_outputs(before.clip, before.encoder, before.decoder, before.diffusion)
    for name, out in our_outputs(after.clip, after.encoder, after.decoder, after.diffusion).items():
        assert_close(out, reference[name], f"{name} through the native file", rtol=1e-5)


def test_native_file_records_configs_dtype_and_the_sources_sha256(checkpoint, tmp_path):
    import hashlib

    save_file(checkpoint, tmp_path / "model.safetensors")
    result = convert(str(tmp_path / "model.safetensors"), str(tmp_path / "native.safetensors"))
    assert result.returncode == 0, result.stderr
    assert "training noise-schedule buffers" in result.stdout, "the report lists what was ignored"
    with safe_open(tmp_path / "native.safetensors", framework="pt") as f:
        meta = f.metadata()
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert meta["source_sha256"] == hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()
    assert meta["dtype"] == "fp16" and dtypes == {torch.float16}
    assert json.loads(meta["configs"])["diffusion"]["channel_mult"] == list(UNET_CFG.channel_mult)


def test_native_files_that_name_the_unets_config_unet_still_load(checkpoint, tmp_path):
    """Native files written before the UNet's config was named after its component, "diffusion"."""
    save_file(checkpoint, tmp_path / "model.safetensors")
    assert convert(str(tmp_path / "model.safetensors"), str(tmp_path / "new.safetensors")).returncode == 0
    with safe_open(tmp_path / "new.safetensors", framework="pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    configs = json.loads(meta["configs"])
    configs["unet"] = configs.pop("diffusion")
    save_file(state, tmp_path / "old.safetensors", metadata=meta | {"configs": json.dumps(configs)})
    old, new = load_models(tmp_path / "old.safetensors"), load_models(tmp_path / "new.safetensors")
    assert old.configs == new.configs and old.configs["diffusion"] == UNET_CFG


def test_convert_weights_never_overwrites_without_force_and_leaves_nothing_on_failure(checkpoint, tmp_path):
    save_file(checkpoint, tmp_path / "model.safetensors")
    out = tmp_path / "native.safetensors"
    out.write_bytes(b"precious")
    refused = convert(str(tmp_path / "model.safetensors"), str(out))
    assert refused.returncode == 2 and "exists; pass --force" in refused.stderr and out.read_bytes() == b"precious"
    assert convert(str(tmp_path / "model.safetensors"), str(out), "--force").returncode == 0
    assert load_models(out).format == "native"
    failed = convert(str(tmp_path / "missing.ckpt"), str(tmp_path / "other.safetensors"))
    assert failed.returncode == 2 and failed.stderr.count("\n") == 1, failed.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "native.safetensors"]


def test_converted_files_get_the_mode_of_any_new_file(checkpoint, tmp_path):
    """safetensors alone writes files that only their owner can read."""
    save_file(checkpoint, tmp_path / "model.safetensors")
    assert convert(str(tmp_path / "model.safetensors"), str(tmp_path / "native.safetensors")).returncode == 0
    mode = (tmp_path / "native.safetensors").stat().st_mode & 0o777
    assert mode == new_file_mode(), f"converted file has mode {mode:o}, new files get {new_file_mode():o}"


def test_a_native_file_exports_to_the_public_single_file_layout(checkpoint, expected, tmp_path):
    save_file(checkpoint, tmp_path / "model.safetensors")
    assert (
        convert(str(tmp_path / "model.safetensors"), str(tmp_path / "native.safetensors"), "--dtype", "fp32").returncode
        == 0
    )
    result = convert(
        str(tmp_path / "native.safetensors"),
        str(tmp_path / "public.safetensors"),
        "--dtype",
        "fp32",
        "--layout",
        "single-file",
    )
    assert result.returncode == 0, result.stderr
    with safe_open(tmp_path / "public.safetensors", framework="pt") as f:
        keys = set(f.keys())
    assert keys == {
        k for k in checkpoint if k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model."))
    } - {"cond_stage_model.transformer.text_model.embeddings.position_ids"}
    exported = load_models(tmp_path / "public.safetensors")
    assert exported.format == "single-file"
    assert_same_outputs(exported, expected, "native exported to the single-file layout")


# -- a replacement VAE ------------------------------------------------------------------------------------------------


def vae_only(seed: int) -> dict[str, torch.Tensor]:
    keys = {k: v for k, v in ldm_key_shapes(CLIP_CFG, VAE_CFG, UNET_CFG).items() if k.startswith("first_stage_model.")}
    return {k.removeprefix("first_stage_model."): v for k, v in random_checkpoint(keys, seed).items()}


def test_a_vae_file_replaces_the_checkpoints_autoencoder(checkpoint, tmp_path):
    from diffusers import AutoencoderKL

    save_file(checkpoint, tmp_path / "model.safetensors")
    torch.save({"state_dict": vae_only(seed=77)}, tmp_path / "vae.ckpt")
    models = load_models(tmp_path / "model.safetensors", vae=tmp_path / "vae.ckpt")
    reference = AutoencoderKL.from_single_file(vae_only(seed=77), original_config=original_config(VAE_CFG, UNET_CFG))
    latents = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert_close(models.decoder(latents), reference.decode(latents).sample, "replacement VAE")


def test_a_diffusers_vae_folder_replaces_the_checkpoints_autoencoder(checkpoint, diffusers_models, tmp_path):
    save_file(checkpoint, tmp_path / "model.safetensors")
    _, vae, _ = diffusers_models
    vae.save_pretrained(tmp_path / "vae")
    models = load_models(tmp_path / "model.safetensors", vae=tmp_path / "vae")
    latents = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert_close(models.decoder(latents), vae.decode(latents).sample, "replacement diffusers VAE")


# -- refusals --------------------------------------------------------------------------------------------------------


def some(shape=(4, 4)):
    return torch.zeros(shape)


REFUSALS = {
    "sd2": (
        {
            "model.diffusion_model.input_blocks.0.0.weight": some(),
            "cond_stage_model.model.token_embedding.weight": some(),
        },
        r"an SD 2\.x checkpoint \(OpenCLIP text encoder, 1024-wide context\); sd runs SD v1\.x only",
    ),
    "sd2-context": (
        {"model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight": some((1280, 1024))},
        r"an SD 2\.x checkpoint",
    ),
    "sdxl": (
        {
            "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": some((768,)),
            "model.diffusion_model.label_emb.0.0.weight": some(),
        },
        r"an SDXL checkpoint; sd runs SD v1\.x only",
    ),
    "lora": (
        {
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": some(),
            "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0),
        },
        r"a LoRA, not a checkpoint",
    ),
    "embedding": ({"emb_params": some((2, 768))}, r"a textual-inversion embedding, not a checkpoint"),
    "vae-only": (None, r"a VAE-only file; load it with vae=.*\(--vae\) next to a full SD v1\.x checkpoint"),
    "unknown": (
        {"fc.weight": some(), "fc.bias": some((4,)), "head.weight": some(), "x.y": some(), "z.w": some()},
        r"no Stable Diffusion weights in this file \(keys such as fc\.bias, fc\.weight, head\.weight and 2 more\)",
    ),
}


@pytest.mark.parametrize("kind", REFUSALS)
def test_what_is_not_sd_v1_is_refused_saying_what_it_is(tmp_path, kind):
    state, message = REFUSALS[kind]
    save_file(vae_only(1) if state is None else state, tmp_path / "file.safetensors")
    with pytest.raises(CheckpointError, match=message):
        load_models(tmp_path / "file.safetensors")


def test_an_a1111_embedding_pickle_is_refused_as_an_embedding(tmp_path):
    torch.save(
        {
            "string_to_token": {"*": torch.tensor(265)},
            "string_to_param": {"*": some((2, 768))},
            "name": "style",
            "step": 3000,
            "sd_checkpoint": "abc",
            "sd_checkpoint_name": "v1-5",
        },
        tmp_path / "style.pt",
    )
    with pytest.raises(CheckpointError, match="a textual-inversion embedding"):
        load_models(tmp_path / "style.pt")


@pytest.mark.parametrize(
    "config, message",
    [
        (
            {"cross_attention_dim": 1024, "use_linear_projection": True},
            r"an SD 2\.x diffusers folder \(1024-wide context\)",
        ),
        ({"cross_attention_dim": 2048, "addition_embed_type": "text_time"}, r"an SDXL diffusers folder"),
    ],
    ids=["sd2", "sdxl"],
)
def test_sd2_and_sdxl_diffusers_folders_are_refused(tmp_path, config, message):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        load_models(tmp_path)


@pytest.mark.parametrize("name", ["model.safetensors", "model.ckpt"])
def test_truncated_files_are_refused_as_truncated(checkpoint, tmp_path, name):
    path = tmp_path / name
    save_file(checkpoint, path) if name.endswith("safetensors") else torch.save(checkpoint, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_models(path)


def test_a_missing_file_is_a_one_line_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such file; pass the path of an SD v1.x checkpoint"):
        load_models(tmp_path / "nothing.safetensors")


@pytest.mark.parametrize(
    "content", [b"\x89PNG\r\n\x1a\n" + bytes(100), b"hello, world\n", b""], ids=["png", "text", "empty"]
)
def test_files_that_are_no_checkpoint_at_all_are_refused(tmp_path, content):
    (tmp_path / "model.ckpt").write_bytes(content)
    with pytest.raises(CheckpointError, match=r"not a checkpoint \(neither a safetensors file nor a PyTorch pickle\)"):
        load_models(tmp_path / "model.ckpt")


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_pickle_that_would_run_code_is_refused_and_never_run(tmp_path, legacy):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "model.ckpt"
    if legacy:
        path.write_bytes(pickle.dumps({"state_dict": {"x": Payload()}}, protocol=2))
    else:
        torch.save({"state_dict": {"x": Payload()}}, path)
    with pytest.raises(CheckpointError, match=r"refused: loading this pickle would call posix\.system"):
        load_models(path)
    assert not marker.exists(), "the payload ran"


def test_unknown_and_missing_keys_are_errors_that_name_them(checkpoint, tmp_path):
    extra = checkpoint | {"model.diffusion_model.extra_block.weight": some()}
    save_file(extra, tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected extra_block\.weight"):
        load_models(tmp_path / "extra.safetensors")
    missing = {k: v for k, v in checkpoint.items() if k != "first_stage_model.decoder.conv_out.bias"}
    save_file(missing, tmp_path / "missing.safetensors")
    with pytest.raises(
        CheckpointError, match=r"the decoder weights do not fit the decoder network: missing conv_out\.bias"
    ):
        load_models(tmp_path / "missing.safetensors")
