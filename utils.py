"""Glue shared by main.py, the notebooks and the tests.

`Config` is the one source of truth for every option and its default: main.py builds its command line from
it, and `train_diffusion(**args)` / `visualize_diffusion(**args)` take the same names (the notebooks call them).
"""
import contextlib
import dataclasses
import math
import os
import random
import tempfile
from dataclasses import dataclass, field
from typing import Optional, Tuple

import numpy as np
import torch

DATA_CLASSES = ("cat", "dog", "wild", "all")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
DATA_HELP = (
    "Get the data with `python data/prepare_afhq.py --download` (or unzip the course's data zip so that "
    "data/train/cat/*.jpg exists), then pass --data_path to the folder holding cat/ dog/ wild/. See data/README.md."
)


class ConfigError(ValueError):
    """Bad user input, found before any long work starts. The message names the value and the fix."""


def option(default, help, **kwargs):
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class Config:
    # handout table 2: diffusion and training
    time_steps: int = option(50, "diffusion steps T")
    train_steps: int = option(10000, "optimizer steps to train for (in total, counting resumed ones)")
    save_folder: str = option("./results", "where checkpoints, samples, metrics and figures go")
    data_path: str = option("./data/train", "folder holding cat/ dog/ wild/ with the training images")
    load_path: Optional[str] = option(None, "checkpoint to load (for --visualize, or to start training from)")
    data_class: str = option("cat", "which AFHQ class to train on", choices=DATA_CLASSES)
    image_size: int = option(32, "image side in pixels (must be divisible by 2^(levels-1))")
    batch_size: int = option(32, "images per micro-batch")
    grad_accum: int = option(2, "micro-batches accumulated per optimizer step (the course's trainer uses 2)")
    learning_rate: float = option(1e-3, "Adam learning rate")
    # handout table 3: model
    unet_dim: int = option(16, "base channel width of the U-Net")
    unet_dim_mults: Tuple[int, ...] = option((1, 2, 4, 8), "channel multiplier per U-Net level")
    # handout table 4: evaluation and logging
    fid: bool = option(False, "compute FID against the real images at every save")
    save_and_sample_every: int = option(1000, "steps between checkpoints, sample grids and FID")
    visualize: bool = option(
        False, "draw the forward and backward diffusion figures: of --load_path, or after training without it"
    )
    dataloader_workers: int = option(4, "threads that decode the images once at start-up")
    # this kit's additions
    seed: int = option(0, "random seed: a seeded run is reproducible on the same device")
    device: str = option("auto", "where to run: auto picks cuda > mps > cpu", choices=("auto", "cuda", "mps", "cpu"))
    wandb: str = option(
        "auto", "auto: online if a wandb key is set up, else offline files", choices=("auto", "online", "offline", "disabled")
    )
    wandb_project: str = option("ddpm-afhq", "wandb project name")
    fresh: bool = option(False, "ignore the checkpoint in --save_folder and start over")
    smoke: bool = option(
        False, "check the setup: the whole pipeline on a few generated images in --save_folder, in under a minute"
    )
    fid_num_samples: int = option(1000, "generated images per FID evaluation")
    fid_extractor: str = option(
        "inception", "FID features: clean-fid's Inception, or 'tiny' (a random conv net, for tests only)",
        choices=("inception", "tiny"),
    )
    sample_grid_size: int = option(64, "images in each saved sample grid (a square number)")
    log_every: int = option(50, "steps between loss read-backs from the device (every step is still logged)")
    amp: str = option(
        "auto", "mixed precision: auto = bf16 on Ampere+ GPUs and bf16-capable CPUs, fp16 on older GPUs, else off",
        choices=("auto", "bf16", "fp16", "off"),
    )
    compile: bool = option(False, "torch.compile the U-Net (CUDA; slower start, faster steps)")

    @classmethod
    def from_args(cls, **args):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - names)
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown}; valid options are: {', '.join(sorted(names))}")
        if "unet_dim_mults" in args and args["unet_dim_mults"] is not None:
            args["unet_dim_mults"] = tuple(int(m) for m in args["unet_dim_mults"])
        return cls(**{k: v for k, v in args.items() if not (v is None and k != "load_path")})

    def model_signature(self):
        """What a checkpoint's weights depend on: loading into a different setting is refused."""
        return {
            "image_size": self.image_size,
            "unet_dim": self.unet_dim,
            "unet_dim_mults": list(self.unet_dim_mults),
            "time_steps": self.time_steps,
        }


def validate_config(cfg: Config):
    """Check everything that can be checked without reading the data. Raises ConfigError."""
    for name in ("train_steps", "batch_size", "grad_accum", "time_steps", "save_and_sample_every", "unet_dim",
                 "image_size", "fid_num_samples", "log_every"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"--{name} {value!r}: must be a positive whole number.")
    if not (isinstance(cfg.learning_rate, (int, float)) and math.isfinite(cfg.learning_rate) and cfg.learning_rate > 0):
        raise ConfigError(f"--learning_rate {cfg.learning_rate!r}: must be a positive number, e.g. 1e-3.")
    if cfg.dataloader_workers < 0:
        raise ConfigError(f"--dataloader_workers {cfg.dataloader_workers}: must be 0 or more.")
    if cfg.data_class not in DATA_CLASSES:
        raise ConfigError(f"--data_class {cfg.data_class!r}: unknown class; choose one of {', '.join(DATA_CLASSES)}.")
    if not cfg.unet_dim_mults or any(m <= 0 for m in cfg.unet_dim_mults):
        raise ConfigError(f"--unet_dim_mults {list(cfg.unet_dim_mults)}: give positive integers, e.g. 1 2 4 8.")
    downsamples = 2 ** (len(cfg.unet_dim_mults) - 1)
    if cfg.image_size % downsamples:
        raise ConfigError(
            f"--image_size {cfg.image_size}: a U-Net with {len(cfg.unet_dim_mults)} levels halves the image "
            f"{len(cfg.unet_dim_mults) - 1} times, so the size must be divisible by {downsamples} "
            f"(e.g. {max(downsamples, cfg.image_size // downsamples * downsamples)})."
        )
    if cfg.unet_dim % 8:
        raise ConfigError(f"--unet_dim {cfg.unet_dim}: GroupNorm uses 8 groups, so it must be a multiple of 8.")
    root = math.isqrt(cfg.sample_grid_size)
    if root * root != cfg.sample_grid_size:
        raise ConfigError(f"--sample_grid_size {cfg.sample_grid_size}: must be a square number such as 36 or 64.")
    if cfg.load_path is not None and not os.path.isfile(cfg.load_path):
        raise ConfigError(
            f"--load_path {cfg.load_path!r}: no such checkpoint file. Point it at a checkpoint.pt written by training "
            f"(e.g. {os.path.join(cfg.save_folder, 'checkpoint.pt')})."
        )
    check_writable(cfg.save_folder)


def check_writable(folder):
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as error:
        raise ConfigError(
            f"--save_folder {folder!r} is not writable ({error.strerror}): choose a folder you can write to."
        ) from None


def select_device(name="auto"):
    """cuda > mps > cpu for 'auto'; an explicit choice must be available."""
    mps_available = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if mps_available else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is visible to PyTorch. Use --device auto or cpu, "
                          "or install a CUDA build of torch on a GPU machine.")
    if name == "mps" and not mps_available:
        raise ConfigError("--device mps: Apple's MPS backend is not available here. Use --device auto or cpu.")
    if name not in ("cuda", "mps", "cpu"):
        raise ConfigError(f"--device {name!r}: choose auto, cuda, mps or cpu.")
    return torch.device(name)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


@contextlib.contextmanager
def isolated_rng(device):
    """Run a block (sampling, FID, figures) without moving the training RNG streams, so that where the
    samples are drawn does not change the training run (and resumed runs stay bit-identical)."""
    accelerated = device.type != "cpu"
    devices = [device.index or 0] if accelerated else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if accelerated else "cuda"):
        yield


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path, write):
    """Write through a temporary file in the same folder, then rename: readers see the old or the new file,
    never a partial one, even if the process is killed or the disk fills up mid-write."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes the file private; give it the usual mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def list_images(data_path, data_class):
    """Image files for a class ('all' = every class folder). Raises ConfigError naming the fix."""
    if not os.path.isdir(data_path):
        raise ConfigError(f"--data_path {data_path!r}: no such folder. {DATA_HELP}")
    classes = [c for c in DATA_CLASSES if c != "all"] if data_class == "all" else [data_class]
    files = []
    for name in classes:
        folder = os.path.join(data_path, name)
        if os.path.isdir(folder):
            files += sorted(
                os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS)
            )
    if not files:
        looked = ", ".join(os.path.join(data_path, c) for c in classes)
        raise ConfigError(f"--data_path {data_path!r} has no .jpg/.png images for --data_class {data_class} "
                          f"(looked in {looked}). {DATA_HELP}")
    return files


def train_diffusion(**args):
    """Train (or resume) with the given options; returns a summary dict (see Trainer.train)."""
    from trainer import Trainer

    trainer = Trainer(Config.from_args(**args))
    try:
        summary = trainer.train()
        if trainer.cfg.visualize:
            summary.update(trainer.visualize())
        return summary
    finally:
        trainer.close()


def visualize_diffusion(**args):
    """Forward and backward diffusion figures (handout 7.4, 7.5) for a trained checkpoint."""
    from trainer import Trainer

    args = {**args, "visualize": True}
    trainer = Trainer(Config.from_args(**args), for_training=False)
    try:
        return trainer.visualize()
    finally:
        trainer.close()
