"""Nothing a student trained is lost: SIGKILL at random moments, a disk that fills up mid-save, Ctrl-C,
a loss that becomes NaN, and several processes (DistributedDataParallel over gloo)."""
import errno
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, as_flags, start_main, tiny_args

import trainer as trainer_module
import utils
from diffusion import Diffusion
from kit import files


def checkpoint_step(folder):
    return torch.load(os.path.join(folder, "checkpoint.pt"), weights_only=True)["step"]


def test_kills_and_stops_at_random_moments_always_leave_a_loadable_checkpoint(tmp_path, image_folder):
    # a checkpoint every step, so signals land during saves as well as between them; SIGKILL (nothing can be
    # done), SIGTERM (what Colab, Kaggle and Slurm send) and SIGINT (Ctrl-C) at random moments
    args = tiny_args(tmp_path, image_folder, train_steps=10_000, save_and_sample_every=1, log_every=1)
    rng = random.Random(0)
    last_step, cycles = 0, 6
    for cycle in range(cycles):
        before = os.stat(tmp_path / "checkpoint.pt").st_mtime_ns if cycle else None
        process = start_main(args)
        # wait until this run is training (it has saved), then signal it at a random moment
        while process.poll() is None and (not os.path.exists(tmp_path / "checkpoint.pt")
                                          or os.stat(tmp_path / "checkpoint.pt").st_mtime_ns == before):
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 2.0))
        sent = (signal.SIGKILL, signal.SIGTERM, signal.SIGINT)[cycle % 3]
        process.send_signal(sent)
        out, err = process.communicate()
        if sent != signal.SIGKILL:  # a clean stop: saved, said so, exit code 128 + signal
            assert process.returncode == 128 + sent, err[-2000:]
            assert f"checkpoint saved to {tmp_path / 'checkpoint.pt'}" in out and "Traceback" not in err
        step = checkpoint_step(tmp_path)  # must load, whatever moment the signal hit
        assert step >= last_step, f"checkpoint went back from step {last_step} to {step}"
        last_step = step
        leftovers = [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
        assert len(leftovers) <= 1  # at most the one save that the kill interrupted
    assert last_step > 0
    summary = utils.train_diffusion(**{**args, "train_steps": last_step + 2, "save_and_sample_every": 1000})
    assert summary["step"] == last_step + 2
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")], "stale temporary files were not cleaned up"


def test_a_failing_save_keeps_the_previous_checkpoint(tmp_path, image_folder, monkeypatch):
    trainer = trainer_module.Trainer(utils.Config.from_args(**tiny_args(tmp_path, image_folder, train_steps=2,
                                                                        save_and_sample_every=1000)))
    trainer.train()
    good = torch.load(tmp_path / "checkpoint.pt", weights_only=True)

    def disk_full(fd):  # the bytes went to the temporary file; the disk fills up before they reach it
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", disk_full)
    trainer.step = 99
    with pytest.raises(utils.DiskFull, match=r"^no space left to save the checkpoint in .*: it needs [0-9.]+ MB free "
                                             r"there, [0-9.]+ MB are\. The previous checkpoint is kept"):
        trainer.save_checkpoint()
    monkeypatch.undo()
    kept = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert kept["step"] == good["step"] == 2
    assert all(torch.equal(kept["model"][k], good["model"][k]) for k in good["model"])
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    mask = files.current_umask()
    files.atomic_write(str(tmp_path / "out.bin"), lambda f: f.write(b"x"))
    assert (tmp_path / "out.bin").stat().st_mode & 0o777 == 0o666 & ~mask


def test_ctrl_c_saves_and_says_how_to_resume(tmp_path, image_folder):
    args = tiny_args(tmp_path, image_folder, train_steps=10_000, save_and_sample_every=5, log_every=5)
    process = start_main(args)
    deadline = time.monotonic() + 60
    while not os.path.exists(tmp_path / "checkpoint.pt") and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate()
    assert process.returncode == 130, err[-2000:]
    assert "Stopped at step" in out and "(Ctrl-C): checkpoint saved to" in out and "Re-run the same command" in out
    interrupted_at = int(out.split("Stopped at step ")[1].split(" ")[0])
    assert checkpoint_step(tmp_path) == interrupted_at >= 5


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path, image_folder, monkeypatch):
    calls = {"n": 0}
    real_p_losses = Diffusion.p_losses

    def p_losses_turning_nan(self, x_0, t, noise):
        loss = real_p_losses(self, x_0, t, noise)
        if not torch.is_grad_enabled():  # the check of the weights before a save
            return loss
        calls["n"] += 1
        return loss * float("nan") if calls["n"] > 6 else loss  # steps 1-3 fine (2 micro-batches each)

    monkeypatch.setattr(Diffusion, "p_losses", p_losses_turning_nan)
    with pytest.raises(utils.TrainingDiverged, match=r"loss became nan at step 4: .*last good checkpoint"):
        utils.train_diffusion(**tiny_args(tmp_path, image_folder, train_steps=10, save_and_sample_every=2, log_every=1))
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_torchrun_with_two_processes_trains_with_ddp_on_gloo(tmp_path, image_folder):
    args = tiny_args(tmp_path, image_folder, train_steps=3, save_and_sample_every=3)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         os.path.join(REPO, "main.py"), *as_flags(args)],
        cwd=REPO, capture_output=True, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert checkpoint_step(tmp_path) == 3
    assert (tmp_path / "samples" / "sample-3.png").is_file()
    assert result.stdout.count("checkpoint: ") == 1, "only rank 0 reports and saves"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_processes_stop_together_when_one_gets_sigterm(tmp_path, image_folder):
    # a signal may reach only some of the processes (or reach them during different steps): they must all stop
    # after the same step, or one waits forever for the others in its gradient all-reduce and the save is lost
    args = tiny_args(tmp_path, image_folder, train_steps=10_000, save_and_sample_every=3, log_every=3)
    torchrun_env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
                    "LOCAL_WORLD_SIZE": "2"}
    ranks = [start_main(args, env={**os.environ, **torchrun_env, "RANK": str(rank), "LOCAL_RANK": str(rank)})
             for rank in (0, 1)]
    try:
        while not os.path.exists(tmp_path / "checkpoint.pt") and all(p.poll() is None for p in ranks):
            time.sleep(0.05)
        ranks[1].send_signal(signal.SIGTERM)  # not the process that saves
        (out, err), (out_1, err_1) = (p.communicate(timeout=120) for p in ranks)
    finally:
        for p in ranks:
            p.kill()
    assert [p.returncode for p in ranks] == [128 + signal.SIGTERM] * 2, err[-2000:] + err_1[-2000:]
    assert "SIGTERM: saving a checkpoint after this step" in out_1 and "Traceback" not in err + err_1
    stopped_at = int(out.split("Stopped at step ")[1].split(" ")[0])
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["step"] == stopped_at >= 3
    assert [s for s, _ in state["metrics"]["loss"]] == list(range(1, stopped_at + 1))  # averaged over both ranks
