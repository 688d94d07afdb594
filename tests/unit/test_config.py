"""Configuration loading and validation: appliance/config.py."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError

from appliance.config import (
    BucketConfig,
    CairnConfig,
    ConfigError,
    CredentialConfig,
    DatabaseConfig,
    LocalBackendConfig,
    PoolConfig,
    PostgresConfig,
    S3BackendConfig,
    ServerConfig,
    SqliteConfig,
    format_size,
    load_config,
    parse_config,
    parse_size,
)

pytestmark = pytest.mark.unit

BASE = Path("/etc/cairn")
SIZE_HELP = "use a number with an optional unit (B, KB, MB, GB, TB, PB, KiB, MiB, GiB, TiB, PiB)"
S3_SECRET = "s3-Secret-Value-That-Must-Not-Leak"
CRED_SECRET = "cred-Secret-Value-That-Must-Not-Leak"
PG_PASSWORD = "pg-Password-That-Must-Not-Leak"


def local(name: str = "disk1", path: object = "/srv/disk1", **extra: Any) -> dict[str, Any]:
    return {"type": "local", "name": name, "path": path, **extra}


def s3(name: str = "b2", **extra: Any) -> dict[str, Any]:
    return {
        "type": "s3",
        "name": name,
        "endpoint": "https://s3.example.com",
        "bucket": "pool",
        "access_key": "AKIAEXAMPLE",
        "secret_key": S3_SECRET,
        **extra,
    }


def minimal(**sections: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"backends": [local()]}
    data.update(sections)
    return data


def parse(data: object, env: dict[str, str] | None = None) -> CairnConfig:
    return parse_config(data, env=env or {}, base_dir=BASE)


def problems(data: object, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(data, env)
    return info.value.problems


# --------------------------------------------------------------------------- defaults


def test_minimal_config_gets_documented_defaults() -> None:
    config = parse(minimal())
    assert config.server == ServerConfig()
    assert config.server.host == "127.0.0.1"
    assert config.server.port == 9000
    assert config.server.admin_port == 9001
    assert config.server.region == "us-east-1"
    assert config.server.domain is None
    assert config.server.max_request_body == 5 * 1024**4
    assert config.database.kind == "sqlite"
    assert config.database.sqlite == SqliteConfig(path=BASE / "cairn.db")
    assert config.database.postgres is None
    assert config.pool == PoolConfig()
    assert config.pool.chunk_size == 8 * 1024**2
    assert config.pool.placement == "pack"
    assert config.pool.replication_factor == 1
    assert config.pool.gc_delay_seconds == 3600
    assert config.buckets == []
    [backend] = config.backends
    assert isinstance(backend, LocalBackendConfig)
    assert backend.quota_bytes is None
    assert backend.api_request_limit is None
    assert backend.egress_byte_limit is None
    assert backend.ingress_byte_limit is None
    assert backend.read_only is False


def test_s3_backend_defaults() -> None:
    backend = parse(minimal(backends=[s3(endpoint=None)])).backends[0]
    assert isinstance(backend, S3BackendConfig)
    assert backend.endpoint is None
    assert backend.region == "us-east-1"
    assert backend.prefix == ""
    assert backend.path_style is False
    assert backend.max_connections == 32
    assert backend.connect_timeout == 10
    assert backend.read_timeout == 60
    assert backend.secret_key.get_secret_value() == S3_SECRET


def test_null_sections_mean_defaults() -> None:
    """A section whose keys are all commented out is YAML null."""
    config = parse(minimal(server=None, database=None, pool=None, buckets=None))
    assert config.server == ServerConfig()
    assert config.database.kind == "sqlite"
    assert config.pool == PoolConfig()
    assert config.buckets == []


def test_empty_sqlite_section_means_sqlite_defaults() -> None:
    config = parse(minimal(database={"sqlite": None}))
    assert config.database.sqlite == SqliteConfig(path=BASE / "cairn.db")


def test_models_are_frozen() -> None:
    config = parse(minimal())
    with pytest.raises(ValidationError):
        config.server.port = 1  # type: ignore[misc]


def test_direct_construction_works_without_yaml() -> None:
    config = CairnConfig(backends=[LocalBackendConfig(type="local", name="d", path=Path("x"))])
    assert config.database.kind == "sqlite"
    backend = config.backends[0]
    assert isinstance(backend, LocalBackendConfig)
    assert backend.path == Path("x")  # no base dir: left as given


# --------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (0, 0),
        (512, 512),
        ("0", 0),
        ("512", 512),
        ("512B", 512),
        ("512 b", 512),
        ("1KB", 1000),
        ("10GB", 10 * 1000**3),
        ("10gb", 10 * 1000**3),
        ("10 GiB", 10 * 1024**3),
        ("10gib", 10 * 1024**3),
        ("1.5TB", 1_500_000_000_000),
        ("1.5 TiB", 3 * 1024**4 // 2),
        ("8MiB", 8 * 1024**2),
        ("2PB", 2 * 1000**5),
        ("1PiB", 1024**5),
        ("64KiB", 65536),
        (" 3 MB ", 3_000_000),
        ("0.5KiB", 512),
        ("1.3B", 1),  # rounded down to whole bytes
    ],
)
def test_parse_size_accepts(text: int | str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text", ["10XB", "abc", "", "GB", "10 G B", "1e9", "10K", "1,000", "10  GB"]
)
def test_parse_size_rejects_with_unit_list(text: str) -> None:
    with pytest.raises(ValueError, match="use a number with an optional unit") as info:
        parse_size(text)
    assert str(info.value) == f"invalid size {text!r}: {SIZE_HELP}"


@pytest.mark.parametrize("value", ["-1GB", "-1", -1])
def test_parse_size_rejects_negative(value: int | str) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(value)


@pytest.mark.parametrize("value", [True, 1.5, None, [1]])
def test_parse_size_rejects_other_types(value: Any) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(value)


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (512, "512 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (8 * 1024**2, "8.0 MiB"),
        (10 * 1024**3, "10.0 GiB"),
        (10 * 1000**3, "9.3 GiB"),
        (5 * 1024**4, "5.0 TiB"),
        (3 * 1024**5, "3.0 PiB"),
        (2048 * 1024**5, "2048.0 PiB"),
    ],
)
def test_format_size(n: int, text: str) -> None:
    assert format_size(n) == text


def test_every_size_field_takes_units() -> None:
    config = parse(
        minimal(
            server={"max_request_body": "1GiB"},
            pool={"chunk_size": "4MiB"},
            backends=[
                local(
                    quota_bytes="10GB",
                    egress_byte_limit="1TB",
                    ingress_byte_limit="2 TiB",
                )
            ],
        )
    )
    assert config.server.max_request_body == 1024**3
    assert config.pool.chunk_size == 4 * 1024**2
    backend = config.backends[0]
    assert backend.quota_bytes == 10 * 1000**3
    assert backend.egress_byte_limit == 1000**4
    assert backend.ingress_byte_limit == 2 * 1024**4


def test_bad_quota_is_one_line_naming_the_key() -> None:
    data = minimal(backends=[local(), local("disk2", "/srv/d2", quota_bytes="10XB")])
    assert problems(data) == [f"backends[1].quota_bytes: invalid size '10XB': {SIZE_HELP}"]


def test_negative_and_garbage_sizes_in_config() -> None:
    data = minimal(
        backends=[local(quota_bytes="-1GB", egress_byte_limit="abc", ingress_byte_limit=True)]
    )
    assert problems(data) == [
        f"backends[0].quota_bytes: invalid size '-1GB': {SIZE_HELP}",
        f"backends[0].egress_byte_limit: invalid size 'abc': {SIZE_HELP}",
        f"backends[0].ingress_byte_limit: invalid size True: {SIZE_HELP}",
    ]


@pytest.mark.parametrize(
    ("size", "message"),
    [
        ("32KiB", "must be between 64.0 KiB and 512.0 MiB, got 32.0 KiB"),
        ("1GiB", "must be between 64.0 KiB and 512.0 MiB, got 1.0 GiB"),
    ],
)
def test_chunk_size_bounds(size: str, message: str) -> None:
    assert problems(minimal(pool={"chunk_size": size})) == [f"pool.chunk_size: {message}"]


@pytest.mark.parametrize("size", ["64KiB", "512MiB"])
def test_chunk_size_bounds_are_inclusive(size: str) -> None:
    assert parse(minimal(pool={"chunk_size": size})).pool.chunk_size == parse_size(size)


# --------------------------------------------------------------------------- environment


def test_env_expansion_in_values() -> None:
    env = {"PORT": "8080", "SECRET": S3_SECRET, "HOST": "0.0.0.0", "EMPTY": ""}
    data = minimal(
        server={"port": "${PORT}", "host": "${HOST}", "region": "${REGION:-eu-west-1}"},
        backends=[s3(secret_key="${SECRET}", prefix="${EMPTY:-cairn}/${PORT}")],
    )
    config = parse(data, env)
    assert config.server.port == 8080
    assert config.server.host == "0.0.0.0"
    assert config.server.region == "eu-west-1"
    backend = config.backends[0]
    assert isinstance(backend, S3BackendConfig)
    assert backend.secret_key.get_secret_value() == S3_SECRET
    assert backend.prefix == "cairn/8080/"


def test_env_default_is_ignored_when_set() -> None:
    config = parse(minimal(server={"region": "${REGION:-eu-west-1}"}), {"REGION": "ap-south-1"})
    assert config.server.region == "ap-south-1"


def test_env_default_may_be_empty() -> None:
    config = parse(minimal(backends=[s3(prefix="${PREFIX:-}")]))
    assert config.backends[0].prefix == ""  # type: ignore[union-attr]


def test_dollar_dollar_is_a_literal_dollar() -> None:
    config = parse(minimal(backends=[s3(secret_key="a$$b$${NOT_A_VAR}c$d")]))
    backend = config.backends[0]
    assert isinstance(backend, S3BackendConfig)
    assert backend.secret_key.get_secret_value() == "a$b${NOT_A_VAR}c$d"


def test_missing_env_var_names_the_key_path() -> None:
    data = minimal(backends=[s3("oci", secret_key="${OCI_SECRET}")])
    assert problems(data) == ["backends[0].secret_key: environment variable OCI_SECRET is not set"]


def test_every_missing_env_var_is_reported() -> None:
    data = {
        "server": {"port": "${PORT}"},
        "backends": [local(), s3(access_key="${KEY}", secret_key="${SECRET}")],
    }
    assert problems(data) == [
        "server.port: environment variable PORT is not set",
        "backends[1].access_key: environment variable KEY is not set",
        "backends[1].secret_key: environment variable SECRET is not set",
    ]


def test_env_problem_and_validation_problem_together() -> None:
    data = minimal(server={"port": "${PORT}", "admin_port": "nope"})
    assert problems(data) == [
        "server.port: environment variable PORT is not set",
        "server.admin_port: expected an integer, got 'nope'",
    ]


@pytest.mark.parametrize("value", ["${", "${1ABC}", "${A B}", "x${A:=b}"])
def test_malformed_reference_is_an_error(value: str) -> None:
    assert problems(minimal(server={"region": value})) == [
        "server.region: invalid variable reference: use ${NAME} or ${NAME:-default} ($$ for a '$')"
    ]


def test_env_values_cannot_inject_yaml(tmp_path: Path) -> None:
    path = tmp_path / "cairn.yaml"
    path.write_text(
        "server:\n  region: ${REGION}\nbackends:\n  - {type: local, name: d, path: d}\n"
    )
    config = load_config(path, env={"REGION": "x\nport: 1\nfoo: {bar: 1}"})
    assert config.server.region == "x\nport: 1\nfoo: {bar: 1}"
    assert config.server.port == 9000


def test_keys_and_non_strings_are_not_expanded() -> None:
    assert problems(minimal(**{"${KEY}": 1})) == ["${KEY}: unknown key"]


def test_load_config_uses_os_environ_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CAIRN_TEST_PORT", "9100")
    path = tmp_path / "cairn.yaml"
    path.write_text(
        "server: {port: '${CAIRN_TEST_PORT}'}\nbackends: [{type: local, name: d, path: d}]"
    )
    assert load_config(path).server.port == 9100


# --------------------------------------------------------------------------- error lines


def test_wrong_type_is_one_line_saying_expected_and_given() -> None:
    assert problems(minimal(server={"port": "abc"})) == [
        "server.port: expected an integer, got 'abc'"
    ]


@pytest.mark.parametrize(
    ("section", "line"),
    [
        (
            {"server": {"host": 12}},
            "server.host: expected a string, got 12 (put quotes around it to make it a string)",
        ),
        ({"server": "fast"}, "server: expected a mapping, got 'fast'"),
        (
            {"server": {"max_request_body": 0}},
            "server.max_request_body: must be greater than 0, got 0",
        ),
        ({"pool": {"replication_factor": 0}}, "pool.replication.factor: must be at least 1, got 0"),
        ({"pool": {"gc_delay_seconds": -1}}, "pool.gc_delay_seconds: must be at least 0, got -1"),
        (
            {"pool": {"gc_delay_seconds": 1.5}},
            "pool.gc_delay_seconds: expected a whole number, got 1.5",
        ),
        ({"pool": {"placement": "fast"}}, "pool.placement: must be 'pack' or 'spread', got 'fast'"),
        ({"server": {"port": 0}}, "server.port: must be at least 1, got 0"),
        ({"server": {"port": 65536}}, "server.port: must be at most 65535, got 65536"),
        ({"backends": "disk"}, "backends: expected a list, got 'disk'"),
        ({"backends": []}, "backends: at least one backend is required"),
        ({"buckets": {"a": 1}}, "buckets: expected a list, got a mapping"),
    ],
)
def test_type_and_range_errors(section: dict[str, Any], line: str) -> None:
    assert problems(minimal(**section)) == [line]


def test_wrong_type_for_a_string_suggests_quotes() -> None:
    data = minimal(backends=[s3(bucket=2024)])
    assert problems(data) == [
        "backends[0].bucket: expected a string, got 2024 (put quotes around it to make it a string)"
    ]


def test_wrong_bool() -> None:
    assert problems(minimal(backends=[local(read_only="maybe")])) == [
        "backends[0].read_only: expected true or false, got 'maybe'"
    ]


def test_unknown_top_level_key() -> None:
    assert problems(minimal(extra=1)) == ["extra: unknown key"]


def test_unknown_nested_key_suggests_the_right_one() -> None:
    assert problems(minimal(server={"prot": 80})) == [
        "server.prot: unknown key (did you mean 'port'?)"
    ]


def test_unknown_key_in_a_backend_uses_that_backends_fields() -> None:
    data = minimal(backends=[local(), s3(bukket="x")])
    assert problems(data) == ["backends[1].bukket: unknown key (did you mean 'bucket'?)"]
    # ``path`` exists on local backends only: no suggestion for an s3 one
    data = minimal(backends=[s3(pth="x")])
    assert problems(data) == ["backends[0].pth: unknown key"]


def test_unknown_key_deep_inside_buckets() -> None:
    data = minimal(
        buckets=[
            {
                "name": "photos",
                "credentials": [{"access_key": "A" * 16, "secret_key": CRED_SECRET, "secret": "x"}],
            }
        ]
    )
    assert problems(data) == [
        "buckets[0].credentials[0].secret: unknown key (did you mean 'secret_key'?)"
    ]


def test_non_string_yaml_keys_are_named_as_text() -> None:
    assert problems(minimal(server={1: "x"}, pool={True: "y"})) == [
        "server.1: unknown key",
        "pool.True: unknown key",
    ]


def test_missing_required_key() -> None:
    data = minimal(backends=[local(), {k: v for k, v in s3().items() if k != "bucket"}])
    assert problems(data) == ["backends[1].bucket: required key is missing"]


def test_missing_backends_section() -> None:
    assert problems({"server": {}}) == ["backends: required key is missing"]


def test_several_problems_give_several_lines() -> None:
    data = {
        "server": {"port": "abc", "hots": "x"},
        "pool": {"placement": "fast"},
        "backends": [
            local(quota_bytes="10XB"),
            {"type": "gcs", "name": "g"},
            s3(name="B2"),
        ],
        "buckets": [{"name": "Photos"}],
        "extra": True,
    }
    assert problems(data) == [
        "server.port: expected an integer, got 'abc'",
        "server.hots: unknown key (did you mean 'host'?)",
        "pool.placement: must be 'pack' or 'spread', got 'fast'",
        f"backends[0].quota_bytes: invalid size '10XB': {SIZE_HELP}",
        "backends[1].type: must be one of s3, local, not 'gcs'",
        "backends[2].name: invalid backend name 'B2': use 1-63 lowercase letters, digits, "
        "'-' or '_', starting with a letter or digit",
        "buckets[0].name: invalid bucket name 'Photos': use 3-63 lowercase letters, digits, "
        "'-' or '.', starting and ending with a letter or digit, no '..', not an IP address",
        "extra: unknown key",
    ]


def test_config_error_str_has_header_and_lines() -> None:
    err = ConfigError(["a: b", "c: d"], source=Path("x.yaml"))
    assert str(err) == "config error in x.yaml:\n  a: b\n  c: d"
    assert err.problems == ["a: b", "c: d"]
    assert str(ConfigError(["a: b"])) == "config error:\n  a: b"


# --------------------------------------------------------------------------- backends


def test_backend_type_missing_or_unknown() -> None:
    no_type = {k: v for k, v in local("c", "/c").items() if k != "type"}
    data = minimal(backends=[local(), local("b", "/b"), no_type, {"type": "gcs", "name": "g"}])
    assert problems(data) == [
        "backends[2].type: must be one of s3, local (the key is missing)",
        "backends[3].type: must be one of s3, local, not 'gcs'",
    ]


def test_backend_that_is_not_a_mapping() -> None:
    assert problems(minimal(backends=["disk1", None])) == [
        "backends[0]: expected a mapping, got 'disk1'",
        "backends[1]: expected a mapping, got nothing (null)",
    ]


def test_errors_inside_a_backend_do_not_mention_the_union_tag() -> None:
    lines = problems(minimal(backends=[s3(max_connections=0), local(path=3)]))
    assert lines == [
        "backends[0].max_connections: must be at least 1, got 0",
        "backends[1].path: expected a filesystem path (a string), got 3",
    ]


@pytest.mark.parametrize("name", ["a", "disk1", "oci-free_2", "0", "a" * 63])
def test_valid_backend_names(name: str) -> None:
    assert parse(minimal(backends=[local(name)])).backends[0].name == name


@pytest.mark.parametrize("name", ["", "Disk", "-a", "_a", "a" * 64, "a.b", "a b"])
def test_invalid_backend_names(name: str) -> None:
    [line] = problems(minimal(backends=[local(name)]))
    assert line.startswith(f"backends[0].name: invalid backend name {name!r}")


def test_duplicate_backend_names() -> None:
    data = minimal(
        backends=[local("a", "/a"), s3("b2"), local("c", "/c"), s3("b2", bucket="other")]
    )
    assert problems(data) == ["backends[3].name: duplicate backend name 'b2'"]


def test_two_backends_in_the_same_place() -> None:
    data = minimal(backends=[local("a", "/srv/x"), local("b", "/srv/x"), s3("c"), s3("d")])
    assert problems(data) == [
        "backends[1]: stores in the same place as backend 'a'",
        "backends[3]: stores in the same place as backend 'c'",
    ]
    # a different prefix is a different place
    parse(minimal(backends=[s3("c"), s3("d", prefix="other")]))


@pytest.mark.parametrize(("prefix", "normal"), [("", ""), ("a", "a/"), ("a/b/", "a/b/")])
def test_prefix_is_normalised(prefix: str, normal: str) -> None:
    assert parse(minimal(backends=[s3(prefix=prefix)])).backends[0].prefix == normal  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("prefix", "message"), [("/a", "must not start with '/'"), ("a//b", "must not contain '//'")]
)
def test_bad_prefix(prefix: str, message: str) -> None:
    assert problems(minimal(backends=[s3(prefix=prefix)])) == [f"backends[0].prefix: {message}"]


@pytest.mark.parametrize(
    "endpoint", ["https://s3.example.com", "http://127.0.0.1:9000", "https://x.y/"]
)
def test_valid_endpoints(endpoint: str) -> None:
    backend = parse(minimal(backends=[s3(endpoint=endpoint)])).backends[0]
    assert backend.endpoint == endpoint.rstrip("/")  # type: ignore[union-attr]


@pytest.mark.parametrize("endpoint", ["s3.example.com", "ftp://x", "https://", "https://x?a=1"])
def test_invalid_endpoints(endpoint: str) -> None:
    [line] = problems(minimal(backends=[s3(endpoint=endpoint)]))
    assert line.startswith("backends[0].endpoint: must")


def test_empty_strings_are_rejected() -> None:
    data = minimal(
        backends=[s3(access_key="", secret_key="", bucket="", region=" "), local(path="")]
    )
    assert problems(data) == [
        "backends[0].region: must not be empty",
        "backends[0].bucket: invalid bucket name ''",
        "backends[0].access_key: must not be empty",
        "backends[0].secret_key: must not be empty",
        "backends[1].path: must not be empty",
    ]


def test_limits_must_not_be_negative() -> None:
    assert problems(minimal(backends=[local(api_request_limit=-1)])) == [
        "backends[0].api_request_limit: must be at least 0, got -1"
    ]


def test_timeouts_must_be_positive() -> None:
    assert problems(minimal(backends=[s3(connect_timeout=0, read_timeout="x")])) == [
        "backends[0].connect_timeout: must be greater than 0, got 0",
        "backends[0].read_timeout: expected a number, got 'x'",
    ]


def test_replication_needs_enough_writable_backends() -> None:
    data = minimal(
        pool={"replication_factor": 2},
        backends=[local("a", "/a"), local("b", "/b", read_only=True)],
    )
    assert problems(data) == [
        "pool.replication.factor: 2 replicas need 2 writable backends, but only 1 backend "
        "is writable (not read_only)"
    ]
    data["backends"][1]["read_only"] = False
    assert parse(data).pool.replication_factor == 2


# --------------------------------------------------------------------------- buckets


def cred(access_key: str = "A" * 20, secret_key: str = CRED_SECRET) -> dict[str, str]:
    return {"access_key": access_key, "secret_key": secret_key}


@pytest.mark.parametrize("name", ["abc", "my-bucket", "my.bucket.2", "a" * 63, "1bucket"])
def test_valid_bucket_names(name: str) -> None:
    assert parse(minimal(buckets=[{"name": name}])).buckets[0].name == name


@pytest.mark.parametrize(
    "name",
    ["ab", "a" * 64, "Abc", "my_bucket", "-abc", "abc-", ".abc", "a..b", "192.168.1.1", "a b c"],
)
def test_invalid_bucket_names(name: str) -> None:
    [line] = problems(minimal(buckets=[{"name": name}]))
    assert line.startswith(f"buckets[0].name: invalid bucket name {name!r}")


def test_credentials_rules() -> None:
    data = minimal(
        buckets=[
            {
                "name": "photos",
                "credentials": [
                    cred("short"),
                    cred("A" * 129),
                    cred("AKIA-WITH-DASHES-1234"),
                    cred("B" * 20, "tooshort"),
                    cred("C" * 16, "s" * 16),
                    cred("D" * 128),
                ],
            }
        ]
    )
    rule = "must be 16-128 characters, letters A-Z/a-z and digits only"
    assert problems(data) == [
        f"buckets[0].credentials[0].access_key: {rule}",
        f"buckets[0].credentials[1].access_key: {rule}",
        f"buckets[0].credentials[2].access_key: {rule}",
        "buckets[0].credentials[3].secret_key: must be at least 16 characters long",
    ]


def test_duplicate_buckets_and_access_keys() -> None:
    data = minimal(
        buckets=[
            {"name": "photos", "credentials": [cred("A" * 20), cred("B" * 20)]},
            {"name": "videos", "credentials": [cred("C" * 20), cred("A" * 20)]},
            {"name": "photos"},
        ]
    )
    assert problems(data) == [
        "buckets[2].name: duplicate bucket name 'photos'",
        f"buckets[1].credentials[1].access_key: duplicate access key '{'A' * 20}'",
    ]


def test_duplicates_are_found_even_when_another_entry_is_invalid() -> None:
    data = minimal(
        backends=[local("a", "/a"), {"type": "gcs", "name": "g"}, local("a", "/b")],
        buckets=[
            {"name": "abc", "credentials": [cred("A" * 20), cred("bad!")]},
            {"name": "abc", "credentials": [cred("A" * 20)]},
        ],
    )
    assert problems(data) == [
        "backends[1].type: must be one of s3, local, not 'gcs'",
        "buckets[0].credentials[1].access_key: must be 16-128 characters, letters A-Z/a-z "
        "and digits only",
        "backends[2].name: duplicate backend name 'a'",
        "buckets[1].name: duplicate bucket name 'abc'",
        f"buckets[1].credentials[0].access_key: duplicate access key '{'A' * 20}'",
    ]


def test_null_credentials_mean_none() -> None:
    assert (
        parse(minimal(buckets=[{"name": "abc", "credentials": None}])).buckets[0].credentials == []
    )


def test_cross_checks_run_alongside_other_errors() -> None:
    data = minimal(
        server={"port": "x"},
        backends=[local("a", "/a"), local("a", "/b")],
        buckets=[{"name": "abc"}, {"name": "abc"}],
    )
    assert problems(data) == [
        "server.port: expected an integer, got 'x'",
        "backends[1].name: duplicate backend name 'a'",
        "buckets[1].name: duplicate bucket name 'abc'",
    ]


# --------------------------------------------------------------------------- server


def test_server_ports_must_differ() -> None:
    assert problems(minimal(server={"port": 9001})) == [
        "server.admin_port: must differ from server.port (9001)"
    ]


def test_server_domain() -> None:
    assert parse(minimal(server={"domain": "S3.Example.com"})).server.domain == "s3.example.com"
    assert problems(minimal(server={"domain": "bad_domain..x"})) == [
        "server.domain: invalid domain name 'bad_domain..x'"
    ]


# --------------------------------------------------------------------------- database


def test_postgres_with_dsn() -> None:
    dsn = f"postgresql://cairn:{PG_PASSWORD}@db:5432/cairn"
    config = parse(minimal(database={"postgres": {"dsn": dsn}}))
    assert config.database.kind == "postgres"
    assert config.database.sqlite is None
    pg = config.database.postgres
    assert pg is not None
    assert pg.to_dsn() == dsn
    assert pg.redacted_dsn() == "postgresql://cairn:***@db:5432/cairn"
    assert pg.min_connections == 1
    assert pg.max_connections == 10


def test_postgres_with_fields_quotes_user_and_password() -> None:
    data = minimal(
        database={
            "postgres": {
                "host": "db.internal",
                "user": "me@corp",
                "password": "p@ss/w:rd%",
                "database": "cairn",
                "sslmode": "require",
            }
        }
    )
    pg = parse(data).database.postgres
    assert pg is not None
    assert pg.port == 5432
    assert pg.to_dsn() == (
        "postgresql://me%40corp:p%40ss%2Fw%3Ard%25@db.internal:5432/cairn?sslmode=require"
    )
    assert pg.redacted_dsn() == "postgresql://me%40corp:***@db.internal:5432/cairn?sslmode=require"


def test_postgres_dsn_variants() -> None:
    def dsn(**fields: Any) -> str:
        return PostgresConfig(**fields).to_dsn()

    assert dsn(host="h", database="d") == "postgresql://h:5432/d?sslmode=prefer"
    assert dsn(host="::1", database="d", port=6432) == "postgresql://[::1]:6432/d?sslmode=prefer"
    assert dsn(host="/run/postgresql", database="d", user="u") == (
        "postgresql://u@/d?host=/run/postgresql&sslmode=prefer"
    )


def test_postgres_dsn_or_fields_not_both() -> None:
    data = minimal(
        database={"postgres": {"dsn": "postgresql://h/d", "host": "h", "password": PG_PASSWORD}}
    )
    assert problems(data) == ["database.postgres: set either dsn or host, password, not both"]


def test_postgres_needs_host_and_database() -> None:
    assert problems(minimal(database={"postgres": {"user": "u", "port": 1}})) == [
        "database.postgres.host: required when dsn is not set",
        "database.postgres.database: required when dsn is not set",
    ]
    assert problems(minimal(database={"postgres": None})) == [
        "database.postgres.host: required when dsn is not set",
        "database.postgres.database: required when dsn is not set",
    ]


def test_postgres_other_rules() -> None:
    data = minimal(
        database={
            "postgres": {
                "host": "h",
                "database": "d",
                "password": PG_PASSWORD,
                "min_connections": 5,
                "max_connections": 2,
            }
        }
    )
    assert problems(data) == [
        "database.postgres.user: required when password is set",
        "database.postgres.min_connections: must not exceed max_connections (2)",
    ]
    assert problems(minimal(database={"postgres": {"dsn": "mysql://h/d"}})) == [
        "database.postgres.dsn: must be a URL starting with postgresql:// or postgres://"
    ]
    [line] = problems(
        minimal(database={"postgres": {"host": "h", "database": "d", "sslmode": "x"}})
    )
    assert line.startswith("database.postgres.sslmode: must be 'disable', 'allow', 'prefer'")


def test_database_needs_exactly_one_store() -> None:
    both = {"sqlite": {}, "postgres": {"dsn": "postgresql://h/d"}}
    assert problems(minimal(database=both)) == [
        "database: set only one of sqlite or postgres, not both"
    ]
    assert problems(minimal(database={})) == ["database: set one of sqlite or postgres"]
    assert DatabaseConfig(sqlite=SqliteConfig()).kind == "sqlite"


# --------------------------------------------------------------------------- paths


def test_relative_paths_follow_the_config_directory() -> None:
    data = minimal(
        database={"sqlite": {"path": "meta/cairn.db"}},
        backends=[local("a", "data/disk1"), local("b", "./data/disk2"), local("c", "/abs/d")],
    )
    config = parse(data)
    assert config.database.sqlite is not None
    assert config.database.sqlite.path == BASE / "meta/cairn.db"
    assert [b.path for b in config.backends] == [  # type: ignore[union-attr]
        BASE / "data/disk1",
        BASE / "data/disk2",
        Path("/abs/d"),
    ]


def test_load_config_resolves_against_the_files_directory(tmp_path: Path) -> None:
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    path = conf_dir / "cairn.yaml"
    path.write_text("backends:\n  - {type: local, name: d, path: ../var/disk}\n")
    config = load_config(path, env={})
    assert config.database.sqlite is not None
    assert config.database.sqlite.path == conf_dir / "cairn.db"
    assert config.backends[0].path == conf_dir.parent / "var" / "disk"  # type: ignore[union-attr]
    assert config.backends[0].path.is_absolute()  # type: ignore[union-attr]


def test_relative_config_path_gives_absolute_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "cairn.yaml").write_text("backends: [{type: local, name: d, path: disk}]\n")
    monkeypatch.chdir(tmp_path)
    config = load_config(Path("cairn.yaml"), env={})
    assert config.backends[0].path == tmp_path / "disk"  # type: ignore[union-attr]


# --------------------------------------------------------------------------- files


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.problems == ["file does not exist"]
    assert info.value.source == path
    assert str(info.value).startswith(f"config error in {path}:")


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, env={})
    assert info.value.problems == ["is a directory, not a file"]


def test_invalid_yaml_gives_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "cairn.yaml"
    path.write_text("server:\n  port: 9000\n  host: [unclosed\nbackends: []\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    [line] = info.value.problems
    assert line.startswith("invalid YAML at line 4, column")


def test_duplicate_yaml_keys_are_an_error(tmp_path: Path) -> None:
    path = tmp_path / "cairn.yaml"
    path.write_text("server:\n  port: 9000\n  port: 9100\nbackends: []\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.problems == ["invalid YAML at line 3, column 3: duplicate key 'port'"]


def test_yaml_tags_are_not_executed(tmp_path: Path) -> None:
    path = tmp_path / "cairn.yaml"
    path.write_text("server: !!python/object/apply:os.system ['echo hi']\nbackends: []\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    [line] = info.value.problems
    assert line.startswith("invalid YAML at line 1, column 9: could not determine a constructor")


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("- a\n- b\n", "top level: expected a mapping of sections"),
        ("just text\n", "top level: expected a mapping of sections"),
        ("", "top level: the configuration is empty"),
        ("# only comments\n", "top level: the configuration is empty"),
    ],
)
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str, line: str) -> None:
    path = tmp_path / "cairn.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    [problem] = info.value.problems
    assert problem.startswith(line)


def test_full_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "cairn.yaml"
    path.write_text(
        """
server:
  host: 0.0.0.0
  port: 9000
  admin_port: 9001
  domain: s3.local
  max_request_body: 5GiB
database:
  postgres:
    host: ${PGHOST:-localhost}
    user: cairn
    password: ${PGPASSWORD}
    database: cairn
pool:
  chunk_size: 16MiB
  placement: spread
  replication_factor: 2
  gc_delay_seconds: 60
backends:
  - name: disk1
    type: local
    path: ./data/disk1
    quota_bytes: 100GiB
  - name: oci
    type: s3
    endpoint: https://ns.compat.objectstorage.eu-frankfurt-1.oraclecloud.com
    region: eu-frankfurt-1
    bucket: cairn
    prefix: pool
    access_key: ${OCI_KEY}
    secret_key: ${OCI_SECRET}
    path_style: true
    quota_bytes: 20GB
    api_request_limit: 50000
    egress_byte_limit: 10TB
buckets:
  - name: photos
    credentials:
      - access_key: AKIAPHOTOS0000000001
        secret_key: ${PHOTOS_SECRET}
"""
    )
    env = {
        "PGPASSWORD": PG_PASSWORD,
        "OCI_KEY": "ocikey",
        "OCI_SECRET": S3_SECRET,
        "PHOTOS_SECRET": CRED_SECRET,
    }
    config = load_config(path, env=env)
    assert config.server.domain == "s3.local"
    assert config.database.kind == "postgres"
    assert config.pool.placement == "spread"
    oci = config.backends[1]
    assert isinstance(oci, S3BackendConfig)
    assert oci.prefix == "pool/"
    assert oci.quota_bytes == 20 * 1000**3
    assert config.backends[0].path == tmp_path / "data/disk1"  # type: ignore[union-attr]
    assert config.buckets[0].credentials[0].secret_key.get_secret_value() == CRED_SECRET

    # secrets never show in repr/str of the config or its parts
    for text in (repr(config), str(config), repr(config.database), repr(config.backends)):
        for secret in (PG_PASSWORD, S3_SECRET, CRED_SECRET):
            assert secret not in text


# --------------------------------------------------------------------------- secrets


def test_secrets_are_hidden_in_repr() -> None:
    config = parse(
        minimal(
            database={"postgres": {"dsn": f"postgresql://u:{PG_PASSWORD}@h/d"}},
            backends=[s3()],
            buckets=[{"name": "abc", "credentials": [cred()]}],
        )
    )
    text = repr(config)
    for secret in (PG_PASSWORD, S3_SECRET, CRED_SECRET):
        assert secret not in text
    assert "SecretStr('**********')" in text
    assert isinstance(config.buckets[0].credentials[0].secret_key, SecretStr)


def test_secrets_are_hidden_in_errors() -> None:
    secret = "short-secret"
    data = minimal(
        backends=[s3(secret_key=123456789)],
        buckets=[{"name": "abc", "credentials": [cred(secret_key=secret)]}],
        database={"postgres": {"dsn": f"mysql://u:{PG_PASSWORD}@h/d"}},
    )
    lines = problems(data)
    assert lines == [
        "database.postgres.dsn: must be a URL starting with postgresql:// or postgres://",
        "backends[0].secret_key: expected a string, got a number (value hidden)",
        "buckets[0].credentials[0].secret_key: must be at least 16 characters long",
    ]
    joined = "\n".join(lines)
    assert secret not in joined
    assert PG_PASSWORD not in joined
    assert "123456789" not in joined


def test_pydantic_errors_hide_input_too() -> None:
    with pytest.raises(ValidationError) as info:
        CredentialConfig(access_key="A" * 16, secret_key=SecretStr("tiny-secret"))
    assert "tiny-secret" not in str(info.value)


def test_input_data_is_not_mutated() -> None:
    data = minimal(server=None, backends=[s3(prefix="${P:-x}")])
    before = copy.deepcopy(data)
    parse(data)
    assert data == before


def test_bucket_config_direct() -> None:
    bucket = BucketConfig(name="abc", credentials=[])
    assert bucket.credentials == []


# --------------------------------------------------------------------------- encryption

KEY64 = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="  # base64 of bytes 0..31


def test_encryption_defaults_off() -> None:
    config = parse(minimal())
    assert config.encryption.enabled is False and config.encryption.key is None


def test_encryption_sources_and_per_bucket_override() -> None:
    config = parse(
        minimal(
            encryption={
                "enabled": True,
                "key": {"file": "keys/master.key"},
                "previous_keys": [
                    {"inline": KEY64},
                    {
                        "vault": {
                            "address": "https://vault.example:8200/",
                            "key_name": "cairn",
                            "token_file": "vault-token",
                        }
                    },
                ],
            },
            buckets=[{"name": "plain", "encryption": False}, {"name": "default"}],
        )
    )
    enc = config.encryption
    assert enc.key is not None and enc.key.file == BASE / "keys/master.key"
    vault = enc.previous_keys[1].vault
    assert vault is not None and vault.address == "https://vault.example:8200"
    assert vault.token_file == BASE / "vault-token" and vault.mount == "transit"
    assert [b.encryption for b in config.buckets] == [False, None]
    assert KEY64 not in repr(config)


def test_encryption_errors_are_clear() -> None:
    found = problems(
        minimal(
            encryption={
                "enabled": True,
                "previous_keys": [
                    {"inline": "bm90IDMyIGJ5dGVz"},
                    {"inline": KEY64, "file": "k"},
                    {},
                    {"vault": {"address": "ftp://x", "key_name": "k"}},
                    {
                        "vault": {
                            "address": "http://v",
                            "key_name": "k",
                            "token": "t",
                            "token_file": "f",
                        }
                    },
                ],
            }
        )
    )
    text = "\n".join(found)
    assert "encryption.previous_keys[0].inline: must be base64 of 32 bytes" in text
    one_of = "give exactly one of 'inline', 'file' and 'vault'"
    assert f"encryption.previous_keys[1]: {one_of} (found inline, file)" in text
    assert "encryption.previous_keys[2]: give exactly one of 'inline', 'file' and 'vault'" in text
    assert "encryption.previous_keys[3].vault.address: must be an http:// or https:// URL" in text
    assert "encryption.previous_keys[4].vault: give exactly one of 'token' and 'token_file'" in text
    assert KEY64 not in text
    assert problems(minimal(encryption={"enabled": True})) == [
        "encryption.key: required when encryption is enabled"
    ]
    bucket_only = problems(minimal(buckets=[{"name": "enc", "encryption": True}]))
    assert bucket_only == ["buckets[0].encryption: needs a master key: set encryption.key"]
