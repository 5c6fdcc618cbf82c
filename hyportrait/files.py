"""Files written whole or not at all: a reader never sees a half-written model, manifest or report."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# the bundled sample (make demo, the tests, the benchmarks), beside this module in the source tree and installed
ASSETS = Path(__file__).resolve().parent / "assets"
SAMPLE_IMAGE, SAMPLE_VIDEO = ASSETS / "sample_portrait.jpg", ASSETS / "sample_driving.mp4"


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path next to `path` to write into; renamed to `path` when the block succeeds, removed
    when it raises, so `path` is never seen half-written."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.partial-")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def check_output_folder(folder: Path, label: str) -> None:
    """InputError, before any work, unless `folder` exists as a writable folder or can be created: the nearest
    existing path above it must be a folder we may write into. `label` names it in the message (`--out x`)."""
    from hyportrait.errors import InputError

    try:
        existing = next(p for p in (Path(folder).absolute(), *Path(folder).absolute().parents) if p.exists())
    except OSError as exc:  # a name longer than the file system takes (exists() raises, not answers)
        raise InputError(f"{label}: {exc.strerror or exc}") from None
    if not existing.is_dir():
        raise InputError(f"{label}: {existing} is a file, not a folder")
    try:
        probe_writable(existing)
    except OSError as exc:
        raise InputError(f"{label}: {existing} is not writable ({exc.strerror or exc})") from None


def probe_writable(folder: Path) -> None:
    """OSError unless a file can be made in `folder`: one is written and removed (permission bits say nothing
    for root, nor for /proc or a read-only mount)."""
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
        pass


def check_output_file(path: Path, label: str) -> None:
    """InputError, before any work, unless `path` can be written whole: its folder exists and is writable (the
    temporary file of `atomic_path` goes there) and `path` is not a folder."""
    from hyportrait.errors import InputError

    path = Path(path)
    if path.is_dir():
        raise InputError(f"{label}: {path} is a folder, not a file")
    if not path.absolute().parent.is_dir():
        raise InputError(f"{label}: folder {path.absolute().parent} does not exist")
    check_output_folder(path.absolute().parent, label)


def read_npz(path: Path, what: str) -> dict:
    """The arrays of the .npz file `path` by name; InputError naming it (`what`: "calibration file") when it
    is missing, not an .npz (a text file, an .npy renamed) or damaged."""
    import numpy as np

    from hyportrait.errors import InputError

    if not Path(path).is_file():
        raise InputError(f"{what} {path} does not exist")
    try:
        with np.load(path) as data:  # an .npy gives an array, no context manager: TypeError
            return {key: data[key] for key in data.files}
    except Exception as exc:  # noqa: BLE001 -- a damaged file makes numpy's readers raise many types (zipfile, zlib, tokenize...)
        raise InputError(f"{what} {path}: not an .npz file, or it is damaged ({type(exc).__name__})") from None


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """The hex sha256 of a file, read in chunks (models and shards are GBs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: Path, data, indent: int = 1) -> Path:
    """`data` as JSON at `path`, atomically (values JSON cannot hold are written as their str)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=indent, default=str) + "\n")
    return Path(path)
