"""The Colab and Kaggle notebooks: committed stripped and valid, in step with tools/build_notebooks.py, and
runnable top to bottom in a real Jupyter kernel in their smoke configuration (DDPM_SMOKE=1: a few CPU steps,
no installs, no network), producing every handout figure (7.1-7.5) inline and on disk. Their cells' other
paths (handout.zip upload, the install plan against Colab's package list, the GPU check, reloading the
student's code) are run in this process."""
import csv
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402  (installed with nbclient)
from jupyter_client.manager import KernelManager  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = ("run_in_colab.ipynb", "run_in_kaggle.ipynb")
CELL_TIMEOUT_S = 1800  # a hang guard, not a speed limit: a busy machine must not fail the smoke runs
COLAB_FREEZE = REPO.parent / "shared" / "platforms" / "colab-pip-freeze-gpu.txt"
SHARED_TRAIN = REPO.parent / "shared" / "afhq36" / "train"  # the course's images, on the team's machines
FIGURES = ("loss.png", "fid.png", "forward_diffusion.png", "backward_diffusion.png", "checkpoint.pt", "metrics.csv")


def load_builder():
    spec = importlib.util.spec_from_file_location("build_notebooks", REPO / "tools" / "build_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_valid_and_stripped(name):
    notebook = nbformat.read(REPO / name, as_version=nbformat.NO_CONVERT)
    assert notebook.nbformat == 4
    nbformat.validate(notebook)
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{name} cell {index} has outputs: strip them before committing"
            assert cell.execution_count is None, f"{name} cell {index} has an execution count: strip it"
        assert "execution" not in cell.metadata, f"{name} cell {index} has execution timings in its metadata"
    assert notebook.metadata.kernelspec.name == "python3"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_matches_its_generator(name):
    builder = load_builder()
    platform = next(p for p in builder.PLATFORMS.values() if p.filename == name)
    assert (REPO / name).read_text() == builder.render(platform), (
        f"{name} differs from tools/build_notebooks.py: edit the generator, then run python tools/build_notebooks.py"
    )


@pytest.fixture(scope="module")
def kernel_specs(tmp_path_factory):
    """A python3 kernelspec that runs this interpreter (the venv's), whatever other python3 specs are installed.
    Laid out as a Jupyter data folder (kernels/python3/kernel.json) so JUPYTER_PATH can point at it too."""
    folder = tmp_path_factory.mktemp("jupyter") / "kernels"
    spec = folder / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (test)",
        "language": "python",
    }))
    return KernelSpecManager(kernel_dirs=[str(folder)])


def image_outputs(notebook):
    return [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
            if output.output_type == "display_data" and "image/png" in output.get("data", {})]


def listing(folder):
    """{path: (size, mtime)} of everything under folder; empty when it does not exist."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def execute_smoke(name, repo, tmp_path, monkeypatch, kernel_specs, with_nbconvert=False, data=None):
    """Run the notebook in `repo` (the kernel's working directory) with DDPM_SMOKE=1, through nbclient or through
    the `jupyter nbconvert --execute --to notebook` command itself, and check that every handout figure was
    written to disk and shown inline."""
    monkeypatch.setenv("DDPM_SMOKE", "1")
    monkeypatch.setenv("DDPM_SMOKE_DIR", str(tmp_path))
    if data:
        monkeypatch.setenv("DDPM_SMOKE_DATA", str(data))
    else:
        monkeypatch.delenv("DDPM_SMOKE_DATA", raising=False)
    monkeypatch.setenv("DDPM_CACHE_DIR", str(tmp_path / "cache"))  # FID statistics: not in the home folder
    monkeypatch.setenv("WANDB_MODE", "disabled")  # belt and braces: the smoke config disables wandb already
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # CPU torch with 2+ threads crawls on a busy CI machine
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    before = listing(repo / "results")  # a run of main.py may have left one: the notebook must not touch it
    start = time.monotonic()
    if with_nbconvert:
        monkeypatch.setenv("JUPYTER_PATH", str(Path(kernel_specs.kernel_dirs[0]).parent))
        executed = tmp_path / "executed.ipynb"
        result = subprocess.run(
            [sys.executable, "-m", "jupyter", "nbconvert", "--execute", "--to", "notebook", "--output",
             str(executed), f"--ExecutePreprocessor.timeout={CELL_TIMEOUT_S}", str(repo / name)],
            cwd=repo, capture_output=True, text=True, timeout=CELL_TIMEOUT_S,
        )
        assert result.returncode == 0, f"jupyter nbconvert --execute failed on {name}:\n{result.stderr[-3000:]}"
        notebook = nbformat.read(executed, as_version=4)
    else:
        notebook = nbformat.read(repo / name, as_version=4)
        client = nbclient.NotebookClient(
            notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
            km=KernelManager(kernel_name="python3", kernel_spec_manager=kernel_specs),
            resources={"metadata": {"path": str(repo)}},
        )
        client.execute()  # raises CellExecutionError, naming the cell and its traceback, on any cell error
    print(f"{name}: {time.monotonic() - start:.0f} s in smoke mode")  # reported, not limited (load varies)
    results = tmp_path / "results"
    for figure in FIGURES:
        assert (results / figure).is_file(), f"{name} did not write {figure} in {results}"
    # the smoke settings' two milestones (a curve of two points), whether the images are real or generated
    assert sorted(p.name for p in (results / "samples").glob("sample-*.png")) == ["sample-1.png", "sample-2.png"]
    with open(results / "metrics.csv") as f:
        fid_steps = [row["step"] for row in csv.DictReader(f) if row["fid"]]
    assert fid_steps == ["1", "2"], f"{name} scored FID at steps {fid_steps}, not at its two milestones 1 and 2"
    # 7.1 loss, 7.2 FID, 7.3 samples, 7.4 forward, 7.5 backward, all displayed inline
    assert len(image_outputs(notebook)) >= 5, f"{name} displayed fewer than the 5 handout figures inline"
    assert listing(repo / "results") == before, f"{name} wrote into the repository's results/ in smoke mode"


@pytest.mark.parametrize("name", ["run_in_colab.ipynb"])
def test_notebook_runs_top_to_bottom_in_smoke_mode(name, tmp_path, monkeypatch, kernel_specs):
    """With the course images from ../shared/afhq36 when present (as on the team's machines). The Kaggle notebook
    (the same cells with other slots) runs end to end in the next test: two end-to-end runs keep the suite quick."""
    execute_smoke(name, REPO, tmp_path, monkeypatch, kernel_specs, data=SHARED_TRAIN if SHARED_TRAIN.is_dir() else None)


def test_notebook_runs_in_smoke_mode_without_shared_data(tmp_path, monkeypatch, kernel_specs):
    """In a copy of the repository with no ../shared beside it, holding the results/ of an earlier run: the
    trainer's generated images. Run with the `DDPM_SMOKE=1 jupyter nbconvert --execute --to notebook` command that
    students and the issue name."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True)
    if listed.returncode:
        pytest.skip("git is needed to copy the repository's files")
    repo = tmp_path / "checkout" / "repo"
    for relative in filter(None, listed.stdout.decode().split("\0")):
        if (REPO / relative).is_file():
            (repo / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / relative, repo / relative)
    assert not (repo.parent / "shared").exists()
    (repo / "results").mkdir(exist_ok=True)  # what `python main.py --smoke` leaves behind in a student's folder
    (repo / "results" / "metrics.csv").write_text("step,loss,fid\n4,0.9,\n")
    execute_smoke("run_in_kaggle.ipynb", repo, tmp_path / "out", monkeypatch, kernel_specs, with_nbconvert=True)


# ---------------------------------------------------------------------------------------------------------------
# The cells' non-smoke logic, run in this process without a kernel, network or installs: finding and building the
# data, wandb's mode, the Drive fallback and the requirements check.


def run_cells(name, *cell_ids, namespace=None, before=None):
    """exec the notebook's cells with these ids, in notebook order, in one namespace. `before(cell_id, ns)` may
    adjust the namespace before a cell runs (as a student editing the parameters cell would)."""
    notebook = nbformat.read(REPO / name, as_version=4)
    namespace = {} if namespace is None else namespace
    for cell in notebook.cells:
        if cell.get("id") in cell_ids:
            if before:
                before(cell.id, namespace)
            exec(compile(cell.source, f"{name}:{cell.id}", "exec"), namespace)
    return namespace


@pytest.fixture
def outside_smoke(monkeypatch):
    monkeypatch.delenv("DDPM_SMOKE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.chdir(REPO)  # the code cell chdirs into the repository; restored afterwards


def make_afhq_zip(path, side=64, count=3):
    """A zip in the official layout (afhq/train/cat/*.jpg) with full-size-like images."""
    import zipfile
    from io import BytesIO

    from PIL import Image

    with zipfile.ZipFile(path, "w") as archive:
        for index in range(count):
            buffer = BytesIO()
            Image.new("RGB", (side, side), (40 * index, 90, 160)).save(buffer, format="JPEG")
            archive.writestr(f"afhq/train/cat/flickr_cat_{index:06d}.jpg", buffer.getvalue())
    return path


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_data_cell_builds_from_a_zip_with_the_data_tool(name, tmp_path, outside_smoke):
    source = make_afhq_zip(tmp_path / "course_data.zip")

    def edit(cell_id, ns):
        if cell_id == "code":  # after the parameters cell: point it at the zip and at an empty output folder
            ns["DATA_SOURCE"] = str(source)
            ns["args"]["data_path"] = str(tmp_path / "data" / "train")

    ns = run_cells(name, "parameters", "code", "data", before=edit)
    assert ns["args"]["data_path"] == str(tmp_path / "data" / "train")
    built = sorted((tmp_path / "data" / "train" / "cat").glob("*.jpg"))
    assert len(built) == 3
    from PIL import Image

    with Image.open(built[0]) as image:
        assert image.size == (36, 36)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_data_cell_uses_a_small_image_folder_as_it_is(name, tmp_path, outside_smoke):
    folder = tmp_path / "input" / "afhq36" / "train" / "cat"
    folder.mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (36, 36)).save(folder / "a.jpg")

    def edit(cell_id, ns):
        if cell_id == "code":
            ns["DATA_SOURCE"] = str(tmp_path / "input")
            ns["args"]["data_path"] = str(tmp_path / "missing" / "train")

    ns = run_cells(name, "parameters", "code", "data", before=edit)
    assert ns["args"]["data_path"] == str(folder.parent)
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_wandb_cell_online_with_a_key_else_offline(name, outside_smoke, monkeypatch, capsys):
    ns = run_cells(name, "parameters", "wandb")  # no key and no platform secrets here
    assert ns["args"]["wandb"] == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    ns = run_cells(name, "parameters", "wandb")
    assert ns["args"]["wandb"] == "online"


def test_colab_drive_cell_falls_back_to_local_results(outside_smoke):
    ns = run_cells("run_in_colab.ipynb", "parameters")
    assert ns["USE_DRIVE"] and ns["args"]["save_folder"].startswith(ns["DRIVE_FOLDER"])
    ns = run_cells("run_in_colab.ipynb", "drive", namespace=ns)  # google.colab is not importable here
    assert ns["args"]["save_folder"] == "/content/results" and ns["USE_DRIVE"] is False


# ------------------------------------------------------------------------------------------- the install cell

FORBIDDEN_ON_PLATFORMS = {"diffusers", "ipykernel", "ipython", "ipywidgets", "jupyter-client", "jupyter-core",
                          "pytest-timeout", "huggingface-hub", "nbclient", "nbconvert", "nbformat", "torch",
                          "torchvision", "transformers", "widgetsnbextension"}


def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(path):
    from packaging.requirements import Requirement

    lines = [line.split("#")[0].strip() for line in open(path)]
    return {canonical(Requirement(line).name) for line in lines if line and not line.startswith("-")}


def colab_packages():
    """{name: version} from Colab's published `pip freeze` (None for packages installed from a URL)."""
    installed = {}
    for line in COLAB_FREEZE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if " @ " in line:
            installed[canonical(line.split(" @ ")[0])] = None
        else:
            name, _, version = line.partition("==")
            installed[canonical(name)] = version
    return installed


def package_cells(name):
    """The packages cell's functions, without running its installs (as outside smoke mode)."""
    ns = run_cells(name, "parameters")
    ns["SMOKE"] = True  # only the definitions: no pip, here
    return run_cells(name, "code", "packages", namespace=ns)


def test_student_requirements_hold_only_the_runtime():
    student = requirement_names(REPO / "requirements.txt")
    assert {"torch", "torchvision", "clean-fid", "wandb", "pytest", "matplotlib"} <= student
    assert not student & {"diffusers", "ipykernel", "pytest-timeout", "nbclient", "nbconvert", "nbformat",
                          "huggingface-hub"}
    dev = (REPO / "requirements-dev.txt").read_text().splitlines()
    assert dev[[line.startswith("-r") for line in dev].index(True)] == "-r requirements.txt"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_install_plan_lists_only_missing_packages_and_never_replaces_one(name, tmp_path, outside_smoke):
    ns = package_cells(name)
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(
        "# comment\n-r other.txt\ntorch==0.0.1  # the platform's CUDA build stays\ntorchvision==0.0.1\n"
        "numpy>=1.0\nnumpy<1.0\nsurely-not-installed-package>=1.0\nipykernel>=99\nIPython>=99\n"
    )
    to_install, notes = ns["install_plan"](str(requirements))
    assert to_install == ["surely-not-installed-package>=1.0"]  # numpy<1.0: installed at another version, kept
    assert any(note.startswith("numpy ") and "kept" in note for note in notes)
    assert any(note.startswith("torch ") and "kept" in note for note in notes)
    # a machine without torchvision gets the one that fits its torch; without torch, the pinned pair
    assert ns["install_plan"](str(requirements), {"torch": "2.11.0+cu128", "numpy": "2.1.3"})[0] == [
        "torchvision", "surely-not-installed-package>=1.0"]
    assert ns["install_plan"](str(requirements), {"numpy": "2.1.3"})[0][:2] == ["torch==0.0.1", "torchvision==0.0.1"]
    pins = ns["pinned"]({"ipykernel": "6.17.1", "odd": "not a version", "torch": "2.11.0+cu128"})
    assert pins == ["ipykernel==6.17.1", "torch==2.11.0+cu128"]


@pytest.mark.skipif(not COLAB_FREEZE.is_file(), reason="Colab's package list (../shared/platforms) not present")
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_install_cell_on_colab_installs_exactly_the_missing_student_packages(name, outside_smoke):
    """Against Colab GPU runtime's published pip freeze (Kaggle's image is built on Colab's base): the cell
    installs the student packages Colab lacks and nothing else, and pins everything Colab has."""
    colab = colab_packages()
    assert colab["torch"].startswith("2.") and colab["ipykernel"] == "6.17.1"  # the file is what it claims
    ns = package_cells(name)
    to_install, notes = ns["install_plan"](str(REPO / "requirements.txt"), colab)
    missing = requirement_names(REPO / "requirements.txt") - set(colab)
    installing = {canonical(re.split(r"[<>=!~ ;\[]", line)[0]) for line in to_install}
    assert installing == missing
    assert to_install == ["clean-fid==0.1.35"]
    assert not installing & FORBIDDEN_ON_PLATFORMS
    assert any(note.startswith("torch ") for note in notes)  # Colab's CUDA torch is kept, and the user told
    pins = ns["pinned"](colab)
    for held in ("ipykernel==6.17.1", "jupyter-client==7.4.9", "huggingface-hub==1.27.0", "torch==2.11.0+cu128",
                 "ipywidgets==7.7.1"):
        assert held in pins
    # what pip adds beside clean-fid: nothing, as Colab already has every dependency at a version it accepts
    from packaging.requirements import Requirement
    from packaging.version import Version

    for line in importlib.metadata.requires("clean-fid"):
        requirement = Requirement(line)
        have = colab.get(canonical(requirement.name))
        assert have is not None and requirement.specifier.contains(Version(have), prereleases=True), line


# --------------------------------------------------------------------------------------- getting the code in


@pytest.fixture
def isolated_imports():
    """The code cell imports the handout's modules and chdirs; put sys.modules, sys.path and the cwd back."""
    modules, path, cwd, bytecode = dict(sys.modules), list(sys.path), os.getcwd(), sys.dont_write_bytecode
    yield
    sys.modules.clear()
    sys.modules.update(modules)
    sys.path[:] = path
    os.chdir(cwd)
    sys.dont_write_bytecode = bytecode


def code_cell_source(name):
    return next(c.source for c in nbformat.read(REPO / name, as_version=4).cells if c.get("id") == "code")


def build_handout_zip(zip_path):
    spec = importlib.util.spec_from_file_location("make_handout", REPO / "tools" / "make_handout.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.build(str(zip_path.parent / "built"), str(zip_path))
    return zip_path


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_code_cell_unzips_an_uploaded_handout_zip(name, tmp_path, monkeypatch, isolated_imports, capsys):
    """handout.zip uploaded beside the notebook (Colab's /content, Kaggle's input): unzipped into CODE_DIR
    once; re-running keeps the student's edits; a changed upload is unzipped again, the old diffusion.py kept."""
    monkeypatch.delenv("DDPM_SMOKE", raising=False)
    upload = tmp_path / "upload"
    upload.mkdir()
    zip_path = build_handout_zip(upload / "handout.zip")
    code_dir = tmp_path / "persistent" / "code"

    def run():
        os.chdir(upload)  # the notebook's working directory: no code in it, the zip is there

        def edit(cell_id, ns):
            if cell_id == "code":
                ns["CODE_DIR"] = str(code_dir)
                ns["DRIVE_FOLDER"] = str(tmp_path / "no-drive")

        return run_cells(name, "parameters", "code", before=edit)

    ns = run()
    assert ns["code"] == str(code_dir) and os.getcwd() == str(code_dir)
    assert "NotImplementedError" in (code_dir / "diffusion.py").read_text()  # the handout's, stripped
    assert f"unpacked {zip_path} into {code_dir}" in capsys.readouterr().out

    (code_dir / "diffusion.py").write_text((code_dir / "diffusion.py").read_text() + "\nSTUDENT_EDIT = 1\n")
    ns = run()
    assert "already unpacked" in capsys.readouterr().out
    exec(compile(code_cell_source(name), "code", "exec"), ns)  # Run all again in the same kernel: cwd is the code now
    assert "already unpacked" in capsys.readouterr().out and ns["START_DIR"] == str(upload)
    assert "STUDENT_EDIT = 1" in (code_dir / "diffusion.py").read_text()

    # the student's code, as on disk now, is what the training cell runs: no restart needed after an edit
    utils = ns["reload_homework"]()
    diffusion = importlib.import_module("diffusion")  # as the trainer imports it
    assert Path(utils.__file__).parent == code_dir and Path(diffusion.__file__).parent == code_dir
    assert diffusion.STUDENT_EDIT == 1
    (code_dir / "diffusion.py").write_text((code_dir / "diffusion.py").read_text().replace("STUDENT_EDIT = 1",
                                                                                           "STUDENT_EDIT = 2"))
    # an installed package in a virtual environment inside the homework folder stays loaded (torch imported twice
    # in one process crashes the kernel)
    installed = types.ModuleType("installed_in_venv")
    installed.__file__ = str(code_dir / ".venv" / "lib" / "site-packages" / "installed_in_venv" / "__init__.py")
    installed.__path__ = [str(Path(installed.__file__).parent)]
    monkeypatch.setitem(sys.modules, "installed_in_venv", installed)
    ns["reload_homework"]()
    assert sys.modules.get("installed_in_venv") is installed
    assert importlib.import_module("diffusion").STUDENT_EDIT == 2
    for module_name, module in list(sys.modules.items()):  # none of the kit's modules left from elsewhere
        if module_name.split(".")[0] in ns["HOMEWORK_MODULES"] and getattr(module, "__file__", None):
            assert Path(module.__file__).is_relative_to(code_dir), (module_name, module.__file__)

    import zipfile

    with zipfile.ZipFile(zip_path, "a") as archive:  # a changed upload
        archive.writestr("handout/NOTES.txt", "second upload")
    run()
    assert "unpacked" in capsys.readouterr().out and (code_dir / "NOTES.txt").is_file()
    assert "STUDENT_EDIT = 2" in (code_dir / "diffusion.py.bak").read_text()
    assert "STUDENT_EDIT" not in (code_dir / "diffusion.py").read_text()


def test_code_cell_copies_a_read_only_folder_once(tmp_path, monkeypatch, isolated_imports):
    """Kaggle: the homework folder as a read-only dataset under /kaggle/input is copied to CODE_DIR, and only
    copied again when the input changes."""
    monkeypatch.delenv("DDPM_SMOKE", raising=False)
    source = tmp_path / "input" / "handout"
    source.mkdir(parents=True)
    for name in ("diffusion.py", "utils.py", "requirements.txt"):
        (source / name).write_text(f"# {name}\n")
    code_dir = tmp_path / "working" / "ddpm"
    notebook = nbformat.read(REPO / "run_in_kaggle.ipynb", as_version=4)
    code_cell = next(c.source for c in notebook.cells if c.get("id") == "code")
    code_cell = code_cell.replace('"/kaggle/input"', repr(str(tmp_path / "input")))
    monkeypatch.setattr(os, "access", lambda path, mode: not str(path).startswith(str(tmp_path / "input")))
    os.chdir(tmp_path)
    for _ in range(2):
        ns = {"os": os, "SMOKE": False, "REPO_URL": "", "CODE_DIR": str(code_dir)}
        exec(compile(code_cell, "code", "exec"), ns)
        assert ns["code"] == str(code_dir) and (code_dir / "utils.py").is_file()
        (code_dir / "diffusion.py").write_text("# edited on Kaggle\n")  # kept by the second run
    assert (code_dir / "diffusion.py").read_text() == "# edited on Kaggle\n"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_no_code_found_says_how_to_get_it_in(name, tmp_path, monkeypatch, isolated_imports):
    monkeypatch.delenv("DDPM_SMOKE", raising=False)
    os.chdir(tmp_path)

    def edit(cell_id, ns):
        if cell_id == "code":
            ns["CODE_DIR"], ns["DRIVE_FOLDER"] = str(tmp_path / "code"), str(tmp_path / "drive")

    with pytest.raises(FileNotFoundError, match="Upload handout.zip.*REPO_URL"):
        run_cells(name, "parameters", "code", before=edit)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_training_and_figure_cells_reload_the_students_code(name):
    cells = {c.get("id"): c.source for c in nbformat.read(REPO / name, as_version=4).cells}
    for cell_id, call in (("train", "utils.train_diffusion("), ("diffusion-figures", "utils.visualize_diffusion(")):
        source = cells[cell_id]
        assert "utils = reload_homework()" in source and source.index("reload_homework()") < source.index(call)


# ------------------------------------------------------------------------------------------- the platforms


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_gpu_the_installed_torch_cannot_run_gives_a_message_not_a_crash(name, outside_smoke, monkeypatch, capsys):
    import utils

    def unusable(device="auto"):
        raise utils.ConfigError("this GPU (Tesla P100, sm_60) is not supported by the installed torch")

    monkeypatch.setattr(utils, "select_device", unusable)
    ns = package_cells(name)
    out = capsys.readouterr().out
    assert "Cannot train on this machine's GPU: this GPU (Tesla P100, sm_60)" in out
    assert ns["args"]["device"] == "cpu"


def test_kaggle_t4_x2_trains_on_both_gpus_with_the_same_images_a_step(tmp_path, monkeypatch, isolated_imports, capsys):
    """The training cell on a machine with two GPUs: main.py under torchrun, one process per GPU, each taking one
    micro-batch of 32 (grad_accum 2 / 2) so that a step still takes the handout's 64 images. Run here with two CPU
    processes (gloo) in the notebook's smoke settings: the cells as they are, only the GPU count stands in."""
    monkeypatch.setenv("DDPM_SMOKE", "1")
    monkeypatch.setenv("DDPM_SMOKE_DIR", str(tmp_path))
    monkeypatch.delenv("DDPM_SMOKE_DATA", raising=False)
    monkeypatch.chdir(REPO)

    def two_gpus(cell_id, ns):
        if cell_id == "train":
            assert ns["GPU_COUNT"] == 1 and ns["ALL_GPUS"]  # this machine's count, replaced by Kaggle's
            ns["GPU_COUNT"] = 2

    ns = run_cells("run_in_kaggle.ipynb", "parameters", "code", "packages", "data", "train", before=two_gpus)
    out = capsys.readouterr().out
    assert "2 processes with grad_accum 1 each: 16 images a step, as in one process with grad_accum 2" in out
    assert "torch.distributed.run --standalone --nproc_per_node 2" in out and "--grad_accum 1" in out
    assert ns["summary"]["processes"] == 2 and ns["summary"]["grad_accum"] == 1
    results = tmp_path / "results"
    assert sorted(p.name for p in (results / "samples").glob("sample-*.png")) == ["sample-1.png", "sample-2.png"]
    state = __import__("torch").load(results / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2 and state["config"]["grad_accum"] == 1
    assert out.count("checkpoint: ") == 1, "only rank 0 reports"


def test_a_stop_reaches_the_training_processes_once(tmp_path, capsys):
    """The notebook's stop button interrupts the kernel: torchrun gets one SIGINT (it passes it on to the processes,
    which save), the training's last words are shown, and the cell stops."""
    import signal
    import threading

    import utils

    child, ready = tmp_path / "trainer.py", tmp_path / "ready"
    child.write_text(
        "import pathlib, signal, sys, time\n"
        "signals = []\n"
        "signal.signal(signal.SIGINT, lambda *_: signals.append(1))\n"
        "print('training', flush=True)\n"
        f"pathlib.Path({str(ready)!r}).touch()\n"
        "while not signals:\n"
        "    time.sleep(0.01)\n"
        "time.sleep(0.5)  # a second signal would come now\n"
        "print(f'saved after {len(signals)} stop signal(s)', flush=True)\n")

    def press_stop_once_training():
        deadline = time.monotonic() + 600  # a hang guard: the child normally starts in well under a second
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    stop = threading.Thread(target=press_stop_once_training)
    stop.start()
    with pytest.raises(KeyboardInterrupt):
        utils.run_passing_on_a_stop([sys.executable, str(child)])
    stop.join()
    assert capsys.readouterr().out == "training\nsaved after 1 stop signal(s)\n"


def test_images_a_step_are_split_among_processes_only_when_they_divide():
    import main
    import utils

    args = {"batch_size": 32, "grad_accum": 4, "save_folder": "/tmp/x", "load_path": None, "unet_dim_mults": (1, 2)}
    assert utils.split_grad_accum(args, 2)[0]["grad_accum"] == 2 and utils.split_grad_accum(args, 4)[0]["grad_accum"] == 1
    same, note = utils.split_grad_accum(args, 3)
    assert same is args and note == ("grad_accum 4 does not divide among 3 processes: each step takes 384 images "
                                     "instead of 128 (a grad_accum that is a multiple of 3 keeps them)")
    flags = utils.command_line({**args, "fid": False, "compile": True})
    parsed = vars(main.build_parser().parse_args(flags))
    assert utils.Config.from_args(**parsed) == utils.Config.from_args(**{**args, "fid": False, "compile": True})


def test_kaggle_recommends_t4_x2_not_p100():
    intro = nbformat.read(REPO / "run_in_kaggle.ipynb", as_version=4).cells[0].source
    assert "GPU T4 x2" in intro and "T4 or P100" not in intro and "Not the P100" in intro


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_images_on_local_disk_code_and_results_where_they_persist(name, outside_smoke):
    ns = run_cells(name, "parameters")
    data, results = ns["args"]["data_path"], ns["args"]["save_folder"]
    if name == "run_in_colab.ipynb":
        assert data.startswith("/content/") and not data.startswith("/content/drive")
        assert results.startswith(ns["DRIVE_FOLDER"])
    else:
        assert not data.startswith("/kaggle/working") and results.startswith("/kaggle/working/")
