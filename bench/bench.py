"""Benchmark of issue 5: this project vs denoising-diffusion-pytorch 2.3.4 (the "peer"), side by side, on
whatever device is present.

    .venv-bench/bin/python bench/bench.py            # full run, writes bench/RESULTS.md
    .venv-bench/bin/python bench/bench.py --quick    # the same table, small sizes, under a minute

What is measured (min / median / max over --repeats):
  1. training images/s at the homework defaults (batch 32, grad_accum 2, 32 px, dim 16, mults 1 2 4 8, T 50,
     no FID): our Trainer.train() and the peer's Trainer.train(), both timed over N steps after a warm-up
     call on the same trainer object (so data workers, allocator and caches are warm), plus our "pure step"
     (U-Net + diffusion loss + Adam on synthetic tensors already on the device) for the loop efficiency;
  2. DDPM sampling images/s at T 50: our Trainer.sample() vs the peer's GaussianDiffusion.sample() (its
     p_sample_loop, sampling_timesteps = timesteps), same count and same batch;
  3. one FID evaluation: our FIDScorer.score() (reference statistics already cached) vs the folder approach
     (save the samples as PNGs, cleanfid.fid.compute_fid(gen_folder, real_folder)), with one extractor;
  4. peak memory: RSS of the job's process (exact, getrusage), RSS of the process plus its worker processes
     (sampled every 0.2 s), and CUDA max allocated on a GPU.

Every (job, repeat) runs in its own child process, in rounds that alternate ours and the peer's, so that
memory is per job and a change of machine load during the run hits both sides alike.
"""
import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings

os.environ.setdefault("TQDM_DISABLE", "1")  # before anything imports tqdm: no progress bars in the timings' output
import numpy as np
import torch

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH_DIR)
sys.path.insert(0, ROOT)

# the homework defaults (handout tables 2-3)
BATCH, ACCUM, IMAGE_SIZE, DIM, MULTS, T = 32, 2, 32, 16, (1, 2, 4, 8), 50
BIG = 10**9  # "never" for save/sample/EMA intervals
RANDOM_INCEPTION_NOTE = (
    "FID extractor: clean-fid's Inception weights cannot be downloaded here, so both sides use an InceptionV3 "
    "(torchvision architecture, 2048-d pool features, fed 299x299) with random weights: the same cost, "
    "not a meaningful FID value.")


# ----------------------------------------------------------------------------------------------------------------
# small helpers: device sync, timing, memory, stats, tables


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def process_tree_rss_mib(pid):
    """RSS of a process and all its descendants (DataLoader workers), in MiB, from /proc/PID/statm (cheap: no
    page-table walk). Pages shared by forked workers are counted once per process, so this is an upper bound."""
    total, stack, page = 0, [pid], os.sysconf("SC_PAGE_SIZE")
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * page
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack += [int(c) for c in f.read().split()]
        except (OSError, ValueError, IndexError):
            pass
    return total / 2**20


class PeakMemory:
    """Samples the RSS of this process tree in a thread; stop() returns the peak in MiB (None off Linux)."""

    def __init__(self, interval=0.2):
        self.interval, self.peak_mib = interval, 0.0
        self.available = os.path.exists(f"/proc/{os.getpid()}/statm")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak_mib = max(self.peak_mib, process_tree_rss_mib(os.getpid()))

    def start(self):
        if self.available:
            self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        if self.available:
            self._thread.join()
            self.peak_mib = max(self.peak_mib, process_tree_rss_mib(os.getpid()))
        return self.peak_mib if self.available else None


def min_med_max(values):
    return min(values), statistics.median(values), max(values)


def fmt(value, digits=1):
    if value is None:
        return "-"
    return f"{value:,.{digits}f}" if abs(value) < 1e5 else f"{value:,.0f}"


def fmt_triple(values, digits=1):
    if not values:
        return "-"
    lo, med, hi = min_med_max(values)
    return f"{fmt(lo, digits)} / **{fmt(med, digits)}** / {fmt(hi, digits)}"


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def device_description(device):
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"CPU: {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


# ----------------------------------------------------------------------------------------------------------------
# the feature extractor shared by both FID sides


class RandomInception(torch.nn.Module):
    """torchvision's InceptionV3 up to the 2048-d pool features, random weights, taking clean-fid's input
    ((b, 3, 299, 299) floats in [0, 255]). Its BatchNorm statistics are set from one batch of random images so
    that the features are O(1) (with raw random weights they over- or underflow and the FID means nothing)."""

    def __init__(self):
        super().__init__()
        import torchvision

        self.net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=True)
        self.net.fc = torch.nn.Identity()
        self.requires_grad_(False)

    def forward(self, x):
        return self.net(x / 127.5 - 1)

    def calibrate(self, images=4, seed=0):
        for m in self.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # running stats = this batch's stats
        self.train()
        with torch.no_grad():
            self(torch.rand(images, 3, 299, 299, generator=torch.Generator().manual_seed(seed)) * 255)
        return self.eval()


def load_extractor(args, device):
    if args.extractor == "tiny":
        from kit.fid import TinyExtractor

        return TinyExtractor().to(device).eval()
    model = RandomInception()
    model.load_state_dict(torch.load(os.path.join(args.workdir, "inception_random.pt"), weights_only=True))
    return model.to(device).eval()


def fake_samples(count):
    """The 'generated' images both FID sides score: fixed, seeded (the FID cost does not depend on content)."""
    return torch.rand(count, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1234))


# ----------------------------------------------------------------------------------------------------------------
# jobs: each runs in its own process and returns {"times": [seconds per repeat], "items": images per repeat, ...}


def our_config(args, **overrides):
    """The trainer's config, validated as train_diffusion validates it (this also makes the save folder)."""
    from utils import checked_config

    return checked_config(dict(
        data_path=args.data, data_class="cat", save_folder=os.path.join(args.workdir, "ours"), batch_size=args.batch,
        grad_accum=ACCUM, image_size=IMAGE_SIZE, unet_dim=DIM, unet_dim_mults=MULTS, time_steps=T, fid=False,
        save_and_sample_every=BIG, wandb="disabled", device=args.device, amp=args.amp, fresh=True, seed=0,
        **overrides))


def our_trainer(args, **overrides):
    from trainer import Trainer

    seconds, trainer = timed(lambda: Trainer(our_config(args, **overrides)), torch.device("cpu"))
    # the end of train() is a milestone (checkpoint, 64-image sample grid, metrics plot): not training throughput,
    # and the peer's train() has no such step, so it is left out of the timed loop
    trainer.evaluate = trainer.save_checkpoint = trainer.write_metrics = lambda: None
    return trainer, seconds


def job_train_ours(args, device):
    trainer, startup = our_trainer(args, train_steps=args.warmup_steps)
    trainer.train()  # warm-up
    times = []
    for _ in range(args.repeats_per_process):
        trainer.cfg.train_steps += args.steps
        times.append(timed(trainer.train, device)[0])
    return {"times": times, "items": args.steps * args.batch * ACCUM, "startup": startup}


def job_train_pure(args, device):
    # the trainer's own model, optimizer, AMP policy and scaler, on synthetic tensors already on the device
    from kit.device import autocast

    trainer, _ = our_trainer(args, train_steps=1)
    x_0 = torch.randn(args.batch, 3, IMAGE_SIZE, IMAGE_SIZE, device=trainer.device).clamp(-1, 1)

    def steps(n):
        for _ in range(n):
            for _ in range(ACCUM):
                with autocast(trainer.device, trainer.amp_dtype):
                    loss = trainer.diffusion(x_0, torch.randn_like(x_0)) / ACCUM
                trainer.scaler.scale(loss).backward()
            trainer.scaler.step(trainer.optimizer)
            trainer.scaler.update()
            trainer.optimizer.zero_grad(set_to_none=True)

    steps(args.warmup_steps)
    times = [timed(lambda: steps(args.steps), device)[0] for _ in range(args.repeats_per_process)]
    return {"times": times, "items": args.steps * args.batch * ACCUM}


def peer_diffusion(device):
    from denoising_diffusion_pytorch import GaussianDiffusion, Unet

    torch.manual_seed(0)
    model = Unet(dim=DIM, dim_mults=MULTS, channels=3)
    # objective pred_noise: our model predicts the noise too (the peer's default is pred_v; same cost)
    return GaussianDiffusion(model, image_size=IMAGE_SIZE, timesteps=T, sampling_timesteps=T, beta_schedule="cosine",
                             objective="pred_noise").to(device)


def job_train_peer(args, device):
    from denoising_diffusion_pytorch import Trainer

    def build():
        amp = device.type == "cuda"
        return Trainer(
            peer_diffusion(device), os.path.join(args.data, "cat"), train_batch_size=args.batch,
            gradient_accumulate_every=ACCUM, train_lr=1e-3, train_num_steps=args.warmup_steps,
            ema_update_every=BIG,  # its EMA then copies the weights once and only counts steps after that
            save_and_sample_every=BIG, num_samples=4, results_folder=os.path.join(args.workdir, "peer"),
            amp=amp, mixed_precision_type="bf16" if amp and torch.cuda.is_bf16_supported() else "fp16",
            calculate_fid=False,
        )

    startup, trainer = timed(build, torch.device("cpu"))
    trainer.train()  # warm-up: starts its DataLoader workers (they stay alive in its endless iterator)
    times = []
    for _ in range(args.repeats_per_process):
        trainer.train_num_steps += args.steps
        times.append(timed(trainer.train, device)[0])
    return {"times": times, "items": args.steps * args.batch * ACCUM, "startup": startup}


def job_sample_ours(args, device):
    trainer, _ = our_trainer(args, train_steps=1)
    trainer.sample(min(8, args.sample_count), batch_size=8)  # warm-up
    times = [timed(lambda: trainer.sample(args.sample_count, batch_size=args.sample_batch), device)[0]
             for _ in range(args.repeats_per_process)]
    return {"times": times, "items": args.sample_count}


def job_sample_peer(args, device):
    diffusion = peer_diffusion(device).eval()

    def sample(count):
        return torch.cat([diffusion.sample(batch_size=min(args.sample_batch, count - start)).cpu()
                          for start in range(0, count, args.sample_batch)])

    sample(min(8, args.sample_count))  # warm-up
    times = [timed(lambda: sample(args.sample_count), device)[0] for _ in range(args.repeats_per_process)]
    return {"times": times, "items": args.sample_count}


def job_fid_ours(args, device):
    from kit import fid

    extractor = load_extractor(args, device)
    fid.build_extractor = lambda name, device: extractor  # FIDScorer builds its extractor through this
    real = np.load(os.path.join(args.workdir, "real.npy"))
    setup, scorer = timed(lambda: fid.FIDScorer(
        real, extractor_name=args.extractor, device=device, cache_dir=os.path.join(args.workdir, "cache"),
        cache_key=f"bench|{len(real)}", workers=4), device)
    images = fake_samples(args.fid_samples)
    times, values = [], []
    for _ in range(args.repeats_per_process):
        seconds, value = timed(lambda: scorer.score(images), device)
        times.append(seconds)
        values.append(value)
    return {"times": times, "items": args.fid_samples, "value": values[-1], "setup": setup}


def job_fid_folder(args, device):
    from cleanfid import fid as cleanfid
    from PIL import Image

    from kit.fid import FeatureComputer, to_uint8_hwc

    extractor = load_extractor(args, device)
    images = fake_samples(args.fid_samples)
    real_folder = os.path.join(args.workdir, "real_png")
    batch_size = FeatureComputer(extractor, device).batch_size  # the same batches as ours

    def evaluate():
        gen_folder = tempfile.mkdtemp(dir=args.workdir, prefix="gen_png_")
        try:
            for i, img in enumerate(to_uint8_hwc(images)):
                Image.fromarray(img).save(os.path.join(gen_folder, f"{i:05d}.png"))
            return cleanfid.compute_fid(gen_folder, real_folder, mode="clean", custom_feat_extractor=extractor,
                                        num_workers=os.cpu_count(), batch_size=batch_size, device=device,
                                        verbose=False, use_dataparallel=False)
        finally:
            shutil.rmtree(gen_folder, ignore_errors=True)

    times, values = [], []
    for _ in range(args.repeats_per_process):
        seconds, value = timed(evaluate, device)
        times.append(seconds)
        values.append(float(value))
    return {"times": times, "items": args.fid_samples, "value": values[-1]}


JOBS = {
    "train_ours": job_train_ours, "train_pure": job_train_pure, "train_peer": job_train_peer,
    "sample_ours": job_sample_ours, "sample_peer": job_sample_peer,
    "fid_ours": job_fid_ours, "fid_folder": job_fid_folder,
}


def execute(args, job):
    """Run one job with its memory measured: peak RSS of this process (exact, getrusage: in --quick, where all
    jobs share one process, it is the peak so far), sampled RSS of the process tree, CUDA max allocated."""
    from utils import select_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    memory = PeakMemory().start()
    result = JOBS[job](args, device)
    result["tree_mib"] = memory.stop()
    result["rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["cuda_mib"] = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return result


def run_job_here(args):
    """Child side: run one job, write its result as JSON to --result."""
    result = execute(args, args.job)
    with open(args.result, "w") as f:
        json.dump(result, f)


# ----------------------------------------------------------------------------------------------------------------
# parent side: prepare shared inputs, run the jobs in rounds, summarize


def prepare(args, device):
    """Inputs shared by the jobs, built once outside every timed region: a data subset (--quick), the FID
    reference images (center 32x32 crops of the 35x35-resized training images, as the trainer's FID uses) as
    an array and as PNGs, and the random extractor's weights."""
    from PIL import Image

    from kit.data import ImageData, list_images

    files = list_images(args.data, "cat")
    if args.data_limit:
        subset = os.path.join(args.workdir, "data", "cat")
        os.makedirs(subset)
        for f in files[: args.data_limit]:
            os.symlink(os.path.abspath(f), os.path.join(subset, os.path.basename(f)))
        args.data = os.path.dirname(subset)
        files = list_images(args.data, "cat")
    real = ImageData(files, IMAGE_SIZE, torch.device("cpu")).center_crops().permute(0, 2, 3, 1).numpy()
    real = real[: args.fid_real] if args.fid_real else real
    np.save(os.path.join(args.workdir, "real.npy"), real)
    os.makedirs(os.path.join(args.workdir, "real_png"))
    for i, img in enumerate(real):
        Image.fromarray(img).save(os.path.join(args.workdir, "real_png", f"{i:05d}.png"))
    if args.extractor == "inception":
        torch.manual_seed(0)
        torch.save(RandomInception().calibrate().state_dict(), os.path.join(args.workdir, "inception_random.pt"))
    return len(files), len(real)


def run_child(args, job, repeats):
    result_path = os.path.join(args.workdir, f"{job}.json")
    command = [sys.executable, os.path.abspath(__file__), "--job", job, "--result", result_path,
               "--workdir", args.workdir, "--repeats-per-process", str(repeats)]
    for name in ("device", "amp", "threads", "data", "batch", "steps", "warmup_steps", "sample_count", "sample_batch",
                 "fid_samples", "extractor"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    env = {**os.environ, "TQDM_DISABLE": "1", "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        sys.exit(f"bench job {job} failed (exit {done.returncode}):\n{done.stdout[-4000:]}")
    with open(result_path) as f:
        return json.load(f)


def run_all(args, log):
    merged = {}
    rounds, per_process = (1, args.repeats) if args.quick else (args.repeats, 1)
    for r in range(rounds):
        for job in JOBS:
            t0 = time.perf_counter()
            if args.quick:  # one process for everything: no interpreter start-ups, memory is cumulative
                args.repeats_per_process = per_process
                result = execute(args, job)
            else:
                result = run_child(args, job, per_process)
            log(f"  round {r + 1}/{rounds} {job:<12} {', '.join(f'{t:.2f}' for t in result['times'])} s "
                f"(process {time.perf_counter() - t0:.0f} s)")
            into = merged.setdefault(job, {"times": [], "tree_mib": [], "rss_mib": [], "cuda_mib": []})
            into["times"] += result["times"]
            for key in ("tree_mib", "rss_mib", "cuda_mib"):
                into[key].append(result[key])
            for key in ("items", "startup", "setup", "value"):
                if key in result:
                    into.setdefault(key, []).append(result[key])
    for job in merged.values():
        job["items"] = job["items"][0]
        job["rate"] = [job["items"] / t for t in job["times"]]  # images/s per repeat
    return merged


def median(values):
    return statistics.median(values) if values else None


def summarize(args, r, info):
    """The results table (markdown), the goal checks, and notes."""
    med = lambda job, key="rate": median(r[job][key])  # noqa: E731
    train_ratio = med("train_ours") / med("train_peer")
    loop_efficiency = med("train_ours") / med("train_pure")
    sample_ratio = med("sample_ours") / med("sample_peer")
    fid_speedup = med("fid_folder", "times") / med("fid_ours", "times")
    gpu = info["device"].startswith("cuda")

    rows = [
        [f"training images/s (batch {args.batch}x{ACCUM}, {args.steps} steps/repeat)", fmt_triple(r["train_ours"]["rate"]),
         fmt_triple(r["train_peer"]["rate"]), f"{train_ratio:.2f}x", "≥ 4x" if gpu else "≥ 1.3x"],
        ["pure model step images/s (ours, synthetic tensors)", fmt_triple(r["train_pure"]["rate"]), "",
         f"loop eff. {loop_efficiency:.2f}", "≥ 0.9"],
        ["trainer start-up s (data decode, model)", fmt_triple(r["train_ours"]["startup"], 2),
         fmt_triple(r["train_peer"]["startup"], 2), "", ""],
        [f"DDPM sampling images/s ({args.sample_count} images, batch {args.sample_batch}, T {T})",
         fmt_triple(r["sample_ours"]["rate"], 2), fmt_triple(r["sample_peer"]["rate"], 2), f"{sample_ratio:.2f}x",
         "≥ 5x" if gpu else "≥ 2x"],
        [f"one FID evaluation s ({args.fid_samples} samples vs {info['fid_real']} real; ours vs folder)",
         fmt_triple(r["fid_ours"]["times"], 2), fmt_triple(r["fid_folder"]["times"], 2),
         f"{fid_speedup:.2f}x faster", "≥ 5x faster"],
    ]
    goals = [("training ≥ %sx the peer" % (4 if gpu else 1.3), train_ratio >= (4 if gpu else 1.3), f"{train_ratio:.2f}x"),
             ("loop efficiency ≥ 0.9", loop_efficiency >= 0.9, f"{loop_efficiency:.2f}"),
             ("sampling ≥ %sx the peer" % (5 if gpu else 2), sample_ratio >= (5 if gpu else 2), f"{sample_ratio:.2f}x"),
             ("one FID evaluation ≥ 5x faster than the folder approach", fid_speedup >= 5, f"{fid_speedup:.2f}x")]

    # the folder approach recomputes every real image's features at every evaluation: with fewer real images
    # than the trainer uses, project its time to the full reference set from its measured per-image cost
    projection = None
    if info["fid_real"] < info["num_images"]:
        per_image = med("fid_folder", "times") / (args.fid_samples + info["fid_real"])
        folder_full = med("fid_folder", "times") + per_image * (info["num_images"] - info["fid_real"])
        projection = (folder_full, folder_full / med("fid_ours", "times"))
        goals.append((f"  same, projected to all {info['num_images']} real images", projection[1] >= 5,
                      f"{projection[1]:.2f}x"))

    memory_rows = []
    for job, label in [("train_ours", "training, ours"), ("train_peer", "training, peer (+ its DataLoader workers)"),
                       ("train_pure", "pure step, ours"), ("sample_ours", "sampling, ours"),
                       ("sample_peer", "sampling, peer"), ("fid_ours", "FID, ours"),
                       ("fid_folder", "FID, folder approach (+ loader workers)")]:
        cuda = [c for c in r[job]["cuda_mib"] if c is not None]
        memory_rows.append([label, fmt(max(r[job]["rss_mib"]), 0),
                            fmt(max(p for p in r[job]["tree_mib"] if p is not None), 0)
                            if any(p is not None for p in r[job]["tree_mib"]) else "-",
                            fmt(max(cuda), 0) if cuda else "-"])

    fid_values = (r["fid_ours"]["value"][-1], r["fid_folder"]["value"][-1])
    # 1e-3 absolute, or relative where the value is large (random-weight features have an arbitrary scale)
    agree = abs(fid_values[0] - fid_values[1]) <= 1e-3 * max(1.0, abs(fid_values[1]))
    step_s = args.batch * ACCUM / med("train_ours")
    projections = [
        ("10 000-step homework run, no FID", med("train_ours", "startup") + 10_000 * step_s + 64 / med("sample_ours")),
        ("1 000-step run, FID (1000 samples) every 100 steps",
         med("train_ours", "startup") + median(r["fid_ours"]["setup"]) + 1000 * step_s
         + 10 * (64 + 1000) / med("sample_ours") + 10 * med("fid_ours", "times") * 1000 / args.fid_samples),
    ]
    return rows, goals, memory_rows, fid_values, agree, projection, projections


def report(args, r, info, log):
    rows, goals, memory_rows, fid_values, agree, projection, projections = summarize(args, r, info)
    header = ["figure (min / **median** / max)", "ours", "peer / folder", "ratio (medians)", "goal"]
    lines = [
        f"# Benchmark: this project vs denoising-diffusion-pytorch 2.3.4 (issue 5)",
        "",
        f"- date: {info['date']}",
        f"- device: {info['device_text']}",
        f"- torch {torch.__version__}, Python {platform.python_version()}, "
        f"denoising-diffusion-pytorch {info['peer_version']}, clean-fid {info['cleanfid_version']}",
        f"- mode: {'--quick' if args.quick else 'full'}; {info['rounds']}; load average before / after: "
        f"{info['load_before']} / {info['load_after']}",
        f"- command: `{info['command']}`, total {info['total_s']:.0f} s",
        "",
        markdown_table(header, rows),
        "",
        "Goals (" + ("GPU" if info["device"].startswith("cuda") else "CPU") + "):",
        "",
        *[f"- {'met' if ok else 'MISSED'}: {name} (measured {value})" for name, ok, value in goals],
        "",
        f"FID values: ours {fid_values[0]:.6f}, folder approach {fid_values[1]:.6f} (difference "
        f"{abs(fid_values[0] - fid_values[1]):.3g}) -> "
        + ("agree within 1e-3 (relative above 1)" if agree else "DISAGREE by more than 1e-3 (relative above 1)"),
        "",
        "Peak memory (MiB, max over this job's processes):",
        "",
        markdown_table(["job", "peak RSS of the process", "peak RSS, process + workers (sampled)", "CUDA max allocated"], memory_rows),
        "",
        "Projected from the medians above (not measured end to end):",
        "",
        *[f"- {name}: {seconds:,.0f} s ({seconds / 60:,.1f} min)" for name, seconds in projections],
        "",
        "Notes:",
        "",
        *[f"- {note}" for note in info["notes"]],
    ]
    if projection:
        lines.insert(lines.index("Notes:") - 1, f"- folder approach with all {info['num_images']} real images: "
                     f"{projection[0]:,.0f} s, {projection[1]:.1f}x ours (its time scaled by its measured per-image cost)")
    text = "\n".join(lines) + "\n"
    log("\n" + text)
    return text


def notes(args, info):
    out = [
        f"training: both trainers are timed over {args.steps} optimizer steps per repeat ({args.batch} x {ACCUM} "
        "images per step) after a warm-up train() call on the same object. Ours: Trainer.train() with fid off; the "
        "end-of-run milestone (checkpoint, 64-image sample grid, metrics plot) is stubbed out because it is not "
        "training throughput and the peer's train() has no such step. Peer: its Trainer.train() on the same cat "
        f"folder, its own DataLoader ({os.cpu_count()} workers = cpu_count(), PIL decode + Resize + flip + "
        "CenterCrop per image per step), grad clipping as it does; amp off on CPU (its default), bf16 on a GPU. "
        f"Ours: --amp {args.amp} (auto = bf16 on a GPU and on CPUs with native bf16, like this bench's AMD EPYC "
        "with avx512_bf16; --amp off gives the fp32 figures).",
        "peer EMA: ema_update_every=1e9, so its EMA copies the weights once at the first step and afterwards only "
        "counts steps (at its default, every 10 steps, it would add one EMA update of the 2.5 M weights per 10 steps).",
        "peer model: Unet(dim=16, dim_mults=(1,2,4,8)) and GaussianDiffusion(timesteps=50, sampling_timesteps=50, "
        "beta_schedule='cosine', objective='pred_noise'); sampling is its DDPM p_sample_loop, not DDIM.",
        f"sampling: both draw {args.sample_count} images in batches of {args.sample_batch} at T {T}; untrained weights "
        "(the cost does not depend on them). Ours: Trainer.sample().",
        "FID: ours = FIDScorer built once (reference statistics cached, its build time is not in the figure), then "
        ".score(samples); folder = write the same samples as PNGs + cleanfid.fid.compute_fid(gen_folder, real_folder, "
        "mode='clean', custom_feat_extractor=the same extractor, same batch size), which recomputes the real "
        "images' features every time. Real images: center 32x32 crops of the 35x35-resized training images, saved "
        "as PNGs once outside the timed region.",
        ("--quick: all jobs run in this one process, so the memory figures are cumulative." if args.quick else
         "each (job, repeat) runs in a fresh process, in rounds that alternate ours and the peer's; memory is the "
         "max over the job's processes."),
        f"torch threads per process: {args.threads or torch.get_num_threads()}.",
    ]
    if args.extractor == "inception":
        out.append(RANDOM_INCEPTION_NOTE + " Its BatchNorm statistics are set from one batch of random images.")
    else:
        out.append("--quick: FID with the project's 'tiny' extractor (a small random conv net), so the FID ratio is "
                   "dominated by the folder round-trip, not by Inception; the ratios are a smoke check only.")
    if info["fid_real"] < info["num_images"]:
        out.append(f"FID uses the first {info['fid_real']} of the {info['num_images']} real images and "
                   f"{args.fid_samples} samples (a full Inception pass on this device would take too long).")
    if not info["device"].startswith("cuda"):
        out.append("CPU: sizes are reduced from the issue's (512 samples) to keep the run in ~20 minutes; images/s "
                   "does not depend much on the count. This machine is shared: other processes' load changes the "
                   "figures (see the load averages), min and max show how much.")
    return out


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes, one process per job: the table in < 1 min on CPU")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"), help="our trainer's --amp")
    p.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "afhq36", "train"),
                   help="folder holding cat/ (default ../shared/afhq36/train)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0 = torch's default)")
    p.add_argument("--batch", type=int, default=None, help="micro-batch (default 32, --quick: 8)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per timed repeat")
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--sample-count", type=int, default=None, help="images per sampling repeat (GPU default 512)")
    p.add_argument("--sample-batch", type=int, default=None)
    p.add_argument("--fid-samples", type=int, default=None, help="samples per FID evaluation (GPU default 512)")
    p.add_argument("--fid-real", type=int, default=None, help="real images for FID (0 = all; CPU default 64)")
    p.add_argument("--extractor", default=None, choices=("inception", "tiny"), help="default inception, --quick: tiny")
    p.add_argument("--data-limit", type=int, default=None, help="use the first N training images (--quick: 256)")
    p.add_argument("--output", default=None, help="markdown file to write (default bench/RESULTS.md, none in --quick)")
    # child-process options
    p.add_argument("--job", choices=JOBS, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--repeats-per-process", type=int, default=1, help=argparse.SUPPRESS)
    return p.parse_args()


def fill_defaults(args, gpu):
    """Sizes per mode and device: the issue's on a GPU, smaller on a CPU, tiny with --quick."""
    if args.quick:
        sizes = dict(batch=8, steps=2, warmup_steps=1, sample_count=8, sample_batch=8, fid_samples=16, fid_real=16,
                     extractor="tiny", data_limit=256)
    elif gpu:
        sizes = dict(batch=BATCH, steps=200, warmup_steps=20, sample_count=512, sample_batch=512, fid_samples=512,
                     fid_real=0, extractor="inception", data_limit=0)
    else:
        sizes = dict(batch=BATCH, steps=3, warmup_steps=2, sample_count=32, sample_batch=32, fid_samples=32,
                     fid_real=32, extractor="inception", data_limit=0)
    for name, value in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main():
    args = parse_args()
    warnings.filterwarnings("ignore")  # e.g. the peer's DataLoader: pin_memory without an accelerator
    if args.job:
        return run_job_here(args)

    from utils import select_device

    started = time.perf_counter()
    device = select_device(args.device)
    args = fill_defaults(args, device.type == "cuda")
    args.data = os.path.abspath(args.data)
    load_before = ", ".join(f"{x:.1f}" for x in os.getloadavg())

    def log(message):
        print(message, flush=True)

    from importlib.metadata import version

    args.workdir = tempfile.mkdtemp(prefix="ddpm-bench-")
    try:
        log(f"bench: {device_description(device)}; work folder {args.workdir}")
        num_images, fid_real = prepare(args, device)
        log(f"prepared: {num_images} training images, {fid_real} FID reference images "
            f"({time.perf_counter() - started:.0f} s)")
        results = run_all(args, log)
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)
    info = {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "device": str(device), "device_text": device_description(device),
        "peer_version": version("denoising-diffusion-pytorch"), "cleanfid_version": version("clean-fid"),
        "rounds": (f"{args.repeats} repeats in one process per job" if args.quick
                   else f"{args.repeats} rounds, one process per job and repeat"),
        "load_before": load_before, "load_after": ", ".join(f"{x:.1f}" for x in os.getloadavg()),
        "command": " ".join(["python", "bench/bench.py", *sys.argv[1:]]),
        "num_images": num_images, "fid_real": fid_real, "total_s": time.perf_counter() - started,
    }
    info["notes"] = notes(args, info)
    text = report(args, results, info, log)
    output = args.output or (None if args.quick else os.path.join(BENCH_DIR, "RESULTS.md"))
    if output:
        with open(output, "w") as f:
            f.write(text)
        log(f"written to {output}")


if __name__ == "__main__":
    main()
