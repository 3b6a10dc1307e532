"""A correct alternative solution (must pass test_diffusion.py), organised as about half of real submissions are:
__init__ stores only alpha_t and alpha-bar_t (float32 buffers); q_sample takes the square roots and p_sample computes
alpha-bar_{t-1}, the posterior mean and variance (eq. 18) where it uses them, in float32. The schedule checks grade
what __init__ stores; the posterior is p_sample's to compute (tools/GRADING.md, "Each mistake charged once").
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


def extract(a, t, x_shape):
    """Gather a[t] for each batch element and shape it (b, 1, 1, ...) to broadcast against x."""
    b = t.shape[0]
    out = a.gather(-1, t)
    return out.reshape(b, *((1,) * (len(x_shape) - 1)))


def cosine_schedule(timesteps, s=0.008):
    """Clipped per-step alphas of the cosine schedule (eq. 14), float64, length T.

    f(t) = cos(((t/T + s) / (1 + s)) * pi/2)^2 for t = 0..T, alpha_t = clip(f(t) / f(t-1), 0.001, 1).
    """
    steps = torch.arange(timesteps + 1, dtype=torch.float64)
    f = torch.cos(((steps / timesteps + s) / (1 + s)) * math.pi / 2) ** 2
    alphas = f[1:] / f[:-1]
    return torch.clip(alphas, 0.001, 1.0)


def normalize_to_neg_one_to_one(img):
    return img * 2 - 1


def unnormalize_to_zero_to_one(t):
    return (t + 1) * 0.5


class Diffusion(nn.Module):
    """The handout's DDPM around a noise-predicting U-Net (`model`).

    Keep the schedule's tensors as buffers (`self.register_buffer`), so that `.to(device)` moves them with the
    model. On an Apple GPU (MPS) they must be float32, as MPS has no float64: compute in float64 if you like, then
    store `.float()` copies (the trainer refuses float64 buffers there, naming them)."""

    def __init__(self, model, *, image_size, channels=3, timesteps=50):
        super().__init__()
        if int(timesteps) < 1:
            raise ValueError(f"timesteps={timesteps}: the diffusion needs at least 1 step (the course uses 50).")
        self.model = model
        self.image_size = image_size
        self.channels = channels
        self.num_timesteps = int(timesteps)

        alphas = cosine_schedule(self.num_timesteps)
        self.register_buffer("alphas", alphas.to(torch.float32))
        self.register_buffer("alphas_cumprod", torch.cumprod(alphas, dim=0).to(torch.float32))

    def noise_like(self, shape, device):
        """All sampling randomness goes through here, so graders can replace it."""
        return torch.randn(shape, device=device)

    @torch.no_grad()
    def p_sample(self, x, t, t_index):
        """One reverse step x_t -> x_{t-1} (Algorithm 2, with the clipped x_0 estimate of eq. 19)."""
        alpha_t = extract(self.alphas, t, x.shape)
        alpha_bar_t = extract(self.alphas_cumprod, t, x.shape)
        alpha_bar_prev = extract(F.pad(self.alphas_cumprod[:-1], (1, 0), value=1.0), t, x.shape)
        eps = self.model(x, t)
        x_0 = ((x - torch.sqrt(1 - alpha_bar_t) * eps) / torch.sqrt(alpha_bar_t)).clamp(-1.0, 1.0)
        mean = (torch.sqrt(alpha_t) * (1 - alpha_bar_prev) * x + torch.sqrt(alpha_bar_prev) * (1 - alpha_t) * x_0) / (
            1 - alpha_bar_t
        )
        if t_index == 0:
            return mean
        sigma = torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_t))
        return mean + sigma * self.noise_like(x.shape, x.device)

    @torch.no_grad()
    def p_sample_loop(self, img):
        """Run every reverse step from x_T = img down to x_0; returns images in [0, 1]."""
        b = img.shape[0]
        for t_index in reversed(range(self.num_timesteps)):
            t = torch.full((b,), t_index, device=img.device, dtype=torch.long)
            img = self.p_sample(img, t, t_index)
        return unnormalize_to_zero_to_one(img.clamp(-1.0, 1.0))

    @torch.no_grad()
    def sample(self, batch_size):
        """Draw `batch_size` images in [0, 1], shape (b, channels, image_size, image_size)."""
        was_training = self.model.training
        self.model.eval()
        device = self.alphas_cumprod.device
        shape = (batch_size, self.channels, self.image_size, self.image_size)
        img = self.noise_like(shape, device)
        try:
            return self.p_sample_loop(img)
        finally:
            self.model.train(was_training)

    def q_sample(self, x_0, t, noise):
        """Forward process sample x_t ~ q(x_t | x_0) (eq. 13)."""
        alpha_bar_t = extract(self.alphas_cumprod, t, x_0.shape)
        return torch.sqrt(alpha_bar_t) * x_0 + torch.sqrt(1 - alpha_bar_t) * noise

    def p_losses(self, x_0, t, noise):
        """L1 between the model's noise prediction and the true noise (Algorithm 1)."""
        x_t = self.q_sample(x_0, t, noise)
        predicted_noise = self.model(x_t, t)
        return F.l1_loss(predicted_noise, noise)

    def forward(self, x_0, noise):
        """Training loss for a batch x_0 in [-1, 1] at uniformly drawn steps."""
        b, _, h, w = x_0.shape
        assert h == self.image_size and w == self.image_size, (
            f"image size must be {self.image_size}x{self.image_size}, got {h}x{w}: "
            f"pass --image_size {h} or resize the data"
        )
        t = torch.randint(0, self.num_timesteps, (b,), device=x_0.device).long()
        return self.p_losses(x_0, t, noise)
