"""The reference Diffusion agrees with diffusers' DDPMScheduler (an independent implementation).

Configuration that matches the homework: squaredcos_cap_v2 betas (the cosine schedule with beta <= 0.999, i.e.
alpha >= 0.001), clip_sample=True (x_0 estimate clamped to [-1, 1]), variance_type="fixed_small" (the posterior
variance of eq. 18), prediction_type="epsilon". Same noise on both sides: our noise_like returns the draw that
diffusers makes from a generator with the same seed.

Tolerance: diffusers stores betas as float32 and takes the cumulative product of alphas in float32, while
diffusion.py works in float64 and stores float32; over T = 1000 steps the products differ by a few 1e-6
relative, so outputs are compared to 1e-5 of their scale (a genuine mistake is orders of magnitude larger).
One exception: diffusers also forms 1 - alpha_bar_t in float32, which near t = 0 (alpha_bar_t within ~1e-4 of 1
for T = 1000) cancels to a relative error of about float32-eps / (1 - alpha_bar_t); p_sample divides by
that, so its tolerance widens to a few times that bound at the first steps.
"""
import os
import sys

import pytest
import torch
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import diffusion  # noqa: E402

diffusers = pytest.importorskip("diffusers")

SHAPE = (3, 3, 6, 6)


class FixedEps(nn.Module):
    def __init__(self, eps):
        super().__init__()
        self.eps = eps

    def forward(self, x, t):
        return self.eps


def scheduler(T):
    return diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2", clip_sample=True,
                                   variance_type="fixed_small", prediction_type="epsilon")


def assert_close(ours, theirs, what, rel=1e-5):
    scale = max(1.0, float(theirs.abs().max()))
    err = float((ours.double() - theirs.double()).abs().max())
    assert err <= rel * scale, f"{what}: max abs difference {err:.3g} (scale {scale:.3g}, tolerance {rel:.2g} of it)"


def cancellation_bound(sched, t):
    """Relative error of diffusers' float32 1 - alpha_bar_t, times a safety factor of 4."""
    one_minus = 1.0 - float(sched.alphas_cumprod.double()[t])
    return max(1e-5, 4 * torch.finfo(torch.float32).eps / one_minus)


def steps(T):
    return sorted({0, 1, T // 2, T - 2, T - 1})


@pytest.mark.parametrize("T", [50, 1000])
def test_p_sample_equals_one_ddpm_scheduler_step(T):
    sched = scheduler(T)
    for t in steps(T):
        g = torch.Generator().manual_seed(100 + t)
        x = torch.randn(SHAPE, generator=g)
        eps = torch.randn(SHAPE, generator=g) * 1.5
        d = diffusion.Diffusion(FixedEps(eps), image_size=SHAPE[-1], channels=SHAPE[1], timesteps=T)
        d.noise_like = lambda shape, device, seed=7 + t: torch.randn(
            shape, generator=torch.Generator().manual_seed(seed)).to(device)
        ours = d.p_sample(x, torch.full((SHAPE[0],), t, dtype=torch.long), t)
        theirs = sched.step(eps, t, x, generator=torch.Generator().manual_seed(7 + t)).prev_sample
        assert_close(ours, theirs, f"p_sample vs DDPMScheduler.step at t={t} (T={T})", cancellation_bound(sched, t))


@pytest.mark.parametrize("T", [50, 1000])
def test_q_sample_equals_add_noise(T):
    sched = scheduler(T)
    g = torch.Generator().manual_seed(5)
    d = diffusion.Diffusion(FixedEps(None), image_size=SHAPE[-1], channels=SHAPE[1], timesteps=T)
    for t in steps(T):
        x_0 = torch.rand(SHAPE, generator=g) * 2 - 1
        noise = torch.randn(SHAPE, generator=g)
        timesteps = torch.full((SHAPE[0],), t, dtype=torch.long)
        assert_close(d.q_sample(x_0, timesteps, noise), sched.add_noise(x_0, noise, timesteps),
                     f"q_sample vs add_noise at t={t} (T={T})")
    mixed = torch.tensor([0, T // 3, T - 1])
    x_0, noise = torch.rand(SHAPE, generator=g) * 2 - 1, torch.randn(SHAPE, generator=g)
    assert_close(d.q_sample(x_0, mixed, noise), sched.add_noise(x_0, noise, mixed), f"q_sample, mixed t (T={T})")
