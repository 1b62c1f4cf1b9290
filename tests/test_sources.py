"""Real-data sources on tiny fixtures written in each canonical format (no network, no ../shared).

Fixtures are built in tmp_path with the same tools the real files were made with: pickled
numpy batches for CIFAR-10, gzipped IDX for MNIST, Pillow-written PNG/JPEG for image folders,
plain CSV. Downloads go through the real code path against a local http.server or file:// URL.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import os
import pickle
import socket
import struct
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.runner import run_step
import yaml
from PIL import Image

from pipeline.errors import FmpipeError
from pipeline.manifest import read_dataset, read_report
from pipeline.sources import cifar10, csv as csv_source, fetch, imagefolder, mnist

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10-jpeg.tar.gz"


def md5(path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------- fixture builders

def cifar_batch(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": b"fixture batch",
        b"labels": [int(x) for x in rng.integers(0, 10, n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }


def write_cifar_folder(root: Path, n: int = 4, override: dict | None = None) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {name: cifar_batch(n, seed) for seed, (_, name, _) in enumerate(cifar10.BATCHES)}
    batches["batches.meta"] = {b"label_names": [c.encode() for c in CIFAR_CLASSES], b"num_vis": 3072}
    batches.update(override or {})
    for name, obj in batches.items():
        data = obj if isinstance(obj, bytes) else pickle.dumps(obj, protocol=4)
        (folder / name).write_bytes(data)
    return folder


def tar_folder(folder: Path, out: Path) -> Path:
    with tarfile.open(out, "w:gz") as tf:
        tf.add(folder, arcname=folder.name)
    return out


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def write_mnist(folder: Path, n_train: int = 6, n_test: int = 3) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte.gz": (np.arange(n_test) + 3) % 10,
    }
    for name, arr in arrays.items():
        write_idx(folder / name, arr)
    return arrays


def png_bytes(color, size=(8, 6), mode="RGB", fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format=fmt)  # size is (W, H)
    return buf.getvalue()


def noise_png(seed: int, side: int = 32) -> bytes:
    """Incompressible pixels, so that a cut archive is cut inside the image data."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


SPLIT_TREE = {
    "train/cat/0.png": png_bytes((255, 0, 0)),
    "train/cat/1.png": png_bytes((250, 0, 0)),
    "train/dog/0.jpg": png_bytes((0, 0, 255), fmt="JPEG"),
    "train/dog/1.png": png_bytes((0, 0, 250)),
    "val/cat/2.png": png_bytes((245, 0, 0)),
    "val/dog/2.png": png_bytes((0, 0, 245)),
    "test/cat/3.png": png_bytes((240, 0, 0)),
    "test/dog/3.png": png_bytes((0, 0, 240)),
}


def tar_bytes(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            else:
                tf.addfile(info)
    return path


@pytest.fixture
def http_root(tmp_path):
    """A local HTTP server on 127.0.0.1 serving tmp_path/www; yields (folder, base URL)."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def dead_url(name: str) -> str:
    """A URL on a local port nothing listens on: fails fast, no network needed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"


# ---------------------------------------------------------------- CIFAR-10

def test_cifar_archive_loads_with_params_checksum(tmp_path):
    folder = write_cifar_folder(tmp_path / "src", n=4)
    archive = tar_folder(folder, tmp_path / "cifar-10-python.tar.gz")
    col = cifar10.load(cifar10.Spec(path=str(archive), md5=md5(archive)))
    assert col.classes == CIFAR_CLASSES
    assert col.images.shape == (24, 32, 32, 3) and col.images.dtype == np.uint8
    assert col.ids[0] == "train/data_batch_1/00000" and col.ids[-1] == "test/test_batch/00003"
    assert col.given_split.count("train") == 20 and col.given_split.count("test") == 4
    batch = pickle.loads((folder / "data_batch_1").read_bytes())
    assert col.labels[:4].tolist() == batch[b"labels"]
    # Channel planes -> H x W x C: pixel (row 1, col 2) of image 0 in channel c sits at c*1024 + 34.
    assert col.images[0, 1, 2].tolist() == [batch[b"data"][0, c * 1024 + 34] for c in range(3)]
    assert "params" in col.info["checksum"]


def test_cifar_extracted_folder_and_verify(tmp_path):
    folder = write_cifar_folder(tmp_path / "src", n=2)
    col = cifar10.load(cifar10.Spec(path=str(folder.parent), verify=False))
    assert len(col.ids) == 12 and col.info["checksum"] == "not verified"
    with pytest.raises(FmpipeError, match="data_batch_1.*md5 checksum mismatch"):
        cifar10.load(cifar10.Spec(path=str(folder)))


def test_cifar_archive_checksum_mismatch(tmp_path):
    archive = tar_folder(write_cifar_folder(tmp_path / "src"), tmp_path / "c.tar.gz")
    with pytest.raises(FmpipeError, match="not the official CIFAR-10 archive.*md5:.*verify: false"):
        cifar10.load(cifar10.Spec(path=str(archive)))
    with pytest.raises(FmpipeError, match="nor the params' sha256"):
        cifar10.load(cifar10.Spec(path=str(archive), sha256="0" * 64))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar_restricted_unpickler_refuses_foreign_globals(tmp_path):
    evil = pickle.dumps({b"data": _Evil(), b"labels": []}, protocol=4)
    folder = write_cifar_folder(tmp_path / "src", override={"data_batch_3": evil})
    with pytest.raises(FmpipeError, match=r"data_batch_3: refusing to unpickle global (posix|nt)\.system"):
        cifar10.load(cifar10.Spec(path=str(folder), verify=False))
    with pytest.raises(FmpipeError, match="refusing to unpickle global builtins.eval"):
        cifar10.restricted_loads(b"cbuiltins\neval\n(S'1'\ntR.", "x")


def test_cifar_truncated_archive(tmp_path):
    archive = tar_folder(write_cifar_folder(tmp_path / "src", n=50), tmp_path / "c.tar.gz")
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(FmpipeError, match="corrupt or truncated archive"):
        cifar10.load(cifar10.Spec(path=str(cut), verify=False))


def test_cifar_download_through_http_and_offline_error(tmp_path, http_root):
    www, base = http_root
    tar_folder(write_cifar_folder(tmp_path / "src"), www / "cifar-10-python.tar.gz")
    digest = md5(www / "cifar-10-python.tar.gz")
    cache = tmp_path / "cache"
    col = cifar10.load(cifar10.Spec(url=base + "cifar-10-python.tar.gz", md5=digest, cache_dir=str(cache)))
    assert len(col.ids) == 24 and col.info["url"].startswith(base)
    assert md5(cache / "cifar10" / "cifar-10-python.tar.gz") == digest
    # No network, no local copy: the error names the URL and how to supply the file.
    url = dead_url("cifar-10-python.tar.gz")
    with pytest.raises(FmpipeError, match=rf"{url}.*set `path:`"):
        cifar10.load(cifar10.Spec(url=url, cache_dir=str(tmp_path / "empty")))


# ---------------------------------------------------------------- fetch

def test_download_checksum_mismatch_leaves_nothing(tmp_path, http_root):
    www, base = http_root
    (www / "f.bin").write_bytes(b"x" * 5000)
    dest = tmp_path / "cache" / "f.bin"
    with pytest.raises(FmpipeError, match="md5 checksum mismatch.*download discarded"):
        fetch.fetch([base + "f.bin"], dest, ("md5", "0" * 32), "hint")
    assert not dest.parent.exists() or list(dest.parent.iterdir()) == []
    good = ("sha256", hashlib.sha256(b"x" * 5000).hexdigest())
    # First mirror dead, second a file:// URL: the mirror list is walked.
    assert fetch.fetch([dead_url("f.bin"), (www / "f.bin").as_uri()], dest, good, "hint") == dest
    assert dest.read_bytes() == b"x" * 5000
    # A cached file that checks out is reused without any URL.
    assert fetch.fetch([], dest, good, "hint") == dest


@pytest.mark.parametrize("name", ["../x.png", "/abs/x.png", "a/../../x.png", "C:\\x.png"])
def test_safe_member_name_refuses_escapes(name):
    with pytest.raises(FmpipeError, match="refusing member"):
        fetch.safe_member_name(name, "a.tar")


# ---------------------------------------------------------------- MNIST

def test_mnist_local_folder(tmp_path):
    arrays = write_mnist(tmp_path / "m")
    col = mnist.load(mnist.Spec(path=str(tmp_path / "m"), verify=False))
    assert col.images.shape == (9, 28, 28, 1) and col.classes == [str(d) for d in range(10)]
    assert col.ids[:2] == ["train/00000", "train/00001"] and col.ids[-1] == "test/00002"
    assert col.labels.tolist() == [0, 1, 2, 3, 4, 5, 3, 4, 5]
    assert np.array_equal(col.images[6, ..., 0], arrays["t10k-images-idx3-ubyte.gz"][0])
    assert col.given_split == ["train"] * 6 + ["test"] * 3
    with pytest.raises(FmpipeError, match="train-images-idx3-ubyte.gz.*md5 checksum mismatch"):
        mnist.load(mnist.Spec(path=str(tmp_path / "m")))


def test_mnist_download_mirrors_and_checksum(tmp_path, http_root):
    www, base = http_root
    write_mnist(www)
    cache = tmp_path / "cache"
    with pytest.raises(FmpipeError, match=r"could not download train-images.*checksum mismatch.*set `path:`"):
        mnist.load(mnist.Spec(mirrors=[base], cache_dir=str(cache)))
    assert not (cache / "mnist" / "train-images-idx3-ubyte.gz").exists()
    col = mnist.load(mnist.Spec(mirrors=[dead_url(""), base], cache_dir=str(cache), verify=False))
    assert len(col.ids) == 9


def test_mnist_corrupt_files(tmp_path):
    write_mnist(tmp_path / "m")
    img = tmp_path / "m" / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(img.read_bytes())
    img.write_bytes(gzip.compress(raw[:-10]))
    with pytest.raises(FmpipeError, match="train-images.*truncated.*needs 4704 bytes, found 4694"):
        mnist.load(mnist.Spec(path=str(tmp_path / "m"), verify=False))
    img.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + raw[4:]))
    with pytest.raises(FmpipeError, match="1 dimension.*expected unsigned bytes.*with 3"):
        mnist.load(mnist.Spec(path=str(tmp_path / "m"), verify=False))
    img.write_bytes(gzip.compress(raw)[:100])
    with pytest.raises(FmpipeError, match="corrupt or truncated gzip"):
        mnist.load(mnist.Spec(path=str(tmp_path / "m"), verify=False))


# ---------------------------------------------------------------- image folders

def test_imagefolder_split_layout_dir(tmp_path):
    root = write_tree(tmp_path / "imgs", SPLIT_TREE)
    col = imagefolder.load(imagefolder.Spec(path=str(root)))
    assert col.classes == ["cat", "dog"]
    assert col.ids == sorted(SPLIT_TREE)
    assert col.images.shape == (8, 6, 8, 3)  # default size: the first image's, H x W
    assert col.given_split == [r.split("/")[0] for r in sorted(SPLIT_TREE)]
    assert col.labels.tolist() == [0 if "/cat/" in r else 1 for r in sorted(SPLIT_TREE)]
    assert col.images[col.ids.index("train/cat/0.png"), 0, 0].tolist() == [255, 0, 0]
    gray = imagefolder.load(imagefolder.Spec(path=str(root), channels=1, classes=["dog", "cat"]))
    assert gray.images.shape == (8, 6, 8, 1) and gray.classes == ["dog", "cat"]
    assert gray.labels[gray.ids.index("train/cat/0.png")] == 1


@pytest.mark.parametrize("fmt", ["tar.gz", "zip"])
def test_imagefolder_archives_match_directory(tmp_path, fmt):
    files = {f"wrap/{k}": v for k, v in SPLIT_TREE.items()}
    root = write_tree(tmp_path / "imgs", SPLIT_TREE)
    archive = tmp_path / f"imgs.{fmt}"
    if fmt == "zip":
        with zipfile.ZipFile(archive, "w") as zf:
            for rel, data in files.items():
                zf.writestr(rel, data)
    else:
        tar_bytes(archive, [(tarfile.TarInfo(rel), data) for rel, data in reversed(list(files.items()))])
    from_dir = imagefolder.load(imagefolder.Spec(path=str(root)))
    from_archive = imagefolder.load(imagefolder.Spec(path=str(archive)))
    assert from_archive.ids == from_dir.ids  # wrapper folder looked through, same ids
    assert np.array_equal(from_archive.images, from_dir.images)
    assert from_archive.info["wrapper_folder"] == "wrap" and "sha256" in from_archive.info


def test_imagefolder_class_layout_skips_and_sizes(tmp_path):
    files = {
        "a/1.png": png_bytes(10, size=(4, 4), mode="L"),
        "a/2.png": png_bytes(20, size=(8, 8), mode="L"),  # mismatched size
        "a/notes.txt": b"not an image",
        "b/1.png": png_bytes(30, size=(4, 4), mode="L"),
        "b/.DS_Store": b"\x00",
        "README.md": b"top-level file",
    }
    root = write_tree(tmp_path / "imgs", files)
    col = imagefolder.load(imagefolder.Spec(path=str(root), channels=1))
    assert col.given_split is None and col.ids == ["a/1.png", "a/2.png", "b/1.png"]
    assert col.images.shape == (3, 4, 4, 1) and col.info["resized"] == 1
    reasons = {s["id"]: s["reason"] for s in col.skipped}
    assert set(reasons) == {"a/notes.txt", "b/.DS_Store", "README.md"}
    assert reasons["a/notes.txt"].startswith("unreadable image")
    rejected = imagefolder.load(imagefolder.Spec(path=str(root), channels=1, on_size_mismatch="reject"))
    assert rejected.ids == ["a/1.png", "b/1.png"]
    assert rejected.images[1, 0, 0, 0] == 30  # compacted rows stay aligned with ids
    assert "size 8x8 differs from 4x4" in {s["id"]: s["reason"] for s in rejected.skipped}["a/2.png"]
    sized = imagefolder.load(imagefolder.Spec(path=str(root), channels=3, size=(2, 3)))
    assert sized.images.shape == (3, 2, 3, 3) and sized.info["resized"] == 3


def test_imagefolder_empty_class_and_bad_layout(tmp_path):
    root = write_tree(tmp_path / "imgs", {"a/1.png": png_bytes(1), "b/1.png": png_bytes(2)})
    (root / "c").mkdir()
    with pytest.raises(FmpipeError, match="empty class folder.*c"):
        imagefolder.load(imagefolder.Spec(path=str(root)))
    mixed = write_tree(tmp_path / "mixed", {"train/a/1.png": png_bytes(1), "other/a/1.png": png_bytes(2)})
    with pytest.raises(FmpipeError, match=r"mix splits \['train'\] with other folders \['other'\]"):
        imagefolder.load(imagefolder.Spec(path=str(mixed)))
    (root / "c").rmdir()
    with pytest.raises(FmpipeError, match=r"class folder\(s\) \['b'\] are not in the params' classes"):
        imagefolder.load(imagefolder.Spec(path=str(root), classes=["a"]))
    with pytest.raises(FmpipeError, match=r"classes \['z'\] from params have no folder"):
        imagefolder.load(imagefolder.Spec(path=str(root), classes=["a", "b", "z"]))


def _member(name, kind=tarfile.REGTYPE, link=""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info


@pytest.mark.parametrize("member,data,why", [
    (_member("../evil.png"), png_bytes(1), "'..' escapes"),
    (_member("/etc/evil.png"), png_bytes(1), "absolute path"),
    (_member("a/link.png", tarfile.SYMTYPE, "/etc/passwd"), None, "link to '/etc/passwd'"),
    (_member("a/hard.png", tarfile.LNKTYPE, "a/1.png"), None, "link to"),
    (_member("a/dev", tarfile.CHRTYPE), None, "device"),
])
def test_imagefolder_refuses_hostile_tar_members(tmp_path, member, data, why):
    archive = tar_bytes(tmp_path / "x.tar.gz", [(_member("a/1.png"), png_bytes(1)),
                                                (_member("b/1.png"), png_bytes(2)), (member, data)])
    with pytest.raises(FmpipeError, match=f"refusing member '{member.name}'.*{why}"):
        imagefolder.load(imagefolder.Spec(path=str(archive)))


def test_imagefolder_refuses_hostile_zip_members_and_corrupt_archives(tmp_path):
    archive = tmp_path / "x.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a/1.png", png_bytes(1))
        zf.writestr("../../evil.png", png_bytes(2))
        link = zipfile.ZipInfo("a/link.png")
        link.external_attr = (0o120777 << 16)
        zf.writestr(link, "/etc/passwd")
    with pytest.raises(FmpipeError, match="refusing member '../../evil.png'"):
        imagefolder.load(imagefolder.Spec(path=str(archive)))
    good = tar_bytes(tmp_path / "g.tar.gz", [(_member(f"{c}/{i}.png"), noise_png(i)) for c in "ab" for i in range(20)])
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(FmpipeError, match="cut.tar.gz: corrupt or truncated archive"):
        imagefolder.load(imagefolder.Spec(path=str(cut)))
    (tmp_path / "junk.zip").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(FmpipeError, match="junk.zip: corrupt or truncated archive"):
        imagefolder.load(imagefolder.Spec(path=str(tmp_path / "junk.zip")))


def _add_variant(project: Path, name: str, source: dict, **extra) -> None:
    # A variant written by hand: an existing variant's section with another source.
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["variants"][name] = {**params["variants"]["digits"], "source": source, **extra}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_collect_imagefolder_end_to_end(project):

    files = {f"{c}/{i:02d}.png": png_bytes((i * 10, 0, 0) if c == "cat" else (0, 0, i * 10)) for c in ("cat", "dog") for i in range(10)}
    files["cat/broken.png"] = b"\x89PNG\r\n\x1a\n truncated"
    write_tree(project / "pics", files)
    _add_variant(project, "pics", {"kind": "imagefolder", "path": "pics"},
                 split={"seed": 0, "val_fraction": 0.2, "test_fraction": 0.2})
    report = run_step("collect", "pics")
    assert report["rows_in"] == 21 and report["rows_out"] == 20 and report["rows_removed"] == 1
    assert report["removed"][0]["id"] == "cat/broken.png"
    assert report["rows_by_split"] == {"train": 12, "val": 4, "test": 4}
    ds = read_dataset(project / "data" / "pics" / "collect")
    assert ds.classes == ["cat", "dog"] and ds.images.shape == (20, 6, 8, 3)
    assert ds.manifest["id"].tolist() == sorted(k for k in files if k != "cat/broken.png")
    assert read_report(project / "data" / "pics" / "collect").model_extra["source"]["layout"] == "<class>/<file>"

    # A split layout keeps its own val and test folders.
    write_tree(project / "split", SPLIT_TREE)
    _add_variant(project, "split", {"kind": "imagefolder", "path": "split"})
    assert run_step("collect", "split")["rows_by_split"] == {"train": 4, "val": 2, "test": 2}


# ---------------------------------------------------------------- CSV

def test_csv_source(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("key,f1,f2,label,part\nx,1.5,2,10,train\ny,,3,2,test\nz,4,5,,\nw,6,7,2,\n")
    col = csv_source.load(csv_source.Spec(path=str(path), id_column="key", split_column="part"))
    assert col.classes == ["2", "10"]  # numeric order
    assert col.ids == ["x", "y", "w"] and col.labels.tolist() == [1, 0, 0]
    assert list(col.features.columns) == ["f1", "f2"] and np.isnan(col.features["f1"][1])
    assert col.given_split == ["train", "test", None]
    assert col.skipped == [{"id": "z", "reason": "empty label (column 'label')"}]
    plain = csv_source.load(csv_source.Spec(path=str(path), label_column="part", features=["f2"]))
    assert plain.ids[0] == "row/0" and plain.classes == ["test", "train"]


def test_csv_errors(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("a,b,y\n1,2,u\n3,oops,v\n")
    with pytest.raises(FmpipeError, match=r"t.csv: no label column 'label' \(columns: a, b, y\)"):
        csv_source.load(csv_source.Spec(path=str(path)))
    with pytest.raises(FmpipeError, match=r"t.csv: column 'b': expected numbers, found 'oops' at data row 1"):
        csv_source.load(csv_source.Spec(path=str(path), label_column="y"))


def test_collect_csv_end_to_end(project):

    rows = [f"{i},{i * 0.5},{'even' if i % 2 == 0 else 'odd'}" for i in range(20)]
    (project / "t.csv").write_text("x,y,label\n" + "\n".join(rows) + "\n")
    _add_variant(project, "tab", {"kind": "csv", "path": "t.csv"})
    report = run_step("collect", "tab")
    assert report["rows_out"] == 20 and report["rows_by_class"] == {"even": 10, "odd": 10}
    ds = read_dataset(project / "data" / "tab" / "collect")
    assert list(ds.features.columns) == ["x", "y"]


# ---------------------------------------------------------------- real data (slow)

@pytest.mark.slow
@pytest.mark.skipif(not SHARED_CIFAR.exists(), reason="../shared/datasets/cifar10-jpeg.tar.gz not present")
def test_collect_full_cifar10_jpeg(project):

    _add_variant(project, "cifar_jpeg", {"kind": "imagefolder", "path": str(SHARED_CIFAR), "channels": 3})
    report = run_step("collect", "cifar_jpeg")
    splits = report["rows_by_split"]
    assert splits["test"] == 10_000 and splits["train"] + splits["val"] == 50_000
    assert report["rows_removed"] == 0
    assert list(report["rows_by_class"]) == sorted(CIFAR_CLASSES)
    assert set(report["rows_by_class"].values()) == {6000}
    ds = read_dataset(project / "data" / "cifar_jpeg" / "collect")
    assert ds.images.shape == (60_000, 32, 32, 3)
    manifest = ds.manifest
    assert (manifest.loc[manifest["split"] == "test", "id"].str.startswith("test/")).all()


def test_source_dump_holds_only_the_settings_its_kind_uses():
    """The model card, lineage and `fmpipe audit model` show the params dump: the digits source
    must not list make_classification's n_samples/n_features/n_informative/seed."""
    from pipeline.config import VariantSpec, load_variant

    digits = load_variant("digits").model_dump(mode="json", by_alias=True)
    assert digits["source"] == {"kind": "sklearn", "dataset": "digits"}
    synthetic = load_variant("digits").source.model_validate(
        {"kind": "sklearn", "dataset": "make_classification", "n_samples": 50})
    assert synthetic.model_dump() == {"kind": "sklearn", "dataset": "make_classification", "n_samples": 50,
                                      "n_features": 10, "n_informative": 5, "seed": 0}
    # The dump reads back as the same spec (lineage params stay loadable).
    spec = load_variant("digits")
    assert VariantSpec.model_validate(spec.model_dump(by_alias=True)) == spec
