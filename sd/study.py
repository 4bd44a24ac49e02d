"""Study tools: watch a generation from inside, and change a layer of it for a while.

    hook_attention(models, fn, layers)       every UNet attention layer's probabilities softmax(q k^T / sqrt(d)),
                                             to look at or replace (prompt-to-prompt style)
    attention_maps(prompt, models)           a heat map per word of the prompt (DAAM's aggregation)
    trajectory(prompt, models)               the noisy latents and the predicted clean image x0-hat at every step
    record(module, names)                    named modules' outputs at every call
    replace(module, name, fn) / ablate(...)  a layer's output changed, or attention heads switched off

Layers are named by their checkpoint-style paths in the UNet (`input_blocks.1.1.transformer_blocks.0.attn2`: attn1
is self-attention, attn2 cross-attention to the prompt); a name may be a prefix (`output_blocks`, `middle_block`).
Every tool is a context manager (or returns one) that undoes itself on exit, even after an exception. Without a
hook the networks run exactly as they do without this module (sd/attention.py computes the probabilities
explicitly only for a layer with a probe). `python docs/study.py` makes the pictures of the guided tour,
docs/study.md.
"""

import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from sd.attention import CrossAttention
from sd.images import grid, to_pil
from sd.models import Models
from sd.pipeline import Generated, Step, decode, generate
from sd.prompts import CHUNK, chunks, parse_emphasis, split_and
from sd.sampling import CURRENT_STEP
from sd.tokenizer import clean, pretokenizer

# fn(name, step, timestep, probs [B, heads, queries, keys] float32, grid (h, w)) -> None or replacement probs
AttentionHook = Callable[[str, int | None, float, torch.Tensor, tuple[int, int]], torch.Tensor | None]


class Undo(contextlib.ExitStack):
    """What a study tool changed, undone by `remove()` or on leaving its `with` block."""

    def remove(self) -> None:
        self.close()


def named_layers(model: torch.nn.Module, layers: str | Iterable[str] | None, kind: type) -> dict[str, torch.nn.Module]:
    """The modules of type `kind` in `model` whose names are in `layers` or start with one of them (+ "."); None:
    all of them. A name that matches nothing is a ValueError listing some that exist."""
    found = {name: module for name, module in model.named_modules() if isinstance(module, kind)}
    if layers is None:
        return found
    wanted = [layers] if isinstance(layers, str) else list(layers)
    matches = lambda name, prefix: name == prefix or name.startswith(prefix + ".")  # noqa: E731
    for prefix in wanted:
        if not any(matches(name, prefix) for name in found):
            examples = ", ".join(list(found)[:3])
            raise ValueError(
                f"no {kind.__name__} layer is named {prefix!r} or under it; the layers are like {examples}"
            )
    return {name: module for name, module in found.items() if any(matches(name, p) for p in wanted)}


def attention_layers(models: Models) -> list[str]:
    """The names of the UNet's attention layers, in the order they run."""
    return list(named_layers(models.diffusion, None, CrossAttention))


def module_named(root: torch.nn.Module, name: str) -> torch.nn.Module:
    try:
        return root.get_submodule(name)
    except AttributeError:
        children = ", ".join(n for n, _ in root.named_children())
        raise ValueError(f"{type(root).__name__} has no module {name!r}; its top-level modules: {children}") from None


def query_grid(latent_size: tuple[int, int], queries: int) -> tuple[tuple[int, int], int]:
    """The (h, w) of a UNet level with `queries` pixels and how many times it was halved from the latents' size
    (each stride-2 conv rounds an odd side up)."""
    (h, w), halvings = latent_size, 0
    while h * w > queries:
        h, w, halvings = -(-h // 2), -(-w // 2), halvings + 1
    if h * w != queries:
        raise ValueError(f"{queries} queries are no level of a UNet run on {latent_size[0]}x{latent_size[1]} latents")
    return (h, w), halvings


def hook_attention(models: Models, fn: AttentionHook, layers: str | Iterable[str] | None = None) -> Undo:
    """Calls fn(name, step, timestep, probs, grid) in every UNet attention layer named by `layers` (None: all).

    probs: [B, heads, queries, keys], float32, the batch in the pipeline's order (under classifier-free guidance
    the negative prompts' rows first; a prompt and negative prompt of different lengths take a UNet call each, the
    negative's first). step: steps taken in this generation, from 0 (None outside one); grid: the queries' (h, w).
    fn returns None (the layer computes its output as without a hook) or probabilities of the same shape to use
    instead. Returns a handle: `.remove()`, or use it as a context manager."""
    unet = models.diffusion
    latent: dict[str, object] = {}

    def remember(module, args) -> None:
        latent["size"], latent["timestep"] = tuple(args[0].shape[-2:]), float(torch.as_tensor(args[1]).flatten()[0])

    def probe(name: str, probs: torch.Tensor) -> torch.Tensor | None:
        step = CURRENT_STEP.get()
        grid_, _ = query_grid(latent["size"], probs.shape[2])
        replaced = fn(name, None if step is None else step[0], latent["timestep"], probs, grid_)
        if replaced is not None and replaced.shape != probs.shape:
            raise ValueError(
                f"the hook on {name} returned {tuple(replaced.shape)}; the layer needs {tuple(probs.shape)}"
            )
        return replaced

    undo = Undo()
    targets = named_layers(unet, layers, CrossAttention)
    taken = [name for name, layer in targets.items() if layer.probe is not None]
    if taken:
        raise ValueError(f"{taken[0]} already has an attention hook; remove it first (one hook per layer)")
    undo.enter_context(unet.register_forward_pre_hook(remember))
    for name, layer in targets.items():
        layer.probe = lambda probs, name=name: probe(name, probs)
        undo.callback(setattr, layer, "probe", None)
    return undo


# -- word heat maps -----------------------------------------------------------------------------------------------

# Which cross-attention layers a heat map averages, by how many times their grid is halved from the latents':
# DAAM (Tang et al. 2023) every level but the full-resolution one, prompt-to-prompt (Hertz et al. 2022) the 16x16
# maps of a 64x64 latent.
PRESETS = {"daam": (1, 2, 3), "p2p": (2,)}


def word_positions(models: Models, prompt: str) -> dict[str, list[int]]:
    """Each word of the prompt (words and numbers as CLIP's tokenizer splits the text; punctuation left out) and
    the positions of its tokens in the prompt's context (chunks of 77: start token, 75 tokens, end token). A word
    that appears twice has both places; an embedding's trigger word has none (its vectors are not its tokens)."""
    if len(split_and(prompt)) > 1:
        raise ValueError("heat maps are per word of one prompt; AND makes several (drop AND)")
    stream = [
        (c * (CHUNK + 2) + 1 + j, t)
        for c, chunk in enumerate(chunks(models, prompt))
        for j, t in enumerate(chunk.tokens)
    ]
    text = " ".join(fragment for fragment, weight in parse_emphasis(prompt) if weight != -1)  # -1: a BREAK
    positions: dict[str, list[int]] = defaultdict(list)
    cursor = 0
    for word in pretokenizer().findall(clean(text)):
        ids = models.tokenizer.encode(word)
        if not any(ch.isalnum() for ch in word) or not ids:
            continue
        for k in range(cursor, len(stream) - len(ids) + 1):
            if [t for _, t in stream[k : k + len(ids)]] == ids:
                positions[word] += [p for p, _ in stream[k : k + len(ids)]]
                cursor = k + len(ids)
                break
    return dict(positions)


@dataclass
class HeatMaps:
    """A generation and, for each word of its prompt, where the image attended to it: [H, W] in [0, 1]."""

    image: Image.Image
    maps: dict[str, torch.Tensor]
    generated: Generated
    layers: list[str] = field(default_factory=list)  # the cross-attention layers averaged

    def overlays(self) -> list[Image.Image]:
        """The image, then the image under each word's heat map, labelled with the word."""
        return [labelled(self.image, "image")] + [
            labelled(overlay(self.image, heat), word) for word, heat in self.maps.items()
        ]

    def sheet(self, columns: int | None = None) -> Image.Image:
        return grid(self.overlays(), columns=columns)


class WordMaps:
    """Sums the conditional rows' cross-attention to each token over the steps of the generation run inside its
    `with` block, per layer. `heat_maps()` then averages the layers (each upsampled to the latents' size, bicubic,
    negatives clipped, as DAAM does) and, per word, its tokens, and brings each map to the image's size and [0, 1]."""

    def __init__(
        self,
        models: Models,
        prompt: str,
        preset: str = "daam",
        resolutions: Iterable[int] | None = None,
        layers: str | Iterable[str] | None = None,
        at_steps: Iterable[int] | None = None,
    ):
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
        self.models, self.prompt = models, prompt
        self.words = word_positions(models, prompt)
        self.keys = len(chunks(models, prompt)) * (CHUNK + 2)
        self.halvings = set(PRESETS[preset] if resolutions is None else resolutions)
        self.layers = [
            name for name in named_layers(models.diffusion, layers, CrossAttention) if name.endswith("attn2")
        ]
        if not self.layers:
            raise ValueError(f"heat maps read cross-attention (attn2 layers); {layers!r} holds none")
        self.at_steps = None if at_steps is None else set(at_steps)
        self.sums: dict[str, torch.Tensor] = {}
        self.latent_size: tuple[int, int] | None = None

    def __enter__(self) -> "WordMaps":
        self.hook = hook_attention(self.models, self.collect, self.layers)
        self.hook.enter_context(self.models.diffusion.register_forward_pre_hook(self.size))
        return self

    def __exit__(self, *exc) -> None:
        self.hook.remove()

    def size(self, module, args) -> None:
        self.latent_size = tuple(args[0].shape[-2:])

    def collect(self, name, step, timestep, probs, grid_) -> None:
        if probs.shape[-1] != self.keys or (self.at_steps is not None and step not in self.at_steps):
            return  # the negative prompt's own call, or a step not asked for
        _, halvings = query_grid(self.latent_size, probs.shape[2])
        if halvings not in self.halvings:
            return
        conditional = probs[-1].mean(0)  # [queries, keys]: the last row is the prompt's (negatives come first)
        maps = conditional.T.reshape(self.keys, *grid_)  # [keys, h, w]
        self.sums[name] = self.sums.get(name, 0) + maps

    def heat_maps(self, height: int, width: int) -> dict[str, torch.Tensor]:
        if not self.sums:
            raise ValueError(
                f"no cross-attention layer at the resolutions asked ({sorted(self.halvings)} halvings of the latents) "
                "ran: this model's levels are others; pass resolutions="
            )
        upsampled = [
            F.interpolate(m[None], size=self.latent_size, mode="bicubic")[0].clamp(min=0) for m in self.sums.values()
        ]
        tokens = torch.stack(upsampled).mean(0)  # [keys, h, w]
        out = {}
        for word, positions in self.words.items():
            heat = F.interpolate(tokens[positions].mean(0)[None, None], size=(height, width), mode="bicubic")[0, 0]
            heat = heat.clamp(min=0)
            out[word] = (heat - heat.min()) / (heat.max() - heat.min()).clamp(min=1e-12)
        return out


def attention_maps(
    prompt: str,
    models: Models,
    preset: str = "daam",
    resolutions: Iterable[int] | None = None,
    layers: str | Iterable[str] | None = None,
    at_steps: Iterable[int] | None = None,
    **kwargs,
) -> HeatMaps:
    """Generates one image for `prompt` (kwargs: generate's) and a heat map per word: the prompt's cross-attention
    (the conditional half), summed over the steps (`at_steps`: only these, from 0), averaged over heads and layers
    (`layers`: names or prefixes; `resolutions`: the levels by how many times their grid is halved from the
    latents', 0 = full size; `preset`: "daam" every level but the full-size one, "p2p" the twice-halved, 16x16 for
    SD's 64x64 latents), upsampled to the image and scaled to [0, 1]."""
    if kwargs.get("batch_size", 1) != 1:
        raise ValueError("heat maps are of one image: drop batch_size")
    with WordMaps(models, prompt, preset, resolutions, layers, at_steps) as recorder:
        generated = generate(prompt, models, **kwargs)
    (image,) = generated.images
    return HeatMaps(image, recorder.heat_maps(image.height, image.width), generated, list(recorder.sums))


def overlay(image: Image.Image, heat: torch.Tensor, opacity: float = 0.6) -> Image.Image:
    """The image under a heat map coloured from dark blue (0) through green to red (1)."""
    h = heat.clamp(0, 1).numpy()[..., None]
    colours = np.concatenate(
        [np.clip(2 * h - 0.5, 0, 1), np.clip(1.5 - abs(4 * h - 2), 0, 1), np.clip(1.5 - 2 * h, 0, 1) * (h < 0.75)],
        axis=-1,
    )
    mixed = (1 - opacity) * np.asarray(image, dtype=np.float32) / 255 + opacity * colours
    return Image.fromarray((mixed * 255).round().astype(np.uint8))


def labelled(image: Image.Image, text: str) -> Image.Image:
    """The image with a caption strip under it."""
    out = Image.new("RGB", (image.width, image.height + 12), "white")
    out.paste(image)
    ImageDraw.Draw(out).text((2, image.height), text, fill="black")
    return out


# -- every step ---------------------------------------------------------------------------------------------------


@dataclass
class Trajectory:
    """A generation's every step: the noisy latents after it and the clean latents its prediction pointed at,
    each [steps, B, 4, h, w] on the CPU, and both decoded to images (`noisy[k][b]`, `denoised[k][b]`)."""

    generated: Generated
    latents: torch.Tensor
    predicted: torch.Tensor
    noisy: list[list[Image.Image]]
    denoised: list[list[Image.Image]]

    def strip(self, image: int = 0) -> Image.Image:
        """One image's steps left to right: the noisy latents above, the predicted clean image x0-hat below."""
        rows = [[picture[image] for picture in self.noisy], [picture[image] for picture in self.denoised]]
        return grid([picture for row in rows for picture in row], columns=len(rows[0]))


class Steps:
    """Collects each step of the generation given its `on_step` (a `Step` per step), on the CPU."""

    def __init__(self):
        self.latents: list[torch.Tensor] = []
        self.predicted: list[torch.Tensor] = []

    def __call__(self, step: Step) -> None:
        self.latents.append(step.latents.float().cpu())
        self.predicted.append(step.denoised.float().cpu())

    def trajectory(self, models: Models, generated: Generated, vae_tile: int | None = None) -> Trajectory:
        with torch.inference_mode():
            decoded = [
                [
                    to_pil(
                        (decode(models, z.to(models.device, models.dtype), vae_tile) / 2 + 0.5)
                        .clamp(0, 1)
                        .float()
                        .cpu()
                    )
                    for z in kind
                ]
                for kind in (self.latents, self.predicted)
            ]
        return Trajectory(generated, torch.stack(self.latents), torch.stack(self.predicted), *decoded)


def trajectory(prompt: str | list[str], models: Models, **kwargs) -> Trajectory:
    """Generates (kwargs: generate's, any sampler) and returns every step's noisy latents and x0-hat, decoded."""
    steps = Steps()
    generated = generate(prompt, models, on_step=steps, **kwargs)
    return steps.trajectory(models, generated, kwargs.get("vae_tile"))


# -- any layer ----------------------------------------------------------------------------------------------------


class record(contextlib.AbstractContextManager):  # noqa: N801 - used as a function: `with record(...) as rec`
    """Captures the outputs of `module`'s submodules named in `names`, at every call, while the block runs:
    `rec[name]` is the list of their outputs (detached, on their device), one per call (a UNet call per step, or
    two when a prompt and its negative differ in length)."""

    def __init__(self, module: torch.nn.Module, names: str | Iterable[str]):
        self.outputs: dict[str, list[torch.Tensor]] = {}
        self.undo = Undo()
        for name in [names] if isinstance(names, str) else names:
            target = module_named(module, name)
            self.outputs[name] = []
            self.undo.enter_context(
                target.register_forward_hook(lambda m, args, out, name=name: self.outputs[name].append(out.detach()))
            )

    def __getitem__(self, name: str) -> list[torch.Tensor]:
        return self.outputs[name]

    def __exit__(self, *exc) -> None:
        self.undo.remove()


def replace(module: torch.nn.Module, name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Undo:
    """The submodule `name` of `module` outputs fn(its output) until the handle is removed (or its block ends)."""
    undo = Undo()
    undo.enter_context(module_named(module, name).register_forward_hook(lambda m, args, out: fn(out)))
    return undo


def ablate(models: Models, layer: str, heads: Iterable[int] | None = None) -> Undo:
    """Switches off attention heads (None: all) of the UNet attention layer `layer`: their part of the attention's
    result is zero before the output projection mixes the heads, as if they attended to nothing."""
    attention = module_named(models.diffusion, layer)
    if not isinstance(attention, CrossAttention):
        raise ValueError(f"{layer} is a {type(attention).__name__}, not an attention layer (attn1 or attn2)")
    chosen = list(range(attention.heads)) if heads is None else list(heads)
    if not chosen or not all(0 <= h < attention.heads for h in chosen):
        raise ValueError(f"{layer} has heads 0 to {attention.heads - 1}; got {chosen}")

    def zero(module, args):
        (x,) = args
        x = x.unflatten(-1, (attention.heads, -1)).clone()  # [B, tokens, heads, d]
        x[..., chosen, :] = 0
        return (x.flatten(-2),)

    undo = Undo()
    undo.enter_context(attention.to_out[0].register_forward_pre_hook(zero))
    return undo
