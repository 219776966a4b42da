"""Shared test settings: one torch thread (the tests use tiny tensors, where a second thread only
adds contention), and MLflow pointed at a per-session temporary database."""
import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _single_thread_and_private_mlflow(tmp_path_factory):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db")
    yield
    torch.set_num_threads(threads)
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
