"""The study tools (sd/study.py): attention probabilities against diffusers', hooks that change nothing when they
change nothing, word heat maps on the built-in model, every step's prediction, recording, replacing and ablating
layers, and everything undone after an exception."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from reference import assert_close, ldm_key_shapes, our_models, random_checkpoint, reference_unet

from sd import study
from sd.attention import CrossAttention
from sd.autoencoder import VAEConfig
from sd.clip import CLIPConfig
from sd.diffusion import UNetConfig
from sd.model_loader import load_models
from sd.pipeline import generate
from sd.samplers import SAMPLERS
from sd.shapes import evaluate_heat_maps

ROOT = Path(__file__).parents[1]
CLIP_CFG, VAE_CFG, UNET_CFG = CLIPConfig.tiny(), VAEConfig.tiny(), UNetConfig.tiny()
PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def checkpoint():
    return random_checkpoint(ldm_key_shapes(CLIP_CFG, VAE_CFG, UNET_CFG), seed=5)


@pytest.fixture(scope="module")
def tiny(checkpoint):
    return our_models({k: v.clone() for k, v in checkpoint.items()}, CLIP_CFG, VAE_CFG, UNET_CFG)


@pytest.fixture(scope="module")
def builtin():
    return load_models(None)


def latents_of(models, **kwargs) -> torch.Tensor:
    options = dict(seed=7, steps=6, output_type="latent", progress=False)
    return generate(PROMPT, models, **{**options, **kwargs}).images


def hooks_left(module: torch.nn.Module) -> list[str]:
    """Every forward hook, pre-hook and attention probe still set anywhere in `module`."""
    return [
        name
        for name, m in module.named_modules()
        if m._forward_hooks or m._forward_pre_hooks or getattr(m, "probe", None) is not None
    ]


class Recording:
    """A diffusers attention processor that keeps each call's probabilities as [B, heads, queries, keys]."""

    def __init__(self, name: str, store: list):
        from diffusers.models.attention_processor import AttnProcessor

        self.name, self.store, self.plain = name, store, AttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k = attn.head_to_batch_dim(attn.to_q(hidden_states)), attn.head_to_batch_dim(attn.to_k(context))
        probs = attn.get_attention_scores(q, k, None)  # [B * heads, queries, keys]
        self.store.append((self.name, probs.unflatten(0, (hidden_states.shape[0], attn.heads))))
        return self.plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


@pytest.mark.parametrize("keys", [77, 154], ids=["one-chunk", "long-prompt"])
@torch.no_grad()
def test_every_attention_layers_probabilities_equal_diffusers(checkpoint, tiny, keys):
    ref = reference_unet(checkpoint, VAE_CFG, UNET_CFG)
    theirs: list = []
    ref.set_attn_processor({name: Recording(name, theirs) for name in ref.attn_processors})
    ours: list = []
    gen = torch.Generator().manual_seed(0)
    latents, context = torch.randn(2, 4, 8, 12, generator=gen), torch.randn(2, keys, CLIP_CFG.width, generator=gen)
    with study.hook_attention(tiny, lambda name, step, t, probs, grid: ours.append((name, step, t, probs, grid))):
        tiny.diffusion(latents, torch.tensor([500, 500]), context)
    ref(latents, torch.tensor([500, 500]), context)
    layers = [n for n, m in tiny.diffusion.named_modules() if isinstance(m, CrossAttention)]
    assert [name for name, *_ in ours] == layers, "our hook saw the layers in another order or not all of them"
    assert len(theirs) == len(ours) == len(layers)
    for (name, step, t, probs, grid), (their_name, their_probs) in zip(ours, theirs):
        assert step is None and t == 500.0, f"{name}: outside a generation step is None, got {step}, t {t}"
        assert name.split(".")[-1] == their_name.split(".")[-2], f"{name} met {their_name}"
        assert probs.dtype == torch.float32 and probs.shape[2] == grid[0] * grid[1]
        assert probs.shape[-1] == (keys if name.endswith("attn2") else probs.shape[2])
        assert_close(probs, their_probs, f"{name} attention probabilities", rtol=1e-5)


def test_a_hook_that_returns_none_changes_no_bit_and_one_that_returns_its_input_only_rounding(builtin):
    plain = latents_of(builtin)
    with study.hook_attention(builtin, lambda *args: None):
        assert torch.equal(latents_of(builtin), plain), "a no-op hook changed the latents"
    with study.hook_attention(builtin, lambda name, step, t, probs, grid: probs):
        assert_close(latents_of(builtin), plain, "latents with the explicit softmax", rtol=1e-4)
    assert hooks_left(builtin.diffusion) == []
    assert torch.equal(latents_of(builtin), plain)


def test_the_hook_knows_the_step_timestep_grid_and_guidance_halves(builtin):
    seen = []
    with study.hook_attention(
        builtin, lambda name, step, t, probs, grid: seen.append((step, t, probs.shape[0], grid, probs.shape[2]))
    ):
        latents_of(builtin, width=96, height=64, sampler="ddim")  # latents 24 wide, 16 high
        latents_of(builtin, negative_prompt="a green background, " * 30, steps=2)  # 2 UNet calls per step
    sampler = SAMPLERS["ddim"]()
    sampler.set_steps(6)
    layers = sum(isinstance(m, CrossAttention) for m in builtin.diffusion.modules())
    first = seen[: 6 * layers]
    assert [s for s, *_ in first] == [i for i in range(6) for _ in range(layers)]
    assert [t for _, t, *_ in first[::layers]] == [float(t) for t in sampler.timesteps]
    assert {b for _, _, b, _, _ in first} == {2}, "under guidance a batch of one is two rows, negative first"
    assert {grid for *_, grid, _ in first} == {(8, 12), (4, 6)} and all(h * w == q for *_, (h, w), q in first)
    second = seen[6 * layers :]
    assert [s for s, *_ in second] == [i for i in range(2) for _ in range(2 * layers)]
    assert {b for _, _, b, _, _ in second} == {1}


def test_replacement_probabilities_change_the_image_and_a_wrong_shape_is_refused(builtin):
    plain = latents_of(builtin)
    uniform = lambda name, step, t, probs, grid: torch.full_like(probs, 1 / probs.shape[-1])  # noqa: E731
    with study.hook_attention(builtin, uniform, layers="output_blocks"):
        changed = latents_of(builtin)
    assert (changed - plain).abs().max() > 0.1, "attending uniformly in the decoder changed nothing"
    with study.hook_attention(builtin, lambda name, step, t, probs, grid: probs[:, :1]):
        with pytest.raises(ValueError, match="returned .* the layer needs"):
            latents_of(builtin)
    with pytest.raises(ValueError, match="no CrossAttention layer is named 'input_blocks.9'"):
        study.hook_attention(builtin, lambda *args: None, layers="input_blocks.9")
    assert hooks_left(builtin.diffusion) == []


def test_word_positions_follow_chunks_emphasis_and_repeats(builtin):
    assert study.word_positions(builtin, "a (red:1.3) circle on a [blue] background") == {
        "a": [1, 5],
        "red": [2],
        "circle": [3],
        "on": [4],
        "blue": [6],
        "background": [7],
    }
    positions = study.word_positions(builtin, "red " * 75 + "circle")
    assert positions["circle"] == [77 + 1], "the 76th token opens the second chunk, after its start token"
    with pytest.raises(ValueError, match="AND"):
        study.word_positions(builtin, "a circle AND a square")


def test_heat_maps_cover_every_word_in_0_1_at_image_size(builtin):
    result = study.attention_maps(PROMPT, builtin, seed=1, steps=8, progress=False)
    assert list(result.maps) == ["a", "red", "circle", "on", "blue", "background"]
    for word, heat in result.maps.items():
        assert heat.shape == (64, 64) and heat.min() == 0 and heat.max() == 1, f"{word}: {heat.min()}..{heat.max()}"
    assert all(name.endswith("attn2") for name in result.layers) and len(result.layers) == 7
    p2p = study.attention_maps(PROMPT, builtin, seed=1, steps=8, progress=False, preset="p2p")
    assert len(p2p.layers) == 4, "the 4x4 layers: input_blocks.5, middle_block, output_blocks.0 and .1"
    sheet = result.sheet()
    assert sheet.size == (3 * 64, 3 * (64 + 12))
    with pytest.raises(ValueError, match="resolutions"):
        study.attention_maps(PROMPT, builtin, steps=2, progress=False, resolutions=[0])
    assert hooks_left(builtin.diffusion) == []


def test_the_shape_words_heat_map_lands_on_the_shape_more_often_than_the_background_words(builtin):
    """Measured over 40 prompts (bench/results/study-heat-maps.md): the issue's target, 80% for the shape word, is
    out of this model's reach (see docs/study.md); the decoder's 8x8 layer comes closest. These bounds keep what
    it reaches."""
    decoder = evaluate_heat_maps(builtin, layers="output_blocks.2")
    assert decoder["shape word"] >= 0.35 and decoder["background word"] <= 0.15, decoder
    daam = evaluate_heat_maps(builtin)
    assert daam["shape word"] > daam["background word"], daam


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_trajectory_holds_every_step_and_ends_at_the_generations_latents(builtin, sampler):
    trajectory = study.trajectory(PROMPT, builtin, sampler=sampler, seed=3, steps=5, progress=False)
    final = latents_of(builtin, sampler=sampler, seed=3, steps=5)
    taken = 6 if sampler == "plms" else 5  # PLMS's warm-up evaluates the UNet twice at its first timestep
    assert trajectory.latents.shape == (taken, *final.shape) and trajectory.predicted.shape == trajectory.latents.shape
    assert torch.equal(trajectory.latents[-1], final), "the last step's latents are not the generation's"
    if sampler in ("euler", "euler_a", "dpmpp_2m"):  # their last step lands on x0-hat
        assert_close(trajectory.predicted[-1], final, "the last x0-hat", rtol=1e-4)
    assert len(trajectory.noisy) == len(trajectory.denoised) == taken
    assert trajectory.strip().size == (taken * 64, 2 * 64)


def test_record_captures_what_forward_hooks_capture(builtin):
    names = ["middle_block", "output_blocks.2.1.transformer_blocks.0.attn2"]
    plain: dict[str, list] = {name: [] for name in names}
    handles = [
        builtin.diffusion.get_submodule(name).register_forward_hook(
            lambda m, args, out, name=name: plain[name].append(out.clone())
        )
        for name in names
    ]
    try:
        with study.record(builtin.diffusion, names) as rec:
            latents_of(builtin, steps=3)
    finally:
        for handle in handles:
            handle.remove()
    for name in names:
        assert len(rec[name]) == 3 and all(torch.equal(a, b) for a, b in zip(rec[name], plain[name])), name
    assert hooks_left(builtin.diffusion) == []


def test_ablating_every_head_equals_an_attention_output_of_zeros(builtin):
    layer = "output_blocks.2.1.transformer_blocks.0.attn2"
    projection = builtin.diffusion.get_submodule(layer + ".to_out.0")
    with study.ablate(builtin, layer):
        ablated = latents_of(builtin)
    with study.replace(builtin.diffusion, layer, lambda out: torch.zeros_like(out) + projection.bias):
        zeroed = latents_of(builtin)
    assert torch.equal(ablated, zeroed), f"differ by {(ablated - zeroed).abs().max():.3g}"
    with study.ablate(builtin, layer, heads=[3]):
        one = latents_of(builtin)
    plain = latents_of(builtin)
    assert 0 < (one - plain).abs().max() < (ablated - plain).abs().max()
    with pytest.raises(ValueError, match="heads 0 to 7"):
        study.ablate(builtin, layer, heads=[8])
    with pytest.raises(ValueError, match="not an attention layer"):
        study.ablate(builtin, "middle_block")


def test_everything_is_restored_after_an_exception(builtin):
    plain = latents_of(builtin)
    layer = "input_blocks.3.1.transformer_blocks.0.attn1"
    with pytest.raises(RuntimeError, match="inside"):
        with study.ablate(builtin, layer), study.replace(builtin.diffusion, "middle_block", lambda out: 2 * out):
            with study.record(builtin.diffusion, ["output_blocks.0"]), study.WordMaps(builtin, PROMPT):
                raise RuntimeError("inside")
    with pytest.raises(RuntimeError, match="inside"):
        with study.hook_attention(builtin, lambda *args: None, layers="middle_block"):
            raise RuntimeError("inside")
    assert hooks_left(builtin.diffusion) == []
    assert torch.equal(latents_of(builtin), plain)


def test_the_cli_writes_the_heat_map_sheet_and_the_step_strip(tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, str(ROOT / "demo.py"), PROMPT, "--seed", "2", "--steps", "4", "--outdir", str(out)]
    result = subprocess.run([*command, "--attention-maps", "--save-steps"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    written = sorted(p.name for p in out.iterdir())
    assert written == ["00000-2.png", "00001-2-attention.png", "00002-2-steps.png"]
    assert Image.open(out / "00002-2-steps.png").size == (4 * 64, 2 * 64)
    assert "Seed: 2" in Image.open(out / "00001-2-attention.png").text["parameters"]
    refused = subprocess.run([*command, "--attention-maps", "--batch", "2"], capture_output=True, text=True)
    assert refused.returncode == 2 and refused.stderr.startswith("error: --attention-maps maps the words of one")
    assert refused.stderr.count("\n") == 1 and len(list(out.iterdir())) == 3


def doc_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", (ROOT / "docs" / "study.md").read_text(), re.S)


@pytest.mark.parametrize("command", [line for block in doc_blocks("sh") for line in block.splitlines() if line])
def test_the_guided_tours_commands_run(command, tmp_path):
    """From a scratch folder (what they write lands there), with this Python and the repository's files."""
    args = command.split(" ", 1)[1]
    for path in ("demo.py", "docs/study.py", "weights/shapes.safetensors"):
        args = args.replace(path, str(ROOT / path))
    if "docs/study.py" in command:
        args += " --out ."
    result = subprocess.run(
        f"{sys.executable} {args}", shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"{command}\n{result.stderr[-2000:]}"
    if "docs/study.py" in command:
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            "study-ablation.png",
            "study-heat-maps.png",
            "study-steps.png",
        ]


@pytest.mark.parametrize("block", range(len(doc_blocks("python"))))
def test_the_guided_tours_python_runs(block, tmp_path):
    code = doc_blocks("python")[block]
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{code}\n{result.stderr[-2000:]}"
