"""Virtual-hosted-style addressing (``<bucket>.<server.domain>``) next to path style.

Name resolution of ``*.s3.cairn.test`` is pointed at 127.0.0.1 inside this test process
(the daemon and the protocol are real; only the client's DNS lookup is stubbed).
"""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.e2e.conftest import DOMAIN, Daemon

pytestmark = pytest.mark.e2e


@pytest.fixture
def local_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    real = socket.getaddrinfo

    def resolve(host: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(host, str) and (host == DOMAIN or host.endswith("." + DOMAIN)):
            host = "127.0.0.1"
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)


def test_boto3_virtual_hosted_style(cairn: Daemon, local_dns: None) -> None:
    s3 = cairn.client(endpoint=f"http://{DOMAIN}:{cairn.port}", s3={"addressing_style": "virtual"})
    s3.put_object(Bucket="e2e", Key="vhost/a b+c.txt", Body=b"virtual")
    assert s3.get_object(Bucket="e2e", Key="vhost/a b+c.txt")["Body"].read() == b"virtual"
    listed = s3.list_objects_v2(Bucket="e2e", Prefix="vhost/")["Contents"]
    assert [o["Key"] for o in listed] == ["vhost/a b+c.txt"]
    s3.head_bucket(Bucket="e2e")
    # the same object through path style
    assert cairn.client().get_object(Bucket="e2e", Key="vhost/a b+c.txt")["Body"].read() == (
        b"virtual"
    )
    with pytest.raises(ClientError) as denied:
        s3.list_objects_v2(Bucket="other")
    assert denied.value.response["Error"]["Code"] == "AccessDenied"
    s3.delete_object(Bucket="e2e", Key="vhost/a b+c.txt")


def test_presigned_virtual_hosted_url(cairn: Daemon, local_dns: None) -> None:
    s3 = cairn.client(endpoint=f"http://{DOMAIN}:{cairn.port}", s3={"addressing_style": "virtual"})
    cairn.client().put_object(Bucket="e2e", Key="vhost/p.txt", Body=b"presigned")
    url = s3.generate_presigned_url("get_object", Params={"Bucket": "e2e", "Key": "vhost/p.txt"})
    assert url.startswith(f"http://e2e.{DOMAIN}:")
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == b"presigned"
    bad = urllib.request.Request(
        f"http://127.0.0.1:{cairn.port}/x", headers={"Host": f"Not_Valid.{DOMAIN}"}
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(bad, timeout=10)
    assert caught.value.code == 400 and b"InvalidBucketName" in caught.value.read()
