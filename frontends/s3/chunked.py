"""Decoding ``aws-chunked`` request bodies, and the one-call verified request body.

Framing (``Content-Encoding: aws-chunked``; ``x-amz-content-sha256`` names the variant)::

    signed:    <hex-size>;chunk-signature=<sig>\\r\\n<data>\\r\\n ... 0;chunk-signature=<sig>\\r\\n
    unsigned:  <hex-size>\\r\\n<data>\\r\\n ... 0\\r\\n
    then, for the -TRAILER variants, trailing header lines ``name:value\\r\\n`` (signed: the
    last is ``x-amz-trailer-signature:<sig>``), and finally an empty line ``\\r\\n``.

Each chunk signature chains from the seed signature (the request's own signature); the trailer
signature chains from the final (empty) chunk's. Memory is bounded: unsigned chunks are streamed
through in pieces of at most ``piece_size`` bytes; a signed chunk is held until its signature is
checked (at most ``max_chunk_size`` bytes, default 16 MiB; larger chunks are refused). The last
piece of the body is only yielded after every check on the whole body has passed (see
``frontends.s3.streams``).

Errors (``S3Error``, auth failures as ``S3AuthError``):

- ``SignatureDoesNotMatch``: a chunk or trailer signature is wrong or missing.
- ``IncompleteBody``: the body ends before the framing does (client went away), or the decoded
  length differs from ``x-amz-decoded-content-length``.
- ``InvalidRequest``: malformed framing: a bad hex size, a missing CRLF, a header line over
  4 KiB, a chunk over ``max_chunk_size``, data after the end.
- ``MalformedTrailerError``: a trailer that is malformed, repeated, undeclared in
  ``x-amz-trailer``, or declared but missing.
- ``BadDigest``: a declared (header or trailer) checksum or Content-MD5 does not match.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any

from frontends.s3.checksums import (
    CHECKSUM_PREFIX,
    ChecksumAlgorithm,
    ChecksumVerifier,
    parse_checksum_headers,
)
from frontends.s3.errors import S3AuthError, S3Error
from frontends.s3.sigv4 import (
    AuthContext,
    PayloadMode,
    chunk_string_to_sign,
    header_lists,
    parse_payload_hash,
    sign,
    signatures_equal,
    trailer_string_to_sign,
)
from frontends.s3.streams import DEFAULT_PIECE_SIZE, ReadFn, iter_read, release_last_after_end

Offload = Callable[[Callable[[], None]], Awaitable[None]]
"""Runs a CPU-bound step (hashing one piece) elsewhere, e.g. in a bounded thread pool:
``lambda step: loop.run_in_executor(pool, step)``. Without it hashing runs inline."""

DEFAULT_MAX_CHUNK_SIZE = 16 * 1024 * 1024
OFFLOAD_MIN_PIECE = 256 * 1024
"""Pieces smaller than this are hashed inline: the thread hop would cost more."""
MAX_LINE = 4096
MAX_TRAILER_LINES = 32
TRAILER_SIGNATURE = "x-amz-trailer-signature"
_READ_BLOCK = 64 * 1024
_HEX_SIZE_RE = re.compile(rb"[0-9A-Fa-f]{1,16}")


async def _run(offload: Offload | None, step: Callable[[], None]) -> None:
    if offload is None:
        step()
    else:
        await offload(step)


def _framing(detail: str) -> S3Error:
    return S3Error("InvalidRequest", f"Malformed aws-chunked body: {detail}.")


def _truncated() -> S3Error:
    return S3Error(
        "IncompleteBody", "The request body ended before the aws-chunked encoding was complete."
    )


def _trailer_error(detail: str) -> S3Error:
    return S3Error(
        "MalformedTrailerError",
        "The request contained trailing data that was not well-formed or did not conform to "
        f"our published schema: {detail}.",
    )


class _Reader:
    """A small buffer over ``read(n)`` for line and exact reads."""

    def __init__(self, read: ReadFn) -> None:
        self._read = read
        self._buf = b""
        self._pos = 0

    def _buffered(self) -> int:
        return len(self._buf) - self._pos

    async def _fill(self) -> bool:
        data = await self._read(_READ_BLOCK)
        if not data:
            return False
        self._buf = self._buf[self._pos :] + data
        self._pos = 0
        return True

    async def readline(self, *, eof_ok: bool = False) -> bytes | None:
        """A CRLF-terminated line without its CRLF; None at a clean EOF when ``eof_ok``."""
        while True:
            end = self._buf.find(b"\n", self._pos)
            if end >= 0:
                if end == self._pos or self._buf[end - 1] != 0x0D:
                    raise _framing("a line is not terminated by CRLF")
                if end - 1 - self._pos > MAX_LINE:
                    raise _framing(f"a chunk header or trailer line is longer than {MAX_LINE}")
                line = self._buf[self._pos : end - 1]
                self._pos = end + 1
                return line
            if self._buffered() > MAX_LINE + 1:
                raise _framing(f"a chunk header or trailer line is longer than {MAX_LINE}")
            if not await self._fill():
                if eof_ok and self._buffered() == 0:
                    return None
                raise _truncated()

    async def read_some(self, limit: int) -> bytes:
        """Between 1 and ``limit`` bytes, or ``b""`` at EOF."""
        if self._buffered():
            piece = self._buf[self._pos : self._pos + limit]
            self._pos += len(piece)
            return piece
        data = await self._read(limit)
        if len(data) > limit:
            self._buf, self._pos = data[limit:], 0
            data = data[:limit]
        return data

    async def expect_crlf(self) -> None:
        got = b""
        while len(got) < 2:
            piece = await self.read_some(2 - len(got))
            if not piece:
                raise _truncated()
            got += piece
        if got != b"\r\n":
            raise _framing("chunk data is not followed by CRLF")


class AwsChunkedDecoder:
    """Decodes one ``aws-chunked`` body; iterate it (once) for the decoded data pieces.

    ``mode`` must be a streaming ``PayloadMode``; ``auth`` is required for the signed ones (else
    ``S3AuthError`` ``AccessDenied``). ``trailers``: the names declared in ``x-amz-trailer``
    (only ``x-amz-checksum-*`` are accepted, else ``InvalidRequest``). ``decoded_length``:
    ``x-amz-decoded-content-length`` if sent. ``checksums``: a verifier that also receives the
    data (header-declared checksums); one is created when omitted. Trailer checksums are added
    to it and every declared value is verified at the end. ``offload`` runs the hashing of each
    piece elsewhere (see ``Offload``). After iteration ``trailers_received`` holds the trailing
    headers (signature excluded) and ``length`` the decoded byte count.
    """

    def __init__(
        self,
        read: ReadFn,
        *,
        mode: PayloadMode,
        auth: AuthContext | None = None,
        trailers: Iterable[str] = (),
        decoded_length: int | None = None,
        checksums: ChecksumVerifier | None = None,
        max_chunk_size: int = DEFAULT_MAX_CHUNK_SIZE,
        piece_size: int = DEFAULT_PIECE_SIZE,
        offload: Offload | None = None,
    ) -> None:
        if not mode.is_streaming:
            raise ValueError(f"{mode} is not an aws-chunked payload mode")
        if mode.signed_chunks and auth is None:
            raise S3AuthError(
                "AccessDenied", "A signed aws-chunked payload needs a signed request."
            )
        if piece_size <= 0 or max_chunk_size <= 0:
            raise ValueError("piece_size and max_chunk_size must be positive")
        self._read = read
        self._mode = mode
        self._auth = auth
        self._decoded_length = decoded_length
        self._max_chunk = max_chunk_size
        self._piece = piece_size
        self._offload = offload
        self._checksums = checksums if checksums is not None else ChecksumVerifier()
        declared: list[str] = []
        for name in trailers:
            lowered = name.strip().lower()
            algorithm = ChecksumAlgorithm.from_header(lowered)
            if algorithm is None:
                raise S3Error(
                    "InvalidRequest",
                    "The value specified in the x-amz-trailer header is not supported",
                )
            if lowered in declared:
                raise S3Error("InvalidRequest", f"x-amz-trailer names {lowered} twice")
            declared.append(lowered)
            self._checksums.track(algorithm)
        if declared and not mode.has_trailer:
            raise S3Error(
                "InvalidRequest",
                f"x-amz-trailer cannot be used with x-amz-content-sha256 {mode.value}",
            )
        self._declared = tuple(declared)
        self._used = False
        self.trailers_received: dict[str, str] = {}
        self.length = 0

    @property
    def checksums(self) -> ChecksumVerifier:
        """The verifier fed with the decoded data."""
        return self._checksums

    def __aiter__(self) -> AsyncIterator[bytes]:
        return release_last_after_end(self._pieces())

    def _pieces(self) -> AsyncIterator[bytes]:
        """The decoded pieces without the final hold-back (for wrappers that add their own)."""
        if self._used:
            raise RuntimeError("an AwsChunkedDecoder can be iterated once")
        self._used = True
        return self._decode()

    async def _decode(self) -> AsyncIterator[bytes]:
        reader = _Reader(self._read)
        previous = self._auth.seed_signature if self._auth is not None else ""
        while True:
            line = await reader.readline()
            assert line is not None
            size, signature = self._parse_chunk_header(line)
            if self._decoded_length is not None and self.length + size > self._decoded_length:
                raise S3Error(
                    "IncompleteBody",
                    "The decoded body is longer than x-amz-decoded-content-length.",
                )
            if self._mode.signed_chunks:
                pieces: list[bytes] = []
                digest = hashlib.sha256()
                remaining = size
                while remaining:
                    piece = await reader.read_some(min(remaining, self._piece))
                    if not piece:
                        raise _truncated()
                    await _run(self._offload, functools.partial(digest.update, piece))
                    pieces.append(piece)
                    remaining -= len(piece)
                previous = self._check_chunk_signature(previous, digest.hexdigest(), signature)
                if size:
                    await reader.expect_crlf()
                for piece in pieces:
                    await _run(self._offload, functools.partial(self._checksums.update, piece))
                    self.length += len(piece)
                    yield piece
                del pieces
            else:
                remaining = size
                while remaining:
                    piece = await reader.read_some(min(remaining, self._piece))
                    if not piece:
                        raise _truncated()
                    remaining -= len(piece)
                    await _run(self._offload, functools.partial(self._checksums.update, piece))
                    self.length += len(piece)
                    yield piece
                if size:
                    await reader.expect_crlf()
            if size == 0:
                break
        await self._finish(reader, previous)

    def _parse_chunk_header(self, line: bytes) -> tuple[int, bytes | None]:
        size_part, *extensions = line.split(b";")
        size_hex = size_part.strip(b" \t")
        if not _HEX_SIZE_RE.fullmatch(size_hex):
            raise _framing(f"invalid chunk size {size_hex[:32]!r}")
        size = int(size_hex, 16)
        if size > self._max_chunk:
            raise _framing(f"a chunk of {size} bytes exceeds the limit of {self._max_chunk}")
        signature: bytes | None = None
        for extension in extensions:
            name, _, value = extension.strip(b" \t").partition(b"=")
            if name == b"chunk-signature":
                signature = value.strip(b" \t")
        if self._mode.signed_chunks and signature is None:
            raise S3AuthError("SignatureDoesNotMatch", "A chunk carries no chunk-signature.")
        return size, signature

    def _check_chunk_signature(
        self, previous: str, data_sha256: str, signature: bytes | None
    ) -> str:
        auth = self._auth
        assert auth is not None and signature is not None
        expected = sign(
            auth.signing_key,
            chunk_string_to_sign(auth.amz_date, auth.credential_scope, previous, data_sha256),
        )
        if not signatures_equal(expected, signature.lower()):
            raise S3AuthError(
                "SignatureDoesNotMatch",
                "The chunk signature we calculated does not match the signature you provided.",
            )
        return expected

    async def _finish(self, reader: _Reader, previous: str) -> None:
        lines: list[bytes] = []
        while True:
            line = await reader.readline(eof_ok=True)
            if line is None or line == b"":
                break
            if not self._mode.has_trailer:
                raise _framing("trailing headers sent without a -TRAILER x-amz-content-sha256")
            lines.append(line)
            if len(lines) > MAX_TRAILER_LINES:
                raise _trailer_error("too many trailing headers")
        if await reader.read_some(1):
            raise _framing("data follows the end of the body")

        received: list[tuple[str, str]] = []
        for raw in lines:
            name_b, sep, value_b = raw.partition(b":")
            if not sep:
                raise _trailer_error("a trailing header has no ':'")
            try:
                name = name_b.decode("ascii").strip().lower()
                value = value_b.decode("ascii").strip()
            except UnicodeDecodeError:
                raise _trailer_error("a trailing header is not ASCII") from None
            if not name:
                raise _trailer_error("a trailing header has no name")
            received.append((name, value))

        if self._mode is PayloadMode.STREAMING_SIGNED_TRAILER:
            if not received or received[-1][0] != TRAILER_SIGNATURE:
                raise S3AuthError(
                    "SignatureDoesNotMatch", "The trailing headers carry no trailer signature."
                )
            signature = received.pop()[1]
            canonical = "".join(f"{name}:{value}\n" for name, value in received)
            auth = self._auth
            assert auth is not None
            expected = sign(
                auth.signing_key,
                trailer_string_to_sign(
                    auth.amz_date,
                    auth.credential_scope,
                    previous,
                    hashlib.sha256(canonical.encode("ascii")).hexdigest(),
                ),
            )
            if not signatures_equal(expected, signature.lower()):
                raise S3AuthError(
                    "SignatureDoesNotMatch",
                    "The trailer signature we calculated does not match the signature you "
                    "provided.",
                )

        for name, value in received:
            if name == TRAILER_SIGNATURE:
                raise _trailer_error("an unexpected x-amz-trailer-signature")
            if name in self.trailers_received:
                raise _trailer_error(f"{name} is sent twice")
            if name not in self._declared:
                raise _trailer_error(f"{name} is not declared in x-amz-trailer")
            self.trailers_received[name] = value
        missing = [name for name in self._declared if name not in self.trailers_received]
        if missing:
            raise _trailer_error(f"{', '.join(missing)} declared in x-amz-trailer is missing")

        if self._decoded_length is not None and self.length != self._decoded_length:
            raise S3Error(
                "IncompleteBody",
                f"The decoded body has {self.length} bytes; x-amz-decoded-content-length says "
                f"{self._decoded_length}.",
            )
        for name, value in self.trailers_received.items():
            algorithm = ChecksumAlgorithm.from_header(name)
            assert algorithm is not None
            self._checksums.expect(algorithm, value, source="trailing header")
        self._checksums.verify()


def decode_aws_chunked(
    read: ReadFn,
    *,
    mode: PayloadMode,
    auth: AuthContext | None = None,
    trailers: Iterable[str] = (),
    decoded_length: int | None = None,
    checksums: ChecksumVerifier | None = None,
    max_chunk_size: int = DEFAULT_MAX_CHUNK_SIZE,
    piece_size: int = DEFAULT_PIECE_SIZE,
    offload: Offload | None = None,
) -> AsyncIterator[bytes]:
    """The decoded, verified data of an ``aws-chunked`` body (see ``AwsChunkedDecoder``)."""
    return aiter(
        AwsChunkedDecoder(
            read,
            mode=mode,
            auth=auth,
            trailers=trailers,
            decoded_length=decoded_length,
            checksums=checksums,
            max_chunk_size=max_chunk_size,
            piece_size=piece_size,
            offload=offload,
        )
    )


# --- header helpers --------------------------------------------------------------------------


def _single(headers: Mapping[str, list[str]], name: str) -> str | None:
    values = headers.get(name)
    return ",".join(values) if values is not None else None


def _length_header(headers: Mapping[str, list[str]], name: str) -> int | None:
    raw = _single(headers, name)
    if raw is None:
        return None
    raw = raw.strip()
    if not raw.isascii() or not raw.isdigit():
        raise S3Error(
            "InvalidArgument",
            f"{name} must be a non-negative integer.",
            ArgumentName=name,
            ArgumentValue=raw,
        )
    return int(raw)


def declared_trailers(headers: Mapping[str, str]) -> tuple[str, ...]:
    """The lowercase names listed in ``x-amz-trailer``."""
    raw = _single(header_lists(headers), "x-amz-trailer")
    if raw is None:
        return ()
    return tuple(name.strip().lower() for name in raw.split(",") if name.strip())


def strip_aws_chunked(content_encoding: str | None) -> str | None:
    """``Content-Encoding`` without the ``aws-chunked`` coding (None when nothing is left)."""
    if content_encoding is None:
        return None
    codings = [c.strip() for c in content_encoding.split(",")]
    kept = [c for c in codings if c and c.lower() != "aws-chunked"]
    return ", ".join(kept) if kept else None


class RequestBody:
    """The decoded and verified body of one S3 request: iterate it once for the data pieces.

    Chooses the decoding from ``auth.payload_mode`` (or, for an anonymous request, from
    ``x-amz-content-sha256``, where a signed aws-chunked mode raises ``S3AuthError``
    ``AccessDenied``) and checks, by the time the last piece is yielded: chunk and trailer
    signatures, ``x-amz-decoded-content-length`` (or ``Content-Length`` for a plain body,
    ``IncompleteBody``), the declared ``x-amz-content-sha256`` (``XAmzContentSHA256Mismatch``),
    ``Content-MD5`` and ``x-amz-checksum-*`` headers or trailers (``BadDigest``).
    Construction raises for malformed headers (``InvalidRequest``, ``InvalidDigest``,
    ``InvalidArgument``, ``MissingContentLength`` for signed aws-chunked without a decoded
    length). ``compute`` adds algorithms to compute; ``offload`` runs the hashing elsewhere (see
    ``Offload``); after iteration ``checksums`` holds every computed value and ``length`` the
    byte count.
    """

    def __init__(
        self,
        read: ReadFn,
        headers: Mapping[str, str],
        auth: AuthContext | None,
        *,
        compute: Iterable[ChecksumAlgorithm] = (),
        max_chunk_size: int = DEFAULT_MAX_CHUNK_SIZE,
        piece_size: int = DEFAULT_PIECE_SIZE,
        offload: Offload | None = None,
    ) -> None:
        lists = header_lists(headers)
        declared_sha: str | None
        if auth is not None:
            mode, declared_sha = auth.payload_mode, auth.content_sha256
        else:
            raw_sha = _single(lists, "x-amz-content-sha256")
            mode, declared_sha = (
                parse_payload_hash(raw_sha) if raw_sha is not None else (PayloadMode.UNSIGNED, None)
            )
            if mode.signed_chunks:
                raise S3AuthError(
                    "AccessDenied", "A signed aws-chunked payload needs a signed request."
                )
        header_checksums = parse_checksum_headers(headers)
        md5 = _single(lists, "content-md5")
        self._verifier = ChecksumVerifier(header_checksums, content_md5=md5, compute=compute)
        self.mode = mode
        self.length = 0
        self._read = read
        self._piece = piece_size
        self._offload = offload
        self._declared_sha = declared_sha
        self._done = False
        self._used = False
        self._decoder: AwsChunkedDecoder | None = None
        self._content_length: int | None = None
        if mode.is_streaming:
            trailers = declared_trailers(headers)
            if header_checksums and any(n.startswith(CHECKSUM_PREFIX) for n in trailers):
                raise S3Error(
                    "InvalidRequest",
                    "Expecting a single x-amz-checksum- header. Multiple checksum Types are not "
                    "allowed.",
                )
            decoded_length = _length_header(lists, "x-amz-decoded-content-length")
            if decoded_length is None and mode.signed_chunks:
                raise S3Error(
                    "MissingContentLength",
                    "You must provide the x-amz-decoded-content-length header.",
                )
            self._decoder = AwsChunkedDecoder(
                read,
                mode=mode,
                auth=auth,
                trailers=trailers,
                decoded_length=decoded_length,
                checksums=self._verifier,
                max_chunk_size=max_chunk_size,
                piece_size=piece_size,
                offload=offload,
            )
        else:
            self._content_length = _length_header(lists, "content-length")

    @property
    def trailers(self) -> dict[str, str]:
        """Trailing headers received (aws-chunked only; empty before the end)."""
        return dict(self._decoder.trailers_received) if self._decoder is not None else {}

    @property
    def checksums(self) -> dict[ChecksumAlgorithm, str]:
        """Every computed checksum (base64); ``RuntimeError`` before the body was consumed."""
        if not self._done:
            raise RuntimeError("the body has not been read to its end")
        return self._verifier.results()

    def __aiter__(self) -> AsyncIterator[bytes]:
        if self._used:
            raise RuntimeError("a RequestBody can be iterated once")
        self._used = True
        return release_last_after_end(self._body())

    def _hash_plain(self, digest: Any, piece: bytes) -> None:
        if digest is not None:
            digest.update(piece)
        self._verifier.update(piece)

    async def _body(self) -> AsyncIterator[bytes]:
        if self._decoder is not None:
            async for piece in self._decoder._pieces():
                self.length += len(piece)
                yield piece
            self._done = True
            return
        digest = hashlib.sha256() if self._declared_sha is not None else None
        async for piece in iter_read(self._read, self._piece):
            self.length += len(piece)
            if self._content_length is not None and self.length > self._content_length:
                raise S3Error("InvalidRequest", "The body is longer than Content-Length.")
            if digest is not None or self._verifier.algorithms:
                if len(piece) >= OFFLOAD_MIN_PIECE:
                    await _run(self._offload, functools.partial(self._hash_plain, digest, piece))
                else:  # a thread hop costs more than hashing a small piece inline
                    self._hash_plain(digest, piece)
            yield piece
        if self._content_length is not None and self.length != self._content_length:
            raise S3Error("IncompleteBody")
        if digest is not None and self._declared_sha is not None:
            computed = digest.hexdigest()
            if computed != self._declared_sha:
                raise S3AuthError(
                    "XAmzContentSHA256Mismatch",
                    ClientComputedContentSHA256=self._declared_sha,
                    S3ComputedContentSHA256=computed,
                )
        self._verifier.verify()
        self._done = True
