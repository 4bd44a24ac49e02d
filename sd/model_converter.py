"""Maps the public checkpoint layouts onto our modules, key by key, and back.

Our module tree mirrors the public single-file (CompVis "LDM") checkpoint, so that layout maps by prefix alone.
Every key is either mapped or matched by a listed ignore rule; anything else is an error naming the keys.
"""

import re

import torch

COMPONENTS = ("clip", "encoder", "decoder", "diffusion")

# (prefix in the single-file checkpoint, our component, prefix inside that component)
LDM_PREFIXES = (
    ("model.diffusion_model.", "diffusion", ""),
    ("first_stage_model.encoder.", "encoder", ""),
    ("first_stage_model.quant_conv.", "encoder", "quant_conv."),
    ("first_stage_model.decoder.", "decoder", ""),
    ("first_stage_model.post_quant_conv.", "decoder", "post_quant_conv."),
    ("cond_stage_model.transformer.text_model.", "clip", ""),
)

# Keys the public files carry that no network reads: the training noise schedule (the samplers recompute it), the
# EMA bookkeeping, and CLIP's position ids (always 0..76, recomputed).
LDM_IGNORED = tuple(
    re.compile(pattern)
    for pattern in (
        r"betas|alphas_cumprod(_prev)?|sqrt_(recip(m1)?_)?alphas_cumprod|sqrt_one_minus_alphas_cumprod",
        r"log_one_minus_alphas_cumprod|posterior_(variance|log_variance_clipped|mean_coef[12])",
        r"model_ema\.(decay|num_updates)",
        r"cond_stage_model\.transformer\.text_model\.embeddings\.position_ids",
    )
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be mapped onto our modules; the message names the keys and what to do."""


def _name_keys(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(sorted(keys)[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def from_ldm(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """Splits a single-file checkpoint into per-component state dicts in our names.

    Returns ({component: {key: tensor}}, ignored keys). Raises CheckpointError on keys that are neither.
    """
    components: dict[str, dict[str, torch.Tensor]] = {}
    ignored, unknown = [], []
    for key, tensor in state_dict.items():
        if any(rule.fullmatch(key) for rule in LDM_IGNORED):
            ignored.append(key)
            continue
        for prefix, component, ours in LDM_PREFIXES:
            if key.startswith(prefix):
                components.setdefault(component, {})[ours + key[len(prefix):]] = tensor
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{len(unknown)} keys of the checkpoint are not SD v1.x weights: {_name_keys(unknown)}")
    return components, ignored


def to_ldm(components: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The inverse of `from_ldm`: per-component state dicts in our names -> single-file checkpoint keys."""
    out = {}
    for component, state in components.items():
        # the longest matching inner prefix wins: the decoder's `post_quant_conv.` before its catch-all ""
        rules = sorted((r for r in LDM_PREFIXES if r[1] == component), key=lambda r: -len(r[2]))
        for key, tensor in state.items():
            prefix, _, ours = next(r for r in rules if key.startswith(r[2]))
            out[prefix + key[len(ours):]] = tensor
    return out


def load_component(module: torch.nn.Module, state: dict[str, torch.Tensor], name: str) -> None:
    """Strictly loads `state` into `module`, adopting its tensors (no copy; the module takes their dtype)."""
    expected = module.state_dict()
    problems = []
    if missing := [k for k in expected if k not in state]:
        problems.append(f"missing {_name_keys(missing)}")
    if unexpected := [k for k in state if k not in expected]:
        problems.append(f"unexpected {_name_keys(unexpected)}")
    if reshaped := [
        f"{k} {tuple(state[k].shape)} instead of {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]:
        problems.append(f"wrong shape {_name_keys(reshaped, 3)}")
    if problems:
        raise CheckpointError(f"the {name} weights do not fit the {name} network: {'; '.join(problems)}")
    module.load_state_dict(state, strict=True, assign=True)
