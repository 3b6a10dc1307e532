"""FID through clean-fid's real code path, offline: a small extractor the test builds stands in for Inception."""
import http.server
import os
import threading
import time

import numpy as np
import pytest
import torch
from cleanfid import fid as cleanfid_fid
from conftest import run_main, tiny_args
from PIL import Image

from kit import fid
import utils
from kit.data import ImageData, list_images


def save_pngs(images_uint8_hwc, folder):
    os.makedirs(folder, exist_ok=True)
    for i, img in enumerate(images_uint8_hwc):
        Image.fromarray(img).save(os.path.join(folder, f"{i:04d}.png"))
    return folder


@pytest.fixture
def real_images(image_folder):
    data = ImageData(list_images(image_folder, "cat"), 16, torch.device("cpu"))
    return data.center_crops().permute(0, 2, 3, 1).numpy()


def test_in_memory_fid_equals_clean_fid_on_folders(tmp_path, real_images):
    scorer = fid.FIDScorer(real_images, extractor_name="tiny", device=torch.device("cpu"),
                           cache_dir=str(tmp_path / "cache"), cache_key="test")
    generated = torch.rand(40, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    ours = scorer.score(generated)

    real_dir = save_pngs(real_images, str(tmp_path / "real"))
    gen_dir = save_pngs(fid.to_uint8_hwc(generated), str(tmp_path / "gen"))
    reference = cleanfid_fid.compute_fid(gen_dir, real_dir, mode="clean", custom_feat_extractor=fid.TinyExtractor(),
                                         num_workers=0, batch_size=16, device=torch.device("cpu"), verbose=False)
    assert ours == pytest.approx(reference, abs=1e-3)
    assert ours > 1.0, "random noise should be far from the real images"
    # and the real images against themselves score about 0
    assert scorer.score(torch.from_numpy(real_images).permute(0, 3, 1, 2).float() / 255) < 1e-3


def test_frechet_distance_equals_clean_fids_on_rank_deficient_statistics():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 512)), rng.normal(size=(200, 512)) * 1.3 + 0.1  # fewer images than features
    stats_a, stats_b = fid.statistics(a), fid.statistics(b)
    ours = fid.frechet_distance(stats_a, stats_b, fid.symmetric_sqrt(stats_b[1]))
    reference = cleanfid_fid.frechet_distance(stats_a[0], stats_a[1], stats_b[0], stats_b[1])
    assert ours == pytest.approx(reference, rel=1e-6)


def test_reference_statistics_are_computed_once_and_cached(tmp_path, real_images, monkeypatch):
    kwargs = dict(extractor_name="tiny", device=torch.device("cpu"), cache_dir=str(tmp_path), cache_key="k")
    first = fid.FIDScorer(real_images, **kwargs)
    assert os.path.isfile(first.cache_path)
    calls = []
    original = fid.FeatureComputer.__call__
    monkeypatch.setattr(fid.FeatureComputer, "__call__", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    second = fid.FIDScorer(real_images, **kwargs)
    assert calls == [], "the real images' features were recomputed despite the cache"
    assert np.allclose(first.real_stats[0], second.real_stats[0])
    other = fid.FIDScorer(real_images[:20], **{**kwargs, "cache_key": "other data"})
    assert calls == [1] and other.cache_path != first.cache_path


class FakeInception(torch.nn.Module):
    """A small TorchScript module shaped like clean-fid's inception-2015-12-05.pt (a `layers` part giving
    2048 features), so the weight-loading path runs offline."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, 2048))

    def forward(self, x, return_features: bool = False):
        return self.layers(x)


def write_fake_inception(path):
    torch.manual_seed(0)
    torch.jit.script(FakeInception()).save(str(path))


def test_inception_path_downloads_once_then_loads_through_clean_fid(tmp_path, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    write_fake_inception(served / fid.INCEPTION_FILE)
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(served), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("DDPM_INCEPTION_URL", f"http://127.0.0.1:{server.server_port}/{fid.INCEPTION_FILE}")
        target = tmp_path / "inception"
        target.mkdir()
        monkeypatch.setenv("DDPM_INCEPTION_DIR", str(target))
        path = fid.ensure_inception_weights()
        assert path == str(target / fid.INCEPTION_FILE)
        assert (target / fid.INCEPTION_FILE).read_bytes() == (served / fid.INCEPTION_FILE).read_bytes()
    finally:
        server.shutdown()
    extractor = fid.build_extractor("inception", torch.device("cpu"))  # no server now: reads the local file
    features = fid.FeatureComputer(extractor, torch.device("cpu"))(np.zeros((3, 16, 16, 3), np.uint8))
    assert features.shape == (3, 2048)


def test_unobtainable_inception_weights_fail_fast_with_instructions(tmp_path):
    start = time.monotonic()
    with pytest.raises(fid.FIDSetupError, match=r"could not be downloaded .* copy it to .*inception-2015-12-05.pt"):
        fid.ensure_inception_weights()
    assert time.monotonic() - start < 10
    assert not os.listdir(os.environ["DDPM_INCEPTION_DIR"]) if os.path.isdir(os.environ["DDPM_INCEPTION_DIR"]) else True


def test_cli_fid_without_weights_stops_before_training(tmp_path, image_folder):
    (tmp_path / "inception").mkdir()
    result = run_main("--fid", "--data_path", image_folder, "--save_folder", tmp_path / "run", "--wandb", "disabled",
                      "--train_steps", "2", "--device", "cpu")
    assert result.returncode == 1
    assert "--fid needs clean-fid's Inception weights" in result.stderr and "run without --fid" in result.stderr
    assert "Training" not in result.stderr and not (tmp_path / "run" / "checkpoint.pt").exists()


def test_fid_is_logged_per_milestone(tmp_path, image_folder):
    summary = utils.train_diffusion(**tiny_args(tmp_path, image_folder, fid=True, fid_extractor="tiny"))
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    fids = {int(line.split(",")[0]): float(line.split(",")[2]) for line in lines[1:] if line.split(",")[2]}
    assert sorted(fids) == [2, 4] and all(np.isfinite(v) and v > 0 for v in fids.values())
    assert summary["fid"] == pytest.approx(fids[4], abs=1e-4)
    assert (tmp_path / "fid.png").is_file()


def test_a_single_fid_point_is_drawn(tmp_path):
    """After the first save the FID curve has one point: it must show (a line alone needs two)."""
    from PIL import Image

    from kit.figures import write_metrics

    write_metrics(tmp_path, losses=[(99, 0.3), (100, 0.2)], fids=[(100, 57.0)])
    pixels = np.asarray(Image.open(tmp_path / "fid.png").convert("RGB")).astype(int)
    matplotlib_blue = np.array([31, 119, 180])  # the curve's colour (C0); axes, ticks and grid are black and gray
    assert (np.abs(pixels - matplotlib_blue).sum(axis=-1) < 60).sum() > 20, "fid.png shows no point"
