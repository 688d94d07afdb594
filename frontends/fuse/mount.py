"""Mount and unmount: runs pyfuse3's loop in asyncio next to the rest of the daemon."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from appliance.services.files import FileService
from frontends.fuse.readiness import install, uninstall

log = logging.getLogger("cairn.fuse")


class FuseUnavailable(RuntimeError):
    """FUSE cannot be used here (no pyfuse3, no /dev/fuse, or the mount failed)."""


@dataclass(frozen=True, slots=True)
class MountOptions:
    bucket: str | None
    attr_timeout: float
    entry_timeout: float
    allow_other: bool
    read_ahead_kb: int = 0


def _import_pyfuse3() -> object:
    try:
        import pyfuse3
        import pyfuse3.asyncio
    except ImportError as exc:
        raise FuseUnavailable(
            f"pyfuse3 is not installed ({exc}); install libfuse3-dev and `pip install pyfuse3`"
        ) from exc
    pyfuse3.asyncio.enable()
    return pyfuse3


def check_available(mountpoint: Path) -> None:
    """Raise ``FuseUnavailable`` with a clear reason before anything is opened."""
    _import_pyfuse3()
    if not os.path.exists("/dev/fuse"):
        raise FuseUnavailable(
            "/dev/fuse does not exist (load the fuse module, or run the "
            "container with --device /dev/fuse --cap-add SYS_ADMIN)"
        )
    if not mountpoint.is_dir():
        raise FuseUnavailable(f"mount point {mountpoint} is not a directory")


def set_read_ahead(target: str, kib: int) -> None:
    """Raise the kernel's read-ahead for the mount at ``target`` (a real path, resolved
    before mounting: never ``stat`` the mount from the loop that answers it).
    Best effort, root only."""
    if kib <= 0:
        return
    device: str | None = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as info:
            for line in info:
                fields = line.split()
                if len(fields) > 4 and fields[4] == target:
                    device = fields[2]
        if device is None:
            raise OSError(f"{target} is not in /proc/self/mountinfo")
        Path(f"/sys/class/bdi/{device}/read_ahead_kb").write_text(str(kib))
    except OSError as exc:
        log.info("kernel read-ahead left at its default (%s)", exc)


def force_unmount(mountpoint: Path) -> None:
    """Best effort: lazily detach a mount left by a dead process."""
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool is None:
        return
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run([tool, "-u", "-z", str(mountpoint)], capture_output=True, timeout=10)


async def run_mount(
    files: FileService, mountpoint: Path, options: MountOptions, stop: asyncio.Event
) -> None:
    """Mount, serve until ``stop`` is set (or the mount is unmounted from outside),
    then unmount. Raises ``FuseUnavailable`` when the mount cannot be made."""
    pyfuse3 = _import_pyfuse3()
    from frontends.fuse.ops import CairnOperations

    ops = CairnOperations(
        files,
        bucket=options.bucket,
        attr_timeout=options.attr_timeout,
        entry_timeout=options.entry_timeout,
    )
    fuse_options = set(pyfuse3.default_options)  # type: ignore[attr-defined]
    fuse_options |= {"fsname=cairn", "subtype=cairn", "default_permissions"}
    if options.allow_other:
        fuse_options.add("allow_other")
    # resolved before mounting (resolving stats the path) and off the loop
    target = await asyncio.to_thread(os.path.realpath, mountpoint)
    try:
        pyfuse3.init(ops, target, fuse_options)  # type: ignore[attr-defined]
    except RuntimeError as exc:
        raise FuseUnavailable(f"cannot mount at {mountpoint}: {exc}") from exc
    log.info("mounted the pool at %s", mountpoint)
    compat = sys.modules["pyfuse3.asyncio"]
    readiness = install(compat, asyncio.get_running_loop())
    main = asyncio.ensure_future(pyfuse3.main(max_tasks=64))  # type: ignore[attr-defined]

    async def read_ahead_after_init() -> None:
        # the kernel sets read-ahead when it handles FUSE_INIT's reply: set ours after
        for _ in range(100):
            if ops.initialized:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        await asyncio.to_thread(set_read_ahead, target, options.read_ahead_kb)

    tuning = asyncio.ensure_future(read_ahead_after_init())
    waiter = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({main, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        tuning.cancel()
        if not main.done():
            pyfuse3.terminate()  # type: ignore[attr-defined]
            try:
                await asyncio.wait_for(asyncio.shield(main), 10)
            except TimeoutError:
                main.cancel()
        with contextlib.suppress(BaseException):
            main.result()
        uninstall(compat, readiness)
        await files.commit_all()
        pyfuse3.close(unmount=True)  # type: ignore[attr-defined]
        log.info("unmounted %s", mountpoint)
