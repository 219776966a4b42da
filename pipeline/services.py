"""Local services for scaling out: PostgreSQL, an S3 endpoint and an MLflow tracking server, on loopback.

``python -m pipeline.services start`` (``make services``) starts, in this order and each only once:

1. **PostgreSQL** from the installed server binaries, with its data folder in ``<state>/pg/data``
   (``initdb`` on the first start only, so runs and studies survive a stop), listening on
   ``127.0.0.1:<pg_port>`` and on a unix socket in ``<state>/pg/socket``. It holds two databases:
   ``mlflow`` (the tracking server's backend store) and ``optuna`` (an RDB storage that several worker
   processes or machines can share, which a SQLite file cannot do safely).
2. **An S3 endpoint.** By default a mock: moto's S3 server on ``127.0.0.1:<s3_port>`` with test
   credentials. The mock keeps objects in memory, so they are gone after ``stop`` (the databases are not);
   it exists so the whole stack can be exercised on one machine and in the tests. Give a real endpoint
   (``--s3-endpoint`` / ``PIPELINE_S3_ENDPOINT``; ``mock`` goes back to the mock) and no mock is started: the
   bucket is created there if missing, with the credentials of the calling environment (``AWS_*`` variables
   or ``~/.aws``).
3. **An MLflow tracking server** on ``127.0.0.1:<mlflow_port>`` with the ``mlflow`` database as backend
   store and ``s3://<bucket>/mlartifacts`` as artifact destination. The server proxies artifacts
   (``mlflow-artifacts:/``), so clients need no S3 credentials of their own for MLflow.

Everything binds to 127.0.0.1: these are development services for one machine, not a hardened deployment.
For the same reason PostgreSQL's superuser authenticates on loopback TCP with a password generated on the
first start (``<state>/pg_password``, mode 0600; SCRAM-SHA-256), and without one on the unix socket,
whose folder only the server's user (and root) can enter. Trust authentication on loopback would also do
for a single-user machine; the password costs nothing and keeps other local users out of the databases.

The state folder (default ``data/services``, relative to the working directory; git-ignored with ``data/``)
holds the logs (``logs/``), the pid files of the processes this module starts (``pids/``; PostgreSQL keeps
its own ``postmaster.pid``), ``services.json`` (the ports, bucket and endpoint of the last start, so
``stop``/``status``/a later ``start`` use them without arguments) and ``env``: shell ``export`` lines that
point every later command at the services (``source data/services/env``)::

    MLFLOW_TRACKING_URI      http://127.0.0.1:<mlflow_port>
    OPTUNA_STORAGE           postgresql+psycopg2://postgres:<password>@127.0.0.1:<pg_port>/optuna  (optuna's CLI reads it)
    MLFLOW_S3_ENDPOINT_URL, AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION
    PIPELINE_S3_BUCKET, PIPELINE_DVC_REMOTE_URL (s3://<bucket>/dvcstore)

PostgreSQL refuses to run as root. When this module runs as root (containers), ``initdb``/``pg_ctl`` run as
the unprivileged system user ``postgres`` (``subprocess``'s ``user=``/``group=``, no ``su``/``runuser``
needed), which must exist and be able to enter the state folder; otherwise they run as the current user.

A service that is already running (PostgreSQL per ``pg_ctl status``; moto and MLflow per their pid file, the
process's command line and its port) is not started again. A port that is taken by anything else is reported
before anything starts. ``stop`` ends MLflow, then the mock S3, then ``pg_ctl stop -m fast``; it is idempotent.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

HOST = "127.0.0.1"
DEFAULT_STATE_DIR = "data/services"
DEFAULT_PG_PORT = 55432
DEFAULT_S3_PORT = 55433
DEFAULT_MLFLOW_PORT = 55500
DEFAULT_BUCKET = "diffusion-quant"
PG_SUPERUSER = "postgres"  # the database role (not the OS user) every URL here connects as
PG_SYSTEM_USER = "postgres"  # the OS user PostgreSQL runs as when this module runs as root
DATABASES = ("mlflow", "optuna")
# moto accepts any credentials; fixed test values keep the env file and the docs reproducible
MOCK_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
DEFAULT_REGION = "us-east-1"
# unix sockets have a 108-byte path limit (sun_path); PostgreSQL's socket is <dir>/.s.PGSQL.<port>
_SOCKET_PATH_MAX = 107

ENV_VARS = {
    "state_dir": "PIPELINE_SERVICES_DIR",
    "pg_port": "PIPELINE_PG_PORT",
    "s3_port": "PIPELINE_S3_PORT",
    "mlflow_port": "PIPELINE_MLFLOW_PORT",
    "bucket": "PIPELINE_S3_BUCKET",
    "s3_endpoint": "PIPELINE_S3_ENDPOINT",
    "pg_bin": "PIPELINE_PG_BIN",
}


class ServiceError(RuntimeError):
    """A service could not be started, reached or stopped; the message says which and why."""


@dataclass
class Settings:
    """Where the services keep their state and where they listen. ``s3_endpoint`` set = external S3."""

    state_dir: Path
    pg_port: int = DEFAULT_PG_PORT
    s3_port: int = DEFAULT_S3_PORT
    mlflow_port: int = DEFAULT_MLFLOW_PORT
    bucket: str = DEFAULT_BUCKET
    s3_endpoint: Optional[str] = None
    pg_bin: Optional[str] = None

    # ---- layout of the state folder ----
    @property
    def pg_root(self) -> Path:
        return self.state_dir / "pg"

    @property
    def pg_data(self) -> Path:
        return self.pg_root / "data"

    @property
    def pg_socket_dir(self) -> Path:
        return self.pg_root / "socket"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def pid_dir(self) -> Path:
        return self.state_dir / "pids"

    @property
    def password_file(self) -> Path:
        return self.state_dir / "pg_password"

    @property
    def record_file(self) -> Path:
        return self.state_dir / "services.json"

    @property
    def env_file(self) -> Path:
        return self.state_dir / "env"

    def log(self, service: str) -> Path:
        return self.log_dir / f"{service}.log"

    def pid_file(self, service: str) -> Path:
        return self.pid_dir / f"{service}.pid"

    # ---- endpoints ----
    @property
    def external_s3(self) -> bool:
        return bool(self.s3_endpoint)

    @property
    def s3_url(self) -> str:
        return self.s3_endpoint.rstrip("/") if self.s3_endpoint else f"http://{HOST}:{self.s3_port}"

    @property
    def mlflow_url(self) -> str:
        return f"http://{HOST}:{self.mlflow_port}"

    def pg_url(self, database: str) -> str:
        """A SQLAlchemy URL (MLflow and Optuna both connect through SQLAlchemy). The driver is named:
        SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3, the project installs psycopg2."""
        return f"postgresql+psycopg2://{PG_SUPERUSER}:{self.pg_password()}@{HOST}:{self.pg_port}/{database}"

    def pg_password(self) -> str:
        try:
            return self.password_file.read_text().strip()
        except FileNotFoundError:
            raise ServiceError(f"no PostgreSQL password at {self.password_file}: the services in "
                               f"{self.state_dir} were never started (python -m pipeline.services start)") from None

    def s3_credentials(self) -> dict:
        """The credentials S3 clients get: moto's test values, or none (the caller's own) for a real S3."""
        return {} if self.external_s3 else dict(MOCK_CREDENTIALS)


def _port(value, name: str) -> int:
    try:
        port = int(value)
    except (TypeError, ValueError):
        raise ServiceError(f"{name} must be a port number, got {value!r}") from None
    if not 1 <= port <= 65535:
        raise ServiceError(f"{name} must be a port number in 1..65535, got {port}")
    return port


def settings(state_dir=None, *, pg_port=None, s3_port=None, mlflow_port=None, bucket=None, s3_endpoint=None,
             pg_bin=None) -> Settings:
    """Resolve the settings: an explicit argument wins, then the ``PIPELINE_*`` environment variable
    (:data:`ENV_VARS`), then what the last start in this state folder recorded, then the defaults."""
    explicit = {"pg_port": pg_port, "s3_port": s3_port, "mlflow_port": mlflow_port, "bucket": bucket,
                "s3_endpoint": s3_endpoint, "pg_bin": pg_bin}
    state = Path(state_dir or os.environ.get(ENV_VARS["state_dir"]) or DEFAULT_STATE_DIR).expanduser().absolute()
    recorded = {}
    record = state / "services.json"
    if record.is_file():
        try:
            recorded = json.loads(record.read_text())
        except (OSError, ValueError):
            recorded = {}
    values = {}
    for key, value in explicit.items():
        if value is None:
            value = os.environ.get(ENV_VARS[key]) or None
        if value is None:
            value = recorded.get(key)
        if value is not None:
            values[key] = value
    for key in ("pg_port", "s3_port", "mlflow_port"):
        if key in values:
            values[key] = _port(values[key], key)
    if str(values.get("s3_endpoint", "")).lower() == "mock":  # back to the mock after an external endpoint
        values["s3_endpoint"] = None
    s = Settings(state_dir=state, **values)
    ports = {"pg_port": s.pg_port, "mlflow_port": s.mlflow_port}
    if not s.external_s3:
        ports["s3_port"] = s.s3_port
    if len(set(ports.values())) != len(ports):
        raise ServiceError(f"the services need distinct ports, got {ports}")
    return s


# ---------------------------------------------------------------------------------------------
# small helpers: ports, processes, logs
# ---------------------------------------------------------------------------------------------
def port_in_use(port: int, host: str = HOST) -> bool:
    """Whether something holds ``host:port`` (a listener there or on all interfaces). Binding is the test
    that matches what the service will do; SO_REUSEADDR keeps sockets in TIME_WAIT from counting."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _answers(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 (loopback URLs built here)
            return 200 <= r.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:]) or f"({path} is empty)"


def _fail(service: str, why: str, log: Path) -> ServiceError:
    return ServiceError(f"{service}: {why}\n--- last lines of {log} ---\n{tail(log)}")


def _cmdline(pid: int) -> Optional[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (exited, not yet reaped by its parent) is not running
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _owned_pid(s: Settings, service: str, marker: str) -> Optional[int]:
    """The pid in ``service``'s pid file if that process is alive and is ours: its command line contains
    ``marker`` (a pid reused by an unrelated process after a reboot is not ours)."""
    try:
        pid = int(s.pid_file(service).read_text().strip())
    except (OSError, ValueError):
        return None
    if not _alive(pid):
        return None
    cmd = _cmdline(pid)
    if cmd is not None and marker not in cmd:
        return None
    return pid


def _terminate(pid: int, timeout: float = 15.0) -> None:
    """SIGTERM the process group ``pid`` leads (started with its own session), then SIGKILL after
    ``timeout``: the MLflow CLI runs its web server as a child, and both must go."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        except PermissionError as e:
            raise ServiceError(f"not allowed to stop process {pid} ({_cmdline(pid) or '?'}): started by "
                               f"another user?") from e
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:  # reap it if it is our child (a start and stop in one process, as in the tests)
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            if not _alive(pid):
                return
            time.sleep(0.1)


def _spawn(s: Settings, service: str, cmd: list, env: dict) -> subprocess.Popen:
    """Start a detached service process (own session, so it outlives the CLI and stops as a group),
    output appended to its log, pid written to its pid file."""
    s.log_dir.mkdir(parents=True, exist_ok=True)
    s.pid_dir.mkdir(parents=True, exist_ok=True)
    log = s.log(service)
    with open(log, "ab") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(map(str, cmd))}\n".encode())
        out.flush()
        proc = subprocess.Popen([str(c) for c in cmd], stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, env=env, cwd=s.state_dir, start_new_session=True)
    s.pid_file(service).write_text(f"{proc.pid}\n")
    return proc


def _wait(service: str, ready, proc: Optional[subprocess.Popen], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if proc is not None and proc.poll() is not None:
            raise _fail(service, f"exited with status {proc.returncode} before it was ready", log)
        time.sleep(0.25)
    raise _fail(service, f"not ready after {timeout:.0f} s", log)


# ---------------------------------------------------------------------------------------------
# PostgreSQL
# ---------------------------------------------------------------------------------------------
def pg_bindir(s: Settings) -> Path:
    """The folder with ``initdb`` and ``pg_ctl``: ``--pg-bin``/``PIPELINE_PG_BIN``, else ``pg_ctl`` on PATH,
    else the newest Debian/Ubuntu ``/usr/lib/postgresql/<version>/bin``, else the usual other prefixes."""
    def ok(d: Path) -> bool:
        return (d / "initdb").is_file() and (d / "pg_ctl").is_file() and (d / "postgres").is_file()

    if s.pg_bin:
        d = Path(s.pg_bin).expanduser()
        if not ok(d):
            raise ServiceError(f"PostgreSQL server binaries (initdb, pg_ctl, postgres) not found in {d} "
                               f"(from --pg-bin / {ENV_VARS['pg_bin']})")
        return d
    candidates = []
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)

    def version(p: Path):
        try:
            return float(p.parent.name)
        except ValueError:
            return 0.0

    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    candidates += [Path("/usr/local/pgsql/bin"), Path("/usr/pgsql/bin"), Path("/opt/homebrew/bin"),
                   Path("/usr/local/bin")]
    for d in candidates:
        if ok(d):
            return d
    raise ServiceError("PostgreSQL server binaries (initdb, pg_ctl, postgres) not found on PATH nor in "
                       "/usr/lib/postgresql/*/bin: install the PostgreSQL server (Debian/Ubuntu: "
                       "apt-get install postgresql) or set PIPELINE_PG_BIN to the folder that holds them")


def _pg_user() -> Optional[tuple]:
    """(uid, gid, name, home) to run PostgreSQL as when we are root; None when we are not root."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        pw = pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        raise ServiceError(f"running as root, and PostgreSQL refuses to run as root, but there is no "
                           f"'{PG_SYSTEM_USER}' system user to run it as: create one (useradd --system "
                           f"--user-group {PG_SYSTEM_USER}; the Debian postgresql package does) or run as an "
                           f"ordinary user") from None
    return pw.pw_uid, pw.pw_gid, pw.pw_name, pw.pw_dir


def _pg_run(s: Settings, args: list, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a PostgreSQL program from :func:`pg_bindir`, as ``postgres`` when we are root."""
    cmd = [str(pg_bindir(s) / args[0])] + [str(a) for a in args[1:]]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(LC_ALL="C.UTF-8", LANG="C.UTF-8")
    kw = {}
    user = _pg_user()
    if user:
        uid, gid, name, home = user
        kw = {"user": uid, "group": gid, "extra_groups": []}
        env.update(HOME=home, USER=name, LOGNAME=name)
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=s.pg_root, timeout=timeout, **kw)
    except subprocess.TimeoutExpired as e:
        raise _fail("postgres", f"{args[0]} did not finish in {timeout} s", s.log("postgres")) from e
    if check and r.returncode != 0:
        raise _fail("postgres", f"{' '.join(cmd)} failed (exit {r.returncode}):\n{r.stdout}{r.stderr}".rstrip(),
                    s.log("postgres"))
    return r


def _prepare_pg_dirs(s: Settings) -> None:
    """Create the server's folders owned by the user it runs as, and check that user can reach them."""
    sock = s.pg_socket_dir / f".s.PGSQL.{s.pg_port}"
    if len(str(sock)) > _SOCKET_PATH_MAX:
        raise ServiceError(f"the state folder {s.state_dir} is too deep for PostgreSQL's unix socket "
                           f"({len(str(sock))} > {_SOCKET_PATH_MAX} bytes for {sock}): choose a shorter --state-dir")
    s.pg_root.mkdir(parents=True, exist_ok=True)
    s.pg_socket_dir.mkdir(exist_ok=True)
    s.log_dir.mkdir(parents=True, exist_ok=True)
    s.log("postgres").touch()
    os.chmod(s.pg_socket_dir, 0o700)
    user = _pg_user()
    if user is None:
        return
    uid, gid = user[0], user[1]
    for p in (s.pg_root, s.pg_socket_dir, s.log("postgres")):
        os.chown(p, uid, gid)
    if s.pg_data.exists():
        os.chown(s.pg_data, uid, gid)
    probe = subprocess.run(["test", "-w", str(s.pg_root), "-a", "-w", str(s.log("postgres"))],
                           user=uid, group=gid, extra_groups=[], cwd="/", capture_output=True)
    if probe.returncode != 0:
        raise ServiceError(f"the '{PG_SYSTEM_USER}' user that runs PostgreSQL cannot reach {s.pg_root}: every "
                           f"folder above it must be searchable by other users (chmod o+x), or choose a "
                           f"--state-dir elsewhere (e.g. under /tmp)")


def pg_running(s: Settings) -> bool:
    if not (s.pg_data / "PG_VERSION").is_file():
        return False
    return _pg_run(s, ["pg_ctl", "status", "-D", s.pg_data], check=False).returncode == 0


def _pg_recorded_port(s: Settings) -> Optional[int]:
    """The port the running server listens on (line 4 of postmaster.pid)."""
    try:
        return int((s.pg_data / "postmaster.pid").read_text().splitlines()[3])
    except (OSError, ValueError, IndexError):
        return None


def _connect(s: Settings, database: str = "postgres"):
    import psycopg2

    return psycopg2.connect(host=HOST, port=s.pg_port, user=PG_SUPERUSER, password=s.pg_password(),
                            dbname=database, connect_timeout=5)


def _start_postgres(s: Settings, timeout: float) -> str:
    _prepare_pg_dirs(s)
    if not s.password_file.exists():
        s.password_file.touch(mode=0o600)
        s.password_file.write_text(secrets.token_urlsafe(24) + "\n")
    os.chmod(s.password_file, 0o600)
    initialised = ""
    if not (s.pg_data / "PG_VERSION").is_file():
        if s.pg_data.exists() and any(s.pg_data.iterdir()):
            raise ServiceError(f"{s.pg_data} exists but holds no PostgreSQL cluster (no PG_VERSION): move it away")
        # initdb reads the password from a file the server's user can read; it is removed right after
        pwfile = s.pg_root / ".initdb-password"
        pwfile.write_text(s.pg_password() + "\n")
        user = _pg_user()
        if user:
            os.chown(pwfile, user[0], user[1])
        os.chmod(pwfile, 0o600)
        try:
            _pg_run(s, ["initdb", "-D", s.pg_data, "-U", PG_SUPERUSER, "--pwfile", pwfile, "-E", "UTF8",
                        "--locale=C", "--auth-host=scram-sha-256", "--auth-local=trust"])
        finally:
            pwfile.unlink(missing_ok=True)
        initialised = ", initialised"
    # the network settings go on the command line, so a later start on another port or folder just works
    opts = (f"-c listen_addresses={HOST} -p {s.pg_port} -c unix_socket_directories='{s.pg_socket_dir}' "
            f"-c unix_socket_permissions=0700")
    _pg_run(s, ["pg_ctl", "start", "-D", s.pg_data, "-l", s.log("postgres"), "-o", opts, "-w",
                "-t", str(int(timeout))], timeout=timeout + 30)
    _wait("postgres", lambda: _answers(s.pg_port), None, s.log("postgres"), 10)
    created = _ensure_databases(s)
    return f"started on {HOST}:{s.pg_port}{initialised}" + (f", created {', '.join(created)}" if created else "")


def _ensure_databases(s: Settings) -> list:
    conn = _connect(s)
    conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
    created = []
    try:
        with conn.cursor() as cur:
            for db in DATABASES:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{db}"')
                    created.append(db)
    finally:
        conn.close()
    return created


def _stop_postgres(s: Settings) -> str:
    if not pg_running(s):
        return "not running"
    _pg_run(s, ["pg_ctl", "stop", "-D", s.pg_data, "-m", "fast", "-w", "-t", "60"], timeout=90)
    return "stopped"


# ---------------------------------------------------------------------------------------------
# S3 (moto mock, or an external endpoint) and MLflow
# ---------------------------------------------------------------------------------------------
MOTO_MARKER = "moto.server"
MLFLOW_MARKER = "mlflow"


def _s3_client(s: Settings):
    import boto3

    creds = s.s3_credentials()
    return boto3.client("s3", endpoint_url=s.s3_url, region_name=os.environ.get("AWS_DEFAULT_REGION", DEFAULT_REGION),
                        aws_access_key_id=creds.get("AWS_ACCESS_KEY_ID"),
                        aws_secret_access_key=creds.get("AWS_SECRET_ACCESS_KEY"))


def _ensure_bucket(s: Settings) -> bool:
    """Create the bucket if it is missing; True when it was created."""
    from botocore.exceptions import BotoCoreError, ClientError

    client = _s3_client(s)
    try:
        client.head_bucket(Bucket=s.bucket)
        return False
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
            raise ServiceError(f"S3 bucket {s.bucket!r} at {s.s3_url}: {e}") from e
    except BotoCoreError as e:
        raise ServiceError(f"S3 endpoint {s.s3_url} not reachable: {e}") from e
    region = client.meta.region_name
    kw = {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
    try:
        client.create_bucket(Bucket=s.bucket, **kw)
    except (ClientError, BotoCoreError) as e:
        raise ServiceError(f"could not create S3 bucket {s.bucket!r} at {s.s3_url}: {e}") from e
    return True


def moto_pid(s: Settings) -> Optional[int]:
    return None if s.external_s3 else _owned_pid(s, "moto", MOTO_MARKER)


def mlflow_pid(s: Settings) -> Optional[int]:
    return _owned_pid(s, "mlflow", MLFLOW_MARKER)


def _start_moto(s: Settings, timeout: float) -> str:
    try:
        import moto.server  # noqa: F401
    except ImportError:
        raise ServiceError("the mock S3 server needs moto[server] (the project's `test` extra: pip install "
                           "-c constraints.txt -e '.[test]'), or point at a real S3 with --s3-endpoint / "
                           f"{ENV_VARS['s3_endpoint']}") from None
    env = dict(os.environ, **MOCK_CREDENTIALS, AWS_DEFAULT_REGION=DEFAULT_REGION)
    proc = _spawn(s, "moto", [sys.executable, "-m", MOTO_MARKER, "-H", HOST, "-p", s.s3_port], env)
    _wait("moto (mock S3)", lambda: _http_ok(f"{s.s3_url}/moto-api/"), proc, s.log("moto"), timeout)
    return f"started on {s.s3_url}"


def _mlflow_env(s: Settings) -> dict:
    env = dict(os.environ)
    env.update(s.s3_credentials())
    env.update(
        MLFLOW_BACKEND_STORE_URI=s.pg_url("mlflow"),  # in the environment, so the password is not in `ps`
        MLFLOW_S3_ENDPOINT_URL=s.s3_url,
        # the job-execution side service (MLflow >= 3.5) is for GenAI jobs; it would add a worker process
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
    )
    env.setdefault("AWS_DEFAULT_REGION", DEFAULT_REGION)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _start_mlflow(s: Settings, timeout: float) -> str:
    cmd = [sys.executable, "-m", MLFLOW_MARKER, "server",
           "--artifacts-destination", f"s3://{s.bucket}/mlartifacts",
           "--host", HOST, "--port", s.mlflow_port, "--workers", "1"]
    proc = _spawn(s, "mlflow", cmd, _mlflow_env(s))
    _wait("mlflow", lambda: _http_ok(f"{s.mlflow_url}/health"), proc, s.log("mlflow"), timeout)
    return f"started on {s.mlflow_url}"


# ---------------------------------------------------------------------------------------------
# env file, start / stop / status
# ---------------------------------------------------------------------------------------------
def env_vars(s: Settings) -> dict:
    """The variables that point a process at the services (what ``<state>/env`` exports)."""
    out = {
        "MLFLOW_TRACKING_URI": s.mlflow_url,
        "OPTUNA_STORAGE": s.pg_url("optuna"),
        "MLFLOW_S3_ENDPOINT_URL": s.s3_url,
        "AWS_ENDPOINT_URL_S3": s.s3_url,
    }
    out.update(s.s3_credentials())
    if not s.external_s3:
        out["AWS_DEFAULT_REGION"] = DEFAULT_REGION
    out.update(PIPELINE_S3_BUCKET=s.bucket, PIPELINE_DVC_REMOTE_URL=f"s3://{s.bucket}/dvcstore")
    return out


def _write_env(s: Settings) -> None:
    import shlex

    lines = [f"# written by `python -m pipeline.services start` for the services in {s.state_dir}",
             "# use: source this file (it holds the PostgreSQL password: keep it private)"]
    if s.external_s3:
        lines.append(f"# S3 is {s.s3_url}: credentials come from your own AWS_* variables or ~/.aws")
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env_vars(s).items()]
    s.env_file.touch(mode=0o600)
    os.chmod(s.env_file, 0o600)
    s.env_file.write_text("\n".join(lines) + "\n")


def _record(s: Settings) -> None:
    data = asdict(s)
    data["state_dir"] = str(s.state_dir)
    s.record_file.write_text(json.dumps(data, indent=2) + "\n")


def _check_consistent(s: Settings) -> None:
    """A running service must be the one these settings describe (same port, same S3 mode)."""
    if pg_running(s):
        port = _pg_recorded_port(s)
        if port is not None and port != s.pg_port:
            raise ServiceError(f"PostgreSQL of {s.state_dir} already runs on port {port}, not {s.pg_port}: "
                               f"stop the services first (python -m pipeline.services stop)")
    for service, pid, port in (("moto", _owned_pid(s, "moto", MOTO_MARKER), s.s3_port),
                               ("mlflow", mlflow_pid(s), s.mlflow_port)):
        if pid is None:
            continue
        cmd = _cmdline(pid) or ""
        if service == "moto" and s.external_s3:
            raise ServiceError(f"the mock S3 of {s.state_dir} is running but an external endpoint {s.s3_url} "
                               f"was asked for: stop the services first")
        if cmd and str(port) not in cmd.split():
            raise ServiceError(f"{service} of {s.state_dir} already runs with other settings ({cmd.strip()}): "
                               f"stop the services first")


def _check_ports(s: Settings, want: dict) -> None:
    """Every service that is about to start needs its port free; report all taken ones at once."""
    names = {"postgres": ("pg_port", "--pg-port"), "moto": ("s3_port", "--s3-port"),
             "mlflow": ("mlflow_port", "--mlflow-port")}
    taken = []
    for service, start_it in want.items():
        if not start_it:
            continue
        key, flag = names[service]
        port = getattr(s, key)
        if port_in_use(port):
            taken.append(f"port {port} ({service}) is already in use by another process on {HOST}: choose "
                         f"another with {flag} or {ENV_VARS[key]}, or stop what holds it")
    if taken:
        raise ServiceError("; ".join(taken))


def start(state_dir=None, *, pg_port=None, s3_port=None, mlflow_port=None, bucket=None, s3_endpoint=None,
          pg_bin=None, timeout: float = 120.0, quiet: bool = False) -> Settings:
    """Start PostgreSQL, the S3 mock (unless ``s3_endpoint`` names a real one) and MLflow; skip what runs.

    Returns the resolved :class:`Settings`; ``<state_dir>/env`` then holds the variables of
    :func:`env_vars`. Raises :class:`ServiceError` with the cause (and the tail of the service's log)."""
    s = settings(state_dir, pg_port=pg_port, s3_port=s3_port, mlflow_port=mlflow_port, bucket=bucket,
                 s3_endpoint=s3_endpoint, pg_bin=pg_bin)
    say = (lambda *a: None) if quiet else (lambda msg: print(msg, flush=True))
    pg_bindir(s)  # fail early on missing binaries / missing postgres user, before anything starts
    _pg_user()
    s.state_dir.mkdir(parents=True, exist_ok=True)
    _check_consistent(s)
    want = {"postgres": not pg_running(s),
            "moto": not s.external_s3 and moto_pid(s) is None,
            "mlflow": mlflow_pid(s) is None}
    _check_ports(s, want)
    _record(s)

    if want["postgres"]:
        say(f"postgres: {_start_postgres(s, timeout)}")
    else:
        created = _ensure_databases(s)
        say("postgres: already running" + (f", created {', '.join(created)}" if created else ""))
    if s.external_s3:
        say(f"s3: external endpoint {s.s3_url}")
    else:
        say(f"s3 (moto mock): {_start_moto(s, timeout) if want['moto'] else 'already running'}")
    created = _ensure_bucket(s)
    say(f"bucket s3://{s.bucket}: {'created' if created else 'exists'}")
    say(f"mlflow: {_start_mlflow(s, timeout) if want['mlflow'] else 'already running'}")
    _write_env(s)
    say(f"environment: source {s.env_file}")
    return s


def stop(state_dir=None, *, quiet: bool = False) -> dict:
    """Stop MLflow, the S3 mock, then PostgreSQL (``pg_ctl stop -m fast``). Idempotent: what is not running is
    reported as such. Returns {service: what happened}."""
    s = settings(state_dir)
    say = (lambda *a: None) if quiet else (lambda msg: print(msg, flush=True))
    done = {}
    for service, pid in (("mlflow", mlflow_pid(s)), ("moto", _owned_pid(s, "moto", MOTO_MARKER))):
        if pid is None:
            done[service] = "not running"
        else:
            _terminate(pid)
            done[service] = "stopped"
        s.pid_file(service).unlink(missing_ok=True)
    done["postgres"] = _stop_postgres(s) if (s.pg_data / "PG_VERSION").is_file() else "not running"
    for service, what in done.items():
        say(f"{service}: {what}")
    return done


def status(state_dir=None) -> dict:
    """What is up: {service: {"running": bool, "url": ..., ...}} for postgres, s3 and mlflow."""
    s = settings(state_dir)
    pg_up = (s.pg_data / "PG_VERSION").is_file() and pg_running(s)
    out = {"postgres": {"running": pg_up, "url": f"postgresql://{PG_SUPERUSER}@{HOST}:{s.pg_port}",
                        "data": str(s.pg_data)}}
    if s.external_s3:
        out["s3"] = {"running": _bucket_reachable(s), "url": s.s3_url, "external": True}
    else:
        pid = moto_pid(s)
        out["s3"] = {"running": pid is not None and _answers(s.s3_port), "url": s.s3_url, "external": False,
                     "pid": pid}
    pid = mlflow_pid(s)
    out["mlflow"] = {"running": pid is not None and _http_ok(f"{s.mlflow_url}/health"), "url": s.mlflow_url,
                     "pid": pid}
    return out


def _bucket_reachable(s: Settings) -> bool:
    try:
        _s3_client(s).head_bucket(Bucket=s.bucket)
        return True
    except Exception:  # noqa: BLE001 (status reports, it does not raise)
        return False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.services",
                                description="Local PostgreSQL + S3 (moto mock) + MLflow server on 127.0.0.1.")
    p.add_argument("command", choices=["start", "stop", "status", "env"])
    p.add_argument("--state-dir", help=f"state folder (default {DEFAULT_STATE_DIR}; {ENV_VARS['state_dir']})")
    p.add_argument("--pg-port", type=int, help=f"PostgreSQL port (default {DEFAULT_PG_PORT}; {ENV_VARS['pg_port']})")
    p.add_argument("--s3-port", type=int, help=f"mock S3 port (default {DEFAULT_S3_PORT}; {ENV_VARS['s3_port']})")
    p.add_argument("--mlflow-port", type=int,
                   help=f"MLflow server port (default {DEFAULT_MLFLOW_PORT}; {ENV_VARS['mlflow_port']})")
    p.add_argument("--bucket", help=f"S3 bucket (default {DEFAULT_BUCKET}; {ENV_VARS['bucket']})")
    p.add_argument("--s3-endpoint", help=f"a real S3 endpoint URL: no mock is started; 'mock' for the mock "
                   f"({ENV_VARS['s3_endpoint']})")
    p.add_argument("--pg-bin", help=f"folder of initdb/pg_ctl ({ENV_VARS['pg_bin']})")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each service (default 120)")
    a = p.parse_args(argv)
    try:
        if a.command == "start":
            start(a.state_dir, pg_port=a.pg_port, s3_port=a.s3_port, mlflow_port=a.mlflow_port, bucket=a.bucket,
                  s3_endpoint=a.s3_endpoint, pg_bin=a.pg_bin, timeout=a.timeout)
        elif a.command == "stop":
            stop(a.state_dir)
        elif a.command == "status":
            up = status(a.state_dir)
            for service, info in up.items():
                print(f"{service}: {'up' if info['running'] else 'down'} {info['url']}")
            return 0 if all(info["running"] for info in up.values()) else 3
        else:
            s = settings(a.state_dir)
            if not s.env_file.is_file():
                raise ServiceError(f"no {s.env_file}: start the services first (python -m pipeline.services start)")
            sys.stdout.write(s.env_file.read_text())
    except ServiceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
