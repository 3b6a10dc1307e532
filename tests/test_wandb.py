"""wandb never prompts and never stops training: offline files without a key, disabled on request,
warnings (not crashes) when it fails, and a resumed run continues the same wandb run."""
import glob

import pytest
import wandb
from conftest import tiny_args

from kit import logger
import utils


@pytest.fixture
def no_wandb_key(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc with a key
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))


def test_auto_without_a_key_is_offline_with_a_notice(no_wandb_key, capsys):
    assert logger.wandb_mode("auto") == "offline"
    assert "no API key configured, logging offline" in capsys.readouterr().out
    assert logger.wandb_mode("disabled") == "disabled"


def test_auto_with_a_key_is_online(no_wandb_key, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert logger.wandb_mode("auto") == "online"


def test_offline_run_writes_files_and_resume_continues_the_same_run(tmp_path, image_folder, no_wandb_key):
    utils.train_diffusion(**tiny_args(tmp_path, image_folder, train_steps=2, wandb="auto"))
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    assert len(runs) == 1, runs
    run_id = runs[0].rsplit("-", 1)[-1]
    assert glob.glob(runs[0] + "/*.wandb"), "offline run holds no log file"
    utils.train_diffusion(**tiny_args(tmp_path, image_folder, train_steps=4, wandb="auto"))
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    assert len(runs) == 2 and all(r.endswith("-" + run_id) for r in runs), runs


def test_disabled_writes_nothing(tmp_path, image_folder, no_wandb_key):
    utils.train_diffusion(**tiny_args(tmp_path, image_folder, train_steps=2, wandb="disabled"))
    assert not (tmp_path / "wandb").exists()


def test_online_without_a_key_falls_back_to_offline_and_never_prompts(tmp_path, image_folder, no_wandb_key, capsys):
    utils.train_diffusion(**tiny_args(tmp_path, image_folder, train_steps=2, wandb="online"))
    assert "no API key is configured; logging offline" in capsys.readouterr().out
    assert glob.glob(str(tmp_path / "wandb" / "offline-run-*"))


def test_wandb_failures_never_stop_training(tmp_path, image_folder, monkeypatch):
    def broken_init(**kwargs):
        raise ConnectionError("wandb server unreachable")

    monkeypatch.setattr(wandb, "init", broken_init)
    with pytest.warns(UserWarning, match="wandb failed .*unreachable.*training goes on"):
        summary = utils.train_diffusion(**tiny_args(tmp_path, image_folder, wandb="offline"))
    assert summary["step"] == 4

    class FlakyRun:
        def log(self, *args, **kwargs):
            raise TimeoutError("upload timed out")

        def finish(self):
            pass

    monkeypatch.setattr(wandb, "init", lambda **kwargs: FlakyRun())
    with pytest.warns(UserWarning, match="upload timed out"):
        summary = utils.train_diffusion(**tiny_args(tmp_path / "flaky", image_folder, wandb="offline"))
    assert summary["step"] == 4 and (tmp_path / "flaky" / "checkpoint.pt").is_file()


def test_figures_of_a_checkpoint_go_to_its_wandb_run(tmp_path, image_folder, no_wandb_key):
    utils.train_diffusion(**tiny_args(tmp_path, image_folder, train_steps=2, wandb="offline"))
    run_id = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))[0].rsplit("-", 1)[-1]
    utils.visualize_diffusion(**tiny_args(tmp_path, image_folder, wandb="offline",
                                          load_path=str(tmp_path / "checkpoint.pt")))
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    assert len(runs) == 2 and all(r.endswith("-" + run_id) for r in runs), runs
