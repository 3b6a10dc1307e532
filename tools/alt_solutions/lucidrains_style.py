"""A correct alternative solution (must pass test_diffusion.py): written in the style of
lucidrains/denoising-diffusion-pytorch: other buffer names, reciprocal-sqrt buffers for x_0, a q_posterior helper,
Ho et al.'s floored log-variance, a nonzero mask (noise_like is called at every step, also the last), float64 math.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


def extract(a, t, x_shape):
    b = t.shape[0]
    out = a.gather(-1, t)
    return out.reshape(b, *((1,) * (len(x_shape) - 1)))


def cosine_schedule(timesteps, s=0.008):
    steps = torch.arange(timesteps + 1, dtype=torch.float64)
    f = torch.cos(((steps / timesteps + s) / (1 + s)) * math.pi / 2) ** 2
    alphas = f[1:] / f[:-1]
    return torch.clip(alphas, 0.001, 1.0)


def normalize_to_neg_one_to_one(img):
    return img * 2 - 1


def unnormalize_to_zero_to_one(t):
    return (t + 1) * 0.5


class Diffusion(nn.Module):
    def __init__(self, model, *, image_size, channels=3, timesteps=50):
        super().__init__()
        self.model = model
        self.image_size = image_size
        self.channels = channels
        self.num_timesteps = int(timesteps)

        betas = 1.0 - cosine_schedule(self.num_timesteps)
        alphas = 1.0 - betas
        ac = torch.cumprod(alphas, dim=0)
        ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        buf = lambda name, val: self.register_buffer(name, val.float())  # noqa: E731
        buf("betas", betas)
        buf("ac", ac)
        buf("sqrt_ac", ac.sqrt())
        buf("sqrt_1m_ac", (1.0 - ac).sqrt())
        buf("sqrt_recip_ac", (1.0 / ac).sqrt())
        buf("sqrt_recipm1_ac", (1.0 / ac - 1).sqrt())
        var = betas * (1.0 - ac_prev) / (1.0 - ac)
        buf("post_logvar_clipped", torch.log(torch.cat([var[1:2], var[1:]])))
        buf("post_c1", betas * ac_prev.sqrt() / (1.0 - ac))
        buf("post_c2", (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac))

    def noise_like(self, shape, device):
        return torch.randn(shape, device=device)

    def predict_start_from_noise(self, x_t, t, noise):
        return extract(self.sqrt_recip_ac, t, x_t.shape) * x_t - extract(self.sqrt_recipm1_ac, t, x_t.shape) * noise

    def q_posterior(self, x_start, x_t, t):
        mean = extract(self.post_c1, t, x_t.shape) * x_start + extract(self.post_c2, t, x_t.shape) * x_t
        return mean, extract(self.post_logvar_clipped, t, x_t.shape)

    @torch.no_grad()
    def p_sample(self, x, t, t_index):
        x_start = self.predict_start_from_noise(x, t, self.model(x, t)).clamp_(-1.0, 1.0)
        mean, logvar = self.q_posterior(x_start, x, t)
        noise = self.noise_like(x.shape, x.device)
        nonzero_mask = (t != 0).float().reshape(x.shape[0], *((1,) * (x.dim() - 1)))
        return mean + nonzero_mask * (0.5 * logvar).exp() * noise

    @torch.no_grad()
    def p_sample_loop(self, img):
        for i in reversed(range(0, self.num_timesteps)):
            img = self.p_sample(img, torch.full((img.shape[0],), i, device=img.device, dtype=torch.long), i)
        return unnormalize_to_zero_to_one(img)

    @torch.no_grad()
    def sample(self, batch_size):
        img = self.noise_like((batch_size, self.channels, self.image_size, self.image_size), self.betas.device)
        return self.p_sample_loop(img)

    def q_sample(self, x_0, t, noise):
        return extract(self.sqrt_ac, t, x_0.shape) * x_0 + extract(self.sqrt_1m_ac, t, x_0.shape) * noise

    def p_losses(self, x_0, t, noise):
        model_out = self.model(self.q_sample(x_0=x_0, t=t, noise=noise), t)
        return F.l1_loss(model_out, noise, reduction="none").mean()

    def forward(self, x_0, noise):
        b = x_0.shape[0]
        t = torch.randint(0, self.num_timesteps, (b,), device=x_0.device).long()
        return self.p_losses(x_0, t, noise)
