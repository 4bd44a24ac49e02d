"""The training loop on tiny networks: the loss falls, a resumed run is the uninterrupted run, fine-tuning on a folder
of captioned images works, and the autoencoder's latent rescaling leaves what it computes unchanged."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image
from safetensors import safe_open

from sd.autoencoder import VAEConfig
from sd.files import new_file_mode
from sd.model_loader import load_models
from sd.train import EMA, TINY_CONFIGS, LatentPool, Settings, ShapesData, Trainer, fresh_models, main, normalise_latents
from sd.train.cli import export

ROOT = Path(__file__).parents[1]
LATENT_SCALE = VAEConfig().scaling_factor


def tiny_shapes_run(run: Path, *options: str) -> list[str]:
    """The command line of a run of the tiny configs on the shapes data, in folder run."""
    return ["--data", "shapes", "--configs", "tiny", "--run", str(run), *options]


def losses(run: Path, stage: str) -> list[float]:
    return [float(line.split(",")[2]) for line in (run / "loss.log").read_text().splitlines() if line.startswith(stage)]


@pytest.mark.parametrize(
    "options",
    [[], ["--mixed-precision"], ["--mixed-precision", "--latent-pool", "64"]],
    ids=["fp32", "bf16", "bf16, latent pool"],
)
def test_both_stages_lower_their_loss(tmp_path, options):
    lengths = ["--vae-steps", "60", "--steps", "40", "--vae-batch-size", "8", "--batch-size", "8", "--save-every", "20"]
    assert main(tiny_shapes_run(tmp_path, *lengths, *options)) == 0
    for stage, steps in (("vae", 60), ("diffusion", 40)):
        values = losses(tmp_path, stage)
        assert len(values) == steps
        # a batch's loss varies by ~10%: compare means, and ask for a fall well beyond that noise
        first, last = np.mean(values[:10]), np.mean(values[-20:])
        assert last < 0.9 * first, f"{stage} loss went from {first:.3f} (first 10 steps) to {last:.3f} (last 20)"


@pytest.mark.parametrize("stage", ["vae", "diffusion"])
def test_mixed_precision_on_cpu_computes_in_bf16_near_fp32(tmp_path, stage):
    def first_losses(mixed: bool) -> list[float]:
        run = tmp_path / str(mixed)
        run.mkdir()
        settings = Settings(stage=stage, steps=3, batch_size=4, train_text_encoder=True, mixed_precision=mixed)
        cpu = torch.device("cpu")
        trainer = Trainer(fresh_models(TINY_CONFIGS, cpu), settings, ShapesData(), run, cpu)
        assert trainer.autocast == (torch.bfloat16 if mixed else None)
        with open(run / "loss.log", "w") as log:
            trainer.train(log)
        return losses(run, stage)

    exact, mixed = first_losses(False), first_losses(True)
    assert exact != mixed, "the same losses with and without --mixed-precision: autocast did not take effect"
    worst = max(abs(a - b) / a for a, b in zip(exact, mixed))
    assert worst < 0.05, f"bf16 losses {mixed} are {worst:.1%} away from fp32's {exact}"


def test_shapes_batches_are_contiguous():
    images, _, sources = ShapesData(recolour=1.0).batch(np.random.default_rng(0), 2)
    assert images.is_contiguous() and sources.is_contiguous(), "channels-last batches make bf16 training 2x slower"


class Interrupted(Exception):
    pass


class InterruptedLog:
    """A loss log whose run is killed as it finishes step `after` + 1, before that step is logged."""

    def __init__(self, file, after: int):
        self.file, self.after = file, after

    def write(self, line: str) -> None:
        if int(line.split(",")[1]) > self.after:
            raise Interrupted
        self.file.write(line)

    def flush(self) -> None:
        self.file.flush()


def train(run: Path, latent_pool: int, resume: bool = False, killed_after: int | None = None) -> Trainer:
    run.mkdir(exist_ok=True)
    models = fresh_models(TINY_CONFIGS, torch.device("cpu"))
    settings = Settings(
        stage="diffusion",
        steps=10,
        batch_size=4,
        lr=1e-3,
        save_every=5,
        train_text_encoder=True,
        seed=7,
        latent_pool=latent_pool,
    )
    trainer = Trainer(models, settings, ShapesData(recolour=0.5), run, torch.device("cpu"))
    if resume:
        trainer.resume()
    with open(run / "loss.log", "a") as log:
        trainer.train(log if killed_after is None else InterruptedLog(log, killed_after))
    return trainer


@pytest.mark.parametrize("latent_pool", [0, 12], ids=["encoding every batch", "latent pool"])
def test_a_resumed_run_continues_from_its_saved_step_and_ends_where_an_uninterrupted_one_does(tmp_path, latent_pool):
    straight = train(tmp_path / "straight", latent_pool)
    with pytest.raises(Interrupted):
        train(tmp_path / "interrupted", latent_pool, killed_after=7)  # saved at step 5
    resumed = train(tmp_path / "interrupted", latent_pool, resume=True)
    assert resumed.step == 10
    logged = losses(tmp_path / "interrupted", "diffusion")
    assert len(logged) == 10, f"{len(logged)} losses logged for 10 steps: steps 6-7 were trained twice"
    assert logged == losses(tmp_path / "straight", "diffusion"), "the resumed run's losses differ"
    for name in ("diffusion", "clip"):
        for (key, a), b in zip(
            straight.trained[name].state_dict().items(), resumed.trained[name].state_dict().values()
        ):
            assert torch.equal(a, b), f"{name}.{key} differs after resuming"
        for a, b in zip(straight.ema.shadow[name].parameters(), resumed.ema.shadow[name].parameters()):
            assert torch.equal(a, b), f"{name}'s EMA differs after resuming"


@torch.no_grad()
def test_a_latent_pool_holds_the_autoencoders_posteriors_of_the_samples_it_drew():
    data = ShapesData(recolour=0.5)
    cpu = torch.device("cpu")
    trainer = Trainer(fresh_models(TINY_CONFIGS, cpu), Settings(), data, Path("unused"), cpu)
    pool = LatentPool(data, trainer.diffusion_batch, 10, np.random.default_rng(0), chunk=4)
    rng = np.random.default_rng(0)
    drawn = [data.batch(rng, n) for n in (4, 4, 2)]  # the pool's chunks
    images, sources = (torch.cat([batch[i] for batch in drawn]) for i in (0, 2))
    assert pool.captions == [c for _, captions, _ in drawn for c in captions]
    torch.testing.assert_close(pool.moments, trainer.moments(images), rtol=0, atol=1e-5)
    torch.testing.assert_close(pool.sources, trainer.moments(sources), rtol=0, atol=1e-5)
    changed = (sources != images).flatten(1).any(dim=1)
    assert 0 < changed.sum() < 10 and torch.equal(pool.sources[~changed], pool.moments[~changed])
    moments, captions, batch_sources = pool.batch(np.random.default_rng(1), 6)
    picks = np.random.default_rng(1).integers(10, size=6)
    assert torch.equal(moments, pool.moments[picks]) and torch.equal(batch_sources, pool.sources[picks])
    assert captions == [pool.captions[i] for i in picks]


def test_the_resume_flag_of_the_command_picks_up_the_run(tmp_path, capsys):
    batches = ("--batch-size", "4", "--vae-batch-size", "4")
    args = tiny_shapes_run(tmp_path, "--vae-steps", "4", *batches, "--save-every", "2")
    assert main(args + ["--steps", "4"]) == 0
    assert main(args + ["--steps", "6", "--resume"]) == 0
    assert "resuming diffusion at step 4" in capsys.readouterr().out
    assert len(losses(tmp_path, "diffusion")) == 6


class StopTraining(Exception):
    pass


def record_settings(monkeypatch) -> list[Settings]:
    """Makes main() stop with StopTraining where it would build a Trainer; the returned list gets its Settings."""
    seen = []

    def recording_trainer(models, settings, *args):
        seen.append(settings)
        raise StopTraining

    monkeypatch.setattr("sd.train.cli.Trainer", recording_trainer)
    return seen


def test_caption_dropout_and_ema_decay_flags_reach_the_trainer_and_must_be_fractions(tmp_path, monkeypatch, capsys):
    seen = record_settings(monkeypatch)
    args = tiny_shapes_run(tmp_path, "--stage", "vae")
    with pytest.raises(StopTraining):
        main(args + ["--caption-dropout", "0.25", "--ema-decay", "0.99"])
    assert (seen[0].caption_dropout, seen[0].ema_decay) == (0.25, 0.99)
    with pytest.raises(SystemExit):
        main(args + ["--caption-dropout", "1.5"])
    assert "--caption-dropout: must be in [0, 1]; got 1.5" in capsys.readouterr().err


def test_the_ema_warmup_flag_reaches_only_the_diffusion_stage_and_must_be_at_least_one(tmp_path, monkeypatch, capsys):
    seen = record_settings(monkeypatch)
    monkeypatch.setattr("sd.train.cli.restore_vae", lambda *args: None)
    for stage in ("vae", "diffusion"):
        with pytest.raises(StopTraining):
            main(tiny_shapes_run(tmp_path, "--stage", stage, "--ema-warmup", "4"))
    assert [(s.stage, s.ema_warmup) for s in seen] == [("vae", 10.0), ("diffusion", 4.0)]
    with pytest.raises(SystemExit):
        main(tiny_shapes_run(tmp_path, "--ema-warmup", "0.5"))
    assert "--ema-warmup: must be at least 1; got 0.5" in capsys.readouterr().err


@pytest.mark.parametrize(
    "decay, warmup, step, expected",
    [
        (0.999, 10, 0, 0.1),
        (0.999, 10, 6400, 6401 / 6410),
        (0.9995, 10, 6400, 6401 / 6410),
        (0.999, 10, 9000, 0.999),
        (0.999, 4, 2000, 2001 / 2004),
        (0.999, 4, 3000, 0.999),
    ],
)
def test_the_ema_decay_is_the_warm_up_until_the_warm_up_passes_it(decay, warmup, step, expected):
    """The warm-up (1 + n) / (10 + n) reaches 0.999 only at step 8,990: shorter runs never use --ema-decay 0.999."""
    weight = {"net": torch.nn.Linear(1, 1, bias=False)}
    torch.nn.init.zeros_(weight["net"].weight)
    ema = EMA(weight, decay, warmup)
    torch.nn.init.ones_(weight["net"].weight)
    ema.update(weight, step)
    used = 1 - ema.shadow["net"].weight.item()
    assert used == pytest.approx(expected, abs=1e-6), f"decay {used:.6f} at step {step}, expected {expected:.6f}"


def test_with_every_caption_dropped_the_unet_sees_only_the_empty_prompt():
    cpu = torch.device("cpu")
    models = fresh_models(TINY_CONFIGS, cpu)
    tokenized = []
    tokenizer = models.tokenizer
    models.tokenizer = lambda captions: tokenized.append(list(captions)) or tokenizer(captions)
    trainer = Trainer(models, Settings(caption_dropout=1.0), ShapesData(), Path("unused"), cpu)
    images, captions, _ = ShapesData().batch(np.random.default_rng(0), 3)
    trainer.diffusion_loss(trainer.moments(images), captions)
    assert tokenized == [["", "", ""]], f"the UNet was conditioned on {tokenized}"


def test_min_snr_weights_are_diffusers_min_snr_gamma_over_snr_for_noise_prediction():
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    t = torch.arange(1000)
    snr = compute_snr(scheduler, t)
    models, data = fresh_models(TINY_CONFIGS, torch.device("cpu")), ShapesData()
    for gamma in (1.0, 5.0):
        trainer = Trainer(models, Settings(min_snr_gamma=gamma), data, Path("unused"), torch.device("cpu"))
        expected = torch.minimum(snr, torch.full_like(snr, gamma)) / snr  # diffusers' train_text_to_image.py
        torch.testing.assert_close(trainer.loss_weights(t), expected, rtol=1e-5, atol=0)
    plain = Trainer(models, Settings(), data, Path("unused"), torch.device("cpu"))
    assert torch.equal(plain.loss_weights(t), torch.ones(1000)), "without gamma every step weighs 1"


def test_recolouring_adds_sources_without_changing_the_images_or_captions_drawn():
    plain = ShapesData().batch(np.random.default_rng(3), 64)
    images, captions, sources = ShapesData(recolour=0.5).batch(np.random.default_rng(3), 64)
    assert plain[2] is None, "plain shapes data has no sources"
    assert torch.equal(images, plain[0]) and captions == plain[1], "recolouring changed the images or captions"
    differs = (sources != images).flatten(1).any(dim=1)
    assert 16 <= differs.sum() <= 48, f"{differs.sum()} of 64 sources re-coloured, asked for half"
    background = (images == images[:, :, :1, :1]).all(dim=1, keepdim=True).expand_as(images)
    assert torch.equal(sources[background], images[background]), "a re-coloured source changed the background"


@torch.no_grad()
def test_re_coloured_sources_are_noised_and_denoised_to_the_captioned_image():
    models = fresh_models(TINY_CONFIGS, torch.device("cpu"))
    trainer = Trainer(models, Settings(), ShapesData(), Path("unused"), torch.device("cpu"))
    images, _, sources = ShapesData(recolour=1.0).batch(np.random.default_rng(0), 5)
    sources[4] = images[4]  # a source that is its image: nothing to edit
    moments, _, source_moments = trainer.diffusion_batch(images, [""] * 5, sources)
    trainer.noise = lambda shape: torch.zeros(shape)  # latents at the posterior means
    z0 = trainer.sample_latents(moments)
    eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(0))
    a = torch.tensor([0.1, 0.1, 0.9, 0.3, 0.1])[:, None, None, None]  # sample 2: SNR 9, past editing
    captioned = torch.tensor([True, False, True, True, True])  # sample 1: caption dropped, nothing to edit toward
    z_t, target = trainer.edited(a.sqrt() * z0 + (1 - a).sqrt() * eps, eps, z0, moments, source_moments, a, captioned)
    denoised = (z_t - (1 - a).sqrt() * target) / a.sqrt()
    error = (denoised - z0).abs().amax().item()
    assert error < 1e-4, f"the targets denoise z_t to the captioned image's latent only to {error:.2e}"
    noised_from = (z_t - (1 - a).sqrt() * eps) / a.sqrt()
    from_source = torch.tensor([1, 0, 0, 1, 0]).bool()[:, None, None, None]
    expected = torch.where(from_source, trainer.sample_latents(trainer.moments(sources)), z0)
    error = (noised_from - expected).abs().amax().item()
    where = "where editing applies (and the image elsewhere)"
    assert error < 1e-4, f"z_t is not noised from the source {where}: {error:.2e}"


@torch.no_grad()
def test_rescaled_latents_have_sd_v1s_scale_and_decode_the_same(tmp_path):
    models = fresh_models(TINY_CONFIGS, torch.device("cpu"))
    images, _, _ = ShapesData().batch(np.random.default_rng(0), 8)
    before = models.decoder(models.encoder(images)[0])
    normalise_latents(models, ShapesData(), np.random.default_rng(1))
    mean, _ = models.encoder(images)
    assert abs((mean * LATENT_SCALE).std().item() - 1) < 0.3
    torch.testing.assert_close(models.decoder(mean), before, rtol=1e-4, atol=1e-4)


def test_fine_tuning_a_checkpoint_on_a_folder_of_captioned_images(tmp_path):
    checkpoint = tmp_path / "start.safetensors"
    assert (
        main(
            [
                "--data",
                "shapes",
                "--run",
                str(tmp_path / "scratch"),
                "--configs",
                "tiny",
                "--vae-steps",
                "2",
                "--steps",
                "2",
                "--batch-size",
                "2",
                "--vae-batch-size",
                "2",
                "--export",
                str(checkpoint),
            ]
        )
        == 0
    )
    data = tmp_path / "photos"
    data.mkdir()
    for i, color in enumerate(["red", "green", "blue"]):
        Image.new("RGB", (80, 60), color).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a plain {color} picture")
    out = tmp_path / "tuned.safetensors"
    assert (
        main(
            [
                "--data",
                str(data),
                "--init",
                str(checkpoint),
                "--run",
                str(tmp_path / "tune"),
                "--steps",
                "3",
                "--batch-size",
                "2",
                "--image-size",
                "64",
                "--export",
                str(out),
            ]
        )
        == 0
    )
    start, tuned = load_models(checkpoint), load_models(out)
    assert losses(tmp_path / "tune", "diffusion") and not losses(tmp_path / "tune", "vae")
    assert not torch.equal(start.diffusion.out[2].weight, tuned.diffusion.out[2].weight), "the UNet did not change"
    assert torch.equal(start.clip.final_layer_norm.weight, tuned.clip.final_layer_norm.weight), "CLIP stays frozen"
    with safe_open(out, framework="pt") as f:
        first, then = f.metadata()["command"].split(" && ")
    assert first.startswith("python -m sd.train --data shapes") and f"--export {checkpoint}" in first, (
        f"the tuned file's history does not start with the command that made its start: {first!r}"
    )
    assert then.startswith(f"python -m sd.train --data {data} --init {checkpoint}"), f"then {then!r}"
    mode = out.stat().st_mode & 0o777
    assert mode == new_file_mode(), f"exported file has mode {mode:o}, new files get {new_file_mode():o}"


def test_a_folder_without_captions_is_a_clear_error(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "lonely.png")
    with pytest.raises(ValueError, match="no images with captions"):
        main(["--data", str(tmp_path), "--init", "x.safetensors", "--run", str(tmp_path / "run")])


def test_the_autoencoder_stage_is_the_same_whatever_recolour_is(tmp_path):
    """Re-coloured sources are for the diffusion stage: stage 1 of a --recolour run is stage 1 of a plain one."""
    for recolour in ("0", "0.5"):
        options = ("--stage", "vae", "--vae-steps", "3", "--vae-batch-size", "4", "--recolour", recolour)
        assert main(tiny_shapes_run(tmp_path / recolour, *options)) == 0
    plain, recoloured = (load_models(tmp_path / r / "vae.safetensors") for r in ("0", "0.5"))
    for name in ("encoder", "decoder"):
        pairs = zip(getattr(plain, name).state_dict().items(), getattr(recoloured, name).state_dict().values())
        for (key, a), b in pairs:
            assert torch.equal(a, b), f"{name}.{key} differs by {(a - b).abs().max():.3g} with --recolour 0.5"


def test_recolouring_needs_shapes_data_and_a_fraction(tmp_path):
    with pytest.raises(ValueError, match="--recolour needs --data shapes"):
        main(["--data", str(tmp_path), "--init", "x.safetensors", "--run", str(tmp_path / "run"), "--recolour", "0.3"])
    with pytest.raises(ValueError, match=r"in \[0, 1\]; got 30"):
        ShapesData(recolour=30)


def test_train_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "sd.train", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and "--resume" in result.stdout and "--gradient-checkpointing" in result.stdout


def torchrun(argv: list[str], processes: int = 2) -> None:
    """`torchrun --nproc_per_node N -m sd.train ...` on the CPU (gloo)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    result = subprocess.run([*command, "-m", "sd.train", *argv], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, f"torchrun failed:\n{result.stderr[-3000:]}"


def trained_state(run: Path, stage: str) -> dict[str, torch.Tensor]:
    state = torch.load(run / f"{stage}.pt", weights_only=True)
    return {f"{net}.{key}": t for net, tensors in state["trained"].items() for key, t in tensors.items()}


KINDS = {  # what each kind of run trains, in Settings and on the command line
    "lora": ({"lora_rank": 4, "lora_targets": "all"}, ["--lora-rank", "4", "--lora-targets", "all", "--lr", "1e-2"]),
    "fine-tuning": ({"latent_pool": 16}, ["--latent-pool", "16", "--lr", "1e-3"]),
    "autoencoder": ({"stage": "vae"}, ["--stage", "vae"]),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_under_torchrun_two_processes_train_and_resume_as_one_does(tmp_path, kind):
    start = tmp_path / "start.safetensors"
    export(fresh_models(TINY_CONFIGS, torch.device("cpu")), start, "test", dtype=torch.float32)
    options = ["--configs", "tiny"] if kind == "autoencoder" else ["--init", str(start)]
    options += [*KINDS[kind][1], "--data", "shapes", "--recolour", "0.5", "--train-text-encoder", "--seed", "3"]
    options += ["--batch-size", "4", "--vae-batch-size", "4", "--save-every", "2"]
    stage = "vae" if kind == "autoencoder" else "diffusion"
    length = "--vae-steps" if kind == "autoencoder" else "--steps"
    for run, launch in ((tmp_path / "one", main), (tmp_path / "two", torchrun)):
        launch([*options, "--run-dir", str(run), length, "2"])
        launch([*options, "--run-dir", str(run), length, "4", "--resume", "--export", str(run / "out.safetensors")])
    one, two = losses(tmp_path / "one", stage), losses(tmp_path / "two", stage)
    assert len(two) == 4, f"{len(two)} lines in the 2-process loss log for 4 steps: one process writes it"
    # float32's rounding differs with the batch's split, and Adam's normalised steps carry it on: exactness is
    # checked in float64 below; here, that the command runs, resumes and stays with the single process
    assert np.allclose(one, two, rtol=2e-3), f"losses of 1 process {one} and 2 processes {two}"
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    if kind == "lora":
        from sd.lora import load_lora

        lora = load_lora(load_models(start), tmp_path / "two" / "out.safetensors")
        assert not lora.skipped and len(lora.layers) == len(trained_state(tmp_path / "two", stage)) // 2


def float64_run(rank: int, world: int, kind: str, run: Path, port: int) -> None:
    """One step of a `kind` run of the tiny models in float64, as process `rank` of `world`."""
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    cpu = torch.device("cpu")
    models = fresh_models(TINY_CONFIGS, cpu)
    for net in models.named().values():
        net.double()
    settings = Settings(steps=1, batch_size=4, seed=3, train_text_encoder=True, caption_dropout=0.5, **KINDS[kind][0])
    trainer = Trainer(models, settings, ShapesData(0.5 if settings.stage == "diffusion" else 0), run, cpu)
    with open(run / "loss.log", "a") if rank == 0 else open(os.devnull, "w") as log:
        trainer.train(log)
    if world > 1:
        dist.destroy_process_group()


def first_gradients(run: Path, stage: str) -> list[torch.Tensor]:
    """The gradients of a run's one step, as AdamW saw them (after the processes' averaging and the clipping): its
    first moment after one step is (1 - beta1) * gradient."""
    state = torch.load(run / f"{stage}.pt", weights_only=True)["optimizer"]
    beta1 = state["param_groups"][0]["betas"][0]
    return [s["exp_avg"] / (1 - beta1) for s in state["state"].values()]


@pytest.mark.parametrize("kind", list(KINDS))
def test_distributed_data_parallel_averages_the_shares_into_the_whole_batchs_gradient(tmp_path, kind):
    """In float64, where rounding is far below what is compared. (Over several steps, the runs part by more:
    AdamW divides each gradient by its own size, so a component near zero moves by up to lr * (its rounding
    error) / eps: ~1e-6 in float64, and ~1e-2 in float32; see the torchrun test above.)"""
    for run in ("one", "two"):
        (tmp_path / run).mkdir()
    float64_run(0, 1, kind, tmp_path / "one", 0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(float64_run, args=(2, kind, tmp_path / "two", port), nprocs=2)
    stage = "vae" if kind == "autoencoder" else "diffusion"
    one, two = losses(tmp_path / "one", stage), losses(tmp_path / "two", stage)
    assert one == two, f"the batch's loss: {one} in 1 process, {two} in 2"
    alone, shared = first_gradients(tmp_path / "one", stage), first_gradients(tmp_path / "two", stage)
    assert len(alone) == len(shared) and all(g.dtype == torch.float64 for g in alone)
    scale = max(g.abs().max().item() for g in alone)
    worst = max((a - b).abs().max().item() for a, b in zip(alone, shared))
    assert worst < 1e-9 * scale, f"2 processes' gradient differs from 1's by up to {worst:.2e} (largest {scale:.2e})"


def test_widening_a_unet_for_inpainting_leaves_what_it_computes_unchanged():
    from sd.train.cli import widen_for_inpainting

    models = fresh_models(TINY_CONFIGS, torch.device("cpu"))
    latents, context = torch.randn(2, 4, 8, 8), torch.randn(2, 77, models.clip.cfg.width)
    with torch.no_grad():
        torch.nn.init.normal_(models.diffusion.out[2].weight)  # a fresh UNet's output layer is zero: no test
        before = models.diffusion(latents, torch.tensor([10, 700]), context)
        widen_for_inpainting(models)
        extra = torch.randn(2, 5, 8, 8)
        after = models.diffusion(torch.cat([latents, extra], dim=1), torch.tensor([10, 700]), context)
    assert models.diffusion.cfg.in_channels == 9
    assert torch.equal(before, after), "the widened UNet computes something else"


def test_inpainting_fine_tuning_trains_the_new_inputs_of_a_nine_channel_unet(tmp_path):
    from sd.pipeline import generate
    from sd.shapes import random_scene, render

    start = tmp_path / "start.safetensors"
    export(fresh_models(TINY_CONFIGS, torch.device("cpu")), start, "test", dtype=torch.float32)
    out = tmp_path / "inpainting.safetensors"
    argv = ["--data", "shapes", "--init", str(start), "--inpainting", "--run-dir", str(tmp_path / "run")]
    assert main([*argv, "--steps", "3", "--batch-size", "2", "--lr", "1e-2", "--export", str(out)]) == 0
    tuned = load_models(out)
    assert tuned.diffusion.cfg.in_channels == 9
    assert tuned.diffusion.input_blocks[0][0].weight[:, 4:].abs().max() > 0, "the mask's inputs learned nothing"
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (32, 0, 64, 64))
    source = render(random_scene(np.random.default_rng(0)))
    out = generate("a red circle", tuned, init_image=source, mask=mask, steps=2, progress=False)
    assert out.images[0].size == (64, 64)


def test_inpainting_batches_hold_masks_and_say_what_is_under_them():
    from sd.train.data import InpaintingShapes

    images, captions, masks = InpaintingShapes().batch(np.random.default_rng(3), 16)
    assert images.shape == (16, 3, 64, 64) and masks.shape == (16, 1, 64, 64) and len(captions) == 16
    assert set(masks.unique().tolist()) <= {0.0, 1.0} and (masks.flatten(1).sum(1) > 0).all()
    whole = InpaintingShapes().batch(np.random.default_rng(3), 16)
    half = InpaintingShapes().batch(np.random.default_rng(3), 16, slice(8, 16))
    assert torch.equal(half[0], whole[0][8:]) and half[1] == whole[1][8:] and torch.equal(half[2], whole[2][8:])
