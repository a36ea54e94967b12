"""Rectified flow (--prediction flow): the loss by hand, the logit-normal timestep density and the Euler sampler
against diffusers (compute_density_for_timestep_sampling, FlowMatchEulerDiscreteScheduler), the flag checks, and
a tiny run end to end (train -> checkpoint -> sample) that resumes bit-identically.

diffusers keeps its flow sigmas in float32 and steps in float32, so comparisons with it use float32 tolerances.
"""
import math
from dataclasses import replace

import pytest
import torch

from pixart_fast.checkpoints import load_safetensors, training_metadata
from pixart_fast.cli import UserError
from pixart_fast.diffusion import Diffusion, guided
from pixart_fast.sample import main as sample_main, sampler_for
from pixart_fast.train.loop import train
from pixart_fast.train.recipes import RECIPES
from test_train import assert_resume_is_bit_identical

FAST = dict(model="PixArt-pixel-tiny", batch_size=2, num_val=2, sample_steps=2, sample_every=0, kernels="torch",
            t5_train_steps=0, log_every=1, save_every=2, route_end=2)
FLOW = dict(prediction="flow", timestep_sampling="logit-normal", min_snr_gamma=0.0)


def tiny(out, **kw):
    return replace(RECIPES[2], **{**FAST, **FLOW, "out": str(out), **kw})


# ---------------------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_flow_loss_at_known_x0_noise_and_s_is_the_hand_computed_value(learn_sigma):
    # x0 = 0.5, noise = -1, s = 0.25: x_s = 0.75 * 0.5 + 0.25 * (-1) = 0.125; target v = noise - x0 = -1.5. The
    # model predicts 2 x_s = 0.25, so the loss is (0.25 + 1.5)^2 = 3.0625; its variance channels (1e3) are ignored.
    seen = {}

    def model_fn(x, t):
        seen.update(x=x.clone(), t=t.clone())
        return torch.cat([2 * x, torch.full_like(x, 1e3)], dim=1) if learn_sigma else 2 * x

    x0, noise = torch.full((2, 3, 4, 4), 0.5), torch.full((2, 3, 4, 4), -1.0)
    flow = Diffusion(prediction="flow", learn_sigma=learn_sigma)
    for t in (torch.tensor([250.0, 250.0]), torch.tensor([250, 250])):  # the model's scale: s * 1000, float or int
        terms = flow.training_losses(model_fn, x0, t, noise)
        torch.testing.assert_close(seen["x"], torch.full_like(x0, 0.125))
        assert seen["t"].tolist() == [250, 250]
        torch.testing.assert_close(terms["loss"], torch.tensor([3.0625, 3.0625]))
        torch.testing.assert_close(terms["mse"], terms["loss"])
        assert terms["vb"].tolist() == [0.0, 0.0]


def test_flow_loss_is_zero_for_the_true_velocity_and_the_variance_gets_no_gradient():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    var = torch.zeros(3, 2, 4, 4, requires_grad=True)
    out = (noise - x0).requires_grad_()
    terms = Diffusion(prediction="flow").training_losses(lambda x, t: torch.cat([out, var], 1), x0,
                                                         torch.tensor([0.0, 500.0, 999.0]), noise)
    assert terms["loss"].abs().max() < 1e-12
    terms["loss"].sum().backward()
    assert var.grad is None or not var.grad.any()


def test_flow_refuses_min_snr_weighting():
    with pytest.raises(ValueError, match="min-SNR"):
        Diffusion(prediction="flow", min_snr_gamma=5.0)


# ---------------------------------------------------------------------------------------------------------
# Timestep sampling
# ---------------------------------------------------------------------------------------------------------


def test_eps_and_v_timesteps_are_the_integer_draw_they_always_were():
    ours = Diffusion(prediction="v").draw_timesteps(64, torch.Generator().manual_seed(3), "cpu")
    assert torch.equal(ours, torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("mean, std", [(0.0, 1.0), (0.5, 0.7), (-1.0, 1.5)])
def test_logit_normal_timesteps_match_diffusers(mean, std):
    training_utils = pytest.importorskip("diffusers.training_utils", reason="diffusers not installed")
    flow = Diffusion(prediction="flow", timestep_sampling="logit-normal", logit_mean=mean, logit_std=std)
    n = 200_000
    t = flow.draw_timesteps(n, torch.Generator().manual_seed(1), "cpu")
    u = training_utils.compute_density_for_timestep_sampling(
        weighting_scheme="logit_normal", batch_size=n, logit_mean=mean, logit_std=std,
        generator=torch.Generator().manual_seed(1))
    # the same generator state draws the same noise levels: t is s on the model's scale, s * 1000
    torch.testing.assert_close(t / 1000, u)
    # and the density is the logit-normal one: Kolmogorov-Smirnov distance to its CDF Phi((logit s - m) / std)
    s = (t / 1000).double().sort().values
    cdf = torch.special.ndtr((torch.logit(s) - mean) / std)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    ks = torch.maximum(i / n - cdf, cdf - (i - 1) / n).max().item()
    assert ks < 1.63 / math.sqrt(n)  # the 1 % critical value
    # each step's draw is a pure function of the generator's seed
    assert torch.equal(t, flow.draw_timesteps(n, torch.Generator().manual_seed(1), "cpu"))


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_logit_normal_integer_timesteps_are_the_flow_draw_floored(prediction):
    n, mean, std = 50_000, 0.0, 1.0  # SD3
    flow = Diffusion(prediction="flow", timestep_sampling="logit-normal", logit_mean=mean, logit_std=std)
    discrete = Diffusion(prediction=prediction, timestep_sampling="logit-normal", logit_mean=mean, logit_std=std)
    s = flow.draw_timesteps(n, torch.Generator().manual_seed(2), "cpu")
    t = discrete.draw_timesteps(n, torch.Generator().manual_seed(2), "cpu")
    assert t.dtype == torch.int64 and 0 <= t.min() and t.max() <= 999
    assert torch.equal(t, s.floor().long().clamp(max=999))
    # the middle is drawn more often than under the uniform draw, the ends less
    middle = ((t >= 300) & (t < 700)).float().mean().item()
    assert middle > 0.4 + 0.05 and (t < 100).float().mean().item() < 0.1 - 0.03


def test_uniform_flow_timesteps_are_floats_in_0_1000():
    t = Diffusion(prediction="flow").draw_timesteps(10_000, torch.Generator().manual_seed(0), "cpu")
    assert t.dtype == torch.float32 and 0 <= t.min() and t.max() < 1000 and abs(t.mean().item() - 500) < 10


# ---------------------------------------------------------------------------------------------------------
# The Euler sampler
# ---------------------------------------------------------------------------------------------------------


def gaussian_data_velocity(mu, std):
    """The exact velocity E[noise - x0 | x_s] for data x0 ~ N(mu, std^2) per channel, at t = s * 1000: a toy
    model that depends on s, so a sampler visiting the wrong noise levels gives other samples. Returns
    v_fn(x, t) -> (B, 2C, H, W): v, then C channels of junk the sampler must ignore."""

    def v_fn(x, t):
        s = (t.double() / 1000).view(-1, 1, 1, 1)
        m, var = mu.double().view(1, -1, 1, 1), std.double().view(1, -1, 1, 1) ** 2
        r = (x.double() - (1 - s) * m) / ((1 - s) ** 2 * var + s**2)
        v = s * r - (m + (1 - s) * var * r)
        return torch.cat([v, torch.full_like(v, 1e3)], dim=1).to(x.dtype)

    return v_fn


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 2, 7, 20, 50])
def test_flow_sigmas_match_flow_match_euler_scheduler(steps, shift):
    diffusers = pytest.importorskip("diffusers", reason="diffusers not installed")
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(steps)
    sigmas = Diffusion(prediction="flow").flow_sigmas(steps, shift)
    torch.testing.assert_close(torch.tensor(sigmas, dtype=torch.float64), scheduler.sigmas.double())
    torch.testing.assert_close(torch.tensor(sigmas[:-1], dtype=torch.float64) * 1000,
                               scheduler.timesteps.double())
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0 and sigmas == sorted(sigmas, reverse=True)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 5, 20])
def test_flow_euler_matches_flow_match_euler_scheduler(steps, shift):
    diffusers = pytest.importorskip("diffusers", reason="diffusers not installed")
    v_fn = gaussian_data_velocity(torch.tensor([0.3, -0.5, 0.0]), torch.tensor([0.5, 0.2, 1.0]))
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    ours = Diffusion(prediction="flow").flow_euler(v_fn, noise, steps=steps, shift=shift)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(steps)
    x = noise
    for t in scheduler.timesteps:
        x = scheduler.step(v_fn(x, t.expand(x.shape[0]))[:, :3], t, x).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)
    assert ours.dtype == noise.dtype


def test_flow_euler_clip_is_the_plain_step_while_x0_stays_in_range_and_bounds_the_sample():
    v_fn = gaussian_data_velocity(torch.tensor([0.1, -0.1]), torch.tensor([0.1, 0.1]))  # x0 predictions near 0
    noise = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    flow = Diffusion(prediction="flow")
    torch.testing.assert_close(flow.flow_euler(v_fn, noise, 10, clip_x0=True), flow.flow_euler(v_fn, noise, 10))
    wide = gaussian_data_velocity(torch.tensor([3.0, -3.0]), torch.tensor([2.0, 2.0]))
    assert flow.flow_euler(wide, noise, 10, clip_x0=True).abs().max() <= 1.0
    assert flow.flow_euler(wide, noise, 10).abs().max() > 1.0


def test_flow_euler_with_guidance_steps_on_the_guided_velocity():
    # cond velocity 1, uncond 0 everywhere: guided v = scale; Euler from s = 1 to 0 moves x by -scale
    def model_fn(x2, t2):
        B = x2.shape[0] // 2
        return torch.cat([torch.ones_like(x2[:B]), torch.zeros_like(x2[B:])]).repeat(1, 2, 1, 1)

    noise = torch.zeros(2, 3, 4, 4)
    x = Diffusion(prediction="flow").sample(guided(model_fn, scale=4.5), noise, steps=3)
    torch.testing.assert_close(x, torch.full_like(noise, -4.5))


def test_samplers_refuse_the_other_predictions():
    with pytest.raises(ValueError, match="flow_euler"):
        Diffusion(prediction="flow").dpm_solver(lambda x, t: x, torch.zeros(1, 3, 2, 2), steps=2)
    with pytest.raises(ValueError, match="euler"):
        Diffusion(prediction="flow").sample(lambda x, t: x, torch.zeros(1, 3, 2, 2), steps=2, sampler="ddim")
    with pytest.raises(ValueError, match="does not sample"):
        Diffusion(prediction="eps").sample(lambda x, t: x, torch.zeros(1, 3, 2, 2), steps=2, sampler="euler")
    assert sampler_for("flow", None) == "euler" and sampler_for("v", None) == "dpm" and sampler_for("eps", "ddim")
    for prediction, sampler, shift in (("flow", "dpm", None), ("flow", "ddim", None), ("eps", "euler", None),
                                       ("v", None, 3.0), ("flow", None, 0.0)):
        with pytest.raises(UserError):
            sampler_for(prediction, sampler, shift)


# ---------------------------------------------------------------------------------------------------------
# The recipe option, end to end
# ---------------------------------------------------------------------------------------------------------


def test_flow_flags_are_checked():
    for kw, text in ((dict(min_snr_gamma=5.0), "--min-snr-gamma"), (dict(logit_std=0.0), "--logit-std"), (dict(timestep_sampling="cosine"), "--timestep-sampling"),
                     (dict(logit_mean=math.nan), "--logit-mean")):
        with pytest.raises(UserError, match=text):
            tiny("x", **kw)


def test_flow_trains_checkpoints_and_samples_with_the_flow_sampler(tmp_path, monkeypatch):
    calls = []
    euler = Diffusion.flow_euler
    monkeypatch.setattr(Diffusion, "flow_euler", lambda self, *a, **k: calls.append(k["steps"]) or euler(self, *a, **k))
    summary = train(tiny(tmp_path, steps=4), progress=False)
    assert calls == [2] and 0.0 <= summary["ema_alignment_accuracy"] <= 1.0  # validation: the flow sampler
    ckpt = tmp_path / "stage2/checkpoints/step-0000004"
    assert training_metadata(ckpt / "ema.safetensors")["prediction"] == "flow"
    out = tmp_path / "flow.png"
    assert sample_main(["--ckpt", str(ckpt / "ema.safetensors"), "--prompt", "a red circle", "--out", str(out),
                        "--steps", "2", "--shift", "3"]) == 0
    assert out.exists() and calls == [2, 2]
    with pytest.raises(UserError, match="--sampler dpm"):
        sample_main(["--ckpt", str(ckpt / "ema.safetensors"), "--prompt", "x", "--out", str(out), "--sampler", "dpm"])


def test_flow_resume_is_bit_identical(tmp_path):
    assert_resume_is_bit_identical(tiny(tmp_path), tmp_path)


def test_flow_lora_run_trains_and_samples_as_flow(tmp_path):
    train(tiny(tmp_path / "base", steps=2), progress=False)
    base = tmp_path / "base/stage2/checkpoints/step-0000002/ema.safetensors"
    summary = train(tiny(tmp_path / "lora", steps=2, init=str(base), lora_rank=4), progress=False)
    assert summary["skipped_steps"] == 0
    ema = tmp_path / "lora/stage2/checkpoints/step-0000002/ema.safetensors"
    assert training_metadata(ema)["prediction"] == "flow" and training_metadata(ema)["lora_rank"] == 4
    assert sample_main(["--ckpt", str(ema), "--prompt", "a red circle", "--out", str(tmp_path / "s.png"),
                        "--steps", "2"]) == 0


def test_the_model_compiles_to_one_graph_with_flow_timesteps():
    from pixart_fast.model import CONFIGS, PixArt

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = PixArt(CONFIGS["PixArt-tiny"], kernels="torch").eval()
    c = model.config
    x = torch.randn(2, c.in_channels, c.input_size, c.input_size)
    y, mask = torch.randn(2, c.max_tokens, c.caption_channels), torch.rand(2, c.max_tokens) < 0.7
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(x, torch.tensor([3.25, 731.5]), y, mask)  # float s * 1000
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def _torchrun(out, *flags):
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = {**FAST, **FLOW, "batch_size": 4, "steps": 3}
    args = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
           "--master-addr=127.0.0.1", f"--master-port={port}", "-m", "pixart_fast.train", "--stage=2", *args,
           f"--out={out}", *flags]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_flow_under_torchrun_equals_one_process(fsdp, tmp_path):
    train(tiny(tmp_path / "one", batch_size=4, steps=3), progress=False)
    _torchrun(tmp_path / "two", *(["--fsdp=true"] if fsdp else []))
    for name in ("model", "ema"):
        a = load_safetensors(tmp_path / "one/stage2/checkpoints/step-0000003" / f"{name}.safetensors")
        b = load_safetensors(tmp_path / "two/stage2/checkpoints/step-0000003" / f"{name}.safetensors")
        assert a.keys() == b.keys()
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6, name


def test_exporting_a_flow_checkpoint_says_which_scheduler_samples_it(tmp_path, capsys):
    from pixart_fast.export import main as export_main

    train(tiny(tmp_path, steps=1), progress=False)
    capsys.readouterr()
    assert export_main(["--ckpt", str(tmp_path / "stage2/checkpoints/step-0000001"), "--out", str(tmp_path / "hf")]) == 0
    assert "FlowMatchEulerDiscreteScheduler" in capsys.readouterr().out
    assert (tmp_path / "hf/config.json").exists()
