"""Faults a student meets around a run (issue 11): each is refused or handled at start-up with one sentence that
names the value and the fix, and the student's files stay intact."""
import io
import os
import pickle
import signal
import subprocess
import sys
import types
import zipfile

import numpy as np
import pytest
import torch
from conftest import REPO, run_main, tiny_args
from PIL import Image

import trainer as trainer_module
import utils
from kit import fid
from kit.checkpoints import read_checkpoint
from kit.data import ImageData, list_images, load_image

CPU = torch.device("cpu")


@pytest.fixture
def data_never_read(monkeypatch):
    """Fails the test if the run gets as far as listing the training images."""

    def refuse(*args, **kwargs):
        raise AssertionError("the data was read: the check should have come before")

    monkeypatch.setattr(trainer_module, "list_images", refuse)


# --- 1. the FID reference statistics cache and the Inception weights ------------------------------------------------


def write_images(folder, seed, count=12, size=20):
    """Uncompressed PNGs: their file size depends only on their dimensions, never on their pixels."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "cat"), exist_ok=True)
    base = rng.integers(0, 256, (1, 1, 3)) * np.ones((size, size, 3))
    for i in range(count):
        img = (base + rng.normal(0, 40, (size, size, 3))).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(folder, "cat", f"{i:03d}.png"), compress_level=0)
    return folder


def scorer_for(folder):
    data = ImageData(list_images(folder, "cat"), 16, CPU, workers=1)
    return fid.scorer_for_data(data, types.SimpleNamespace(fid_extractor="tiny", dataloader_workers=1), CPU)


def test_fid_statistics_follow_the_pixels_not_the_file_names_and_sizes(tmp_path):
    folder = write_images(str(tmp_path / "data"), seed=0)
    generated = torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    before = scorer_for(folder)
    listing = {f: os.path.getsize(os.path.join(folder, "cat", f)) for f in os.listdir(os.path.join(folder, "cat"))}

    write_images(folder, seed=1)  # other pictures, same names, same byte sizes: the old key could not tell
    assert {f: os.path.getsize(os.path.join(folder, "cat", f)) for f in listing} == listing
    after = scorer_for(folder)

    assert after.cache_path != before.cache_path and os.path.isfile(before.cache_path)
    assert not np.allclose(after.real_stats[0], before.real_stats[0])
    new_pixels = ImageData(list_images(folder, "cat"), 16, CPU).center_crops().permute(0, 2, 3, 1).numpy()
    fresh = fid.FIDScorer(new_pixels, extractor_name="tiny", device=CPU, cache_dir=str(tmp_path / "empty cache"))
    assert after.score(generated) == pytest.approx(fresh.score(generated), rel=1e-9)
    assert abs(after.score(generated) - before.score(generated)) > 1e-3
    # and the same pixels again hit the cache
    assert scorer_for(folder).cache_path == after.cache_path


def npz_bytes(**arrays):
    out = io.BytesIO()
    np.savez(out, **arrays)
    return out.getvalue()


def npy_bytes(array):
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


CORRUPT_CACHES = {
    "truncated": lambda good: good[: len(good) // 2],
    "empty": lambda good: b"",
    "text": lambda good: b"this is not an npz file\n",
    "a pickle": lambda good: pickle.dumps({"mu": [0.0], "sigma": [[1.0]]}),
    "wrong keys": lambda good: npz_bytes(mean=np.zeros(32), cov=np.eye(32)),
    "wrong shapes": lambda good: npz_bytes(mu=np.zeros(32), sigma=np.eye(31)),
    "NaN": lambda good: npz_bytes(mu=np.full(32, np.nan), sigma=np.eye(32)),
    "a plain npy": lambda good: npy_bytes(np.zeros(32)),
    "integer covariance": lambda good: npz_bytes(mu=np.zeros(32, int), sigma=np.eye(32, dtype=int)),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPT_CACHES))
def test_a_bad_fid_cache_file_is_named_recomputed_and_replaced(tmp_path, corruption, capsys):
    folder = write_images(str(tmp_path / "data"), seed=0)
    first = scorer_for(folder)
    path = first.cache_path
    good = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(CORRUPT_CACHES[corruption](good))
    capsys.readouterr()

    second = scorer_for(folder)

    printed = [line for line in capsys.readouterr().out.splitlines() if "FID reference statistics cache" in line]
    assert len(printed) == 1 and path in printed[0] and "recomputing it and replacing the file" in printed[0]
    assert second.cache_path == path
    assert np.allclose(second.real_stats[0], first.real_stats[0]) and np.allclose(second.real_stats[1],
                                                                                  first.real_stats[1])
    mu, sigma = fid.read_statistics(path)  # replaced by a good file
    assert np.allclose(mu, first.real_stats[0]) and np.allclose(sigma, first.real_stats[1])
    assert sorted(os.listdir(os.path.dirname(path))) == [os.path.basename(path)], "temporary files left behind"
    capsys.readouterr()
    scorer_for(folder)  # and the next run reads it silently
    assert "FID reference statistics cache" not in capsys.readouterr().out


def test_an_unwritable_fid_cache_is_said_once_and_fid_still_works(tmp_path, monkeypatch, capsys):
    (tmp_path / "a_file").write_text("in the way of the cache folder")
    monkeypatch.setenv("DDPM_CACHE_DIR", str(tmp_path / "a_file" / "cache"))
    scorer = scorer_for(write_images(str(tmp_path / "data"), seed=0))
    printed = [line for line in capsys.readouterr().out.splitlines() if "FID reference statistics cache" in line]
    assert len(printed) == 1 and "Could not write" in printed[0] and "DDPM_CACHE_DIR" in printed[0]
    assert np.isfinite(scorer.score(torch.rand(4, 3, 16, 16)))


def write_fake_inception(path):
    from test_fid import write_fake_inception as write

    os.makedirs(os.path.dirname(path), exist_ok=True)
    write(path)


def corrupt_inception(path, how):
    write_fake_inception(path)
    good = open(path, "rb").read()
    if how == "truncated":
        data = good[: len(good) * 2 // 3]
    elif how == "garbage":
        data = os.urandom(4096)
    elif how == "flipped bytes":  # same size, a damaged part inside
        middle = good.index(b"PK\x03\x04", len(good) // 3)  # a part's header: damage the data after it
        data = good[: middle + 100] + bytes(b ^ 0xFF for b in good[middle + 100 : middle + 200]) + good[middle + 200 :]
    else:  # "not torchscript": a whole zip archive of something else
        os.unlink(path)
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("notes.txt", "hello")
        return
    with open(path, "wb") as f:
        f.write(data)


@pytest.mark.parametrize("how", ["truncated", "garbage", "flipped bytes", "not torchscript"])
def test_a_corrupt_inception_file_is_named_with_the_fix_at_start_up(tmp_path, how):
    path = os.path.join(os.environ["DDPM_INCEPTION_DIR"], fid.INCEPTION_FILE)
    corrupt_inception(path, how)
    damaged = open(path, "rb").read()
    with pytest.raises(fid.FIDSetupError) as caught:
        fid.ensure_inception_weights()
        fid.build_extractor("inception", CPU)  # an archive that is whole but not clean-fid's network
    message = str(caught.value)
    assert path in message and "Delete it so that the next run downloads it again" in message
    assert "copy a good inception-2015-12-05.pt there" in message and "Traceback" not in message
    assert open(path, "rb").read() == damaged, "the user's file was changed"


def test_a_corrupt_inception_file_stops_training_before_the_data_is_read(tmp_path, image_folder, data_never_read):
    path = os.path.join(os.environ["DDPM_INCEPTION_DIR"], fid.INCEPTION_FILE)
    corrupt_inception(path, "truncated")
    with pytest.raises(utils.FIDSetupError, match="inception-2015-12-05.pt, is unusable .*Delete it"):
        utils.train_diffusion(**tiny_args(tmp_path / "run", image_folder, fid=True))
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_a_good_inception_file_passes_the_check(tmp_path):
    path = os.path.join(os.environ["DDPM_INCEPTION_DIR"], fid.INCEPTION_FILE)
    write_fake_inception(path)
    assert fid.ensure_inception_weights() == path and fid.inception_problem(path) is None


# --- 2. a checkpoint.pt in the way, a --load_path that is a folder ---------------------------------------------------


def test_a_folder_named_checkpoint_pt_is_refused_before_the_data_is_read(tmp_path, image_folder, data_never_read):
    (tmp_path / "checkpoint.pt").mkdir()
    for fresh in (False, True):  # --fresh cannot help: every save would fail on it
        with pytest.raises(utils.ConfigError) as caught:
            utils.train_diffusion(**tiny_args(tmp_path, image_folder, fresh=fresh))
        message = str(caught.value)
        assert str(tmp_path / "checkpoint.pt") in message and "a folder" in message
        assert "Remove or rename it" in message and "--save_folder" in message
    assert (tmp_path / "checkpoint.pt").is_dir() and os.listdir(tmp_path) == ["checkpoint.pt"]


def test_a_checkpoint_pt_that_is_no_regular_file_is_refused(tmp_path, image_folder, data_never_read):
    os.mkfifo(tmp_path / "checkpoint.pt")  # reading it would hang; saving over it would replace a pipe
    with pytest.raises(utils.ConfigError, match=r"checkpoint.pt' is in the way .* not a regular file. Remove or"):
        utils.train_diffusion(**tiny_args(tmp_path, image_folder))


def test_a_damaged_checkpoint_pt_is_refused_at_start_up_and_fresh_replaces_it(tmp_path, image_folder,
                                                                              monkeypatch):
    (tmp_path / "checkpoint.pt").write_bytes(b"half a checkpoint")
    with monkeypatch.context() as patch:
        patch.setattr(trainer_module, "list_images", lambda *a: pytest.fail("the data was read"))
        with pytest.raises(utils.ConfigError) as caught:
            utils.train_diffusion(**tiny_args(tmp_path, image_folder))
    message = str(caught.value)
    assert str(tmp_path / "checkpoint.pt") in message and "is not a checkpoint written by this kit" in message
    assert "--fresh" in message and "weights_only" not in message
    assert (tmp_path / "checkpoint.pt").read_bytes() == b"half a checkpoint"
    summary = utils.train_diffusion(**tiny_args(tmp_path, image_folder, fresh=True, train_steps=1))
    assert summary["step"] == 1 and torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 1


def test_an_unreadable_checkpoint_pt_is_refused_at_start_up(tmp_path, image_folder, monkeypatch):
    utils.train_diffusion(**tiny_args(tmp_path, image_folder, train_steps=1))
    checkpoint = str(tmp_path / "checkpoint.pt")
    monkeypatch.setattr(trainer_module, "list_images", lambda *a: pytest.fail("the data was read"))
    if os.geteuid() == 0:  # root reads any file: let opening this one fail as it does for a student
        real_open = open

        def no_permission(path, *args, **kwargs):
            if os.fspath(path) == checkpoint:
                raise PermissionError(13, "Permission denied", checkpoint)
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr("builtins.open", no_permission)
    else:
        os.chmod(checkpoint, 0)
    try:
        with pytest.raises(utils.ConfigError) as caught:
            utils.train_diffusion(**tiny_args(tmp_path, image_folder, train_steps=2))
    finally:
        os.chmod(checkpoint, 0o644)
    message = str(caught.value)
    assert f"{checkpoint!r} cannot be read (Permission denied)" in message
    assert "Remove or rename it, or pass --fresh" in message


def test_a_load_path_that_is_a_folder_is_refused(tmp_path, image_folder, data_never_read):
    (tmp_path / "old_run").mkdir()
    with pytest.raises(utils.ConfigError) as caught:
        utils.train_diffusion(**tiny_args(tmp_path / "run", image_folder, load_path=str(tmp_path / "old_run")))
    message = str(caught.value)
    assert f"--load_path {str(tmp_path / 'old_run')!r} is a folder, not a checkpoint file" in message
    assert "checkpoint.pt written by training" in message
    with pytest.raises(utils.ConfigError, match="is a folder"):
        utils.visualize_diffusion(**tiny_args(tmp_path / "run", image_folder, load_path=str(tmp_path / "old_run")))
    assert not (tmp_path / "run").exists()


# --- 3. flags that used to crash late ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (dict(sample_grid_size=0), "--sample_grid_size 0: must be a positive whole number"),
        (dict(sample_grid_size=-4), "--sample_grid_size -4: must be a positive whole number"),
        (dict(sample_grid_size=4096), "--sample_grid_size 4096: must be a square number from 1 to 1024"),
        (dict(seed=-1), "--seed -1: must be a whole number from 0 to 4294967295"),
        (dict(seed=2**64), f"--seed {2**64}: must be a whole number from 0 to 4294967295"),
        (dict(seed=2**32), f"--seed {2**32}: must be a whole number from 0 to 4294967295"),
        (dict(fid_num_samples=1), "--fid_num_samples 1: must be from 2 (a covariance needs at least two images)"),
        (dict(fid_num_samples=1, fid=True, fid_extractor="tiny"), "clean-fid recommends at least 2048"),
        (dict(fid_num_samples=10**6), f"--fid_num_samples {10**6}: must be from 2"),
        (dict(time_steps=10**6), f"--time_steps {10**6}: at most 100000 .*The course uses 50; 1000"),
        (dict(image_size=1024), "--image_size 1024: at most 512"),
        (dict(image_size=4, unet_dim_mults=(1, 2, 4, 8)), "--image_size 4: .* divisible by 8"),
        (dict(unet_dim=1024), "--unet_dim 1024: at most 512"),
        (dict(dataloader_workers=100000), "--dataloader_workers 100000: must be between 0 and 256"),
        (dict(log_every=0), "--log_every 0: must be a positive"),
        (dict(grad_accum=-1), "--grad_accum -1: must be a positive"),
        (dict(save_and_sample_every=0), "--save_and_sample_every 0: must be a positive"),
    ],
)
def test_absurd_flags_are_refused_before_any_work(tmp_path, image_folder, data_never_read, overrides, expected):
    with pytest.raises(utils.ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        utils.train_diffusion(**tiny_args(tmp_path / "run", image_folder, **overrides))
    assert not (tmp_path / "run").exists(), "something was written before the options were checked"


def test_the_bounds_accept_the_smallest_and_largest_sensible_values(tmp_path, image_folder):
    summary = utils.train_diffusion(**tiny_args(tmp_path, image_folder, seed=2**32 - 1, sample_grid_size=1,
                                                time_steps=1, train_steps=2, fid=True, fid_extractor="tiny",
                                                fid_num_samples=2))
    assert summary["step"] == 2 and np.isfinite(summary["fid"])
    assert utils.checked_config(dict(image_size=512, unet_dim=512, time_steps=100_000, fid_num_samples=100_000,
                                     sample_grid_size=1024, save_folder=str(tmp_path / "big")))


def test_cli_refuses_a_bad_flag_in_one_line_with_exit_code_2(tmp_path, image_folder):
    result = run_main("--sample_grid_size", "0", "--data_path", image_folder, "--save_folder", tmp_path / "run",
                      "--wandb", "disabled", "--device", "cpu")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: --sample_grid_size 0: must be a positive whole number."]
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


# --- 4. 16-bit grayscale and transparent images ----------------------------------------------------------------------


def test_16_bit_grayscale_keeps_its_gradient(tmp_path):
    gradient = np.tile(np.linspace(0, 65535, 40), (40, 1)).astype(np.uint16)
    Image.fromarray(gradient).save(tmp_path / "gradient.png")
    Image.fromarray(np.full((40, 40), 32768, np.uint16)).save(tmp_path / "mid.png")
    assert Image.open(tmp_path / "gradient.png").mode.startswith("I")
    row = load_image(str(tmp_path / "gradient.png"), 40)[20, :, 0].astype(int)
    assert row[0] <= 1 and row[-1] >= 254 and (np.diff(row) >= 0).all() and len(set(row)) > 30
    assert np.allclose(row, np.linspace(0, 255, 40), atol=4)  # a gradient, not saturated to white
    mid = load_image(str(tmp_path / "mid.png"), 36)
    assert (abs(mid.astype(int) - 128) <= 1).all()


def test_transparent_pixels_are_composited_on_white_and_counted(tmp_path, capsys):
    folder = tmp_path / "cat"
    folder.mkdir()
    red_left_half = np.zeros((40, 40, 4), np.uint8)
    red_left_half[..., 0] = 255
    red_left_half[:, :20, 3] = 255  # the right half is transparent (its hidden color is red too)
    Image.fromarray(red_left_half).save(folder / "a_rgba.png")
    Image.fromarray(red_left_half).convert("P").save(folder / "b_palette.png")  # palette + tRNS transparency
    black_left_half = np.stack([np.zeros((40, 40), np.uint8), red_left_half[..., 3]], axis=-1)
    Image.fromarray(black_left_half, "LA").save(folder / "c_gray_alpha.png")
    opaque = red_left_half.copy()
    opaque[..., 3] = 255
    Image.fromarray(opaque).save(folder / "d_opaque_rgba.png")
    Image.fromarray(opaque[..., :3]).save(folder / "e_rgb.png")

    data = ImageData(list_images(str(tmp_path), "cat"), 36, CPU, workers=1)

    lines = [line for line in capsys.readouterr().out.splitlines() if "transparent" in line]
    example = folder / "a_rgba.png"
    assert lines == [f"3 image(s) had transparent pixels: composited on a white background, e.g. {example}"]
    images = data.images.permute(0, 2, 3, 1).numpy()  # (5, 40, 40, 3), loaded at int(1.12 * 36) = 40
    for transparent in images[:2]:
        assert (transparent[:, :15] == [255, 0, 0]).all() and (transparent[:, 25:] == 255).all()
    assert (images[2][:, :15] == 0).all() and (images[2][:, 25:] == 255).all()  # black, then white
    for opaque_image in images[3:]:
        assert (opaque_image == [255, 0, 0]).all()


# --- 5. a file that is no checkpoint as --load_path -----------------------------------------------------------------


class NotPlainData:
    """Pickled by torch.save; loading it needs weights_only=False, which torch's own error message advises."""


def make_file(path, kind):
    if kind == "random bytes":
        path.write_bytes(os.urandom(2048))
    elif kind == "pickled dict":
        path.write_bytes(pickle.dumps({"step": 3, "model": {}}))
    elif kind == "zip":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("data.txt", "not a checkpoint")
    elif kind == "text":
        path.write_text("step=3\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "torch.save of an object":
        torch.save({"format": 1, "thing": NotPlainData()}, path)
    elif kind == "torch.save of a tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "checkpoint without signature":
        torch.save({"format": 1, "step": 3}, path)
    return str(path)


KINDS = ["random bytes", "pickled dict", "zip", "text", "empty", "torch.save of an object", "torch.save of a tensor",
         "checkpoint without signature"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_file_that_is_no_checkpoint_is_refused_without_unsafe_advice(tmp_path, image_folder, kind):
    path = make_file(tmp_path / "model.pt", kind)
    signature = utils.Config(**{k: v for k, v in tiny_args(tmp_path, image_folder).items()}).model_signature()
    with pytest.raises(utils.ConfigError) as caught:
        read_checkpoint(path, signature)
    with pytest.raises(utils.ConfigError) as through_the_front_door:
        utils.train_diffusion(**tiny_args(tmp_path / "run", image_folder, load_path=path))
    for error in (caught.value, through_the_front_door.value):
        message = str(error)
        assert path in message and "is not a checkpoint" in message and "this kit" in message, message
        assert "--load_path" in message, message
        assert "weights_only" not in message and "Unpickl" not in message and "\n" not in message, message
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


# --- 6. Ctrl-C while main.py is still starting ---------------------------------------------------------------------


def test_ctrl_c_while_importing_torch_prints_one_line_and_exits_130(tmp_path):
    """A real SIGINT, sent once the interpreter reports (through -X importtime) that it is inside `import torch`:
    the import takes seconds after that, so the signal lands in main.py's start-up every time."""
    process = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "main.py"), "--smoke", "--save_folder", str(tmp_path / "run"),
         "--wandb", "disabled", "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"},
    )
    seen = []
    try:
        for line in process.stderr:
            seen.append(line)
            if line.rstrip().endswith(" torch._utils"):  # one of the first parts of `import torch`
                process.send_signal(signal.SIGINT)
                break
        else:
            pytest.fail("main.py never imported torch: " + "".join(seen[-5:]))
        rest = process.stderr.read()
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    messages = [line for line in rest.splitlines() if not line.startswith("import time:")]
    assert "Traceback" not in rest and "KeyboardInterrupt" not in rest, rest[-3000:]
    assert messages == ["Interrupted before training started; nothing was changed."], rest[-3000:]
    assert process.returncode == 130
    assert not (tmp_path / "run").exists()
