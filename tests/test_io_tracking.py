"""Atomic outputs, content hashes and MLflow stage runs."""

import pytest

from pipeline.io import atomic_dir, atomic_file, data_hash, read_json, tree_hash, write_json
from pipeline.tracking import flatten, repo_root, tracking_uri


def test_atomic_dir_replaces_only_on_success(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("first")
    assert (out / "a.txt").read_text() == "first"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "a.txt").write_text("half-written")
            raise RuntimeError("killed")
    assert (out / "a.txt").read_text() == "first"  # the previous output survives
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary left behind


def test_atomic_file_and_json(tmp_path):
    p = tmp_path / "x.json"
    write_json(p, {"b": 1, "a": [1, 2]})
    assert read_json(p) == {"a": [1, 2], "b": 1}
    with pytest.raises(ValueError):
        with atomic_file(p) as fh:
            fh.write("garbage")
            raise ValueError("stop")
    assert read_json(p) == {"a": [1, 2], "b": 1}
    p.write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        read_json(p, "thing")
    with pytest.raises(FileNotFoundError, match="thing not found"):
        read_json(tmp_path / "missing.json", "thing")


def test_hashes_change_with_content(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("1")
    h1 = tree_hash(tmp_path / "d")
    (tmp_path / "d" / "f").write_text("2")
    assert tree_hash(tmp_path / "d") != h1
    assert data_hash({"a": 1, "b": 2}) == data_hash({"b": 2, "a": 1})


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}


def test_repo_root_inside_dvc_queue_copy(tmp_path):
    inner = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpabc"
    inner.mkdir(parents=True)
    assert repo_root(inner) == (tmp_path / "repo").resolve()
    assert repo_root(tmp_path) == tmp_path.resolve()


def test_tracking_uri_is_absolute(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/x.db")
    assert tracking_uri() == "sqlite:////elsewhere/x.db"


def test_stage_run_logs_params_tags_metrics_and_log(monkeypatch, tmp_path):
    import logging

    import mlflow

    from pipeline.tracking import stage_run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.txt").write_text("input")
    log_file = tmp_path / "logs" / "s.log"
    with stage_run("quantize", params={"a": {"b": 3}}, tags={"method": "naive"}, inputs=[tmp_path / "in.txt"],
                   experiment="t", log_file=log_file) as run:
        logging.getLogger("pipeline").info("hello from the stage")
        run.log_metrics({"fid": 1.5, "nested": {"x": 2}})
    client = mlflow.tracking.MlflowClient(tracking_uri=tracking_uri())
    r = client.get_run(run.run_id)
    assert r.data.params["a.b"] == "3"
    assert r.data.tags["stage"] == "quantize" and r.data.tags["method"] == "naive"
    assert "git_commit" in r.data.tags and "params_hash" in r.data.tags and "input_hash.in.txt" in r.data.tags
    assert r.data.metrics["fid"] == 1.5 and r.data.metrics["nested.x"] == 2
    assert r.info.status == "FINISHED"
    arts = [a.path for a in client.list_artifacts(run.run_id)]
    assert "s.log" in arts
    assert "hello from the stage" in log_file.read_text()
    with pytest.raises(RuntimeError):
        with stage_run("quantize", params={}, experiment="t") as run2:
            raise RuntimeError("boom")
    assert client.get_run(run2.run_id).info.status == "FAILED"
    # the dashboard opens the experiment on its runs table (MLflow 3 experiment kind), also for an old store
    exp = client.get_experiment_by_name("t")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    client.delete_experiment_tag(exp.experiment_id, "mlflow.experimentKind")
    with stage_run("quantize", params={}, experiment="t"):
        pass
    assert client.get_experiment_by_name("t").tags["mlflow.experimentKind"] == "custom_model_development"


def test_save_safetensors_writes_the_same_bytes_whatever_the_metadata_order(tmp_path):
    """safetensors writes metadata from a hash map (key order varies between processes); our writer sorts the
    header, so the file is byte-deterministic, and safetensors itself reads it back unchanged."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    from pipeline.io import save_safetensors

    tensors = {"b.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a": torch.tensor([1, 2], dtype=torch.int8),
               "c": torch.zeros(3, dtype=torch.float16)}
    metas = [{"format": "x", "format_version": "2", "z": "1"}, {"z": "1", "format_version": "2", "format": "x"}]
    for i, meta in enumerate(metas):
        save_safetensors(dict(reversed(list(tensors.items()))) if i else tensors, tmp_path / f"{i}.safetensors", meta)
    assert (tmp_path / "0.safetensors").read_bytes() == (tmp_path / "1.safetensors").read_bytes()
    back = load_file(str(tmp_path / "0.safetensors"))
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], v) for k, v in tensors.items())
    with safe_open(str(tmp_path / "0.safetensors"), framework="pt") as f:
        assert f.metadata() == metas[0]
    n = int.from_bytes((tmp_path / "0.safetensors").read_bytes()[:8], "little")
    assert n % 8 == 0


def test_split_timings_moves_clock_fields_out_recursively_and_tree_hash_ignores_side_files(tmp_path):
    from pipeline.io import split_timings, tree_hash

    clean, timing = split_timings({"key": "k", "method_seconds": 1.5, "peak_memory_mb": 3, "sec_per_image": 0.1,
                                   "info": {"peer_seconds": 2, "coverage": 1.0, "n": {"recon_seconds": 4}}})
    assert clean == {"key": "k", "info": {"coverage": 1.0, "n": {}}}
    assert timing == {"method_seconds": 1.5, "peak_memory_mb": 3, "sec_per_image": 0.1,
                      "info": {"peer_seconds": 2, "n": {"recon_seconds": 4}}}
    (tmp_path / "info.json").write_text("{}")
    before = tree_hash(tmp_path)
    (tmp_path / "job.timing.json").write_text('{"method_seconds": 9}')
    (tmp_path / "study-1.journal").write_text("x")
    assert tree_hash(tmp_path) == before
    (tmp_path / "other.json").write_text("{}")
    assert tree_hash(tmp_path) != before
