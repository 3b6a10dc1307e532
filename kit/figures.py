"""What a run shows: sample grids, the loss and FID curves with metrics.csv, the forward / backward figures.
Every file is written atomically, as a PNG beside the numbers."""
import csv
import io
import math
import os

import numpy as np
import torch
from PIL import Image

from diffusion import unnormalize_to_zero_to_one
from kit.files import atomic_write

VISUALIZE_FRACTIONS = (0.0, 0.25, 0.5, 0.75, 0.99)  # handout 7.4 / 7.5: points of T shown in the figures


def save_grid(images, path):
    """Save (b, c, h, w) images in [0, 1] as one square PNG grid, rounded as torchvision's save_image does."""
    b, c, h, w = images.shape
    nrow = math.ceil(math.sqrt(b))
    ncol = math.ceil(b / nrow)
    pad = 2
    grid = torch.zeros(c, ncol * (h + pad) + pad, nrow * (w + pad) + pad)
    for i, img in enumerate(images.float().cpu()):
        r, col = divmod(i, nrow)
        grid[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = img
    array = grid.mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    atomic_write(path, lambda f: f.write(buffer.getvalue()))
    return path


def save_figure(fig, path):
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    atomic_write(path, lambda f: f.write(buffer.getvalue()))
    return path


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (works headless; notebooks show the saved PNGs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curve(points, ylabel, path, smooth=True):
    plt = pyplot()
    steps, values = zip(*points)
    fig, ax = plt.subplots(figsize=(6, 4))
    # markers while the points are few: a line needs two, and the first FID point alone would draw nothing
    ax.plot(steps, values, alpha=0.35 if smooth and len(values) > 20 else 1.0, label=ylabel,
            marker="o" if len(values) <= 30 else None, markersize=4)
    if smooth and len(values) > 20:
        window = max(5, len(values) // 50)
        kernel = np.ones(window) / window
        ax.plot(steps[window - 1 :], np.convolve(values, kernel, mode="valid"), label=f"{ylabel} (mean of {window})")
        ax.legend()
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    save_figure(fig, path)
    plt.close(fig)


def write_metrics(folder, losses, fids):
    """metrics.csv, loss.png and fid.png from (step, value) pairs: the handout's curves without wandb."""
    fid_at = dict(fids)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["step", "loss", "fid"])
    for step, loss in losses:
        writer.writerow([step, f"{loss:.6f}", f"{fid_at[step]:.4f}" if step in fid_at else ""])
    atomic_write(os.path.join(folder, "metrics.csv"), lambda f: f.write(buffer.getvalue().encode()))
    if losses:
        plot_curve(losses, "loss", os.path.join(folder, "loss.png"))
    if fids:
        plot_curve(fids, "FID", os.path.join(folder, "fid.png"), smooth=False)


def diffusion_figure(columns, titles, suptitle, path):
    """One row per image, one column per step: `columns` are (b, c, h, w) batches in [-1, 1]."""
    plt = pyplot()
    rows = len(columns[0])
    fig, axes = plt.subplots(rows, len(columns), figsize=(2 * len(columns), 2 * rows), squeeze=False)
    for col, (images, title) in enumerate(zip(columns, titles)):
        images = unnormalize_to_zero_to_one(images.float().clamp(-1, 1)).cpu()
        for row, img in enumerate(images):
            axes[row][col].imshow(img.permute(1, 2, 0).numpy())
            axes[row][col].axis("off")
        axes[0][col].set_title(title, fontsize=9)
    fig.suptitle(suptitle)
    save_figure(fig, path)
    plt.close(fig)
    return path


@torch.inference_mode()
def diffusion_figures(diffusion, x_0, noise, folder):
    """Forward process on real images x_0 at 0/25/50/75/99 % of T (handout 7.4), and the backward process from
    the last forward image, shown after the reverse steps at the same points (7.5). Returns the two PNG paths."""
    T = diffusion.num_timesteps
    t_indices = sorted({min(T - 1, int(f * T)) for f in VISUALIZE_FRACTIONS})

    def t(index):
        return torch.full((len(x_0),), index, device=x_0.device, dtype=torch.long)

    forward = [diffusion.q_sample(x_0, t(i), noise) for i in t_indices]
    backward, x = [], forward[-1]
    for i in reversed(range(t_indices[-1] + 1)):
        x = diffusion.p_sample(x, t(i), i)
        if i in t_indices:
            backward.append(x)
    return {
        "forward_diffusion": diffusion_figure(
            forward, [f"q(x_t|x_0), t={i + 1}" for i in t_indices], f"Forward diffusion (T={T})",
            os.path.join(folder, "forward_diffusion.png")),
        "backward_diffusion": diffusion_figure(
            backward, [f"after step t={i + 1}" for i in reversed(t_indices)],
            f"Backward diffusion from x_{t_indices[-1] + 1}", os.path.join(folder, "backward_diffusion.png")),
    }
