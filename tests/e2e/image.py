"""The e2e guest image: built once from the recipe in tests/e2e/guest/, cached outside the repo.

    <cache>/<recipe hash>/      rootfs.img, vmlinuz, initrd.img, image.json
    <cache>/debs/               debootstrap's downloads, reused by the next build
    <cache>/.lock               one build at a time

The recipe hash covers every file under tests/e2e/guest/ (paths, contents, modes), so an edit
there builds a new image (and then removes the older ones). A build runs in a temporary
directory inside the cache and is renamed into place only when complete: a killed build never
leaves a half image.

CLI (scripts/e2e uses it):
    python3 tests/e2e/image.py build --cache DIR   prints the image directory
    python3 tests/e2e/image.py path --cache DIR    prints it without building (exit 1 if cold)
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GUEST = Path(__file__).resolve().parent / "guest"
BUILD_SCRIPT = GUEST / "build-image.sh"
IMAGE_FILES = ("rootfs.img", "vmlinuz", "initrd.img")
STAMP = "image.json"


class ImageError(Exception):
    """The image could not be built (the message says why)."""


def recipe_hash() -> str:
    """A digest of everything under tests/e2e/guest/: the image is a function of it."""
    digest = hashlib.sha256()
    for path in sorted(p for p in GUEST.rglob("*") if p.is_file()):
        rel = path.relative_to(GUEST).as_posix()
        digest.update(f"{rel}\0{path.stat().st_mode & 0o111:o}\0".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def image_dir(cache: Path) -> Path:
    return Path(cache) / recipe_hash()


def is_complete(directory: Path) -> bool:
    return (directory / STAMP).is_file() and all((directory / f).is_file() for f in IMAGE_FILES)


def _remove_build_dir(directory: Path) -> None:
    """Delete a build directory, first lifting any mount a killed debootstrap left inside it
    (deleting through a mounted /proc or /dev would reach the host's)."""
    prefix = str(directory.resolve()) + "/"
    with open("/proc/mounts") as fh:
        mounts = [line.split()[1] for line in fh]
    for mount in sorted((m for m in mounts if m.startswith(prefix)), reverse=True):
        subprocess.run(["umount", "-l", mount], check=False)
    with open("/proc/mounts") as fh:
        if any(line.split()[1].startswith(prefix) for line in fh):
            raise ImageError(f"{directory} still has mounts inside; remove them by hand")
    shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def _build_lock(cache: Path):
    fd = os.open(cache / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def ensure_image(cache: Path, log=sys.stderr) -> Path:
    """The image directory for the current recipe, building it first when the cache is cold."""
    cache = Path(cache).absolute()
    cache.mkdir(parents=True, exist_ok=True)
    final = image_dir(cache)
    if is_complete(final):
        return final
    with _build_lock(cache):
        if is_complete(final):  # built by someone else while we waited
            return final
        for stale in cache.glob(".build-*"):  # left by a killed build
            _remove_build_dir(stale)
        work = Path(tempfile.mkdtemp(prefix=".build-", dir=cache))
        try:
            started = time.monotonic()
            print(f"e2e image: building {final.name} (cold cache, about 2 minutes)", file=log)
            env = dict(os.environ, MARINER_E2E_DEBS=str(cache / "debs"))
            # The build's own output goes to our stderr (fd 2), whoever captures it.
            proc = subprocess.run(["bash", str(BUILD_SCRIPT), str(work)], env=env, stdout=2)
            if proc.returncode != 0:
                raise ImageError(f"the guest image build failed (exit {proc.returncode}); "
                                 f"see the output above")
            missing = [f for f in IMAGE_FILES if not (work / f).is_file()]
            if missing:
                raise ImageError(f"the guest image build left no {', '.join(missing)}")
            seconds = round(time.monotonic() - started, 1)
            (work / STAMP).write_text(json.dumps(
                {"recipe": final.name, "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 "build_seconds": seconds}, indent=2) + "\n")
            if final.exists():  # an incomplete directory from elsewhere: replace it
                shutil.rmtree(final)
            os.rename(work, final)
            print(f"e2e image: built {final} in {seconds} s", file=log)
            _prune(cache, keep=final)
        finally:
            if work.exists():
                _remove_build_dir(work)
    return final


def _prune(cache: Path, keep: Path) -> None:
    """Remove the images of older recipes (only test VMs' overlays ever pointed at them)."""
    for other in cache.iterdir():
        if other != keep and other.is_dir() and re.fullmatch(r"[0-9a-f]{16}", other.name):
            shutil.rmtree(other, ignore_errors=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="image.py", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("build", "path"))
    parser.add_argument("--cache", required=True, type=Path)
    args = parser.parse_args(argv)
    if args.action == "path":
        directory = image_dir(args.cache.absolute())
        print(directory)
        return 0 if is_complete(directory) else 1
    try:
        print(ensure_image(args.cache))
    except ImageError as exc:
        print(f"e2e image: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
