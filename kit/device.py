"""Where the run happens: device choice, seeding, RNG isolation, mixed precision, GPU math settings and memory,
fused Adam, DistributedDataParallel set-up."""
import contextlib
import datetime
import inspect
import os
import random
import re
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from kit.errors import ConfigError


def cuda_unsupported_reason():
    """Why the installed torch cannot run kernels on GPU 0 (None when it can, or when torch cannot tell)."""
    return unsupported_gpu_reason(torch.cuda.get_device_capability(0), torch.cuda.get_arch_list(), torch.version.hip,
                                  torch.cuda.get_device_name(0), torch.__version__)


def unsupported_gpu_reason(capability, archs, hip_version, gpu_name, torch_version):
    """Why a torch built for `archs` cannot run on a CUDA GPU of this `capability` (None when it can).

    A build runs on GPUs whose architecture it was compiled for (same major version, equal or lower minor) or,
    through PTX, on newer ones. Kaggle's P100 (6.0) with a build that starts at sm_75 fails at the first kernel
    with "no kernel image is available"; this says so before any work starts. ROCm builds (AMD GPUs) list gfx
    targets instead and are not judged here."""
    if hip_version or not archs:
        return None
    major, minor = capability
    capability_number = major * 10 + minor

    def number(arch):
        return int(re.sub(r"\D", "", arch))

    runs = any(a.startswith("sm_") and number(a) // 10 == major and number(a) % 10 <= minor for a in archs) or any(
        a.startswith("compute_") and number(a) <= capability_number for a in archs
    )
    if runs:
        return None
    return (f"the GPU {gpu_name} (compute capability {major}.{minor}) is not supported by the "
            f"installed PyTorch {torch_version} (built for {' '.join(archs)}). On Kaggle choose the "
            "'GPU T4 x2' accelerator; elsewhere install a PyTorch build for this GPU, or pass --device cpu.")


def select_device(name="auto"):
    """cuda > mps > cpu for 'auto'; an explicit choice must be available and usable."""
    mps_available = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name not in ("auto", "cuda", "mps", "cpu"):
        raise ConfigError(f"--device {name!r}: choose auto, cuda, mps or cpu.")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is visible to PyTorch. Use --device auto or cpu, "
                          "or install a CUDA build of torch on a GPU machine.")
    if name == "mps" and not mps_available:
        raise ConfigError("--device mps: Apple's MPS backend is not available here. Use --device auto or cpu.")
    if name in ("auto", "cuda") and torch.cuda.is_available():
        reason = cuda_unsupported_reason()
        if reason:
            raise ConfigError(f"--device {name}: {reason}")
        return torch.device("cuda")
    if name == "auto":
        return torch.device("mps" if mps_available else "cpu")
    return torch.device(name)


# the other ranks wait in their next collective while rank 0 samples and scores FID
DISTRIBUTED_TIMEOUT = datetime.timedelta(hours=2)


def setup_distributed(device):
    """Under torchrun (WORLD_SIZE > 1): one GPU per process and the process group. Returns (device, rank, world)."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1:
        if device.type == "cuda":
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
            problem = too_many_processes(int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1)),
                                         torch.cuda.device_count())
            if problem:
                raise ConfigError(problem)
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=DISTRIBUTED_TIMEOUT)
    return device, rank, world_size


def host_group():
    """A process group for small decisions taken on the CPU (gloo), beside NCCL's for the gradients: an
    all-reduce there does not wait for the GPU's queued work, so it can run every step."""
    return None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo", timeout=DISTRIBUTED_TIMEOUT)


def too_many_processes(processes_here, gpus_here):
    """One GPU per torchrun process: more processes on this machine than GPUs is refused (else CUDA says
    "invalid device ordinal" in some of them)."""
    if processes_here <= gpus_here:
        return None
    return (f"torchrun started {processes_here} processes on this machine, but it has {gpus_here} GPU(s) and each "
            f"process needs its own: pass --nproc_per_node {gpus_here}"
            + (", or run `python main.py` without torchrun." if gpus_here == 1 else "."))


def distributed(model, device):
    """The model wrapped in DistributedDataParallel under torchrun (WORLD_SIZE > 1), else the model itself."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    # the buffers (the schedule) never change, so no per-step buffer sync; torch 2.13 renamed the option
    ddp = torch.nn.parallel.DistributedDataParallel
    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
                      else {"broadcast_buffers": False})
    return ddp(model, device_ids=device_ids, **no_buffer_sync)


def read_back(pending, world_size):
    """Per-step losses kept on the device, as Python floats: one sync; averaged over the ranks under torchrun
    (world_size > 1). Empties `pending`."""
    if not pending:
        return []
    values = torch.stack(pending)
    pending.clear()
    if world_size > 1:
        dist.all_reduce(values)
        values /= world_size
    return values.float().cpu().tolist()


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


@contextlib.contextmanager
def isolated_rng(device):
    """Run a block (sampling, FID, figures) without moving the training RNG streams, so that where the
    samples are drawn does not change the training run (and resumed runs stay bit-identical)."""
    accelerated = device.type != "cpu"
    devices = [device.index or 0] if accelerated else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if accelerated else "cuda"):
        yield


def cpu_has_native_bf16():
    """x86 CPUs with AVX512-BF16 or AMX run bf16 matrix math natively (read from Linux's /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def native_bf16(device):
    """Whether the device runs bf16 math natively (Ampere or newer GPUs, AVX512-BF16/AMX CPUs, Apple GPUs)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return True


def amp_dtype(choice, device):
    """The autocast dtype for --amp on this device, or None for full fp32; prints a warning for a slow choice."""
    dtype, warning = amp_choice(choice, device.type, native_bf16(device))
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    return dtype


def amp_choice(choice, device_type, has_native_bf16):
    """(autocast dtype or None, warning or None) for --amp `choice` on a device of this type."""
    if choice == "auto":
        if device_type == "cuda":
            return (torch.bfloat16 if has_native_bf16 else torch.float16), None  # fp16 + GradScaler on a T4
        if device_type == "cpu" and has_native_bf16:
            return torch.bfloat16, None  # about 1.9x faster steps on such a CPU, same loss curve (bench/RESULTS.md)
        return None, None  # emulated bf16 is slower than fp32 on other CPUs; MPS autocast support is partial
    if choice == "off":
        return None, None
    if device_type == "cpu" and choice == "fp16":
        raise ConfigError("--amp fp16 needs a GPU; use --amp bf16 or off on the CPU.")
    warning = None
    if choice == "bf16" and not has_native_bf16 and device_type == "cpu":
        warning = ("--amp bf16 on a CPU without native bf16 (no AVX512-BF16 or AMX): bf16 is emulated there "
                   "and can be many times slower than fp32. Use --amp auto or off.")
    elif choice == "bf16" and not has_native_bf16:
        warning = ("--amp bf16 on a GPU without native bf16 (compute capability below 8.0, e.g. a T4): bf16 is "
                   "emulated there and slower than fp16. Use --amp auto (fp16 with loss scaling on this GPU).")
    return (torch.bfloat16 if choice == "bf16" else torch.float16), warning


def fused_adam(device):
    """Whether Adam runs as fused kernels here: on every device type this torch has them for (CUDA; MPS and CPU
    in recent versions). On this CPU a fused step of the 2.47 M-parameter U-Net takes 13 ms against 37 ms for
    the per-tensor loop; on MPS the loop also reads `step` back once per parameter tensor."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices  # the list Adam itself checks
    except ImportError:  # a torch older than the list: fused Adam was CUDA-only then
        return device.type == "cuda"
    return device.type in _get_fused_kernels_supported_devices()


def cuda_math_settings(capability):
    """(cudnn.benchmark, TF32) for a CUDA GPU of this compute capability. Training's shapes never change, so
    cuDNN may time its convolution algorithms once and keep the fastest; Ampere and newer GPUs (8.0+) run
    float32 matrix products and convolutions in TF32 (10-bit mantissa inputs, float32 sums), which is what
    `--amp off` then means there."""
    return True, capability >= (8, 0)


def configure_cuda_math(device):
    if device.type == "cuda":
        benchmark, tf32 = cuda_math_settings(torch.cuda.get_device_capability(device))
        torch.backends.cudnn.benchmark = benchmark
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32


def compile_warning(device_type):
    """--compile pays off on CUDA only: on this CPU, compiled training measured 1.3 s a step against 0.86 s
    eager, after 116 s of compiling."""
    if device_type == "cuda":
        return None
    return (f"--compile is for CUDA GPUs; on {'this Mac' if device_type == 'mps' else 'the CPU'} it makes "
            "training slower, so the U-Net runs uncompiled.")


def accelerator_rng_state(device):
    """The random state of the CUDA or MPS device (None on the CPU): a checkpoint keeps it so that a resumed run
    draws the same numbers as an uninterrupted one."""
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    if device.type == "mps":
        return torch.mps.get_rng_state()
    return None


def set_accelerator_rng_state(device, state):
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    elif device.type == "mps":
        torch.mps.set_rng_state(state)


def float64_on_mps_problem(device_type, module):
    """Apple's MPS GPU has no float64: a diffusion keeping its schedule in float64 tensors cannot move there
    (`.to("mps")` fails with a bare TypeError). Names those tensors and the fix; None when there is nothing to say."""
    if device_type != "mps":
        return None
    tensors = dict(module.named_buffers())
    for prefix, submodule in module.named_modules():  # plain tensor attributes do not follow .to(), but are used
        tensors.update({f"{prefix}.{name}".lstrip("."): value for name, value in vars(submodule).items()
                        if isinstance(value, torch.Tensor)})
    names = sorted(name for name, tensor in tensors.items() if tensor.dtype == torch.float64)
    if not names:
        return None
    return (f"your Diffusion keeps {', '.join(names)} in float64, which Apple's MPS GPU does not support: store "
            "them as float32 (`.float()` before register_buffer), or pass --device cpu.")


def sampling_batch_size(image_size, unet_dim, free_bytes=None):
    """Images per sampling batch. A U-Net pass under inference mode holds about 2.6 kB + 16 B x unet_dim of live
    activations per image pixel (measured: 2.7 kB at unet_dim 8, 2.8 at 16, 4.7 at 128), so memory grows with
    the image area: 1000 images of 128 x 128 need about 46 GB in float32. With the GPU's free memory known, as many as half
    of it holds (the other half for the allocator's slack and cuDNN's workspaces), at most 1000; otherwise (MPS,
    CPU) 250 images of 32 x 32, fewer for larger images."""
    if free_bytes is None:
        return max(1, 250 * 32 * 32 // (image_size * image_size))
    bytes_per_image = (2600 + 16 * unet_dim) * image_size * image_size
    return max(1, min(1000, free_bytes // (2 * bytes_per_image)))


def free_memory(device):
    """Bytes this process can still allocate on a CUDA GPU (its own cached blocks included); None elsewhere."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def halving_batch_on_oom(draw, count, batch_size):
    """`draw(count, batch_size)`, started over with half the batch each time the device runs out of memory.
    Returns (what draw returned, the batch size that worked)."""
    while True:
        try:
            return draw(count, batch_size), batch_size
        except torch.cuda.OutOfMemoryError:  # the same class as torch.OutOfMemoryError in recent torch
            if batch_size == 1:
                raise
        # outside the except clause, so that the failed attempt's tensors are freed before the next one
        batch_size //= 2
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        print(f"Out of GPU memory while sampling: starting again with batches of {batch_size} images.",
              file=sys.stderr)


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


class RunClock:
    """Times the first steps of a run (after one warm-up step) and, when the whole run will take hours on this
    device, says so once, with what to do instead."""

    TIMED_STEPS, LONG_RUN_SECONDS = 3, 3600

    def __init__(self, first_step, last_step, device):
        self.first_step, self.last_step, self.device = first_step, last_step, device
        self.started = None

    def note_after(self, step):
        """The note to print after `step`, if any (only once, after the timed steps)."""
        if step == self.first_step + 1:
            self.started = time.perf_counter()
        if step != self.first_step + 1 + self.TIMED_STEPS or self.started is None:
            return None
        seconds_per_step = (time.perf_counter() - self.started) / self.TIMED_STEPS
        left = seconds_per_step * (self.last_step - step)
        if left < self.LONG_RUN_SECONDS:
            return None
        where = {"cpu": "this CPU", "mps": "this Mac's GPU"}.get(self.device.type, "this GPU")
        return (f"note: at {seconds_per_step:.2f} s a step on {where}, the {self.last_step - step} steps left will "
                f"take about {left / 3600:.1f} hours. The homework's runs are meant for a GPU (run_in_colab.ipynb or "
                f"run_in_kaggle.ipynb); here, --train_steps 1000 takes about "
                f"{seconds_per_step * 1000 / 60:.0f} minutes. Ctrl-C saves and stops; re-running resumes.")
