"""Denoising diffusion (Ho et al. 2020) with the cosine schedule (Nichol & Dhariwal 2021).

Index convention, used everywhere in this kit:
    code index i in {0, ..., T-1}  <->  math step t = i + 1 in {1, ..., T}.
So `alphas[i]` is the handout's alpha_t with t = i + 1, `alphas_cumprod[i]` is alpha-bar_t, and
`alphas_cumprod_prev[i]` is alpha-bar_{t-1} (alpha-bar_0 = 1). A `t` tensor passed to a method holds code
indices; the U-Net sees those same indices as its time input.

Equation numbers refer to the homework handout (eq. 12-19, Algorithms 1 and 2).
Regions between `# BEGIN SOLUTION` and `# END SOLUTION` are what students implement; the handout tool
(tools/make_handout.py) replaces each with a TODO.
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

        # BEGIN SOLUTION
        # Schedule in float64 (eq. 14), stored as float32 buffers so it follows .to(device).
        alphas = cosine_schedule(self.num_timesteps)
        # cumprod of the *clipped* alphas, so alpha-bar stays > 0 at t = T
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = F.pad(alphas_cumprod[:-1], (1, 0), value=1.0)  # alpha-bar_{t-1}, alpha-bar_0 = 1

        def register(name, value):
            self.register_buffer(name, value.to(torch.float32))

        register("alphas", alphas)
        register("alphas_cumprod", alphas_cumprod)
        register("alphas_cumprod_prev", alphas_cumprod_prev)
        # q(x_t | x_0) (eq. 13)
        register("sqrt_alphas_cumprod", torch.sqrt(alphas_cumprod))
        register("sqrt_one_minus_alphas_cumprod", torch.sqrt(1.0 - alphas_cumprod))
        # posterior q(x_{t-1} | x_t, x_0): mean coefficients and variance (eq. 18)
        register("posterior_mean_coef_x0", torch.sqrt(alphas_cumprod_prev) * (1.0 - alphas) / (1.0 - alphas_cumprod))
        register("posterior_mean_coef_xt", torch.sqrt(alphas) * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod))
        register("posterior_variance", (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod) * (1.0 - alphas))
        # END SOLUTION

    def noise_like(self, shape, device):
        """All sampling randomness goes through here, so graders can replace it."""
        return torch.randn(shape, device=device)

    @torch.no_grad()
    def p_sample(self, x, t, t_index):
        """One reverse step x_t -> x_{t-1} (Algorithm 2, with the clipped x_0 estimate of eq. 19)."""
        # BEGIN SOLUTION
        eps = self.model(x, t)
        # eq. 19: x_0 = (x_t - sqrt(1 - alpha-bar_t) eps) / sqrt(alpha-bar_t), clipped to the data range
        x_0 = (x - extract(self.sqrt_one_minus_alphas_cumprod, t, x.shape) * eps) / extract(
            self.sqrt_alphas_cumprod, t, x.shape
        )
        x_0 = x_0.clamp(-1.0, 1.0)
        # eq. 18: posterior mean
        mean = extract(self.posterior_mean_coef_xt, t, x.shape) * x + extract(self.posterior_mean_coef_x0, t, x.shape) * x_0
        if t_index == 0:
            return mean  # the last step (t = 1) adds no noise
        # eq. 18: sigma_t^2 = (1 - alpha-bar_{t-1}) / (1 - alpha-bar_t) * (1 - alpha_t)
        sigma = torch.sqrt(extract(self.posterior_variance, t, x.shape))
        return mean + sigma * self.noise_like(x.shape, x.device)
        # END SOLUTION

    @torch.no_grad()
    def p_sample_loop(self, img):
        """Run every reverse step from x_T = img down to x_0; returns images in [0, 1]."""
        # BEGIN SOLUTION
        b = img.shape[0]
        for t_index in reversed(range(self.num_timesteps)):
            t = torch.full((b,), t_index, device=img.device, dtype=torch.long)
            img = self.p_sample(img, t, t_index)
        return unnormalize_to_zero_to_one(img.clamp(-1.0, 1.0))
        # END SOLUTION

    @torch.no_grad()
    def sample(self, batch_size):
        """Draw `batch_size` images in [0, 1], shape (b, channels, image_size, image_size)."""
        # BEGIN SOLUTION
        was_training = self.model.training
        self.model.eval()
        device = self.alphas_cumprod.device
        shape = (batch_size, self.channels, self.image_size, self.image_size)
        img = self.noise_like(shape, device)
        try:
            return self.p_sample_loop(img)
        finally:
            self.model.train(was_training)
        # END SOLUTION

    def q_sample(self, x_0, t, noise):
        """Forward process sample x_t ~ q(x_t | x_0) (eq. 13)."""
        # BEGIN SOLUTION
        return (
            extract(self.sqrt_alphas_cumprod, t, x_0.shape) * x_0
            + extract(self.sqrt_one_minus_alphas_cumprod, t, x_0.shape) * noise
        )
        # END SOLUTION

    def p_losses(self, x_0, t, noise):
        """L1 between the model's noise prediction and the true noise (Algorithm 1)."""
        # BEGIN SOLUTION
        x_t = self.q_sample(x_0, t, noise)
        predicted_noise = self.model(x_t, t)
        return F.l1_loss(predicted_noise, noise)
        # END SOLUTION

    def forward(self, x_0, noise):
        """Training loss for a batch x_0 in [-1, 1] at uniformly drawn steps."""
        # BEGIN SOLUTION
        b, _, h, w = x_0.shape
        assert h == self.image_size and w == self.image_size, (
            f"image size must be {self.image_size}x{self.image_size}, got {h}x{w}: "
            f"pass --image_size {h} or resize the data"
        )
        t = torch.randint(0, self.num_timesteps, (b,), device=x_0.device).long()
        return self.p_losses(x_0, t, noise)
        # END SOLUTION
