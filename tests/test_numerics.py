"""Integer matrix products stay exact under the project's pinned CPU numerics (pipeline.numerics).

The checks run in fresh processes that import ``pipeline`` exactly as every stage does, because oneDNN reads
its ISA cap once per process and the exact kernel is installed by an import hook."""
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pipeline
from pipeline import numerics

ROOT = Path(pipeline.__file__).resolve().parents[1]

# int8 operands that fill the range: pairs of u8 x s8 products exceed the int16 range, where a kernel that
# sums pairs in 16 bits (oneDNN's int8 path without VNNI) saturates. torch order: torch first, then pipeline
# (the hook must also cover a process that imported torch before pipeline).
_PROBE = r"""
import json, sys
ORDER = sys.argv[1]
if ORDER == "torch-first":
    import torch, pipeline
else:
    import pipeline, torch
from pipeline.methods.peers import probe_int8_kernel, IntMMRecorder
g = torch.Generator().manual_seed(0)
a = torch.randint(-128, 128, (64, 256), dtype=torch.int8, generator=g)
b = torch.randint(-128, 128, (256, 128), dtype=torch.int8, generator=g)
au = torch.randint(0, 256, (32, 512), dtype=torch.uint8, generator=g)
bu = torch.randint(-128, 128, (512, 64), dtype=torch.int8, generator=g)
err = lambda x, y: int((torch._int_mm(x, y).to(torch.int64) - x.to(torch.int64) @ y.to(torch.int64)).abs().max())
out = {"numerics": pipeline.cpu_numerics(), "int_mm": err(a, b), "int_mm_u8": err(au, bu), "peers": {}}
for peer in ("quanto", "torchao"):
    try:
        out["peers"][peer] = probe_int8_kernel(peer)
    except RuntimeError as exc:
        out["peers"][peer] = {"refused": str(exc)}
print("RESULT " + json.dumps(out))
"""


def _fresh(order: str, **env_extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in pipeline.CPU_NUMERICS and k != numerics.ENV_SWITCH}
    env.update(env_extra)
    proc = subprocess.run([sys.executable, "-c", _PROBE, order], env=env, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def _x86_avx2() -> bool:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return platform.machine() in ("x86_64", "AMD64") and " avx2" in flags


@pytest.mark.parametrize("order", ["pipeline-first", "torch-first"])
def test_integer_products_are_exact_under_the_pinned_numerics(order):
    """torch._int_mm (int8 and uint8 left operands) and each peer tool's W8A8 linear layer give the exact
    int64 product on saturating inputs, with the float pins (oneDNN capped at AVX2) in force."""
    out = _fresh(order)
    assert out["numerics"]["ONEDNN_MAX_CPU_ISA"] == "AVX2" and out["numerics"]["INT_MM"] == "exact-fp64"
    assert out["int_mm"] == 0 and out["int_mm_u8"] == 0
    for peer in ("quanto", "torchao"):
        probe = out["peers"][peer]
        assert "refused" not in probe, probe
        assert probe["calls"] >= 1 and probe["max_error"] == 0, (peer, probe)  # the tool's int8 path ran, exactly


def test_without_the_exact_kernel_the_capped_int8_path_is_wrong_and_peers_refuse():
    """The control: torch's own CPU kernel under the AVX2 cap saturates (so the test above can fail), and the
    peers family refuses to score a tool whose probe fails, naming the tool."""
    if not _x86_avx2():
        pytest.skip("the oneDNN AVX2 cap applies to x86-64 processors")
    out = _fresh("pipeline-first", **{numerics.ENV_SWITCH: "0"})
    assert out["numerics"]["INT_MM"] == "torch"
    assert out["int_mm"] > 1000  # 16-bit saturation, not a rounding difference
    for peer, package in (("quanto", "optimum-quanto"), ("torchao", "torchao")):
        msg = out["peers"][peer]["refused"]
        assert package in msg and "wrong on this CPU" in msg and "PIPELINE_EXACT_INT_MM" in msg


def test_exact_int_mm_matches_int64_and_refuses_bad_operands():
    g = torch.Generator().manual_seed(1)
    a = torch.randint(-128, 128, (17, 4096), dtype=torch.int8, generator=g)
    b = torch.full((4096, 3), -128, dtype=torch.int8)  # worst case magnitude: 128 * 128 * 4096 = 2**26
    assert torch.equal(numerics.exact_int_mm(a, b), (a.to(torch.int64) @ b.to(torch.int64)).to(torch.int32))
    assert numerics.exact_int_mm(a, b).dtype == torch.int32
    with pytest.raises(RuntimeError, match="inner sizes"):
        numerics.exact_int_mm(a, b[:100])
    with pytest.raises(RuntimeError, match="int8/uint8 @ int8"):
        numerics.exact_int_mm(a.float(), b)
    with pytest.raises(RuntimeError, match="2-D"):
        numerics.exact_int_mm(a[None], b)


def test_the_exact_kernel_is_installed_in_this_process_and_floats_are_untouched():
    """conftest imports pipeline first, as every stage: the override is live here, and float products do not
    go through it (only aten::_int_mm is replaced)."""
    assert numerics.installed()
    x = torch.randn(8, 16)
    assert torch.equal(torch.mm(x, x.t()), x @ x.t())
