"""The training images: listing, decoding once into a uint8 tensor on the device, augmentation there, and the
order of batches. Also the generated images that --smoke and the tests train on."""
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from diffusion import normalize_to_neg_one_to_one
from kit.errors import ConfigError

DATA_CLASSES = ("cat", "dog", "wild", "all")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
DATA_HELP = (
    "Get the data with `python data/prepare_afhq.py --download` (or unzip the course's data zip so that "
    "data/train/cat/*.jpg exists), then pass --data_path to the folder holding cat/ dog/ wild/. See data/README.md."
)


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


SIXTEEN_BIT_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # how Pillow opens 16-bit grayscale PNGs
TRANSPARENT_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
BACKGROUND = (255, 255, 255)  # transparent pixels are shown on white, as an image viewer or a web page does


def to_rgb(img):
    """An 8-bit RGB copy of a PIL image, and whether it had transparent pixels. 16-bit grayscale is scaled to
    8 bits (value / 257: 65535 -> 255, 32768 -> 128) rather than saturated, as convert("RGB") does; images
    with transparency (an alpha channel, or a palette or tRNS transparent color) are composited on white rather
    than having their alpha dropped, which would show the colors hidden under transparent pixels."""
    if img.mode in SIXTEEN_BIT_GRAY_MODES:
        values = np.asarray(img).astype(np.float64)
        return Image.fromarray(np.clip(np.round(values / 257), 0, 255).astype(np.uint8), "L").convert("RGB"), False
    if img.mode in TRANSPARENT_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        if rgba.getchannel("A").getextrema()[0] < 255:
            background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
            return Image.alpha_composite(background, rgba).convert("RGB"), True
        return rgba.convert("RGB"), False
    return img.convert("RGB"), False


def decode_image(path, load_size):
    """Decode one image (see `to_rgb`) and resize it as torchvision's Resize(load_size) does on a PIL image
    (bilinear, shorter side to load_size), then center-crop to a square so that all images stack into one tensor.
    Returns (uint8 (load_size, load_size, 3) array, whether the image had transparent pixels)."""
    with Image.open(path) as img:
        img, transparent = to_rgb(img)
        w, h = img.size
        scale = load_size / min(w, h)
        img = img.resize((max(load_size, round(w * scale)), max(load_size, round(h * scale))), Image.BILINEAR)
        left, top = (img.size[0] - load_size) // 2, (img.size[1] - load_size) // 2
        return np.asarray(img.crop((left, top, left + load_size, top + load_size)), dtype=np.uint8), transparent


def load_image(path, load_size):
    """The uint8 (load_size, load_size, 3) array of one image (see `decode_image`)."""
    return decode_image(path, load_size)[0]


class ImageData:
    """All training images, decoded once, as a (N, 3, L, L) uint8 tensor on the training device with
    L = int(1.12 * image_size). Batches get a random image_size crop and a random horizontal flip, in [-1, 1]."""

    def __init__(self, files, image_size, device, workers=4):
        self.image_size = image_size
        self.load_size = int(1.12 * image_size)

        def decode(path):
            try:
                return decode_image(path, self.load_size)
            except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError):
                return None

        with ThreadPoolExecutor(max(1, workers)) as pool:
            decoded = list(tqdm(pool.map(decode, files), total=len(files), desc="Decoding images", leave=False))
        skipped = [f for f, img in zip(files, decoded) if img is None]
        transparent = [f for f, img in zip(files, decoded) if img is not None and img[1]]
        images = [img[0] for img in decoded if img is not None]
        if skipped:
            print(f"Skipped {len(skipped)} unreadable or non-image file(s), e.g. {skipped[0]}")
        if transparent:
            print(f"{len(transparent)} image(s) had transparent pixels: composited on a white background, "
                  f"e.g. {transparent[0]}")
        if not images:
            raise ConfigError(
                f"none of the {len(files)} files under {os.path.dirname(files[0])!r} could be read as an image: "
                "check that the data folder holds .jpg/.png images (see data/README.md)."
            )
        self.files = [f for f, img in zip(files, decoded) if img is not None]
        self.images = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous().to(device)
        self.device = device
        self._crop_range = torch.arange(image_size, device=device)  # pixel offsets inside a crop

    def __len__(self):
        return len(self.images)

    def batch(self, indices):
        """Random crop + flip of the given images (indices on the data's device, e.g. from `BatchOrder`), as floats
        in [-1, 1], drawn from the device's global RNG."""
        x = self.images[indices]
        b = x.shape[0]
        slack = self.load_size - self.image_size
        offsets = torch.randint(0, slack + 1, (b, 2), device=self.device)
        rows = (offsets[:, 0, None] + self._crop_range)[:, None, :, None]  # (b, 1, S, 1)
        cols = (offsets[:, 1, None] + self._crop_range)[:, None, None, :]  # (b, 1, 1, S)
        channels = torch.arange(x.shape[1], device=self.device)[None, :, None, None]
        x = x[torch.arange(b, device=self.device)[:, None, None, None], channels, rows, cols]
        flip = torch.rand(b, device=self.device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return normalize_to_neg_one_to_one(x.float() / 255)

    def center_crops(self):
        """The deterministic counterpart of the training crops: the reference images for FID."""
        start = (self.load_size - self.image_size) // 2
        return self.images[:, :, start : start + self.image_size, start : start + self.image_size]


class BatchOrder:
    """Which images each micro-batch uses: a fresh permutation per epoch, derived from (seed, epoch), so the
    order depends only on the step and a resumed run sees the same batches as an uninterrupted one, on any
    device. The permutation is drawn on the CPU and copied to `device` once per epoch: a micro-batch's indices
    are a slice of it there, not a host-to-device copy (which on a GPU waits for the queued work twice a step)."""

    def __init__(self, num_images, seed, device=torch.device("cpu")):
        self.num_images = num_images
        self.seed = seed
        self.device = device
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch):
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.num_images, generator=generator).to(self.device)
        return self._perm

    def indices(self, start, count):
        """Images start .. start+count-1 of the endless stream of epoch permutations."""
        out = []
        while count > 0:
            epoch, offset = divmod(start, self.num_images)
            take = min(count, self.num_images - offset)
            out.append(self._permutation(epoch)[offset : offset + take])
            start, count = start + take, count - take
        return torch.cat(out)


def make_smoke_data(folder, count=48, size=36, seed=0):
    """A few generated images (soft colored blobs) in the homework's folder layout, for --smoke."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "cat"), exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(count):
        cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.35)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None]
        color, background = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        img = (blob * color + (1 - blob) * background).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(folder, "cat", f"smoke_{i:03d}.png"))
    return folder
