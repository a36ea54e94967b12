"""pixart_fast.diffusion against references we did not write: diffusers' schedulers for the schedule and the
samplers, torch.distributions for the Gaussian KL and the discretized decoder likelihood.

diffusers keeps its schedule in float32 (betas, alphas_cumprod, sigmas) and steps in float32, so comparisons
with it use float32-level tolerances; everything compared with torch.distributions runs in float64.
"""
import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from pixart_fast.diffusion import Diffusion, discretized_gaussian_nll, guided, normal_kl

SCHEDULE = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")


def ref_alphas_cumprod():
    """The linear schedule from its definition (DDPM section 4), float64."""
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)


def gaussian_data_eps(mu, std):
    """The exact eps predictor E[eps | x_t] for data x0 ~ N(mu, std^2) per channel: a deterministic toy model
    that depends on t through alphas_cumprod, so a sampler visiting the wrong timesteps gives other samples.
    Returns eps_fn(x, t) -> (B, 2C, H, W): eps, then C channels of junk that samplers must ignore."""
    abar_table = ref_alphas_cumprod()

    def eps_fn(x, t):
        abar = abar_table[t].to(x.dtype).view(-1, 1, 1, 1)
        m, s = mu.to(x.dtype), std.to(x.dtype)
        eps = (1 - abar).sqrt() * (x - abar.sqrt() * m) / (abar * s**2 + 1 - abar)
        return torch.cat([eps, torch.full_like(x, 1e3)], dim=1)

    return eps_fn


def test_schedule_and_q_sample_match_ddpm_scheduler():
    diffusers = pytest.importorskip("diffusers", reason="diffusers not installed")
    ours, theirs = Diffusion(), diffusers.DDPMScheduler(**SCHEDULE)
    # diffusers' float32 cumprod of 1000 factors is off by a few float32 ulps (3.6e-7 relative measured).
    torch.testing.assert_close(ours.betas, theirs.betas.double(), rtol=1e-6, atol=0)
    torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod.double(), rtol=1e-6, atol=0)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    torch.testing.assert_close(ours.q_sample(x0, t, noise), theirs.add_noise(x0, noise, t))


@pytest.mark.parametrize("steps", [1, 7, 20, 50, 1000])
def test_timesteps_are_diffusers_trailing_spacing(steps):
    diffusers = pytest.importorskip("diffusers", reason="diffusers not installed")
    ts = Diffusion().timesteps(steps)
    for scheduler in (diffusers.DDIMScheduler, diffusers.DPMSolverMultistepScheduler):
        s = scheduler(**SCHEDULE, timestep_spacing="trailing")
        s.set_timesteps(steps)
        assert ts == s.timesteps.tolist(), scheduler.__name__
    assert ts[0] == 999 and len(set(ts)) == steps and ts == sorted(ts, reverse=True)


def test_timesteps_rejects_bad_steps():
    for steps in (0, 1001):
        with pytest.raises(ValueError, match=str(steps)):
            Diffusion().timesteps(steps)


def test_timesteps_from_a_start_keep_the_spacing_over_0_to_start():
    d = Diffusion()
    assert d.timesteps(20, start=999) == d.timesteps(20)
    assert d.timesteps(5, start=99) == [99, 79, 59, 39, 19]
    assert d.timesteps(1, start=0) == [0]
    for start, steps, message in ((1000, 5, "start"), (-1, 1, "start"), (9, 11, r"\[1, 10\]")):
        with pytest.raises(ValueError, match=message):
            d.timesteps(steps, start=start)


@pytest.mark.parametrize("prediction,sampler", [("eps", "ddim"), ("eps", "dpm"), ("v", "dpm"), ("flow", "euler")])
@pytest.mark.parametrize("start", [300, 37])
def test_a_chain_from_start_gives_back_the_image_a_perfect_model_denoises(prediction, sampler, start):
    """From x0 noised to `start`, a model that returns the exact target for that x0 samples back to x0, visiting
    `start` first."""
    d = Diffusion(prediction=prediction)
    g = torch.Generator().manual_seed(start)
    x0, noise = torch.rand(2, 3, 4, 4, generator=g) * 1.6 - 0.8, torch.randn(2, 3, 4, 4, generator=g)
    x = d.noised(x0, torch.full((2,), start), noise)

    seen = []

    def oracle(x_t, t):  # the target of this prediction for the one clean image x0
        seen.append(t[0].item())
        if prediction == "flow":
            s = (t.float() / d.num_timesteps).view(-1, 1, 1, 1)
            return (x_t - x0) / s  # v = eps - x0 with eps = (x_t - (1 - s) x0) / s
        abar = d.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        eps = (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()
        return eps if prediction == "eps" else abar.sqrt() * eps - (1 - abar).sqrt() * x0

    out = d.sample(oracle, x, steps=7, sampler=sampler, start=start)
    torch.testing.assert_close(out, x0, rtol=1e-4, atol=1e-4)
    assert seen[0] == pytest.approx(start) and len(seen) == 7
    if prediction != "flow":
        assert seen == d.timesteps(7, start=start)


def run_diffusers(scheduler, eps_fn, noise, **step_kwargs):
    x = noise.clone()
    for t in scheduler.timesteps:
        eps = eps_fn(x, t.repeat(len(x)))[:, : x.shape[1]]  # diffusers would read 2C channels as learned variance
        x = scheduler.step(eps, t, x, **step_kwargs).prev_sample
    return x


# DDIM: diffusers steps from t to t - 1000 // steps, which is the next visited timestep only when steps divides
# 1000 (ours always steps to the next visited one), so DDIM is compared at such step counts.
@pytest.mark.parametrize("steps", [20, 10, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("clip", [False, True])
def test_ddim_matches_diffusers(steps, dtype, clip):
    diffusers = pytest.importorskip("diffusers", reason="diffusers not installed")
    g = torch.Generator().manual_seed(steps)
    mean = torch.randn(1, 3, 1, 1, generator=g) + clip  # with clip, data beyond [-1, 1] so clipping acts
    eps_fn = gaussian_data_eps(mean, torch.rand(1, 3, 1, 1, generator=g) + 0.3)
    noise = torch.randn(2, 3, 4, 4, generator=g).to(dtype)
    ours = Diffusion().ddim(eps_fn, noise, steps=steps, clip_x0=clip)
    if clip:  # the toy data reach beyond [-1, 1], so clipping changes the result
        assert not torch.allclose(ours, Diffusion().ddim(eps_fn, noise, steps=steps))
    # clip_sample: clamp x0 to [-1, 1] and re-derive eps; set_alpha_to_one: the last step lands on abar = 1.
    s = diffusers.DDIMScheduler(**SCHEDULE, timestep_spacing="trailing", clip_sample=clip, set_alpha_to_one=True)
    s.set_timesteps(steps)
    theirs = run_diffusers(s, eps_fn, noise, eta=0.0, use_clipped_model_output=clip)
    assert ours.dtype == dtype
    # diffusers' float32 schedule bounds the agreement (about 1e-6 measured on samples of size ~4).
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps", [20, 7, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("clip", [False, True])
def test_dpm_solver_matches_diffusers(steps, dtype, clip):
    diffusers = pytest.importorskip("diffusers", reason="diffusers not installed")
    g = torch.Generator().manual_seed(steps)
    mean = torch.randn(1, 3, 1, 1, generator=g) + clip
    eps_fn = gaussian_data_eps(mean, torch.rand(1, 3, 1, 1, generator=g) + 0.3)
    noise = torch.randn(2, 3, 4, 4, generator=g).to(dtype)
    ours = Diffusion().dpm_solver(eps_fn, noise, steps=steps, clip_x0=clip)
    if clip:
        assert not torch.allclose(ours, Diffusion().dpm_solver(eps_fn, noise, steps=steps))
    # Defaults otherwise: midpoint solver, lower_order_final, final_sigmas_type="zero" (last step to sigma = 0).
    # Thresholding with sample_max_value 1 clamps the threshold s to exactly 1: a plain clip to [-1, 1].
    s = diffusers.DPMSolverMultistepScheduler(
        **SCHEDULE, algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="trailing",
        thresholding=clip, sample_max_value=1.0,
    )
    s.set_timesteps(steps)
    theirs = run_diffusers(s, eps_fn, noise)
    assert ours.dtype == dtype
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_guided_is_uncond_plus_scale_times_difference():
    """A toy model whose caption is the sign of the batch half: +1 conditional, -1 unconditional."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 3, generator=g)

    def model(x, t, y):  # (B, 3, H, W) -> (B, 6, H, W), depends on x, t and the caption y (B,)
        return torch.einsum("oc,bchw->bohw", w, x) * (1 + y.view(-1, 1, 1, 1)) + t.view(-1, 1, 1, 1) / 1000

    x, t = torch.randn(2, 3, 4, 4, generator=g), torch.tensor([10, 500])
    eps_fn = guided(lambda x2, t2: model(x2, t2, torch.tensor([1.0, 1.0, -1.0, -1.0])), scale=4.5)
    cond, uncond = model(x, t, torch.ones(2)), model(x, t, -torch.ones(2))
    out = eps_fn(x, t)
    torch.testing.assert_close(out[:, :3], uncond[:, :3] + 4.5 * (cond[:, :3] - uncond[:, :3]))
    torch.testing.assert_close(out[:, 3:], cond[:, 3:])


def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2, lv1, lv2 = (torch.randn(1000, generator=g, dtype=torch.float64) * 2 for _ in range(4))
    ref = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), ref, rtol=1e-12, atol=1e-12)


def ref_decoder_nll(x, mean, std):
    """-log P(bin of x) under Normal(mean, std): bins of width 2/255 around the 256 levels of [-1, 1], the edge
    bins open to -inf / +inf."""
    lo = torch.where(x == -1, -math.inf, x - 1 / 255)
    hi = torch.where(x == 1, math.inf, x + 1 / 255)
    normal = Normal(mean, std)
    return -torch.log(normal.cdf(hi) - normal.cdf(lo))


def test_discretized_gaussian_nll_matches_normal_cdf():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2000,), generator=g).double() / 127.5 - 1
    x[:5], x[5:10] = -1.0, 1.0  # both open-ended edge bins
    std = torch.empty(2000, dtype=torch.float64).uniform_(0.005, 0.05, generator=g)
    # Means within 3 std of x: probabilities stay above the 1e-12 clamp (improved DDPM's) that the reference lacks.
    mean = x + 3 * std * (torch.rand(2000, generator=g, dtype=torch.float64) * 2 - 1)
    got = discretized_gaussian_nll(x, mean, std.log())
    torch.testing.assert_close(got, ref_decoder_nll(x, mean, std), rtol=1e-9, atol=1e-12)


def ref_posterior(x0, x_t, t):
    """Mean and variance of q(x_{t-1} | x_t, x0) at integer t (DDPM eq. 7), float64; abar before step 0 is 1."""
    beta = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)[t]
    abar = ref_alphas_cumprod()[t]
    abar_prev = ref_alphas_cumprod()[t - 1] if t > 0 else torch.tensor(1.0, dtype=torch.float64)
    mean = (abar_prev.sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - abar_prev) * x_t) / (1 - abar)
    return mean, beta * (1 - abar_prev) / (1 - abar)


def test_vb_matches_posterior_kl_and_decoder_nll():
    """vb rebuilt per sample from DDPM's equations with torch.distributions: the model's mean is the posterior
    mean at the predicted x0, its variance the learned-range interpolation (improved DDPM eq. 15)."""
    g = torch.Generator().manual_seed(0)
    B, C = 6, 3
    x0 = torch.randint(0, 256, (B, C, 4, 4), generator=g).double() / 127.5 - 1  # 8-bit data for the decoder
    noise = torch.randn(B, C, 4, 4, generator=g, dtype=torch.float64)
    eps = noise + 0.3 * torch.randn(B, C, 4, 4, generator=g, dtype=torch.float64)
    v = torch.rand(B, C, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    t = torch.tensor([0, 0, 1, 17, 500, 999])
    losses = Diffusion().training_losses(lambda x_t, t_: torch.cat([eps, v], dim=1), x0, t, noise)

    bits = []
    for i, ti in enumerate(t.tolist()):
        abar, beta = ref_alphas_cumprod()[ti], torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)[ti]
        x_t = abar.sqrt() * x0[i] + (1 - abar).sqrt() * noise[i]
        x0_pred = (x_t - (1 - abar).sqrt() * eps[i]) / abar.sqrt()
        true_mean, true_var = ref_posterior(x0[i], x_t, ti)
        model_mean = ref_posterior(x0_pred, x_t, ti)[0]
        # Learned range between beta_t and the posterior variance, which is 0 at t = 0: t = 1's is used there.
        lower = ref_posterior(x0[i], x_t, max(ti, 1))[1]
        frac = (v[i] + 1) / 2
        model_std = torch.exp(0.5 * (frac * beta.log() + (1 - frac) * lower.log()))
        if ti == 0:
            nats = ref_decoder_nll(x0[i], model_mean, model_std)
        else:
            nats = kl_divergence(Normal(true_mean, true_var.sqrt()), Normal(model_mean, model_std))
        bits.append(nats.mean() / math.log(2))
    torch.testing.assert_close(losses["vb"], torch.stack(bits), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(losses["mse"], ((eps - noise) ** 2).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])


def test_vb_trains_only_the_variance_and_mse_only_eps():
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(4, 3, 4, 4, generator=g)
    t = torch.tensor([0, 3, 400, 999])  # the decoder NLL (t = 0) and the KL branches
    diffusion = Diffusion()
    for term, trained, frozen in (("vb", slice(3, 6), slice(0, 3)), ("mse", slice(0, 3), slice(3, 6))):
        out = torch.cat([noise + 0.1 * torch.randn_like(noise), torch.rand_like(noise) * 2 - 1], dim=1).requires_grad_()
        diffusion.training_losses(lambda x_t, t_: out, x0, t, noise)[term].sum().backward()
        assert torch.all(out.grad[:, frozen] == 0), f"{term} has a gradient into channels {frozen}"
        assert torch.all(out.grad[:, trained].abs().sum(dim=(1, 2, 3)) > 0), f"{term}: a sample got no gradient"


def test_perfect_eps_model_has_zero_mse_and_matching_variance_has_zero_kl():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 10, 500, 999])
    abar = ref_alphas_cumprod()[t].view(-1, 1, 1, 1)

    def perfect(x_t, t_):  # recovers the noise from x_t and the known x0; v = -1 picks the posterior variance
        eps = (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()
        return torch.cat([eps + offset, -torch.ones_like(eps)], dim=1)

    offset = 0.0
    losses = Diffusion().training_losses(perfect, x0, t)
    assert losses["mse"].max() < 1e-20, losses["mse"]
    assert losses["vb"][1:].abs().max() < 1e-12, losses["vb"]  # t >= 1: model and true posterior coincide
    offset = 0.1  # and an imperfect one is seen as such
    losses = Diffusion().training_losses(perfect, x0, t)
    torch.testing.assert_close(losses["mse"], torch.full((5,), 0.01, dtype=torch.float64))
    assert torch.all(losses["vb"][1:] > 0)


def test_learn_sigma_false_is_mse_only_and_shapes_are_checked():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    t = torch.tensor([0, 700])
    losses = Diffusion(learn_sigma=False).training_losses(lambda x_t, t_: 0.5 * noise, x0, t, noise)
    torch.testing.assert_close(losses["loss"], (0.25 * noise**2).mean(dim=(1, 2, 3)))
    assert torch.all(losses["vb"] == 0) and torch.equal(losses["loss"], losses["mse"])
    with pytest.raises(ValueError, match="learn_sigma=True"):
        Diffusion().training_losses(lambda x_t, t_: noise, x0, t, noise)
    with pytest.raises(ValueError, match=r"\(2,\)"):
        Diffusion().training_losses(lambda x_t, t_: noise, x0, t[:1], noise)


@pytest.mark.parametrize("prediction", ["eps", "v", "flow"])
def test_input_perturbation_noises_the_input_and_leaves_the_target(prediction):
    """As diffusers' train_text_to_image.py --input_perturbation: the input from noise + perturb (add_noise), the
    target from the noise alone (noise, get_velocity; flow: noise - x0)."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers not installed")
    ref = diffusers.DDPMScheduler(**SCHEDULE)
    g = torch.Generator().manual_seed(0)
    x0, noise, xi = (torch.randn(4, 3, 8, 8, generator=g) for _ in range(3))
    t = torch.tensor([0, 10, 500, 999])
    seen = []
    zero = lambda x, tt: seen.append(x) or torch.zeros_like(x)  # noqa: E731
    terms = Diffusion(learn_sigma=False, prediction=prediction).training_losses(zero, x0, t, noise, 0.1 * xi)
    if prediction == "flow":
        s = (t / 1000).view(-1, 1, 1, 1)
        want_input, target = (1 - s) * x0 + s * (noise + 0.1 * xi), noise - x0
    else:
        want_input = ref.add_noise(x0, noise + 0.1 * xi, t)
        target = noise if prediction == "eps" else ref.get_velocity(x0, noise, t)
    torch.testing.assert_close(seen[0], want_input)
    torch.testing.assert_close(terms["mse"], (target**2).mean(dim=(1, 2, 3)), rtol=1e-5, atol=1e-6)
    # none: the forward process's input
    Diffusion(learn_sigma=False, prediction=prediction).training_losses(zero, x0, t, noise)
    assert not torch.allclose(seen[1], seen[0])


def test_v_prediction_targets_and_eps_match_diffusers():
    diffusers = pytest.importorskip("diffusers", reason="diffusers not installed")
    from diffusers.training_utils import compute_snr

    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                                  prediction_type="v_prediction")
    diffusion = Diffusion(learn_sigma=False, prediction="v")
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    v = ref.get_velocity(x0, noise, t)  # diffusers' v target
    terms = diffusion.training_losses(lambda xt, tt: v.float(), x0, t, noise)
    assert terms["mse"].max() < 1e-10  # predicting diffusers' v exactly is a perfect v model
    x_t = diffusion.q_sample(x0, t, noise)
    for i, step in enumerate(t.tolist()):  # the samplers' conversion v -> eps recovers the noise
        eps = diffusion._eps(lambda x, tt: v[i:i + 1].float(), x_t[i:i + 1], step)
        torch.testing.assert_close(eps, noise[i:i + 1], atol=1e-5, rtol=1e-5)
    snr = compute_snr(ref, t)  # diffusers' SNR
    for gamma, plus_one in ((5.0, False), (5.0, True)):
        weighted = Diffusion(learn_sigma=False, prediction="v", min_snr_gamma=gamma, min_snr_plus_one=plus_one)
        mse = torch.ones(4)
        out = weighted.training_losses(lambda xt, tt: v.float() + 1, x0, t, noise)  # error 1 everywhere
        want = ((snr + 1).clamp(max=gamma) if plus_one else snr.clamp(max=gamma)) / (snr + 1) * mse
        torch.testing.assert_close(out["loss"], want.float(), rtol=1e-4, atol=1e-6)
    eps_weighted = Diffusion(learn_sigma=False, min_snr_gamma=5.0)
    out = eps_weighted.training_losses(lambda xt, tt: noise + 1, x0, t, noise)
    torch.testing.assert_close(out["loss"], (snr.clamp(max=5.0) / snr).float(), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="prediction must be"):
        Diffusion(prediction="x0")
