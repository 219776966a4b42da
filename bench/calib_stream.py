#!/usr/bin/env python
"""Peak memory of a calibration set streamed to disk and read back memory-mapped, against its size.

Writes a synthetic set of ``--gib`` GiB of DiT-XL/2-256 latents (4x32x32 float32, 16 KiB per input) with
:class:`pipeline.calibration.CalibrationWriter` in chunks of ``--batch`` inputs, as the calibrate stage
does while it samples, then loads it with :func:`pipeline.calibration.load_calibration` and draws shuffled
batches over the whole set, as the families' activation calibration does. Each phase runs in a fresh process
and prints its peak anonymous resident memory (``RssAnon`` of /proc/self/status, sampled after every chunk)
above the process's baseline after imports, and the ratio to the set size (target: well below 1; an
in-memory set costs at least 1). Mapped file pages (``RssFile``) are page cache the kernel may drop, printed
apart.

    python bench/calib_stream.py --gib 2 --batch 256
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHAPE = (4, 32, 32)


def _rss_mib() -> dict:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {k: int(status[k].split()[0]) / 1024 for k in ("RssAnon", "RssFile")}


def phase(kind: str, folder: str, n: int, batch: int) -> dict:
    import torch

    from pipeline.calibration import CalibrationWriter, _write_manifest, load_calibration

    base = _rss_mib()
    peak = dict(base)

    def sample():
        for k, v in _rss_mib().items():
            peak[k] = max(peak[k], v)

    t0 = time.time()
    if kind == "write":
        w = CalibrationWriter(Path(folder) / "calib.safetensors", n, SHAPE)
        g = torch.Generator().manual_seed(0)
        for i in range(0, n, batch):
            b = min(batch, n - i)
            w.write(torch.randn(b, *SHAPE, generator=g), torch.full((b,), 999 - i % 1000), torch.zeros(b),
                    torch.zeros(b))
            sample()
        w.close()
        _write_manifest(Path(folder), {"timesteps": [999]}, n, SHAPE)
    else:
        calib = load_calibration(folder)
        total = 0.0
        for x, _, _ in calib.batches(batch, shuffle=True, seed=0):
            total += float(x.abs().mean())
            sample()
    return {"phase": kind, "anon": peak["RssAnon"] - base["RssAnon"], "file": peak["RssFile"] - base["RssFile"],
            "seconds": time.time() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, default=2.0)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--phase", choices=["write", "read"], help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    a = p.parse_args()
    n = int(a.gib * (1 << 30)) // (4 * SHAPE[0] * SHAPE[1] * SHAPE[2])
    if a.phase:
        print(json.dumps(phase(a.phase, a.folder, n, a.batch)))
        return
    size_mib = n * 4 * SHAPE[0] * SHAPE[1] * SHAPE[2] / (1 << 20)
    with tempfile.TemporaryDirectory() as folder:
        print(f"calibration set: {n} inputs of {SHAPE}, {size_mib:.0f} MiB; chunks of {a.batch}")
        for kind in ("write", "read"):
            out = subprocess.run([sys.executable, __file__, "--gib", str(a.gib), "--batch", str(a.batch),
                                  "--phase", kind, "--folder", folder], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{kind:5s}: peak anonymous memory above baseline {r['anon']:7.1f} MiB ({r['anon'] / size_mib:.3f} x "
                  f"the set); mapped file pages {r['file']:7.1f} MiB; {r['seconds']:.1f} s")


if __name__ == "__main__":
    main()
