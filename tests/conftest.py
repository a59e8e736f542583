"""Fixtures shared by every suite: generated images (and bad rows) served on 127.0.0.1, and a
small data root made by the real stage 1 (img2dataset against that server)."""

from __future__ import annotations

import io
import os
import shutil
import subprocess

import pytest
from siclip_testing import SMALL, fault_rows, refusing_port, siclip, write_list

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

GOOD_IMAGES = 24
# Set by `make test-mobileclip`: there a missing or broken extra is an error, not a quiet skip.
REQUIRE_MOBILECLIP = "SICLIP_REQUIRE_MOBILECLIP"


def _mobileclip_problem() -> str | None:
    """Why the extra cannot run here (None: it can). Imported for real: a torchvision that does not match
    torch is found by the import system but fails to import ('operator torchvision::nms does not exist')."""
    for module in ("timm", "open_clip"):
        try:
            __import__(module)
        except Exception as e:  # ImportError, or torchvision's RuntimeError
            return f"{module} does not import ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return None


def pytest_collection_modifyitems(config, items):
    marked = [item for item in items if "mobileclip" in item.keywords]
    problem = _mobileclip_problem() if marked else None
    if problem is None:
        return
    if os.environ.get(REQUIRE_MOBILECLIP):
        raise pytest.UsageError(f"{REQUIRE_MOBILECLIP} is set but the mobileclip extra cannot run: {problem}")
    skip = pytest.mark.skip(reason=f"needs the mobileclip extra ({problem}): make test-mobileclip")
    for item in marked:
        item.add_marker(skip)


def _bad_files() -> dict[str, bytes]:
    from PIL import Image

    from demo.loopback import make_image

    jpeg = make_image(0)[0]
    one = io.BytesIO()
    Image.new("RGB", (1, 1), (200, 10, 10)).save(one, "PNG")
    bomb = io.BytesIO()
    Image.new("L", (10_000, 10_000)).save(bomb, "PNG")  # 100 Mpx that compress to ~100 KB
    return {"bad/text.jpg": b"this is a text file, not a picture\n", "bad/truncated.jpg": jpeg[:200],
            "bad/one.png": one.getvalue(), "bad/bomb.png": bomb.getvalue()}


@pytest.fixture(scope="session")
def image_server():
    """Serves GOOD_IMAGES generated pictures plus the bad files; stops at the end of the session."""
    from demo.loopback import ImageServer, generate

    files, rows = generate(GOOD_IMAGES, seed=1)
    files.update(_bad_files())
    with ImageServer(files) as server:
        server.good_rows = rows
        yield server


@pytest.fixture(scope="session")
def good_rows(image_server):
    """(url, caption) of the pictures that download and decode."""
    return [(f"{image_server.base}/{p}", c) for p, c in image_server.good_rows]


@pytest.fixture(scope="session")
def refused_url():
    """A loopback URL whose connections are refused, its port held for the whole run."""
    with refusing_port() as port:
        yield f"http://127.0.0.1:{port}/refused.jpg"


@pytest.fixture(scope="session")
def bad_rows(image_server, refused_url):
    """(url, caption, expected outcome) on the shared server: see siclip_testing.fault_rows."""
    return fault_rows(image_server.base, refused_url)


@pytest.fixture(scope="session")
def shards_data(tmp_path_factory, good_rows):
    """A data root with the good pictures downloaded by the real stage 1 (3 shards of 8)."""
    d = tmp_path_factory.mktemp("stage1")
    urls = write_list(d / "urls.parquet", good_rows)
    siclip("shards", "--urls", urls, "--data", d / "data", *SMALL)
    return d / "data"


@pytest.fixture
def shards_root(shards_data, tmp_path):
    """A private copy of the stage-1 data root, as a DataRoot, for tests that change it."""
    from siclip.manifests.layout import DataRoot

    dst = tmp_path / "data"
    shutil.copytree(shards_data, dst)
    return DataRoot(dst)


@pytest.fixture
def tmpfs(tmp_path):
    """`tmpfs(size, *options)`: a fresh tmpfs of `size` (e.g. "2m", options such as "ro") mounted for
    one test, for a disk that really fills up or refuses writes. Mounting needs root: elsewhere the
    test is skipped, saying so, never run against a pretend disk."""
    mounted = []

    def mount(size: str, *options: str):
        mnt = tmp_path / f"tmpfs{len(mounted)}"
        mnt.mkdir()
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(mnt)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            pytest.skip(f"needs root to mount a {size} tmpfs (mount said: {res.stderr.strip() or res.returncode})")
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in mounted:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
