"""The admin API and bucket lifecycle, against the daemon in a subprocess.

Buckets and keys made through the admin API are used with boto3 at once; secrets are
shown only when made, sealed in the store, and a rotated or deleted key stops working.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.e2e.conftest import (
    ADMIN_ACCESS_KEY,
    ADMIN_SECRET_KEY,
    ADMIN_TOKEN,
    Daemon,
    DaemonFactory,
    DaemonSpec,
)

pytestmark = pytest.mark.e2e


def _code(call: Any) -> str:
    with pytest.raises(ClientError) as caught:
        call()
    return str(caught.value.response["Error"]["Code"])


def test_admin_api_needs_the_token(cairn: Daemon) -> None:
    assert cairn.admin("GET", "/buckets", token=None)[0] == 401
    status, body = cairn.admin("GET", "/buckets", token="x" * len(ADMIN_TOKEN))
    assert status == 401 and body["code"] == "Unauthorized"
    status, body = cairn.admin("GET", "/buckets")
    assert status == 200 and {"e2e", "other"} <= {b["name"] for b in body}


def test_openapi_document_lists_every_route(cairn: Daemon) -> None:
    url = f"http://127.0.0.1:{cairn.admin_port}/admin/api/openapi.json"
    with urllib.request.urlopen(url, timeout=10) as response:
        document = json.loads(response.read())
    assert document["openapi"].startswith("3.")
    paths = document["paths"]
    assert set(paths["/admin/api/keys"]) == {"get", "post"}
    assert "delete" in paths["/admin/api/buckets/{name}"]
    assert "KeyIn" in document["components"]["schemas"]


def test_keys_and_buckets_made_through_the_admin_api_work_in_s3(cairn: Daemon) -> None:
    status, bucket = cairn.admin("POST", "/buckets", {"name": "team-a"})
    assert status == 201 and bucket["name"] == "team-a" and bucket["objects"] == 0
    status, made = cairn.admin(
        "POST",
        "/keys",
        {"description": "team a", "grants": {"team-a": ["read", "write", "list", "delete"]}},
    )
    assert status == 201
    key, secret = made["access_key"], made["secret_key"]
    assert len(key) == 20 and len(secret) == 40
    s3 = cairn.client(access_key=key, secret_key=secret)
    s3.put_object(Bucket="team-a", Key="hello.txt", Body=b"hello")
    assert s3.get_object(Bucket="team-a", Key="hello.txt")["Body"].read() == b"hello"
    assert _code(lambda: s3.get_object(Bucket="e2e", Key="x")) == "AccessDenied"

    # listing never shows a secret
    status, keys = cairn.admin("GET", "/keys")
    listed = {k["access_key"]: k for k in keys}
    assert listed[key]["grants"] == {"team-a": ["delete", "list", "read", "write"]}
    assert secret not in json.dumps(keys) and "secret" not in json.dumps(listed[key])
    status, shown = cairn.admin("GET", "/buckets/team-a")
    assert shown["objects"] == 1 and shown["bytes"] == 5

    # rotation: the old secret stops working at once, the new one works
    status, rotated = cairn.admin("POST", f"/keys/{key}/rotate")
    assert status == 200 and rotated["secret_key"] != secret
    assert _code(lambda: s3.list_objects_v2(Bucket="team-a")) == "SignatureDoesNotMatch"
    s3 = cairn.client(access_key=key, secret_key=rotated["secret_key"])
    assert s3.list_objects_v2(Bucket="team-a")["KeyCount"] == 1

    # grants: read-only now
    status, info = cairn.admin("PUT", f"/keys/{key}/grants", {"grants": {"team-a": ["read"]}})
    assert status == 200 and info["grants"] == {"team-a": ["read"]}
    assert _code(lambda: s3.put_object(Bucket="team-a", Key="y", Body=b"y")) == "AccessDenied"
    assert s3.get_object(Bucket="team-a", Key="hello.txt")["Body"].read() == b"hello"

    # a non-empty bucket is not deleted; an empty one is, with its grants
    status, error = cairn.admin("DELETE", "/buckets/team-a")
    assert status == 409 and error["code"] == "BucketNotEmpty"
    cairn.admin_client().delete_object(Bucket="team-a", Key="hello.txt")
    assert cairn.admin("DELETE", "/buckets/team-a")[0] == 204
    assert cairn.admin("GET", "/buckets/team-a")[0] == 404
    assert cairn.admin("GET", f"/keys/{key}")[1]["grants"] == {}

    # a deleted key is unknown
    assert cairn.admin("DELETE", f"/keys/{key}")[0] == 204
    assert _code(lambda: s3.list_buckets()) == "InvalidAccessKeyId"
    assert cairn.admin("DELETE", f"/keys/{key}")[0] == 404


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    [
        ("POST", "/buckets", {"name": "Bad_Name"}, 400, "InvalidBucketName"),
        ("POST", "/buckets", {"name": "e2e"}, 409, "BucketExists"),
        ("POST", "/buckets", {"name": "ok-name", "extra": 1}, 400, "InvalidRequest"),
        ("POST", "/buckets", "not an object", 400, "InvalidRequest"),
        ("POST", "/keys", {"grants": {"e2e": ["fly"]}}, 400, "InvalidRequest"),
        ("POST", "/keys", {"grants": {"e2e": []}}, 400, "InvalidArgument"),
        ("POST", "/keys", {"grants": {"Not..valid": ["read"]}}, 400, "InvalidArgument"),
        ("POST", "/keys", {"access_key": "short", "grants": {"e2e": ["read"]}}, 400, None),
        ("POST", "/keys", {"secret_key": "short", "grants": {"e2e": ["read"]}}, 400, None),
        ("POST", "/keys", {"access_key": "E2EKEY0000000001", "grants": {"*": ["read"]}}, 409, None),
        ("GET", "/keys/NOSUCHKEY0000000", None, 404, "NoSuchAccessKey"),
        ("PUT", "/keys/NOSUCHKEY0000000/grants", {"grants": {"e2e": ["read"]}}, 404, None),
        ("DELETE", "/buckets/no-such-bucket", None, 404, "NoSuchBucket"),
    ],
)
def test_bad_admin_requests_get_clear_errors_and_change_nothing(
    cairn: Daemon, method: str, path: str, body: Any, status: int, code: str | None
) -> None:
    before = cairn.admin("GET", "/keys")[1], cairn.admin("GET", "/buckets")[1]
    got, answer = cairn.admin(method, path, body)
    assert got == status, answer
    assert answer["message"]
    if code is not None:
        assert answer["code"] == code
    assert (cairn.admin("GET", "/keys")[1], cairn.admin("GET", "/buckets")[1]) == before


def test_create_and_delete_buckets_through_s3(cairn: Daemon) -> None:
    admin = cairn.admin_client()
    admin.create_bucket(Bucket="made-by-s3")
    try:
        assert _code(lambda: admin.create_bucket(Bucket="made-by-s3")) == (
            "BucketAlreadyOwnedByYou"
        )
        assert _code(lambda: admin.create_bucket(Bucket="Invalid_Name")) == "InvalidBucketName"
        assert (
            _code(
                lambda: admin.create_bucket(
                    Bucket="elsewhere",
                    CreateBucketConfiguration={"LocationConstraint": "eu-west-3"},
                )
            )
            == "InvalidLocationConstraint"
        )
        admin.put_object(Bucket="made-by-s3", Key="a", Body=b"a")
        assert _code(lambda: admin.delete_bucket(Bucket="made-by-s3")) == "BucketNotEmpty"
        assert admin.get_object(Bucket="made-by-s3", Key="a")["Body"].read() == b"a"
        # a plain key: its own bucket exists (rclone's mkdir treats this as success)
        owner = cairn.client()
        assert _code(lambda: owner.create_bucket(Bucket="e2e")) == "BucketAlreadyOwnedByYou"
        assert _code(lambda: owner.delete_bucket(Bucket="e2e")) == "AccessDenied"
        admin.delete_object(Bucket="made-by-s3", Key="a")
    finally:
        admin.delete_bucket(Bucket="made-by-s3")
    assert _code(lambda: admin.head_bucket(Bucket="made-by-s3")) == "404"
    assert "made-by-s3" not in [b["Name"] for b in admin.list_buckets()["Buckets"]]


def test_aws_cli_mb_cp_between_buckets_and_rb(cairn: Daemon, tmp_path: Path) -> None:
    keys = (ADMIN_ACCESS_KEY, ADMIN_SECRET_KEY)
    source = tmp_path / "x.txt"
    source.write_bytes(b"x" * 1000)
    cairn.aws("s3", "mb", "s3://cli-made", keys=keys)
    cairn.aws("s3", "cp", str(source), "s3://cli-made/x.txt", keys=keys)
    cairn.aws("s3", "cp", "s3://cli-made/x.txt", "s3://e2e/from-cli-made.txt", keys=keys)
    assert cairn.client().get_object(Bucket="e2e", Key="from-cli-made.txt")["Body"].read() == (
        b"x" * 1000
    )
    cairn.aws("s3", "rb", "s3://cli-made", "--force", keys=keys)
    assert cairn.admin("GET", "/buckets/cli-made")[0] == 404
    cairn.client().delete_object(Bucket="e2e", Key="from-cli-made.txt")


def test_secrets_are_sealed_in_the_store(daemon_factory: DaemonFactory) -> None:
    daemon = daemon_factory(DaemonSpec("sqlite", "pack"))
    status, made = daemon.admin("POST", "/keys", {"grants": {"e2e": ["read"]}})
    assert status == 201
    daemon.stop_and_check()
    rows = daemon.query("SELECT access_key, secret FROM credentials")
    assert rows and all(row["secret"].startswith("sealed:v1:") for row in rows)
    dump = json.dumps(rows)
    for plain in (made["secret_key"], daemon.secret_key):
        assert plain not in dump
    assert ADMIN_SECRET_KEY not in dump


def test_cairn_admin_cli(cairn: Daemon) -> None:
    import subprocess
    import sys

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "frontends.cli", "admin", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={
                **cairn.client_env(),
                "CAIRN_ADMIN_URL": f"http://127.0.0.1:{cairn.admin_port}",
                "CAIRN_ADMIN_TOKEN": ADMIN_TOKEN,
            },
        )

    made = run(
        "--json", "credentials", "create", "--grant", "e2e=read,list", "--description", "cli"
    )
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)
    s3 = cairn.client(access_key=key["access_key"], secret_key=key["secret_key"])
    assert s3.list_objects_v2(Bucket="e2e", MaxKeys=1)["ResponseMetadata"]["HTTPStatusCode"] == 200
    listed = run("credentials", "list")
    assert key["access_key"] in listed.stdout and key["secret_key"] not in listed.stdout
    assert "e2e=list,read" in listed.stdout
    assert run("buckets", "create", "cli-bucket").returncode == 0
    assert "cli-bucket" in run("buckets", "list").stdout
    again = run("buckets", "create", "cli-bucket")
    assert again.returncode == 1 and "BucketExists" in again.stderr
    bad = run("credentials", "create", "--grant", "e2e=fly")
    assert bad.returncode == 2 and "PERM" in bad.stderr
    assert run("buckets", "delete", "cli-bucket").returncode == 0
    assert run("credentials", "delete", key["access_key"]).returncode == 0
    backends = json.loads(run("--json", "backends").stdout)
    assert [b["name"] for b in backends] == ["disk0", "disk1", "disk2"]
    unreachable = subprocess.run(
        [sys.executable, "-m", "frontends.cli", "admin", "--url", "http://127.0.0.1:9",
         "--token", "x", "buckets", "list"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert unreachable.returncode == 2 and "cannot reach" in unreachable.stderr
