#!/usr/bin/env python
"""What the published denoisers cost here: four real diffusion backbones built at their published
architecture with random weights (timing, memory and MACs do not depend on the weights), each wrapped in
``pipeline.models.DiffusionBackbone``, float32 on the CPU, eval mode, under ``torch.no_grad()``.

Architectures (the ``config.json`` of each Hugging Face repository; the diffusers class named):
  ddpm    google/ddpm-cifar10-32: UNet2DModel, 32x32x3 pixels, blocks (128, 256, 256, 256), 2 layers per block,
          attention at the 16x16 level, unconditional (~35.7 M parameters).
  dit     facebook/DiT-XL-2-256: DiTTransformer2DModel, 28 layers, 16 heads x 72, patch 2 on 32x32x4 latents,
          1000 classes, learned sigma (8 output channels) (~675 M); classifier-free guidance 4.0.
  pixart  PixArt-alpha/PixArt-XL-2-512x512: PixArtTransformer2DModel, 28 layers, 16 heads x 72, patch 2 on
          64x64x4 latents, T5 captions (4096 channels, 120 tokens), adaLN-single, no size conditioning;
          guidance 4.5.
  sd      runwayml/stable-diffusion-v1-5 (unet/): UNet2DConditionModel, 64x64x4 latents, blocks
          (320, 640, 1280, 1280), CLIP captions (77 tokens x 768) (~860 M); guidance 7.5.
Text models get random caption embeddings for K prompts plus the null caption
(``pipeline.models.attach_caption_embeddings``; PixArt with T5's attention mask: the first 10 tokens valid).
A guided call runs the conditional and unconditional branches as one batch of 2B.

Measured per config, each in a fresh process (peak RSS is process-wide):
- parameters of the denoiser (checked against the published count; diffusers' DiT gives each of its 28
  blocks its own copy of the timestep + class embedder, 749.8 M in all, so the check uses the 674.8 M unique);
- MACs of one network evaluation of one sample (``pipeline.quant.cost.count_macs``, guidance off);
- seconds per denoiser call ``backbone(x, t, labels)`` at each ``--batches`` size, FP and after naive W8A8
  (``pipeline.api.quantize(bb, "naive", "W8A8", calib, calib_batches=1)``: fake-quant modules, explicit
  quantized attention): median of up to ``--reps`` calls after one warm-up call; fewer calls when the warm-up
  shows that ``--reps`` would exceed ``--cell-budget`` seconds, and only the warm-up call (marked ``*``)
  when it alone exceeds it. A batch is skipped (with the reason) when, projected linearly from the first
  batch's call, its call would take longer than ``--max-call-s`` (default 120 s: on 2 cores a guided
  batch-8 call of PixArt or SD takes minutes) or its RSS (activation memory x batch) would exceed
  ``--mem-limit-gb`` or the memory available (the fake-quant attention materialises the score matrix:
  SD's 4096-token self-attention at batch 8, guided, is 8.6 GB per copy);
- peak RSS (``pipeline.runner.PeakMemory``) of collecting a tiny calibration set (1 trajectory, 2 DDIM
  steps, both kept) and of the naive quantize call (which deep-copies the backbone, so holds two copies);
- calibration bytes per stored input (x_t in float32 plus int64 t, label and step index, as
  ``CalibrationSet`` holds them), and for the calibration size of the model's preset (``presets/*.args``,
  trajectories x kept timesteps): 5120 for DDPM CIFAR-10, 6400 for DiT-XL/2 256, 2560 for PixArt-alpha,
  3200 for SD. A text
  model's captions live in the backbone's caption table, not in the calibration set: their bytes per
  prompt are reported separately.
- a projection (not a measurement) of the GPU time of each model's full evaluation protocol:
  samples x sampler steps x (2 if guided) x MACs x 2 FLOP / ``--gpu-tflops`` (default 200 TFLOP/s, an
  assumed sustained rate: an H100's dense BF16 peak is ~990 TFLOP/s). Protocols: DDPM CIFAR-10 50 000
  samples x 100 DDIM steps; DiT-XL/2 50 000 x 250 DDPM steps, guided; PixArt-alpha 10 000 x 20
  DPM-Solver steps, guided; SD 1.x 10 000 x 50 PLMS steps, guided (the presets' evaluation sizes). Work outside the matmuls and
  convolutions (norms, softmax, elementwise), the VAE decoder and the text encoder are not counted.

Run (about 15-20 minutes on 2 cores for all four with the defaults; ``--max-call-s 0`` adds the batch-8
calls of PixArt and SD, several minutes each):
    python bench/real_configs.py [--configs ddpm,dit,pixart,sd] [--batches 1,8] [--reps 3]
        [--cell-budget 30] [--max-call-s 120] [--threads 2] [--gpu-tflops 200] [--mem-limit-gb 20] [--json OUT]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

K_PROMPTS = 4
T5_VALID_TOKENS = 10
CALIB_META_BYTES = 3 * 8  # int64 t, label and step index per stored input

CONFIGS = {
    "ddpm": {
        "title": "DDPM CIFAR-10 (google/ddpm-cifar10-32)", "kind": "unet", "conditioning": "none",
        "num_classes": 1, "sample_shape": (3, 32, 32), "guidance": 1.0, "expected_params_m": 35.7,
        "calib_inputs": 5120, "protocol": (50_000, 100, "DDIM"),
    },
    "dit": {
        "title": "DiT-XL/2 256 (facebook/DiT-XL-2-256)", "kind": "dit", "conditioning": "class",
        "num_classes": 1000, "sample_shape": (4, 32, 32), "guidance": 4.0, "expected_params_m": 675.0,
        "calib_inputs": 6400, "protocol": (50_000, 250, "DDPM"),
    },
    "pixart": {
        "title": "PixArt-alpha 512 (PixArt-alpha/PixArt-XL-2-512x512)", "kind": "pixart", "conditioning": "text",
        "num_classes": K_PROMPTS, "sample_shape": (4, 64, 64), "guidance": 4.5, "expected_params_m": None,
        "captions": (120, 4096, True), "calib_inputs": 2560, "protocol": (10_000, 20, "DPM-Solver"),
    },
    "sd": {
        "title": "Stable Diffusion 1.x UNet (runwayml/stable-diffusion-v1-5)", "kind": "unet",
        "conditioning": "text", "num_classes": K_PROMPTS, "sample_shape": (4, 64, 64), "guidance": 7.5,
        "expected_params_m": 860.0, "captions": (77, 768, False), "calib_inputs": 3200,
        "protocol": (10_000, 50, "PLMS"),
    },
}


def _build_net(name: str):
    import diffusers

    if name == "ddpm":
        return diffusers.UNet2DModel(
            sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
            layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), attention_head_dim=None,
            norm_num_groups=32, norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1)
    if name == "dit":
        return diffusers.DiTTransformer2DModel(
            num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
            sample_size=32, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero")
    if name == "pixart":
        return diffusers.PixArtTransformer2DModel(
            num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
            cross_attention_dim=1152, caption_channels=4096, sample_size=64, patch_size=2,
            norm_type="ada_norm_single", use_additional_conditions=False)
    if name == "sd":
        return diffusers.UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, cross_attention_dim=768,
            block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    raise ValueError(f"unknown config {name!r}")


def _build_backbone(name: str):
    import torch

    from pipeline.models import DiffusionBackbone, attach_caption_embeddings

    c = CONFIGS[name]
    torch.manual_seed(0)
    net = _build_net(name)
    bb = DiffusionBackbone(net, c["kind"], c["num_classes"], c["sample_shape"], conditioning=c["conditioning"],
                           guidance_scale=1.0)
    if "captions" in c:
        length, channels, masked = c["captions"]
        emb = torch.randn(K_PROMPTS + 1, length, channels)
        mask = None
        if masked:
            mask = torch.zeros(K_PROMPTS + 1, length, dtype=torch.long)
            mask[:, :T5_VALID_TOKENS] = 1
        attach_caption_embeddings(bb, emb, mask)
    bb.set_guidance(c["guidance"])
    return bb.eval()


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _inputs(bb, batch: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *bb.sample_shape, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, bb.num_classes, (batch,), generator=g)
    return x, t, y


def _time_cells(bb, batches, reps: int, budget: float, mem_limit_mb: float, max_call_s: float, log) -> dict:
    """{batch: cell}; a cell is {"s": seconds per call, "n": timed calls, "warmup_only": bool,
    "peak_rss_mb": ...} or {"error": why}. Batches in the order given; the first one run sets the
    per-sample time and activation memory from which the later ones are projected (and maybe skipped)."""
    import gc

    import psutil
    import torch

    from pipeline.runner import PeakMemory

    cells = {}
    act_mb_per_sample = None  # activation memory per sample, from the first batch run
    s_per_sample = None
    for b in batches:
        base = _rss_mb()
        why = []
        if s_per_sample is not None and max_call_s > 0 and s_per_sample * b > max_call_s:
            why.append(f"projected ~{s_per_sample * b:.0f} s per call (linear in the batch) > --max-call-s {max_call_s:g}")
        if act_mb_per_sample is not None:
            projected = base + act_mb_per_sample * b
            limit = min(mem_limit_mb, psutil.virtual_memory().available / 2**20 + base)
            if projected > limit:
                why.append(f"projected RSS {projected / 1024:.1f} GiB > limit {limit / 1024:.1f} GiB")
        if why:
            cells[b] = {"error": "skipped: " + "; ".join(why)}
            log(f"    batch {b}: {cells[b]['error']}")
            continue
        try:
            x, t, y = _inputs(bb, b)
            with torch.no_grad(), PeakMemory("cpu") as pm:
                t0 = time.perf_counter()
                bb(x, t, y)
                warm = time.perf_counter() - t0
            n = 0 if warm > budget else max(1, min(reps, int(budget // max(warm, 1e-9))))
            times = []
            with torch.no_grad():
                for _ in range(n):
                    t0 = time.perf_counter()
                    bb(x, t, y)
                    times.append(time.perf_counter() - t0)
            per_sample = max(pm.peak_mb - base, 0.0) / b
            act_mb_per_sample = per_sample if act_mb_per_sample is None else max(act_mb_per_sample, per_sample)
            if s_per_sample is None:
                s_per_sample = (statistics.median(times) if times else warm) / b
            cells[b] = {"s": statistics.median(times) if times else warm, "n": len(times), "times": times,
                        "warmup_only": not times, "warmup_s": warm, "peak_rss_mb": pm.peak_mb}
            log(f"    batch {b}: {cells[b]['s']:.3f} s/call ({len(times)} timed, warm-up {warm:.2f} s), "
                f"peak RSS {pm.peak_mb:.0f} MB")
            del x, t, y
        except Exception as exc:  # report the cell and go on
            cells[b] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            log(f"    batch {b}: {cells[b]['error']}")
        gc.collect()
    return cells


def emit(out: dict) -> None:
    """The results so far, as the parent reads them (the last RESULT line wins: a worker killed later,
    e.g. for memory, still reports what it measured)."""
    print("RESULT " + json.dumps(out), flush=True)


def worker(name: str, args) -> dict:
    import pipeline  # noqa: F401 - the project's CPU-numerics pins, before torch runs anything
    import gc

    import torch

    from pipeline.api import quantize
    from pipeline.calibration import collect_calibration
    from pipeline.config import CalibrateConfig, DiffusionConfig, SamplingConfig
    from pipeline.quant.cost import count_macs
    from pipeline.runner import PeakMemory

    torch.set_num_threads(args.threads)

    def log(msg):
        print(f"[{name} {time.perf_counter() - start:6.0f}s] {msg}", file=sys.stderr, flush=True)

    start = time.perf_counter()
    load0 = os.getloadavg()[0]
    c = CONFIGS[name]
    batches = [int(b) for b in args.batches.split(",")]
    mem_limit_mb = args.mem_limit_gb * 1024
    out = {"config": name, "title": c["title"], "sample_shape": list(c["sample_shape"]), "guidance": c["guidance"],
           "torch_threads": torch.get_num_threads(), "errors": {}}

    def step(key, fn):
        try:
            return fn()
        except Exception as exc:  # report the cell and go on
            out["errors"][key] = f"{type(exc).__name__}: {exc}"[:300]
            log(f"{key} failed: {out['errors'][key]}")
            return None

    bb = _build_backbone(name)
    out["rss_after_build_mb"] = _rss_mb()
    n_params = sum(p.numel() for p in bb.net.parameters())
    out["params_m"] = n_params / 1e6
    # diffusers' DiT gives every block its own copy of the timestep + class embedder (the original DiT shares
    # one), so its tensors hold 27 duplicates; the published count is of the unique parameters
    dup = (sum(p.numel() for blk in bb.net.transformer_blocks[1:] for p in blk.norm1.emb.parameters())
           if name == "dit" else 0)
    out["params_unique_m"] = (n_params - dup) / 1e6
    exp = c["expected_params_m"]
    out["params_check"] = ("n/a" if exp is None else ("ok" if abs(out["params_unique_m"] - exp) <= 0.01 * exp
                                                      else f"MISMATCH (expected ~{exp} M)"))
    log(f"built {type(bb.net).__name__}: {out['params_m']:.2f} M parameters ({out['params_unique_m']:.2f} M "
        f"without duplicated embedders; {out['params_check']}), RSS {out['rss_after_build_mb']:.0f} MB")
    if "captions" in c:
        length, channels, _ = c["captions"]
        out["caption_bytes_per_prompt"] = length * channels * 4

    def macs():
        x, t, y = _inputs(bb, 1)
        g = bb.guidance_scale
        bb.guidance_scale = 1.0  # one network evaluation (the guided call is two)
        try:
            m = count_macs(bb, lambda: bb(x, t, y))
        finally:
            bb.guidance_scale = g
        return sum(m.values())
    out["macs_per_eval"] = step("macs", macs)
    emit(out)
    if out["macs_per_eval"] is not None:
        samples, steps, sampler = c["protocol"]
        evals = samples * steps * (2 if c["guidance"] > 1 else 1)
        flop = evals * out["macs_per_eval"] * 2
        out["protocol"] = {"samples": samples, "steps": steps, "sampler": sampler, "guided": c["guidance"] > 1,
                           "network_evals": evals, "flop": flop, "gpu_tflops_assumed": args.gpu_tflops,
                           "projected_gpu_hours": flop / (args.gpu_tflops * 1e12) / 3600}
        log(f"{out['macs_per_eval'] / 1e9:.2f} GMAC per evaluation; protocol {flop:.3g} FLOP -> "
            f"{out['protocol']['projected_gpu_hours']:.2f} GPU-h at {args.gpu_tflops} TFLOP/s (projection)")

    log("FP timing")
    out["fp"] = _time_cells(bb, batches, args.reps, args.cell_budget, mem_limit_mb, args.max_call_s, log)
    emit(out)
    gc.collect()

    def calibrate():
        with PeakMemory("cpu") as pm:
            rss0 = _rss_mb()
            t0 = time.perf_counter()
            calib = collect_calibration(bb, CalibrateConfig(n_samples=1, n_timesteps=2, batch_size=1),
                                        DiffusionConfig(), SamplingConfig(steps=2))
            dt = time.perf_counter() - t0
        stored = (calib.x.numel() * calib.x.element_size() + calib.t.numel() * calib.t.element_size()
                  + calib.labels.numel() * calib.labels.element_size()
                  + calib.step_index.numel() * calib.step_index.element_size())
        per_input = stored / len(calib)
        out["calib"] = {"n_inputs": len(calib), "seconds": dt, "rss_before_mb": rss0, "peak_rss_mb": pm.peak_mb,
                        "bytes_per_input": per_input, "protocol_inputs": c["calib_inputs"],
                        "protocol_bytes": per_input * c["calib_inputs"]}
        log(f"calibration: {len(calib)} inputs in {dt:.1f} s, peak RSS {pm.peak_mb:.0f} MB "
            f"(from {rss0:.0f}), {per_input:.0f} B per input")
        return calib
    calib = step("calib", calibrate)
    emit(out)

    fq = None
    if calib is not None:
        def quant():
            gc.collect()
            with PeakMemory("cpu") as pm:
                rss0 = _rss_mb()
                t0 = time.perf_counter()
                res = quantize(bb, "naive", "W8A8", calib, device="cpu", calib_batches=1)
                dt = time.perf_counter() - t0
            out["quantize"] = {"seconds": dt, "rss_before_mb": rss0, "peak_rss_mb": pm.peak_mb,
                               "n_quant_layers": res.info.get("n_quant_layers")}
            log(f"naive W8A8 quantize: {dt:.1f} s, peak RSS {pm.peak_mb:.0f} MB (from {rss0:.0f}), "
                f"{out['quantize']['n_quant_layers']} quantized layers")
            return res.backbone.eval()
        fq = step("quantize", quant)
        emit(out)
    bb = calib = None  # free the FP model before timing the quantized one
    gc.collect()
    if fq is not None:
        log(f"fake-quant timing (FP copy freed, RSS {_rss_mb():.0f} MB)")
        out["fq"] = _time_cells(fq, batches, args.reps, args.cell_budget, mem_limit_mb, args.max_call_s, log)
    else:
        out["fq"] = {b: {"error": "no quantized model"} for b in batches}
    out["wall_s"] = time.perf_counter() - start
    out["load_avg_1min"] = [load0, os.getloadavg()[0]]
    return out


def _run_config(name: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--batches", args.batches,
           "--reps", str(args.reps), "--cell-budget", str(args.cell_budget), "--threads", str(args.threads),
           "--gpu-tflops", str(args.gpu_tflops), "--mem-limit-gb", str(args.mem_limit_gb),
           "--max-call-s", str(args.max_call_s)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=None, text=True, cwd=ROOT)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    out = json.loads(lines[-1][7:]) if lines else {"config": name, "title": CONFIGS[name]["title"], "errors": {}}
    if proc.returncode != 0:
        rc = proc.returncode
        out["errors"]["process"] = ("killed (out of memory?)" if rc in (-9, 137) else f"exit status {rc}") + \
            " before it finished; later cells missing"
    return out


def _cell(r: dict, key: str, b: int) -> str:
    cell = r.get(key, {}).get(str(b), r.get(key, {}).get(b))
    if cell is None:
        return "-"
    if "error" in cell:
        return "skipped" if cell["error"].startswith("skipped") else "FAILED"
    return f"{cell['s']:.3f}{'*' if cell['warmup_only'] else ''}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {', '.join(CONFIGS)}")
    ap.add_argument("--batches", default="1,8", help="batch sizes of the timed calls (default 1,8)")
    ap.add_argument("--reps", type=int, default=3, help="timed calls per cell after the warm-up (at most)")
    ap.add_argument("--cell-budget", type=float, default=30.0,
                    help="seconds of timed calls per cell; fewer reps (or only the warm-up) beyond it")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--gpu-tflops", type=float, default=200.0,
                    help="assumed sustained GPU throughput for the protocol projection (default 200)")
    ap.add_argument("--mem-limit-gb", type=float, default=20.0, help="skip a batch projected to exceed this RSS")
    ap.add_argument("--max-call-s", type=float, default=120.0,
                    help="skip a batch whose call is projected (linearly from the first batch) to take longer; "
                         "0 = no limit")
    ap.add_argument("--json", type=Path, default=None, help="write all results to this file")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        emit(worker(args.worker, args))
        return

    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        ap.error(f"--configs: unknown {unknown}; choose from {list(CONFIGS)}")
    batches = [int(b) for b in args.batches.split(",")]
    t_start = time.perf_counter()
    results = []
    for n in names:
        print(f"== {CONFIGS[n]['title']} (fresh process)", file=sys.stderr, flush=True)
        results.append(_run_config(n, args))

    print(f"\nPublished architectures, random weights, float32 CPU, {args.threads} torch thread(s); seconds per "
          f"denoiser call backbone(x, t, labels) (guided models run both branches: 2B samples), median of up to "
          f"{args.reps} calls after a warm-up (* = warm-up call only, > {args.cell_budget:g} s; skipped: see "
          f"notes). FQ = naive W8A8 fake-quant. Peak RSS of the whole process.")
    head = f"{'config':<7} {'params M':>9} {'unique M':>9} {'check':>6} {'GMAC/eval':>10}"
    for b in batches:
        head += f" {f'FP s b{b}':>10} {f'FQ s b{b}':>10}"
    head += f" {'calib peak MB':>13} {'quant peak MB':>13}"
    print(head)
    print("-" * len(head))
    for r in results:
        name = r["config"]
        row = f"{name:<7} "
        row += f"{r['params_m']:>9.2f} {r['params_unique_m']:>9.2f} " if "params_m" in r else f"{'-':>9} {'-':>9} "
        chk = r.get("params_check", "-")
        row += f"{'ok' if chk == 'ok' else ('n/a' if chk == 'n/a' else 'BAD'):>6} "
        row += f"{r['macs_per_eval'] / 1e9:>10.2f}" if r.get("macs_per_eval") else f"{'-':>10}"
        for b in batches:
            row += f" {_cell(r, 'fp', b):>10} {_cell(r, 'fq', b):>10}"
        cal, qu = r.get("calib", {}), r.get("quantize", {})
        row += f" {cal['peak_rss_mb']:>13.0f}" if cal else f" {'-':>13}"
        row += f" {qu['peak_rss_mb']:>13.0f}" if qu else f" {'-':>13}"
        print(row)

    print(f"\nCalibration storage (float32 x_t + 3 int64 per input; protocol sizes assumed) and projected GPU time "
          f"of the evaluation protocol at an ASSUMED sustained {args.gpu_tflops:g} TFLOP/s (projection, not measured)")
    head2 = (f"{'config':<7} {'B/input':>9} {'inputs':>7} {'calib MB':>9} {'caption B/prompt':>16} "
             f"{'protocol':>28} {'net evals':>10} {'PFLOP':>9} {'GPU h':>7}")
    print(head2)
    print("-" * len(head2))
    for r in results:
        cal, pr = r.get("calib"), r.get("protocol")
        row = f"{r['config']:<7} "
        row += (f"{cal['bytes_per_input']:>9.0f} {cal['protocol_inputs']:>7} {cal['protocol_bytes'] / 2**20:>9.1f} "
                if cal else f"{'-':>9} {'-':>7} {'-':>9} ")
        cap = r.get("caption_bytes_per_prompt")
        row += f"{cap if cap else '-':>16} "
        if pr:
            proto = f"{pr['samples']} x {pr['steps']} {pr['sampler']}{' x2 cfg' if pr['guided'] else ''}"
            row += (f"{proto:>28} {pr['network_evals']:>10.3g} {pr['flop'] / 1e15:>9.0f} "
                    f"{pr['projected_gpu_hours']:>7.2f}")
        else:
            row += f"{'-':>28} {'-':>10} {'-':>9} {'-':>7}"
        print(row)

    notes = []
    for r in results:
        for k, v in r.get("errors", {}).items():
            notes.append(f"{r['config']} {k}: {v}")
        for key in ("fp", "fq"):
            for b, cell in r.get(key, {}).items():
                if "error" in cell:
                    notes.append(f"{r['config']} {key.upper()} batch {b}: {cell['error']}")
        if r.get("params_unique_m") is not None and r["params_unique_m"] != r["params_m"]:
            notes.append(f"{r['config']} parameters: {r['params_m']:.2f} M in diffusers' layout, which copies the "
                         f"timestep + class embedder into every block; {r['params_unique_m']:.2f} M unique")
        if "load_avg_1min" in r:
            notes.append(f"{r['config']} 1-min load average at start / end: {r['load_avg_1min'][0]:.2f} / "
                         f"{r['load_avg_1min'][1]:.2f} (other processes share the {os.cpu_count()} cores)")
        if r.get("params_check", "ok") not in ("ok", "n/a"):
            notes.append(f"{r['config']} parameters {r['params_m']:.2f} M: {r['params_check']}")
    if notes:
        print("\nNotes:")
        for n in notes:
            print(f"  {n}")
    total = time.perf_counter() - t_start
    print(f"\ntotal wall time {total:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items() if k != "worker"},
                                         "total_wall_s": total, "results": results}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
