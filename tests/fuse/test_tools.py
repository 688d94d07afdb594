"""Ordinary programs on the mount: cp -a, rsync -a, tar, git, SQLite."""

from __future__ import annotations

import filecmp
import os
import shutil
import sqlite3
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.fuse.conftest import MountDaemon

pytestmark = [pytest.mark.fuse, pytest.mark.e2e, pytest.mark.slow]


def run(*command: str, cwd: Path | None = None, timeout: float = 600) -> str:
    result = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, f"{command} exited {result.returncode}:\n{result.stderr[-3000:]}"
    return result.stdout


def make_tree(root: Path, files: int, size: int = 1000) -> None:
    """``files`` small files in 50 directories, with modes and times, and a symlink."""
    for i in range(files):
        sub = root / f"d{i % 50:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"f{i:05d}.txt"
        path.write_bytes(os.urandom(size // 2).hex().encode()[:size])
        os.chmod(path, 0o600 if i % 3 else 0o644)
        os.utime(path, ns=(1_500_000_000_000_000_000 + i, 1_500_000_000_000_000_000 + i))
    os.symlink("d00/f00000.txt", root / "link")
    (root / "empty").mkdir()


def same_tree(a: Path, b: Path, *, times: bool = True) -> None:
    """Same names, bytes, modes, mtimes (to the second) and symlinks."""
    names_a = sorted(str(p.relative_to(a)) for p in a.rglob("*"))
    names_b = sorted(str(p.relative_to(b)) for p in b.rglob("*"))
    assert names_a == names_b
    for name in names_a:
        pa, pb = a / name, b / name
        sa, sb = pa.lstat(), pb.lstat()
        assert sa.st_mode == sb.st_mode, name
        if pa.is_symlink():
            assert os.readlink(pa) == os.readlink(pb)
        elif pa.is_file():
            assert filecmp.cmp(pa, pb, shallow=False), name
            if times:
                assert int(sa.st_mtime) == int(sb.st_mtime), name


@pytest.fixture
def here(mounted: MountDaemon) -> Path:
    path = mounted.mnt / f"tools-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    return path


def test_cp_a_and_rsync_a(mounted: MountDaemon, here: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src, 300)
    run("cp", "-a", str(src), str(here / "cp"))
    same_tree(src, here / "cp")
    run("rsync", "-a", f"{src}/", f"{here / 'rsync'}/")
    same_tree(src, here / "rsync")
    # a second rsync finds nothing to do, and a changed file is sent again
    out = run("rsync", "-ai", f"{src}/", f"{here / 'rsync'}/")
    assert out.strip() == ""
    (src / "d01" / "f00001.txt").write_bytes(b"changed")
    out = run("rsync", "-ai", f"{src}/", f"{here / 'rsync'}/")
    assert "f00001.txt" in out
    same_tree(src, here / "rsync")
    run("cp", "-a", str(here / "rsync"), str(tmp_path / "back"))
    same_tree(src, tmp_path / "back")


def test_tar_extract_and_create_5000_files(
    mounted: MountDaemon, here: Path, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    make_tree(src, 5000, size=200)
    archive = tmp_path / "tree.tar"
    run("tar", "-cf", str(archive), "-C", str(src), ".")
    started = time.monotonic()
    (here / "x").mkdir()
    run("tar", "-xf", str(archive), "-C", str(here / "x"))
    took_x = time.monotonic() - started
    same_tree(src, here / "x")
    started = time.monotonic()
    run("tar", "-cf", str(tmp_path / "again.tar"), "-C", str(here / "x"), ".")
    took_c = time.monotonic() - started
    (tmp_path / "out").mkdir()
    run("tar", "-xf", str(tmp_path / "again.tar"), "-C", str(tmp_path / "out"))
    same_tree(src, tmp_path / "out")
    listed = 0
    paginator = mounted.client().get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket="e2e", Prefix=f"{here.name}/x/"):
        listed += page.get("KeyCount", 0)
    assert listed >= 5000
    print(f"tar x of 5000 files: {took_x:.1f} s, tar c: {took_c:.1f} s")


def test_git_clone_and_status(mounted: MountDaemon, here: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    env = ["-c", "user.name=t", "-c", "user.email=t@example.com"]
    run("git", "init", "-q", "-b", "main", str(repo))
    make_tree(repo / "src", 200)
    run("git", *env, "-C", str(repo), "add", ".")
    run("git", *env, "-C", str(repo), "commit", "-qm", "first")
    (repo / "src" / "d00" / "f00000.txt").write_text("second")
    run("git", *env, "-C", str(repo), "commit", "-qam", "second")
    run("git", "clone", "-q", str(repo), str(here / "clone"))
    clone = here / "clone"
    assert run("git", "-C", str(clone), "status", "--porcelain") == ""
    assert run("git", "-C", str(clone), "fsck", "--no-progress").strip() == ""
    log = run("git", "-C", str(clone), "log", "--format=%s")
    assert log.split() == ["second", "first"]
    (clone / "new.txt").write_text("new")
    (clone / "src" / "d01" / "f00001.txt").write_text("edit")
    status = run("git", "-C", str(clone), "status", "--porcelain")
    assert sorted(status.splitlines()) == [" M src/d01/f00001.txt", "?? new.txt"]
    run("git", *env, "-C", str(clone), "add", ".")
    run("git", *env, "-C", str(clone), "commit", "-qm", "third")
    assert run("git", "-C", str(clone), "status", "--porcelain") == ""


def test_sqlite_database_on_the_mount(mounted: MountDaemon, here: Path) -> None:
    path = here / "db.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT, blob BLOB)")
    for batch in range(20):
        conn.executemany(
            "INSERT INTO t (name, blob) VALUES (?, ?)",
            [(f"row {batch}-{i}", os.urandom(200)) for i in range(100)],
        )
        conn.commit()
    conn.execute("CREATE INDEX t_name ON t (name)")
    conn.execute("DELETE FROM t WHERE id % 2 = 0")
    conn.commit()
    conn.close()
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM t").fetchone() == (1000,)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert conn.execute("SELECT name FROM t WHERE name = 'row 7-10'").fetchone() == ("row 7-10",)
    conn.close()
    # the same database read back through S3 is identical
    copy = here.parent / f"{here.name}-copy.sqlite"
    body = mounted.client().get_object(Bucket="e2e", Key=f"{here.name}/db.sqlite")["Body"].read()
    assert body == path.read_bytes()
    copy.write_bytes(body)
    assert sqlite3.connect(copy).execute("SELECT count(*) FROM t").fetchone() == (1000,)
    shutil.rmtree(here)
