"""The local scale-out services (pipeline/services.py) for real: PostgreSQL from the installed binaries, moto's
S3 server as the mock object store, and an MLflow tracking server on both, all on free loopback ports in a
temporary state folder. Checks MLflow runs and artifacts, two Optuna workers sharing one study, a DVC S3
remote pushed from one clone and pulled into another, a stop/start that keeps the data, and a taken port."""
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from pipeline import services

pytestmark = pytest.mark.slow

try:
    services.pg_bindir(services.settings("/nonexistent"))  # honours PIPELINE_PG_BIN
    _NO_PG = ""
except services.ServiceError as e:
    _NO_PG = str(e)
if not _NO_PG and os.geteuid() == 0:
    try:
        services._pg_user()
    except services.ServiceError as e:
        _NO_PG = str(e)
requires_pg = pytest.mark.skipif(bool(_NO_PG), reason=f"no PostgreSQL server to start: {_NO_PG}")


def _free_ports(n: int) -> list:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _state_folder() -> Path:
    # not pytest's tmp_path: its root is mode 0700, which the `postgres` user (when we are root) cannot enter,
    # and its depth would come close to the unix socket path limit
    d = Path(tempfile.mkdtemp(prefix="dq-svc-", dir="/tmp"))
    d.chmod(0o755)
    return d


@pytest.fixture(scope="module", autouse=True)
def _own_settings():
    """The developer's PIPELINE_* service settings (a real S3 endpoint, ports, folder) must not reach the tests;
    PIPELINE_PG_BIN may (it only says where PostgreSQL is installed)."""
    with pytest.MonkeyPatch.context() as mp:
        for key, var in services.ENV_VARS.items():
            if key != "pg_bin":
                mp.delenv(var, raising=False)
        yield


@pytest.fixture(scope="module")
def svc(_own_settings):
    root = _state_folder()
    pg, s3, ml = _free_ports(3)
    try:
        s = services.start(root / "state", pg_port=pg, s3_port=s3, mlflow_port=ml, quiet=True)
        yield s
    finally:
        services.stop(root / "state", quiet=True)
        shutil.rmtree(root, ignore_errors=True)


def _env(s) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "OPTUNA_"))}
    env.update(services.env_vars(s))
    env["DVC_NO_ANALYTICS"] = "1"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _keys(s, prefix: str) -> list:
    listing = services._s3_client(s).list_objects_v2(Bucket=s.bucket, Prefix=prefix)
    return [o["Key"] for o in listing.get("Contents", [])]


@requires_pg
def test_env_file_and_status(svc):
    text = svc.env_file.read_text()
    assert f"export MLFLOW_TRACKING_URI=http://127.0.0.1:{svc.mlflow_port}" in text
    assert f"@127.0.0.1:{svc.pg_port}/optuna" in text and "export OPTUNA_STORAGE=" in text
    assert oct(svc.env_file.stat().st_mode & 0o777) == "0o600"  # it holds the database password
    up = services.status(svc.state_dir)
    assert all(info["running"] for info in up.values()), up


@requires_pg
def test_mlflow_server_on_postgres_with_s3_artifacts(svc, tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", svc.mlflow_url)
    client = MlflowClient(svc.mlflow_url)
    exp_id = client.create_experiment("services-test")
    art = tmp_path / "note.txt"
    art.write_text("artifact through the server\n")
    mlflow.set_tracking_uri(svc.mlflow_url)
    with mlflow.start_run(experiment_id=exp_id) as run:
        mlflow.log_params({"bits": 4, "family": "naive"})
        mlflow.log_metrics({"fid": 12.5, "acc": 0.9})
        mlflow.log_artifact(str(art), artifact_path="notes")
    got = client.get_run(run.info.run_id)
    assert got.data.params == {"bits": "4", "family": "naive"}
    assert got.data.metrics == {"fid": 12.5, "acc": 0.9}
    assert [f.path for f in client.list_artifacts(run.info.run_id, "notes")] == ["notes/note.txt"]
    # the backend is PostgreSQL: the run is a row in the mlflow database
    conn = services._connect(svc, "mlflow")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT experiment_id FROM runs WHERE run_uuid = %s", (run.info.run_id,))
            assert str(cur.fetchone()[0]) == exp_id
    finally:
        conn.close()
    # the artifact object is in the bucket, under the server's artifact destination
    keys = _keys(svc, "mlartifacts/")
    assert any(k.endswith(f"{run.info.run_id}/artifacts/notes/note.txt") for k in keys), keys
    mlflow.set_tracking_uri(None)


WORKER = textwrap.dedent("""
    import sys, optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name="shared", storage=sys.argv[1])
    study.optimize(lambda t: (t.suggest_float("x", -10, 10) - 2) ** 2, n_trials=int(sys.argv[2]))
""")


@requires_pg
def test_two_optuna_workers_share_one_study(svc):
    import optuna

    n = 5
    url = services.env_vars(svc)["OPTUNA_STORAGE"]
    optuna.create_study(study_name="shared", storage=url, load_if_exists=True)
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, url, str(n)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=_env(svc)) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert "database is locked" not in err
    study = optuna.load_study(study_name="shared", storage=url)
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    assert len(done) == 2 * n == len(study.trials)
    assert sorted(t.number for t in done) == list(range(2 * n))


DVC_YAML = textwrap.dedent("""
    stages:
      make:
        cmd: python -c "open('a.txt', 'w').write('hello')"
        outs: [a.txt]
      shout:
        cmd: python -c "open('b.txt', 'w').write(open('a.txt').read().upper())"
        deps: [a.txt]
        outs: [b.txt]
""")


def _run(cmd, cwd, env):
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{cmd} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout + r.stderr


@requires_pg
def test_dvc_s3_remote_push_then_pull_in_a_clone(svc, tmp_path):
    env = _env(svc)
    dvc = [sys.executable, "-m", "dvc"]
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "-c", "commit.gpgsign=false"]
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    _run(git + ["init", "-q"], a, env)
    _run(dvc + ["init", "-q"], a, env)
    (a / "dvc.yaml").write_text(DVC_YAML)
    assert "Running stage 'shout'" in _run(dvc + ["repro"], a, env)
    _run(dvc + ["remote", "add", "-d", "s3remote", f"s3://{svc.bucket}/dvcstore"], a, env)
    _run(dvc + ["remote", "modify", "s3remote", "endpointurl", svc.s3_url], a, env)  # credentials: env
    _run(git + ["add", "-A"], a, env)
    _run(git + ["commit", "-qm", "pipeline"], a, env)
    _run(dvc + ["push"], a, env)
    assert _keys(svc, "dvcstore/"), "dvc push wrote nothing to the bucket"

    _run(git + ["clone", "-q", str(a), str(b)], tmp_path, env)
    _run(dvc + ["pull"], b, env)
    assert (b / "b.txt").read_text() == "HELLO"
    out = _run(dvc + ["repro"], b, env)
    assert "Running stage" not in out, out
    assert "up to date" in _run(dvc + ["status"], b, env)


@requires_pg
def test_stop_then_start_keeps_the_databases(svc):
    from mlflow.tracking import MlflowClient

    pids = (services.mlflow_pid(svc), services.moto_pid(svc))
    services.start(svc.state_dir, quiet=True)  # all running: nothing new is started
    assert (services.mlflow_pid(svc), services.moto_pid(svc)) == pids

    assert set(services.stop(svc.state_dir, quiet=True).values()) == {"stopped"}
    assert not any(info["running"] for info in services.status(svc.state_dir).values())
    assert set(services.stop(svc.state_dir, quiet=True).values()) == {"not running"}  # idempotent
    s = services.start(svc.state_dir, quiet=True)  # the ports recorded by the first start
    assert (s.pg_port, s.s3_port, s.mlflow_port) == (svc.pg_port, svc.s3_port, svc.mlflow_port)
    assert MlflowClient(svc.mlflow_url).get_experiment_by_name("services-test") is not None


@requires_pg
def test_a_taken_port_is_named_before_anything_starts():
    root = _state_folder()
    holder = socket.socket()
    try:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        s3, ml = _free_ports(2)
        with pytest.raises(services.ServiceError, match=f"port {taken} \\(postgres\\) is already in use"):
            services.start(root / "state", pg_port=taken, s3_port=s3, mlflow_port=ml, quiet=True)
        assert not (root / "state" / "pg").exists()  # refused before initdb
    finally:
        holder.close()
        shutil.rmtree(root, ignore_errors=True)


def test_missing_postgres_binaries_are_reported(tmp_path):
    s = services.Settings(state_dir=tmp_path, pg_bin=str(tmp_path / "nowhere"))
    with pytest.raises(services.ServiceError, match="PostgreSQL server binaries .* not found"):
        services.pg_bindir(s)
