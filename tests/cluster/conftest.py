"""Real cluster parts on 127.0.0.1, started once for the cluster tests and torn down after them
(also when a test fails): a throw-away PostgreSQL cluster, an MLflow tracking server with a
database of it as backend store and a local artifact folder, and a two-node Ray cluster.

- PostgreSQL: Debian's server binaries (``initdb`` on PATH or under /usr/lib/postgresql/*/bin),
  ``initdb`` in a temp folder, its own free port, password (scram-sha-256) authentication for
  TCP, run as an unprivileged user when the tests run as root (Postgres refuses root). Each
  study gets a database of its own (:meth:`Postgres.create_database`).
- MLflow: ``mlflow server --artifacts-destination <folder>`` with its backend store
  ``postgresql://...`` in ``MLFLOW_BACKEND_STORE_URI`` (off the command line every user can list).
- Ray: ``ray start --head`` and ``ray start --address`` (the second node), each with one CPU,
  so two trials at a time must run on both nodes; each node carries a custom resource naming it
  (``p3b_head`` / ``p3b_second``) so :class:`RayCluster` can tell their node ids apart.

Every process is started in a session of its own and ended by its recorded id, never by name.
Without PostgreSQL the tests skip, except in CI (``CI=true``), where that is a failure.
"""
from __future__ import annotations

import glob
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.search.test_cluster import _env as cluster_env
from tests.search.test_cluster import _free_port as free_port
from tests.search.test_faults import _kill_session as kill_session

PG_USER = "p3b"
NODE_CPUS = 1
NODE_MEMORY = 2 * 1024**3  # bytes of heap Ray may schedule on each node
OBJECT_STORE = 100 * 1024**2  # bytes; Ray's minimum is 75 MiB
SERVICE_USERS = ("postgres", "nobody")  # who runs Postgres when the tests run as root
BIN = Path(sys.executable).parent


def _wait(ready, what: str, log: Path, process: subprocess.Popen, timeout_s: float = 120) -> None:
    """Poll ``ready()`` until true; fail with ``log`` when ``process`` died or time ran out."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)


def _postgres_bin() -> Path | None:
    """Folder of PostgreSQL's server binaries (``initdb``, ``postgres``), or None."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(candidates[-1]).parent if candidates else None


def _service_account() -> pwd.struct_passwd | None:
    """The unprivileged account Postgres runs as when we are root (None: run as ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in SERVICE_USERS:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError(f"running as root and none of the users {', '.join(SERVICE_USERS)} exists: "
                       "create one (useradd postgres)")


class Postgres:
    """A throw-away PostgreSQL cluster on 127.0.0.1:``port`` with superuser ``PG_USER``."""

    def __init__(self, bin_dir: Path, folder: Path, account: pwd.struct_passwd | None):
        self.bin_dir, self.folder, self.account = bin_dir, folder, account
        self.password = secrets.token_hex(12)
        self.port = free_port()
        self.data = folder / "data"
        self.log = folder / "postgres.log"
        self.process: subprocess.Popen | None = None
        password_file = folder / "password"
        password_file.write_text(self.password)
        self._chown(folder, password_file)
        subprocess.run([str(bin_dir / "initdb"), "-D", str(self.data), "-U", PG_USER, f"--pwfile={password_file}",
                        "--auth=scram-sha-256", "--locale=C", "-E", "UTF8", "--no-sync"],
                       check=True, capture_output=True, **self._as_service())

    def _chown(self, *paths: Path) -> None:
        if self.account is not None:
            for path in paths:
                os.chown(path, self.account.pw_uid, self.account.pw_gid)

    def _as_service(self) -> dict:
        if self.account is None:
            return {}
        return {"user": self.account.pw_uid, "group": self.account.pw_gid, "extra_groups": [],
                "env": {"PATH": os.environ["PATH"], "LC_ALL": "C"}}

    def url(self, database: str, password: str | None = None) -> str:
        """``postgresql://`` URL of ``database`` (with ``password`` instead of the right one)."""
        return f"postgresql://{PG_USER}:{password or self.password}@127.0.0.1:{self.port}/{database}"

    def _answers(self) -> bool:
        import psycopg

        try:
            psycopg.connect(self.url("postgres"), connect_timeout=2).close()
            return True
        except psycopg.OperationalError:
            return False

    def start(self, **settings: str) -> None:
        """Start the server (again), with extra server ``settings`` (name -> value) if given."""
        options = [f"{name}={value}" for name, value in
                   {"shared_buffers": "16MB", "max_connections": "100", "fsync": "off", **settings}.items()]
        with self.log.open("a") as out:
            self.process = subprocess.Popen(
                [str(self.bin_dir / "postgres"), "-D", str(self.data), "-p", str(self.port), "-h", "127.0.0.1",
                 "-k", str(self.folder), *(word for option in options for word in ("-c", option))],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **self._as_service())
        _wait(self._answers, "PostgreSQL", self.log, self.process, timeout_s=60)

    def stop(self) -> None:
        """Fast shutdown (SIGINT: open connections are cut, as when a database server restarts)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            kill_session(self.process.pid)
            self.process.wait(timeout=10)

    def create_database(self, name: str) -> str:
        """Create database ``name``; returns its URL."""
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


class MlflowServer:
    """``mlflow server`` on 127.0.0.1:``port``: backend store ``backend_url``, artifacts in ``folder``."""

    def __init__(self, backend_url: str, folder: Path):
        self.backend_url, self.folder = backend_url, folder
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = folder / "mlflow-server.log"
        self.process: subprocess.Popen | None = None

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2):
                return True
        except OSError:
            return False

    def start(self) -> None:
        with self.log.open("a") as out:
            self.process = subprocess.Popen(
                [str(BIN / "mlflow"), "server", "--artifacts-destination", str(self.folder / "artifacts"),
                 "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
                env={**os.environ, "MLFLOW_BACKEND_STORE_URI": self.backend_url},
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        _wait(self._answers, "the MLflow tracking server", self.log, self.process)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            kill_session(self.process.pid)
            self.process.wait(timeout=30)


class RayCluster:
    """A head node and a second node on 127.0.0.1, ``NODE_CPUS`` CPUs each."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: socket paths have a length limit
        self.head: subprocess.Popen | None = None
        self.second: subprocess.Popen | None = None
        self.node_ids: dict[str, str] = {}  # "p3b_head" / "p3b_second" -> Ray node id

    def _start_node(self, name: str, *args: str) -> subprocess.Popen:
        log = self.folder / f"ray-{name}.log"
        command = [str(BIN / "ray"), "start", *args, f"--num-cpus={NODE_CPUS}", "--num-gpus=0",
                   f"--memory={NODE_MEMORY}", f"--object-store-memory={OBJECT_STORE}",
                   f"--resources={json.dumps({name: 1})}", "--disable-usage-stats", "--block"]
        # a lost node is noticed within ~3 s (Ray's default: 5 missed checks of 3 s)
        env = cluster_env(RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="3")
        with log.open("w") as out:
            node = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait(lambda: "Ray runtime started" in log.read_text(), f"Ray node {name}", log, node)
        except BaseException:
            kill_session(node.pid)
            node.wait(timeout=30)
            raise
        return node

    def start(self) -> None:
        self.head = self._start_node("p3b_head", "--head", f"--port={self.port}", "--include-dashboard=false",
                                     f"--temp-dir={self.temp_dir}")
        self.second = self._start_node("p3b_second", f"--address={self.address}")
        self.node_ids = self._read_node_ids()

    def _read_node_ids(self) -> dict[str, str]:
        """Node id of each node, from a short driver (waits until both nodes are alive)."""
        script = ("import json, time, ray\n"
                  f"ray.init(address={self.address!r}, logging_level='ERROR', log_to_driver=False)\n"
                  "for _ in range(300):\n"
                  "    alive = [n for n in ray.nodes() if n['Alive']]\n"
                  "    if len(alive) == 2: break\n"
                  "    time.sleep(0.2)\n"
                  "print(json.dumps({k: n['NodeID'] for n in alive for k in n['Resources'] if k.startswith('p3b_')}))\n")
        out = subprocess.run([sys.executable, "-c", script], env=cluster_env(), capture_output=True, text=True,
                             timeout=120, check=True).stdout
        ids = json.loads(out.strip().splitlines()[-1])
        assert set(ids) == {"p3b_head", "p3b_second"}, ids
        return ids

    def kill_second(self) -> None:
        """SIGKILL every process of the second node (its raylet and its workers)."""
        if self.second is not None:
            kill_session(self.second.pid)
            self.second.wait(timeout=30)

    def stop(self) -> None:
        for node in (self.second, self.head):
            if node is not None:
                kill_session(node.pid)
                node.wait(timeout=30)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres():
    """The PostgreSQL cluster, running; torn down after the last cluster test."""
    bin_dir = _postgres_bin()
    if bin_dir is None:
        message = "PostgreSQL is not installed (apt-get install postgresql)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    account = _service_account()
    folder = Path(tempfile.mkdtemp(prefix="p3b-pg", dir="/tmp"))  # short: the socket path has a length limit
    server = None
    try:
        server = Postgres(bin_dir, folder, account)
        server.start()
        yield server
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def tracking_server(postgres, tmp_path_factory):
    """An MLflow tracking server on its own Postgres database; stopped after the last cluster test."""
    server = MlflowServer(postgres.create_database("mlflow"), tmp_path_factory.mktemp("mlflow"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """The two-node Ray cluster, shared by the tests that do not kill a node."""
    cluster = RayCluster(tmp_path_factory.mktemp("ray-cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def own_ray_cluster(tmp_path):
    """A two-node Ray cluster of the test's own (for a test that kills a node)."""
    cluster = RayCluster(tmp_path)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
