"""Maps the public checkpoint layouts onto our modules, key by key.

Our module tree mirrors the single-file (CompVis "LDM") layout, so that layout maps by prefix alone. diffusers
folders map through prefix pairs generated from the block structure, plus a handful of leaf renames. Every key is
either mapped or matched by a listed ignore rule (with the reason it is not needed); anything else is an error that
names the keys.
"""

import re

import torch

from sd.models import CheckpointError

COMPONENTS = ("clip", "encoder", "decoder", "diffusion")

# (prefix in the single-file checkpoint, our component, prefix inside that component); the first match wins
LDM_PREFIXES = (
    ("model.diffusion_model.", "diffusion", ""),
    ("first_stage_model.encoder.", "encoder", ""),
    ("first_stage_model.quant_conv.", "encoder", "quant_conv."),
    ("first_stage_model.decoder.", "decoder", ""),
    ("first_stage_model.post_quant_conv.", "decoder", "post_quant_conv."),
    ("cond_stage_model.transformer.text_model.", "clip", ""),
)
# also read: files saved before transformers added the `text_model` level
READ_PREFIXES = LDM_PREFIXES + (("cond_stage_model.transformer.", "clip", ""),)

# Keys the public files carry that no network reads, with the reason. Checked before the prefixes above.
LDM_IGNORED = (
    (
        r"betas|alphas_cumprod(_prev)?|sqrt_(recip(m1)?_)?alphas_cumprod|sqrt_one_minus_alphas_cumprod"
        r"|log_one_minus_alphas_cumprod|posterior_(variance|log_variance_clipped|mean_coef[12])",
        "training noise-schedule buffers (the samplers compute their own)",
    ),
    (r"model_ema\.(decay|num_updates)", "EMA bookkeeping"),
    (r"cond_stage_model\.transformer\.(text_model\.)?embeddings\.position_ids", "CLIP position ids (always 0..76)"),
    (r"(first_stage_model\.)?loss\..*", "the autoencoder's training loss (discriminator, LPIPS)"),
)
EMA_PREFIX = "model_ema."
UNUSED_EMA = "the UNet's EMA copy (pass ema=True / --ema to load it instead)"
UNUSED_TRAINED = "the UNet's raw trained weights (the EMA copy was asked for)"


def name_keys(keys, limit: int = 5) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _ignore_reason(key: str) -> str | None:
    return next((reason for pattern, reason in LDM_IGNORED if re.fullmatch(pattern, key)), None)


def from_ldm(state: dict[str, torch.Tensor], ema: bool = False) -> tuple[dict[str, dict], dict[str, str]]:
    """Splits a single-file checkpoint into per-component state dicts in our names.

    `ema=True` takes the UNet from the EMA copy (`model_ema.*`, names flattened without dots) that full training
    files carry. Returns ({component: {key: tensor}}, {ignored key: reason}); raises CheckpointError on keys that
    are neither mapped nor ignored.
    """
    components: dict[str, dict[str, torch.Tensor]] = {}
    ignored, unknown, ema_weights = {}, [], {}
    for key, tensor in state.items():
        if reason := _ignore_reason(key):
            ignored[key] = reason
        elif key.startswith(EMA_PREFIX):
            ema_weights[key] = tensor
        elif rule := next((r for r in READ_PREFIXES if key.startswith(r[0])), None):
            prefix, component, ours = rule
            components.setdefault(component, {})[ours + key[len(prefix) :]] = tensor
        else:
            unknown.append(key)
    if ema_weights:
        unet = components.get("diffusion", {})
        flat = {EMA_PREFIX + "diffusion_model" + key.replace(".", ""): key for key in unet}
        if unknown_ema := [k for k in ema_weights if k not in flat]:
            unknown += unknown_ema
        elif ema:
            ignored |= {LDM_PREFIXES[0][0] + key: UNUSED_TRAINED for key in unet}
            components["diffusion"] = {flat[k]: tensor for k, tensor in ema_weights.items()}
        else:
            ignored |= dict.fromkeys(ema_weights, UNUSED_EMA)
    elif ema:
        raise CheckpointError(
            "this checkpoint carries no EMA copy of the UNet (only full training files do); drop --ema"
        )
    if unknown:
        raise CheckpointError(f"{len(unknown)} keys of the checkpoint are not SD v1.x weights: {name_keys(unknown)}")
    return components, ignored


def to_ldm(components: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The inverse of `from_ldm`: per-component state dicts in our names -> single-file checkpoint keys."""
    out = {}
    for component, state in components.items():
        # the longest matching inner prefix wins: the decoder's `post_quant_conv.` before its catch-all ""
        rules = sorted((r for r in LDM_PREFIXES if r[1] == component), key=lambda r: -len(r[2]))
        for key, tensor in state.items():
            prefix, _, ours = next(r for r in rules if key.startswith(r[2]))
            out[prefix + key[len(ours) :]] = tensor
    return out


def from_ldm_vae(state: dict[str, torch.Tensor]) -> tuple[dict[str, dict], dict[str, str]]:
    """A VAE-only file in the LDM layout (`encoder.*`, `decoder.*`, `quant_conv.*`, `post_quant_conv.*`, optionally
    under `first_stage_model.`), such as vae-ft-mse-840000-ema-pruned -> ({"encoder": ..., "decoder": ...}, ignored)."""
    prefixed = {
        k if k.startswith("first_stage_model.") or _ignore_reason(k) else "first_stage_model." + k: v
        for k, v in state.items()
    }
    components, ignored = from_ldm(prefixed)
    if set(components) != {"encoder", "decoder"}:
        raise CheckpointError("not a VAE file: it needs the autoencoder's encoder and decoder weights, and only those")
    return components, ignored


# -- diffusers folders --------------------------------------------------------------------------------------------

UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
# the VAE's attention as diffusers >= 0.14 names it, and as older diffusers folders do
VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}


def indices(keys, prefix: str) -> list[int]:
    """The distinct integers n of keys that start with `prefix` + "n.", sorted."""
    return sorted({int(k[len(prefix) :].split(".", 1)[0]) for k in keys if k.startswith(prefix)})


def _rename(state: dict[str, torch.Tensor], pairs: list[tuple[str, str, dict | None]], what: str) -> dict:
    """Maps each key through the first (their prefix, our prefix, leaf renames) that it starts with."""
    out, unknown = {}, []
    for key, tensor in state.items():
        rule = next((p for p in pairs if key.startswith(p[0])), None)
        leaf = key[len(rule[0]) :] if rule else ""
        if rule and rule[2] is not None:
            name, _, param = leaf.rpartition(".")
            leaf = f"{rule[2][name]}.{param}" if name in rule[2] else None
        if leaf is None or rule is None:
            unknown.append(key)
        else:
            out[rule[1] + leaf] = tensor
    if unknown:
        raise CheckpointError(
            f"{len(unknown)} keys of the diffusers {what} are not SD v1.x weights: {name_keys(unknown)}"
        )
    return out


def from_diffusers_unet(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers UNet2DConditionModel state dict -> our UNet's names (`input_blocks`, `output_blocks`, ...)."""
    levels, res = len(indices(state, "down_blocks.")), len(indices(state, "down_blocks.0.resnets."))
    attention = [any(k.startswith(f"down_blocks.{i}.attentions.") for k in state) for i in range(levels)]
    return _rename(state, unet_prefixes(levels, res, attention), "UNet")


def unet_prefixes(levels: int, res: int, attention: list[bool]) -> list[tuple[str, str, dict | None]]:
    """(diffusers prefix, our prefix, leaf renames or None) for a UNet of `levels` levels with `res` ResNet blocks
    each and attention at the levels marked True: the whole correspondence of the two module trees."""
    pairs = [
        ("conv_in.", "input_blocks.0.0.", None),
        ("time_embedding.linear_1.", "time_embed.0.", None),
        ("time_embedding.linear_2.", "time_embed.2.", None),
        ("conv_norm_out.", "out.0.", None),
        ("conv_out.", "out.2.", None),
        ("mid_block.resnets.0.", "middle_block.0.", UNET_RESNET),
        ("mid_block.attentions.0.", "middle_block.1.", None),
        ("mid_block.resnets.1.", "middle_block.2.", UNET_RESNET),
    ]
    block = 1
    for i in range(levels):
        for j in range(res):
            pairs += [
                (f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{block}.0.", UNET_RESNET),
                (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{block}.1.", None),
            ]
            block += 1
        if i < levels - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{block}.0.op.", None))
            block += 1
    for i in range(levels):  # up_blocks[i] works at level levels-1-i
        first = i * (res + 1)
        for j in range(res + 1):
            pairs += [
                (f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{first + j}.0.", UNET_RESNET),
                (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{first + j}.1.", None),
            ]
        upsample_slot = 2 if attention[levels - 1 - i] else 1
        pairs.append((f"up_blocks.{i}.upsamplers.0.conv.", f"output_blocks.{first + res}.{upsample_slot}.conv.", None))
    return pairs


def from_diffusers_vae(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A diffusers AutoencoderKL state dict -> {"encoder": ..., "decoder": ...} in our names. diffusers stores the
    attention projections as linear layers; ours are the checkpoint's 1x1 convolutions."""
    levels, res = len(indices(state, "encoder.down_blocks.")), len(indices(state, "encoder.down_blocks.0.resnets."))
    pairs = [("quant_conv.", "encoder.quant_conv.", None), ("post_quant_conv.", "decoder.post_quant_conv.", None)]
    for part in ("encoder", "decoder"):
        pairs += [
            (f"{part}.conv_in.", f"{part}.conv_in.", None),
            (f"{part}.conv_out.", f"{part}.conv_out.", None),
            (f"{part}.conv_norm_out.", f"{part}.norm_out.", None),
            (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", VAE_RESNET),
            (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", VAE_RESNET),
            (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", VAE_ATTENTION),
        ]
    for i in range(levels):  # the decoder's up_blocks[i] works at level levels-1-i
        pairs += [
            (f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", VAE_RESNET) for j in range(res)
        ]
        pairs += [
            (f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{levels - 1 - i}.block.{j}.", VAE_RESNET)
            for j in range(res + 1)
        ]
        pairs += [
            (f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"encoder.down.{i}.downsample.conv.", None),
            (f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"decoder.up.{levels - 1 - i}.upsample.conv.", None),
        ]
    out: dict[str, dict[str, torch.Tensor]] = {"encoder": {}, "decoder": {}}
    for key, tensor in _rename(state, pairs, "VAE").items():
        part, _, rest = key.partition(".")
        if ".attn_1." in rest and tensor.ndim == 2:  # a linear weight -> the 1x1 convolution's
            tensor = tensor[:, :, None, None]
        out[part][rest] = tensor
    return out


def from_transformers_clip(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A transformers CLIPTextModel state dict (with or without the `text_model.` level) -> our CLIP's names."""
    out, ignored = {}, {}
    for key, tensor in state.items():
        plain = key.removeprefix("text_model.")
        if plain == "embeddings.position_ids":
            ignored[key] = "CLIP position ids (always 0..76)"
        else:
            out[plain] = tensor
    return out, ignored


# -- our own file -------------------------------------------------------------------------------------------------


def from_native(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Our own layout: `<component>.<our key>`."""
    components: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        component, _, rest = key.partition(".")
        if component not in COMPONENTS:
            raise CheckpointError(f"native file holds an unknown component: {key}")
        components.setdefault(component, {})[rest] = tensor
    return components


def to_native(components: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {f"{component}.{key}": t for component, state in components.items() for key, t in state.items()}
