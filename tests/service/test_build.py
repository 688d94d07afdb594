"""The wired pool: a configuration opened into a store and backends, on both databases."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from appliance.build import POOL_SECRET_SETTING, open_pool
from appliance.config import CairnConfig, parse_config
from appliance.meta.errors import StoreLocked
from appliance.meta.models import Permission
from tests.fixtures_moto import MotoS3

pytestmark = pytest.mark.service


def make_config(
    database: Any, tmp_path: Path, moto: MotoS3, bucket: str, quota: str = "1GiB"
) -> CairnConfig:
    raw = {
        "database": database,
        "backends": [
            {"name": "disk", "type": "local", "path": "disk", "quota_bytes": quota},
            {
                "name": "cloud",
                "type": "s3",
                "endpoint": moto.endpoint_url,
                "bucket": bucket,
                "prefix": "cairn",
                "access_key": moto.access_key,
                "secret_key": moto.secret_key,
                "path_style": True,
            },
        ],
        "buckets": [
            {
                "name": "photos",
                "credentials": [
                    {"access_key": "PHOTOSKEY0000001", "secret_key": "photos-secret-0001"}
                ],
            }
        ],
    }
    return parse_config(raw, env={}, base_dir=tmp_path)


async def test_open_pool_records_config_and_reaches_backends(
    database: Any, tmp_path: Path, moto_s3: MotoS3
) -> None:
    bucket = moto_s3.new_bucket()
    pool = await open_pool(make_config(database, tmp_path, moto_s3, bucket))
    try:
        space = {s.name: s for s in await pool.store.get_space()}
        assert (space["disk"].quota_bytes, space["cloud"].quota_bytes) == (1 << 30, None)
        assert [b.name for b in await pool.store.list_buckets()] == ["photos"]
        cred = await pool.store.get_credential("PHOTOSKEY0000001")
        assert cred is not None and Permission.WRITE in cred.grants["photos"]
        secret = await pool.store.get_setting(POOL_SECRET_SETTING)
        assert secret is not None and len(secret) == 64
        for backend in pool.backends.values():
            await backend.put("probe/one", b"hello", size=5)
            stream = await backend.get("probe/one")
            assert b"".join([piece async for piece in stream]) == b"hello"
        assert (tmp_path / "disk" / "probe" / "one").read_bytes() == b"hello"
        assert moto_s3.keys(bucket) == ["cairn/probe/one"]
    finally:
        await pool.close()
        await pool.close()
    # reopening keeps the pool secret and applies a new quota
    again = await open_pool(make_config(database, tmp_path, moto_s3, bucket, quota="2GiB"))
    try:
        assert await again.store.get_setting(POOL_SECRET_SETTING) == secret
        space = {s.name: s for s in await again.store.get_space()}
        assert space["disk"].quota_bytes == 2 << 30
    finally:
        await again.close()


async def test_second_instance_on_one_sqlite_file_is_refused(
    tmp_path: Path, moto_s3: MotoS3
) -> None:
    config = make_config(
        {"sqlite": {"path": str(tmp_path / "one.db")}}, tmp_path, moto_s3, "unused"
    )
    first = await open_pool(config)
    try:
        with pytest.raises(StoreLocked):
            await open_pool(config)
    finally:
        await first.close()
