"""MLflow tracking: one run per stage execution, with tags that say which code, params and data made it.

The backend is a SQLite database in the repository (``sqlite:///mlflow.db``; MLflow 3 no longer
accepts the file store). Artifacts go to ``mlartifacts/`` beside it. Both are git-ignored.

Experiments queued with ``dvc exp run --queue`` execute in a temporary copy of the repository under
``.dvc/tmp/exps/``; runs from there are written to the database of the original repository so the
dashboard shows them too.
"""
from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional

from . import cpu_numerics
from .io import data_hash, tree_hash

log = logging.getLogger("pipeline")


def repo_root(start: str | Path | None = None) -> Path:
    """The repository the user works in (also from inside a DVC queue's temporary copy)."""
    here = Path(start or os.getcwd()).resolve()
    parts = here.parts
    for i in range(len(parts) - 2):
        if parts[i] == ".dvc" and parts[i + 1] == "tmp" and parts[i + 2] == "exps":
            return Path(*parts[:i])
    return here


def tracking_uri(uri: str = "sqlite:///mlflow.db") -> str:
    """Resolve the tracking URI; ``MLFLOW_TRACKING_URI`` wins, relative SQLite paths are made
    absolute against :func:`repo_root` so runs never land wherever a process happened to start."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", uri)
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        uri = prefix + str(repo_root() / uri[len(prefix):])
    return uri


def artifact_location() -> str:
    return (repo_root() / "mlartifacts").as_uri()


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=False
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """``{'a': {'b': 1}}`` -> ``{'a.b': 1}`` (lists are kept as their string form)."""
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def setup_logging(log_file: Optional[Path] = None) -> Optional[logging.Handler]:
    """Log progress to stderr (and to ``log_file``), one line per event: readable in CI and nohup.
    Returns the file handler so the caller can detach it when its stage ends."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    if not any(getattr(h, "_pipeline", False) for h in root.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(fmt)
        h._pipeline = True  # type: ignore[attr-defined]
        root.addHandler(h)
    for noisy in ("alembic", "mlflow", "urllib3", "filelock", "fsspec", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if log_file is None:
        return None
    log_file.parent.mkdir(parents=True, exist_ok=True)
    fh = logging.FileHandler(log_file, mode="w")
    fh.setFormatter(fmt)
    root.addHandler(fh)
    return fh


class StageRun:
    """Handle of the MLflow run of one stage execution."""

    def __init__(self, run_id: str, uri: Optional[str] = None) -> None:
        self.run_id = run_id
        self.uri = uri or tracking_uri()  # for a Lightning MLFlowLogger(run_id=..., tracking_uri=...)

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        import mlflow

        clean = {k: float(v) for k, v in flatten(metrics).items() if _is_number(v)}
        if clean:
            mlflow.log_metrics(clean, step=step)

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        import mlflow

        path = Path(path)
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path)
        elif path.exists():
            mlflow.log_artifact(str(path), artifact_path)

    def log_dict(self, data: dict, name: str) -> None:
        import mlflow

        mlflow.log_dict(data, name)

    def log_figure(self, fig: Any, name: str) -> None:
        import mlflow

        mlflow.log_figure(fig, name)

    def set_tags(self, tags: dict[str, Any]) -> None:
        import mlflow

        mlflow.set_tags({k: str(v) for k, v in tags.items()})


def _is_number(v: Any) -> bool:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return False
    return f == f and abs(f) != float("inf")


# MLflow 3's UI opens an experiment by its kind: model development lands on the runs table (untagged, it can
# open the GenAI traces overview, empty here)
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


def ensure_experiment(experiment: str = "diffusion-quant", uri: str = "sqlite:///mlflow.db") -> None:
    """Point MLflow at ``uri``, creating the store (its schema) and ``experiment`` when missing. Call it in
    one process before worker processes log to the same store: two processes creating it race."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(uri))
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        mlflow.create_experiment(experiment, artifact_location=artifact_location(), tags=EXPERIMENT_TAGS)
    elif any(exp.tags.get(k) != v for k, v in EXPERIMENT_TAGS.items()):  # a store made by an earlier version
        for k, v in EXPERIMENT_TAGS.items():
            mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, k, v)
    mlflow.set_experiment(experiment)


@contextlib.contextmanager
def stage_run(
    stage: str,
    *,
    params: dict[str, Any],
    tags: Optional[dict[str, Any]] = None,
    inputs: Optional[list[str | Path]] = None,
    experiment: str = "diffusion-quant",
    uri: str = "sqlite:///mlflow.db",
    run_name: Optional[str] = None,
    log_file: Optional[Path] = None,
) -> Iterator[StageRun]:
    """Open the MLflow run of one stage execution.

    Tags: stage, git commit, params hash, hash of every input path, plus ``tags`` (backbone, method,
    bit setting, ...). Params are the stage's params section, flattened. The stage log is attached as
    an artifact when the block ends, whether it succeeded or failed.
    """
    import mlflow

    file_handler = setup_logging(log_file)
    t0 = time.time()
    ensure_experiment(experiment, uri)
    all_tags = {
        "stage": stage,
        "git_commit": git_commit(),
        "params_hash": data_hash(params)[:16],
        "cpu_numerics": ",".join(f"{k}={v}" for k, v in cpu_numerics().items()),
    }
    for p in inputs or []:
        if Path(p).exists():
            all_tags[f"input_hash.{Path(p).name}"] = tree_hash(p)[:16]
    all_tags.update({k: str(v) for k, v in (tags or {}).items()})
    if os.environ.get("DVC_EXP_NAME"):
        all_tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    with mlflow.start_run(run_name=run_name or stage, tags=all_tags) as run:
        flat = {k: (str(v)[:5000]) for k, v in flatten(params).items()}
        items = list(flat.items())
        for i in range(0, len(items), 100):
            mlflow.log_params(dict(items[i : i + 100]))
        handle = StageRun(run.info.run_id, tracking_uri(uri))
        status = "FINISHED"
        try:
            yield handle
        except BaseException:
            status = "FAILED"
            raise
        finally:
            mlflow.log_metric("stage_seconds", time.time() - t0)
            if file_handler is not None:
                file_handler.flush()
                logging.getLogger().removeHandler(file_handler)
                file_handler.close()
                handle.log_artifact(log_file)
            mlflow.end_run(status=status)


def quiet_lightning() -> None:
    """``import lightning`` attaches its own console handler to the ``lightning`` logger while also
    propagating to the root logger, so every Lightning line would print twice; keep only ours (which
    also writes the stage log file)."""
    lg = logging.getLogger("lightning")
    for h in list(lg.handlers):
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
            lg.removeHandler(h)
