"""The run store: a run's identity, its folder, its record, checkpoint and weights, and where results go.

**Identity = what runs.** A run is named by a hash of :func:`identity`: the config with every method
option resolved (an explicit default and an implicit one are one run; a changed default is a new
run), the version of the method's computation (``Distiller.version``) and of the dataset recipe
(``shapes``' ``DATASET_VERSION``), and the teacher's identity. Fields that only say where data is
read from (``data.root``, ``download``, ``num_workers``) and the profile's label are left out, so
moving a dataset or renaming a profile never retrains a 240-epoch teacher. The device, precision
and thread count are *recorded*, not hashed: they change the floating-point arithmetic, not what
is computed (the "How this book is built" page says what that means for reproducibility).

**Folders.** ``$KDLIB_CACHE/runs/<method>-<student>[-from-<teacher>]-s<seed>-<hash>/`` holds
``record.json``, ``student.pt`` (the final weights) and ``checkpoint.pt`` (the last epoch, for resume).
Every write goes to a uniquely named temporary file, is fsynced, then renamed: a reader never sees
half a file and two writers never share a temporary. :func:`run_lock` is a file lock
(:mod:`filelock`) that makes a second process asking for a run being trained wait, then reuse it.

**Results** (committed records, ``--export``) go to :func:`results_root`: ``$KDLIB_RESULTS``, else the
checkout's ``results/`` when kdlib runs from its repository, else a user data folder — never inside
site-packages.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from pathlib import Path

import torch
from filelock import FileLock
from torch import nn

import kdlib
from kdlib import KDLibError
from kdlib.config import RunConfig
from kdlib.distill import method_version, resolve_options

RECORD = "record.json"
CHECKPOINT = "checkpoint.pt"
WEIGHTS = "student.pt"
# DataConfig fields that say where and how data is read, not which data: not part of a run's identity.
LOADING_ONLY = ("root", "download", "num_workers")
SHAPES_ONLY = ("train_size", "test_size", "num_classes", "data_seed", "difficulty")


# --- identity -----------------------------------------------------------------------------------
def dataset_version(name: str) -> int:
    """The version of a dataset's recipe: ``shapes``' generator version; CIFAR's files do not change."""
    if name == "shapes":
        from kdlib.data.shapes import DATASET_VERSION

        return DATASET_VERSION
    return 1


def identity(cfg: RunConfig) -> dict:
    """What a run computes, as a JSON-able dict (the hashed form; see the module docstring)."""
    d = cfg.to_dict()
    d.pop("profile")
    for key in LOADING_ONLY + (SHAPES_ONLY if cfg.data.name != "shapes" else ()):
        d["data"].pop(key)
    d["method_options"] = resolve_options(cfg.method, dict(cfg.method_options))
    d["versions"] = {"method": method_version(cfg.method), "dataset": dataset_version(cfg.data.name)}
    d["teacher"] = identity(cfg.teacher) if cfg.teacher is not None else None
    return d


def config_hash(cfg: RunConfig) -> str:
    """Stable 16-hex-digit hash of a run's :func:`identity` (the teacher's included)."""
    blob = json.dumps(identity(cfg), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_name(cfg: RunConfig) -> str:
    """Human-readable, unique folder name: ``<method>-<student>[-from-<teacher>]-s<seed>-<hash>``."""
    parts = [cfg.method, cfg.student]
    if cfg.teacher is not None:
        parts.append(f"from-{cfg.teacher.student}")
    parts += [f"s{cfg.seed}", config_hash(cfg)]
    return "-".join(parts)


# --- folders ------------------------------------------------------------------------------------
def cache_root() -> Path:
    """``$KDLIB_CACHE`` or ``~/.cache/kdlib``."""
    root = os.environ.get("KDLIB_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "kdlib"


def run_dir(cfg: RunConfig, root: Path | None = None) -> Path:
    return (root or cache_root()) / "runs" / run_name(cfg)


def run_lock(cfg: RunConfig, root: Path | None = None) -> FileLock:
    """A file lock beside the run's folder: held while the run is looked up, trained and written."""
    folder = run_dir(cfg, root)
    folder.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(folder.with_name(folder.name + ".lock")))


def checkout_root() -> Path | None:
    """The repository kdlib runs from (an editable install or the source tree), else None."""
    top = Path(kdlib.__file__).resolve().parent.parent
    pyproject = top / "pyproject.toml"
    if pyproject.is_file() and 'name = "kdlib"' in pyproject.read_text(errors="replace"):
        return top
    return None


def results_root() -> Path:
    """Where committed records and exports go: ``$KDLIB_RESULTS``, the checkout's ``results/``, or
    ``$XDG_DATA_HOME/kdlib/results`` (default ``~/.local/share/kdlib/results``) for an installed kdlib."""
    env = os.environ.get("KDLIB_RESULTS")
    if env:
        return Path(env).expanduser()
    top = checkout_root()
    if top is not None:
        return top / "results"
    data_home = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data_home).expanduser() / "kdlib" / "results"


# --- atomic writes ------------------------------------------------------------------------------
def _atomic_write(path: Path, write) -> None:
    """``write(file)`` into a unique temporary beside ``path``, fsync, rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON so that a reader never sees half a file."""
    text = json.dumps(obj, indent=1, sort_keys=False, default=str) + "\n"
    _atomic_write(path, lambda f: f.write(text.encode()))


def save_atomic(obj, path: Path) -> None:
    """torch.save through a unique temporary: a kill mid-write leaves the old file."""
    _atomic_write(path, lambda f: torch.save(obj, f))


# --- records --------------------------------------------------------------------------------------
def versions() -> dict[str, str]:
    import torchvision

    return {
        "kdlib": kdlib.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
    }


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def load_record(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise KDLibError(f"cannot read run record {path}: {e}") from None


def find_record(cfg: RunConfig, root: Path | None = None, status: str = "complete") -> dict | None:
    """The record of this run in the cache with the given status, or None.

    ``status`` is ``complete`` (a finished run) or ``diverged`` (a run stopped by a NaN/inf loss).
    """
    path = run_dir(cfg, root) / RECORD
    if path.exists():
        rec = load_record(path)
        if rec.get("status") == status and rec.get("hash") == config_hash(cfg):
            return rec
    return None


def export_record(record: dict, folder: Path) -> Path:
    """Copy a record into a results folder (committed to the repository)."""
    path = Path(folder) / f"{record['name']}.json"
    write_json_atomic(path, record)
    return path


def load_records(folder: Path | str) -> list[dict]:
    folder = Path(folder)
    return [load_record(p) for p in sorted(folder.glob("*.json")) if not p.name.startswith("summary")]


# --- checkpoints and weights ----------------------------------------------------------------------
def load_checkpoint(path: Path, expected_hash: str) -> dict:
    """Load with ``weights_only=True``; a corrupt or foreign file is a clear error."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise KDLibError(f"no checkpoint at {path} (the run has not finished an epoch in this cache)") from None
    except Exception as e:  # torch raises many types for a damaged file
        raise KDLibError(f"checkpoint {path} is corrupt or not a kdlib checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "config_hash" not in ckpt:
        raise KDLibError(f"checkpoint {path} is not a kdlib checkpoint")
    if ckpt["config_hash"] != expected_hash:
        raise KDLibError(
            f"checkpoint {path} belongs to another config (hash {ckpt['config_hash']}, expected {expected_hash})"
        )
    return ckpt


def load_weights(model: nn.Module, path: Path, what: str = "model") -> nn.Module:
    """Load a state dict saved by the engine into ``model``, with a clear error on mismatch."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise KDLibError(f"{what} weights not found at {path}") from None
    except Exception as e:
        raise KDLibError(f"{what} weights at {path} are corrupt ({type(e).__name__})") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise KDLibError(f"{what} weights at {path} do not match {type(model).__name__}: {first}") from None
    return model
