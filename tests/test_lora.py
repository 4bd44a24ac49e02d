"""LoRA files applied to our networks give diffusers' outputs after its load_lora_weights (and fuse_lora), merged
and at runtime alike, and come off again bit for bit."""

import pytest
import torch
from reference import assert_close, diffusers_pipelines, ldm_key_shapes, our_models, random_checkpoint
from safetensors.torch import save_file
from torch import nn

from sd.autoencoder import VAEConfig
from sd.clip import CLIPConfig
from sd.diffusion import UNetConfig
from sd.lora import diffusers_path, load_lora
from sd.model_converter import unet_prefixes
from sd.models import CheckpointError

CFGS = CLIPConfig.tiny(), VAEConfig.tiny(), UNetConfig.tiny()


@pytest.fixture(scope="module")
def checkpoint():
    return random_checkpoint(ldm_key_shapes(*CFGS), seed=31)


def copied(checkpoint: dict) -> dict:
    """Both sides adopt the checkpoint's tensors; merging a LoRA changes them in place, so each gets its own."""
    return {key: tensor.clone() for key, tensor in checkpoint.items()}


@pytest.fixture
def models(checkpoint):
    return our_models(copied(checkpoint), *CFGS)


def kohya_lora(models, rank: int, with_alpha: bool, seed: int, ldm_names: bool = False) -> dict[str, torch.Tensor]:
    """A random kohya-format LoRA over every attention, feed-forward and projection layer, the ResNet convolutions
    (LoCon: 3x3 down, 1x1 up) and time projections of the UNet, and CLIP's attention and MLP layers."""
    gen = torch.Generator().manual_seed(seed)
    cfg = models.diffusion.cfg
    pairs = unet_prefixes(len(cfg.channel_mult), cfg.num_res_blocks, list(cfg.attention_levels))
    state = {}

    def add(name: str, module: nn.Module) -> None:
        weight = module.weight
        down_shape = (rank, *weight.shape[1:]) if weight.ndim == 4 else (rank, weight.shape[1])
        up_shape = (weight.shape[0], rank, 1, 1) if weight.ndim == 4 else (weight.shape[0], rank)
        state[f"{name}.lora_down.weight"] = torch.randn(down_shape, generator=gen) * 0.1
        state[f"{name}.lora_up.weight"] = torch.randn(up_shape, generator=gen) * 0.1
        if with_alpha:
            state[f"{name}.alpha"] = torch.tensor(rank / 2)

    for path, module in models.diffusion.named_modules():
        wanted = any(
            p in path
            for p in ("attn1.", "attn2.", ".ff.", "proj_in", "proj_out", "in_layers.2", "out_layers.3", "emb_layers.1")
        )
        if wanted and isinstance(module, (nn.Linear, nn.Conv2d)):
            add("lora_unet_" + (path if ldm_names else diffusers_path(path, pairs)).replace(".", "_"), module)
    for path, module in models.clip.named_modules():
        if isinstance(module, nn.Linear) and ("self_attn." in path or ".mlp." in path):
            add("lora_te_text_model_" + path.replace(".", "_"), module)
    return state


def outputs(unet, clip, tokens, x, t, context) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {"unet": unet(x, t, context), "clip": clip(tokens)}


def inputs(models):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    context = torch.randn(2, 77, CFGS[0].width, generator=gen)
    return models.tokenizer(["a red circle", "a blue square"]), x, torch.tensor([500, 20]), context


@pytest.mark.parametrize("rank, with_alpha", [(4, True), (8, False)], ids=["rank4-alpha", "rank8-no-alpha"])
@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_a_kohya_lora_gives_diffusers_outputs(checkpoint, models, tmp_path, rank, with_alpha, strength):
    state = kohya_lora(models, rank, with_alpha, seed=rank)
    save_file(state, tmp_path / "lora.safetensors")
    pipeline, _ = diffusers_pipelines(copied(checkpoint), *CFGS, tmp_path / "diffusers")
    pipeline.load_lora_weights(dict(state))
    pipeline.fuse_lora(lora_scale=strength)
    tokens, x, t, context = inputs(models)
    with torch.no_grad():
        theirs = {
            "unet": pipeline.unet(x, t, encoder_hidden_states=context).sample,
            "clip": pipeline.text_encoder(tokens).last_hidden_state,
        }
    before = {name: tensor.clone() for name, tensor in models.diffusion.state_dict().items()}
    base = outputs(models.diffusion, models.clip, tokens, x, t, context)
    merged = load_lora(models, tmp_path / "lora.safetensors", strength=strength)
    assert not merged.skipped, merged.skipped
    ours = outputs(models.diffusion, models.clip, tokens, x, t, context)
    for name in ours:
        change = (ours[name] - base[name]).abs().max() / base[name].abs().max()
        assert change > 0.05, f"the LoRA moved the {name} output by {change:.1%} only: too weak to test"
        assert_close(ours[name], theirs[name], f"{name} with a rank-{rank} LoRA at strength {strength}")
    merged.remove()
    changed = [k for k, v in models.diffusion.state_dict().items() if not torch.equal(v, before[k])]
    assert not changed, f"weights not restored bit for bit after remove(): {changed[:5]}"

    runtime = load_lora(models, tmp_path / "lora.safetensors", strength=strength, mode="runtime")
    for name, out in outputs(models.diffusion, models.clip, tokens, x, t, context).items():
        assert_close(out, ours[name], f"{name}: runtime against merged", rtol=1e-5)
    runtime.remove()


def test_ldm_style_kohya_names_are_the_same_layers(models, tmp_path):
    tokens, x, t, context = inputs(models)
    results = []
    for ldm in (False, True):
        save_file(kohya_lora(models, 4, True, seed=1, ldm_names=ldm), tmp_path / f"{ldm}.safetensors")
        lora = load_lora(models, tmp_path / f"{ldm}.safetensors")
        results.append(outputs(models.diffusion, models.clip, tokens, x, t, context)["unet"])
        lora.remove()
    assert torch.equal(*results)


def test_runtime_strength_changes_between_calls_and_zero_is_the_base(models, tmp_path):
    save_file(kohya_lora(models, 4, True, seed=2), tmp_path / "lora.safetensors")
    tokens, x, t, context = inputs(models)
    base = outputs(models.diffusion, models.clip, tokens, x, t, context)
    lora = load_lora(models, tmp_path / "lora.safetensors", mode="runtime")
    full = outputs(models.diffusion, models.clip, tokens, x, t, context)
    lora.set_strength(0.0)
    zero = outputs(models.diffusion, models.clip, tokens, x, t, context)
    assert not torch.allclose(full["unet"], base["unet"]) and torch.equal(zero["unet"], base["unet"])
    lora.remove()


def test_unknown_keys_are_reported_and_lycoris_and_sdxl_are_refused(models, tmp_path):
    state = kohya_lora(models, 4, True, seed=3)
    state["lora_unet_no_such_layer.lora_down.weight"] = torch.zeros(4, 8)
    state["lora_unet_no_such_layer.lora_up.weight"] = torch.zeros(8, 4)
    save_file(state, tmp_path / "extra.safetensors")
    lora = load_lora(models, tmp_path / "extra.safetensors")
    assert lora.skipped == dict.fromkeys(
        ["lora_unet_no_such_layer.lora_down.weight", "lora_unet_no_such_layer.lora_up.weight"],
        "no SD v1 layer of that name",
    )
    lora.remove()
    save_file({"lora_unet_a.hada_w1_a": torch.zeros(2, 2)}, tmp_path / "loha.safetensors")
    with pytest.raises(CheckpointError, match="a LyCORIS LoHa file"):
        load_lora(models, tmp_path / "loha.safetensors")
    save_file({"lora_te2_x.lora_down.weight": torch.zeros(2, 2)}, tmp_path / "sdxl.safetensors")
    with pytest.raises(CheckpointError, match="an SDXL LoRA"):
        load_lora(models, tmp_path / "sdxl.safetensors")


def test_the_cli_applies_loras_with_strengths(checkpoint, models, tmp_path, capsys):
    from sd.cli import main

    save_file(copied(checkpoint), tmp_path / "tiny.safetensors")
    save_file(kohya_lora(models, 4, True, seed=5), tmp_path / "style.safetensors")
    argv = ["a cat", "--ckpt", str(tmp_path / "tiny.safetensors"), "-W", "32", "-H", "32", "--steps", "2"]
    argv += ["--lora", f"{tmp_path / 'style.safetensors'}:0.5", "--seed", "7", "--outdir", str(tmp_path / "out")]
    assert main(argv) == 0
    layers = len(kohya_lora(models, 4, True, seed=5)) // 3  # down, up, alpha
    assert f"LoRA style.safetensors at 0.5: {layers} layers\n" in capsys.readouterr().out
    assert main([*argv[:-2], "--lora", str(tmp_path / "missing.safetensors"), "--outdir", str(tmp_path / "o2")]) == 2
    assert "--lora" in capsys.readouterr().err and not (tmp_path / "o2").exists()


def test_inspect_lists_the_layers_a_lora_changes_most_first(checkpoint, models, tmp_path, capsys):
    from sd.inspect import main

    save_file(copied(checkpoint), tmp_path / "tiny.safetensors")
    state = kohya_lora(models, 4, True, seed=6)
    save_file(state, tmp_path / "style.safetensors")
    assert main([str(tmp_path / "tiny.safetensors"), "--lora", str(tmp_path / "style.safetensors")]) == 0
    out = capsys.readouterr().out
    assert f"{len(state) // 3} layers" in out and "diffusion.input_blocks.1.1.transformer_blocks.0.attn1.to_q" in out
    ratios = [float(line.split()[-1].rstrip("%")) for line in out.splitlines() if line.endswith("%")]
    assert len(ratios) == len(state) // 3 and ratios == sorted(ratios, reverse=True), ratios[:5]


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("a cat <lora:style:0.7>", ("a cat ", [("style", 0.7, 0.7)])),
        ("<lora:style> a cat", (" a cat", [("style", 1.0, 1.0)])),
        ("a cat <lora:style:0.5:0.9>", ("a cat ", [("style", 0.5, 0.9)])),  # A1111: te, then unet
        ("a cat <lora:style:unet=0.3>", ("a cat ", [("style", 1.0, 0.3)])),
        ("<lora:a:1><lora:b:0.2> x", (" x", [("a", 1.0, 1.0), ("b", 0.2, 0.2)])),
    ],
)
def test_a1111_lora_tags_are_read_and_taken_out_of_the_prompt(prompt, expected):
    from sd.lora import lora_tags

    assert lora_tags(prompt) == expected


def test_a_tagged_lora_applies_to_its_generation_only(checkpoint, models, tmp_path):
    from sd.pipeline import generate

    save_file(kohya_lora(models, 4, True, seed=8), tmp_path / "style.safetensors")
    weights = {k: v.clone() for k, v in models.diffusion.state_dict().items()}

    def run(prompt: str, **kwargs) -> torch.Tensor:
        out = generate(
            prompt, models, steps=2, seed=1, width=32, height=32, output_type="latent", progress=False, **kwargs
        )
        return out.images

    plain = run("a cat")
    tagged = run("a cat <lora:style:0.8>", lora_dir=tmp_path)
    lora = load_lora(models, tmp_path / "style.safetensors", strength=0.8)
    assert torch.equal(tagged, run("a cat")), "the tag equals the LoRA loaded by hand at 0.8"
    lora.remove()
    assert not torch.equal(tagged, plain) and not models.loras
    assert all(torch.equal(v, weights[k]) for k, v in models.diffusion.state_dict().items())
    with pytest.raises(ValueError, match="<lora:nothing>: no nothing.safetensors"):
        run("a cat <lora:nothing>", lora_dir=tmp_path)


def test_a_lora_diffusers_saved_gives_the_same_outputs(checkpoint, models, tmp_path):
    from peft.utils import get_peft_model_state_dict

    state = kohya_lora(models, 4, False, seed=10)
    pipeline, _ = diffusers_pipelines(copied(checkpoint), *CFGS, tmp_path / "diffusers")
    pipeline.load_lora_weights(dict(state))
    tokens, x, t, context = inputs(models)
    with torch.no_grad():
        theirs = {
            "unet": pipeline.unet(x, t, encoder_hidden_states=context).sample,
            "clip": pipeline.text_encoder(tokens).last_hidden_state,
        }
    type(pipeline).save_lora_weights(
        tmp_path / "saved",
        unet_lora_layers=get_peft_model_state_dict(pipeline.unet, adapter_name="default_0"),
        text_encoder_lora_layers=get_peft_model_state_dict(pipeline.text_encoder, adapter_name="default_0"),
    )
    (saved,) = (tmp_path / "saved").glob("*.safetensors")
    lora = load_lora(models, saved)
    assert not lora.skipped and len(lora.layers) == len(state) // 2, (list(lora.skipped)[:3], len(lora.layers))
    for name, out in outputs(models.diffusion, models.clip, tokens, x, t, context).items():
        assert_close(out, theirs[name], f"{name} with a LoRA in diffusers' own file layout")


def test_several_loras_add_up_and_merged_ones_come_off_in_reverse_order(models, tmp_path):
    tokens, x, t, context = inputs(models)
    base = outputs(models.diffusion, models.clip, tokens, x, t, context)["unet"]
    for seed in (11, 12):
        save_file(kohya_lora(models, 4, True, seed=seed), tmp_path / f"{seed}.safetensors")
    first = load_lora(models, tmp_path / "11.safetensors")
    second = load_lora(models, tmp_path / "12.safetensors", mode="runtime")
    third = load_lora(models, tmp_path / "12.safetensors")
    with pytest.raises(ValueError, match="reverse order"):
        first.remove()
    for lora in (third, second, first):
        lora.remove()
    assert not models.loras and torch.equal(outputs(models.diffusion, models.clip, tokens, x, t, context)["unet"], base)


def test_a_tagged_generation_records_a1111s_lora_hash_in_the_png(checkpoint, models, tmp_path):
    import hashlib

    from PIL import Image

    from sd.cli import main

    save_file(copied(checkpoint), tmp_path / "tiny.safetensors")
    (tmp_path / "loras").mkdir()
    save_file(kohya_lora(models, 4, True, seed=13), tmp_path / "loras" / "style.safetensors")
    data = (tmp_path / "loras" / "style.safetensors").read_bytes()
    expected = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little") :]).hexdigest()[:12]  # the header skipped
    argv = ["a cat <lora:style:0.6>", "--ckpt", str(tmp_path / "tiny.safetensors"), "-W", "32", "-H", "32"]
    argv += ["--steps", "1", "--seed", "3", "--lora-dir", str(tmp_path / "loras"), "--outdir", str(tmp_path / "out")]
    assert main(argv) == 0
    text = Image.open(tmp_path / "out" / "00000-3.png").text["parameters"]
    assert text.startswith("a cat <lora:style:0.6>\n") and f'Lora hashes: "style: {expected}"' in text, text


def test_a_conv_in_lora_fits_the_nine_channel_inpainting_unet_zero_padded(tmp_path):
    unet_cfg = UNetConfig(**{**UNetConfig.tiny().__dict__, "in_channels": 9})
    models = our_models(
        random_checkpoint(ldm_key_shapes(CFGS[0], CFGS[1], unet_cfg), seed=14), CFGS[0], CFGS[1], unet_cfg
    )
    conv_in = models.diffusion.input_blocks[0][0]
    down, up = torch.randn(4, 4, 3, 3) * 0.1, torch.randn(conv_in.out_channels, 4, 1, 1) * 0.1
    save_file(
        {"lora_unet_conv_in.lora_down.weight": down, "lora_unet_conv_in.lora_up.weight": up},
        tmp_path / "conv_in.safetensors",
    )
    before = conv_in.weight.clone()
    lora = load_lora(models, tmp_path / "conv_in.safetensors")
    assert not lora.skipped
    delta = conv_in.weight - before
    assert torch.equal(delta[:, 4:], torch.zeros_like(delta[:, 4:])), "the mask and masked-image channels changed"
    expected = (up.flatten(1) @ down.flatten(1)).reshape(conv_in.out_channels, 4, 3, 3)
    torch.testing.assert_close(delta[:, :4], expected, rtol=1e-5, atol=1e-6)
    lora.remove()
    assert torch.equal(conv_in.weight, before)


# -- training ---------------------------------------------------------------------------------------------------------


def trained_lora(models, path, targets: str) -> None:
    """A few steps of LoRA training on the tiny models, with text-encoder adapters, exported to `path` (fp32)."""
    from sd.train import Settings, ShapesData, Trainer

    settings = Settings(steps=4, batch_size=2, lr=3e-2, lora_rank=4, lora_alpha=2, lora_targets=targets)
    settings.train_text_encoder = True
    trainer = Trainer(models, settings, ShapesData(), path.parent, torch.device("cpu"))
    with open(path.parent / "loss.log", "w") as log:
        trainer.train(log)
    trainer.use_ema()
    trainer.adapters.save(path, "test", dtype=torch.float32)
    trainer.adapters.detach()


@pytest.mark.parametrize("targets", ["attn", "attn+ff", "all"])
def test_a_lora_sd_trains_is_read_by_diffusers_with_the_same_outputs(checkpoint, models, tmp_path, targets):
    before = {name: tensor.clone() for name, tensor in models.diffusion.state_dict().items()}
    trained_lora(models, tmp_path / "trained.safetensors", targets)
    changed = [k for k, v in models.diffusion.state_dict().items() if not torch.equal(v, before[k])]
    assert not changed and not models.loras, f"training a LoRA changed the base weights: {changed[:5]}"

    tokens, x, t, context = inputs(models)
    base = outputs(models.diffusion, models.clip, tokens, x, t, context)
    lora = load_lora(models, tmp_path / "trained.safetensors")
    assert not lora.skipped, lora.skipped
    ours = outputs(models.diffusion, models.clip, tokens, x, t, context)
    pipeline, _ = diffusers_pipelines(copied(checkpoint), *CFGS, tmp_path / "diffusers")
    pipeline.load_lora_weights(str(tmp_path), weight_name="trained.safetensors")
    with torch.no_grad():
        theirs = {
            "unet": pipeline.unet(x, t, encoder_hidden_states=context).sample,
            "clip": pipeline.text_encoder(tokens).last_hidden_state,
        }
    for name in ours:
        change = (ours[name] - base[name]).abs().max().item()
        assert change > 1e-3, f"the trained LoRA moved the {name} output by {change:.2e} only: too weak to test"
        assert_close(ours[name] - base[name], theirs[name] - base[name], f"{name}: the trained LoRA's change")


@pytest.mark.parametrize("suffix", [".pt", ".ckpt"])
def test_a_pickled_lora_loads_like_its_safetensors_file_and_a_code_running_one_is_refused(models, tmp_path, suffix):
    import os

    state = kohya_lora(models, 4, True, seed=9)
    save_file(state, tmp_path / "lora.safetensors")
    torch.save(state, tmp_path / f"lora{suffix}")
    tokens, x, t, context = inputs(models)
    results = []
    for name in ("lora.safetensors", f"lora{suffix}"):
        lora = load_lora(models, tmp_path / name)
        results.append(outputs(models.diffusion, models.clip, tokens, x, t, context))
        lora.remove()
    for net in results[0]:
        assert torch.equal(results[0][net], results[1][net]), f"{net}: the {suffix} LoRA differs from the safetensors"

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save(state | {"lora_unet_x.lora_down.weight": Payload()}, tmp_path / f"evil{suffix}")
    with pytest.raises(CheckpointError, match=r"refused: loading this pickle would call posix\.system"):
        load_lora(models, tmp_path / f"evil{suffix}")
    assert not marker.exists(), "the payload ran"
