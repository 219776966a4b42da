#!/usr/bin/env python
"""What the CPU-numerics choices cost (pipeline/__init__.py, pipeline/numerics.py): for each oneDNN ISA cap,
whether torch's own int8 matrix product is exact; the exact float64 replacement's time against oneDNN's
int8 kernel and the float product; and a default-size UNet training step and forward with convolutions in
oneDNN (capped at AVX2, the pinned choice) vs routed around it (`torch.backends.mkldnn.enabled = False`: im2col
+ MKL, covered by the other two pins). Each configuration runs in a fresh process (oneDNN reads its cap once).

    python bench/cpu_numerics.py [--threads 1]
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_INT = r"""
import json, os, time, torch
torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
g = torch.Generator().manual_seed(0)
a = torch.randint(-128, 128, (64, 256), dtype=torch.int8, generator=g)
b = torch.randint(-128, 128, (256, 128), dtype=torch.int8, generator=g)
err = int((torch._int_mm(a, b).long() - a.long() @ b.long()).abs().max())
out = {"cap": os.environ.get("ONEDNN_MAX_CPU_ISA", "(none)"), "int_mm_max_error": err}
if os.environ.get("BENCH_TIME"):
    a = torch.randint(-128, 128, (512, 1152), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (1152, 1152), dtype=torch.int8, generator=g)
    def best(f):
        f(); ts = []
        for _ in range(5):
            t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
        return min(ts) * 1e3
    out["onednn_int8_ms"] = best(lambda: torch._int_mm(a, b))
    import pipeline.numerics as n
    out["exact_fp64_ms"] = best(lambda: n.exact_int_mm(a, b))
    af, bf = a.float(), b.float()
    out["float32_ms"] = best(lambda: af @ bf)
print("RESULT " + json.dumps(out))
"""

_CONV = r"""
import json, os, sys, time, torch
import pipeline  # the project's pins
torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
if os.environ["BENCH_MKLDNN"] == "0":
    torch.backends.mkldnn.enabled = False
from pipeline.config import BackboneModel
from pipeline.models import build_backbone
bb = build_backbone("unet", BackboneModel(), 8, 1, 10, seed=0)
x = torch.randn(64, 1, 8, 8); t = torch.randint(0, 1000, (64,)); y = torch.randint(0, 10, (64,))
def step():
    bb(x, t, y).square().mean().backward()
for _ in range(3): step()
t0 = time.perf_counter()
for _ in range(20): step()
train = (time.perf_counter() - t0) / 20 * 1e3
with torch.no_grad():
    for _ in range(3): bb(x, t, y)
    t0 = time.perf_counter()
    for _ in range(20): bb(x, t, y)
    fwd = (time.perf_counter() - t0) / 20 * 1e3
print("RESULT " + json.dumps({"mkldnn": os.environ["BENCH_MKLDNN"], "train_step_ms": train, "forward_ms": fwd}))
"""


def _run(code: str, env_extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")}
    env.update(env_extra)
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(lines[-1][7:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", default="1")
    args = ap.parse_args()
    pins = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "BENCH_THREADS": args.threads}
    print("torch._int_mm (torch's own kernel, no pipeline import), 64x256x128 random int8:")
    for cap in (None, "AVX2", "AVX512_CORE", "AVX512_CORE_VNNI"):
        r = _run(_INT, {**pins, **({"ONEDNN_MAX_CPU_ISA": cap} if cap else {})})
        print(f"  ONEDNN_MAX_CPU_ISA={r['cap']:<17} max |error| = {r['int_mm_max_error']}")
    r = _run(_INT, {**pins, "BENCH_TIME": "1"})
    print(f"512x1152x1152, best of 5, {args.threads} thread(s), no cap: oneDNN int8 {r['onednn_int8_ms']:.1f} ms, "
          f"exact float64 {r['exact_fp64_ms']:.1f} ms ({r['exact_fp64_ms'] / r['onednn_int8_ms']:.1f}x), "
          f"float32 product {r['float32_ms']:.1f} ms")
    print("default-size UNet (params.yaml), batch 64, pinned numerics:")
    res = {m: _run(_CONV, {**pins, "ONEDNN_MAX_CPU_ISA": "AVX2", "BENCH_MKLDNN": m}) for m in ("1", "0")}
    for m, r in res.items():
        print(f"  convolutions {'in oneDNN (AVX2 cap)' if m == '1' else 'around oneDNN (im2col + MKL)':<28} "
              f"train step {r['train_step_ms']:.1f} ms, forward {r['forward_ms']:.1f} ms")
    print(f"  cost of routing around oneDNN: train step x{res['0']['train_step_ms'] / res['1']['train_step_ms']:.2f}, "
          f"forward x{res['0']['forward_ms'] / res['1']['forward_ms']:.2f}")


if __name__ == "__main__":
    main()
