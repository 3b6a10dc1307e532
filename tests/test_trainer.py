"""The training pipeline: data on tensors, the loop, checkpoints, metrics, figures, resume and determinism."""
import csv
import os

import numpy as np
import pytest
import torch
from conftest import SHARED_AFHQ, tiny_args
from PIL import Image

import utils
from kit.data import BatchOrder, ImageData, list_images, load_image
from trainer import Trainer


def test_image_data_batches_are_crops_and_flips_of_the_resized_images(image_folder):
    files = list_images(image_folder, "cat")
    data = ImageData(files, image_size=32, device=torch.device("cpu"), workers=2)
    assert data.images.shape == (48, 3, 35, 35) and data.images.dtype == torch.uint8  # int(1.12 * 32) = 35
    # the stored image is the PIL bilinear resize that torchvision's Resize(35) makes
    expected = np.asarray(Image.open(files[0]).convert("RGB").resize((35, 35), Image.BILINEAR))
    assert np.array_equal(data.images[0].permute(1, 2, 0).numpy(), expected)

    torch.manual_seed(0)
    indices = torch.zeros(400, dtype=torch.long)  # one image, many random crops
    batch = data.batch(indices)
    assert batch.shape == (400, 3, 32, 32) and batch.min() >= -1 and batch.max() <= 1
    source = data.images[0].float() / 255 * 2 - 1
    seen_offsets, flips = set(), 0
    for img in batch:
        found = None
        for dy in range(4):
            for dx in range(4):
                crop = source[:, dy : dy + 32, dx : dx + 32]
                if torch.allclose(img, crop):
                    found = (dy, dx, False)
                elif torch.allclose(img, crop.flip(-1)):
                    found = (dy, dx, True)
        assert found is not None, "a batch image is not a 32x32 crop (or its mirror) of the 35x35 source"
        seen_offsets.add(found[:2])
        flips += found[2]
    assert len(seen_offsets) == 16, f"crop offsets should cover 0..3 x 0..3, saw {sorted(seen_offsets)}"
    assert 140 < flips < 260, f"about half the crops should be flipped, got {flips} of 400"


def test_load_image_resizes_the_short_side_and_center_crops(tmp_path):
    path = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 80, 3), dtype=np.uint8)).save(path)
    assert load_image(str(path), 35).shape == (35, 35, 3)


def test_batch_order_is_a_permutation_per_epoch_and_independent_of_chunking():
    order = BatchOrder(10, seed=3)
    stream = order.indices(0, 30)
    for epoch in range(3):
        assert sorted(stream[epoch * 10 : epoch * 10 + 10].tolist()) == list(range(10))
    assert not torch.equal(stream[:10], stream[10:20]), "each epoch should be shuffled anew"
    chunks = torch.cat([BatchOrder(10, seed=3).indices(start, 4) for start in range(0, 28, 4)])
    assert torch.equal(chunks, stream[:28])


def test_training_lowers_the_loss_and_writes_every_artifact(tmp_path, image_folder):
    summary = utils.train_diffusion(**tiny_args(tmp_path, image_folder, train_steps=40, save_and_sample_every=20,
                                                log_every=10, learning_rate=2e-3))
    assert summary["step"] == 40
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, 41)), "every step's loss is in metrics.csv"
    losses = [float(r["loss"]) for r in rows]
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:5]), f"loss did not go down: {losses}"
    for name in ("checkpoint.pt", "loss.png", "samples/sample-20.png", "samples/sample-40.png"):
        assert (tmp_path / name).is_file(), name
    grid = Image.open(tmp_path / "samples/sample-40.png")
    assert grid.size == (2 * 18 + 2, 2 * 18 + 2)  # 4 images of 16 px in a 2x2 grid with 2 px padding
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["step"] == 40 and len(state["metrics"]["loss"]) == 40
    assert summary["sample_grid"].endswith("sample-40.png") and summary["loss"] == pytest.approx(losses[-1], abs=1e-6)


def final_weights(folder):
    return torch.load(os.path.join(folder, "checkpoint.pt"), weights_only=True)["model"]


def test_stop_and_resume_gives_bit_identical_weights(tmp_path, image_folder):
    straight = tmp_path / "straight"
    utils.train_diffusion(**tiny_args(straight, image_folder, train_steps=40, save_and_sample_every=1000))
    resumed = tmp_path / "resumed"
    utils.train_diffusion(**tiny_args(resumed, image_folder, train_steps=20, save_and_sample_every=1000))
    summary = utils.train_diffusion(**tiny_args(resumed, image_folder, train_steps=40, save_and_sample_every=1000))
    assert summary["step"] == 40
    a, b = final_weights(straight), final_weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a), "20 + resume + 20 steps differ from 40 straight steps"
    state = torch.load(resumed / "checkpoint.pt", weights_only=True)
    assert [s for s, _ in state["metrics"]["loss"]] == list(range(1, 41))


def test_seed_changes_the_run_and_fresh_starts_over(tmp_path, image_folder, capsys):
    utils.train_diffusion(**tiny_args(tmp_path / "a", image_folder, seed=1))
    utils.train_diffusion(**tiny_args(tmp_path / "b", image_folder, seed=2))
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert not all(torch.equal(a[k], b[k]) for k in a)
    summary = utils.train_diffusion(**tiny_args(tmp_path / "a", image_folder, seed=1, train_steps=2, fresh=True))
    assert summary["step"] == 2
    assert "Resuming" not in capsys.readouterr().out


def test_resume_says_so_and_a_finished_run_does_no_more_steps(tmp_path, image_folder, capsys):
    utils.train_diffusion(**tiny_args(tmp_path, image_folder))
    before = final_weights(tmp_path)
    summary = utils.train_diffusion(**tiny_args(tmp_path, image_folder))
    assert "Resuming from" in capsys.readouterr().out and summary["step"] == 4
    after = final_weights(tmp_path)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_visualize_draws_forward_and_backward_figures(tmp_path, image_folder):
    utils.train_diffusion(**tiny_args(tmp_path, image_folder))
    paths = utils.visualize_diffusion(**tiny_args(tmp_path, image_folder, load_path=str(tmp_path / "checkpoint.pt")))
    for key in ("forward_diffusion", "backward_diffusion"):
        assert paths[key] == str(tmp_path / f"{key}.png")
        width, height = Image.open(paths[key]).size
        assert width > 400 and height > 300  # 5 columns x 4 rows of images


def test_sampling_does_not_disturb_the_training_random_streams(tmp_path, image_folder):
    # the same run with and without milestones (sampling + FID in between) ends with the same weights
    utils.train_diffusion(**tiny_args(tmp_path / "quiet", image_folder, train_steps=6, save_and_sample_every=1000))
    utils.train_diffusion(**tiny_args(tmp_path / "busy", image_folder, train_steps=6, save_and_sample_every=2,
                                      fid=True, fid_extractor="tiny"))
    a, b = final_weights(tmp_path / "quiet"), final_weights(tmp_path / "busy")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_AFHQ, "train", "cat")), reason="../shared/afhq36 absent")
def test_short_run_on_the_real_cats(tmp_path):
    args = tiny_args(tmp_path, os.path.join(SHARED_AFHQ, "train"), image_size=32, unet_dim=16,
                     unet_dim_mults=(1, 2, 4, 8), time_steps=50, batch_size=8, train_steps=4, save_and_sample_every=2)
    trainer = Trainer(utils.Config.from_args(**args))
    assert len(trainer.data) == 5153
    summary = trainer.train()
    assert summary["step"] == 4 and np.isfinite(summary["loss"])
    assert (tmp_path / "samples" / "sample-4.png").is_file()
