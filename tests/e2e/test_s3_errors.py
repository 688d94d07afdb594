"""Bad input against the real daemon: the right S3 error, and nothing stored.

Requests that real clients will not produce (tampered signatures, hand-made aws-chunked
bodies, truncated uploads) are signed here with a small SigV4 implementation of the
test's own, independent of the server's, and sent with ``http.client`` or a raw socket.
Each test checks the error document (Code, Message, RequestId equal to the
``x-amz-request-id`` header), that the key is not visible afterwards, and (the
``nothing_stored`` fixture) that no new blob file is left on any backend once GC ran.

Unknown buckets: the daemon answers ``AccessDenied`` for every bucket the access key has no
grant on, whether it exists or not (no bucket-existence oracle for strangers);
``NoSuchBucket`` is only for a key with a grant on a bucket name that does not exist.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import socket
import struct
import time
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import pytest
from botocore.exceptions import ClientError

from tests.e2e.conftest import CHUNK_SIZE, Daemon, MiB

pytestmark = pytest.mark.e2e

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
UNSIGNED = "UNSIGNED-PAYLOAD"


# -- a SigV4 signer of the test's own ------------------------------------------------------------


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def _sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def _q(text: str) -> str:
    return quote(text, safe="-_.~")


def flip(signature: str) -> str:
    """The same signature with its last hex digit changed."""
    return signature[:-1] + ("0" if signature[-1] != "0" else "1")


@dataclass
class Signed:
    headers: dict[str, str]
    signature: str
    key: bytes
    amz_date: str
    scope: str


class Signer:
    def __init__(self, daemon: Daemon, secret: str | None = None) -> None:
        self.daemon = daemon
        self.access_key = daemon.access_key
        self.secret = secret or daemon.secret_key
        self.host = f"127.0.0.1:{daemon.port}"

    def _key(self, date: str) -> bytes:
        key = _hmac(f"AWS4{self.secret}".encode(), date)
        for part in (self.daemon.region, "s3", "aws4_request"):
            key = _hmac(key, part)
        return key

    @staticmethod
    def _query(pairs: list[tuple[str, str]]) -> str:
        return "&".join(f"{_q(k)}={_q(v)}" for k, v in sorted(pairs))

    def sign(
        self,
        method: str,
        path: str,
        *,
        query: list[tuple[str, str]] | None = None,
        headers: dict[str, str] | None = None,
        payload_hash: str = UNSIGNED,
        when: datetime | None = None,
    ) -> Signed:
        """Authorization-header signing; ``path`` is the decoded path (``/bucket/key``)."""
        moment = when or datetime.now(UTC)
        amz_date = moment.strftime("%Y%m%dT%H%M%SZ")
        scope = f"{amz_date[:8]}/{self.daemon.region}/s3/aws4_request"
        signed = {k.lower(): v.strip() for k, v in (headers or {}).items()}
        signed.update(
            {"host": self.host, "x-amz-date": amz_date, "x-amz-content-sha256": payload_hash}
        )
        names = sorted(signed)
        canonical = "\n".join(
            [
                method,
                quote(path, safe="/-_.~"),
                self._query(query or []),
                "".join(f"{n}:{signed[n]}\n" for n in names),
                ";".join(names),
                payload_hash,
            ]
        )
        key = self._key(amz_date[:8])
        to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, _sha(canonical)])
        signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        signed["authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={self.access_key}/{scope}, "
            f"SignedHeaders={';'.join(names)}, Signature={signature}"
        )
        return Signed(signed, signature, key, amz_date, scope)

    def presign(self, method: str, path: str, *, when: datetime, expires: int) -> str:
        """A presigned URL (path and query) made at ``when``."""
        amz_date = when.strftime("%Y%m%dT%H%M%SZ")
        scope = f"{amz_date[:8]}/{self.daemon.region}/s3/aws4_request"
        pairs = [
            ("X-Amz-Algorithm", "AWS4-HMAC-SHA256"),
            ("X-Amz-Credential", f"{self.access_key}/{scope}"),
            ("X-Amz-Date", amz_date),
            ("X-Amz-Expires", str(expires)),
            ("X-Amz-SignedHeaders", "host"),
        ]
        query = self._query(pairs)
        canonical = "\n".join(
            [method, quote(path, safe="/-_.~"), query, f"host:{self.host}\n", "host", UNSIGNED]
        )
        to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, _sha(canonical)])
        key = self._key(amz_date[:8])
        signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        return f"{quote(path, safe='/-_.~')}?{query}&X-Amz-Signature={signature}"


def chunk_signature(signed: Signed, previous: str, data: bytes) -> str:
    to_sign = "\n".join(
        [
            "AWS4-HMAC-SHA256-PAYLOAD",
            signed.amz_date,
            signed.scope,
            previous,
            EMPTY_SHA256,
            _sha(data),
        ]
    )
    return hmac.new(signed.key, to_sign.encode(), hashlib.sha256).hexdigest()


def signed_chunks(
    signed: Signed, data: bytes, size: int, *, tamper: int | None = None, trailer: bool = False
) -> tuple[bytes, str]:
    """``aws-chunked`` framing with chunk signatures; returns the body and last signature.

    ``tamper`` changes the signature shown for that chunk index (the chain goes on with the
    true one, as a man in the middle who altered one chunk's signature would leave it).
    With ``trailer`` the final empty chunk's header is followed by the trailing headers
    (which the caller appends) instead of an empty line.
    """
    pieces = [data[i : i + size] for i in range(0, len(data), size)] + [b""]
    previous = signed.signature
    out = bytearray()
    for index, piece in enumerate(pieces):
        signature = chunk_signature(signed, previous, piece)
        shown = flip(signature) if index == tamper else signature
        out += f"{len(piece):x};chunk-signature={shown}\r\n".encode()
        if piece or not trailer:
            out += piece + b"\r\n"
        previous = signature
    return bytes(out), previous


def crc32_b64(data: bytes) -> str:
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


# -- sending ------------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def error(self) -> dict[str, str]:
        root = ET.fromstring(self.body)
        return {child.tag: child.text or "" for child in root}


def send(
    daemon: Daemon,
    method: str,
    target: str,
    *,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
) -> Answer:
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=60)
    try:
        conn.request(method, target, body=body, headers=headers or {})
        resp = conn.getresponse()
        return Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def assert_error(answer: Answer, code: str, status: int) -> dict[str, str]:
    assert answer.status == status, (answer.status, answer.body[:500])
    request_id = answer.headers.get("x-amz-request-id")
    assert request_id
    doc = answer.error()
    assert doc["Code"] == code, doc
    assert doc["Message"]
    assert doc["RequestId"] == request_id
    return doc


def assert_client_error(exc: ClientError, code: str, status: int) -> None:
    response: Any = exc.response
    assert response["Error"]["Code"] == code, response["Error"]
    assert response["ResponseMetadata"]["HTTPStatusCode"] == status
    request_id = response["ResponseMetadata"]["HTTPHeaders"].get("x-amz-request-id")
    assert request_id
    assert response["ResponseMetadata"].get("RequestId") == request_id
    if response.get("Error", {}).get("Message") is not None:
        assert response["Error"]["Message"]


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3(cairn: Daemon) -> Any:
    return cairn.client()


@pytest.fixture(scope="module")
def signer(cairn: Daemon) -> Signer:
    return Signer(cairn)


class Baseline:
    """The blob files that may exist: those before the test, and those of the control
    objects a test stores on purpose (``keep`` after storing them)."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.blobs = daemon.blob_set()

    def keep(self) -> None:
        self.blobs |= self.daemon.blob_set()


@pytest.fixture
def nothing_stored(cairn: Daemon) -> Iterator[Baseline]:
    """No blob the test's refused requests wrote survives it (GC runs every few seconds)."""
    baseline = Baseline(cairn)
    yield baseline
    cairn.wait_no_new_blobs(baseline.blobs)


def assert_absent(s3: Any, key: str) -> None:
    with pytest.raises(ClientError) as err:
        s3.head_object(Bucket="e2e", Key=key)
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    listed = s3.list_objects_v2(Bucket="e2e", Prefix=key)
    assert key not in [o["Key"] for o in listed.get("Contents", [])]


def body_of(size: int, seed: int) -> bytes:
    return hashlib.sha256(str(seed).encode()).digest() * (size // 32) + b"x" * (size % 32)


# -- authentication -----------------------------------------------------------------------------


@pytest.mark.usefixtures("nothing_stored")
def test_wrong_secret_is_signature_does_not_match(cairn: Daemon, s3: Any) -> None:
    bad = cairn.client(secret_key="not-the-secret")
    with pytest.raises(ClientError) as err:
        bad.put_object(Bucket="e2e", Key="err/wrong-secret", Body=b"x" * 100)
    assert_client_error(err.value, "SignatureDoesNotMatch", 403)
    with pytest.raises(ClientError) as listing:
        bad.list_objects_v2(Bucket="e2e")
    assert_client_error(listing.value, "SignatureDoesNotMatch", 403)
    with pytest.raises(ClientError) as head:
        bad.head_object(Bucket="e2e", Key="err/wrong-secret")
    assert head.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert head.value.response["ResponseMetadata"]["HTTPHeaders"]["x-amz-request-id"]
    unknown = cairn.client(access_key="NOSUCHKEY0000001")
    with pytest.raises(ClientError) as who:
        unknown.put_object(Bucket="e2e", Key="err/wrong-secret", Body=b"x")
    assert_client_error(who.value, "InvalidAccessKeyId", 403)
    assert_absent(s3, "err/wrong-secret")


def test_tampered_header_signature(
    nothing_stored: Baseline, cairn: Daemon, s3: Any, signer: Signer
) -> None:
    body = b"tampered" * 100
    ok = signer.sign("PUT", "/e2e/err/tamper-control", payload_hash=_sha(body))
    assert (
        send(cairn, "PUT", "/e2e/err/tamper-control", headers=ok.headers, body=body).status == 200
    )
    nothing_stored.keep()
    s3.delete_object(Bucket="e2e", Key="err/tamper-control")

    signed = signer.sign("PUT", "/e2e/err/tampered", payload_hash=_sha(body))
    headers = dict(signed.headers)
    headers["authorization"] = headers["authorization"].replace(
        signed.signature, flip(signed.signature)
    )
    answer = send(cairn, "PUT", "/e2e/err/tampered", headers=headers, body=body)
    assert_error(answer, "SignatureDoesNotMatch", 403)
    # a signed header changed after signing
    altered = dict(signed.headers)
    altered["x-amz-content-sha256"] = _sha(b"other")
    answer = send(cairn, "PUT", "/e2e/err/tampered", headers=altered, body=b"other")
    assert_error(answer, "SignatureDoesNotMatch", 403)
    # the path changed after signing
    answer = send(cairn, "PUT", "/e2e/err/tampered-too", headers=signed.headers, body=body)
    assert_error(answer, "SignatureDoesNotMatch", 403)
    assert_absent(s3, "err/tampered")
    assert_absent(s3, "err/tampered-too")


def test_request_time_too_skewed(cairn: Daemon, signer: Signer) -> None:
    old = signer.sign("GET", "/e2e", when=datetime.now(UTC) - timedelta(minutes=20))
    assert_error(send(cairn, "GET", "/e2e", headers=old.headers), "RequestTimeTooSkewed", 403)


def test_presigned_urls_tampered_expired_and_not_yet_valid(
    nothing_stored: Baseline, cairn: Daemon, s3: Any, signer: Signer
) -> None:
    s3.put_object(Bucket="e2e", Key="err/presigned", Body=b"presigned body")
    nothing_stored.keep()
    now = datetime.now(UTC)
    control = signer.presign("GET", "/e2e/err/presigned", when=now, expires=60)
    answer = send(cairn, "GET", control)
    assert (answer.status, answer.body) == (200, b"presigned body")
    assert answer.headers["x-amz-request-id"]

    assert_error(send(cairn, "GET", flip(control)), "SignatureDoesNotMatch", 403)
    expired = signer.presign(
        "GET", "/e2e/err/presigned", when=now - timedelta(hours=2), expires=3600
    )
    doc = assert_error(send(cairn, "GET", expired), "AccessDenied", 403)
    assert "expired" in doc["Message"].lower()
    future = signer.presign("GET", "/e2e/err/presigned", when=now + timedelta(hours=1), expires=60)
    assert_error(send(cairn, "GET", future), "AccessDenied", 403)
    too_long = signer.presign("GET", "/e2e/err/presigned", when=now, expires=604801)
    assert_error(send(cairn, "GET", too_long), "AuthorizationQueryParametersError", 400)
    put = signer.presign("PUT", "/e2e/err/presigned-put", when=now - timedelta(hours=2), expires=60)
    assert_error(send(cairn, "PUT", put, body=b"late"), "AccessDenied", 403)
    assert_absent(s3, "err/presigned-put")
    s3.delete_object(Bucket="e2e", Key="err/presigned")


# -- aws-chunked bodies -------------------------------------------------------------------------


def chunked_headers(length: int, decoded: int, mode: str, **extra: str) -> dict[str, str]:
    return {
        "content-encoding": "aws-chunked",
        "content-length": str(length),
        "x-amz-decoded-content-length": str(decoded),
        **extra,
    }


def test_signed_aws_chunked_body_and_a_tampered_chunk_signature(
    nothing_stored: Baseline, cairn: Daemon, s3: Any, signer: Signer
) -> None:
    data = body_of(CHUNK_SIZE + 300_000, 1)  # two Cairn chunks, several aws-chunks
    mode = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"

    def attempt(key: str, tamper: int | None) -> Answer:
        probe = signer.sign("PUT", f"/e2e/{key}", payload_hash=mode)
        length = len(signed_chunks(probe, data, 256 * 1024)[0])
        signed = signer.sign(
            "PUT",
            f"/e2e/{key}",
            payload_hash=mode,
            headers=chunked_headers(length, len(data), mode),
        )
        body, _ = signed_chunks(signed, data, 256 * 1024, tamper=tamper)
        assert len(body) == length
        return send(cairn, "PUT", f"/e2e/{key}", headers=signed.headers, body=body)

    control = attempt("err/chunked-control", None)
    assert control.status == 200, control.body
    nothing_stored.keep()
    assert control.headers["etag"] == f'"{hashlib.md5(data).hexdigest()}"'
    got = s3.get_object(Bucket="e2e", Key="err/chunked-control")
    assert got["Body"].read() == data
    assert "ContentEncoding" not in got  # aws-chunked is transport, not stored
    s3.delete_object(Bucket="e2e", Key="err/chunked-control")

    for tamper in (1, 5, 6):  # a middle chunk, the last data chunk, the final empty chunk
        answer = attempt(f"err/chunked-tampered-{tamper}", tamper)
        assert_error(answer, "SignatureDoesNotMatch", 403)
        assert_absent(s3, f"err/chunked-tampered-{tamper}")


def test_wrong_trailing_checksum_unsigned_trailer(
    nothing_stored: Baseline, cairn: Daemon, s3: Any, signer: Signer
) -> None:
    data = body_of(2 * CHUNK_SIZE + 500_000, 2)  # blobs are written before the trailer
    mode = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"

    def attempt(key: str, checksum: str) -> Answer:
        step = 300_000
        body = bytearray()
        for start in range(0, len(data), step):
            piece = data[start : start + step]
            body += f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
        body += f"0\r\nx-amz-checksum-crc32:{checksum}\r\n\r\n".encode()
        signed = signer.sign(
            "PUT",
            f"/e2e/{key}",
            payload_hash=mode,
            headers=chunked_headers(
                len(body), len(data), mode, **{"x-amz-trailer": "x-amz-checksum-crc32"}
            ),
        )
        return send(cairn, "PUT", f"/e2e/{key}", headers=signed.headers, body=bytes(body))

    good = crc32_b64(data)
    control = attempt("err/trailer-control", good)
    assert control.status == 200, control.body
    nothing_stored.keep()
    assert control.headers["x-amz-checksum-crc32"] == good
    head = s3.head_object(Bucket="e2e", Key="err/trailer-control", ChecksumMode="ENABLED")
    assert head["ChecksumCRC32"] == good
    s3.delete_object(Bucket="e2e", Key="err/trailer-control")

    answer = attempt("err/trailer-wrong", crc32_b64(data + b"!"))
    assert_error(answer, "BadDigest", 400)
    assert_absent(s3, "err/trailer-wrong")


def test_signed_trailer_with_wrong_checksum(
    nothing_stored: Baseline, cairn: Daemon, s3: Any, signer: Signer
) -> None:
    data = body_of(700_000, 3)
    mode = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER"

    def attempt(key: str, checksum: str, *, tamper_trailer: bool = False) -> Answer:
        def build(signed: Any) -> bytes:
            body, last = signed_chunks(signed, data, 200_000, trailer=True)
            trailer = f"x-amz-checksum-crc32:{checksum}\n"
            to_sign = "\n".join(
                ["AWS4-HMAC-SHA256-TRAILER", signed.amz_date, signed.scope, last, _sha(trailer)]
            )
            sig = hmac.new(signed.key, to_sign.encode(), hashlib.sha256).hexdigest()
            if tamper_trailer:
                sig = flip(sig)
            return (
                body
                + f"x-amz-checksum-crc32:{checksum}\r\n".encode()
                + (f"x-amz-trailer-signature:{sig}\r\n\r\n".encode())
            )

        headers = {"x-amz-trailer": "x-amz-checksum-crc32"}
        probe = signer.sign("PUT", f"/e2e/{key}", payload_hash=mode)
        length = len(build(probe))
        signed = signer.sign(
            "PUT",
            f"/e2e/{key}",
            payload_hash=mode,
            headers=chunked_headers(length, len(data), mode, **headers),
        )
        body = build(signed)
        assert len(body) == length
        return send(cairn, "PUT", f"/e2e/{key}", headers=signed.headers, body=body)

    control = attempt("err/signed-trailer", crc32_b64(data))
    assert control.status == 200, control.body
    nothing_stored.keep()
    assert s3.get_object(Bucket="e2e", Key="err/signed-trailer")["Body"].read() == data
    s3.delete_object(Bucket="e2e", Key="err/signed-trailer")

    assert_error(attempt("err/signed-trailer-bad", crc32_b64(b"no")), "BadDigest", 400)
    bad_sig = attempt("err/signed-trailer-sig", crc32_b64(data), tamper_trailer=True)
    assert_error(bad_sig, "SignatureDoesNotMatch", 403)
    assert_absent(s3, "err/signed-trailer-bad")
    assert_absent(s3, "err/signed-trailer-sig")


# -- body checks --------------------------------------------------------------------------------


def test_wrong_content_md5_is_bad_digest(nothing_stored: Baseline, s3: Any) -> None:
    body = b"the body" * 1000
    wrong = base64.b64encode(hashlib.md5(b"something else").digest()).decode()
    with pytest.raises(ClientError) as err:
        s3.put_object(Bucket="e2e", Key="err/md5", Body=body, ContentMD5=wrong)
    assert_client_error(err.value, "BadDigest", 400)
    assert_absent(s3, "err/md5")
    right = base64.b64encode(hashlib.md5(body).digest()).decode()
    s3.put_object(Bucket="e2e", Key="err/md5", Body=body, ContentMD5=right)
    nothing_stored.keep()
    s3.delete_object(Bucket="e2e", Key="err/md5")


@pytest.mark.usefixtures("nothing_stored")
def test_wrong_content_sha256_is_refused(cairn: Daemon, s3: Any, signer: Signer) -> None:
    data = body_of(2 * CHUNK_SIZE + 10, 4)  # chunks reach the backends before the check
    signed = signer.sign("PUT", "/e2e/err/sha", payload_hash=_sha(data + b"?"))
    answer = send(cairn, "PUT", "/e2e/err/sha", headers=signed.headers, body=data)
    assert_error(answer, "XAmzContentSHA256Mismatch", 400)
    assert_absent(s3, "err/sha")


@pytest.mark.usefixtures("nothing_stored")
def test_client_disconnecting_mid_body_stores_nothing(
    cairn: Daemon, s3: Any, signer: Signer
) -> None:
    declared = 3 * CHUNK_SIZE + 100
    sent = 2 * CHUNK_SIZE + 500_000  # two whole chunks reach the writer
    signed = signer.sign("PUT", "/e2e/err/truncated", headers={"content-length": str(declared)})
    head = "PUT /e2e/err/truncated HTTP/1.1\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in signed.headers.items()
    )
    with socket.create_connection(("127.0.0.1", cairn.port), timeout=30) as sock:
        sock.sendall(head.encode() + b"\r\n")
        sock.sendall(body_of(sent, 5))
        time.sleep(0.3)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
    cairn.wait_for_log("PUT /e2e/err/truncated")
    assert_absent(s3, "err/truncated")


def test_client_leaving_mid_download_is_not_a_server_error(cairn: Daemon, s3: Any) -> None:
    """A reader that hangs up mid-body is routine (the module's daemon must log no ERROR)."""
    s3.put_object(Bucket="e2e", Key="err/download", Body=body_of(6 * CHUNK_SIZE, 7))
    url = cairn.presign("GET", "/e2e/err/download")
    target = url.split(str(cairn.port), 1)[1]
    for attempt in range(3):
        with socket.create_connection(("127.0.0.1", cairn.port), timeout=30) as sock:
            host = f"127.0.0.1:{cairn.port}"
            sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            received = sock.recv(65536)
            assert received.startswith(b"HTTP/1.1 200"), received[:300]
            while len(received) < 200_000 * (attempt + 1):
                data = sock.recv(65536)
                assert data, "the server closed the connection early"
                received += data
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    time.sleep(0.5)  # the server notices while writing the rest
    assert s3.get_object(Bucket="e2e", Key="err/download")["Body"].read() == body_of(
        6 * CHUNK_SIZE, 7
    )
    s3.delete_object(Bucket="e2e", Key="err/download")


@pytest.mark.usefixtures("nothing_stored")
def test_client_closing_its_side_early_stores_nothing(
    cairn: Daemon, s3: Any, signer: Signer
) -> None:
    declared = 2 * CHUNK_SIZE
    signed = signer.sign("PUT", "/e2e/err/half", headers={"content-length": str(declared)})
    head = "PUT /e2e/err/half HTTP/1.1\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in signed.headers.items()
    )
    with socket.create_connection(("127.0.0.1", cairn.port), timeout=30) as sock:
        sock.sendall(head.encode() + b"\r\n" + body_of(CHUNK_SIZE + 1000, 6))
        sock.shutdown(socket.SHUT_WR)
        received = b""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                break
            received += data
    # aiohttp treats the half-close as the client leaving: it may close without an answer;
    # if it answers, that is IncompleteBody. Either way nothing is stored.
    if received:
        assert received.split(b"\r\n", 1)[0].startswith(b"HTTP/1.1 400"), received[:300]
        assert b"<Code>IncompleteBody</Code>" in received
        assert b"x-amz-request-id" in received.lower()
    cairn.wait_for_log("PUT /e2e/err/half")
    assert_absent(s3, "err/half")


@pytest.mark.usefixtures("nothing_stored")
def test_http_chunked_transfer_encoding(cairn: Daemon, s3: Any, signer: Signer) -> None:
    """Transfer-Encoding: chunked bodies (no Content-Length) are stored; broken framing is
    a client error, not a server one."""
    data = body_of(CHUNK_SIZE + 4321, 8)
    good = signer.sign("PUT", "/e2e/err/te-good")
    conn = http.client.HTTPConnection("127.0.0.1", cairn.port, timeout=30)
    try:
        pieces = (data[i : i + 100_000] for i in range(0, len(data), 100_000))
        conn.request("PUT", "/e2e/err/te-good", body=pieces, headers=good.headers)
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
    finally:
        conn.close()
    assert s3.get_object(Bucket="e2e", Key="err/te-good")["Body"].read() == data
    s3.delete_object(Bucket="e2e", Key="err/te-good")

    bad = signer.sign("PUT", "/e2e/err/te-bad")
    head = "PUT /e2e/err/te-bad HTTP/1.1\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in bad.headers.items()
    )
    body = b"10\r\n" + b"x" * 16 + b"\r\nzz-not-hex\r\n" + b"y" * 100 + b"\r\n0\r\n\r\n"
    with socket.create_connection(("127.0.0.1", cairn.port), timeout=30) as sock:
        sock.sendall(head.encode() + b"Transfer-Encoding: chunked\r\n\r\n" + body)
        received = b""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            data_in = sock.recv(65536)
            if not data_in:
                break
            received += data_in
    # aiohttp answers malformed HTTP itself (plain text, HTTP/1.0, no S3 document)
    assert received.split(b"\r\n", 1)[0].split()[1] == b"400", received[:300]
    assert_absent(s3, "err/te-bad")


# -- names and buckets --------------------------------------------------------------------------


def test_key_over_1024_bytes(nothing_stored: Baseline, s3: Any) -> None:
    longest = "k/" + "é" * 511  # 2 + 1022 = 1024 bytes in UTF-8
    assert len(longest.encode()) == 1024
    s3.put_object(Bucket="e2e", Key=longest, Body=b"fits")
    nothing_stored.keep()
    assert s3.get_object(Bucket="e2e", Key=longest)["Body"].read() == b"fits"
    s3.delete_object(Bucket="e2e", Key=longest)
    too_long = longest + "x"
    with pytest.raises(ClientError) as err:
        s3.put_object(Bucket="e2e", Key=too_long, Body=b"too long")
    assert_client_error(err.value, "KeyTooLongError", 400)
    with pytest.raises(ClientError) as mpu:
        s3.create_multipart_upload(Bucket="e2e", Key=too_long)
    assert_client_error(mpu.value, "KeyTooLongError", 400)
    assert not s3.list_objects_v2(Bucket="e2e", Prefix="k/").get("Contents")


@pytest.mark.usefixtures("nothing_stored")
def test_buckets_without_a_grant_are_access_denied(cairn: Daemon, s3: Any) -> None:
    for bucket in ("no-such-bucket", "other"):  # absent, and present but not granted
        with pytest.raises(ClientError) as put:
            s3.put_object(Bucket=bucket, Key="k", Body=b"x")
        assert_client_error(put.value, "AccessDenied", 403)
        with pytest.raises(ClientError) as listing:
            s3.list_objects_v2(Bucket=bucket)
        assert_client_error(listing.value, "AccessDenied", 403)
        with pytest.raises(ClientError) as mpu:
            s3.create_multipart_upload(Bucket=bucket, Key="k")
        assert_client_error(mpu.value, "AccessDenied", 403)
    other = cairn.client(access_key="OTHERKEY00000001", secret_key="other-secret-0001")
    assert other.list_objects_v2(Bucket="other")["KeyCount"] == 0
    with pytest.raises(ClientError) as cross:
        other.get_object(Bucket="e2e", Key="anything")
    assert_client_error(cross.value, "AccessDenied", 403)


# -- multipart completion -----------------------------------------------------------------------


@pytest.fixture
def upload(s3: Any) -> Iterator[tuple[str, str, list[dict[str, Any]]]]:
    """An upload of two parts (5 MiB + a little), aborted at the end."""
    key = f"err/mpu-{time.monotonic_ns()}"
    upload_id = s3.create_multipart_upload(Bucket="e2e", Key=key)["UploadId"]
    parts = []
    for number, size in ((1, 5 * MiB), (2, 1000)):
        etag = s3.upload_part(
            Bucket="e2e",
            Key=key,
            UploadId=upload_id,
            PartNumber=number,
            Body=body_of(size, number),
        )["ETag"]
        parts.append({"PartNumber": number, "ETag": etag})
    yield key, upload_id, parts
    s3.abort_multipart_upload(Bucket="e2e", Key=key, UploadId=upload_id)
    assert_absent(s3, key)


@pytest.mark.usefixtures("nothing_stored")
def test_malformed_complete_xml(
    cairn: Daemon, s3: Any, signer: Signer, upload: tuple[str, str, list[dict[str, Any]]]
) -> None:
    key, upload_id, _ = upload
    bad_documents = [
        b"<CompleteMultipartUpload><Part><PartNumber>1</PartNumber>",
        b"not xml at all",
        b"<CompleteMultipartUpload><Part><PartNumber>one</PartNumber><ETag>x</ETag></Part>"
        b"</CompleteMultipartUpload>",
        b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e "boom">]>'
        b"<CompleteMultipartUpload><Part><PartNumber>1</PartNumber><ETag>&e;</ETag></Part>"
        b"</CompleteMultipartUpload>",
    ]
    for document in bad_documents:
        signed = signer.sign(
            "POST", f"/e2e/{key}", query=[("uploadId", upload_id)], payload_hash=_sha(document)
        )
        answer = send(
            cairn,
            "POST",
            f"/e2e/{quote(key)}?uploadId={quote(upload_id)}",
            headers=signed.headers,
            body=document,
        )
        code = answer.error()["Code"]
        assert code in ("MalformedXML", "InvalidArgument"), (document, answer.body)
        assert_error(answer, code, 400)
    assert_absent(s3, key)
    listed = s3.list_multipart_uploads(Bucket="e2e", Prefix=key)["Uploads"]
    assert [u["UploadId"] for u in listed] == [upload_id]  # still open


@pytest.mark.usefixtures("nothing_stored")
def test_complete_with_wrong_parts(s3: Any, upload: tuple[str, str, list[dict[str, Any]]]) -> None:
    key, upload_id, parts = upload

    def complete(listed: list[dict[str, Any]]) -> ClientError:
        with pytest.raises(ClientError) as err:
            s3.complete_multipart_upload(
                Bucket="e2e", Key=key, UploadId=upload_id, MultipartUpload={"Parts": listed}
            )
        return err.value

    wrong_etag = [parts[0], {"PartNumber": 2, "ETag": '"0123456789abcdef0123456789abcdef"'}]
    assert_client_error(complete(wrong_etag), "InvalidPart", 400)
    missing = [parts[0], {"PartNumber": 3, "ETag": parts[1]["ETag"]}]
    assert_client_error(complete(missing), "InvalidPart", 400)
    assert_client_error(complete([parts[1], parts[0]]), "InvalidPartOrder", 400)
    assert_absent(s3, key)
    with pytest.raises(ClientError) as unknown:
        s3.complete_multipart_upload(
            Bucket="e2e", Key=key, UploadId="no-such-upload", MultipartUpload={"Parts": parts}
        )
    assert_client_error(unknown.value, "NoSuchUpload", 404)
