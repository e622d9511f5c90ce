"""Run folders: the config, the environment, JSONL metrics, tensors, checkpoints and phase timings.

Layout of one run folder::

    config.json           the DistillConfig (write_config)
    env.json              versions, platform, device, git sha (write_env)
    metrics.jsonl         one JSON object per line, each with "time" (ISO 8601, UTC) (log)
    <name>.safetensors    tensors (save_tensors), e.g. synthetic.safetensors with images and labels
    <name>.json           any JSON document (save_json)
    checkpoint.pt         resumable state, written atomically (checkpoint / load_checkpoint)
    timing.json           accumulated wall-clock seconds per phase (timer)
    .lock                 the claim of the process writing the folder (lock / FolderLock)
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
import socket
import subprocess
import sys
import time
import weakref
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
import torch

__all__ = ["RunFolder", "FolderLock", "environment", "git_sha", "git_dirty", "to_jsonable"]


def to_jsonable(obj: Any) -> Any:
    """Convert dataclasses, tensors, numpy values and paths into plain JSON types (recursively)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 and obj.dim() == 0 else obj.detach().cpu().tolist()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (Path, torch.device, torch.dtype)):
        return str(obj)
    return obj


def git_sha(folder: Union[str, Path, None] = None) -> str:
    """``git rev-parse HEAD`` in ``folder`` (default: this package's folder), or "unknown"."""
    folder = Path(folder) if folder is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and sha else "unknown"


def git_dirty(folder: Union[str, Path, None] = None) -> Optional[bool]:
    """Whether tracked files of the checkout differ from HEAD (``git status --porcelain -uno``), or None."""
    folder = Path(folder) if folder is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=folder, capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def environment(device: Union[str, torch.device, None] = None) -> Dict[str, Any]:
    """Versions and machine facts for reproducibility: python, torch, numpy, triton (or None),
    platform, cpu count, device (name of the GPU when the device is CUDA) and git sha."""
    try:
        import triton  # noqa: F401 (optional)
        triton_version = getattr(triton, "__version__", "unknown")
    except Exception:  # triton absent or broken: record that, never fail
        triton_version = None
    if device is None or str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" and torch.cuda.is_available() \
        else platform.processor() or platform.machine()
    return {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": np.__version__,
            "triton": triton_version, "cuda": torch.version.cuda, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device),
            "device_name": device_name, "git_sha": git_sha(), "git_dirty": git_dirty()}


class FolderLock:
    """One process's exclusive claim on an output folder: ``<folder>/.lock`` (or another ``name``, for a part
    of the folder), held with ``flock``.

    The kernel drops the claim when its process ends, however it ends (a SIGKILL included), so a killed
    job never blocks its own restart; the file says who holds the claim (pid, host, start time, command)
    so that a second process started on the same folder refuses in one line naming the first. Claims
    within one process are counted, not refused (a job may reopen its own folder). The file stays after
    release, emptied. Without ``fcntl`` (not POSIX) the claim is recorded but not enforced.

        with FolderLock(out):          # or: lock = FolderLock(out).acquire(); ...; lock.release()
            ...                        # ValueError: "<out> is in use by pid 123 on host h (since ...: cmd)"
    """

    _held: Dict[str, list] = {}  # lock path -> [file descriptor, claims] of this process

    def __init__(self, folder: Union[str, Path], name: str = ".lock"):
        self.folder, self.name = Path(folder), name
        self._key: Optional[str] = None

    def acquire(self) -> "FolderLock":
        """Claim the folder (created if missing); refuses in one line when another process holds it."""
        if self._key is not None:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(self.folder / self.name)
        if key in self._held:
            self._held[key][1] += 1
            self._key = key
            return self
        fd = os.open(key, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl
        except ImportError:  # not POSIX: record the claim, enforce nothing
            fcntl = None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise ValueError(f"{self.folder} is in use by {self._owner(key)}; wait for it to finish or choose "
                                 "another output folder") from None
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:])[:200] if sys.argv else "python"}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(me).encode())
        os.fsync(fd)
        self._held[key] = [fd, 1]
        self._key = key
        return self

    def release(self) -> None:
        """Give the claim back (the last claim of this process empties the file and unlocks it)."""
        key, self._key = self._key, None
        entry = self._held.get(key) if key is not None else None
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del self._held[key]
            try:
                os.ftruncate(entry[0], 0)
            finally:
                os.close(entry[0])  # closing the last descriptor drops the flock

    @staticmethod
    def _owner(key: str) -> str:
        """"pid N on host H (since T: command)" from the lock file (its owner may still be writing it)."""
        for _ in range(20):
            try:
                info = json.loads(Path(key).read_text() or "null")
            except (OSError, ValueError):
                info = None
            if isinstance(info, dict):
                cmd = " ".join(str(info.get("command", "")).split())
                return f"pid {info.get('pid')} on host {info.get('host')} (since {info.get('since')}: {cmd})"
            time.sleep(0.05)
        return "another process (it has not written its name to the lock file yet)"

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class RunFolder:
    """One run's output folder; every writer returns the path it wrote.

    ``create=False`` opens an existing folder for reading and refuses a missing one (nothing is created).
    """

    def __init__(self, path: Union[str, Path], create: bool = True):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"RunFolder: {self.path} exists and is not a folder")
        if not create:
            if not self.path.is_dir():
                raise FileNotFoundError(f"{self.path}: no such run folder")
            return
        self.path.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def lock(self) -> "RunFolder":
        """Claim the folder for this process (see :class:`FolderLock`) until this object is dropped or the
        process ends; refuses in one line, naming the owner, while another process writes it. Returns self."""
        if getattr(self, "_lock", None) is None:
            self._lock = FolderLock(self.path).acquire()
            weakref.finalize(self, self._lock.release)
        return self

    def file(self, name: str) -> Path:
        """Path of ``name`` inside the folder (no sub-folders, no '..')."""
        if not name or Path(name).name != name or name in (".", ".."):
            raise ValueError(f"RunFolder: {name!r} must be a plain file name")
        return self.path / name

    def _write_text(self, name: str, text: str) -> Path:
        """Write ``text`` atomically (temporary file in the folder, then os.replace)."""
        target = self.file(name)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, target)
        return target

    def save_json(self, name: str, obj: Any) -> Path:
        """Write ``obj`` (dataclasses, tensors and numpy values allowed) to ``<name>`` (".json" added)."""
        name = name if name.endswith(".json") else name + ".json"
        return self._write_text(name, json.dumps(to_jsonable(obj), indent=2, sort_keys=True) + "\n")

    def write_config(self, cfg: Any) -> Path:
        """config.json from a DistillConfig (or any dataclass / dict)."""
        data = cfg.to_dict() if hasattr(cfg, "to_dict") else cfg
        return self.save_json("config.json", data)

    def read_config(self) -> Dict[str, Any]:
        """The dict stored in config.json (``DistillConfig.from_dict`` turns it back into a config)."""
        path = self.file("config.json")
        if not path.is_file():
            raise FileNotFoundError(f"RunFolder: no config.json in {self.path}")
        return json.loads(path.read_text())

    def write_env(self, device: Union[str, torch.device, None] = None) -> Path:
        """env.json: see :func:`environment`."""
        return self.save_json("env.json", environment(device))

    def log(self, record: Dict[str, Any]) -> Path:
        """Append ``record`` as one JSON line to metrics.jsonl, with "time" (UTC, ISO 8601) added."""
        if not isinstance(record, dict):
            raise ValueError(f"RunFolder.log expects a dict, got {type(record).__name__}")
        line = {"time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")}
        line.update(to_jsonable(record))
        path = self.file("metrics.jsonl")
        with open(path, "a") as fh:
            fh.write(json.dumps(line, sort_keys=True) + "\n")
        return path

    def truncate_log(self, iteration: int) -> None:
        """Drop the metrics.jsonl records of iterations after ``iteration`` (a resume recomputes them), atomically."""
        records = [r for r in self.read_log() if int(r.get("iteration", 0)) <= int(iteration)]
        self._write_text("metrics.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))

    def read_log(self) -> list:
        """All records of metrics.jsonl, in order ([] when nothing was logged). A last line cut short (the
        process was killed while appending it) is left out; a broken line before it is refused by number."""
        path = self.file("metrics.jsonl")
        if not path.is_file():
            return []
        lines = path.read_text().splitlines()
        records = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                if number == len(lines):
                    break
                raise ValueError(f"{path}: line {number} is not JSON ({err}); the metrics log is damaged") from None
        return records

    def save_tensors(self, name: str, tensors: Dict[str, torch.Tensor],
                     metadata: Optional[Dict[str, str]] = None) -> Path:
        """Save a dict of tensors to ``<name>.safetensors`` (copied to CPU and made contiguous), with optional
        string ``metadata`` in the file's header (e.g. class names; read with ``load_metadata``)."""
        from safetensors.torch import save_file

        if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
            raise ValueError("RunFolder.save_tensors expects a non-empty dict of name -> tensor")
        name = name if name.endswith(".safetensors") else name + ".safetensors"
        target = self.file(name)
        tmp = target.with_name(f".{target.name}.tmp")
        save_file({k: t.detach().cpu().contiguous() for k, t in tensors.items()}, str(tmp), metadata=metadata or None)
        os.replace(tmp, target)
        return target

    def load_tensors(self, name: str) -> Dict[str, torch.Tensor]:
        """Read ``<name>.safetensors`` back as a dict of CPU tensors."""
        from safetensors.torch import load_file

        name = name if name.endswith(".safetensors") else name + ".safetensors"
        return load_file(str(self.file(name)))

    def load_metadata(self, name: str) -> Dict[str, str]:
        """The string metadata stored in ``<name>.safetensors`` ({} when none)."""
        from safetensors import safe_open

        name = name if name.endswith(".safetensors") else name + ".safetensors"
        with safe_open(str(self.file(name)), framework="pt") as f:
            return dict(f.metadata() or {})

    def checkpoint(self, state: Dict[str, Any]) -> Path:
        """torch.save ``state`` to checkpoint.pt atomically: a crash mid-write leaves the previous
        checkpoint intact (write to a temporary file in the folder, then os.replace)."""
        target = self.file("checkpoint.pt")
        tmp = target.with_name(".checkpoint.pt.tmp")
        try:
            torch.save(state, tmp)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                tmp.unlink()
        return target

    def load_checkpoint(self) -> Optional[Dict[str, Any]]:
        """The state saved by :meth:`checkpoint`, or None when there is none. The file is unpickled
        (weights_only=False) so RNG states and plain objects survive: load only your own run folders."""
        path = self.file("checkpoint.pt")
        if not path.is_file():
            return None
        return torch.load(path, map_location="cpu", weights_only=False)
