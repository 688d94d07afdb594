"""A real FUSE mount of a real daemon, for the mount tests.

``MountDaemon`` is the e2e ``Daemon`` started as ``cairn serve --config F --mount DIR
--bucket e2e`` (so the same process serves S3 and the mount, as in production), or as
``cairn mount DIR --config F`` with ``http=False``. ``start`` waits until the directory
is a mount point (and, with HTTP, until ``/health/ready``); teardown stops the process
with SIGTERM and, should anything be left, detaches the mount lazily with
``fusermount3 -u -z``. All waits are bounded.

Fixtures: ``mounted`` (one per module, SQLite), ``mount_factory`` (a test's own, with
custom quotas or database, stopped at its end).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import pg_dsn
from tests.e2e.conftest import (
    BUCKET,
    REPO,
    START_TIMEOUT,
    Daemon,
    DaemonSpec,
    _cleanup,
    _daemon_env,
    _new_root,
    _pg_exec,
    free_port,
    write_config,
)

pytestmark = [pytest.mark.fuse, pytest.mark.e2e]


def fuse_available() -> str | None:
    """Why FUSE tests cannot run here, or None."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed"
    try:
        import pyfuse3  # noqa: F401
    except ImportError:
        return "pyfuse3 is not installed"
    return None


def unmount(path: Path) -> None:
    """Detach a mount if one is there (lazy on failure); bounded."""
    if not os.path.ismount(path):
        return
    for args in (["-u"], ["-u", "-z"]):
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            subprocess.run(["fusermount3", *args, str(path)], capture_output=True, timeout=15)
        if not os.path.ismount(path):
            return


@dataclass
class MountDaemon(Daemon):
    """A daemon with the pool mounted at ``mountpoint`` (bucket ``e2e`` at its root)."""

    mountpoint: Path = Path()
    http: bool = True
    mount_bucket: str | None = BUCKET

    def command(self) -> list[str]:
        base = [sys.executable, "-m", "frontends.cli"]
        extra = ["--bucket", self.mount_bucket] if self.mount_bucket else []
        if self.http:
            return [
                *base,
                "serve",
                "--config",
                str(self.config_path),
                "--mount",
                str(self.mountpoint),
                *extra,
            ]
        return [*base, "mount", str(self.mountpoint), "--config", str(self.config_path), *extra]

    def start(self) -> None:
        assert self.proc is None, "already running"
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        log_path = self.root / f"daemon-{len(self._logs)}.log"
        self._logs.append(log_path)
        with log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                self.command(), stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=_daemon_env()
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited early:\n{self.output()}")
            if os.path.ismount(self.mountpoint):
                break
            time.sleep(0.05)
        else:
            self.kill()
            raise AssertionError(f"not mounted after {START_TIMEOUT} s:\n{self.output()}")
        if self.http:
            import urllib.request

            while time.monotonic() < deadline:
                with (
                    contextlib.suppress(OSError),
                    urllib.request.urlopen(f"{self.endpoint}/health/ready", timeout=2),
                ):
                    return
                time.sleep(0.05)
            raise AssertionError("daemon not ready")

    def settle(self) -> None:
        """Wait until the commits behind files closed so far (write-back) have landed:
        every request to the daemon's HTTP listener waits for them first."""
        import urllib.request

        assert self.http, "only a daemon with an HTTP listener can be asked"
        with urllib.request.urlopen(f"{self.endpoint}/health", timeout=30):
            pass

    def kill(self) -> None:
        super().kill()
        unmount(self.mountpoint)

    def wait(self, timeout: float = 45.0) -> int:
        code = super().wait(timeout)
        unmount(self.mountpoint)
        return code

    @property
    def mnt(self) -> Path:
        return self.mountpoint


def start_mount(
    spec: DaemonSpec, root: Path, *, http: bool = True, expect_errors: bool = False, **kw: Any
) -> MountDaemon:
    """Write the e2e config under ``root`` and start a mounting daemon."""
    reason = fuse_available()
    if reason:
        pytest.skip(reason)
    root.mkdir(parents=True, exist_ok=True)
    schema = None
    if spec.db == "postgres":
        schema = f"fuse_{uuid.uuid4().hex[:16]}"
        try:
            asyncio.run(_pg_exec(pg_dsn(), f"CREATE SCHEMA {schema}"))
        except Exception as exc:  # a configured but dead server is a failure, not a skip
            pytest.fail(f"cannot reach PostgreSQL at CAIRN_TEST_PG_DSN: {exc}")
    port, admin_port = free_port(), free_port()
    daemon = MountDaemon(
        spec=spec,
        root=root,
        port=port,
        admin_port=admin_port,
        config_path=write_config(root, port, admin_port, spec, schema),
        pg_schema=schema,
        backends={f"disk{i}": root / f"disk{i}" for i in range(len(spec.quotas))},
        quotas={f"disk{i}": q for i, q in enumerate(spec.quotas)},
        expect_errors=expect_errors,
        mountpoint=root / "mnt",
        http=http,
        **kw,
    )
    try:
        daemon.start()
    except BaseException:
        _cleanup(daemon)
        raise
    return daemon


@contextlib.contextmanager
def running_mount(spec: DaemonSpec, root: Path, **kw: Any) -> Iterator[MountDaemon]:
    daemon = start_mount(spec, root, **kw)
    try:
        yield daemon
        if daemon.proc is not None:
            daemon.stop_and_check()
    finally:
        _cleanup(daemon)


@pytest.fixture(scope="module")
def mounted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MountDaemon]:
    with running_mount(DaemonSpec(), _new_root(tmp_path_factory, "fuse")) as daemon:
        yield daemon


MountFactory = Callable[..., MountDaemon]


@pytest.fixture
def mount_factory(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MountFactory]:
    made: list[MountDaemon] = []
    expect = request.node.get_closest_marker("allow_error_logs") is not None

    def make(spec: DaemonSpec | None = None, **kw: Any) -> MountDaemon:
        kw.setdefault("expect_errors", expect)
        daemon = start_mount(spec or DaemonSpec(), _new_root(tmp_path_factory, "fuse"), **kw)
        made.append(daemon)
        return daemon

    try:
        yield make
    finally:
        for daemon in made:
            try:
                if daemon.proc is not None:
                    daemon.stop_and_check()
            finally:
                _cleanup(daemon)
