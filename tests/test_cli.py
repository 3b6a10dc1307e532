"""main.py as a student meets it: options, defaults, and a clear error for each bad input before long work."""
import os
import shutil

import pytest
import torch
from conftest import as_flags, run_main, tiny_args

import utils
from main import build_parser


def test_help_lists_the_handout_flags_with_defaults():
    text = build_parser().format_help()
    for flag in ("--time_steps", "--train_steps", "--save_folder", "--data_path", "--load_path", "--data_class",
                 "--image_size", "--batch_size", "--learning_rate", "--unet_dim", "--unet_dim_mults", "--fid",
                 "--save_and_sample_every", "--visualize", "--dataloader_workers", "--seed", "--device", "--wandb",
                 "--smoke", "--grad_accum", "--fresh"):
        assert flag in text, flag
    assert "(default: 10000)" in text and "(default: 0.001)" in text


def test_cli_defaults_are_the_config_defaults():
    parsed = vars(build_parser().parse_args([]))
    assert utils.Config.from_args(**parsed) == utils.Config()
    assert utils.Config().unet_dim_mults == (1, 2, 4, 8) and utils.Config().batch_size == 32


def test_cli_parses_lists_and_booleans():
    parsed = vars(build_parser().parse_args(["--unet_dim_mults", "1", "2", "--fid", "--no-visualize"]))
    assert parsed["unet_dim_mults"] == [1, 2] and parsed["fid"] is True and parsed["visualize"] is False


def test_auto_device_is_the_cpu_here_and_explicit_cuda_is_refused():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert utils.select_device("auto").type in ("cpu", "mps")
    with pytest.raises(utils.ConfigError, match="--device cuda: no CUDA GPU"):
        utils.select_device("cuda")


def expect_config_error(match, tmp_path, data_path, **overrides):
    with pytest.raises(utils.ConfigError, match=match):
        utils.train_diffusion(**tiny_args(tmp_path, data_path, **overrides))


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(train_steps=0), r"--train_steps 0: must be a positive"),
        (dict(batch_size=-4), r"--batch_size -4: must be a positive"),
        (dict(learning_rate=0.0), r"--learning_rate 0.0: must be a positive"),
        (dict(learning_rate=float("nan")), r"--learning_rate nan"),
        (dict(image_size=18, unet_dim_mults=(1, 2, 4)), r"--image_size 18: .* divisible by 4"),
        (dict(data_class="bird"), r"--data_class 'bird': unknown class"),
        (dict(unet_dim=12), r"--unet_dim 12: .*multiple of 8"),
        (dict(load_path="nowhere/checkpoint.pt"), r"--load_path 'nowhere/checkpoint.pt': no such checkpoint"),
        (dict(sample_grid_size=10), r"--sample_grid_size 10: must be a square"),
        (dict(batch_size=64), r"--batch_size 64 is larger than the 48 usable images"),
        (dict(amp="fp16"), r"--amp fp16 needs a GPU"),
        (dict(device="cuda") if not torch.cuda.is_available() else dict(device="tpu"), r"--device"),
    ],
)
def test_bad_values_are_refused_with_the_value_and_the_fix(tmp_path, image_folder, overrides, match):
    expect_config_error(match, tmp_path, image_folder, **overrides)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_missing_or_empty_data_folder_says_how_to_get_the_data(tmp_path):
    expect_config_error(r"--data_path .*no such folder.*prepare_afhq.py --download", tmp_path, str(tmp_path / "nope"))
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    expect_config_error(r"has no .jpg/.png images for --data_class cat.*data/README.md", tmp_path,
                        str(tmp_path / "empty"))


def test_unreadable_files_are_skipped_with_a_count_and_all_unreadable_stops(tmp_path, image_folder, capsys):
    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    (data / "cat" / "broken.jpg").write_bytes(b"not an image")
    (data / "cat" / "notes.png").write_text("hello")
    utils.train_diffusion(**tiny_args(tmp_path / "run", str(data), train_steps=1))
    assert "Skipped 2 unreadable or non-image file(s)" in capsys.readouterr().out
    bad = tmp_path / "bad" / "cat"
    bad.mkdir(parents=True)
    (bad / "a.jpg").write_bytes(b"\x00" * 10)
    expect_config_error(r"none of the 1 files .* could be read as an image", tmp_path / "run2", str(bad.parent))


def test_unwritable_save_folder_is_refused(tmp_path, image_folder):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")  # root ignores permission bits, so block with a file in the path
    expect_config_error(r"--save_folder .* is not writable", str(blocker / "results"), image_folder)


def test_incompatible_checkpoint_is_refused_naming_the_mismatch(tmp_path, image_folder):
    utils.train_diffusion(**tiny_args(tmp_path, image_folder, train_steps=1))
    expect_config_error(r"trained with unet_dim=8 \(this run: 16\)", tmp_path, image_folder, unet_dim=16)
    expect_config_error(r"image_size=16 \(this run: 32\)", tmp_path / "other", image_folder, image_size=32,
                        load_path=str(tmp_path / "checkpoint.pt"))
    (tmp_path / "junk.pt").write_bytes(b"garbage")
    expect_config_error(r"junk.pt.* is not a checkpoint written by this kit", tmp_path / "third", image_folder,
                        load_path=str(tmp_path / "junk.pt"))


def test_cli_exits_2_with_the_message_and_no_traceback(tmp_path):
    result = run_main("--data_path", tmp_path / "missing", "--save_folder", tmp_path / "out", "--wandb", "disabled")
    assert result.returncode == 2
    assert "error: --data_path" in result.stderr and "Traceback" not in result.stderr


def test_cli_trains_then_visualizes_from_the_checkpoint(tmp_path, image_folder):
    args = tiny_args(tmp_path, image_folder, train_steps=2)
    result = run_main(*as_flags(args))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "checkpoint: " in result.stdout and (tmp_path / "checkpoint.pt").is_file()
    result = run_main(*as_flags({**args, "visualize": True, "load_path": str(tmp_path / "checkpoint.pt")}))
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "forward_diffusion.png").is_file() and (tmp_path / "backward_diffusion.png").is_file()


def test_smoke_runs_the_whole_pipeline(tmp_path):
    result = run_main("--smoke", "--save_folder", tmp_path, "--wandb", "disabled", "--device", "cpu")
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("checkpoint.pt", "metrics.csv", "loss.png", "fid.png", "forward_diffusion.png",
                 "backward_diffusion.png", os.path.join("samples", "sample-4.png")):
        assert (tmp_path / name).is_file(), name
    assert "fid: " in result.stdout


def test_smoke_refuses_to_overwrite_a_real_run(tmp_path, image_folder):
    utils.train_diffusion(**tiny_args(tmp_path, image_folder, train_steps=1))
    with pytest.raises(utils.ConfigError, match=r"--smoke would overwrite the training run in .*--save_folder"):
        utils.train_diffusion(save_folder=str(tmp_path), smoke=True, wandb="disabled")
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 1
