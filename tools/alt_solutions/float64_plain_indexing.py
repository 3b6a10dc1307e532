"""A correct alternative solution (must pass test_diffusion.py): float64 buffers and float64 arithmetic with
plain indexing (no `extract`), results cast back to the input dtype; p_sample looks its coefficients up with the
python int t_index; the loop counts down with range(T - 1, -1, -1); sample runs its own loop; the loss is written out.
"""
import math

import torch
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
        T = self.num_timesteps
        s = 0.008
        f = [math.cos(((k / T + s) / (1 + s)) * math.pi / 2) ** 2 for k in range(T + 1)]
        alpha = [min(max(f[k + 1] / f[k], 0.001), 1.0) for k in range(T)]
        abar, prod = [], 1.0
        for a in alpha:
            prod *= a
            abar.append(prod)
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float64))
        self.register_buffer("abar", torch.tensor(abar, dtype=torch.float64))

    def noise_like(self, shape, device):
        return torch.randn(shape, device=device)

    def _abar_prev(self, i):
        return self.abar[i - 1] if i > 0 else torch.ones((), dtype=torch.float64, device=self.abar.device)

    @torch.no_grad()
    def p_sample(self, x, t, t_index):
        x64 = x.double()
        a, ab, ab_prev = self.alpha[t_index], self.abar[t_index], self._abar_prev(t_index)
        eps = self.model(x, t).double()
        x0 = ((x64 - torch.sqrt(1 - ab) * eps) / torch.sqrt(ab)).clamp(min=-1, max=1)
        mean = (torch.sqrt(ab_prev) * (1 - a) * x0 + torch.sqrt(a) * (1 - ab_prev) * x64) / (1 - ab)
        if t_index > 0:
            var = (1 - ab_prev) / (1 - ab) * (1 - a)
            mean = mean + torch.sqrt(var) * self.noise_like(x.shape, x.device).double()
        return mean.to(x.dtype)

    @torch.no_grad()
    def p_sample_loop(self, img):
        x = img
        for i in range(self.num_timesteps - 1, -1, -1):
            x = self.p_sample(x, torch.full((x.shape[0],), i, dtype=torch.long, device=x.device), i)
        return ((x.clamp(-1, 1) + 1) / 2)

    @torch.no_grad()
    def sample(self, batch_size):
        x = self.noise_like([batch_size, self.channels, self.image_size, self.image_size], self.abar.device)
        for i in reversed(range(self.num_timesteps)):
            x = self.p_sample(x, torch.full((batch_size,), i, dtype=torch.long, device=x.device), i)
        return unnormalize_to_zero_to_one(x.clamp(-1, 1))

    def q_sample(self, x_0, t, noise):
        ab = self.abar[t].view(-1, *([1] * (x_0.dim() - 1)))
        return (ab.sqrt() * x_0.double() + (1 - ab).sqrt() * noise.double()).to(x_0.dtype)

    def p_losses(self, x_0, t, noise):
        x_t = self.q_sample(x_0, t, noise)
        return (self.model(x_t, t) - noise).abs().mean()

    def forward(self, x_0, noise):
        t = torch.randint(self.num_timesteps, size=(x_0.shape[0],), device=x_0.device)
        return self.p_losses(x_0, t, noise)
