"""Atomic outputs, byte-deterministic files and content hashes.

Every stage writes into a temporary sibling path and renames it into place at the end, so a killed
stage never leaves a half-written output and the previous output survives until the new one is
complete.

Tracked outputs are byte-deterministic, so that two clean runs write the same ``dvc.lock``: JSON with
sorted keys, safetensors with a sorted header (:func:`save_safetensors`), and nothing measured by a clock
inside them. Wall-clock figures (seconds, peak memory) go to side files named ``*.timing.json``
(:data:`UNTRACKED_PATTERNS`), which ``.dvcignore`` keeps out of every output's hash and :func:`tree_hash`
keeps out of every cache key; :func:`split_timings` separates them from a result's fields.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces ``path`` when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; outputs get the usual permissions
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator[Any]:
    """Open a temporary file that replaces ``path`` when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        with open(tmp, mode) as fh:
            yield fh
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, data: Any) -> None:
    with atomic_file(path) as fh:
        json.dump(data, fh, indent=2, sort_keys=True, default=_json_default)
        fh.write("\n")


def read_json(path: str | Path, what: str = "file") -> Any:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path} (run the stage that produces it first)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} is corrupt: {path}: {exc}") from None


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def file_hash(path: str | Path, algo: str = "sha256") -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# side files that DVC does not hash (.dvcignore lists the same patterns) and cache keys skip: wall-clock
# figures, and the search's study journal and score cache (they hold timestamps / append order)
UNTRACKED_PATTERNS = ("*.timing.json", "*.journal", "*.scores.jsonl")
TIMING_SUFFIX = ".timing.json"


def untracked(path: str | Path) -> bool:
    """Whether ``path`` is a side file that no output hash or cache key includes."""
    import fnmatch

    return any(fnmatch.fnmatch(Path(path).name, pat) for pat in UNTRACKED_PATTERNS)


def is_timing_key(key: str) -> bool:
    """A field measured by a clock or a memory probe: ``*seconds``, ``sec_per_image``, ``*peak*``."""
    return key.endswith("seconds") or key == "sec_per_image" or "peak" in key


def split_timings(d: dict) -> tuple[dict, dict]:
    """``(d without its wall-clock fields, those fields)``, recursively through nested dicts: a nested dict's
    timings keep its key (``{"info": {"peer_seconds": 1, "n": 2}}`` -> ``({"info": {"n": 2}}, {"info":
    {"peer_seconds": 1}})``)."""
    clean, timing = {}, {}
    for k, v in d.items():
        if isinstance(v, dict):
            c, t = split_timings(v)
            clean[k] = c
            if t:
                timing[k] = t
        elif is_timing_key(k):
            timing[k] = v
        else:
            clean[k] = v
    return clean, timing


def save_safetensors(tensors: dict, path: str | Path, metadata: dict | None = None) -> None:
    """``safetensors.torch.save_file`` with a byte-deterministic header: safetensors writes its metadata
    from a hash map (key order varies between runs); the header is re-written as JSON with sorted keys
    (offsets are relative to the data section, which is unchanged). Written atomically."""
    import struct

    from safetensors.torch import save

    blob = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format aligns the data section to 8 bytes
    with atomic_file(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(text)))
        fh.write(text)
        fh.write(blob[8 + n:])


def tree_hash(path: str | Path) -> str:
    """Hash of a file or of every file below a directory (names and contents), side files
    (:func:`untracked`) excluded."""
    path = Path(path)
    if path.is_file():
        return file_hash(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file() and not untracked(q)):
        h.update(str(p.relative_to(path)).encode())
        h.update(file_hash(p).encode())
    return h.hexdigest()


def data_hash(obj: Any) -> str:
    """Stable hash of plain data (e.g. a params section)."""
    blob = json.dumps(obj, sort_keys=True, default=_json_default).encode()
    return hashlib.sha256(blob).hexdigest()
