"""Gaussian diffusion for PixArt-alpha: the linear 1000-step schedule, the training loss, and two samplers; and
rectified flow (prediction="flow": SD3's objective, as Sana and Flux train) with its Euler sampler.

Shapes: B batch, C data channels, H x W spatial. Timesteps are integer training steps t in [0, T), T = 1000;
t = 0 is the least noisy. `abar[t]` is the cumulative product of (1 - beta) up to and including step t, so
x_t = sqrt(abar[t]) x_0 + sqrt(1 - abar[t]) eps.

Training (`Diffusion.training_losses`) is improved DDPM's / DiT's "MSE + learned-range variance" loss. Sampling
(`Diffusion.ddim`, `Diffusion.dpm_solver`) runs a model function eps_fn(x, t) -> (B, C or 2C, H, W) whose first
C channels are the predicted noise. PixArt's `forward_with_cfg` plugs in directly:

    eps_fn = lambda x, t: model.forward_with_cfg(x, t, y, mask, cfg_scale=4.5)
    images = Diffusion().dpm_solver(eps_fn, torch.randn(B, C, H, W, generator=g), steps=20)

`guided` builds the same guided eps_fn from any model that takes a doubled [conditional; unconditional] batch.

Rectified flow (prediction="flow"): x_s = (1 - s) x_0 + s eps for s in [0, 1] (s = 1 pure noise), and the model
predicts the velocity v = eps - x_0. The model's timestep input is s * T (a float in [0, T], T = 1000: PixArt's
timestep embedder's scale, and what diffusers' flow pipelines pass). `Diffusion.flow_euler` integrates
dx/ds = v from s = 1 to 0 over FlowMatchEulerDiscreteScheduler's sigmas; `Diffusion.sample` picks the sampler
that fits the prediction.
"""
import math
from typing import Callable

import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x (B, C, H, W), t (B,) int64) -> (B, C or 2C, H, W)
PREDICTIONS = ("eps", "v", "flow")
TIMESTEP_SAMPLINGS = ("uniform", "logit-normal")
SAMPLERS = {"eps": ("dpm", "ddim"), "v": ("dpm", "ddim"), "flow": ("euler",)}  # the first: the default


def flow_shift(s, shift: float):
    """SD3's timestep shift of flow noise levels s in [0, 1]: shift * s / (1 + (shift - 1) * s); shift > 1 spends
    more of the steps at high noise (SD3 at 1024 px: 3; shift 1: no change). Works on floats and tensors."""
    return shift * s / (1 + (shift - 1) * s)


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats; arguments broadcast."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def discretized_gaussian_nll(x, mean, log_scale):
    """-log P(x) in nats, elementwise, for data x in [-1, 1] quantised to 8 bits (bins of width 2/255) under
    N(mean, exp(log_scale)^2); the two edge bins extend to -inf and +inf.

    Improved DDPM's decoder term. It uses the exact normal CDF where DiT uses a tanh approximation of it
    (error up to about 1e-4); probabilities are clamped at 1e-12 as there.
    """
    inv_std = torch.exp(-log_scale)
    cdf_hi = torch.special.ndtr(inv_std * (x - mean + 1 / 255))
    cdf_lo = torch.special.ndtr(inv_std * (x - mean - 1 / 255))
    prob = torch.where(x < -0.999, cdf_hi, torch.where(x > 0.999, 1.0 - cdf_lo, cdf_hi - cdf_lo))
    return -torch.log(prob.clamp(min=1e-12))


def _mean_flat(x):
    """Mean over all dimensions but the batch: (B, ...) -> (B,)."""
    return x.mean(dim=list(range(1, x.ndim)))


def guided(model_fn: ModelFn, scale: float = 4.5, guide_fn: ModelFn | None = None,
           guide_weight: float = 0.0) -> ModelFn:
    """Classifier-free guidance in one batched model call, optionally with autoguidance on top.

    model_fn(x2, t2) gets the batch twice, x2 = [x; x] (2B, C, H, W) and t2 = [t; t], and must treat the first
    half as conditional and the second as unconditional: bind the captions in a closure, e.g.
    `lambda x2, t2: model(x2, t2, torch.cat([y, y_null]), torch.cat([mask, mask_null]))`.
    Returns eps_fn(x, t) -> (B, C', H, W): the first C channels uncond + scale * (cond - uncond), the other
    C' - C channels (the variance) the conditional half's, as PixArt's `forward_with_cfg` does.

    guide_fn(x, t), when given: a weaker model's conditional prediction (the same model earlier in its training,
    or a smaller one), and guide_weight * (cond - guide) is added to the first C channels: autoguidance (Karras et
    al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself"), which pushes away from the errors the
    weaker model makes more of. With scale 1 the result is guide + (guide_weight + 1) * (cond - guide): their
    D_0 + w (D_1 - D_0) with w = guide_weight + 1.
    """

    def eps_fn(x, t):
        cond, uncond = model_fn(torch.cat([x, x]), torch.cat([t, t])).chunk(2)
        C = x.shape[1]
        eps = uncond[:, :C] + scale * (cond[:, :C] - uncond[:, :C])
        if guide_fn is not None and guide_weight:
            eps = eps + guide_weight * (cond[:, :C] - guide_fn(x, t)[:, :C])
        return torch.cat([eps, cond[:, C:]], dim=1)

    return eps_fn


class Diffusion:
    """The discrete-time VP diffusion of DDPM with linearly spaced betas (PixArt: 1000 steps, 1e-4 -> 0.02).

    All tables are float64 (T,) tensors on the CPU; they are gathered per batch and cast to the data's dtype.
    learn_sigma: the model outputs 2C channels, eps and the learned-range variance v in [-1, 1] (PixArt, DiT);
    otherwise C channels, eps only, and the loss is the MSE alone.
    """

    def __init__(
        self, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, learn_sigma: bool = True,
        prediction: str = "eps", min_snr_gamma: float = 0.0, min_snr_plus_one: bool = False,
        timestep_sampling: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0,
    ):
        """prediction: what the model's first C channels are, "eps" (PixArt) or "v" (v = sqrt(abar) eps -
        sqrt(1 - abar) x0, Salimans & Ho 2022; converted to eps for the VLB term and the samplers).
        min_snr_gamma > 0: weight the MSE by min(SNR, gamma) / SNR (eps) or min(SNR, gamma) / (SNR + 1) (v),
        Hang et al. 2023; 0: unweighted. min_snr_plus_one (v only): min(SNR + 1, gamma) / (SNR + 1) instead, as
        diffusers' training scripts do for v: weight 1 (plain v loss, x0 error weight >= 1) at high noise, where
        the other form's x0 weight min(SNR, gamma) goes to 0.
        prediction "flow": rectified flow, the model's first C channels are the velocity eps - x0 (module
        docstring); the loss is the MSE on it, unweighted (min_snr_* must be off), and a learn_sigma model's
        variance channels are ignored (no VLB term: flow has no discrete posterior to fit them to).
        timestep_sampling: the density of the training noise level s = t / T, "uniform" on [0, 1) or
        "logit-normal": s = sigmoid(n), n ~ N(logit_mean, logit_std^2) (SD3, Esser et al. 2024: 0 and 1); for
        eps and v, t = floor(s T), so the middle timesteps are drawn more often than the ends."""
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        if timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"timestep_sampling must be one of {TIMESTEP_SAMPLINGS}, got {timestep_sampling!r}")
        if prediction == "flow" and min_snr_gamma > 0:
            raise ValueError("min-SNR weighting is for prediction 'eps' or 'v'; flow's loss is unweighted")
        if not logit_std > 0:
            raise ValueError(f"logit_std must be > 0, got {logit_std}")
        self.prediction, self.min_snr_gamma, self.min_snr_plus_one = prediction, min_snr_gamma, min_snr_plus_one
        self.timestep_sampling, self.logit_mean, self.logit_std = timestep_sampling, logit_mean, logit_std
        if not 0 < beta_start <= beta_end < 1:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}")
        if num_timesteps < 2:
            raise ValueError(f"num_timesteps must be at least 2, got {num_timesteps}")
        self.num_timesteps, self.learn_sigma = num_timesteps, learn_sigma
        self.betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        abar, abar_prev = self.alphas_cumprod, torch.cat([self.alphas_cumprod.new_ones(1), self.alphas_cumprod[:-1]])
        # Posterior q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, posterior_variance)  (DDPM eq. 6-7).
        self.posterior_variance = self.betas * (1.0 - abar_prev) / (1.0 - abar)
        # The variance is 0 at t = 0; the log uses the t = 1 value there (the decoder's lower variance bound).
        var = self.posterior_variance
        self.posterior_log_variance_clipped = torch.log(torch.cat([var[1:2], var[1:]]))
        self.posterior_mean_coef1 = self.betas * abar_prev.sqrt() / (1.0 - abar)
        self.posterior_mean_coef2 = (1.0 - abar_prev) * (1.0 - self.betas).sqrt() / (1.0 - abar)

    @staticmethod
    def _at(table, t, like):
        """table[t] as a (B, 1, ..., 1) tensor of like's dtype and rank, t (B,) int64 on like's device."""
        return table.to(t.device)[t].to(like.dtype).view(-1, *([1] * (like.ndim - 1)))

    def draw_timesteps(self, n: int, generator: torch.Generator, device) -> torch.Tensor:
        """n training timesteps on the model's scale, drawn from `generator` alone (one call: a pure function of
        its seed). s from `timestep_sampling`; logit-normal draws as diffusers'
        compute_density_for_timestep_sampling("logit_normal") does, so the same generator state gives the same s.
        flow: float32 s * T. eps / v: int64, uniform on [0, T) as randint draws it, logit-normal floor(s * T)."""
        flow = self.prediction == "flow"
        if self.timestep_sampling == "uniform" and not flow:
            return torch.randint(0, self.num_timesteps, (n,), generator=generator, device=device)
        if self.timestep_sampling == "logit-normal":
            s = torch.sigmoid(torch.normal(self.logit_mean, self.logit_std, (n,), generator=generator, device=device))
        else:
            s = torch.rand((n,), generator=generator, device=device)
        t = s * self.num_timesteps
        return t if flow else t.long().clamp(max=self.num_timesteps - 1)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar[t]) x0 + sqrt(1 - abar[t]) noise. x0, noise (B, C, H, W); t (B,) int64."""
        abar = self.alphas_cumprod
        return self._at(abar.sqrt(), t, x0) * x0 + self._at((1.0 - abar).sqrt(), t, x0) * noise

    def noised(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t for clean x0 (B, C, H, W) at the model's timesteps t (B,): `q_sample` for eps and v; for flow
        x_s = (1 - s) x0 + s noise with s = t / T."""
        if self.prediction == "flow":
            s = (t.to(x0.dtype) / self.num_timesteps).view(-1, *([1] * (x0.ndim - 1)))
            return (1 - s) * x0 + s * noise
        return self.q_sample(x0, t, noise)

    def snr(self, t: int) -> float:
        """The signal-to-noise ratio at timestep t: abar / (1 - abar) for eps and v, (1 - s)^2 / s^2 for flow
        (s = t / T; inf at t = 0)."""
        if self.prediction == "flow":
            s = t / self.num_timesteps
            return (1 - s) ** 2 / s**2 if s > 0 else math.inf
        abar = self.alphas_cumprod[t].item()
        return abar / (1 - abar)

    @torch.no_grad()
    def predict_x0(self, model_fn: ModelFn, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The model's one-step estimate of the clean sample from x_t (B, C, H, W) at training timesteps t (B,)
        int64 (as `noised` makes it): x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) for eps and v (v converted to
        eps), x0 = x_t - s v for flow (s = t / T)."""
        C = x_t.shape[1]
        out = model_fn(x_t, t)[:, :C].to(x_t.dtype)
        if self.prediction == "flow":
            return x_t - (t.to(x_t.dtype) / self.num_timesteps).view(-1, 1, 1, 1) * out
        abar = self._at(self.alphas_cumprod, t, x_t)
        eps = abar.sqrt() * out + (1 - abar).sqrt() * x_t if self.prediction == "v" else out
        return (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()

    def training_losses(
        self, model_fn: ModelFn, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None,
        perturb: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample loss, as DiT's LossType.MSE with learned-range variance: loss = mse + vb.

        x0 (B, C, H, W) clean data (latents); t (B,) int64 in [0, T); noise defaults to randn_like(x0).
        model_fn(x_t, t) -> (B, 2C, H, W) [eps, v] if learn_sigma else (B, C, H, W) eps.
        mse: mean over C, H, W of (eps - noise)^2.
        vb: the variational bound term in bits per dimension, KL(q(x_{t-1}|x_t, x_0) || p(x_{t-1}|x_t)) for t > 0
            and the discretized Gaussian decoder NLL -log p(x_0|x_1) at t = 0. Its mean uses a DETACHED eps, so
            vb trains only the variance v and mse only eps. Zeros when learn_sigma is False.
        perturb: input perturbation (Ning et al. 2023, as diffusers' --input_perturbation), like x0: x_t is made
            from noise + perturb, the targets (and the VB term's posterior) from noise and x_t as made.
        Returns dict(loss, mse, vb), each (B,) float32 (float64 for float64 x0).
        """
        if t.shape != x0.shape[:1]:
            raise ValueError(f"t must have shape (B,) = {tuple(x0.shape[:1])}, got {tuple(t.shape)}")
        if self.prediction == "flow":
            return self._flow_losses(model_fn, x0, t, noise, perturb)
        # The KL and the log-likelihood lose their precision in half precision: compute the loss in fp32 or wider.
        x0 = x0.to(torch.promote_types(x0.dtype, torch.float32))
        noise = torch.randn_like(x0) if noise is None else noise.to(x0.dtype)
        x_t = self.q_sample(x0, t, noise if perturb is None else noise + perturb.to(x0.dtype))
        out = model_fn(x_t, t).to(x0.dtype)
        C = x0.shape[1]
        want = (x0.shape[0], 2 * C if self.learn_sigma else C, *x0.shape[2:])
        if out.shape != want:
            raise ValueError(f"model output has shape {tuple(out.shape)}, expected {want} for "
                             f"learn_sigma={self.learn_sigma}; set Diffusion(learn_sigma=...) to match the model")
        abar = self._at(self.alphas_cumprod, t, x0)
        if self.prediction == "v":
            v = out[:, :C]
            mse = _mean_flat((abar.sqrt() * noise - (1 - abar).sqrt() * x0 - v) ** 2)
            eps = abar.sqrt() * v + (1 - abar).sqrt() * x_t
        else:
            eps = out[:, :C]
            mse = _mean_flat((noise - eps) ** 2)
        weighted = mse
        if self.min_snr_gamma > 0:
            snr = (abar / (1 - abar)).flatten()
            if self.prediction == "v" and self.min_snr_plus_one:
                weight = (snr + 1).clamp(max=self.min_snr_gamma) / (snr + 1)
            else:
                weight = snr.clamp(max=self.min_snr_gamma) / (snr + 1 if self.prediction == "v" else snr)
            weighted = weight * mse
        if not self.learn_sigma:
            return dict(loss=weighted, mse=mse, vb=torch.zeros_like(mse))
        vb = self._vb_bits(eps.detach(), out[:, C:], x0, x_t, t)
        return dict(loss=weighted + vb, mse=mse, vb=vb)

    def _flow_losses(self, model_fn, x0, t, noise, perturb):
        """Rectified flow's loss: t (B,) the model's timesteps s * T (float, or int64 as `draw_timesteps` of eps /
        v gives: s = t / T); mse = mean over C, H, W of (v - (noise - x0))^2 = loss; vb zeros. A learn_sigma
        model's last C channels are ignored (they get no gradient)."""
        x0 = x0.to(torch.promote_types(x0.dtype, torch.float32))
        noise = torch.randn_like(x0) if noise is None else noise.to(x0.dtype)
        x_s = self.noised(x0, t, noise if perturb is None else noise + perturb.to(x0.dtype))
        out = model_fn(x_s, t).to(x0.dtype)
        C = x0.shape[1]
        want = (x0.shape[0], 2 * C if self.learn_sigma else C, *x0.shape[2:])
        if out.shape != want:
            raise ValueError(f"model output has shape {tuple(out.shape)}, expected {want} for "
                             f"learn_sigma={self.learn_sigma}; set Diffusion(learn_sigma=...) to match the model")
        mse = _mean_flat((noise - x0 - out[:, :C]) ** 2)
        return dict(loss=mse, mse=mse, vb=torch.zeros_like(mse))

    def _vb_bits(self, eps, v, x0, x_t, t):
        """The VLB term in bits per dimension, (B,): the KL for t > 0, the decoder NLL for t = 0."""
        abar = self._at(self.alphas_cumprod, t, x0)
        c1, c2 = self._at(self.posterior_mean_coef1, t, x0), self._at(self.posterior_mean_coef2, t, x0)
        true_mean = c1 * x0 + c2 * x_t
        true_logvar = self._at(self.posterior_log_variance_clipped, t, x0)
        # Learned range: log variance interpolates between the posterior's (frac = 0) and beta_t's (frac = 1).
        frac = (v + 1) / 2
        logvar = frac * self._at(self.betas.log(), t, x0) + (1 - frac) * true_logvar
        x0_pred = (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()
        mean = c1 * x0_pred + c2 * x_t
        kl = _mean_flat(normal_kl(true_mean, true_logvar, mean, logvar)) / math.log(2.0)
        nll = _mean_flat(discretized_gaussian_nll(x0, mean, 0.5 * logvar)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    # ------------------------------------------------------------------------------------------------------
    # Sampling
    # ------------------------------------------------------------------------------------------------------

    def timesteps(self, steps: int, start: int | None = None) -> list[int]:
        """The integer timesteps a `steps`-step sampler visits, descending: "trailing" spacing,
        t_i = round(T - i * T / steps) - 1 for i = 0 .. steps - 1 (T = 1000, steps = 20: 999, 949, ..., 49).

        Starting at T - 1 (abar = 4e-5: x_999 = 0.006 x_0 + 1.0 eps) makes the initial noise the sample at the
        noisiest trained step (Lin et al. 2023, "Common diffusion noise schedules and sample steps are flawed",
        Table 2); diffusers calls it timestep_spacing="trailing". After the last one the samplers step to the
        clean sample (abar = 1).
        start: the first timestep instead of T - 1, for a chain from an image noised to `start` (SDEdit's): the
        same spacing over [0, start], t_i = round(n - i * n / steps) - 1 with n = start + 1.
        """
        T = self.num_timesteps
        start = T - 1 if start is None else start
        if not 0 <= start < T:
            raise ValueError(f"start must be a timestep in [0, {T}), got {start}")
        n = start + 1
        if not 1 <= steps <= n:
            raise ValueError(f"steps must be in [1, {n}], got {steps}")
        return [round(n - i * n / steps) - 1 for i in range(steps)]

    def _eps(self, eps_fn, x, t):
        """Call the model at integer timestep t for the whole batch; keep its first C (eps) channels."""
        if self.prediction == "flow":
            raise ValueError("ddim and dpm_solver sample eps / v models; a flow model samples with flow_euler")
        out = eps_fn(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device))[:, : x.shape[1]].to(x.dtype)
        if self.prediction == "v":  # eps = sqrt(abar) v + sqrt(1 - abar) x_t
            abar = self.alphas_cumprod[t].item()
            return math.sqrt(abar) * out + math.sqrt(1 - abar) * x
        return out

    @torch.no_grad()
    def ddim(self, eps_fn: ModelFn, noise: torch.Tensor, steps: int = 20, clip_x0: bool = False,
             start: int | None = None) -> torch.Tensor:
        """Deterministic DDIM (eta = 0) from noise = x_{T-1} (B, C, H, W) over `self.timesteps(steps)`; the last
        step lands on the clean sample. Returns x_0 (B, C, H, W). start: noise is x_start instead (`timesteps`).

        clip_x0: clamp each x0 prediction to [-1, 1] and re-derive eps from it (diffusers' clip_sample) -- for
        pixel-space data, whose range is known; leave it off for latents. Near t = T the x0 prediction is
        eps's error amplified by 1 / sqrt(abar) (about 160x at t = 999), which clipping bounds."""
        ts, x = self.timesteps(steps, start), noise
        for i, t in enumerate(ts):
            abar = self.alphas_cumprod[t].item()
            abar_next = self.alphas_cumprod[ts[i + 1]].item() if i + 1 < len(ts) else 1.0
            eps = self._eps(eps_fn, x, t)
            x0 = (x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)
            if clip_x0:
                x0 = x0.clamp(-1, 1)
                eps = (x - math.sqrt(abar) * x0) / math.sqrt(1 - abar)
            x = math.sqrt(abar_next) * x0 + math.sqrt(1 - abar_next) * eps
        return x

    @torch.no_grad()
    def dpm_solver(self, eps_fn: ModelFn, noise: torch.Tensor, steps: int = 20, clip_x0: bool = False,
                   start: int | None = None) -> torch.Tensor:
        """DPM-Solver++ 2M (Lu et al. 2022, multistep, second order, data prediction, midpoint form) from
        noise = x_{T-1} (B, C, H, W) over `self.timesteps(steps)`. The first step is first order (no history
        yet); the last goes to the clean sample (sigma = 0) with first order, which returns the x0 prediction.
        clip_x0: clamp each x0 prediction to [-1, 1] (diffusers' thresholding with sample_max_value 1), for
        pixel-space data as in `ddim`. start: noise is x_start instead (`timesteps`). Returns x_0 (B, C, H, W)."""
        ts, x = self.timesteps(steps, start), noise
        x0_prev = h_prev = None
        for i, t in enumerate(ts):
            alpha, sigma = self.alphas_cumprod[t].sqrt().item(), (1 - self.alphas_cumprod[t]).sqrt().item()
            x0 = (x - sigma * self._eps(eps_fn, x, t)) / alpha
            if clip_x0:
                x0 = x0.clamp(-1, 1)
            if i + 1 == len(ts):
                return x0
            abar_next = self.alphas_cumprod[ts[i + 1]].item()
            alpha_next, sigma_next = math.sqrt(abar_next), math.sqrt(1 - abar_next)
            h = math.log(alpha_next / sigma_next) - math.log(alpha / sigma)  # step in half-log-SNR lambda
            # Second order: extrapolate x0 linearly in lambda to the interval's midpoint from the previous step.
            d = x0 if x0_prev is None else x0 + (0.5 * h / h_prev) * (x0 - x0_prev)
            x = (sigma_next / sigma) * x - alpha_next * math.expm1(-h) * d
            x0_prev, h_prev = x0, h

    # ------------------------------------------------------------------------------------------------------
    # Rectified flow sampling
    # ------------------------------------------------------------------------------------------------------

    def flow_sigmas(self, steps: int, shift: float = 1.0) -> list[float]:
        """The noise levels a `steps`-step flow sampler visits, descending, then 0 (steps + 1 values): those of
        diffusers' FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=shift).set_timesteps(steps),
        flow_shift(linspace(1, flow_shift(1 / T), steps)). The model's timesteps are these times T."""
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        if not shift > 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        lo = flow_shift(1 / self.num_timesteps, shift)
        return [flow_shift(1 + (lo - 1) * i / max(steps - 1, 1), shift) for i in range(steps)] + [0.0]

    @torch.no_grad()
    def flow_euler(self, v_fn: ModelFn, noise: torch.Tensor, steps: int = 20, shift: float = 1.0,
                   clip_x0: bool = False, start: int | None = None) -> torch.Tensor:
        """Euler steps x <- x + (s' - s) v(x, s T) of a flow model (prediction "flow") from noise = x at s = 1
        (B, C, H, W) over `flow_sigmas(steps, shift)`, down to s = 0. v_fn: as eps_fn for the other samplers
        (`guided` gives classifier-free guidance on v), its first C channels the velocity. Returns x_0.
        clip_x0: clamp each x0 prediction x - s v to [-1, 1] and step to (1 - s') x0 + s' eps with eps re-derived
        from it (the same step unclipped), for pixel-space data as in `ddim`. start: noise is x at timestep
        `start` (s = start / T, as `noised` makes it) and the noise levels are `flow_sigmas` scaled by start / T."""
        sigmas, x = self.flow_sigmas(steps, shift), noise
        if start is not None:
            if not 0 < start < self.num_timesteps:
                raise ValueError(f"start must be a timestep in (0, {self.num_timesteps}), got {start}")
            sigmas = [s * start / self.num_timesteps for s in sigmas]
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            t = torch.full((x.shape[0],), s * self.num_timesteps, dtype=torch.float32, device=x.device)
            v = v_fn(x, t)[:, : x.shape[1]].to(x.dtype)
            if clip_x0:
                x0 = (x - s * v).clamp(-1, 1)
                eps = (x - (1 - s) * x0) / s  # s > 0 before the last step
                x = (1 - s_next) * x0 + s_next * eps
            else:
                x = x + (s_next - s) * v
        return x

    def sample(self, eps_fn: ModelFn, noise: torch.Tensor, steps: int = 20, sampler: str | None = None,
               shift: float = 1.0, clip_x0: bool = False, start: int | None = None) -> torch.Tensor:
        """x_0 from noise with the sampler `sampler` of this prediction (SAMPLERS; None: its first, "dpm" for eps
        and v, "euler" for flow). shift: flow only (`flow_sigmas`). start: noise is an image noised to timestep
        `start` (`noised`), and the chain runs from there (each sampler's `start`)."""
        sampler = sampler or SAMPLERS[self.prediction][0]
        if sampler not in SAMPLERS[self.prediction]:
            raise ValueError(f"sampler {sampler!r} does not sample prediction {self.prediction!r}; it takes "
                             f"{', '.join(SAMPLERS[self.prediction])}")
        if sampler == "euler":
            return self.flow_euler(eps_fn, noise, steps=steps, shift=shift, clip_x0=clip_x0, start=start)
        if shift != 1.0:
            raise ValueError("shift is for the flow sampler")
        return {"dpm": self.dpm_solver, "ddim": self.ddim}[sampler](eps_fn, noise, steps=steps, clip_x0=clip_x0,
                                                                    start=start)
