"""What every stage CLI shares: argument parsing, parameter validation errors, exit codes.

Stages import only the standard library and ``pipeline.config`` at start-up, so ``--help`` and
parameter errors are instant; torch and friends are imported inside ``run`` after validation.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # stages run as plain scripts from the repository root
    sys.path.insert(0, str(ROOT))

from pipeline.config import ConfigError  # noqa: E402

EXIT_BAD_INPUT = 2


def parser(doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0] if doc else None)
    p.add_argument("--params", default="params.yaml", help="parameter file (default: params.yaml)")
    return p


def log_path(name: str) -> Path:
    """Where a stage's log goes (git-ignored; also attached to its MLflow run)."""
    return Path("data") / "logs" / f"{name}.log"


def main(run: Callable[[argparse.Namespace], None], p: argparse.ArgumentParser) -> None:
    """Run a stage; bad parameters or inputs exit with code 2 and one clear line."""
    args = p.parse_args()
    if os.environ.get("PIPELINE_THREADS"):
        os.environ.setdefault("OMP_NUM_THREADS", os.environ["PIPELINE_THREADS"])
    try:
        run(args)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        logging.getLogger("pipeline").error("interrupted; outputs of this stage were not replaced")
        sys.exit(130)


def require(path: str | Path, what: str) -> Path:
    """Fail early, with the stage that makes it, when an input is missing."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found at {path}; run `dvc repro` (or the stage that writes it) first")
    return path
