"""Tests of data/prepare_afhq.py: offline, on a tiny fake AFHQ built in tmp_path (downloads use a local server)."""
import hashlib
import http.server
import importlib.util
import os
import re
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "data" / "prepare_afhq.py"
SHARED_AFHQ36 = REPO.parent / "shared" / "afhq36"

_spec = importlib.util.spec_from_file_location("prepare_afhq", TOOL)
prep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prep)

CLASSES = ("cat", "dog", "wild")
COUNTS = {"train": 3, "val": 2}  # fake images per class


def _jpeg_bytes(rng, size=(64, 64)):
    import io
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def make_fake_afhq_zip(path, prefix="afhq/", seed=0):
    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(path, "w") as zf:
        for split, n in COUNTS.items():
            for cls in CLASSES:
                for i in range(n):
                    zf.writestr(f"{prefix}{split}/{cls}/flickr_{cls}_{i:06d}.jpg", _jpeg_bytes(rng))
    return path


@pytest.fixture(scope="module")
def fake_zip(tmp_path_factory):
    return make_fake_afhq_zip(tmp_path_factory.mktemp("src") / "afhq.zip")


def run_tool(*argv):
    return prep.main([str(a) for a in argv])


def check_layout(out, size=36, splits=("train", "val"), classes=CLASSES):
    for split in splits:
        for cls in classes:
            files = sorted((out / split / cls).glob("*.jpg"))
            assert len(files) == COUNTS[split], (split, cls)
            assert files[0].name == f"flickr_{cls}_000000.jpg"
            for f in files:
                with Image.open(f) as im:
                    assert im.format == "JPEG" and im.mode == "RGB" and im.size == (size, size)
    # nothing left behind from the atomic writes
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]


# ------------------------------------------------------------------------------------------------ building


def test_build_from_zip(fake_zip, tmp_path, capsys):
    out = tmp_path / "data"
    assert run_tool("--source", fake_zip, "--out", out) == 0
    check_layout(out)
    assert "--data_path" in capsys.readouterr().out


def test_build_from_zip_without_top_folder(tmp_path):
    src = make_fake_afhq_zip(tmp_path / "flat.zip", prefix="")
    out = tmp_path / "data"
    assert run_tool("--source", src, "--out", out, "--size", 32) == 0
    check_layout(out, size=32)


@pytest.mark.parametrize("point_at", ["afhq", "parent"])
def test_build_from_folder(fake_zip, tmp_path, point_at):
    with zipfile.ZipFile(fake_zip) as zf:
        zf.extractall(tmp_path / "extracted")
    src = tmp_path / "extracted" / "afhq" if point_at == "afhq" else tmp_path / "extracted"
    out = tmp_path / "data"
    assert run_tool("--source", src, "--out", out) == 0
    check_layout(out)


def test_subset_of_classes_and_splits(fake_zip, tmp_path):
    out = tmp_path / "data"
    assert run_tool("--source", fake_zip, "--out", out, "--classes", "cat", "--splits", "train") == 0
    check_layout(out, splits=("train",), classes=("cat",))
    assert sorted(p.name for p in out.iterdir()) == ["train"]
    assert sorted(p.name for p in (out / "train").iterdir()) == ["cat"]


def test_resize_center_crops_non_square():
    im = Image.new("RGB", (100, 60), (255, 0, 0))
    im.paste((0, 0, 255), (0, 0, 20, 60))  # a blue band on the left, cropped away
    im.paste((0, 0, 255), (80, 0, 100, 60))  # and on the right
    out = prep.resize_image(_to_bytesio(im), 36)
    assert out.size == (36, 36) and out.mode == "RGB"
    assert np.asarray(out)[..., 2].max() < 40  # no blue left


def _to_bytesio(im):
    import io
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    buf.seek(0)
    return buf


def test_grayscale_source_becomes_rgb(tmp_path):
    src = tmp_path / "afhq" / "train" / "cat"
    src.mkdir(parents=True)
    Image.new("L", (64, 64), 128).save(src / "gray.jpg")
    out = tmp_path / "data"
    assert run_tool("--source", tmp_path / "afhq", "--out", out, "--classes", "cat", "--splits", "train") == 0
    with Image.open(out / "train" / "cat" / "gray.jpg") as im:
        assert im.mode == "RGB" and im.size == (36, 36)


def test_idempotent_and_overwrite(fake_zip, tmp_path, capsys):
    out = tmp_path / "data"
    assert run_tool("--source", fake_zip, "--out", out) == 0
    target = out / "train" / "cat" / "flickr_cat_000000.jpg"
    os.utime(target, (1_000_000, 1_000_000))
    (out / "val" / "dog" / "flickr_dog_000001.jpg").unlink()
    capsys.readouterr()

    assert run_tool("--source", fake_zip, "--out", out) == 0
    log = capsys.readouterr().out
    assert re.search(r"train/cat +0 written, +3 already there", log)
    assert re.search(r"val/dog +1 written, +1 already there", log)
    assert target.stat().st_mtime == 1_000_000  # untouched
    check_layout(out)

    assert run_tool("--source", fake_zip, "--out", out, "--overwrite") == 0
    assert target.stat().st_mtime != 1_000_000
    assert re.search(r"train/cat +3 written, +0 already there", capsys.readouterr().out)


# ------------------------------------------------------------------------------------------------ errors


def _error(capsys, *argv):
    assert run_tool(*argv) == 2
    err = capsys.readouterr().err  # progress bars go to stderr too; the message is the last line
    assert "error: " in err
    err = err[err.rindex("error: "):]
    assert err.count("\n") == 1
    return err


def test_error_missing_source(tmp_path, capsys):
    err = _error(capsys, "--source", tmp_path / "nope.zip", "--out", tmp_path / "o")
    assert "nope.zip does not exist" in err and "--download" in err


def test_error_no_source_given(tmp_path, capsys):
    err = _error(capsys, "--out", tmp_path / "o")
    assert "--source" in err and "--download" in err


def test_error_zip_without_afhq_folders(tmp_path, capsys):
    bad = tmp_path / "other.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("images/cat/1.jpg", b"x")
        zf.writestr("readme.txt", b"hi")
    err = _error(capsys, "--source", bad, "--out", tmp_path / "o")
    assert "other.zip contains no images under afhq/{train,val}/<class>/" in err
    assert "StarGAN" in err or "stargan-v2" in err
    assert "--source" in err


def test_error_not_a_zip(tmp_path, capsys):
    bad = tmp_path / "afhq.zip"
    bad.write_bytes(b"<html>not a zip</html>")
    err = _error(capsys, "--source", bad, "--out", tmp_path / "o")
    assert "is not a valid zip file" in err and "stargan-v2" in err


def test_error_folder_without_splits(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    err = _error(capsys, "--source", tmp_path / "empty", "--out", tmp_path / "o")
    assert "neither train/ nor afhq/train/" in err


def test_error_unknown_class(fake_zip, tmp_path, capsys):
    err = _error(capsys, "--source", fake_zip, "--out", tmp_path / "o", "--classes", "cat", "horse")
    assert "unknown class 'horse' in --classes" in err and "cat dog wild" in err
    assert not (tmp_path / "o").exists()


def test_error_unknown_split(fake_zip, tmp_path, capsys):
    err = _error(capsys, "--source", fake_zip, "--out", tmp_path / "o", "--splits", "test")
    assert "unknown split 'test'" in err and "train val" in err


def test_error_missing_split_and_class_in_source(tmp_path, capsys):
    src = tmp_path / "afhq"
    (src / "train" / "cat").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(src / "train" / "cat" / "a.jpg")
    err = _error(capsys, "--source", src, "--out", tmp_path / "o")
    assert "has no 'val' split" in err and "--splits train" in err
    err = _error(capsys, "--source", src, "--out", tmp_path / "o", "--splits", "train")
    assert "no images in train/dog/" in err


def test_error_bad_size(fake_zip, tmp_path, capsys):
    err = _error(capsys, "--source", fake_zip, "--out", tmp_path / "o", "--size", "0")
    assert "--size 0" in err


def test_error_corrupt_image(tmp_path, capsys):
    src = tmp_path / "afhq" / "train" / "cat"
    src.mkdir(parents=True)
    (src / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    err = _error(capsys, "--source", tmp_path / "afhq", "--out", tmp_path / "o", "--classes", "cat",
                 "--splits", "train")
    assert "broken" in err and "re-download" in err
    assert not list((tmp_path / "o").rglob("*.jpg"))


# ------------------------------------------------------------------------------------------------ download


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves server.payload at any path, honouring 'Range: bytes=N-' unless server.ranges is False."""

    def do_GET(self):
        srv = self.server
        data = srv.payload
        rng = self.headers.get("Range")
        srv.log.append(rng)
        if srv.status is not None:
            self.send_error(srv.status)
            return
        start = 0
        if rng and srv.ranges:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Type", "application/zip")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.cut_after is not None:  # simulate a dropped connection
            body = body[: srv.cut_after]
            srv.cut_after = None
            self.close_connection = True
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(fake_zip):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.payload = fake_zip.read_bytes()
    httpd.sha256 = hashlib.sha256(httpd.payload).hexdigest()
    httpd.ranges, httpd.status, httpd.cut_after, httpd.log = True, None, None, []
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/afhq.zip"
    t = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_download_and_build(server, tmp_path, capsys):
    out = tmp_path / "data"
    assert run_tool("--download", "--url", server.url, "--sha256", server.sha256, "--out", out) == 0
    zip_path = out / "downloads" / "afhq.zip"
    assert zip_path.read_bytes() == server.payload
    assert not (out / "downloads" / "afhq.zip.part").exists()
    check_layout(out)
    assert "sha256 OK" in capsys.readouterr().out

    # second run: the zip is reused (checked, not fetched again) and images are skipped
    n = len(server.log)
    assert run_tool("--download", "--url", server.url, "--sha256", server.sha256, "--out", out) == 0
    assert len(server.log) == n
    assert "already downloaded" in capsys.readouterr().out


def test_download_without_checksum_prints_it(server, tmp_path, capsys):
    dl = tmp_path / "dl"
    assert run_tool("--download", "--url", server.url, "--download_dir", dl, "--out", tmp_path / "data") == 0
    out = capsys.readouterr().out
    assert f"--sha256 {server.sha256}" in out
    assert (dl / "afhq.zip").exists()


def test_download_resumes_partial_file(server, tmp_path, capsys):
    dl = tmp_path / "dl"
    dl.mkdir()
    half = len(server.payload) // 2
    (dl / "afhq.zip.part").write_bytes(server.payload[:half])
    assert run_tool("--download", "--url", server.url, "--sha256", server.sha256, "--download_dir", dl,
                    "--out", tmp_path / "data") == 0
    assert server.log == [f"bytes={half}-"]
    assert (dl / "afhq.zip").read_bytes() == server.payload
    assert f"resuming afhq.zip.part at {half} bytes" in capsys.readouterr().out


def test_download_resume_when_part_already_complete(server, tmp_path):
    dl = tmp_path / "dl"
    dl.mkdir()
    (dl / "afhq.zip.part").write_bytes(server.payload)
    assert run_tool("--download", "--url", server.url, "--sha256", server.sha256, "--download_dir", dl,
                    "--out", tmp_path / "data") == 0
    assert (dl / "afhq.zip").read_bytes() == server.payload


def test_download_interrupted_then_resumed(server, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(prep, "DOWNLOAD_CHUNK", 100)  # so that the bytes before the cut reach the file
    dl = tmp_path / "dl"
    args = ("--download", "--url", server.url, "--sha256", server.sha256, "--download_dir", dl,
            "--out", tmp_path / "data")
    server.cut_after = 1000
    err = _error(capsys, *args)
    assert "failed" in err and "Re-run the same command" in err and "--source" in err
    assert (dl / "afhq.zip.part").stat().st_size == 1000
    assert run_tool(*args) == 0
    assert server.log == [None, "bytes=1000-"]
    assert (dl / "afhq.zip").read_bytes() == server.payload


def test_download_server_without_range_support_restarts(server, tmp_path):
    server.ranges = False
    dl = tmp_path / "dl"
    dl.mkdir()
    (dl / "afhq.zip.part").write_bytes(b"garbage that must not be kept")
    assert run_tool("--download", "--url", server.url, "--sha256", server.sha256, "--download_dir", dl,
                    "--out", tmp_path / "data") == 0
    assert (dl / "afhq.zip").read_bytes() == server.payload


def test_download_checksum_mismatch(server, tmp_path, capsys):
    dl = tmp_path / "dl"
    err = _error(capsys, "--download", "--url", server.url, "--sha256", "0" * 64, "--download_dir", dl,
                 "--out", tmp_path / "data")
    assert "sha256 mismatch" in err and server.sha256 in err and "0" * 64 in err
    assert "stargan-v2" in err and "--source" in err
    assert not (dl / "afhq.zip").exists() and not (dl / "afhq.zip.part").exists()
    assert not (tmp_path / "data" / "train").exists()


def test_download_bad_sha256_argument(server, tmp_path, capsys):
    err = _error(capsys, "--download", "--url", server.url, "--sha256", "abc", "--out", tmp_path / "data")
    assert "--sha256 'abc' is not a SHA-256" in err
    assert server.log == []


def test_download_http_error(server, tmp_path, capsys):
    server.status = 404
    err = _error(capsys, "--download", "--url", server.url, "--out", tmp_path / "data")
    assert "HTTP 404" in err and "download afhq.zip manually" in err and "stargan-v2" in err
    assert "--source path/to/afhq.zip" in err


def test_download_unreachable(tmp_path, capsys):
    import socket
    with socket.socket() as s:  # a free port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    err = _error(capsys, "--download", "--url", f"http://127.0.0.1:{port}/afhq.zip", "--out", tmp_path / "data")
    assert "download of http://127.0.0.1" in err and "ConnectionError" in err
    assert "download afhq.zip manually" in err and "--source" in err


def test_official_download_defaults():
    assert prep.AFHQ_URL.startswith("https://www.dropbox.com/") and prep.AFHQ_URL.endswith("afhq.zip?dl=1")
    assert len(prep.AFHQ_SHA256) == 64
    args = prep.parse_args(["--download"])
    assert args.url == prep.AFHQ_URL and args.sha256 == "auto" and args.size == 36
    assert args.out == REPO / "data" and args.classes == ["cat", "dog", "wild"]


# ------------------------------------------------------------------------------------------------ verify


def test_verify_ok_and_failures(fake_zip, tmp_path, capsys):
    out = tmp_path / "data"
    assert run_tool("--source", fake_zip, "--out", out) == 0
    capsys.readouterr()
    assert run_tool("--verify", out) == 0
    log = capsys.readouterr().out
    assert re.search(r"train/cat +3  note: AFHQ v1 has 5153", log) and log.rstrip().endswith("OK")
    assert run_tool("--verify", "--out", out) == 0  # DIR defaults to --out
    capsys.readouterr()

    Image.new("RGB", (40, 36)).save(out / "train" / "dog" / "wrong.jpg")
    Image.new("L", (36, 36)).save(out / "val" / "wild" / "gray.jpg")
    good = (out / "train" / "cat" / "flickr_cat_000000.jpg").read_bytes()
    (out / "train" / "cat" / "flickr_cat_000000.jpg").write_bytes(good[: len(good) // 2])
    for f in (out / "val" / "cat").iterdir():
        f.unlink()
    assert run_tool("--verify", out) == 1
    log = capsys.readouterr().out
    assert "1 bad, e.g. wrong.jpg: RGB 40x36" in log
    assert "1 bad, e.g. gray.jpg: L 36x36" in log
    assert "1 bad, e.g. flickr_cat_000000.jpg: unreadable" in log
    assert re.search(r"val/cat +0  EMPTY", log)
    assert "FAILED" in log

    err = _error(capsys, "--verify", tmp_path / "missing")
    assert "missing is not a folder" in err


@pytest.mark.skipif(not SHARED_AFHQ36.is_dir(), reason="shared 36x36 AFHQ copy (../shared/afhq36) not present")
def test_verify_shared_afhq36(capsys):
    assert run_tool("--verify", SHARED_AFHQ36) == 0
    log = capsys.readouterr().out
    assert re.search(r"train/cat +5153", log) and "note:" not in log


def test_cli_help_shows_defaults():
    r = subprocess.run([sys.executable, str(TOOL), "--help"], capture_output=True, text=True,
                       timeout=1800)  # a hang guard, not a speed limit
    assert r.returncode == 0
    assert "(default: 36)" in r.stdout and "--download" in r.stdout and "--verify" in r.stdout


# ------------------------------------------------------------------------------------------------ re-running --download


@pytest.fixture
def fake_counts(monkeypatch):
    """The fake zip's image counts stand in for AFHQ v1's."""
    monkeypatch.setattr(prep, "EXPECTED_COUNTS", {s: {c: n for c in CLASSES} for s, n in COUNTS.items()})


def _closed_port_url():
    import socket
    with socket.socket() as s:  # a free port with nobody listening: any download attempt fails
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/afhq.zip"


def test_download_skipped_when_data_is_complete(server, fake_counts, tmp_path, capsys):
    out = tmp_path / "data"
    assert run_tool("--download", "--url", server.url, "--sha256", server.sha256, "--out", out) == 0
    (out / "downloads" / "afhq.zip").unlink()  # deleted after building, as the README allows
    capsys.readouterr()
    n = len(server.log)
    assert run_tool("--download", "--url", server.url, "--out", out) == 0
    log = capsys.readouterr().out
    assert "already holds the complete data" in log and "skipping the download" in log
    assert f"--data_path {out / 'train'}" in log
    assert len(server.log) == n and not (out / "downloads" / "afhq.zip").exists()
    # offline: the same command with no server at all
    assert run_tool("--download", "--url", _closed_port_url(), "--out", out) == 0
    assert "skipping the download" in capsys.readouterr().out
    check_layout(out)


def test_download_not_skipped_when_data_is_incomplete(server, fake_zip, fake_counts, tmp_path, capsys):
    out = tmp_path / "data"
    assert run_tool("--source", fake_zip, "--out", out) == 0
    missing = out / "val" / "wild" / "flickr_wild_000001.jpg"
    missing.unlink()
    capsys.readouterr()
    assert run_tool("--download", "--url", server.url, "--sha256", server.sha256, "--out", out) == 0
    log = capsys.readouterr().out
    assert f"{out / 'val' / 'wild'} has 1 of 2 images: downloading" in log
    assert len(server.log) == 1 and missing.is_file()
    check_layout(out)

    # a corrupt image is not complete data either
    (out / "train" / "dog" / "flickr_dog_000002.jpg").write_bytes(b"\xff\xd8 truncated")
    (out / "downloads" / "afhq.zip").unlink()
    err = _error(capsys, "--download", "--url", _closed_port_url(), "--out", out)
    assert "download afhq.zip manually" in err  # tried to download (offline here), did not skip


def test_download_overwrite_is_not_skipped(server, fake_zip, fake_counts, tmp_path, capsys):
    out = tmp_path / "data"
    assert run_tool("--source", fake_zip, "--out", out) == 0
    capsys.readouterr()
    assert run_tool("--download", "--overwrite", "--url", server.url, "--sha256", server.sha256, "--out", out) == 0
    assert "skipping" not in capsys.readouterr().out and len(server.log) == 1


@pytest.mark.skipif(not SHARED_AFHQ36.is_dir(), reason="shared 36x36 AFHQ copy (../shared/afhq36) not present")
def test_readme_one_liner_reruns_offline_on_complete_data():
    """`python data/prepare_afhq.py --download` as a user re-runs it, on the real 36x36 copy, with the network
    unreachable: nothing is fetched or written."""
    r = subprocess.run([sys.executable, str(TOOL), "--download", "--out", str(SHARED_AFHQ36), "--url", _closed_port_url()],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "already holds the complete data" in r.stdout and "skipping the download" in r.stdout
