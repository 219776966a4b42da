"""Calibration data: the FP model's own inputs along its sampling trajectories.

Q-Diffusion's recipe: run the FP sampler, record the model inputs (x_t, t, conditioning) at every step,
keep ``n_timesteps`` steps spread uniformly over the trajectory (``selection: uniform``) or drawn at
random (``selection: random``, DilateQuant / EDA-DM style), for all ``n_samples`` trajectories.
The file also records every timestep the sampler visits, which timestep-indexed activation
quantizers need to size their parameter tables.

Real size: a calibration set of a real model can exceed memory. The calibrate stage streams it to disk as it
is recorded (:class:`CalibrationWriter`: each sampled batch is written at its place in ``calib.safetensors``
and dropped), and :func:`load_calibration` memory-maps the inputs ``x``: a batch, a subset or a
reconstruction's input sample reads only its own rows, so the memory a stage holds follows its batch, not
the set. The streamed file is byte-identical to one written from memory (:func:`save_calibration`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from .io import file_hash, read_json, write_json

MMAP_MIN_BYTES = 1 << 20  # tensors at least this large are memory-mapped on load, smaller ones read
_NUMPY_DTYPES = {"F32": "float32", "F16": "float16", "F64": "float64", "I64": "int64", "I32": "int32"}
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.float64: "F64", torch.int64: "I64",
                       torch.int32: "I32"}


@dataclass
class CalibrationSet:
    x: torch.Tensor  # [N, C, H, W] noisy inputs x_t
    t: torch.Tensor  # [N] integer timesteps
    labels: torch.Tensor  # [N] class labels
    step_index: torch.Tensor  # [N] index of the sampling step (0 = noisiest)
    timesteps: list[int]  # every timestep the sampler visits, noisy end first
    manifest: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def batches(self, batch_size: int, device=None, shuffle: bool = False, seed: int = 0,
                limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield (x, t, labels) batches; ``limit`` caps the number of batches."""
        n = len(self)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
        count = 0
        for i in range(0, n, batch_size):
            if limit is not None and count >= limit:
                return
            idx = order[i : i + batch_size]
            yield (self.x[idx].to(device), self.t[idx].to(device), self.labels[idx].to(device))
            count += 1

    def subset(self, n: int, seed: int = 0) -> "CalibrationSet":
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]
        return CalibrationSet(self.x[idx], self.t[idx], self.labels[idx], self.step_index[idx],
                              list(self.timesteps), dict(self.manifest))


def select_steps(n_steps: int, n_select: int, selection: str, seed: int) -> list[int]:
    """Indices of the sampling steps to keep (0 = noisiest)."""
    if n_select > n_steps:
        raise ValueError(f"n_timesteps ({n_select}) must not exceed the number of sampling steps ({n_steps})")
    if selection == "uniform":
        stride = n_steps / n_select
        return sorted({min(n_steps - 1, int(i * stride)) for i in range(n_select)})
    if selection == "random":
        g = torch.Generator().manual_seed(seed)
        return sorted(torch.randperm(n_steps, generator=g)[:n_select].tolist())
    raise ValueError(f"selection: {selection!r} is not one of uniform, random")


class CalibrationWriter:
    """Writes ``calib.safetensors`` for ``n`` inputs of ``sample_shape`` while they are recorded: the header
    (the tensor order and offsets safetensors itself chooses, the sorted-key JSON of
    :func:`pipeline.io.save_safetensors`) first, then each chunk of ``x`` at its rows as it arrives; the small
    per-input arrays (``t``, ``labels``, ``step_index``: 8 bytes each) at :meth:`close`. The result is
    byte-identical to :func:`save_calibration` of the same set held in memory; memory use is one chunk."""

    def __init__(self, path: str | Path, n: int, sample_shape, dtype: torch.dtype = torch.float32):
        import json
        import struct

        from safetensors.torch import save

        self.path, self.n, self.sample_shape = Path(path), int(n), tuple(int(s) for s in sample_shape)
        self.dtype, self.rows = dtype, 0
        # allocated once: small tensors made per chunk between the large ones fragment the heap (measured:
        # glibc then keeps every chunk's memory, the whole set over a run)
        self._small = {k: torch.empty(self.n, dtype=torch.int64) for k in ("t", "labels", "step_index")}
        shapes = {"x": (self.n, *self.sample_shape), "t": (self.n,), "labels": (self.n,), "step_index": (self.n,)}
        dtypes = {"x": dtype, "t": torch.int64, "labels": torch.int64, "step_index": torch.int64}
        # the data order safetensors uses depends on names and dtypes only: ask it with one-element stand-ins
        probe = save({k: torch.zeros(1, dtype=d) for k, d in dtypes.items()})
        (m,) = struct.unpack("<Q", probe[:8])
        order = sorted((k for k in json.loads(probe[8:8 + m]) if k != "__metadata__"),
                       key=lambda k: json.loads(probe[8:8 + m])[k]["data_offsets"][0])
        header, offset = {}, 0
        for k in order:
            size = torch.Size(shapes[k]).numel() * torch.empty(0, dtype=dtypes[k]).element_size()
            header[k] = {"dtype": _SAFETENSORS_DTYPES[dtypes[k]], "shape": list(shapes[k]),
                         "data_offsets": [offset, offset + size]}
            offset += size
        text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self._base = 8 + len(text)
        self._offsets = {k: v["data_offsets"][0] for k, v in header.items()}
        self._row_bytes = torch.Size(self.sample_shape).numel() * torch.empty(0, dtype=dtype).element_size()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(self.path.name + ".partial")
        self._fh = open(self._tmp, "wb")
        self._fh.write(struct.pack("<Q", len(text)) + text)
        self._fh.truncate(self._base + offset)

    def write(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, step_index: torch.Tensor) -> None:
        """Append ``x`` ([B, *sample_shape]) and its per-input values at the next B rows."""
        b = int(x.shape[0])
        if tuple(x.shape[1:]) != self.sample_shape or x.dtype != self.dtype:
            raise ValueError(f"x: expected [B, {', '.join(map(str, self.sample_shape))}] {self.dtype}, got "
                             f"{list(x.shape)} {x.dtype}")
        if self.rows + b > self.n:
            raise ValueError(f"calibration writer: {self.rows + b} inputs written, {self.n} declared")
        self._fh.seek(self._base + self._offsets["x"] + self.rows * self._row_bytes)
        self._fh.write(x.detach().cpu().contiguous().numpy().tobytes())
        for k, v in (("t", t), ("labels", labels), ("step_index", step_index)):
            self._small[k][self.rows:self.rows + b] = v.detach().cpu().reshape(-1)
        self.rows += b

    def close(self) -> None:
        """Write the per-input arrays and move the file into place; refuses a set with missing rows."""
        if self.rows != self.n:
            self.abort()
            raise ValueError(f"calibration writer: {self.rows} inputs written, {self.n} declared")
        for k, values in self._small.items():
            self._fh.seek(self._base + self._offsets[k])
            self._fh.write(values.numpy().tobytes())
        self._fh.close()
        self._tmp.replace(self.path)

    def abort(self) -> None:
        self._fh.close()
        self._tmp.unlink(missing_ok=True)


@torch.no_grad()
def collect_calibration(backbone, cfg, diffusion, sampling, out_dir: str | Path | None = None):
    """Sample ``cfg.n_samples`` FP trajectories and keep the inputs at the selected steps. ``out_dir``:
    stream them to ``<out_dir>/calib.safetensors`` as they are recorded (plus ``manifest.json``) and return
    the set loaded back memory-mapped; None: return it held in memory (:func:`save_calibration` writes the
    same bytes)."""
    from .sampling import initial_noise, sample, timestep_values

    keep = set(select_steps(sampling.steps, cfg.n_timesteps, cfg.selection, cfg.seed))
    xs, ts, ys, ss = [], [], [], []
    writer = None
    if out_dir is not None:
        writer = CalibrationWriter(Path(out_dir) / "calib.safetensors", cfg.n_samples * len(keep),
                                   backbone.sample_shape)

    def record(step_index, t, x_t, labels):
        if step_index in keep:
            s = torch.full((x_t.shape[0],), step_index, dtype=torch.long)
            if writer is not None:
                writer.write(x_t.float(), t, labels, s)
                return
            xs.append(x_t.detach().cpu().clone())
            ts.append(t.detach().cpu().long().clone())
            ys.append(labels.detach().cpu().clone())
            ss.append(s)

    device = next(backbone.parameters()).device
    noise = initial_noise(cfg.n_samples, backbone.sample_shape, cfg.seed)
    labels = torch.randint(0, backbone.num_classes, (cfg.n_samples,),
                           generator=torch.Generator().manual_seed(cfg.seed + 1))
    try:
        for i in range(0, cfg.n_samples, cfg.batch_size):
            sample(backbone, noise[i : i + cfg.batch_size].to(device), labels[i : i + cfg.batch_size].to(device),
                   diffusion, sampling, step_hook=record, decode=False)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    timesteps = [int(v) for v in timestep_values(diffusion, sampling, getattr(backbone, "scheduler_config", None))]
    manifest = {
        "seed": cfg.seed,
        "n_samples": cfg.n_samples,
        "sampling_steps": sampling.steps,
        "scheduler": sampling.scheduler,
        "selection": cfg.selection,
        "selected_steps": sorted(keep),
        "timesteps": timesteps,
    }
    if writer is not None:
        writer.close()
        path = Path(out_dir)
        _write_manifest(path, manifest, writer.n, writer.sample_shape)
        return load_calibration(path)
    return CalibrationSet(torch.cat(xs), torch.cat(ts), torch.cat(ys), torch.cat(ss), timesteps, manifest)


def _write_manifest(out_dir: Path, manifest: dict, n: int, sample_shape) -> dict:
    manifest = dict(manifest)
    manifest.update({"n_inputs": int(n), "sha256": file_hash(out_dir / "calib.safetensors"),
                     "sample_shape": list(sample_shape)})
    write_json(out_dir / "manifest.json", manifest)
    return manifest


def save_calibration(calib: CalibrationSet, out_dir: str | Path) -> dict:
    from pipeline.io import save_safetensors

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "calib.safetensors"
    save_safetensors({"x": calib.x.contiguous(), "t": calib.t.contiguous(), "labels": calib.labels.contiguous(),
                      "step_index": calib.step_index.contiguous()}, str(path))
    return _write_manifest(out_dir, calib.manifest, len(calib), calib.x.shape[1:])


def _read_mapped(path: Path) -> dict:
    """The tensors of a safetensors file: the large ones memory-mapped (copy-on-write: writes stay private
    and never reach the file), the rest read. Raises ValueError on a malformed file."""
    import json
    import struct

    import numpy as np

    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError("file too short")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ValueError(f"header length {n} exceeds the file")
        header = json.loads(fh.read(n))
    base, out = 8 + n, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = (int(v) for v in info["data_offsets"])
        dtype = _NUMPY_DTYPES.get(info["dtype"])
        shape = tuple(int(s) for s in info["shape"])
        if dtype is None:
            raise ValueError(f"{name}: unsupported dtype {info['dtype']}")
        count = int(np.prod(shape)) if shape else 1
        if base + end > size or end - begin != count * np.dtype(dtype).itemsize:
            raise ValueError(f"{name}: data offsets {begin}..{end} do not fit its shape or the file")
        if end - begin >= MMAP_MIN_BYTES:
            arr = np.memmap(path, dtype=dtype, mode="c", offset=base + begin, shape=shape)
        else:
            arr = np.fromfile(path, dtype=dtype, count=count, offset=base + begin).reshape(shape)
        out[name] = torch.from_numpy(arr)
    return out


def load_calibration(path: str | Path) -> CalibrationSet:
    """Load a calibration set, checking it against its manifest; the inputs ``x`` are memory-mapped when
    large (module docstring)."""
    path = Path(path)
    manifest = read_json(path / "manifest.json", "calibration manifest")
    data_file = path / "calib.safetensors"
    if not data_file.exists():
        raise FileNotFoundError(f"calibration data not found: {data_file}")
    if manifest.get("sha256") and file_hash(data_file) != manifest["sha256"]:
        raise ValueError(f"calibration data {data_file} does not match its manifest hash (corrupt or edited)")
    try:
        t = _read_mapped(data_file)
        x, ts, labels, steps = t["x"], t["t"], t["labels"], t["step_index"]
    except (ValueError, KeyError, OSError) as exc:
        raise ValueError(f"calibration data {data_file} is corrupt: {exc}") from None
    return CalibrationSet(x, ts, labels, steps, list(manifest["timesteps"]), manifest)
