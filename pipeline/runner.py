"""Runs one method family: every variant x bit setting x backbone of its params section.

One DVC item per family (``quantize@<family>``) calls :func:`run_family`. Each *job* (variant, setting,
backbone) is its own MLflow run and writes one model folder in the single output layout

    data/quantized/<family>/<setting>/<variant>/<backbone>/seed<s>/
        packed.safetensors, quant_spec.json   the core's real low-bit format (what evaluate loads)
        info.json                             job metadata, the method's numbers, cache key (no clock readings)
        job.timing.json                       wall-clock seconds and peak memory (untracked side file)
        init/                                 (fine-tuned families) the first phase's student checkpoint

and the family folder gets a ``manifest.json`` listing every job with its status: the one place
``evaluate`` and ``report`` learn which models exist (and which comparison tables the family wants).

Caching and reruns. A job's key hashes everything its result depends on: family, variant,
setting, backbone, the variant's config (for the first phase without the fine-tune sub-config), the
diffusion / sampling params, the FP model, the calibration file and the code the job can run
(:func:`job_code_key`: the family's module and the runner, with what they import). A job whose
previous output (kept, the DVC output is ``persist: true``) has the same key is reused, not recomputed;
a fine-tuned job whose first-phase key is unchanged reuses its ``init/`` and only fine-tunes. So a sweep
that adds one setting computes only that setting, and changing ``<family>.<finetune_field>`` never
redoes the first phase.

Failures. A job that raises becomes a manifest entry with ``status: failed`` and the error; its MLflow run
ends FAILED; its siblings still run; the new output folder is still put in place (with the failed job's
``init/`` if that phase finished) and :func:`run_family` returns the failures so the stage exits non-zero
and DVC does not record the item as complete. ``dvc repro`` then reruns the item, which reuses every
finished job and recomputes only the failed one.
"""
from __future__ import annotations

import logging
import shutil
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .config import BitSetting, merge_dicts, DiffusionConfig, ModelConfig, QuantizeConfig, SamplingConfig, TrackingConfig, \
    load_section, read_params, to_dict
from .io import atomic_dir, data_hash, read_json, split_timings, tree_hash, write_json

log = logging.getLogger("pipeline")
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class Job:
    family: str
    variant: str
    setting: BitSetting
    backbone: str
    seed: int = 0

    @property
    def rel(self) -> Path:
        return Path(self.setting.name) / self.variant / self.backbone / f"seed{self.seed}"

    @property
    def label(self) -> str:
        return f"{self.family}/{self.variant}/{self.setting.name}@{self.backbone}#seed{self.seed}"


def plan(family, matrix) -> list[Job]:
    """Jobs of a family section, in params order: settings, variants, backbones, then method seeds."""
    return [Job(family.name, v, s, b, seed) for s in matrix.bit_settings for v in matrix.variants
            for b in matrix.backbones for seed in matrix.seeds_of(v)]


def seeded_config(cfg, seed: int):
    """The family config of method seed ``seed``: every int field named ``seed`` (nested sub-configs
    included, e.g. ``mpq.qat.seed``, ``fp4dit.recon.seed``) is offset by ``seed``. Seed 0 is the
    config as written; seed s draws other calibration inputs, another batch order / trajectory set and
    other random inits, everything else equal."""
    import dataclasses

    if not dataclasses.is_dataclass(cfg):
        return cfg
    changes = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.name == "seed" and isinstance(v, int) and not isinstance(v, bool):
            changes[f.name] = v + int(seed)
        elif dataclasses.is_dataclass(v):
            changes[f.name] = seeded_config(v, seed)
    return dataclasses.replace(cfg, **changes) if changes else cfg


def job_code_key(family) -> str:
    """The code part of a job's cache key: the sources that the family's own module(s) (its phases'
    modules) and this runner can execute (:func:`pipeline.codedeps.code_key`). Another family's module, the
    report, the evaluation or the search leave it unchanged; the quantization core, the family's module or
    the runner change it."""
    import sys

    from .codedeps import code_key

    mods = {sys.modules[fn.__module__].__file__ for fn in (family.quantize, family.finetune, family.check_setting,
                                                         family.extra_inputs) if fn is not None}
    return code_key(*sorted(mods), __file__)


class PeakMemory:
    """Context measuring the method's peak memory in MB: CUDA max allocated (reset at entry) on a GPU;
    on CPU the peak resident set size of the process, sampled every ``interval`` s by a thread (psutil;
    without psutil the process-lifetime ``ru_maxrss``, which earlier jobs of the same process can set)."""

    def __init__(self, device, interval: float = 0.05):
        import torch

        self.device = torch.device(device)
        self.interval = interval
        self.peak_mb: Optional[float] = None
        self.kind = ""
        self._stop = threading.Event()
        self._thread = None
        self._peak = 0

    def _rss(self) -> int:
        return self._proc.memory_info().rss

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, self._rss())

    def __enter__(self):
        if self.device.type == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda_max_allocated"
            return self
        try:
            import psutil

            self._proc = psutil.Process()
            self._peak = self._rss()
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
            self.kind = "cpu_peak_rss"
        except ImportError:  # pragma: no cover - psutil comes with the pinned environment
            self.kind = "cpu_ru_maxrss"
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            import torch

            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, self._rss())
            self.peak_mb = self._peak / 2**20
        else:  # pragma: no cover
            import resource

            self.peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return None


JOB_TIMING = "job.timing.json"  # a job's wall-clock seconds and peak memory, beside its info.json
REUSE_TIMING = "reuse.timing.json"  # the jobs of the last execution that were reused, beside the manifest


def read_job_info(folder: Path) -> dict:
    """A job folder's ``info.json`` with its timings (``job.timing.json``, when present) merged back in."""
    info = read_json(Path(folder) / "info.json")
    timing = Path(folder) / JOB_TIMING
    return merge_dicts(info, read_json(timing)) if timing.exists() else info


def _numbers(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _save_packed(net, spec, dest: Path, meta: dict) -> None:
    """The core's packed format into ``dest`` without replacing what is already there (``init/``, files
    the method wrote into its workdir): ``save_quantized`` replaces its target folder as a whole."""
    from .quant.packing import save_quantized

    scratch = dest / ".packed"
    save_quantized(net, spec, scratch, extra_meta=meta)
    for f in scratch.iterdir():
        f.replace(dest / f.name)
    scratch.rmdir()


def _reusable(path: Path, key: str) -> bool:
    f = path / "info.json"
    if not f.exists():
        return False
    try:
        return read_json(f).get("key") == key
    except (OSError, ValueError):
        return False


class FamilyRunner:
    """Holds what every job of one family item shares (configs, device, hashes, loaded calibration)."""

    def __init__(self, name: str, params_path: str | Path, fp_root: str | Path, calib_root: str | Path,
                 out: str | Path) -> None:
        from .validation import load_family

        self._args = (name, str(params_path), str(fp_root), str(calib_root), str(out))  # a worker's own runner
        raw = read_params(params_path)
        model = load_section("model", ModelConfig, params_path)
        self.n_workers = load_section("quantize", QuantizeConfig, params_path).n_workers
        self.family, self.matrix, self.cfg = load_family(name, raw, model.backbones)
        self.diffusion = load_section("diffusion", DiffusionConfig, params_path)
        self.sampling = load_section("sampling", SamplingConfig, params_path)
        self.tracking = load_section("tracking", TrackingConfig, params_path)
        self.fp_root, self.calib_root, self.out = Path(fp_root), Path(calib_root), Path(out)
        self.jobs = plan(self.family, self.matrix)
        for b in self.matrix.backbones:
            for path, what in ((self.fp_root / b, f"FP {b} model (stage train_fp@{b})"),
                               (self.calib_root / b, f"calibration set for {b} (stage calibrate@{b})")):
                if not path.exists():
                    raise FileNotFoundError(f"{what} not found at {path}; run `dvc repro` first")
        self._calib: dict[str, Any] = {}
        self._hashes: dict[str, str] = {}
        self._configs: dict[str, Any] = {}
        self.code = job_code_key(self.family)

    # ------------------------------------------------------------------------------------------
    def keys(self, job: Job) -> tuple[str, str]:
        """(first-phase key, final key) of ``job``."""
        b = job.backbone
        if b not in self._hashes:
            extra = self.family.extra_inputs(self.cfg, b) if self.family.extra_inputs else []
            self._hashes[b] = data_hash([tree_hash(self.fp_root / b), tree_hash(self.calib_root / b),
                                         *(tree_hash(p) for p in extra)])
        options = to_dict(self.job_config(job))
        ft_field = self.family.finetune_field
        ft = options.pop(ft_field) if ft_field else None
        base = {"family": job.family, "variant": job.variant, "setting": job.setting.name, "backbone": b,
                "seed": job.seed, "options": options, "inputs": self._hashes[b],
                "diffusion": to_dict(self.diffusion), "sampling": to_dict(self.sampling), "code": self.code}
        key1 = data_hash(base)[:24]
        return key1, (data_hash([key1, ft])[:24] if ft_field else key1)

    def job_config(self, job: Job):
        """The config job ``job`` runs: its variant's (:meth:`Family.config_for`), seeds offset by the
        method seed."""
        if job.variant not in self._configs:
            self._configs[job.variant] = self.family.config_for(job.variant, self.cfg)
        return seeded_config(self._configs[job.variant], job.seed)

    def calibration(self, backbone: str):
        from .calibration import load_calibration

        if backbone not in self._calib:
            self._calib[backbone] = load_calibration(self.calib_root / backbone)
        return self._calib[backbone]

    def context(self, job: Job, run, workdir: Path, device):
        from .methods import MethodContext

        return MethodContext(device=device, run=run, diffusion=self.diffusion, sampling=self.sampling,
                             backbone_name=job.backbone, workdir=workdir)

    # ------------------------------------------------------------------------------------------
    def run(self) -> list[dict]:
        """Run every job; returns the failed manifest entries (empty when all succeeded).

        The jobs run in ``quantize.n_workers`` spawned processes (one model each at a time, results
        collected in job order), every process with one intra-op thread, this one included: a job's
        result does not depend on the worker count or on the machine's core count."""
        import torch

        from .parallel import WorkerPool

        device = "cuda" if torch.cuda.is_available() else "cpu"
        torch.set_num_threads(1)
        n = max(1, min(self.n_workers, len(self.jobs)))
        if n > 1:
            from .tracking import ensure_experiment

            ensure_experiment(self.tracking.experiment, self.tracking.uri)  # the store exists before workers log
            log.info("%s: %d jobs in %d worker processes", self.family.name, len(self.jobs), n)
        entries = []
        with atomic_dir(self.out) as tmp:
            with WorkerPool(n, FamilyRunner, self._args, local=lambda: self) as pool:
                results = pool.imap("run_index", [(k, str(tmp), device) for k in range(len(self.jobs))])
                for i, (job, entry) in enumerate(zip(self.jobs, results), 1):
                    if entry["status"] == "ok":
                        log.info("[%d/%d] %s: %s", i, len(self.jobs), job.label,
                                 "unchanged, reused" if entry["reused"] else "done")
                    else:
                        log.error("[%d/%d] %s FAILED: %s", i, len(self.jobs), job.label, entry["error"])
                    entries.append(entry)
            # which jobs were reused is a fact of this execution, not of the outputs: it goes in a side file
            # that DVC and the cache keys ignore, so a rerun's manifest is byte-identical to a clean run's
            write_json(tmp / REUSE_TIMING, {"reused": [e["path"] for e in entries if e.pop("reused", False)]})
            write_json(tmp / MANIFEST, {
                "version": MANIFEST_VERSION, "family": self.family.name, "description": self.family.description,
                "settings": list(self.matrix.settings), "variants": list(self.matrix.variants),
                "backbones": list(self.matrix.backbones), "seeds": list(self.matrix.seeds),
                "tables": [{**t.as_dict(self.family.name), "settings": list(self.matrix.settings),
                            "variants": list(t.variants) or list(self.matrix.variants)} for t in self.family.tables
                           if t.backbone in self.matrix.backbones],  # a table of a backbone not run: nothing to show
                "models": entries})
        return [e for e in entries if e["status"] != "ok"]

    def run_index(self, k: int, tmp: str, device) -> dict:
        """Run job ``k`` into the new output folder ``tmp``; its manifest entry (a failure is an entry)."""
        job = self.jobs[k]
        entry = {"variant": job.variant, "setting": job.setting.name, "backbone": job.backbone,
                 "seed": job.seed, "wbits": job.setting.wbits, "abits": job.setting.abits, "path": str(job.rel)}
        dest = Path(tmp) / job.rel
        try:
            entry["reused"] = self.run_job(job, dest, device)
            entry["status"] = "ok"
        except Exception as exc:  # one failing variant is a row, not a crash
            log.error("%s FAILED: %s\n%s", job.label, exc, traceback.format_exc())
            entry.update(status="failed", error=f"{type(exc).__name__}: {exc}")
            for p in (dest.iterdir() if dest.exists() else []):  # keep a finished first phase
                if p.name != "init":
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        return entry

    def run_job(self, job: Job, dest: Path, device) -> bool:
        """Produce ``dest`` for ``job``; True when a previous identical result was reused."""
        key1, key = self.keys(job)
        old = self.out / job.rel
        if _reusable(old, key):
            shutil.copytree(old, dest)
            return True
        from .tracking import stage_run

        fam, setting = self.family, job.setting
        tags = {"family": fam.name, "variant": job.variant, "method": job.variant, "setting": setting.name,
                "backbone": job.backbone, "wbits": setting.wbits, "abits": setting.abits, "seed": job.seed}
        params = {**tags, "config": to_dict(self.job_config(job)),
                  "overrides": fam.variant(job.variant).overrides}
        log_file = (Path("data") / "logs" /
                    f"quantize@{job.family}-{job.variant}-{setting.name}@{job.backbone}-seed{job.seed}.log")
        with stage_run("quantize", params=params, tags=tags, experiment=self.tracking.experiment,
                       uri=self.tracking.uri, run_name=job.label, log_file=log_file,
                       inputs=[self.fp_root / job.backbone, self.calib_root / job.backbone]) as run_:
            dest.mkdir(parents=True, exist_ok=True)
            info = (self._finetuned(job, dest, old, key1, run_, device) if fam.finetune
                    else self._calibrated(job, dest, run_, device))
            info.update(family=fam.name, variant=job.variant, method=job.variant, setting=setting.name,
                        backbone=job.backbone, seed=job.seed, wbits=setting.wbits, abits=setting.abits, key=key)
            run_.log_metrics({**_numbers(info), **_numbers(info.get("info", {})),
                              **_numbers(info.get("finetune", {}))})
            info, timing = split_timings(info)  # clock readings out of the tracked (DVC-hashed) file
            write_json(dest / JOB_TIMING, timing)
            write_json(dest / "info.json", info)  # written last: its key marks the folder complete
            run_.log_artifact(dest / "quant_spec.json")
        return False

    def _first_phase(self, job: Job, run_, device, workdir: Path):
        import torch

        from . import models

        cfg = self.job_config(job)
        torch.manual_seed(getattr(cfg, "seed", job.seed))
        backbone = models.load_backbone(self.fp_root / job.backbone, device=device)
        log.info("%s: %s", job.label, self.family.variant(job.variant).description)
        t0 = time.time()
        with PeakMemory(device) as mem:
            result = self.family.quantize(backbone, self.calibration(job.backbone), job.setting, cfg,
                                          self.context(job, run_, workdir, device))
        return result, time.time() - t0, mem

    def _calibrated(self, job: Job, dest: Path, run_, device) -> dict:
        result, seconds, mem = self._first_phase(job, run_, device, dest)
        meta = {"calibration": self.calibration(job.backbone).manifest.get("sha256"), "info": result.info}
        _save_packed(result.backbone.net, result.spec, dest, {"family": job.family, "variant": job.variant})
        return {"quantize_seconds": seconds, "method_seconds": seconds, "peak_memory_mb": mem.peak_mb,
                "peak_memory_kind": mem.kind, **meta}

    def _finetuned(self, job: Job, dest: Path, old: Path, key1: str, run_, device) -> dict:
        from . import models
        from .quant.checkpoint import load_student, save_student

        init_dir = dest / "init"
        if _reusable(old / "init", key1):
            shutil.copytree(old / "init", init_dir)
            init = read_job_info(init_dir)
            log.info("%s: first phase unchanged, reused", job.label)
        else:
            result, seconds, mem = self._first_phase(job, run_, device, dest)
            save_student(result.backbone.net, result.spec, init_dir, {"family": job.family, "variant": job.variant})
            init = {"key": key1, "init_seconds": seconds, "info": result.info,
                    "peak_memory_mb": mem.peak_mb, "peak_memory_kind": mem.kind,
                    "calibration": self.calibration(job.backbone).manifest.get("sha256")}
            clean, timing = split_timings(init)
            write_json(init_dir / JOB_TIMING, timing)
            write_json(init_dir / "info.json", clean)
            del result
        teacher = models.load_backbone(self.fp_root / job.backbone, device=device)
        student = models.load_backbone(self.fp_root / job.backbone, device=device)
        _, spec, _ = load_student(student.net, init_dir)
        t0 = time.time()
        with PeakMemory(device) as mem:
            ft = self.family.finetune(student, teacher, job.setting, self.job_config(job),
                                      self.context(job, run_, dest, device))
        seconds = time.time() - t0
        _save_packed(student.net, spec, dest, {"family": job.family, "variant": job.variant})
        peaks = [p for p in (init.get("peak_memory_mb"), mem.peak_mb) if isinstance(p, (int, float))]
        return {"init_seconds": init["init_seconds"], "finetune_seconds": seconds,
                "method_seconds": init["init_seconds"] + seconds, "init_peak_memory_mb": init.get("peak_memory_mb"),
                "finetune_peak_memory_mb": mem.peak_mb, "peak_memory_mb": max(peaks) if peaks else None,
                "peak_memory_kind": mem.kind, "calibration": init.get("calibration"),
                "info": init["info"], "finetune": ft}


def run_family(name: str, params_path, fp_root, calib_root, out) -> list[dict]:
    """Validate, then run family ``name``'s jobs into ``out``; returns the failed entries."""
    return FamilyRunner(name, params_path, fp_root, calib_root, out).run()


def read_manifest(family_dir: Path) -> dict:
    path = Path(family_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path} not found (stage quantize@{Path(family_dir).name} writes it)")
    return read_json(path, "family manifest")
