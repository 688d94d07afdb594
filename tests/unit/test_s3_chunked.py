"""aws-chunked decoding, checksums and the verified request body.

Bodies come from botocore itself (``AwsChunkedWrapper``, and ``put_object`` captured before the
wire), from the AWS documentation examples, and from a small reference chunk signer written here
from the AWS specification (independent of the code under test).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import itertools
import os
import random
import threading
import tracemalloc
import urllib.request
import zlib
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp import web
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError
from botocore.httpchecksum import (
    AwsChunkedWrapper,
    Crc32Checksum,
    Sha1Checksum,
    Sha256Checksum,
    Sha512Checksum,
)

from frontends.s3 import checksums as checksums_module
from frontends.s3.checksums import (
    ChecksumAlgorithm,
    ChecksumVerifier,
    checksum_available,
    compute_checksum,
    crc32c_pure,
    crc64nvme_pure,
    new_hasher,
    parse_checksum_headers,
)
from frontends.s3.chunked import (
    AwsChunkedDecoder,
    RequestBody,
    declared_trailers,
    decode_aws_chunked,
    strip_aws_chunked,
)
from frontends.s3.errors import S3AuthError, S3Error
from frontends.s3.sigv4 import AuthContext, PayloadMode, RequestParts, verify
from frontends.s3.streams import ReadFn, iter_read, reader_from_iterable
from frontends.s3.xml import render_s3_error
from tests.unit.test_s3_sigv4 import (
    ACCESS_KEY,
    REGION,
    SECRET,
    SIGNED_AT,
    capture,
    clean_aws_env,
    make_client,
    pinned_clock,  # noqa: F401 - a fixture used by name
    secrets,
)

pytestmark = pytest.mark.unit

EMPTY = hashlib.sha256(b"").hexdigest()
MiB = 1024 * 1024


# --- helpers -----------------------------------------------------------------------------------


def reader(data: bytes, *, step: int | None = None) -> ReadFn:
    """``read(n)`` over ``data``; ``step`` caps each read (network-like short reads)."""
    position = 0

    async def read(n: int) -> bytes:
        nonlocal position
        size = min(n, step) if step else n
        piece = data[position : position + size]
        position += len(piece)
        return piece

    return read


async def collect(pieces: Any) -> bytes:
    return b"".join([piece async for piece in pieces])


async def failure(pieces: Any) -> tuple[S3Error, bytes]:
    """Consume ``pieces`` until they raise; return the error and what was received."""
    received = bytearray()
    try:
        async for piece in pieces:
            received.extend(piece)
    except S3Error as error:
        return error, bytes(received)
    pytest.fail("the body was accepted")


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def unsigned_body(data: bytes, chunk_size: int, checksum_cls: Any, name: str) -> bytes:
    """Exactly what botocore sends for STREAMING-UNSIGNED-PAYLOAD-TRAILER."""
    wrapper = AwsChunkedWrapper(
        io.BytesIO(data), checksum_cls=checksum_cls, checksum_name=name, chunk_size=chunk_size
    )
    body = wrapper.read()
    assert isinstance(body, bytes)
    return body


# Bitwise reference CRCs, deliberately unlike the table-driven code under test.
def crc32c_bitwise(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def crc64nvme_bitwise(data: bytes) -> int:
    crc = 0xFFFFFFFFFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x9A6C9329AC4BC9B5 & -(crc & 1))
    return crc ^ 0xFFFFFFFFFFFFFFFF


class BitwiseCrc32c:
    """A botocore-style checksum class for ``AwsChunkedWrapper``."""

    def __init__(self) -> None:
        self._data = bytearray()

    def update(self, chunk: bytes) -> None:
        self._data.extend(chunk)

    def b64digest(self) -> str:
        return b64(crc32c_bitwise(bytes(self._data)).to_bytes(4, "big"))


class BitwiseCrc64Nvme(BitwiseCrc32c):
    def b64digest(self) -> str:
        return b64(crc64nvme_bitwise(bytes(self._data)).to_bytes(8, "big"))


# --- reference signer (from the AWS specification) ---------------------------------------------


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def reference_signing_key(secret: str, date: str, region: str) -> bytes:
    key = _hmac(("AWS4" + secret).encode(), date)
    for part in (region, "s3", "aws4_request"):
        key = _hmac(key, part)
    return key


def signed_chunked_body(
    chunks: Iterable[bytes],
    *,
    key: bytes,
    amz_date: str,
    scope: str,
    seed: str,
    trailers: Sequence[tuple[str, str]] | None = None,
) -> Iterator[bytes]:
    """Yield a signed aws-chunked body piece by piece (lazily, for large bodies)."""
    previous = seed
    for chunk in itertools.chain(chunks, [b""]):  # lazily: bodies may be large
        string_to_sign = "\n".join(
            (
                "AWS4-HMAC-SHA256-PAYLOAD",
                amz_date,
                scope,
                previous,
                EMPTY,
                hashlib.sha256(chunk).hexdigest(),
            )
        )
        previous = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
        yield f"{len(chunk):x};chunk-signature={previous}\r\n".encode()
        if chunk:
            yield chunk
            yield b"\r\n"
    if trailers is not None:
        lines = "".join(f"{name}:{value}\n" for name, value in trailers)
        string_to_sign = "\n".join(
            (
                "AWS4-HMAC-SHA256-TRAILER",
                amz_date,
                scope,
                previous,
                hashlib.sha256(lines.encode()).hexdigest(),
            )
        )
        signature = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
        for name, value in trailers:
            yield f"{name}:{value}\r\n".encode()
        yield f"x-amz-trailer-signature:{signature}\r\n".encode()
    yield b"\r\n"


class StreamingSigner(S3SigV4Auth):
    """botocore's S3 signer, told to sign a streaming payload mode (it would hash the body)."""

    def __init__(self, mode: str) -> None:
        super().__init__(Credentials(ACCESS_KEY, SECRET), "s3", REGION)
        self._mode = mode

    def payload(self, request: Any) -> str:
        return self._mode


def botocore_streaming_request(
    mode: PayloadMode, decoded_length: int, trailer: str | None = None
) -> dict[str, str]:
    """Headers of a request whose seed signature botocore computed (clock pinned)."""
    headers = {
        "Content-Encoding": "aws-chunked",
        "X-Amz-Decoded-Content-Length": str(decoded_length),
    }
    if trailer:
        headers["x-amz-trailer"] = trailer
    request = AWSRequest(
        method="PUT", url="http://127.0.0.1:9000/bucket/big%20object", headers=headers
    )
    request.context["timestamp"] = SIGNED_AT.strftime("%Y%m%dT%H%M%SZ")
    signer = StreamingSigner(mode.value)
    signer._modify_request_before_signing(request)
    canonical = signer.canonical_request(request)
    signature = signer.signature(signer.string_to_sign(request, canonical), request)
    signer._inject_signature_to_request(request, signature)
    out = dict(request.headers.items())
    out["Host"] = "127.0.0.1:9000"
    return out


def streaming_auth(
    mode: PayloadMode, decoded_length: int, trailer: str | None = None
) -> tuple[AuthContext, dict[str, str]]:
    headers = botocore_streaming_request(mode, decoded_length, trailer)
    parts = RequestParts("PUT", "/bucket/big%20object", [], headers)
    context = verify(parts, secrets, now=SIGNED_AT, region=REGION)
    assert context.payload_mode is mode
    return context, headers


def reference_body(
    context: AuthContext, chunks: Sequence[bytes], trailers: Sequence[tuple[str, str]] | None = None
) -> bytes:
    key = reference_signing_key(SECRET, "20261122", REGION)
    return b"".join(
        signed_chunked_body(
            chunks,
            key=key,
            amz_date="20261122T120000Z",
            scope=f"20261122/{REGION}/s3/aws4_request",
            seed=context.seed_signature,
            trailers=trailers,
        )
    )


# --- the AWS documentation examples ------------------------------------------------------------

AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
AWS_NOW = datetime(2013, 5, 24, 0, 1, 0, tzinfo=UTC)
AWS_DOC = {
    False: (
        "STREAMING-AWS4-HMAC-SHA256-PAYLOAD",
        "content-encoding;content-length;host;x-amz-content-sha256;x-amz-date;"
        "x-amz-decoded-content-length;x-amz-storage-class",
        "4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9",
        (
            "ad80c730a21e5b8d04586a2213dd63b9a0e99e0e2307b0ade35a65485a288648",
            "0055627c9e194cb4542bae2aa5492e3c1575bbb81b612b7d234b86a503ef5497",
            "b6c6ea8a5354eaf15b3cb7646744f4275b71ea724fed81ceb9323e279d449df9",
        ),
        b"",
    ),
    True: (
        "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER",
        "content-encoding;host;x-amz-content-sha256;x-amz-date;x-amz-decoded-content-length;"
        "x-amz-storage-class;x-amz-trailer",
        "106e2a8a18243abcf37539882f36619c00e2dfc72633413f02d3b74544bfeb8e",
        (
            "b474d8862b1487a5145d686f57f013e54db672cee1c953b3010fb58501ef5aa2",
            "1c1344b170168f8e65b41376b44b20fe354e373826ccbbe2c1d40a8cae51e5c7",
            "2ca2aba2005185cf7159c6277faf83795951dd77a3a99e6e65d5c9f85863f992",
        ),
        b"x-amz-checksum-crc32c:sOO8/Q==\r\n"
        b"x-amz-trailer-signature:d81f82fc3505edab99d459891051a732e8730629a2e4a59689829ca17fe2e435"
        b"\r\n",
    ),
}


def aws_doc_request(trailer: bool) -> tuple[AuthContext, dict[str, str], bytes]:
    mode, signed, seed, signatures, trailers = AWS_DOC[trailer]
    body = (
        f"10000;chunk-signature={signatures[0]}\r\n".encode()
        + b"a" * 65536
        + f"\r\n400;chunk-signature={signatures[1]}\r\n".encode()
        + b"a" * 1024
        + f"\r\n0;chunk-signature={signatures[2]}\r\n".encode()
        + trailers
        + b"\r\n"
    )
    headers = {
        "Host": "s3.amazonaws.com",
        "Content-Encoding": "aws-chunked",
        "x-amz-content-sha256": mode,
        "x-amz-date": "20130524T000000Z",
        "x-amz-decoded-content-length": "66560",
        "x-amz-storage-class": "REDUCED_REDUNDANCY",
        "Authorization": (
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/"
            f"aws4_request,SignedHeaders={signed},Signature={seed}"
        ),
    }
    if trailer:
        headers["x-amz-trailer"] = "x-amz-checksum-crc32c"
    else:
        headers["Content-Length"] = "66824"
        assert len(body) == 66824  # the documented Content-Length
    context = verify(
        RequestParts("PUT", "/examplebucket/chunkObject.txt", [], headers),
        lambda _: AWS_SECRET,
        now=AWS_NOW,
        region="us-east-1",
    )
    assert context.seed_signature == seed
    return context, headers, body


@pytest.mark.parametrize("trailer", [False, True])
async def test_aws_documented_chunked_upload(trailer: bool) -> None:
    context, headers, body = aws_doc_request(trailer)
    for step in (None, 1000, 7):
        request_body = RequestBody(reader(body, step=step), headers, context)
        assert await collect(request_body) == b"a" * 66560
        assert request_body.length == 66560
        if trailer:
            assert request_body.trailers == {"x-amz-checksum-crc32c": "sOO8/Q=="}
            assert request_body.checksums == {ChecksumAlgorithm.CRC32C: "sOO8/Q=="}
        else:
            assert request_body.trailers == {}


@pytest.mark.parametrize("trailer", [False, True])
async def test_aws_documented_chunks_tampered(trailer: bool) -> None:
    context, headers, body = aws_doc_request(trailer)
    first_data = body.index(b"\r\n") + 2
    signatures = AWS_DOC[trailer][3]

    def flip(signature: str) -> bytes:
        return body.replace(signature.encode(), ("f" + signature[1:]).encode())

    cases = {
        "data": body[: first_data + 100] + b"b" + body[first_data + 101 :],
        "signature": flip(signatures[1]),
        "final signature": flip(signatures[2]),
        "no signature": body.replace(f";chunk-signature={signatures[1]}".encode(), b""),
        "swapped": body.replace(signatures[0].encode(), b"X" * 64)
        .replace(signatures[1].encode(), signatures[0].encode())
        .replace(b"X" * 64, signatures[1].encode()),
    }
    if trailer:
        cases["trailer signature"] = body.replace(b":d81f82fc", b":e81f82fc")
        cases["trailer value"] = body.replace(b"sOO8/Q==", b"AAAAAA==")
    for name, tampered in cases.items():
        assert tampered != body, name
        error, received = await failure(RequestBody(reader(tampered), headers, context))
        assert error.code == "SignatureDoesNotMatch", (name, error)
        assert error.status == 403
        assert len(received) < 66560, name


# --- what botocore sends -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def https_client() -> Iterator[Any]:
    with pytest.MonkeyPatch.context() as mp:
        clean_aws_env(mp)
        yield make_client("https://127.0.0.1:9443")


@pytest.fixture(scope="module")
def http_client() -> Iterator[Any]:
    with pytest.MonkeyPatch.context() as mp:
        clean_aws_env(mp)
        yield make_client("http://127.0.0.1:9000")


@pytest.mark.usefixtures("pinned_clock")
@pytest.mark.parametrize("algorithm", [None, "CRC32", "SHA1", "SHA256"])
async def test_botocore_https_put_uses_unsigned_trailer(
    https_client: Any, algorithm: str | None
) -> None:
    data = os.urandom(3 * MiB + 17)
    params: dict[str, Any] = {"Bucket": "bucket", "Key": "k y", "Body": data}
    if algorithm:
        params["ChecksumAlgorithm"] = algorithm
    sent = capture(https_client, "put_object", **params)
    headers = sent.header_dict()
    expected_algorithm = ChecksumAlgorithm((algorithm or "CRC32").lower())
    assert headers["x-amz-content-sha256"] == "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
    assert headers["content-encoding"] == "aws-chunked"
    assert headers["x-amz-trailer"] == expected_algorithm.header
    assert headers["x-amz-decoded-content-length"] == str(len(data))
    context = verify(sent.parts(), secrets, now=SIGNED_AT, region=REGION)
    assert context.payload_mode is PayloadMode.STREAMING_UNSIGNED_TRAILER
    body = RequestBody(reader(sent.body, step=100_000), headers, context)
    assert await collect(body) == data
    assert body.checksums[expected_algorithm] == compute_checksum(expected_algorithm, data)
    assert body.trailers == {expected_algorithm.header: body.checksums[expected_algorithm]}
    assert strip_aws_chunked(headers["content-encoding"]) is None

    corrupt = bytearray(sent.body)
    corrupt[len(corrupt) // 2] ^= 0x01
    error, received = await failure(RequestBody(reader(bytes(corrupt)), headers, context))
    assert (error.code, error.status) == ("BadDigest", 400)
    assert error.message == (
        f"The {expected_algorithm.display_name} you specified did not match the calculated "
        "checksum."
    )
    assert len(received) < len(data)


@pytest.mark.usefixtures("pinned_clock")
async def test_botocore_http_put_uses_header_checksum_and_signed_payload(http_client: Any) -> None:
    data = os.urandom(200_000)
    sent = capture(http_client, "put_object", Bucket="bucket", Key="k", Body=data)
    headers = sent.header_dict()
    assert headers["x-amz-checksum-crc32"] == compute_checksum(ChecksumAlgorithm.CRC32, data)
    context = verify(sent.parts(), secrets, now=SIGNED_AT, region=REGION)
    assert context.payload_mode is PayloadMode.SHA256
    body = RequestBody(reader(sent.body, step=65536), headers, context)
    assert await collect(body) == data
    assert body.checksums == {ChecksumAlgorithm.CRC32: headers["x-amz-checksum-crc32"]}
    tampered = bytes([data[0] ^ 1]) + data[1:]
    error, received = await failure(RequestBody(reader(tampered), headers, context))
    assert error.code == "XAmzContentSHA256Mismatch"
    assert len(received) < len(data)

    md5_sent = capture(
        http_client,
        "put_object",
        Bucket="bucket",
        Key="k",
        Body=data,
        ContentMD5=b64(hashlib.md5(data).digest()),
    )
    md5_context = verify(md5_sent.parts(), secrets, now=SIGNED_AT, region=REGION)
    body = RequestBody(reader(md5_sent.body), md5_sent.header_dict(), md5_context)
    assert await collect(body) == data


# --- botocore's AwsChunkedWrapper, every checksum ----------------------------------------------


@pytest.mark.parametrize(
    ("checksum_cls", "algorithm"),
    [
        (Crc32Checksum, ChecksumAlgorithm.CRC32),
        (Sha1Checksum, ChecksumAlgorithm.SHA1),
        (Sha256Checksum, ChecksumAlgorithm.SHA256),
        (Sha512Checksum, ChecksumAlgorithm.SHA512),
        (BitwiseCrc32c, ChecksumAlgorithm.CRC32C),
        (BitwiseCrc64Nvme, ChecksumAlgorithm.CRC64NVME),
    ],
)
@pytest.mark.parametrize("size", [0, 1, 8191, 20_000])
async def test_unsigned_trailer_bodies_from_botocore_wrapper(
    checksum_cls: Any, algorithm: ChecksumAlgorithm, size: int
) -> None:
    data = random.Random(size).randbytes(size)
    body = unsigned_body(data, 8192, checksum_cls, algorithm.header)
    decoder = AwsChunkedDecoder(
        reader(body, step=3000),
        mode=PayloadMode.STREAMING_UNSIGNED_TRAILER,
        trailers=[algorithm.header],
        decoded_length=size,
        piece_size=4096,
    )
    pieces = [piece async for piece in decoder]
    assert b"".join(pieces) == data
    assert all(0 < len(p) <= 4096 for p in pieces)
    assert decoder.length == size
    reference = checksum_cls()
    reference.update(data)
    expected = reference.b64digest()
    assert decoder.trailers_received == {algorithm.header: expected}
    assert decoder.checksums.results() == {algorithm: expected}
    # The same trailer with a wrong value.
    zero = b64(bytes(algorithm.digest_size))
    wrong = body.replace(expected.encode(), (zero if expected != zero else "/" + zero[1:]).encode())
    error, _ = await failure(
        decode_aws_chunked(
            reader(wrong),
            mode=PayloadMode.STREAMING_UNSIGNED_TRAILER,
            trailers=[algorithm.header],
        )
    )
    assert error.code == "BadDigest"


async def test_anonymous_unsigned_trailer_body() -> None:
    body = b"3\r\nabc\r\n0\r\nx-amz-checksum-crc32:NSRBwg==\r\n\r\n"
    headers = {
        "x-amz-content-sha256": "STREAMING-UNSIGNED-PAYLOAD-TRAILER",
        "x-amz-decoded-content-length": "3",
        "x-amz-trailer": "x-amz-checksum-crc32",
        "Content-Encoding": "gzip, aws-chunked",
    }
    request_body = RequestBody(reader(body), headers, None)
    assert await collect(request_body) == b"abc"
    assert request_body.trailers == {"x-amz-checksum-crc32": "NSRBwg=="}
    assert strip_aws_chunked(headers["Content-Encoding"]) == "gzip"
    signed = {**headers, "x-amz-content-sha256": "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"}
    with pytest.raises(S3AuthError) as info:
        RequestBody(reader(body), signed, None)
    assert info.value.code == "AccessDenied"


# --- signed chunks from a botocore seed --------------------------------------------------------


@pytest.mark.usefixtures("pinned_clock")
@pytest.mark.parametrize("trailer", [False, True])
async def test_signed_chunks_chained_from_botocore_seed(trailer: bool) -> None:
    mode = PayloadMode.STREAMING_SIGNED_TRAILER if trailer else PayloadMode.STREAMING_SIGNED
    data = random.Random(1).randbytes(150_000)
    chunks = [data[:65536], data[65536:131072], data[131072:]]
    name = "x-amz-checksum-crc32"
    crc = compute_checksum(ChecksumAlgorithm.CRC32, data)
    context, headers = streaming_auth(mode, len(data), name if trailer else None)
    trailers = [(name, crc)] if trailer else None
    body = reference_body(context, chunks, trailers)
    request_body = RequestBody(reader(body, step=10_000), headers, context, piece_size=30_000)
    pieces = [piece async for piece in request_body]
    assert b"".join(pieces) == data
    assert max(len(p) for p in pieces) <= 30_000
    assert request_body.trailers == ({name: crc} if trailer else {})

    # Frames as signed for this request: header line + data + CRLF, one per chunk.
    pieces_out = list(
        signed_chunked_body(
            chunks,
            key=reference_signing_key(SECRET, "20261122", REGION),
            amz_date="20261122T120000Z",
            scope=f"20261122/{REGION}/s3/aws4_request",
            seed=context.seed_signature,
            trailers=trailers,
        )
    )
    frame = [b"".join(pieces_out[3 * i : 3 * i + 3]) for i in range(3)]
    rest = b"".join(pieces_out[9:])
    assert b"".join(frame) + rest == body
    tampered = {
        "data": body.replace(data[70_000:70_010], bytes(10), 1),
        "reordered": frame[1] + frame[0] + frame[2] + rest,
        "dropped": frame[0] + frame[2] + rest,
        "repeated": frame[0] + frame[0] + frame[1] + frame[2] + rest,
        "signed for another request": reference_body(
            replace(context, seed_signature="0" * 64), chunks, trailers
        ),
    }
    for case, bad in tampered.items():
        error, received = await failure(RequestBody(reader(bad), headers, context))
        assert error.code == "SignatureDoesNotMatch", (case, error)
        assert len(received) <= 65536, case  # nothing after the first bad chunk
    if trailer:
        wrong_crc = reference_body(context, chunks, [(name, "AAAAAA==")])
        error, _ = await failure(RequestBody(reader(wrong_crc), headers, context))
        assert error.code == "BadDigest"  # the trailer is signed correctly, the value is wrong
        unsigned_trailer = body.replace(
            name.encode() + b":" + crc.encode(), b"x-amz-checksum-crc32:AAAAAA=="
        )
        error, _ = await failure(RequestBody(reader(unsigned_trailer), headers, context))
        assert error.code == "SignatureDoesNotMatch"


@pytest.mark.usefixtures("pinned_clock")
async def test_signed_chunks_need_the_decoded_length_and_a_signed_request() -> None:
    context, headers = streaming_auth(PayloadMode.STREAMING_SIGNED, 3)
    without = {k: v for k, v in headers.items() if k.lower() != "x-amz-decoded-content-length"}
    with pytest.raises(S3Error) as info:
        RequestBody(reader(b""), without, context)
    assert (info.value.code, info.value.status) == ("MissingContentLength", 411)
    with pytest.raises(S3AuthError) as auth_info:
        AwsChunkedDecoder(reader(b""), mode=PayloadMode.STREAMING_SIGNED)
    assert auth_info.value.code == "AccessDenied"
    with pytest.raises(ValueError, match="not an aws-chunked"):
        AwsChunkedDecoder(reader(b""), mode=PayloadMode.UNSIGNED)
    with pytest.raises(S3Error) as info:
        AwsChunkedDecoder(
            reader(b""), mode=context.payload_mode, auth=context, trailers=["x-amz-checksum-crc32"]
        )
    assert (info.value.code, info.value.status) == ("InvalidRequest", 400)


@pytest.mark.usefixtures("pinned_clock")
async def test_decoded_length_must_match() -> None:
    data = b"x" * 1000
    context, headers = streaming_auth(PayloadMode.STREAMING_SIGNED, 999)
    body = reference_body(context, [data])
    error, _ = await failure(RequestBody(reader(body), headers, context))
    assert error.code == "IncompleteBody"
    context, headers = streaming_auth(PayloadMode.STREAMING_SIGNED, 1001)
    body = reference_body(context, [data])
    error, received = await failure(RequestBody(reader(body), headers, context))
    assert error.code == "IncompleteBody"
    assert received == b""  # the only piece is the last one: withheld


# --- truncation and malformed framing ----------------------------------------------------------

UNSIGNED_TRAILER_BODY = unsigned_body(
    b"hello world, " * 50, 256, Crc32Checksum, "x-amz-checksum-crc32"
)


def unsigned_decoder(body: bytes, **options: Any) -> AwsChunkedDecoder:
    defaults: dict[str, Any] = {
        "mode": PayloadMode.STREAMING_UNSIGNED_TRAILER,
        "trailers": ["x-amz-checksum-crc32"],
        "decoded_length": 650,
    }
    return AwsChunkedDecoder(reader(body, step=64), **{**defaults, **options})


async def test_every_truncation_is_refused() -> None:
    body = UNSIGNED_TRAILER_BODY
    assert await collect(unsigned_decoder(body)) == b"hello world, " * 50
    # A client that stops after the last trailer line has sent everything that is checked.
    assert body.endswith(b"\r\n\r\n")
    assert await collect(unsigned_decoder(body[:-2])) == b"hello world, " * 50
    trailer_start = body.index(b"x-amz-checksum")
    for cut in range(len(body) - 2):
        error, received = await failure(unsigned_decoder(body[:cut]))
        expected = "MalformedTrailerError" if cut == trailer_start else "IncompleteBody"
        assert error.code == expected, (cut, error)
        assert len(received) < 650


@pytest.mark.usefixtures("pinned_clock")
async def test_truncated_signed_body() -> None:
    data = b"y" * 20_000
    context, headers = streaming_auth(PayloadMode.STREAMING_SIGNED, len(data))
    body = reference_body(context, [data[:8192], data[8192:]])
    for cut in (0, 10, 100, 8192, 8300, len(body) - 70, len(body) - 3):
        error, _ = await failure(RequestBody(reader(body[:cut]), headers, context))
        assert error.code == "IncompleteBody", cut


@pytest.mark.parametrize(
    ("body", "code", "fragment"),
    [
        (b"zz\r\nab\r\n0\r\n\r\n", "InvalidRequest", "invalid chunk size"),
        (b"-1\r\n", "InvalidRequest", "invalid chunk size"),
        (b"\r\n", "InvalidRequest", "invalid chunk size"),
        (b"11111111111111111\r\n", "InvalidRequest", "invalid chunk size"),
        (b"2\nab\r\n0\r\n\r\n", "InvalidRequest", "CRLF"),
        (b"2\r\nabXY0\r\n\r\n", "InvalidRequest", "not followed by CRLF"),
        (b"2\r\nab\r\n0\r\n\r\nextra", "InvalidRequest", "data follows"),
        (b"1" + b" " * 5000 + b"\r\n", "InvalidRequest", "longer than 4096"),
        (b"1" * 5000, "InvalidRequest", "longer than 4096"),
        (b"1000001\r\n", "InvalidRequest", "exceeds the limit"),
        (b"2\r\nab\r\n0\r\nx-amz-checksum-crc32\r\n\r\n", "MalformedTrailerError", "no ':'"),
        (b"2\r\nab\r\n0\r\nx-amz-meta-a:b\r\n\r\n", "MalformedTrailerError", "not declared"),
        (b"2\r\nab\r\n0\r\n\r\n", "MalformedTrailerError", "missing"),
        (
            b"2\r\nab\r\n0\r\nx-amz-checksum-crc32:noNIbQ==\r\nx-amz-checksum-crc32:noNIbQ==\r\n\r\n",
            "MalformedTrailerError",
            "twice",
        ),
        (b"2\r\nab\r\n0\r\nx-amz-checksum-crc32:!!\r\n\r\n", "InvalidRequest", "invalid"),
        (b"2\r\nab\r\n0\r\nx-amz-checksum-crc32:AAAAAA==\r\n\r\n", "BadDigest", "CRC32"),
    ],
)
async def test_malformed_framing(body: bytes, code: str, fragment: str) -> None:
    decoder = AwsChunkedDecoder(
        reader(body),
        mode=PayloadMode.STREAMING_UNSIGNED_TRAILER,
        trailers=["x-amz-checksum-crc32"],
        max_chunk_size=16 * MiB,
    )
    error, _ = await failure(decoder)
    assert error.code == code, error
    assert fragment in error.message


async def test_trailer_declarations() -> None:
    good = b"2\r\nab\r\n0\r\nx-amz-checksum-crc32:noNIbQ==\r\n\r\n"
    assert compute_checksum(ChecksumAlgorithm.CRC32, b"ab") == "noNIbQ=="
    assert await collect(unsigned_decoder(good, decoded_length=2)) == b"ab"
    with pytest.raises(S3Error) as info:
        unsigned_decoder(good, trailers=["x-amz-meta-foo"])
    assert info.value.code == "InvalidRequest"
    assert declared_trailers({"X-Amz-Trailer": " x-amz-checksum-CRC32C , "}) == (
        "x-amz-checksum-crc32c",
    )
    assert declared_trailers({}) == ()
    decoder = unsigned_decoder(good, decoded_length=2)
    await collect(decoder)
    with pytest.raises(RuntimeError):
        aiter(decoder)


async def test_pieces_respect_the_piece_size() -> None:
    data = random.Random(5).randbytes(100_000)
    body = unsigned_body(data, 40_000, Crc32Checksum, "x-amz-checksum-crc32")
    for step in (1, 7, 5000, None):
        decoder = AwsChunkedDecoder(
            reader(body, step=step),
            mode=PayloadMode.STREAMING_UNSIGNED_TRAILER,
            trailers=["x-amz-checksum-crc32"],
            piece_size=3000,
        )
        pieces = [piece async for piece in decoder]
        assert b"".join(pieces) == data
        assert max(len(p) for p in pieces) <= 3000


# --- bounded memory ----------------------------------------------------------------------------


class LazyBytes(io.RawIOBase):
    """A readable of ``size`` deterministic bytes that never exists in memory at once."""

    def __init__(self, size: int) -> None:
        self._block = random.Random(9).randbytes(MiB)
        self._left = size
        self._offset = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = self._left if n < 0 else min(n, self._left)
        start = self._offset % MiB
        piece = (self._block[start:] + self._block[:start])[:n] if n else b""
        self._left -= len(piece)
        self._offset += len(piece)
        return piece


async def test_64_mib_unsigned_body_decodes_in_bounded_memory() -> None:
    size = 64 * MiB
    wrapper = AwsChunkedWrapper(
        LazyBytes(size), checksum_cls=Crc32Checksum, checksum_name="x-amz-checksum-crc32"
    )

    async def read(n: int) -> bytes:
        piece = wrapper.read(n)
        assert isinstance(piece, bytes)
        return piece

    headers = {
        "x-amz-content-sha256": "STREAMING-UNSIGNED-PAYLOAD-TRAILER",
        "x-amz-trailer": "x-amz-checksum-crc32",
        "x-amz-decoded-content-length": str(size),
    }
    expected = LazyBytes(size)
    crc = 0
    largest = 0
    tracemalloc.start()
    try:
        body = RequestBody(read, headers, None)
        async for piece in body:
            largest = max(largest, len(piece))
            assert piece == expected.read(len(piece))
            crc = zlib.crc32(piece, crc)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert body.length == size
    assert largest <= AwsChunkedWrapper._DEFAULT_CHUNK_SIZE  # never more than one chunk
    assert peak < 8 * MiB, peak  # the producer holds ~2 chunks, the decoder ~2 pieces
    assert body.checksums[ChecksumAlgorithm.CRC32] == b64(crc.to_bytes(4, "big"))


@pytest.mark.usefixtures("pinned_clock")
async def test_16_mib_signed_body_decodes_in_bounded_memory() -> None:
    size = 16 * MiB
    chunk_size = 256 * 1024
    context, headers = streaming_auth(PayloadMode.STREAMING_SIGNED, size)
    source = LazyBytes(size)

    def chunks() -> Iterator[bytes]:
        while piece := source.read(chunk_size):
            yield piece

    frames = signed_chunked_body(
        chunks(),
        key=reference_signing_key(SECRET, "20261122", REGION),
        amz_date="20261122T120000Z",
        scope=f"20261122/{REGION}/s3/aws4_request",
        seed=context.seed_signature,
    )

    async def produce() -> AsyncIterator[bytes]:
        for frame in frames:
            yield frame

    largest = 0
    tracemalloc.start()
    try:
        body = RequestBody(reader_from_iterable(produce()), headers, context)
        async for piece in body:
            largest = max(largest, len(piece))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert body.length == size
    assert largest <= chunk_size
    assert peak < 4 * MiB, peak


# --- plain (not aws-chunked) bodies ------------------------------------------------------------


async def test_plain_body_with_content_md5_and_checksum_headers() -> None:
    data = b"plain body " * 1000
    md5 = b64(hashlib.md5(data).digest())
    sha = compute_checksum(ChecksumAlgorithm.SHA256, data)
    headers = {"Content-MD5": md5, "x-amz-checksum-sha256": sha, "Content-Length": str(len(data))}
    body = RequestBody(
        reader(data, step=999),
        headers,
        None,
        compute=[ChecksumAlgorithm.CRC32C, ChecksumAlgorithm.CRC64NVME],
        piece_size=4096,
    )
    with pytest.raises(RuntimeError):
        _ = body.checksums
    pieces = [piece async for piece in body]
    assert b"".join(pieces) == data
    assert max(map(len, pieces)) <= 4096
    assert body.mode is PayloadMode.UNSIGNED
    assert body.checksums == {
        ChecksumAlgorithm.SHA256: sha,
        ChecksumAlgorithm.CRC32C: b64(crc32c_bitwise(data).to_bytes(4, "big")),
        ChecksumAlgorithm.CRC64NVME: b64(crc64nvme_bitwise(data).to_bytes(8, "big")),
        ChecksumAlgorithm.MD5: md5,
    }

    other_md5 = b64(hashlib.md5(b"other").digest())
    error, received = await failure(
        RequestBody(reader(data), {**headers, "Content-MD5": other_md5}, None)
    )
    assert (error.code, error.status) == ("BadDigest", 400)
    assert error.message == "The Content-MD5 you specified did not match what we received."
    assert error.extra == {"ExpectedDigest": other_md5, "CalculatedDigest": md5}
    assert len(received) < len(data)
    error, _ = await failure(
        RequestBody(reader(data), {**headers, "x-amz-checksum-sha256": b64(bytes(32))}, None)
    )
    assert error.message == "The SHA256 you specified did not match the calculated checksum."
    error, _ = await failure(RequestBody(reader(data[:-1]), headers, None))
    assert error.code == "IncompleteBody"


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({"Content-MD5": "not base64!"}, "InvalidDigest"),
        ({"Content-MD5": b64(b"short")}, "InvalidDigest"),
        ({"x-amz-checksum-crc32": "AAAA"}, "InvalidRequest"),
        (
            {"x-amz-checksum-crc32": "AAAAAA==", "x-amz-checksum-sha1": b64(bytes(20))},
            "InvalidRequest",
        ),
        ({"x-amz-checksum-whirlpool": "AAAAAA=="}, "InvalidRequest"),
        ({"x-amz-content-sha256": "nonsense"}, "InvalidArgument"),
        ({"x-amz-content-sha256": "STREAMING-AWS4-ECDSA-P256-SHA256-PAYLOAD"}, "NotImplemented"),
        ({"Content-Length": "-1"}, "InvalidArgument"),
        (
            {
                "x-amz-content-sha256": "STREAMING-UNSIGNED-PAYLOAD-TRAILER",
                "x-amz-decoded-content-length": "ten",
            },
            "InvalidArgument",
        ),
        (
            {
                "x-amz-content-sha256": "STREAMING-UNSIGNED-PAYLOAD-TRAILER",
                "x-amz-trailer": "x-amz-checksum-crc32",
                "x-amz-checksum-crc32": "AAAAAA==",
            },
            "InvalidRequest",
        ),
    ],
)
def test_malformed_body_headers(headers: dict[str, str], code: str) -> None:
    with pytest.raises(S3Error) as info:
        RequestBody(reader(b""), headers, None)
    assert info.value.code == code


async def test_anonymous_body_with_declared_sha256() -> None:
    data = b"declared"
    headers = {"x-amz-content-sha256": hashlib.sha256(data).hexdigest()}
    assert await collect(RequestBody(reader(data), headers, None)) == data
    error, received = await failure(RequestBody(reader(b"changed!"), headers, None))
    assert error.code == "XAmzContentSHA256Mismatch"
    assert received == b""


# --- checksum algorithms -----------------------------------------------------------------------


def test_checksum_check_values() -> None:
    check = b"123456789"
    assert crc32c_pure(check, 0) == 0xE3069283
    assert crc64nvme_pure(check, 0) == 0xAE8B14860A799888
    assert crc32c_pure(check[4:], crc32c_pure(check[:4], 0)) == 0xE3069283
    assert crc32c_pure(b"", 0) == 0
    # The CRC32C of the AWS trailer example (66560 bytes of "a"), computed by AWS.
    assert compute_checksum(ChecksumAlgorithm.CRC32C, b"a" * 66560) == "sOO8/Q=="


@pytest.mark.parametrize(
    ("algorithm", "reference"),
    [
        (ChecksumAlgorithm.CRC32, Crc32Checksum),
        (ChecksumAlgorithm.SHA1, Sha1Checksum),
        (ChecksumAlgorithm.SHA256, Sha256Checksum),
        (ChecksumAlgorithm.SHA512, Sha512Checksum),
        (ChecksumAlgorithm.CRC32C, BitwiseCrc32c),
        (ChecksumAlgorithm.CRC64NVME, BitwiseCrc64Nvme),
    ],
)
def test_checksums_match_independent_implementations(
    algorithm: ChecksumAlgorithm, reference: Any
) -> None:
    rng = random.Random(algorithm.value)
    for size in (0, 1, 3, 64, 1000, 5000):
        data = rng.randbytes(size)
        hasher = new_hasher(algorithm)
        for start in range(0, size, 333):
            hasher.update(data[start : start + 333])
        expected = reference()
        expected.update(data)
        assert b64(hasher.digest()) == expected.b64digest()
        assert len(hasher.digest()) == algorithm.digest_size


def test_checksum_algorithm_names_and_availability() -> None:
    assert ChecksumAlgorithm.from_header("X-Amz-Checksum-CRC64NVME") is ChecksumAlgorithm.CRC64NVME
    assert ChecksumAlgorithm.from_header("x-amz-checksum-type") is None
    assert ChecksumAlgorithm.from_header("content-md5") is None
    assert ChecksumAlgorithm.CRC32C.header == "x-amz-checksum-crc32c"
    assert ChecksumAlgorithm.CRC32C.display_name == "CRC32C"
    assert (
        parse_checksum_headers(
            {"x-amz-checksum-type": "FULL_OBJECT", "x-amz-sdk-checksum-algorithm": "CRC32"}
        )
        == {}
    )
    assert checksum_available(ChecksumAlgorithm.CRC64NVME)
    for algorithm in (
        ChecksumAlgorithm.XXHASH64,
        ChecksumAlgorithm.XXHASH3,
        ChecksumAlgorithm.XXHASH128,
    ):
        if checksum_available(algorithm):
            assert len(new_hasher(algorithm).digest()) == algorithm.digest_size
        else:
            with pytest.raises(S3Error) as info:
                new_hasher(algorithm)
            assert info.value.code == "InvalidRequest"


def test_verifier_contract() -> None:
    verifier = ChecksumVerifier()
    verifier.update(b"x")
    with pytest.raises(RuntimeError):
        verifier.track(ChecksumAlgorithm.SHA1)
    assert verifier.verify() == {}
    with pytest.raises(RuntimeError):
        verifier.update(b"y")
    with pytest.raises(S3Error):
        ChecksumVerifier({ChecksumAlgorithm.SHA1: b64(bytes(19))})


@pytest.mark.skipif(checksums_module.CRC32C_ACCELERATED is None, reason="awscrt is not installed")
def test_accelerated_crcs_agree_with_the_pure_ones() -> None:
    accelerated_crc32c = checksums_module.CRC32C_ACCELERATED
    accelerated_crc64 = checksums_module.CRC64NVME_ACCELERATED
    assert accelerated_crc32c is not None
    assert accelerated_crc64 is not None
    rng = random.Random(3)
    for size in (0, 1, 7, 100, 4096, 100_000):
        data = rng.randbytes(size)
        assert accelerated_crc32c(data, 0) == crc32c_pure(data, 0)
        assert accelerated_crc64(data, 0) == crc64nvme_pure(data, 0)
        assert accelerated_crc32c(
            data[size // 2 :], accelerated_crc32c(data[: size // 2], 0)
        ) == crc32c_pure(data, 0)


# --- stream adapters ---------------------------------------------------------------------------


async def test_stream_adapters() -> None:
    async def source() -> AsyncIterator[bytes]:
        yield b"abc"
        yield b""
        yield b"defghij"

    read = reader_from_iterable(source())
    assert [await read(2), await read(100), await read(4), await read(4), await read(4)] == [
        b"ab",
        b"c",
        b"defg",
        b"hij",
        b"",
    ]
    assert await read(0) == b""

    served = False

    async def greedy(n: int) -> bytes:  # ignores n once, like a careless source
        nonlocal served
        if served:
            return b""
        served = True
        return b"0123456789"

    assert [p async for p in iter_read(greedy, 4)] == [b"0123", b"4567", b"89"]
    with pytest.raises(ValueError, match="positive"):
        await anext(iter_read(greedy, 0))


@pytest.mark.usefixtures("pinned_clock")
async def test_hashing_can_be_offloaded_to_threads() -> None:
    threads: set[int] = set()

    async def offload(step: Callable[[], None]) -> None:
        def run() -> None:
            threads.add(threading.get_ident())
            step()

        await asyncio.to_thread(run)

    data = random.Random(11).randbytes(300_000)
    context, headers = streaming_auth(PayloadMode.STREAMING_SIGNED, len(data))
    body = reference_body(context, [data[:100_000], data[100_000:]])
    decoded = RequestBody(reader(body), headers, context, offload=offload, piece_size=50_000)
    assert await collect(decoded) == data
    plain = RequestBody(
        reader(data),
        {"Content-MD5": b64(hashlib.md5(data).digest())},
        None,
        offload=offload,
    )
    assert await collect(plain) == data
    assert threads and threading.get_ident() not in threads
    bad = RequestBody(
        reader(data), {"Content-MD5": b64(hashlib.md5(b"").digest())}, None, offload=offload
    )
    error, _ = await failure(bad)
    assert error.code == "BadDigest"


# --- over a real socket: aiohttp request parts and body, boto3 as the client -------------------


async def test_over_a_real_aiohttp_server(unused_tcp_port: int) -> None:
    received: dict[str, bytes] = {}

    async def handle(request: web.Request) -> web.Response:
        try:
            context = verify(
                RequestParts(
                    request.method, request.raw_path, list(request.query.items()), request.headers
                ),
                secrets,
                now=datetime.now(UTC),
                region=REGION,
            )
            body = RequestBody(request.content.read, request.headers, context)
            data = await collect(body)
        except S3Error as error:
            return web.Response(
                status=error.status,
                body=render_s3_error(error, request_id="r"),
                content_type="application/xml",
            )
        if request.method == "GET":
            return web.Response(body=b"stored:" + received.get(request.path, b""))
        received[request.path] = data
        return web.Response(headers={"ETag": '"etag"'})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", unused_tcp_port)
    await site.start()
    try:
        endpoint = f"http://127.0.0.1:{unused_tcp_port}"
        with pytest.MonkeyPatch.context() as mp:
            clean_aws_env(mp)
            good = make_client(endpoint, hook=lambda **_: None)
            wrong = make_client(endpoint, secret="wrong", hook=lambda **_: None)
        key = "dir/odd key+%~ü"
        data = os.urandom(300_000)
        await asyncio.to_thread(good.put_object, Bucket="bucket", Key=key, Body=data)
        assert received["/bucket/" + key] == data
        with pytest.raises(ClientError) as info:
            await asyncio.to_thread(wrong.put_object, Bucket="bucket", Key=key, Body=b"x")
        assert info.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
        assert info.value.response["Error"]["AWSAccessKeyId"] == ACCESS_KEY
        url = good.generate_presigned_url(
            "get_object", Params={"Bucket": "bucket", "Key": key}, ExpiresIn=60
        )

        def fetch() -> bytes:
            with urllib.request.urlopen(url, timeout=10) as response:
                return bytes(response.read())

        assert await asyncio.to_thread(fetch) == b"stored:" + data
    finally:
        await runner.cleanup()
