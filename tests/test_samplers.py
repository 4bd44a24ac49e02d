"""Each sampler against its diffusers scheduler built with `from_config` of SD v1.5's scheduler config: the same
model outputs in, the same latents out after every step, for text-to-image and image-to-image starts."""

import pytest
import torch
from reference import SAMPLER_CASES, SAMPLER_IDS, assert_close, diffusers_scheduler

from sd.samplers import make_sampler


def fake_unet(x: torch.Tensor, t) -> torch.Tensor:
    """A stand-in noise prediction that depends on the input and the timestep, so trajectories can drift apart."""
    return torch.tanh(0.3 * x + float(t) / 1000) + 0.1 * torch.sin(x * float(t) / 100)


def run_diffusers(name, karras, steps, strength, x0, start_noise, seed, eta=0.0):
    scheduler = diffusers_scheduler(name, karras)
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps
    if strength is None:
        x = start_noise * scheduler.init_noise_sigma
    else:
        t_start = max(steps - min(int(steps * strength), steps), 0)
        timesteps = timesteps[t_start * scheduler.order :]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(t_start * scheduler.order)
        x = scheduler.add_noise(x0, start_noise, timesteps[:1])
    generator = torch.Generator().manual_seed(seed)
    kwargs = {"generator": generator} if name in ("ddpm", "euler_a", "ddim") else {}
    if name == "ddim":
        kwargs["eta"] = eta
    trajectory = []
    for t in timesteps:
        eps = fake_unet(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(eps, t, x, **kwargs).prev_sample
        trajectory.append(x)
    return list(timesteps), trajectory


def run_ours(name, karras, steps, strength, x0, start_noise, seed, eta=0.0):
    sampler = make_sampler(name, karras=karras, eta=eta)
    sampler.set_steps(steps)
    start = 0 if strength is None else steps - min(int(steps * strength), steps)
    x = start_noise * sampler.init_noise_sigma if strength is None else sampler.add_noise(x0, start_noise, start)
    generator = torch.Generator().manual_seed(seed)
    trajectory = []
    for i in range(start, len(sampler.timesteps)):
        eps = fake_unet(sampler.scale_input(x, i), sampler.timesteps[i])
        x = sampler.step(eps, i, x, generator)
        trajectory.append(x)
    return list(sampler.timesteps[start:]), trajectory


def assert_same_trajectory(ours, reference, what):
    (our_t, our_x), (ref_t, ref_x) = ours, reference
    assert [float(t) for t in our_t] == [float(t) for t in ref_t], f"{what}: timesteps differ"
    assert len(our_x) == len(ref_x)
    for i, (a, b) in enumerate(zip(our_x, ref_x)):
        assert_close(a, b, f"{what}, step {i}", rtol=2e-5)


def start():
    gen = torch.Generator().manual_seed(3)
    return torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)


@pytest.mark.parametrize("steps", [7, 20, 50])
@pytest.mark.parametrize("name, karras", SAMPLER_CASES, ids=SAMPLER_IDS)
def test_text_to_image_trajectory_matches_diffusers(name, karras, steps):
    x0, noise = start()
    args = (name, karras, steps, None, x0, noise, 11)
    assert_same_trajectory(run_ours(*args), run_diffusers(*args), f"{name} karras={karras}, {steps} steps")


@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
@pytest.mark.parametrize("name, karras", SAMPLER_CASES, ids=SAMPLER_IDS)
def test_image_to_image_trajectory_matches_diffusers(name, karras, strength):
    x0, noise = start()
    args = (name, karras, 20, strength, x0, noise, 12)
    assert_same_trajectory(run_ours(*args), run_diffusers(*args), f"{name} img2img strength {strength}")


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_with_eta_draws_the_same_noise_as_diffusers(eta):
    x0, noise = start()
    args = ("ddim", False, 20, None, x0, noise, 13, eta)
    assert_same_trajectory(run_ours(*args), run_diffusers(*args), f"ddim eta={eta}")


def test_unknown_sampler_karras_and_eta_misuse_are_refused():
    with pytest.raises(
        ValueError, match="unknown sampler 'heun'; choose one of ddpm, ddim, plms, euler, euler_a, lms, dpmpp_2m"
    ):
        make_sampler("heun")
    with pytest.raises(ValueError, match="the Euler a sampler has no Karras schedule"):
        make_sampler("euler_a", karras=True)
    with pytest.raises(ValueError, match="eta applies to the ddim sampler only"):
        make_sampler("euler", eta=0.5)
