"""Every way a run can end keeps the student's work and says so in one sentence: SIGTERM, a diverging loss,
changed options on resume, --load_path on a re-run, a full disk, two runs in one folder, leftovers of killed
writes; and the command line does not start hours of work unasked."""
import errno
import math
import os
import signal
import time

import pytest
import torch
from conftest import as_flags, run_main, start_main, tiny_args

import trainer as trainer_module
import utils
from kit import checkpoints, device, files


def wait_for(path, process):
    while not os.path.exists(path) and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None, process.communicate()


def saved(folder):
    return torch.load(os.path.join(folder, "checkpoint.pt"), weights_only=True)


def test_sigterm_finishes_the_step_saves_and_says_how_to_resume(tmp_path, image_folder):
    args = tiny_args(tmp_path, image_folder, train_steps=10_000, save_and_sample_every=5, log_every=5)
    process = start_main(args)
    wait_for(tmp_path / "checkpoint.pt", process)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate()
    assert process.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "SIGTERM: saving a checkpoint after this step" in out
    stopped_at = int(out.split("Stopped at step ")[1].split(" ")[0])
    assert f"(SIGTERM): checkpoint saved to {tmp_path / 'checkpoint.pt'}. Re-run the same command to resume." in out
    assert saved(tmp_path)["step"] == stopped_at > 0 and "Traceback" not in err
    summary = utils.train_diffusion(**{**args, "train_steps": stopped_at + 1})
    assert summary["step"] == stopped_at + 1


def test_exploding_weights_are_never_saved_and_the_advised_rerun_works(tmp_path, image_folder, capsys):
    # lr 1e30 blows the weights up at step 1; saving every step used to keep those weights as "good"
    args = tiny_args(tmp_path, image_folder, train_steps=6, save_and_sample_every=1, log_every=1)
    with pytest.raises(utils.TrainingDiverged, match=r"at step 1: training stopped; no checkpoint had been saved, so "
                                                     r"re-running starts over\. Lower --learning_rate \(now 1e\+30"):
        utils.train_diffusion(**{**args, "learning_rate": 1e30})
    assert not (tmp_path / "checkpoint.pt").exists()
    summary = utils.train_diffusion(**{**args, "learning_rate": 1e-3})  # the advised re-run
    assert summary["step"] == 6 and all(torch.isfinite(v).all() for v in saved(tmp_path)["model"].values())

    # a run that diverges later keeps its last good checkpoint, and the re-run with a lower rate resumes from it
    with pytest.raises(utils.TrainingDiverged, match=r"at step 7: training stopped; the last good checkpoint .* is "
                                                     r"kept, and re-running resumes from it with the new options"):
        utils.train_diffusion(**{**args, "train_steps": 10, "learning_rate": 1e30})
    assert saved(tmp_path)["step"] == 6
    capsys.readouterr()
    summary = utils.train_diffusion(**{**args, "train_steps": 10})
    assert summary["step"] == 10 and math.isfinite(summary["loss"])
    assert "--learning_rate 1e+30 -> 0.001" not in capsys.readouterr().out  # the diverged run was never saved


def test_changed_options_take_effect_on_resume_and_are_named(tmp_path, image_folder, capsys):
    args = tiny_args(tmp_path, image_folder, train_steps=4)
    utils.train_diffusion(**args)
    capsys.readouterr()
    utils.train_diffusion(**{**args, "train_steps": 6, "learning_rate": 1e-4, "log_every": 1})
    out = capsys.readouterr().out
    assert "Resuming from" in out and "at step 4" in out
    assert "with changed options: --train_steps 4 -> 6, --learning_rate 0.001 -> 0.0001, --log_every 2 -> 1." in out
    state = saved(tmp_path)
    assert state["step"] == 6 and [g["lr"] for g in state["optimizer"]["param_groups"]] == [1e-4]

    # fewer steps than the checkpoint's: nothing is trained, and the run says so
    summary = utils.train_diffusion(**{**args, "train_steps": 3, "learning_rate": 1e-4, "log_every": 1})
    assert "Nothing to train: the run is at step 6 and --train_steps is 3. Pass a larger --train_steps" in \
        capsys.readouterr().out
    assert summary["step"] == 6 and saved(tmp_path)["step"] == 6


def test_load_path_starts_a_run_once_then_the_same_command_resumes_it(tmp_path, image_folder):
    first = tmp_path / "first"
    utils.train_diffusion(**tiny_args(first, image_folder, train_steps=4))
    load = str(first / "checkpoint.pt")
    args = tiny_args(tmp_path / "second", image_folder, train_steps=6, load_path=load)
    assert utils.train_diffusion(**args)["step"] == 6
    assert utils.train_diffusion(**args)["step"] == 6  # used to go back to step 4 and train 4 -> 6 again
    assert utils.train_diffusion(**{**args, "train_steps": 8})["step"] == 8  # resumes 6 -> 8, not 4 -> 8
    state = saved(tmp_path / "second")
    assert state["step"] == 8 and state["started_from"] == os.path.abspath(load)
    assert len(state["metrics"]["loss"]) == 8  # steps 1-4 from the first run, 5-8 here, none twice

    # a folder that holds another run is not overwritten by a --load_path start
    other = tmp_path / "other"
    utils.train_diffusion(**tiny_args(other, image_folder, train_steps=2))
    with pytest.raises(utils.ConfigError, match=r"already holds a run at step 2 that was not started from "
                                                r"--load_path .*Re-run without --load_path to resume it, add --fresh"):
        utils.train_diffusion(**tiny_args(other, image_folder, train_steps=6, load_path=load))
    assert utils.train_diffusion(**tiny_args(other, image_folder, train_steps=6, load_path=load,
                                             fresh=True))["step"] == 6


def test_a_full_disk_costs_one_sentence_keeps_the_checkpoint_and_resumes_once_space_is_free(
        tmp_path, image_folder, monkeypatch):
    args = tiny_args(tmp_path, image_folder, train_steps=2)
    utils.train_diffusion(**args)
    writes = []
    real_write = checkpoints.write_checkpoint
    monkeypatch.setattr(trainer_module, "write_checkpoint", lambda *a: writes.append(a[0]) or real_write(*a))

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", disk_full)
    with pytest.raises(utils.DiskFull) as raised:
        utils.train_diffusion(**{**args, "train_steps": 4})
    message = str(raised.value)
    assert "\n" not in message and "inline_container" not in message
    assert message.startswith(f"no space left to save the checkpoint in {tmp_path}: it needs ")
    assert message.endswith("The previous checkpoint is kept; free some space, then re-run the same command to resume.")
    assert writes == [str(tmp_path / "checkpoint.pt")]  # once per save point (the first one of this run failed)
    assert saved(tmp_path)["step"] == 2 and not list(tmp_path.glob(".*.tmp"))
    monkeypatch.undo()
    assert utils.train_diffusion(**{**args, "train_steps": 4})["step"] == 4  # space is back: it resumes

    # and when even one checkpoint cannot fit, the run stops at start-up, before any training
    monkeypatch.setattr(checkpoints, "free_space", lambda path: 1000)
    with pytest.raises(utils.ConfigError, match=r"only 0\.0 MB are free in .*a checkpoint needs about [0-9.]+ MB"):
        utils.train_diffusion(**{**args, "train_steps": 6})
    assert saved(tmp_path)["step"] == 4


def test_a_second_run_in_the_same_folder_is_refused_naming_the_first(tmp_path, image_folder):
    args = tiny_args(tmp_path, image_folder, train_steps=10_000, save_and_sample_every=1, log_every=1)
    first = start_main(args)
    try:
        wait_for(tmp_path / "checkpoint.pt", first)
        second = run_main(*as_flags({**args, "train_steps": 5}))
        assert second.returncode == 2
        assert f"is in use by another training run (pid {first.pid} on" in second.stderr
        assert "Traceback" not in second.stderr
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate()
    assert first.returncode == 130
    # in one process too (a notebook): the lock is released when the run ends, so the next run may start
    with files.claim_folder(str(tmp_path)):
        with pytest.raises(utils.ConfigError, match="is in use by another training run"):
            with files.claim_folder(str(tmp_path)):
                pass
    step = saved(tmp_path)["step"]
    assert utils.train_diffusion(**{**args, "train_steps": step + 1})["step"] == step + 1


def test_leftovers_of_killed_writes_are_cleaned_and_a_missing_grid_is_drawn(tmp_path, image_folder):
    args = tiny_args(tmp_path, image_folder, train_steps=4, save_and_sample_every=2)
    utils.train_diffusion(**args)
    leftovers = [tmp_path / ".metrics.csv.abc123.tmp", tmp_path / ".loss.png.x1.tmp",
                 tmp_path / ".checkpoint.pt.k9.tmp", tmp_path / "samples" / ".sample-4.png.zz.tmp"]
    for path in leftovers:
        path.write_bytes(b"half written")
    (tmp_path / "samples" / "sample-4.png").unlink()  # its save point was killed before the grid was written
    summary = utils.train_diffusion(**args)  # the same command again: nothing to train, but the folder is tidied
    assert not [p for p in leftovers if p.exists()]
    assert (tmp_path / "samples" / "sample-4.png").is_file() and summary["sample_grid"].endswith("sample-4.png")


def test_a_run_that_will_take_hours_says_so_with_what_to_do(tmp_path, image_folder, monkeypatch, capsys):
    monkeypatch.setattr(device.RunClock, "LONG_RUN_SECONDS", 0.0)  # any run counts as long here
    utils.train_diffusion(**tiny_args(tmp_path, image_folder, train_steps=6))
    out = capsys.readouterr().out
    assert "note: at " in out and " s a step on this CPU, the 2 steps left will take about " in out
    assert "run_in_colab.ipynb or run_in_kaggle.ipynb); here, --train_steps 1000 takes about" in out


def test_a_short_run_says_nothing_about_its_length(tmp_path, image_folder, capsys):
    utils.train_diffusion(**tiny_args(tmp_path, image_folder, train_steps=6))
    assert "note: at" not in capsys.readouterr().out


def test_visualize_without_load_path_draws_the_run_in_save_folder_without_training(tmp_path, image_folder):
    args = tiny_args(tmp_path, image_folder, train_steps=2)
    missing = run_main(*as_flags({**args, "visualize": True}))
    assert missing.returncode == 2 and "--visualize draws a trained model: pass --load_path, or train first" in \
        missing.stderr
    assert not (tmp_path / "checkpoint.pt").exists()  # it did not train
    utils.train_diffusion(**args)
    before = saved(tmp_path)["step"]
    result = run_main(*as_flags({**args, "visualize": True, "train_steps": 10_000}))
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "forward_diffusion.png").is_file() and (tmp_path / "backward_diffusion.png").is_file()
    assert saved(tmp_path)["step"] == before == 2 and "Training" not in result.stderr


def test_abbreviated_flags_are_refused(tmp_path):
    result = run_main("--train_step", "5", "--save_folder", tmp_path)
    assert result.returncode == 2 and "unrecognized arguments: --train_step" in result.stderr


def test_a_failing_sample_grid_still_saves_the_steps_trained(tmp_path, image_folder, monkeypatch):
    def broken_grid(images, path):
        raise OSError("the grid could not be written")

    monkeypatch.setattr(trainer_module, "save_grid", broken_grid)
    with pytest.raises(OSError, match="the grid could not be written"):
        utils.train_diffusion(**tiny_args(tmp_path, image_folder, train_steps=4, save_and_sample_every=2))
    assert saved(tmp_path)["step"] == 2
    monkeypatch.undo()
    summary = utils.train_diffusion(**tiny_args(tmp_path, image_folder, train_steps=4, save_and_sample_every=2))
    assert summary["step"] == 4 and (tmp_path / "samples" / "sample-2.png").is_file()  # the missing grid is drawn
