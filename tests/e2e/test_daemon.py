"""The daemon as a user runs it: ``cairn serve`` in a subprocess."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(tmp_path: Path, port: int, extra_backend: dict[str, object] | None = None) -> Path:
    backends: list[dict[str, object]] = [
        {"name": f"disk{i}", "type": "local", "path": f"disk{i}", "quota_bytes": "64MiB"}
        for i in range(3)
    ]
    if extra_backend:
        backends.append(extra_backend)
    config = {
        "server": {"host": "127.0.0.1", "port": port, "admin_port": free_port()},
        "database": {"sqlite": {"path": "cairn.db"}},
        "backends": backends,
        "buckets": [
            {
                "name": "e2e",
                "credentials": [
                    {"access_key": "E2EKEY0000000001", "secret_key": "e2e-secret-000001"}
                ],
            }
        ],
    }
    path = tmp_path / "cairn.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def get(url: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def start(config: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "frontends.cli", "serve", "--config", str(config), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_up(proc: subprocess.Popen[str], port: int, deadline: float = 20) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(
                f"daemon exited early: {proc.stdout.read() if proc.stdout else ''}"
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("daemon did not start listening")


def stop(proc: subprocess.Popen[str]) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=20)
    return proc.returncode, out


def test_serve_answers_health_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    proc = start(write_config(tmp_path, port))
    try:
        wait_up(proc, port)
        assert get(f"http://127.0.0.1:{port}/health") == (200, {"status": "ok"})
        assert get(f"http://127.0.0.1:{port}/health/ready") == (
            200,
            {"ready": True, "problems": {}},
        )
    finally:
        code, out = stop(proc)
    assert code == 0, out
    assert "stopping" in out
    assert (tmp_path / "cairn.db").exists()
    assert all((tmp_path / f"disk{i}").is_dir() for i in range(3))


def test_ready_reports_a_dead_backend_by_name(tmp_path: Path) -> None:
    port = free_port()
    dead = {
        "name": "gone",
        "type": "s3",
        "endpoint": f"http://127.0.0.1:{free_port()}",
        "bucket": "nothing",
        "access_key": "x",
        "secret_key": "y",
        "path_style": True,
        "connect_timeout": 1,
    }
    proc = start(write_config(tmp_path, port, dead))
    try:
        wait_up(proc, port)
        status, body = get(f"http://127.0.0.1:{port}/health/ready")
    finally:
        stop(proc)
    assert status == 503
    assert body["ready"] is False
    assert list(body["problems"]) == ["backend:gone"]  # type: ignore[call-overload]


def test_sqlite_refuses_split_modes(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "frontends.cli",
            "serve",
            "--config",
            str(write_config(tmp_path, free_port())),
            "--mode",
            "api",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "SQLite allows a single instance" in result.stderr


def test_second_daemon_on_the_same_sqlite_file_is_refused(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, port)
    first = start(config)
    try:
        wait_up(first, port)
        other = tmp_path / "other.yaml"
        raw = yaml.safe_load(config.read_text())
        raw["server"]["port"] = free_port()
        raw["server"]["admin_port"] = free_port()
        other.write_text(yaml.safe_dump(raw))
        result = subprocess.run(
            [sys.executable, "-m", "frontends.cli", "serve", "--config", str(other)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        stop(first)
    assert result.returncode == 1
    assert "in use by another Cairn process" in result.stdout + result.stderr
