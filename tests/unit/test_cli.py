"""The ``cairn`` command line: frontends/cli.py (validate, init, serve)."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from appliance.config import CairnConfig, load_config, parse_config
from frontends.cli import cli, render_starter, summarize

pytestmark = pytest.mark.unit

S3_SECRET = "s3-Secret-Value-That-Must-Not-Leak"
CRED_SECRET = "cred-Secret-Value-That-Must-Not-Leak"
PG_PASSWORD = "pg-Password-That-Must-Not-Leak"

GOOD = f"""
database:
  postgres:
    host: db.internal
    user: cairn
    password: ${{PGPASSWORD}}
    database: cairn
pool:
  placement: spread
  replication_factor: 2
backends:
  - name: disk1
    type: local
    path: ./data/disk1
    quota_bytes: 10GiB
  - name: oci
    type: s3
    endpoint: https://objectstorage.example.com
    bucket: cairn-pool
    prefix: pool
    access_key: OCIACCESSKEY
    secret_key: ${{OCI_SECRET}}
    quota_bytes: 20GB
    api_request_limit: 50000
    egress_byte_limit: 10TB
  - name: old
    type: local
    path: /srv/old
    read_only: true
buckets:
  - name: photos
    credentials:
      - access_key: AKIAPHOTOS0000000001
        secret_key: "{CRED_SECRET}"
      - access_key: AKIAPHOTOS0000000002
        secret_key: "{CRED_SECRET}"
  - name: backups
"""

BAD = """
server:
  port: abc
pool:
  placement: fast
backends:
  - name: disk1
    type: local
    path: ./d
    quota_bytes: 10XB
  - name: disk2
    type: gcs
"""

BAD_LINES = [
    "  server.port: expected an integer, got 'abc'",
    "  pool.placement: must be 'pack' or 'spread', got 'fast'",
    "  backends[0].quota_bytes: invalid size '10XB': use a number with an optional unit "
    "(B, KB, MB, GB, TB, PB, KiB, MiB, GiB, TiB, PiB)",
    "  backends[1].type: must be one of s3, local, not 'gcs'",
]

ENV = {"PGPASSWORD": PG_PASSWORD, "OCI_SECRET": S3_SECRET}


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.delenv("CAIRN_CONFIG", raising=False)
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    return CliRunner()


def write(tmp_path: Path, text: str, name: str = "cairn.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def assert_no_secrets(text: str) -> None:
    for secret in (S3_SECRET, CRED_SECRET, PG_PASSWORD):
        assert secret not in text


# --------------------------------------------------------------------------- validate


def test_validate_success_prints_a_summary(runner: CliRunner, tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    result = runner.invoke(cli, ["validate", "--config", str(path)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert result.stderr == ""
    assert f"{path}: configuration is valid" in out
    assert "database:  postgres at postgresql://cairn:***@db.internal:5432/cairn" in out
    assert "pool:      chunk size 8.0 MiB, placement spread, replication 2" in out
    assert re.search(
        rf"disk1 +local +{re.escape(str(tmp_path / 'data/disk1'))} +\[quota 10.0 GiB\]", out
    )
    assert re.search(
        r"oci +s3 +https://objectstorage.example.com bucket cairn-pool prefix pool/ +"
        r"\[quota 18.6 GiB, 50,000 requests/month, egress 9.1 TiB/month\]",
        out,
    )
    assert re.search(r"old +local +/srv/old +\[quota unlimited, read-only\]", out)
    assert "capacity:  unlimited: 1 backend without a quota" in out
    assert "the others add up to 28.6 GiB" in out
    assert "buckets:   2" in out
    assert re.search(r"photos +2 credentials", out)
    assert re.search(r"backups +no credentials", out)
    assert_no_secrets(result.output)
    assert "OCIACCESSKEY" not in out


def test_validate_all_quotas_sums_capacity(runner: CliRunner, tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "backends:\n"
        "  - {type: local, name: a, path: a, quota_bytes: 1GiB}\n"
        "  - {type: local, name: b, path: b, quota_bytes: 3GiB, read_only: true}\n",
    )
    result = runner.invoke(cli, ["validate", "-c", str(path)])
    assert result.exit_code == 0, result.output
    assert "capacity:  4.0 GiB, of which 3.0 GiB is read-only" in result.stdout
    assert f"database:  sqlite at {tmp_path / 'cairn.db'}" in result.stdout


def test_validate_failure_lists_every_problem(runner: CliRunner, tmp_path: Path) -> None:
    path = write(tmp_path, BAD)
    result = runner.invoke(cli, ["validate", "--config", str(path)])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [f"config error in {path}:", *BAD_LINES]


def test_validate_missing_env_var(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OCI_SECRET")
    path = write(tmp_path, GOOD)
    result = runner.invoke(cli, ["validate", "--config", str(path)])
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"config error in {path}:",
        "  backends[1].secret_key: environment variable OCI_SECRET is not set",
    ]


def test_validate_missing_file(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    result = runner.invoke(cli, ["validate", "--config", str(path)])
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [f"config error in {path}:", "  file does not exist"]


def test_validate_reads_cairn_config_env(runner: CliRunner, tmp_path: Path) -> None:
    path = write(tmp_path, GOOD, "other.yaml")
    result = runner.invoke(cli, ["validate"], env={"CAIRN_CONFIG": str(path)})
    assert result.exit_code == 0, result.output
    assert f"{path}: configuration is valid" in result.stdout


def test_validate_defaults_to_cairn_yaml(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, GOOD)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(cli, ["validate"])
    assert result.exit_code == 0, result.output
    assert "cairn.yaml: configuration is valid" in result.stdout


# --------------------------------------------------------------------------- subprocess


def run_cairn(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CAIRN_CONFIG"}
    env.update(ENV)
    return subprocess.run(
        [sys.executable, "-m", "frontends.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_subprocess_validate_success_and_failure(tmp_path: Path) -> None:
    good = write(tmp_path, GOOD)
    bad = write(tmp_path, BAD, "bad.yaml")

    ok = run_cairn("validate", "--config", str(good), cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert f"{good}: configuration is valid" in ok.stdout
    assert ok.stderr == ""
    assert_no_secrets(ok.stdout)

    failed = run_cairn("validate", "--config", str(bad), cwd=tmp_path)
    assert failed.returncode == 1
    assert failed.stdout == ""
    assert failed.stderr.splitlines() == [f"config error in {bad}:", *BAD_LINES]


def test_installed_console_script(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "cairn"
    if not script.exists():
        pytest.skip("the cairn console script is not installed in this environment")
    path = write(tmp_path, BAD)
    result = subprocess.run(
        [str(script), "validate", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.splitlines()[0] == f"config error in {path}:"


def test_subprocess_init_then_validate(tmp_path: Path) -> None:
    result = run_cairn("init", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "cairn.yaml").exists()
    checked = run_cairn("validate", cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr


# --------------------------------------------------------------------------- init


def test_init_writes_a_valid_private_config(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "cairn.yaml"
    result = runner.invoke(cli, ["init", "--output", str(path)])
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    config = load_config(path, env={})
    assert [b.name for b in config.backends] == ["disk1"]
    assert config.backends[0].path == tmp_path / "data/disk1"  # type: ignore[union-attr]
    [bucket] = config.buckets
    [cred] = bucket.credentials
    assert cred.access_key in result.stdout
    assert cred.secret_key.get_secret_value() not in result.output
    validated = runner.invoke(cli, ["validate", "--config", str(path)])
    assert validated.exit_code == 0, validated.output


def test_init_documents_every_section() -> None:
    text = render_starter()
    for key in ("server:", "database:", "sqlite:", "# postgres:", "pool:", "backends:", "buckets:"):
        assert key in text
    assert "${B2_SECRET_KEY}" in text
    assert "path: ./data/disk1" in text
    commented = [line for line in text.splitlines() if "#" in line]
    assert len(commented) > 30


def test_init_generates_fresh_credentials() -> None:
    def creds(text: str) -> Any:
        return yaml.safe_load(text)["buckets"][0]["credentials"][0]

    first, second = creds(render_starter()), creds(render_starter())
    assert first["access_key"] != second["access_key"]
    assert first["secret_key"] != second["secret_key"]
    assert re.fullmatch(r"[A-Z0-9]{20}", first["access_key"])
    assert re.fullmatch(r"[A-Za-z0-9]{40}", first["secret_key"])


def test_init_s3_example_validates_when_uncommented(tmp_path: Path) -> None:
    lines = render_starter().splitlines()
    start = lines.index("  # - name: b2")
    out = [
        "  " + line[4:] if i >= start and line.startswith("  # ") else line
        for i, line in enumerate(lines)
    ]
    path = write(tmp_path, "\n".join(out))
    config = load_config(path, env={"B2_ACCESS_KEY": "key", "B2_SECRET_KEY": "secret"})
    assert [b.type for b in config.backends] == ["local", "s3"]


def test_init_refuses_to_overwrite(runner: CliRunner, tmp_path: Path) -> None:
    path = write(tmp_path, "keep me\n")
    result = runner.invoke(cli, ["init", "--output", str(path)])
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: {path} already exists; use --force to overwrite it"
    assert path.read_text() == "keep me\n"


def test_init_force_overwrites(runner: CliRunner, tmp_path: Path) -> None:
    path = write(tmp_path, "keep me\n")
    result = runner.invoke(cli, ["init", "--output", str(path), "--force"])
    assert result.exit_code == 0, result.output
    assert isinstance(load_config(path, env={}), CairnConfig)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["cairn.yaml"]  # no temp file left


def test_init_default_output_is_cairn_yaml(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(cli, ["init"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cairn.yaml").exists()


def test_init_into_missing_directory(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(cli, ["init", "-o", str(tmp_path / "no" / "cairn.yaml")])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: cannot write")


# --------------------------------------------------------------------------- serve


@pytest.fixture
def fake_daemon(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []
    module = types.ModuleType("frontends.daemon")

    def serve(
        config: CairnConfig, *, mode: str, mount: Path | None, bucket: str | None = None
    ) -> int:
        calls.append({"config": config, "mode": mode, "mount": mount, "bucket": bucket})
        return 3

    module.serve = serve  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "frontends.daemon", module)
    return calls


def test_serve_hands_over_to_the_daemon(
    runner: CliRunner, tmp_path: Path, fake_daemon: list[dict[str, Any]]
) -> None:
    path = write(tmp_path, GOOD)
    result = runner.invoke(
        cli, ["serve", "--config", str(path), "--mode", "api", "--mount", str(tmp_path)]
    )
    assert result.exit_code == 3, result.output
    [call] = fake_daemon
    assert call["mode"] == "api"
    assert call["mount"] == tmp_path
    assert call["config"].database.kind == "postgres"


def test_mount_hands_over_to_the_daemon_in_mount_mode(
    runner: CliRunner, tmp_path: Path, fake_daemon: list[dict[str, Any]]
) -> None:
    path = write(tmp_path, "backends: [{type: local, name: d, path: d}]\n")
    result = runner.invoke(cli, ["mount", str(tmp_path), "--config", str(path), "--bucket", "b1"])
    assert result.exit_code == 3, result.output
    [call] = fake_daemon
    assert (call["mode"], call["mount"], call["bucket"]) == ("mount", tmp_path, "b1")


def test_serve_defaults_to_mode_all(
    runner: CliRunner, tmp_path: Path, fake_daemon: list[dict[str, Any]]
) -> None:
    path = write(tmp_path, "backends: [{type: local, name: d, path: d}]\n")
    result = runner.invoke(cli, ["serve", "--config", str(path)])
    assert result.exit_code == 3, result.output
    assert fake_daemon[0]["mode"] == "all"
    assert fake_daemon[0]["mount"] is None


@pytest.mark.parametrize("mode", ["api", "worker"])
def test_serve_refuses_split_modes_on_sqlite(
    runner: CliRunner, tmp_path: Path, fake_daemon: list[dict[str, Any]], mode: str
) -> None:
    path = write(tmp_path, "backends: [{type: local, name: d, path: d}]\n")
    result = runner.invoke(cli, ["serve", "--config", str(path), "--mode", mode])
    assert result.exit_code == 1
    assert "SQLite allows a single instance" in result.stderr
    assert f"--mode {mode} needs database.postgres" in result.stderr
    assert fake_daemon == []


def test_serve_refuses_mount_for_a_worker(
    runner: CliRunner, tmp_path: Path, fake_daemon: list[dict[str, Any]]
) -> None:
    path = write(tmp_path, GOOD)
    result = runner.invoke(
        cli, ["serve", "-c", str(path), "--mode", "worker", "--mount", str(tmp_path)]
    )
    assert result.exit_code == 1
    assert "--mount needs --mode all or api" in result.stderr
    assert fake_daemon == []


def test_serve_reports_config_errors(
    runner: CliRunner, tmp_path: Path, fake_daemon: list[dict[str, Any]]
) -> None:
    path = write(tmp_path, BAD)
    result = runner.invoke(cli, ["serve", "--config", str(path)])
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [f"config error in {path}:", *BAD_LINES]
    assert fake_daemon == []


def test_serve_without_daemon_exits_2(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "frontends.daemon", None)  # makes the import fail
    path = write(tmp_path, "backends: [{type: local, name: d, path: d}]\n")
    result = runner.invoke(cli, ["serve", "--config", str(path)])
    assert result.exit_code == 2
    assert "serve is not available yet" in result.stderr


def test_help_lists_commands(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["--help"])
    assert result.exit_code == 0
    for command in ("validate", "init", "serve"):
        assert command in result.stdout


def test_summary_describes_encryption_without_key_material() -> None:
    key = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
    config = parse_config(
        {
            "encryption": {
                "enabled": True,
                "key": {"inline": key},
                "previous_keys": [{"file": "/etc/cairn/old.key"}],
            },
            "backends": [{"name": "d", "type": "local", "path": "/srv/d"}],
            "buckets": [{"name": "plain", "encryption": False}, {"name": "other"}],
        },
        env={},
        base_dir=Path("/etc/cairn"),
    )
    lines = summarize(config)
    assert "encryption: on by default, key inline, 1 previous key, off for plain" in lines
    assert key not in "\n".join(lines)
    plain = parse_config(
        {"backends": [{"name": "d", "type": "local", "path": "/srv/d"}]},
        env={},
        base_dir=Path("/etc/cairn"),
    )
    assert not any(line.startswith("encryption") for line in summarize(plain))
