#!/usr/bin/env python
"""Build the homework's small AFHQ copy (``train|val/{cat,dog,wild}/*.jpg`` at 36x36) from the official release.

AFHQ (Animal Faces-HQ) comes from StarGAN v2 (Choi et al., CVPR 2020, https://github.com/clovaai/stargan-v2)
and is licensed CC BY-NC 4.0. Its official ``afhq.zip`` (v1) holds ``afhq/{train,val}/{cat,dog,wild}/*.jpg``
at 512x512. This tool reads that zip directly (nothing is extracted to disk), or an already-extracted folder,
and writes size x size RGB JPEGs:

    python data/prepare_afhq.py --download             # fetch the official zip, then build data/train, data/val
    python data/prepare_afhq.py --source afhq.zip      # from a zip you downloaded yourself
    python data/prepare_afhq.py --source path/to/afhq  # from an extracted folder
    python data/prepare_afhq.py --verify               # count and check what was built (or --verify DIR)

Resizing: each image is center-cropped to a square (AFHQ is already square, so this is a no-op there) and
downscaled with PIL's LANCZOS filter in a single step. PIL's resampling filters widen their support by the
downscale factor, so a 512 -> 36 reduction averages every source pixel (no aliasing, unlike a plain
interpolation), and Lanczos keeps more detail at that tiny size than bicubic/bilinear for about the same cost,
with negligible ringing. ``reducing_gap`` is not used: it trades exactness for speed, and decoding the 512x512
JPEGs dominates the run time anyway. Outputs are RGB JPEGs at quality 95.

The run is idempotent: images already present in the output are skipped (``--overwrite`` rebuilds them), and
every file is written to a temporary name first, so an interrupted run never leaves a half-written image.
``--download`` first checks the output: when every requested split and class already holds AFHQ v1's image count
of readable images, it skips the download (and works offline), so the README's one-liner can be re-run.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import os
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

from PIL import Image
from tqdm import tqdm

# Official AFHQ v1 zip, as linked by StarGAN v2's download.sh (``bash download.sh afhq-dataset``);
# ``dl=1`` makes Dropbox serve the file itself rather than its preview page.
AFHQ_URL = "https://www.dropbox.com/s/t9l9o3vsx2jai3z/afhq.zip?dl=1"
# SHA-256 of that zip. StarGAN v2 publishes none; this value is the one other projects that download the same
# file check against (e.g. UVCGAN v2's scripts/download_dataset.sh). Override with --sha256, or --sha256 skip.
AFHQ_SHA256 = "7f63dcc14ef58c0e849b59091287e1844da97016073aac20403ae6c6132b950f"
STARGAN_V2_REPO = "https://github.com/clovaai/stargan-v2"

SPLITS = ("train", "val")
CLASSES = ("cat", "dog", "wild")
IMAGE_EXTS = (".jpg", ".jpeg", ".png")
# Image counts of AFHQ v1, used by --verify to flag incomplete builds.
EXPECTED_COUNTS = {
    "train": {"cat": 5153, "dog": 4739, "wild": 4738},
    "val": {"cat": 500, "dog": 500, "wild": 500},
}
JPEG_QUALITY = 95
DOWNLOAD_CHUNK = 1 << 16  # bytes per read; a dropped connection loses at most one unfinished chunk
DEFAULT_OUT = Path(__file__).resolve().parent  # the repository's data/ folder
MANUAL_HINT = (
    f"download afhq.zip manually (see the 'AFHQ' dataset section of {STARGAN_V2_REPO}, "
    f"link: {AFHQ_URL.replace('?dl=1', '')}) and pass it with --source path/to/afhq.zip"
)


class DataToolError(Exception):
    """A problem the user can fix; main() prints it as 'error: ...' and exits with status 2."""


# --------------------------------------------------------------------------------------------------- sources


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTS) and not name.rsplit("/", 1)[-1].startswith(".")


def _hidden(parts) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


class ZipSource:
    """An AFHQ zip, with or without a top-level folder (``afhq/train/cat/x.jpg`` or ``train/cat/x.jpg``)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.zf = zipfile.ZipFile(path)
        except zipfile.BadZipFile as e:
            raise DataToolError(
                f"--source {path} is not a valid zip file ({e}); it may be an incomplete download. "
                f"Re-download it, or {MANUAL_HINT}"
            ) from None
        # prefix -> {(split, cls): [member names]}
        found: dict[str, dict] = {}
        for name in self.zf.namelist():
            parts = name.split("/")
            if len(parts) < 3 or _hidden(parts) or not _is_image(name):
                continue
            split, cls = parts[-3], parts[-2]
            if split in SPLITS:
                prefix = "/".join(parts[:-3])
                found.setdefault(prefix, {}).setdefault((split, cls), []).append(name)
        if not found:
            raise DataToolError(
                f"zip {path} contains no images under afhq/{{train,val}}/<class>/ or {{train,val}}/<class>/; "
                f"is it the official AFHQ afhq.zip? If not, {MANUAL_HINT}"
            )
        if len(found) > 1:
            raise DataToolError(
                f"zip {path} has AFHQ-like folders under several roots ({', '.join(repr(p) for p in sorted(found))}); "
                f"extract it and pass the folder that holds train/ and val/ with --source"
            )
        (self.prefix, self.groups), = found.items()
        self.root_desc = f"{path}:{self.prefix + '/' if self.prefix else ''}"

    def has_split(self, split: str) -> bool:
        return any(s == split for s, _ in self.groups)

    def members(self, split: str, cls: str):
        """Sorted (output stem, opener) pairs for one split/class."""
        names = sorted(self.groups.get((split, cls), []))
        return [(Path(n).stem, (lambda n=n: io.BytesIO(self.zf.read(n)))) for n in names]

    def close(self):
        self.zf.close()


class FolderSource:
    """An extracted AFHQ folder: ``DIR/train/cat/*.jpg`` or ``DIR/afhq/train/cat/*.jpg``."""

    def __init__(self, path: Path):
        for root in (path, path / "afhq"):
            if any((root / s).is_dir() for s in SPLITS):
                self.root = root
                break
        else:
            raise DataToolError(
                f"folder {path} has neither train/ nor afhq/train/ inside; point --source at the extracted AFHQ "
                f"folder (the one holding train/ and val/), or at afhq.zip itself"
            )
        self.root_desc = str(self.root)

    def has_split(self, split: str) -> bool:
        return (self.root / split).is_dir()

    def members(self, split: str, cls: str):
        d = self.root / split / cls
        if not d.is_dir():
            return []
        files = sorted(p for p in d.iterdir() if p.is_file() and _is_image(p.name))
        return [(p.stem, (lambda p=p: open(p, "rb"))) for p in files]

    def close(self):
        pass


def open_source(path: Path):
    if not path.exists():
        raise DataToolError(f"--source {path} does not exist; pass the path of afhq.zip (or of its extracted "
                            f"folder), or use --download to fetch it")
    if path.is_dir():
        return FolderSource(path)
    return ZipSource(path)


# --------------------------------------------------------------------------------------------------- images


def resize_image(fp, size: int) -> Image.Image:
    """Center-crop to a square and downscale to size x size RGB (LANCZOS, see the module docstring)."""
    with Image.open(fp) as im:
        im = im.convert("RGB")
    w, h = im.size
    if w != h:
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        im = im.crop((left, top, left + s, top + s))
    if im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.LANCZOS)
    return im


def save_jpeg_atomic(im: Image.Image, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    try:
        im.save(tmp, format="JPEG", quality=JPEG_QUALITY)
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()


def build(source, out: Path, size: int, classes, splits, overwrite: bool = False) -> dict:
    """Write out/<split>/<class>/<stem>.jpg for every source image. Returns {(split, cls): (written, skipped)}."""
    for split in splits:
        if not source.has_split(split):
            others = [s for s in SPLITS if s != split and source.has_split(s)]
            hint = f"; pass --splits {' '.join(others)} to build only that" if others else ""
            raise DataToolError(f"source {source.root_desc} has no '{split}' split{hint}")
    plan = OrderedDict()
    for split in splits:
        for cls in classes:
            members = source.members(split, cls)
            if not members:
                raise DataToolError(
                    f"source {source.root_desc} has no images in {split}/{cls}/; expected the official AFHQ layout "
                    f"{{train,val}}/{{{','.join(CLASSES)}}}/*.jpg (an incomplete download or extraction?)"
                )
            plan[(split, cls)] = members
    stats = OrderedDict()
    for (split, cls), members in plan.items():
        dst_dir = out / split / cls
        dst_dir.mkdir(parents=True, exist_ok=True)
        written = skipped = 0
        for stem, opener in tqdm(members, desc=f"{split}/{cls}", unit="img", dynamic_ncols=True):
            dst = dst_dir / f"{stem}.jpg"
            if dst.exists() and not overwrite:
                skipped += 1
                continue
            with opener() as fp:
                try:
                    im = resize_image(fp, size)
                except (OSError, ValueError) as e:
                    raise DataToolError(f"cannot read {source.root_desc} {split}/{cls}/{stem}: {e}; the source "
                                        f"looks corrupt, re-download it") from None
            save_jpeg_atomic(im, dst)
            written += 1
        stats[(split, cls)] = (written, skipped)
    return stats


# --------------------------------------------------------------------------------------------------- download


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, desc="sha256", unit="B", unit_scale=True,
                                     unit_divisor=1024, dynamic_ncols=True) as bar:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
            bar.update(len(block))
    return h.hexdigest()


def _check_sha(path: Path, expected) -> str:
    digest = sha256_file(path)
    if expected and digest != expected.lower():
        raise DataToolError(
            f"sha256 mismatch for {path}: got {digest}, expected {expected}. The file is corrupt or not the "
            f"official AFHQ zip; delete it and re-run, or {MANUAL_HINT}"
        )
    if expected:
        print(f"sha256 OK ({digest})")
    else:
        print(f"sha256 of {path.name}: {digest}\n  (no checksum to check against; record this value and pass "
              f"--sha256 {digest} next time)")
    return digest


def download(url: str, dest: Path, sha256=None, timeout: float = 60.0) -> Path:
    """Stream url to dest via dest + '.part', resuming a previous partial download with an HTTP Range request.

    sha256: expected hex digest, or None to print the digest instead. Raises DataToolError on any failure.
    """
    import requests  # imported here so that building from --source works without it

    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        print(f"{dest} already downloaded; checking it")
        _check_sha(dest, sha256)
        return dest
    part = dest.with_name(dest.name + ".part")
    pos = part.stat().st_size if part.exists() else 0

    def fail(what):
        return DataToolError(
            f"download of {url} failed: {what}. Re-run the same command to retry (a partial download resumes), "
            f"or {MANUAL_HINT}"
        )

    headers = {"Range": f"bytes={pos}-"} if pos else {}
    try:
        r = requests.get(url, headers=headers, stream=True, timeout=timeout, allow_redirects=True)
    except requests.RequestException as e:
        raise fail(f"{type(e).__name__}: {e}") from None
    with r:
        if r.status_code == 416 and pos:
            # Nothing left to fetch: the .part already holds the whole file (its checksum decides below).
            total = r.headers.get("Content-Range", "").rpartition("/")[2]
            if total.isdigit() and int(total) != pos:
                part.unlink()
                raise fail(f"the server rejected resuming at byte {pos} of {total}; the partial file was removed")
            print(f"resuming {part.name}: already complete ({pos} bytes)")
        else:
            if r.status_code == 206:
                start = r.headers.get("Content-Range", "").split(" ")[-1].split("-")[0]
                if start != str(pos):
                    raise fail(f"the server answered the resume request with range {r.headers.get('Content-Range')}")
                mode = "ab"
                print(f"resuming {part.name} at {pos} bytes")
            elif r.status_code == 200:
                if pos:
                    print(f"server does not support resuming; restarting {part.name} from the start")
                pos, mode = 0, "wb"
            else:
                raise fail(f"HTTP {r.status_code} {r.reason}")
            if "text/html" in r.headers.get("Content-Type", ""):
                raise fail("the server sent a web page, not the zip (the link may have moved)")
            length = r.headers.get("Content-Length")
            total = pos + int(length) if length and length.isdigit() else None
            got = pos
            try:
                with open(part, mode) as f, tqdm(total=total, initial=pos, desc=dest.name, unit="B", unit_scale=True,
                                                 unit_divisor=1024, dynamic_ncols=True) as bar:
                    for block in r.iter_content(chunk_size=DOWNLOAD_CHUNK):
                        f.write(block)
                        got += len(block)
                        bar.update(len(block))
            except requests.RequestException as e:
                raise fail(f"connection lost after {got} bytes ({type(e).__name__})") from None
            if total is not None and got < total:
                raise fail(f"connection closed after {got} of {total} bytes")
    try:
        _check_sha(part, sha256)
    except DataToolError:
        part.unlink()
        raise
    if not zipfile.is_zipfile(part):
        part.unlink()
        raise fail("the downloaded file is not a zip archive")
    os.replace(part, dest)
    print(f"saved {dest}")
    return dest


# --------------------------------------------------------------------------------------------------- verify


def survey(root: Path, size: int, classes, splits, desc: str = "verify"):
    """Check every image under root/<split>/<class>/: [(name, count, expected count, [bad files]), ...]."""
    rows = []
    for split in splits:
        for cls in classes:
            d = root / split / cls
            files = sorted(p for p in d.iterdir() if p.is_file() and _is_image(p.name)) if d.is_dir() else []
            bad = []
            for p in tqdm(files, desc=f"{desc} {split}/{cls}", unit="img", dynamic_ncols=True, leave=False):
                try:
                    with Image.open(p) as im:
                        im.load()  # decode, to catch truncated files
                        if im.size != (size, size) or im.mode != "RGB":
                            bad.append(f"{p.name}: {im.mode} {im.size[0]}x{im.size[1]}")
                except OSError as e:
                    bad.append(f"{p.name}: unreadable ({e})")
            rows.append((f"{split}/{cls}", d, len(files), EXPECTED_COUNTS.get(split, {}).get(cls), bad))
    return rows


def verify(root: Path, size: int, classes, splits) -> bool:
    """Count images per split/class and check that each is an RGB size x size image. Returns True when all good."""
    if not root.is_dir():
        raise DataToolError(f"--verify: {root} is not a folder; build it first (see --help) or pass the folder "
                            f"that holds train/ and val/")
    ok = True
    lines = []
    for name, d, n, expected, bad in survey(root, size, classes, splits):
        note = ""
        if not n:
            note = "MISSING" if not d.is_dir() else "EMPTY"
            ok = False
        elif bad:
            note = f"{len(bad)} bad, e.g. {bad[0]}"
            ok = False
        elif expected is not None and n != expected:
            note = f"note: AFHQ v1 has {expected}"
        lines.append((name, n, note))
    print(f"{root} (expecting {size}x{size} RGB):")
    for name, n, note in lines:
        print(f"  {name:<12} {n:>6}  {note}")
    print("OK" if ok else f"FAILED: rebuild with python {Path(__file__).name} --source ... --out {root} --overwrite")
    return ok


def incomplete(root: Path, size: int, classes, splits):
    """None when root already holds the whole dataset (every requested split/class with at least AFHQ v1's image
    count, every image a readable size x size RGB image); otherwise what is missing, in words."""
    if not root.is_dir():
        return f"{root} does not exist yet"
    for name, d, n, expected, bad in survey(root, size, classes, splits, desc="checking"):
        if bad:
            return f"{root / name} has {len(bad)} bad image(s), e.g. {bad[0]}"
        if expected is None or n < expected:
            return f"{root / name} has {n} of {expected} images"
    return None


# --------------------------------------------------------------------------------------------------- CLI


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Build the homework's AFHQ copy (OUT/{train,val}/{cat,dog,wild}/*.jpg, SIZE x SIZE RGB JPEGs) "
                    "from the official StarGAN v2 afhq.zip (AFHQ, CC BY-NC 4.0).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--source", type=Path, default=None,
                     help="official afhq.zip, or a folder holding train/ and val/ (or afhq/train, afhq/val)")
    src.add_argument("--download", action="store_true",
                     help="download the official afhq.zip (over 1 GB) into --download_dir first")
    src.add_argument("--verify", nargs="?", type=Path, const=True, default=None, metavar="DIR",
                     help="only check a built dataset: count images per split/class and check their size "
                          "(DIR defaults to --out)")
    p.add_argument("--url", default=AFHQ_URL, help="URL of afhq.zip for --download")
    p.add_argument("--sha256", default="auto",
                   help="expected SHA-256 of the downloaded zip. 'auto': the known checksum of the official zip "
                        "when --url is the official one, otherwise print the digest; 'skip': do not check")
    p.add_argument("--download_dir", default="OUT/downloads", help="where --download puts afhq.zip")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output root; images go to OUT/<split>/<class>/")
    p.add_argument("--size", type=int, default=36, help="output side length in pixels")
    p.add_argument("--classes", nargs="+", default=list(CLASSES), metavar="CLASS", help="classes to build")
    p.add_argument("--splits", nargs="+", default=list(SPLITS), metavar="SPLIT", help="splits to build")
    p.add_argument("--overwrite", action="store_true", help="rebuild images that already exist in OUT")
    return p.parse_args(argv)


def run(args) -> int:
    for c in args.classes:
        if c not in CLASSES:
            raise DataToolError(f"unknown class '{c}' in --classes; AFHQ's classes are: {' '.join(CLASSES)}")
    for s in args.splits:
        if s not in SPLITS:
            raise DataToolError(f"unknown split '{s}' in --splits; AFHQ's splits are: {' '.join(SPLITS)}")
    if args.size < 1:
        raise DataToolError(f"--size {args.size} must be a positive number of pixels (the homework uses 36)")
    classes = list(dict.fromkeys(args.classes))
    splits = list(dict.fromkeys(args.splits))

    if args.verify is not None:
        root = args.out if args.verify is True else args.verify
        return 0 if verify(root, args.size, classes, splits) else 1

    if args.download and not args.overwrite:
        # Re-running the one-liner must not fetch 1 GB again (nor fail offline) when the data is already built.
        missing = incomplete(args.out, args.size, classes, splits)
        if missing is None:
            print(f"{args.out} already holds the complete data ({', '.join(splits)} of {', '.join(classes)}, "
                  f"{args.size}x{args.size}, every image checked): skipping the download. "
                  f"(--overwrite downloads and rebuilds it anyway)")
            if "train" in splits:
                print(f"done. Train with --data_path {args.out / 'train'}")
            return 0
        print(f"{missing}: downloading")

    if args.download:
        sha = args.sha256.strip().lower()
        if sha == "auto":
            sha = AFHQ_SHA256 if args.url == AFHQ_URL else None
        elif sha == "skip":
            sha = None
        elif len(sha) != 64 or any(ch not in "0123456789abcdef" for ch in sha):
            raise DataToolError(f"--sha256 {args.sha256!r} is not a SHA-256 hex digest (64 hex characters); "
                                f"pass the digest, 'auto' or 'skip'")
        if args.download_dir == "OUT/downloads":
            download_dir = args.out / "downloads"
        else:
            download_dir = Path(args.download_dir)
        dest = download_dir / "afhq.zip"
        source_path = download(args.url, dest, sha256=sha)
    elif args.source is not None:
        source_path = args.source
    else:
        raise DataToolError("nothing to build from: pass --source path/to/afhq.zip (or its extracted folder), "
                            "or --download to fetch the official zip")

    source = open_source(source_path)
    try:
        print(f"building {args.size}x{args.size} images from {source.root_desc} into {args.out}")
        stats = build(source, args.out, args.size, classes, splits, overwrite=args.overwrite)
    finally:
        source.close()
    for (split, cls), (written, skipped) in stats.items():
        print(f"  {split + '/' + cls:<10} {written:>6} written, {skipped:>6} already there")
    if "train" in splits:
        print(f"done. Train with --data_path {args.out / 'train'}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except DataToolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; re-run the same command to continue (finished images and a partial download are "
              "kept)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
