"""Real servers for the integration tests, started on 127.0.0.1 and stopped by their PID: PostgreSQL here, and
nats-server (`NatsServer`, from the kit itself, which local multi-process runs use too)."""
from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

from defai_kit.nats_bus import NatsServer  # noqa: F401  (nats-server with JetStream on 127.0.0.1, stopped by PID)


def free_port() -> int:
    "A TCP port nothing listens on right now."
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def postgres_bin_dir() -> Path:
    "The folder of the newest installed PostgreSQL server binaries (`make system` installs them)."
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).resolve().parent
    raise RuntimeError("PostgreSQL server binaries not found: run `make system` (installs Debian's postgresql)")


class PostgresServer:
    "A throwaway PostgreSQL cluster in a temporary folder, listening on 127.0.0.1 only."

    def __init__(self) -> None:
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="defai-pg-"))
        self.process: subprocess.Popen | None = None
        # PostgreSQL refuses to run as root; under root the cluster belongs to the `postgres` user.
        self.run_as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    @property
    def admin_url(self) -> str:
        return f"postgresql://defai@127.0.0.1:{self.port}/postgres"

    def url(self, database: str) -> str:
        return f"postgresql://defai@127.0.0.1:{self.port}/{database}"

    def start(self) -> PostgresServer:
        bin_dir, data = postgres_bin_dir(), self.folder / "data"
        if self.run_as:
            shutil.chown(self.folder, "postgres", "postgres")
        subprocess.run([*self.run_as, str(bin_dir / "initdb"), "-D", str(data), "-U", "defai", "--auth=trust",
                        "-E", "UTF8", "--no-sync"], check=True, capture_output=True)
        self.process = subprocess.Popen(
            [*self.run_as, str(bin_dir / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(self.port),
             "-k", str(self.folder), "-c", "fsync=off", "-c", "synchronous_commit=off",
             "-c", "full_page_writes=off", "-c", "max_connections=200"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                psycopg.connect(self.admin_url, connect_timeout=1).close()
                return self
            except psycopg.OperationalError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"PostgreSQL did not start on 127.0.0.1:{self.port}")
                time.sleep(0.1)

    def create_database(self, name: str) -> str:
        "Create an empty database and return its URL."
        with psycopg.connect(self.admin_url, autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)  # "fast" shutdown, by the PID we started
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class WorkerProcess:
    "One `defai worker --role ROLE` process, started with its own environment and stopped by its PID (SIGTERM)."

    def __init__(self, role: str, env: dict[str, str], log_dir: Path, *options: str) -> None:
        self.role, self.log = role, Path(log_dir) / f"worker-{role}-{os.getpid()}-{id(self)}.log"
        defai = Path(sys.executable).parent / "defai"          # the console script beside this Python
        self._output = open(self.log, "w")
        self.process = subprocess.Popen([str(defai), "worker", "--role", role, *options], env=env,
                                        stdout=self._output, stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text()

    def wait_ready(self, timeout: float = 60) -> WorkerProcess:
        "Return once the worker printed its ready line; raise with its output if it died or took too long."
        deadline = time.monotonic() + timeout
        while f"worker {self.role} ready" not in self.output():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"worker {self.role} did not start:\n{self.output()[-3000:]}")
            time.sleep(0.05)
        return self

    def stop(self, timeout: float = 30) -> int:
        "SIGTERM by PID and wait for a graceful exit; its exit code (SIGKILL and -9 after `timeout`)."
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._output.close()
        return self.process.returncode

    def kill(self) -> None:
        "SIGKILL by PID, as a crash."
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()
