"""The ``cache`` config section: defaults, sizes with units, errors, and its summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from appliance.config import CacheConfig, CairnConfig, ConfigError, parse_config
from frontends.cli import cli, render_starter

pytestmark = pytest.mark.unit
MiB = 1024**2
BASE_DIR = Path("/etc/cairn")


def parse(cache: Any = None, **sections: Any) -> CairnConfig:
    data: dict[str, Any] = {"backends": [{"name": "d", "type": "local", "path": "/srv/d"}]}
    if cache is not None:
        data["cache"] = cache
    data.update(sections)
    return parse_config(data, env={}, base_dir=BASE_DIR)


def problems(cache: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(cache)
    return info.value.problems


def test_defaults_memory_on_disk_off() -> None:
    cache = parse().cache
    assert cache == CacheConfig()
    assert (cache.max_size, cache.max_object_size, cache.ttl) == (256 * MiB, 8 * MiB, 3600)
    assert cache.disk_dir is None
    assert parse(cache=None).cache == parse({}).cache  # an empty section means defaults


def test_sizes_take_units_and_paths_follow_the_config_file() -> None:
    cache = parse(
        {
            "max_size": "64MiB",
            "max_object_size": "1MiB",
            "ttl": 0,
            "disk_dir": "./cache",
            "disk_max_size": "2GB",
        }
    ).cache
    assert (cache.max_size, cache.max_object_size, cache.ttl) == (64 * MiB, MiB, 0)
    assert cache.disk_dir == BASE_DIR / "cache"
    assert cache.disk_max_size == 2 * 10**9


def test_max_object_size_left_unset_follows_a_smaller_max_size() -> None:
    cache = parse({"max_size": "1MiB"}).cache
    assert cache.max_size == MiB  # the effective cap is applied where the cache is built


@pytest.mark.parametrize(
    ("cache", "line"),
    [
        ({"max_size": "lots"}, "cache.max_size: invalid size 'lots'"),
        ({"max_size": "1MiB", "max_object_size": "2MiB"}, "cache.max_object_size: must not"),
        ({"ttl": -1}, "cache.ttl: must be at least 0, got -1"),
        ({"ttl": True}, "cache.ttl: expected a number of seconds, got true"),
        ({"disk_dir": ""}, "cache.disk_dir: must not be empty"),
        ({"disk_dir": "c", "disk_max_size": 0}, "cache.disk_max_size: must be greater than 0"),
        ({"max_sise": 1}, "cache.max_sise: unknown key (did you mean 'max_size'?)"),
    ],
)
def test_errors_name_the_key(cache: dict[str, Any], line: str) -> None:
    found = problems(cache)
    assert len(found) == 1 and found[0].startswith(line), found


def test_validate_summarises_the_cache(tmp_path: Path) -> None:
    path = tmp_path / "cairn.yaml"
    path.write_text(
        "cache: {max_size: 64MiB, disk_dir: /var/cache/cairn, disk_max_size: 4GiB}\n"
        "backends: [{name: d, type: local, path: d}]\n"
    )
    result = CliRunner().invoke(cli, ["validate", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert (
        "cache:     memory 64.0 MiB (chunks up to 8.0 MiB, ttl 3600 s), "
        "disk 4.0 GiB at /var/cache/cairn" in result.stdout
    )
    path.write_text("cache: {max_size: 0}\nbackends: [{name: d, type: local, path: d}]\n")
    result = CliRunner().invoke(cli, ["validate", "--config", str(path)])
    assert "cache:     memory off, disk off" in result.stdout


def test_the_starter_config_has_the_cache_section(tmp_path: Path) -> None:
    path = tmp_path / "cairn.yaml"
    path.write_text(render_starter())
    result = CliRunner().invoke(cli, ["validate", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert "cache:     memory 256.0 MiB" in result.stdout
