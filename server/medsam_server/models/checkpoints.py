"""Checkpoint files: the user cache folder, verified downloads, safe loading."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputError

if TYPE_CHECKING:
    from torch import nn


def cache_dir() -> Path:
    """``$MEDSAM_CACHE_DIR``, else ``$XDG_CACHE_HOME/medsam-slicer``, else ``~/.cache/medsam-slicer``."""
    if os.environ.get("MEDSAM_CACHE_DIR"):
        return Path(os.environ["MEDSAM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "medsam-slicer"


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str) -> None:
    actual = file_digest(path)
    if actual != expected:
        raise InputError(f"checkpoint {path} has SHA-256 {actual}, expected {expected}: "
                         "the file is damaged or not the one expected")


@dataclass(frozen=True)
class KnownWeights:
    """A checkpoint with an official download location and the checksum its host publishes."""

    filename: str
    url: str
    approx_size: int  # bytes; only for the progress bar when the host sends no length
    digest_algorithm: str
    digest: str


# Zenodo record 10.5281/zenodo.10689643 (bowang-lab/MedSAM, CC-BY-4.0). Zenodo publishes
# the MD5 of each file, so that is what a download is checked against; after it passes,
# the file's SHA-256 is written beside it and checked on every later load.
MEDSAM_VIT_B = KnownWeights(
    filename="medsam_vit_b.pth",
    url="https://zenodo.org/records/10689643/files/medsam_vit_b.pth?download=1",
    approx_size=375_000_000,
    digest_algorithm="md5",
    digest="3bb6db55bd0c9ca30b61248bca72f8d6",
)


def fetch_known_weights(weights: KnownWeights, folder: Path | None = None) -> Path:
    """Return the cached checkpoint, downloading and verifying it first if it is missing.

    The download goes to a temporary name and is renamed only after its checksum
    matches, so an interrupted download never leaves a file that looks complete.
    """
    folder = Path(folder) if folder else cache_dir()
    target = folder / weights.filename
    sidecar = target.with_name(target.name + ".sha256")
    if target.exists() and sidecar.exists():
        verify_sha256(target, sidecar.read_text().strip())
        return target
    folder.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    from tqdm import tqdm

    print(f"Downloading {weights.filename} from {weights.url} into {folder}", file=sys.stderr)
    try:
        with urllib.request.urlopen(weights.url, timeout=60) as response, open(partial, "wb") as out, tqdm(
            total=int(response.headers.get("Content-Length") or weights.approx_size), unit="B", unit_scale=True,
            desc=weights.filename, file=sys.stderr,
        ) as bar:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                out.write(chunk)
                bar.update(len(chunk))
    except OSError as err:
        partial.unlink(missing_ok=True)
        raise InputError(
            f"could not download {weights.filename} ({err}); download it by hand from {weights.url} "
            f"and pass --checkpoint PATH"
        ) from None
    actual = file_digest(partial, weights.digest_algorithm)
    if actual != weights.digest:
        partial.unlink(missing_ok=True)
        raise InputError(f"downloaded {weights.filename} has {weights.digest_algorithm} {actual}, "
                         f"expected {weights.digest}")
    shutil.move(partial, target)
    sidecar.write_text(file_digest(target) + "\n")
    return target


def load_state_dict(path: Path, module: nn.Module, what: str) -> dict:
    """Read a checkpoint safely (``weights_only=True``) and check it fits ``module``.

    Accepts a bare state dict or one wrapped under ``model`` / ``state_dict``.
    Raises InputError naming the file and the first mismatches.
    """
    import torch  # here: the cache folder and digests above serve the torch-free ONNX path too

    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a damaged or foreign file
        raise InputError(
            f"checkpoint {path} is not a readable PyTorch weights file ({type(err).__name__}: {err})") from None
    if isinstance(state, dict):
        for wrapper in ("model", "state_dict"):
            if isinstance(state.get(wrapper), dict):
                state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"checkpoint {path} holds no state dict of tensors")
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items() if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} of the wrong shape (e.g. {'; '.join(wrong_shape[:3])})")
    if problems:
        raise InputError(f"checkpoint {path} does not fit {what}: tensors " + ", ".join(problems))
    return state
