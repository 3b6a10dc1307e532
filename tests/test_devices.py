"""What runs only on CUDA, Apple MPS or under torchrun (issue 17), checked on a CPU: each decision is a small
function given the device's facts (compute capability, free memory, device type), and what torch does with them
is reproduced where a CPU can (fused Adam exists on the CPU; torch.cuda.OutOfMemoryError can be raised here)."""
import importlib.util
import os

import pytest
import torch
from conftest import REPO, tiny_args

import trainer as trainer_module
import utils
from kit import device
from kit.checkpoints import restore_training_state, training_state
from kit.data import BatchOrder, ImageData, list_images
from kit.errors import TrainingDiverged, advised_learning_rate

CPU = torch.device("cpu")


# --- 1. resuming a checkpoint written by Adam with other kernels -----------------------------------------------------

def adam_checkpoint(fused):
    """A checkpoint's optimizer state after one step of Adam with or without the fused kernel. Without it, Adam
    keeps `step` in torch's default float dtype: float64 here, so that where load_state_dict puts it shows on a CPU
    (a fused kernel's step is float32 on the parameter's device; on CUDA that is the GPU, not the CPU)."""
    param = torch.nn.Parameter(torch.ones(3))
    param.grad = torch.ones(3)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        optimizer = torch.optim.Adam([param], fused=fused)
        optimizer.step()
    finally:
        torch.set_default_dtype(before)
    return {"optimizer": optimizer.state_dict(), "scaler": {}, "rng": {"cpu": torch.get_rng_state()}, "step": 1,
            "metrics": {"loss": [], "fid": []}}


def resume_into(state, fused):
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.Adam([param], fused=fused)
    seen = []  # the flags torch places `step` by
    optimizer.register_load_state_dict_pre_hook(lambda opt, saved: seen.append([g["fused"] for g in
                                                                                saved["param_groups"]]))
    restore_training_state(state, optimizer, torch.amp.GradScaler("cpu", enabled=False), CPU, 0, 0, 1e-3)
    param.grad = torch.ones(3)
    optimizer.step()  # the first resumed step runs, and counts on from the saved step
    return optimizer.state[param]["step"], seen, optimizer.param_groups[0]


needs_fused_cpu_adam = pytest.mark.skipif(not device.fused_adam(CPU), reason="this torch has no fused Adam on the CPU")


@needs_fused_cpu_adam
def test_a_checkpoint_from_unfused_adam_resumes_into_fused_adam_with_step_where_the_kernel_wants_it():
    step, seen, group = resume_into(adam_checkpoint(fused=False), fused=True)
    assert step.dtype == torch.float32 and step.device == CPU and float(step) == 2.0
    assert seen == [[True]] and group["fused"] is True


@needs_fused_cpu_adam
def test_a_checkpoint_from_fused_adam_resumes_into_unfused_adam():
    step, seen, group = resume_into(adam_checkpoint(fused=True), fused=False)
    assert seen == [[False]] and group["fused"] is False
    assert step.device == CPU and float(step) == 2.0  # left on the CPU, where the unfused loop reads it


def test_adam_is_fused_where_torch_has_the_kernels():
    assert device.fused_adam(torch.device("cuda")) and not device.fused_adam(torch.device("meta"))
    try:  # on the CPU (recent torch: 13 ms a step against 37 ms here) exactly where Adam accepts it
        torch.optim.Adam([torch.nn.Parameter(torch.ones(1))], fused=True)
        accepted = True
    except RuntimeError:
        accepted = False
    assert device.fused_adam(CPU) == accepted


# --- 2. float64 on Apple MPS --------------------------------------------------------------------------------------

def alternative_solution(name):
    path = os.path.join(REPO, "tools", "alt_solutions", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"alt_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_float64_buffers_are_refused_on_mps_only_naming_them_and_the_fix():
    from unet import Unet

    float64 = alternative_solution("float64_plain_indexing").Diffusion(Unet(dim=8, dim_mults=(1, 2)), image_size=16)
    problem = device.float64_on_mps_problem("mps", float64)
    assert problem.startswith("your Diffusion keeps abar, alpha in float64, which Apple's MPS GPU does not support")
    assert problem.endswith("store them as float32 (`.float()` before register_buffer), or pass --device cpu.")
    assert device.float64_on_mps_problem("cuda", float64) is None
    assert device.float64_on_mps_problem("cpu", float64) is None
    reference = trainer_module.Diffusion(Unet(dim=8, dim_mults=(1, 2)), image_size=16)
    assert device.float64_on_mps_problem("mps", reference) is None
    reference.plain = torch.zeros(2, dtype=torch.float64)  # a plain attribute, moved by hand where used
    assert device.float64_on_mps_problem("mps", reference).startswith("your Diffusion keeps plain in float64")


def test_the_trainer_refuses_float64_on_mps_before_reading_the_data(tmp_path, image_folder, monkeypatch):
    monkeypatch.setattr(trainer_module, "select_device", lambda name: torch.device("mps"))
    monkeypatch.setattr(trainer_module, "Diffusion", alternative_solution("float64_plain_indexing").Diffusion)

    def refuse(*args, **kwargs):
        raise AssertionError("the data was read: the check should have come before")

    monkeypatch.setattr(trainer_module, "list_images", refuse)
    with pytest.raises(utils.ConfigError, match=r"keeps abar, alpha in float64, .*or pass --device cpu\.$"):
        utils.train_diffusion(**tiny_args(tmp_path, image_folder))


# --- 3. the sampling batch ----------------------------------------------------------------------------------------

def test_the_sampling_batch_follows_the_image_area_and_the_free_memory():
    t4_free = 14 * 2**30
    assert device.sampling_batch_size(32, 16, t4_free) == 1000  # the handout's images: as before
    at_128 = device.sampling_batch_size(128, 16, t4_free)
    assert 100 <= at_128 <= 200 and at_128 * (2600 + 16 * 16) * 128 * 128 <= t4_free / 2
    assert device.sampling_batch_size(128, 128, t4_free) < at_128  # a wider U-Net holds more per pixel
    assert device.sampling_batch_size(512, 16, 2**30) == 1  # never zero
    assert device.sampling_batch_size(32, 16) == 250 and device.sampling_batch_size(128, 16) == 15  # MPS, CPU
    assert device.free_memory(CPU) is None


def test_out_of_gpu_memory_halves_the_batch_and_starts_over(capsys):
    calls = []

    def draw(count, batch_size):
        calls.append(batch_size)
        if batch_size > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.00 GiB")
        return list(range(count))

    assert device.halving_batch_on_oom(draw, 10, 16) == (list(range(10)), 2)
    assert calls == [16, 8, 4, 2]
    assert "Out of GPU memory while sampling: starting again with batches of 2 images." in capsys.readouterr().err
    with pytest.raises(torch.cuda.OutOfMemoryError):
        device.halving_batch_on_oom(lambda count, batch_size: draw(count, 99), 10, 1)


def test_sampling_after_running_out_of_memory_gives_the_images_of_the_batch_that_fits(tmp_path, image_folder,
                                                                                      monkeypatch):
    trainer = trainer_module.Trainer(utils.Config.from_args(**tiny_args(tmp_path, image_folder)))
    real_sample = trainer.diffusion.sample

    def sample_in_small_memory(batch_size):
        if batch_size > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real_sample(batch_size)

    expected = trainer.sample(6, batch_size=3)
    trainer.sampling_batch = 12  # as if the free memory had been thought to hold 12
    monkeypatch.setattr(trainer.diffusion, "sample", sample_in_small_memory)
    assert torch.equal(trainer.sample(6), expected)  # 12 and 6 ran out: started over with 3, from the same seed
    assert trainer.sampling_batch == 3  # the next save point starts there


# --- 5. batch indices stay on the device ---------------------------------------------------------------------------

class CrossDeviceCopies(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the copies between devices that torch runs (the "meta" device stands in for a GPU on a CPU)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            source = args[1] if func is torch.ops.aten.copy_.default else args[0]
            target = out
            self.count += source.device != target.device
        return out


def test_batch_indices_are_sliced_on_the_device_with_one_copy_per_epoch(image_folder):
    gpu = torch.device("meta")
    data = ImageData(list_images(image_folder, "cat"), 16, gpu, workers=1)  # 48 images
    order = BatchOrder(len(data), seed=0, device=gpu)
    with CrossDeviceCopies() as copies:
        for start in range(0, 48, 8):  # the micro-batches of one epoch
            batch = data.batch(order.indices(start, 8))
    assert copies.count == 1 and batch.device == gpu and batch.shape == (8, 3, 16, 16)  # the epoch's permutation
    assert torch.equal(BatchOrder(48, seed=0).indices(0, 96), BatchOrder(48, seed=0, device=CPU).indices(0, 96))


# --- 6. CUDA math, --compile, --amp ------------------------------------------------------------------------------

def test_cuda_gets_cudnn_autotuning_and_tf32_from_ampere_on():
    assert device.cuda_math_settings((7, 5)) == (True, False)  # T4: no TF32 units
    assert device.cuda_math_settings((8, 0)) == (True, True)  # A100
    assert device.cuda_math_settings((9, 0)) == (True, True)  # H100


def test_the_gpu_math_flags_are_set_for_the_gpu_at_hand(monkeypatch):
    flags = [(torch.backends.cudnn, "benchmark"), (torch.backends.cudnn, "allow_tf32"),
             (torch.backends.cuda.matmul, "allow_tf32")]
    before = [getattr(owner, name) for owner, name in flags]
    try:
        for capability, tf32 in (((8, 6), True), ((7, 5), False)):
            monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
            device.configure_cuda_math(torch.device("cuda"))
            assert torch.backends.cudnn.benchmark is True
            assert torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.allow_tf32 is tf32
    finally:
        for (owner, name), value in zip(flags, before):
            setattr(owner, name, value)


def test_compile_off_cuda_warns_and_runs_uncompiled(tmp_path, image_folder, capsys):
    trainer = trainer_module.Trainer(utils.Config.from_args(**tiny_args(tmp_path, image_folder, compile=True)))
    assert trainer.diffusion.model is trainer.unet
    assert "warning: --compile is for CUDA GPUs; on the CPU it makes training slower, so the U-Net runs " \
           "uncompiled." in capsys.readouterr().err
    assert device.compile_warning("cuda") is None and "on this Mac" in device.compile_warning("mps")


@pytest.mark.parametrize("choice, device_type, native, expected, warns", [
    ("auto", "cuda", True, torch.bfloat16, None),
    ("auto", "cuda", False, torch.float16, None),  # a T4: fp16 with loss scaling
    ("bf16", "cuda", True, torch.bfloat16, None),
    ("bf16", "cuda", False, torch.bfloat16, "on a GPU without native bf16 (compute capability below 8.0, e.g. a T4)"),
    ("fp16", "cuda", False, torch.float16, None),
    ("auto", "cpu", True, torch.bfloat16, None),
    ("auto", "cpu", False, None, None),
    ("bf16", "cpu", False, torch.bfloat16, "on a CPU without native bf16"),
    ("auto", "mps", True, None, None),
    ("off", "cuda", True, None, None),
])
def test_amp_choice_per_device(choice, device_type, native, expected, warns):
    dtype, warning = device.amp_choice(choice, device_type, native)
    assert dtype == expected
    assert (warning is None) if warns is None else (warns in warning)


def test_amp_bf16_on_a_t4_warns(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert device.amp_dtype("bf16", torch.device("cuda")) == torch.bfloat16
    assert "warning: --amp bf16 on a GPU without native bf16" in capsys.readouterr().err


# --- minor: ROCm, torchrun processes, MPS random state, the advised learning rate ------------------------------------

def test_gpu_support_is_judged_from_the_build_and_rocm_builds_are_not_refused():
    cuda_126 = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90", "compute_90"]
    cuda_128 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]
    assert device.unsupported_gpu_reason((7, 5), cuda_126, None, "Tesla T4", "2.14.1") is None
    assert device.unsupported_gpu_reason((10, 3), cuda_126, None, "B300", "2.14.1") is None  # through PTX
    reason = device.unsupported_gpu_reason((6, 0), cuda_128, None, "Tesla P100-PCIE-16GB", "2.14.1")
    assert reason.startswith("the GPU Tesla P100-PCIE-16GB (compute capability 6.0) is not supported by the "
                             "installed PyTorch 2.14.1 (built for sm_75")
    rocm = ["gfx900", "gfx906", "gfx908", "gfx90a", "gfx942", "gfx1100"]
    assert device.unsupported_gpu_reason((9, 4), rocm, "6.4.43482", "AMD Instinct MI300X", "2.14.1") is None


def test_more_torchrun_processes_than_gpus_is_one_sentence():
    assert device.too_many_processes(2, 2) is None and device.too_many_processes(1, 8) is None
    assert device.too_many_processes(2, 1) == (
        "torchrun started 2 processes on this machine, but it has 1 GPU(s) and each process needs its own: pass "
        "--nproc_per_node 1, or run `python main.py` without torchrun.")
    assert device.too_many_processes(8, 4).endswith("pass --nproc_per_node 4.")


def test_torchrun_with_more_processes_than_gpus_stops_before_touching_a_gpu(monkeypatch):
    for name, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(utils.ConfigError, match=r"^torchrun started 2 processes on this machine, but it has 1 GPU"):
        device.setup_distributed(torch.device("cuda"))  # used to fail in torch.cuda.set_device(1)


def test_the_mps_random_state_is_saved_and_restored(tmp_path, image_folder, monkeypatch):
    mps_state = {"now": torch.tensor([7], dtype=torch.uint8)}
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda device="mps": mps_state["now"].clone())
    monkeypatch.setattr(torch.mps, "set_rng_state", lambda state, device="mps": mps_state.update(now=state))
    trainer = trainer_module.Trainer(utils.Config.from_args(**tiny_args(tmp_path, image_folder)))
    trainer.device = torch.device("mps")
    state = training_state(trainer)
    assert state["rng"]["mps"].tolist() == [7] and state["rng"]["cuda"] is None
    mps_state["now"] = torch.tensor([0], dtype=torch.uint8)  # the device drew more numbers
    restore_training_state(state, trainer.optimizer, trainer.scaler, torch.device("mps"), 0, 0, 1e-3)
    assert mps_state["now"].tolist() == [7]


@pytest.mark.parametrize("diverged, advised", [(1e30, 1e-3), (2e-3, 1e-3), (1e-3, 1e-4), (3e-4, 3e-5)])
def test_after_divergence_the_advised_learning_rate_is_one_that_trains(diverged, advised):
    assert advised_learning_rate(diverged) == pytest.approx(advised)
    message = str(TrainingDiverged.at("the loss became nan", 3, "nowhere/checkpoint.pt", 1e30))
    assert "Lower --learning_rate (now 1e+30, e.g. 0.001, the default) or try --amp off" in message

