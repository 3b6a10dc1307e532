"""FID with clean-fid's features and resizing, without the folder round-trip.

clean-fid's folder API (`compute_fid(gen_dir, real_dir)`) writes PNGs, reads them back and recomputes the real
images' features at every evaluation. Here the real images' statistics are computed once per set of reference
images (keyed on their pixels, so changed images are never scored against stale statistics) and extractor, and
cached on disk; generated images go from memory to the feature extractor in large batches, through clean-fid's
own resizer and Frechet distance, so the value equals the folder-based one on the same images.
"""
import hashlib
import http.client
import os
import platform
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from tqdm.auto import tqdm

from kit.errors import FIDSetupError
from kit.files import atomic_write

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
# clean-fid's own place for the weights; DDPM_INCEPTION_DIR moves it (e.g. to a Drive folder that persists)
DEFAULT_INCEPTION_DIR = "./" if platform.system() == "Windows" else "/tmp"


def inception_dir():
    return os.environ.get("DDPM_INCEPTION_DIR", DEFAULT_INCEPTION_DIR)


def statistics_cache_dir():
    """Where the real images' statistics are cached between runs (DDPM_CACHE_DIR moves it)."""
    return os.environ.get("DDPM_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "ddpm-homework"))


def inception_problem(path):
    """What is wrong with an Inception weights file (a TorchScript zip archive), or None if it is whole. Reads
    the file once to check every part's checksum (a fraction of a second for its 95 MB)."""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except zipfile.BadZipFile:
        return "it is truncated or not a TorchScript archive"
    except OSError as error:
        return f"it cannot be read: {error.strerror or error}"
    except Exception as error:  # noqa: BLE001 - zlib or struct errors of a damaged archive
        return f"it is damaged: {type(error).__name__}"
    return f"its part {damaged} is damaged" if damaged is not None else None


def damaged_inception_error(path, problem):
    return FIDSetupError(
        f"the Inception weights file for --fid, {path}, is unusable ({problem}). Delete it so that the next run "
        f"downloads it again, or copy a good {INCEPTION_FILE} there (downloaded on a machine with internet access "
        f"from {INCEPTION_URL}); or run without --fid."
    )


def ensure_inception_weights(url=None, timeout=30):
    """Make sure clean-fid's Inception weights are on disk and whole, downloading them once if needed. Raises
    FIDSetupError naming the file and the fix, at start-up rather than at the first evaluation."""
    path = os.path.join(inception_dir(), INCEPTION_FILE)
    if os.path.isfile(path) and os.path.getsize(path) > 0:
        problem = inception_problem(path)
        if problem:
            raise damaged_inception_error(path, problem)
        return path
    url = url or os.environ.get("DDPM_INCEPTION_URL", INCEPTION_URL)
    tmp = path + ".part"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc="Inception weights for FID") as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
        if total is not None and os.path.getsize(tmp) != total:
            raise OSError(f"the download stopped after {os.path.getsize(tmp)} of {total} bytes")
        problem = inception_problem(tmp)
        if problem:
            raise ValueError(f"the downloaded file is unusable: {problem}")
        os.replace(tmp, path)
    except (OSError, ValueError, http.client.HTTPException) as error:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise FIDSetupError(
            f"--fid needs clean-fid's Inception weights, which could not be downloaded from {url} ({error}). "
            f"Download {INCEPTION_FILE} on a machine with internet access and copy it to {path} "
            f"(or to the folder named by the DDPM_INCEPTION_DIR environment variable), or run without --fid."
        ) from None
    return path


class TinyExtractor(torch.nn.Module):
    """A small fixed random conv net with the same interface as clean-fid's Inception
    ((b, 3, 299, 299) in [0, 255] -> (b, features)). For tests and --smoke only: its FID is not comparable
    with published numbers."""

    def __init__(self, features=32, seed=0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.conv1 = torch.nn.Conv2d(3, 16, 7, stride=4)
        self.conv2 = torch.nn.Conv2d(16, features, 5, stride=4)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=generator) * 0.1
        self.requires_grad_(False)

    def forward(self, x):
        x = torch.nn.functional.avg_pool2d(x / 128 - 1, 2)
        x = torch.relu(self.conv1(x))
        return self.conv2(x).mean(dim=(2, 3))


def build_extractor(name, device):
    """The feature extractor as clean-fid calls it: a function from a float (b, 3, 299, 299) batch to features."""
    if name == "tiny":
        return TinyExtractor().to(device).eval()
    if name == "inception":
        ensure_inception_weights()
        from cleanfid.inception_torchscript import InceptionV3W

        # what clean-fid's build_feature_extractor("clean") builds, reading the weights from inception_dir()
        try:
            return InceptionV3W(inception_dir(), download=False, resize_inside=False).to(device).eval()
        except Exception as error:  # noqa: BLE001 - a whole archive that is not clean-fid's network
            raise damaged_inception_error(os.path.join(inception_dir(), INCEPTION_FILE),
                                          f"torch could not load it as clean-fid's Inception network: "
                                          f"{type(error).__name__}") from None
    raise FIDSetupError(f"unknown FID extractor {name!r}: choose 'inception' or 'tiny'.")


def to_uint8_hwc(images):
    """(b, c, h, w) floats in [0, 1] -> uint8 (b, h, w, c), rounded exactly as saving a PNG does."""
    return images.mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class FeatureComputer:
    """Resize uint8 images the clean-fid way (PIL bicubic, float) and extract features in large batches."""

    def __init__(self, extractor, device, batch_size=None, workers=4):
        from cleanfid.resize import build_resizer

        self.extractor = extractor
        self.device = device
        self.batch_size = batch_size or (256 if device.type == "cuda" else 64)
        self.resize = build_resizer("clean")
        self.pool = ThreadPoolExecutor(max(1, workers))  # PIL resizes release the GIL

    def __call__(self, images_uint8_hwc, description="FID features"):
        from cleanfid.fid import get_batch_features

        features = []
        for start in tqdm(range(0, len(images_uint8_hwc), self.batch_size), desc=description, leave=False):
            chunk = images_uint8_hwc[start : start + self.batch_size]
            resized = np.stack(list(self.pool.map(self.resize, chunk)))  # (b, 299, 299, 3) float32
            batch = torch.from_numpy(resized).permute(0, 3, 1, 2)
            features.append(get_batch_features(batch, self.extractor, self.device))
        return np.concatenate(features)


def statistics(features):
    """Mean and covariance exactly as clean-fid computes them."""
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


def symmetric_sqrt(matrix):
    """Square root of a symmetric positive semi-definite matrix, through its eigendecomposition."""
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T


def frechet_distance(stats, reference_stats, reference_sqrt):
    """||mu - mu_r||^2 + Tr(S) + Tr(S_r) - 2 Tr((S S_r)^(1/2)), the quantity clean-fid computes.

    clean-fid takes scipy's sqrtm of the non-symmetric S S_r at every call (about 15 s for 2048 features on a
    CPU). (S S_r)^(1/2) has the same eigenvalues as the symmetric S_r^(1/2) S S_r^(1/2), whose square roots we
    sum instead, with S_r^(1/2) computed once per reference (tests/test_fid.py checks the agreement)."""
    mu, sigma = stats
    mu_r, sigma_r = reference_stats
    eigenvalues = np.linalg.eigvalsh(reference_sqrt @ sigma @ reference_sqrt)
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0, None)).sum()
    return float(((mu - mu_r) ** 2).sum() + np.trace(sigma) + np.trace(sigma_r) - 2 * trace_sqrt)


def reference_key(real_images_uint8_hwc, extractor_name, label=None):
    """A key for the real images' statistics: a hash of their pixels, with the extractor's name and the images'
    shape (so their size). File names and sizes are no key: images changed in place keep both."""
    digest = hashlib.sha256(f"{extractor_name}|{real_images_uint8_hwc.shape}|{real_images_uint8_hwc.dtype}|"
                            f"{label or ''}".encode())
    digest.update(np.ascontiguousarray(real_images_uint8_hwc).data)
    return digest.hexdigest()[:24]


def read_statistics(path):
    """(mu, sigma) from a cache file written by FIDScorer. Raises ValueError saying what is wrong with it."""
    try:
        with np.load(path, allow_pickle=False) as cached:
            mu, sigma = np.asarray(cached["mu"]), np.asarray(cached["sigma"])
    except Exception as error:  # noqa: BLE001 - truncated, not an npz, missing keys: all mean "recompute"
        reason = error.strerror if isinstance(error, OSError) and error.strerror else type(error).__name__
        raise ValueError(f"not a readable statistics file: {reason}") from None
    if not (mu.ndim == 1 and mu.size > 0 and sigma.shape == (mu.size, mu.size)):
        raise ValueError(f"wrong shapes: mean {mu.shape}, covariance {sigma.shape}")
    if not (np.issubdtype(mu.dtype, np.floating) and np.issubdtype(sigma.dtype, np.floating)):
        raise ValueError(f"wrong types: {mu.dtype}, {sigma.dtype}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError("it holds NaN or infinite values")
    return mu, sigma


class FIDScorer:
    """FID of generated images against cached statistics of the real ones (keyed on their pixels; `cache_key`
    is an optional extra label)."""

    def __init__(self, real_images_uint8_hwc, *, extractor_name, device, cache_dir, cache_key=None, workers=4):
        self.features = FeatureComputer(build_extractor(extractor_name, device), device, workers=workers)
        key = reference_key(real_images_uint8_hwc, extractor_name, cache_key)
        size = "x".join(map(str, real_images_uint8_hwc.shape[1:3]))
        self.cache_path = os.path.join(cache_dir, f"fid_stats_{extractor_name}_{size}_{key}.npz")
        self.real_stats = self._load_or_compute(real_images_uint8_hwc)
        self.real_sigma_sqrt = symmetric_sqrt(self.real_stats[1])

    def _load_or_compute(self, real_images):
        if os.path.lexists(self.cache_path):
            try:
                return read_statistics(self.cache_path)
            except ValueError as problem:
                print(f"The FID reference statistics cache {self.cache_path} is unusable ({problem}): "
                      "recomputing it and replacing the file.")
        mu, sigma = statistics(self.features(real_images, description="FID reference statistics (once)"))
        try:
            os.makedirs(os.path.dirname(self.cache_path), exist_ok=True)
            atomic_write(self.cache_path, lambda f: np.savez(f, mu=mu, sigma=sigma))
        except OSError as error:
            print(f"Could not write the FID reference statistics cache {self.cache_path} "
                  f"({error.strerror or error}): continuing without it (set DDPM_CACHE_DIR to a writable folder).")
        return mu, sigma

    def score(self, images):
        """images: (b, c, h, w) floats in [0, 1], as Diffusion.sample returns them."""
        stats = statistics(self.features(to_uint8_hwc(images), description="FID"))
        return frechet_distance(stats, self.real_stats, self.real_sigma_sqrt)


def scorer_for_data(data, cfg, device):
    """The FIDScorer for a run: the center crops of its training images (kit.data.ImageData) as the reference,
    its statistics cached under a hash of those pixels."""
    real = data.center_crops().permute(0, 2, 3, 1).cpu().numpy()
    return FIDScorer(real, extractor_name=cfg.fid_extractor, device=device, cache_dir=statistics_cache_dir(),
                     workers=max(1, cfg.dataloader_workers))
