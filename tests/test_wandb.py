"""wandb never prompts and never stops training: offline files without a key, disabled on request,
warnings (not crashes) when it fails, and a resumed run continues the same wandb run."""
import dataclasses
import glob

import pytest
import wandb
from conftest import tiny_args

from kit import logger
import utils


def offline_run_ids(folder):
    """The wandb run id of each offline run folder under `folder`, read from its run-<id>.wandb log file
    (the folder name alone can carry a "-1" suffix when two runs start in the same second)."""
    runs = sorted(glob.glob(str(folder / "wandb" / "offline-run-*")))
    logs = [glob.glob(run + "/run-*.wandb") for run in runs]
    assert all(len(found) == 1 for found in logs), f"each offline run should hold one log file: {logs}"
    return [found[0].rsplit("run-", 1)[-1].removesuffix(".wandb") for found in logs]


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
    (run_id,) = offline_run_ids(tmp_path)
    utils.train_diffusion(**tiny_args(tmp_path, image_folder, train_steps=4, wandb="auto"))
    assert offline_run_ids(tmp_path) == [run_id, run_id]


def test_resume_is_asked_of_the_server_only_online(tmp_path, no_wandb_key, monkeypatch):
    """wandb 0.28 (Colab's) prints "`resume` will be ignored since W&B syncing is set to `offline`" at every offline
    start given `resume`: offline runs continue by their id alone; online ones ask the server to resume it."""
    calls = []
    monkeypatch.setattr(wandb, "init", lambda **kwargs: calls.append(kwargs))
    cfg = utils.Config(save_folder=str(tmp_path), wandb="offline")
    logger.WandbLogger(cfg, "abc123")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    logger.WandbLogger(dataclasses.replace(cfg, wandb="online"), "abc123")
    offline, online = calls
    assert offline["mode"] == "offline" and offline["id"] == "abc123" and "resume" not in offline
    assert online["mode"] == "online" and online["id"] == "abc123" and online["resume"] == "allow"


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
    (run_id,) = offline_run_ids(tmp_path)
    utils.visualize_diffusion(**tiny_args(tmp_path, image_folder, wandb="offline",
                                          load_path=str(tmp_path / "checkpoint.pt")))
    assert offline_run_ids(tmp_path) == [run_id, run_id]
