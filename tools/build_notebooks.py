#!/usr/bin/env python
"""Write run_in_colab.ipynb and run_in_kaggle.ipynb from one set of cell sources.

Both notebooks run the same steps (parameters, code and packages, data, wandb, training, figures 7.1-7.5);
only a few settings differ per platform (where the code, the data and the outputs live, how secrets are read).
Every cell is written once below, with `$name` slots (string.Template) that each platform fills in, so the two
notebooks cannot drift apart. The notebooks are written without outputs and with fixed cell ids, so a rebuild
of unchanged sources gives byte-identical files.

    python tools/build_notebooks.py           # rewrite both notebooks
    python tools/build_notebooks.py --check   # exit 1 if a committed notebook differs from these sources

tests/test_notebooks.py runs --check's comparison and executes both notebooks headless (DDPM_SMOKE=1).
"""
import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from string import Template

import nbformat

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Platform:
    name: str
    filename: str
    title: str
    how_to_run: str  # markdown: numbered steps
    resume_note: str  # markdown: how outputs survive a disconnect
    settings: str  # code: platform-only knobs at the top of the parameters cell
    save_folder: str  # code: expression for args["save_folder"]
    data_path: str  # code: expression for args["data_path"] (on the runtime's local disk)
    code_home: str  # code: expression for the folder that handout.zip is unzipped / REPO_URL cloned into
    zip_search: str  # code: list of folders searched for handout.zip
    code_search: str  # code: list of folders searched for the homework code
    data_search: str  # code: list of folders searched for the data
    secret_getter: str  # code: body of platform_secret(name)
    gpu_hint: str  # text printed when no GPU is visible
    extra_cells: tuple = ()  # (id, kind, source) inserted after the parameters cell
    metadata: tuple = ()  # (key, value) pairs of notebook metadata


COLAB = Platform(
    name="colab",
    filename="run_in_colab.ipynb",
    title="Google Colab",
    how_to_run="""\
1. **GPU**: *Runtime → Change runtime type → T4 GPU* (this notebook asks for one already).
2. **Your code**, one of:
   - **`handout.zip`** (the homework folder zipped, as you got it or with your `diffusion.py`): upload it with
     the *Files* pane (left bar) into `/content`, or put it in `DRIVE_FOLDER` on Google Drive. The code cell
     unzips it into `DRIVE_FOLDER/code` on Drive, where a recycled runtime does not lose it. Running again
     keeps that folder (and your edits in it) until you upload a changed zip; a `diffusion.py` it replaces is
     kept as `diffusion.py.bak`.
   - **a folder on Google Drive**: upload the homework folder into `DRIVE_FOLDER` with Drive's web page (the
     *Files* pane cannot upload folders); the code is used where it is.
   - **a git URL**: set `REPO_URL` to your own git copy; it is cloned once into `DRIVE_FOLDER/code`.

   Edit `diffusion.py` in place (double-click it in the *Files* pane): the training and figure cells
   re-import your code each time, so there is no need to restart the runtime.
3. **Data**: upload the course data zip (to `/content` or `DRIVE_FOLDER`, or set `DATA_SOURCE`); without one
   the data cell downloads AFHQ and builds the 36×36 copy with `data/prepare_afhq.py --download`. The images
   go to the runtime's own disk (`/content/data`), not to Drive.
4. **wandb (optional)**: add your API key as a Colab secret named `WANDB_API_KEY` (key icon in the left bar,
   turn on *Notebook access*). Without it, runs are logged offline (`wandb sync` uploads them later).
5. Edit the **parameters** cell, then *Runtime → Run all*.""",
    resume_note="""\
With `USE_DRIVE = True` your code and the outputs live in `DRIVE_FOLDER` on your Google Drive (`code/`,
`results/`), so they survive a recycled runtime; otherwise they live on the runtime's disk (`/content`) and are
lost when Colab recycles it. The images are rebuilt on the runtime's disk when needed.""",
    settings='''\
USE_DRIVE = True                               # keep code/ and results/ on Google Drive: a recycled runtime keeps them
DRIVE_FOLDER = "/content/drive/MyDrive/ddpm"   # your folder on Drive: handout.zip (or your homework folder) goes here
CODE_DIR = ""                                  # where handout.zip is unzipped / REPO_URL cloned; "" = DRIVE_FOLDER/code
REPO_URL = ""                                  # optional: git URL of your copy of the homework code
DATA_SOURCE = ""                               # optional: the course data zip or an AFHQ folder; "" = search''',
    save_folder='os.path.join(DRIVE_FOLDER, "results") if USE_DRIVE else "/content/results"',
    data_path='"/content/data/train"',
    code_home='os.path.join(DRIVE_FOLDER, "code") if USE_DRIVE and os.path.isdir(DRIVE_FOLDER) else "/content/ddpm"',
    zip_search='[START_DIR, "/content", DRIVE_FOLDER]',
    code_search='[CODE_DIR, DRIVE_FOLDER, "/content"]',
    data_search='[".", "/content", DRIVE_FOLDER]',
    secret_getter='''\
    from google.colab import userdata  # Colab secrets (key icon in the left bar)

    return userdata.get(name)''',
    gpu_hint="Runtime → Change runtime type → T4 GPU, then run all cells again",
    extra_cells=(
        ("drive", "code", '''\
# ===== Google Drive (optional): keeps results/ across disconnects =====
if USE_DRIVE and not SMOKE:
    try:
        from google.colab import drive

        drive.mount("/content/drive")
        os.makedirs(DRIVE_FOLDER, exist_ok=True)
        print("Google Drive mounted; results go to", args["save_folder"])
    except Exception as error:  # not on Colab, or access refused
        USE_DRIVE = False
        args["save_folder"] = "/content/results"
        print(f"Google Drive not mounted ({error}); code and results stay on this runtime's disk (/content)")
else:
    print("Google Drive not used")'''),
    ),
    metadata=(("accelerator", "GPU"), ("colab", {"gpuType": "T4", "provenance": []})),
)

KAGGLE = Platform(
    name="kaggle",
    filename="run_in_kaggle.ipynb",
    title="Kaggle",
    how_to_run="""\
1. **GPU and internet**: in the notebook's *Settings* (right panel) set *Accelerator* to **GPU T4 x2** and
   turn *Internet on* (needs a phone-verified account). Training runs on both T4s (one process per GPU, each
   taking half of the 64 images of a step; `ALL_GPUS = False` in the parameters cell trains on one).
   Not the P100: Kaggle's current torch build has no kernels for it (the packages cell says so if you got one). Internet is only needed to install missing
   packages, to clone `REPO_URL`, to download the data, and for online wandb.
2. **Your code**, one of:
   - **`handout.zip`**: *Add Input → Upload* it as a dataset (it appears under `/kaggle/input`, read-only;
     Kaggle may unzip it for you). The code cell copies it into `CODE_DIR` under `/kaggle/working`, and copies
     it again only when you upload a changed version (a `diffusion.py` it replaces is kept as
     `diffusion.py.bak`), so edits made in `CODE_DIR` are kept between runs.
   - **your homework folder**, uploaded the same way.
   - **a git URL**: set `REPO_URL` to your own git copy (internet on); it is cloned once into `CODE_DIR`.

   The training and figure cells re-import your code each time: after editing `diffusion.py`, run them again
   without restarting the kernel.
3. **Data**: *Add Input* the course data (zip or folder) as a dataset; the data cell finds it under
   `/kaggle/input` (set `DATA_SOURCE` to pick one). Without it the data cell downloads AFHQ (internet on).
   The images go to the runtime's disk (`/tmp/data`), not into the notebook's saved output.
4. **wandb (optional)**: *Add-ons → Secrets*, add `WANDB_API_KEY` and tick it for this notebook. Without it,
   runs are logged offline (`wandb sync` uploads them later).
5. Edit the **parameters** cell, then *Run All*.""",
    resume_note="""\
Your code (`/kaggle/working/ddpm`) and the outputs (`/kaggle/working/results`) last as long as the session; set
*Settings → Persistence → Files* to keep them across sessions, or *Save Version* to keep them as the notebook's
output. The images (`/tmp/data`) are neither kept nor saved with the notebook: the data cell rebuilds them.""",
    settings='''\
CODE_DIR = ""                      # where the code is copied (from /kaggle/input) or REPO_URL cloned; "" = /kaggle/working/ddpm
REPO_URL = ""                      # optional: git URL of your copy of the homework code (internet on)
DATA_SOURCE = ""                   # optional: the data zip or AFHQ folder under /kaggle/input; "" = search''',
    save_folder='"/kaggle/working/results"',
    data_path='"/tmp/data/train"',  # the runtime's disk: not in the notebook's saved output
    code_home='"/kaggle/working/ddpm"',
    zip_search='["/kaggle/input", "/kaggle/working", START_DIR]',
    code_search='["/kaggle/input", CODE_DIR, "/kaggle/working"]',  # the input first: CODE_DIR holds its copy
    data_search='["/kaggle/input", "."]',
    secret_getter='''\
    from kaggle_secrets import UserSecretsClient  # Add-ons -> Secrets

    return UserSecretsClient().get_secret(name)''',
    gpu_hint="Settings → Accelerator → GPU T4 x2, then run all cells again",
    metadata=(("kaggle", {"accelerator": "gpu", "isGpuEnabled": True, "isInternetEnabled": True,
                          "language": "python", "sourceType": "notebook", "dataSources": []}),),
)

PLATFORMS = {p.name: p for p in (COLAB, KAGGLE)}

# ------------------------------------------------------------------------------------------------ cells

INTRO = """\
# DDPM homework on $title: 32×32 AFHQ cat faces

This notebook trains the homework's small U-Net DDPM (your `diffusion.py` and `unet.py`) on 32×32 cat faces
from AFHQ and shows the figures the handout asks for:

| Handout | Figure | File in `save_folder` |
|---|---|---|
| 7.1 | training loss curve | `loss.png` |
| 7.2 | FID curve (needs `fid=True`) | `fid.png` |
| 7.3 | generated samples (latest grid) | `samples/sample-<step>.png` |
| 7.4 | forward diffusion | `forward_diffusion.png` |
| 7.5 | backward diffusion (sampling) | `backward_diffusion.png` |

### How to run
$how_to_run

### Disconnected?
Run all cells again: training resumes from `checkpoint.pt` in `save_folder` and continues up to
`train_steps` (set `fresh=True` to start over instead). $resume_note
"""

PARAMETERS = '''\
# ===== Parameters: the one cell to edit =====
import os

$settings

args = dict(
    # data and outputs
    data_path=$data_path,  # folder holding cat/ dog/ wild/ (the data cell fills it if missing)
    data_class="cat",
    save_folder=$save_folder,
    # training (handout table 2). Recommended per question:
    #   7.1 loss curve, 7.3 samples: train_steps=1000, save_and_sample_every=100, fid=False
    #   7.2 FID curve:               train_steps=10000, save_and_sample_every=1000, fid=True
    #   full run (best samples):     train_steps=10000, save_and_sample_every=1000
    train_steps=1000,  # total optimizer steps, resumed ones included
    save_and_sample_every=100,  # steps between checkpoints, sample grids (and FID evaluations)
    fid=False,  # True for question 7.2 (each evaluation samples fid_num_samples images)
    fid_num_samples=1000,
    time_steps=50,
    batch_size=32,
    grad_accum=2,
    learning_rate=1e-3,
    # model (handout table 3)
    unet_dim=16,
    unet_dim_mults=(1, 2, 4, 8),
    # this kit
    device="auto",  # cuda > mps > cpu
    wandb="auto",  # auto: online if a WANDB_API_KEY is found below, else offline; or "disabled"
    fresh=False,  # True: ignore the checkpoint in save_folder and start over
    seed=0,
)
ALL_GPUS = True  # several GPUs (Kaggle's T4 x2): train on each, one process per GPU, 64 images a step as on one

# Headless test mode (the test suite sets DDPM_SMOKE=1): a few CPU steps, no installs, no network, outputs in a
# temporary folder. Real images from the folder DDPM_SMOKE_DATA names (the tests': the course's 36x36 copy), else
# generated ones (the data cell makes them).
SMOKE = os.environ.get("DDPM_SMOKE") == "1"
if SMOKE:
    import tempfile

    smoke_dir = os.environ.get("DDPM_SMOKE_DIR") or tempfile.mkdtemp(prefix="ddpm-smoke-")
    smoke_data = os.environ.get("DDPM_SMOKE_DATA", "")
    args.update(  # two milestones, so that the curves have two points; 10 diffusion steps keep sampling quick
        train_steps=2, save_and_sample_every=1, batch_size=8, time_steps=10, fid=True, fid_extractor="tiny",
        fid_num_samples=8, sample_grid_size=4, log_every=1, dataloader_workers=2, device="cpu", wandb="disabled",
        save_folder=os.path.join(smoke_dir, "results"),
    )
    args["data_path"] = smoke_data if smoke_data and os.path.isdir(smoke_data) else os.path.join(smoke_dir, "data")
    print("smoke mode:", args)'''

CODE = '''\
# ===== Your homework code: handout.zip, a folder, or a git URL =====
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile

NOT_SEARCHED = {"drive", "sample_data", "results", "wandb", "__pycache__", "site-packages", "node_modules"}
LEAVES = {"train", "val"}  # image folders: listed, never entered
CODE_FILES = ("diffusion.py", "utils.py", "requirements.txt")
SOURCE_STAMP = ".homework_source"  # in CODE_DIR: the fingerprint of the upload it was unpacked from


def walk_dirs(roots, depth):
    \"\"\"Folders under roots, breadth-first, at most depth levels down (skipping hidden and bulky ones).\"\"\"
    for root in roots:
        level = [root] if root and os.path.isdir(root) else []
        for _ in range(depth + 1):
            yield from level
            below = []
            for folder in level:
                if os.path.basename(folder) in LEAVES:
                    continue
                try:
                    names = sorted(os.listdir(folder))
                except OSError:
                    continue
                below += [os.path.join(folder, n) for n in names
                          if not n.startswith(".") and n not in NOT_SEARCHED and os.path.isdir(os.path.join(folder, n))]
            level = below


def find_code(roots, depth=3):
    for folder in walk_dirs(roots, depth):
        if all(os.path.isfile(os.path.join(folder, f)) for f in CODE_FILES):
            return os.path.abspath(folder)
    return None


def code_zips(roots):
    \"\"\"Zips under roots (two levels down) that hold the homework code, newest first: handout.zip or any name.\"\"\"
    found = []
    for folder in walk_dirs(roots, depth=2):
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if name.lower().endswith(".zip") and os.path.isfile(path):
                try:
                    with zipfile.ZipFile(path) as archive:
                        names = {n.rsplit("/", 1)[-1] for n in archive.namelist()}
                except (OSError, zipfile.BadZipFile):
                    continue
                if all(f in names for f in CODE_FILES):
                    found.append(os.path.abspath(path))
    return sorted(set(found), key=os.path.getmtime, reverse=True)


def fingerprint(source):
    \"\"\"Changes when the upload changes: the zip's bytes, or the names, sizes and times of a folder's files.\"\"\"
    digest = hashlib.sha256()
    if os.path.isfile(source):
        with open(source, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    else:
        for folder, dirs, files in os.walk(source):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in NOT_SEARCHED | {"data"})
            for name in sorted(files):
                stat = os.stat(os.path.join(folder, name))
                digest.update(f"{os.path.relpath(os.path.join(folder, name), source)} {stat.st_size} {stat.st_mtime_ns}\\n".encode())
    return digest.hexdigest()


def install_code(source, dest):
    \"\"\"Unpack handout.zip (or copy a read-only folder) into dest, unless dest already holds this very upload:
    then dest is used as it is, with the edits made there since. A diffusion.py that a new upload replaces is
    kept as diffusion.py.bak.\"\"\"
    stamp = os.path.join(dest, SOURCE_STAMP)
    new = fingerprint(source)
    if find_code([dest], depth=0) and os.path.isfile(stamp) and json.load(open(stamp)).get("fingerprint") == new:
        print(f"{source}: already unpacked in {dest}; using that folder (your edits there are kept)")
        return dest
    with tempfile.TemporaryDirectory() as unpacked:
        if os.path.isfile(source):
            with zipfile.ZipFile(source) as archive:
                archive.extractall(unpacked)
            top = find_code([unpacked])
        else:
            top = source
        if top is None:
            raise FileNotFoundError(f"{source} holds no folder with {', '.join(CODE_FILES)}")
        mine = os.path.join(dest, "diffusion.py")
        if os.path.isfile(mine) and open(mine, "rb").read() != open(os.path.join(top, "diffusion.py"), "rb").read():
            shutil.copy2(mine, mine + ".bak")
            print(f"the upload replaces {mine}: the previous one is kept as {mine}.bak")
        shutil.copytree(top, dest, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("results", "wandb", "__pycache__", "*.pyc", "*.zip", SOURCE_STAMP))
    with open(stamp, "w") as f:
        json.dump({"source": source, "fingerprint": new}, f)
    print(f"unpacked {source} into {dest}")
    return dest


HOMEWORK_MODULES = {"diffusion", "unet", "utils", "trainer", "fid", "kit"}  # and their submodules


def reload_homework():
    \"\"\"Forget the homework's modules (diffusion, unet, utils, trainer, fid, kit.* and any other module whose file
    stands in the homework folder or its kit/ folder) and import utils again, so that the next call runs the code
    as it is on disk now: edits to diffusion.py take effect without restarting the runtime. Installed packages
    stay, even in a virtual environment inside the homework folder (importing torch twice crashes the kernel).\"\"\"
    homework_folders = {os.path.abspath(code), os.path.join(os.path.abspath(code), "kit")}
    for name, module in list(sys.modules.items()):
        files = [getattr(module, "__file__", None)]
        try:  # a package's folders (some extension modules have a __path__ that is not a list)
            files += list(getattr(module, "__path__", None) or [])
        except TypeError:
            pass
        if name.split(".")[0] in HOMEWORK_MODULES or any(
                isinstance(f, str) and os.path.dirname(os.path.abspath(f)) in homework_folders for f in files):
            del sys.modules[name]
    importlib.invalidate_caches()
    return importlib.import_module("utils")


sys.dont_write_bytecode = True  # no stale .pyc beside your code (on Drive, too)
START_DIR = globals().get("START_DIR") or os.getcwd()  # where the notebook started: this cell chdirs into the code
CODE_DIR = CODE_DIR or ($code_home)
zip_search, code_search = $zip_search, $code_search
code = find_code([START_DIR], depth=0)  # a Jupyter started in the homework folder uses it as it is
if code:
    print("homework code in the working directory:", code)
elif zips := ([] if SMOKE else code_zips(zip_search)):
    print("handout zip:", zips[0], "(newest of: " + ", ".join(zips) + ")" if len(zips) > 1 else "")
    code = install_code(zips[0], CODE_DIR)
elif folder := find_code(code_search):
    if os.access(folder, os.W_OK):
        print("homework folder:", folder)
        code = folder
    else:  # a read-only input: work on a copy
        print("homework folder (read-only):", folder)
        code = install_code(folder, CODE_DIR)
elif REPO_URL and not SMOKE:
    subprocess.run(["git", "clone", "--depth", "1", REPO_URL, CODE_DIR], check=True)
    code = CODE_DIR
    print("cloned", REPO_URL, "into", code)
if code is None:
    raise FileNotFoundError(
        "The homework code (a folder with diffusion.py, utils.py, requirements.txt) was not found. Upload handout.zip "
        f"to one of {zip_search}, put the folder in one of {code_search}, or set REPO_URL in the parameters cell.")
os.chdir(code)
if code not in sys.path:
    sys.path.insert(0, code)
print("homework code:", code)'''

PACKAGES = '''\
# ===== Packages: install what requirements.txt lists and this machine lacks; change nothing already installed =====
# Jupyter's own packages are never installed: a newer ipykernel or jupyter-client can break the platform's kernel.
NEVER_INSTALL = {"ipykernel", "ipython", "ipywidgets", "widgetsnbextension", "jupyterlab-widgets", "jupyter-client",
                 "jupyter-core", "jupyter-server", "notebook", "jupyterlab", "nbformat", "nbclient", "nbconvert",
                 "traitlets", "tornado", "pyzmq", "comm", "debugpy"}


def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_packages():
    \"\"\"{name: version} of every installed distribution.\"\"\"
    found = {}
    for dist in importlib.metadata.distributions():
        if dist.metadata["Name"]:
            found.setdefault(canonical(dist.metadata["Name"]), dist.version)
    return found


def install_plan(path="requirements.txt", installed=None):
    \"\"\"(to_install, notes): the requirements.txt lines of packages that are not installed at all, and a note for
    each package installed at a version the line does not ask for, which is kept as it is (the platform's CUDA
    torch above all). A missing torchvision is asked for without a version: pip picks the one that fits the
    installed torch.\"\"\"
    from packaging.requirements import Requirement

    installed = installed_packages() if installed is None else installed
    to_install, notes = [], []
    for line in open(path):
        line = line.split("#")[0].strip()
        if not line or line.startswith("-"):
            continue
        requirement = Requirement(line)
        name = canonical(requirement.name)
        if name in NEVER_INSTALL:
            continue
        if name not in installed:
            to_install.append("torchvision" if name == "torchvision" and "torch" in installed else line)
        elif installed[name] and not requirement.specifier.contains(installed[name], prereleases=True):
            notes.append(f"{requirement.name} {installed[name]} kept (requirements.txt asks for {requirement.specifier})")
    return to_install, notes


def pinned(installed=None):
    \"\"\"Constraints that hold every installed package at its version, so pip adds packages and changes none.\"\"\"
    from packaging.version import InvalidVersion, Version

    lines = []
    for name, version in sorted((installed_packages() if installed is None else installed).items()):
        try:
            Version(version or "")
        except InvalidVersion:
            continue
        lines.append(f"{name}=={version}")
    return lines


if SMOKE:
    print("smoke mode: no installs")
else:
    to_install, notes = install_plan()
    for note in notes:
        print(note)
    if to_install:
        print("installing:", " ".join(to_install))
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as constraints:
            constraints.write("\\n".join(pinned()) + "\\n")
        result = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-c", constraints.name, *to_install])
        if result.returncode:
            raise RuntimeError(f"pip could not install {' '.join(to_install)} without changing a package this "
                               "platform already has (see pip's message above)")
    else:
        print("all requirements already installed")

import torch

import utils

print(f"torch {torch.__version__}; utils from {utils.__file__}")
try:  # also refuses a GPU that this torch build has no kernels for (e.g. Kaggle's P100), with the reason
    device = utils.select_device(args["device"])
except utils.ConfigError as error:
    print(f"Cannot train on this machine's GPU: {error}\\n$gpu_hint. Until then training runs on the CPU "
          "(very slow).")
    args["device"], device = "cpu", torch.device("cpu")
GPU_COUNT = torch.cuda.device_count() if device.type == "cuda" else 1
if device.type == "cuda":
    print("GPU:", ", ".join(torch.cuda.get_device_name(i) for i in range(GPU_COUNT)))
    if GPU_COUNT > 1:
        print(f"training runs on all {GPU_COUNT} GPUs" if ALL_GPUS else "training runs on the first GPU (ALL_GPUS)")
elif not SMOKE:
    print("No GPU in use: training will be very slow. $gpu_hint.")'''

DATA = '''\
# ===== Data: AFHQ 36x36 images in <data_path>/<class>/ =====
import glob
import zipfile

from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
classes = ["cat", "dog", "wild"] if args["data_class"] == "all" else [args["data_class"]]


def images(folder):
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS)) if os.path.isdir(folder) else []


def ready(train):
    return all(images(os.path.join(train, c)) for c in classes)


def small_images(train):  # the course's 36x36 copy can be used as it is; full-size AFHQ is rebuilt
    folder = os.path.join(train, classes[0])
    with Image.open(os.path.join(folder, images(folder)[0])) as image:
        return max(image.size) <= 64


def afhq_zip(path):
    try:
        with zipfile.ZipFile(path) as archive:
            return any(f"train/{classes[0]}/" in name for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


if SMOKE:
    if not ready(args["data_path"]):  # no course images: the kit's generated ones (what main.py --smoke trains on)
        from kit.data import make_smoke_data

        make_smoke_data(args["data_path"])
    print("smoke mode: data from", args["data_path"])
elif ready(args["data_path"]):
    print("data:", args["data_path"])
else:
    roots = [DATA_SOURCE] if DATA_SOURCE else $data_search
    source = DATA_SOURCE if DATA_SOURCE and os.path.isfile(DATA_SOURCE) else None
    folders = [] if source else [d for d in walk_dirs(roots, depth=4) if os.path.basename(d) == "train" and ready(d)]
    if folders and small_images(folders[0]):
        args["data_path"] = folders[0]
    elif folders:
        source = os.path.dirname(folders[0])
    elif not source:
        zips = [z for d in walk_dirs(roots, depth=2) for z in sorted(glob.glob(os.path.join(d, "*.zip"))) if afhq_zip(z)]
        source = zips[0] if zips else None
    if not ready(args["data_path"]):  # build it with the data tool (reads the zip in place; resumes if interrupted)
        train = os.path.normpath(args["data_path"])
        out = os.path.dirname(train) if os.path.basename(train) == "train" else "data"
        command = [sys.executable, "data/prepare_afhq.py", "--out", out, "--splits", "train", "--classes", *classes]
        command += ["--source", source] if source else ["--download"]
        print("running:", " ".join(command))
        subprocess.run(command, check=True)
        args["data_path"] = os.path.join(out, "train")
    print("data:", args["data_path"])'''

WANDB = '''\
# ===== Weights & Biases (optional): online with a WANDB_API_KEY, else offline =====
def platform_secret(name):
$secret_getter


if SMOKE:
    print("smoke mode: wandb", args["wandb"])
elif args["wandb"] == "auto":
    key = os.environ.get("WANDB_API_KEY")
    if not key:
        try:
            key = platform_secret("WANDB_API_KEY")
        except Exception as error:  # no such secret, access not granted, or not on this platform
            print(f"no WANDB_API_KEY secret ({type(error).__name__}: {error})")
    if key:
        os.environ["WANDB_API_KEY"] = key.strip()
    args["wandb"] = "online" if key else "offline"
    print("wandb:", args["wandb"], "" if key else "(logs stay in ./wandb; upload them later with `wandb sync`)")
else:
    print("wandb:", args["wandb"])'''

TRAIN_NOTE = """\
## Train
Re-run the next cell after a disconnect (after the cells above): it resumes from `checkpoint.pt`. Samples,
the loss curve (and the FID curve with `fid=True`) are saved every `save_and_sample_every` steps."""

TRAIN = '''\
utils = reload_homework()  # your diffusion.py as it is on disk now: no runtime restart needed after an edit
print("options:", args)
if ALL_GPUS and GPU_COUNT > 1:  # main.py under torchrun, one process per GPU; the stop button saves as usual
    summary = utils.train_with_torchrun(GPU_COUNT, **args)
else:
    summary = utils.train_diffusion(**args)
summary'''

CURVES = '''\
# ===== Figures 7.1-7.3: loss curve, FID curve, latest samples =====
import re

from IPython.display import Image as ShowImage, Markdown, display


def show(path, title):
    if path and os.path.isfile(path):
        display(Markdown(f"**{title}**: `{path}`"))
        display(ShowImage(filename=path))
    else:
        print(f"{title}: no figure yet ({path})")


def latest_sample(folder):
    grids = glob.glob(os.path.join(folder, "samples", "sample-*.png"))
    return max(grids, key=lambda p: int(re.findall(r"\\d+", os.path.basename(p))[-1]), default=None)


show(os.path.join(args["save_folder"], "loss.png"), "7.1 training loss")
if args["fid"]:
    show(os.path.join(args["save_folder"], "fid.png"), "7.2 FID")
else:
    print("7.2 FID: set fid=True in the parameters cell and train again (it resumes) to draw the FID curve")
show(latest_sample(args["save_folder"]), "7.3 samples (latest)")'''

DIFFUSION_FIGURES = '''\
# ===== Figures 7.4 and 7.5: forward and backward diffusion of the trained model =====
utils = reload_homework()  # your diffusion.py as it is on disk now
figures = utils.visualize_diffusion(**{**args, "load_path": os.path.join(args["save_folder"], "checkpoint.pt")})
show(figures["forward_diffusion"], "7.4 forward diffusion")
show(figures["backward_diffusion"], "7.5 backward diffusion")'''

OUTRO = """\
## Keeping your results
Everything is in `save_folder`: `checkpoint.pt` (to resume or to visualize later with `load_path`),
`metrics.csv`, `loss.png`, `fid.png`, `samples/`, `forward_diffusion.png`, `backward_diffusion.png`.
$resume_note"""

CELLS = (
    ("intro", "markdown", INTRO),
    ("parameters", "code", PARAMETERS),
    ("extra", None, None),  # the platform's extra_cells go here
    ("code", "code", CODE),
    ("packages", "code", PACKAGES),
    ("data", "code", DATA),
    ("wandb", "code", WANDB),
    ("train-note", "markdown", TRAIN_NOTE),
    ("train", "code", TRAIN),
    ("curves", "code", CURVES),
    ("diffusion-figures", "code", DIFFUSION_FIGURES),
    ("outro", "markdown", OUTRO),
)


def new_cell(cell_id, kind, source):
    cell = nbformat.v4.new_markdown_cell(source) if kind == "markdown" else nbformat.v4.new_code_cell(source)
    cell.id = cell_id  # fixed ids: rebuilding unchanged sources gives the same file
    return cell


def build(platform):
    """The notebook of one platform, as an nbformat NotebookNode without outputs."""
    slots = {name: getattr(platform, name) for name in platform.__dataclass_fields__}
    cells = []
    for cell_id, kind, template in CELLS:
        if kind is None:
            cells += [new_cell(*extra) for extra in platform.extra_cells]
        else:
            cells.append(new_cell(cell_id, kind, Template(template).substitute(slots).strip()))
    notebook = nbformat.v4.new_notebook(cells=cells)
    notebook.metadata.update({
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
        **dict(platform.metadata),
    })
    nbformat.validate(notebook)
    return notebook


def render(platform):
    return nbformat.writes(build(platform)) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report notebooks that differ from the sources")
    check = parser.parse_args(argv).check
    stale = []
    for platform in PLATFORMS.values():
        path = REPO / platform.filename
        text = render(platform)
        if path.exists() and path.read_text() == text:
            continue
        stale.append(platform.filename)
        if not check:
            path.write_text(text)
    verb = "out of date (run python tools/build_notebooks.py)" if check else "written"
    print(f"{', '.join(stale)}: {verb}" if stale else "notebooks up to date")
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
