"""Servers a test may stop, kill or restart: its own Redis and PostgreSQL.

The machine's shared services are never touched by a fault test. PostgreSQL
refuses to run as root, so the throwaway cluster runs as the ``postgres``
user when the tests run as root.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import redis


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait(check: object, what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():  # type: ignore[operator]
                return
        except Exception:  # noqa: S110 - not up yet
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not come up in {timeout_s:g}s")


@dataclass
class RedisServer:
    """A redis-server of the test's own, with nothing kept on disk."""

    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait(lambda: redis.Redis(port=self.port).ping(), "redis-server")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()


class PostgresCluster:
    """A throwaway PostgreSQL cluster made with initdb, on a free port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.base = Path(tempfile.mkdtemp(prefix="adpa-pg-"))
        self.data = self.base / "data"
        self.bindir = Path(_pg_bindir())
        self._as_postgres = (
            ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        )

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/adpa"

    def _run(self, *args: str) -> None:
        subprocess.run(
            [*self._as_postgres, *args], check=True, capture_output=True, timeout=120
        )

    def create(self) -> None:
        if self._as_postgres:
            shutil.chown(self.base, "postgres")
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
        )
        self.start()
        with psycopg.connect(self._dsn("postgres"), autocommit=True) as connection:
            connection.execute("CREATE DATABASE adpa")

    def _dsn(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c max_connections=100"
        )
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.base / "server.log"),
            "-w",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"
        )

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()

    def connections(self) -> int:
        with psycopg.connect(self._dsn("postgres")) as connection:
            row = connection.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = 'adpa'"
            ).fetchone()
            return int(row[0]) if row else 0

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)


def _pg_bindir() -> str:
    found = shutil.which("initdb")
    if found:
        return str(Path(found).parent)
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not candidates:
        raise RuntimeError("initdb not found: install the PostgreSQL server package")
    return str(Path(candidates[-1]).parent)


def process_children(pid: int) -> list[int]:
    """Pids of a process's direct children (prefork pool processes)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(part) for part in path.read_text().split()] if path.exists() else []


def kill_tree(pid: int) -> None:
    """kill -9 a process and its children at once."""
    for child in process_children(pid):
        os.kill(child, signal.SIGKILL)
    os.kill(pid, signal.SIGKILL)
