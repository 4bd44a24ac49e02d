"""Each sampler against its diffusers scheduler built with `from_config` of SD v1.5's scheduler config: the same
model outputs in, the same latents out after every step, for text-to-image and image-to-image starts. Image-to-image
LMS and PLMS are checked against diffusers' steps run on the tail of the schedule: diffusers' own img2img begins
their history at the schedule's first step, a known bug (diffusers issue 5630) that we do not copy."""

import numpy as np
import pytest
import torch
from reference import SAMPLER_CASES, SAMPLER_IDS, assert_close, diffusers_scheduler

from sd.samplers import SAMPLERS, make_sampler
from sd.sampling import alphas_cumprod, training_sigmas


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
        if name in ("lms", "plms"):
            timesteps = tail_of_schedule(scheduler, name, t_start)
        else:
            timesteps = timesteps[t_start * scheduler.order :]
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(t_start * scheduler.order)
        if len(timesteps) == 0:
            return [], []
        x = scheduler.add_noise(x0, start_noise, timesteps[:1])
    generator = torch.Generator().manual_seed(seed)
    kwargs = {"generator": generator} if name in ("ddpm", "euler_a", "ddim", "lcm") else {}
    if name == "ddim":
        kwargs["eta"] = eta
    trajectory = []
    for t in timesteps:
        eps = fake_unet(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(eps, t, x, **kwargs).prev_sample
        trajectory.append(x)
    return list(timesteps), trajectory


def tail_of_schedule(scheduler, name, t_start):
    """Sets up diffusers' LMS or PLMS to run only the steps from t_start on, as if they were the whole schedule:
    LMS on the tail of its sigmas (k-diffusion's img2img), PLMS with its warm-up (the repeated timestep) at the
    first step taken. Returns the timesteps to run."""
    if name == "lms":
        scheduler.sigmas = scheduler.sigmas[t_start:]
        scheduler.timesteps = scheduler.timesteps[t_start:]
        scheduler.set_begin_index(0)
    else:
        plain = torch.cat([scheduler.timesteps[:1], scheduler.timesteps[2:]])[t_start:]  # without the repeat
        scheduler.timesteps = torch.cat([plain[:2], plain[1:]])
    return scheduler.timesteps


def run_ours(name, karras, steps, strength, x0, start_noise, seed, eta=0.0):
    sampler = make_sampler(name, karras=karras, eta=eta)
    start = 0 if strength is None else steps - min(int(steps * strength), steps)
    sampler.set_steps(steps, start)
    if strength is None:
        x = start_noise * sampler.init_noise_sigma
    else:
        x = sampler.add_noise(x0, start_noise, start) if start < len(sampler.timesteps) else x0
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


@pytest.mark.parametrize("strength", [0.0, 0.05, 0.3, 0.75, 1.0])
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


@pytest.mark.parametrize("strength", [0.05, 0.1, 0.3, 0.6, 1.0])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_image_to_image_with_an_exact_denoiser_lands_on_the_image(name, strength):
    """Data that is one latent x0 has an exact noise prediction, (x_t - sqrt(a_t) x0) / sqrt(1 - a_t); with it every
    sampler must bring x0 noised to any start back to x0 (DDIM and PLMS stop at alpha_bar[0], keeping the noise that
    level holds). A multistep sampler whose history assumes steps it did not take misses by up to 0.4."""
    gen = torch.Generator().manual_seed(5)
    x0, start_noise = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)
    train = training_sigmas()

    def exact_eps(x: torch.Tensor, t) -> torch.Tensor:
        sigma = float(np.interp(float(t), np.arange(len(train)), train))  # the (fractional) timestep's noise level
        a = 1 / (1 + sigma**2)
        return (x - a**0.5 * x0) / (1 - a) ** 0.5

    sampler, steps = make_sampler(name), 20
    start = steps - int(steps * strength)
    sampler.set_steps(steps, start)
    x, generator = sampler.add_noise(x0, start_noise, start), torch.Generator().manual_seed(6)
    for i in range(start, len(sampler.timesteps)):
        x = sampler.step(exact_eps(sampler.scale_input(x, i), sampler.timesteps[i]), i, x, generator)
    a_end = alphas_cumprod()[0] if name in ("ddim", "plms") else torch.tensor(1.0)
    assert_close(x, a_end**0.5 * x0 + (1 - a_end) ** 0.5 * start_noise, f"{name} from strength {strength}", rtol=1e-5)
