"""S3 XML: rendering responses and safely parsing request documents.

Rendering takes the plain dataclasses below and returns UTF-8 bytes with an XML declaration and
the ``http://s3.amazonaws.com/doc/2006-03-01/`` namespace (``Error`` has none, as in S3).
Timestamps are ISO 8601 in UTC with milliseconds and ``Z``; ETags are rendered quoted. Text is
escaped (``"`` as ``&quot;`` as S3 does for ETags); characters XML 1.0 cannot carry (controls
other than tab and newline, ``\\r``, U+FFFE/U+FFFF, lone surrogates) become numeric character
references, which is why listing clients ask for ``encoding-type=url``. With that encoding, the
key-like fields (Key, Prefix, Delimiter, Marker, NextMarker, StartAfter, KeyMarker,
NextKeyMarker and CommonPrefixes) are form-encoded the way S3 does it: space as ``+``, ``/`` and
``*`` kept, everything else but ``A-Za-z0-9-_.`` percent-encoded.

Parsing (``parse_complete_multipart_upload``, ``parse_delete``,
``parse_create_bucket_configuration``) uses expat directly and refuses any DTD, entity
declaration or external entity, so entity expansion attacks and external entities cannot happen;
input over ``max_size`` bytes is refused before parsing. Every failure is ``S3Error``
``MalformedXML`` with a message naming the problem (``InvalidPartOrder`` for parts not in
strictly ascending order). Element namespaces are ignored: S3 accepts these documents with its
namespace or without one.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import AsyncIterable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from xml.parsers import expat

from frontends.s3.errors import S3Error

NS = "http://s3.amazonaws.com/doc/2006-03-01/"
XML_DECLARATION = '<?xml version="1.0" encoding="UTF-8"?>\n'
MAX_PART_NUMBER = 10_000
MAX_DELETE_OBJECTS = 1000
DEFAULT_MAX_XML_SIZE = 8 * 1024 * 1024
MAX_DEPTH = 16
DEFAULT_REGION = "us-east-1"


# --- text helpers ----------------------------------------------------------------------------


def _escape_table() -> Mapping[int, str]:
    table: dict[int, str] = {
        ord("&"): "&amp;",
        ord("<"): "&lt;",
        ord(">"): "&gt;",
        ord('"'): "&quot;",
    }
    invalid = [c for c in range(0x20) if c not in (0x09, 0x0A)]
    invalid += [0xFFFE, 0xFFFF, *range(0xD800, 0xE000)]
    for code in invalid:
        table[code] = f"&#x{code:X};"
    return MappingProxyType(table)


_ESCAPES = _escape_table()


def escape(text: str) -> str:
    """Escape text for an XML element (see the module docstring)."""
    return text.translate(_ESCAPES)


_URL_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_./*")


def url_encode(text: str) -> str:
    """S3's ``encoding-type=url`` form of a key-like value."""
    out = []
    for byte in text.encode("utf-8", "surrogatepass"):
        if byte in _URL_SAFE:
            out.append(chr(byte))
        elif byte == 0x20:
            out.append("+")
        else:
            out.append(f"%{byte:02X}")
    return "".join(out)


def check_encoding_type(value: str | None) -> str | None:
    """Validate an ``encoding-type`` query value: None or ``url`` (``InvalidArgument``)."""
    if value is None or value == "url":
        return value
    raise S3Error(
        "InvalidArgument",
        "Invalid Encoding Method specified in Request",
        ArgumentName="encoding-type",
        ArgumentValue=value,
    )


def format_timestamp(moment: datetime) -> str:
    """``2026-11-22T10:00:00.123Z`` (naive datetimes are taken as UTC)."""
    moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def quote_etag(etag: str) -> str:
    """The ETag in double quotes (left alone when already quoted, ``W/`` kept)."""
    if etag.startswith('"') and etag.endswith('"') and len(etag) >= 2:
        return etag
    if etag.startswith('W/"'):
        return etag
    return f'"{etag}"'


def unquote_etag(etag: str) -> str:
    """The ETag without surrounding whitespace and double quotes."""
    etag = etag.strip()
    if len(etag) >= 2 and etag.startswith('"') and etag.endswith('"'):
        return etag[1:-1]
    return etag


def _el(name: str, value: str | int | bool) -> str:
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, int):
        text = str(value)
    else:
        text = escape(value)
    return f"<{name}>{text}</{name}>"


def _opt(name: str, value: str | int | bool | None) -> str:
    return "" if value is None else _el(name, value)


def _document(root: str, body: Iterable[str], *, namespace: bool = True) -> bytes:
    opening = f'<{root} xmlns="{NS}">' if namespace else f"<{root}>"
    return (XML_DECLARATION + opening + "".join(body) + f"</{root}>").encode("utf-8")


def _checksums(values: Mapping[str, str]) -> str:
    return "".join(_el(f"Checksum{name.upper()}", value) for name, value in values.items())


# --- response types --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Owner:
    """A bucket or object owner (also used as the multipart ``Initiator``)."""

    id: str
    display_name: str | None = None


def _owner(tag: str, owner: Owner | None) -> str:
    if owner is None:
        return ""
    return f"<{tag}>{_el('ID', owner.id)}{_opt('DisplayName', owner.display_name)}</{tag}>"


@dataclass(frozen=True, slots=True)
class BucketInfo:
    """One bucket of ``ListAllMyBucketsResult``."""

    name: str
    creation_date: datetime
    region: str | None = None


def render_list_buckets(
    buckets: Sequence[BucketInfo],
    owner: Owner | None,
    *,
    continuation_token: str | None = None,
    prefix: str | None = None,
) -> bytes:
    """``ListAllMyBucketsResult`` (the ListBuckets answer)."""
    items = "".join(
        "<Bucket>"
        + _el("Name", b.name)
        + _el("CreationDate", format_timestamp(b.creation_date))
        + _opt("BucketRegion", b.region)
        + "</Bucket>"
        for b in buckets
    )
    return _document(
        "ListAllMyBucketsResult",
        (
            _owner("Owner", owner),
            f"<Buckets>{items}</Buckets>",
            _opt("ContinuationToken", continuation_token),
            _opt("Prefix", prefix),
        ),
    )


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One ``Contents`` entry of a listing."""

    key: str
    last_modified: datetime
    etag: str
    size: int
    storage_class: str = "STANDARD"
    owner: Owner | None = None
    checksum_algorithms: tuple[str, ...] = ()
    checksum_type: str | None = None


def _contents(obj: ObjectInfo, encode: bool, with_owner: bool) -> str:
    return (
        "<Contents>"
        + _el("Key", url_encode(obj.key) if encode else obj.key)
        + _el("LastModified", format_timestamp(obj.last_modified))
        + _el("ETag", quote_etag(obj.etag))
        + "".join(_el("ChecksumAlgorithm", a) for a in obj.checksum_algorithms)
        + _opt("ChecksumType", obj.checksum_type)
        + _el("Size", obj.size)
        + (_owner("Owner", obj.owner) if with_owner else "")
        + _el("StorageClass", obj.storage_class)
        + "</Contents>"
    )


def _common_prefixes(prefixes: Sequence[str], encode: bool) -> str:
    return "".join(
        "<CommonPrefixes>" + _el("Prefix", url_encode(p) if encode else p) + "</CommonPrefixes>"
        for p in prefixes
    )


@dataclass(frozen=True, slots=True)
class ListObjectsPage:
    """One page of ListObjects (v1) or ListObjectsV2; fields unused by a version are ignored.

    ``prefix``, ``delimiter``, ``marker``, ``start_after`` are the request's values (None when
    not sent); ``encoding_type`` is the request's ``encoding-type`` (None or ``url``).
    """

    bucket: str
    max_keys: int
    is_truncated: bool
    contents: Sequence[ObjectInfo] = ()
    common_prefixes: Sequence[str] = ()
    prefix: str | None = None
    delimiter: str | None = None
    encoding_type: str | None = None
    # v1
    marker: str | None = None
    next_marker: str | None = None
    # v2
    continuation_token: str | None = None
    next_continuation_token: str | None = None
    start_after: str | None = None
    fetch_owner: bool = False


def _enc(value: str | None, encode: bool) -> str | None:
    if value is None:
        return None
    return url_encode(value) if encode else value


def render_list_objects_v1(page: ListObjectsPage) -> bytes:
    """``ListBucketResult`` for ListObjects (v1): ``Marker`` always, ``NextMarker`` if given."""
    encode = page.encoding_type == "url"
    return _document(
        "ListBucketResult",
        (
            _el("Name", page.bucket),
            _el("Prefix", _enc(page.prefix, encode) or ""),
            _el("Marker", _enc(page.marker, encode) or ""),
            _opt("NextMarker", _enc(page.next_marker, encode)),
            _el("MaxKeys", page.max_keys),
            _opt("Delimiter", _enc(page.delimiter or None, encode)),
            _opt("EncodingType", page.encoding_type),
            _el("IsTruncated", page.is_truncated),
            *(_contents(o, encode, with_owner=True) for o in page.contents),
            _common_prefixes(page.common_prefixes, encode),
        ),
    )


def render_list_objects_v2(page: ListObjectsPage) -> bytes:
    """``ListBucketResult`` for ListObjectsV2 (``Owner`` only with ``fetch_owner``)."""
    encode = page.encoding_type == "url"
    return _document(
        "ListBucketResult",
        (
            _el("Name", page.bucket),
            _el("Prefix", _enc(page.prefix, encode) or ""),
            _opt("ContinuationToken", page.continuation_token),
            _opt("NextContinuationToken", page.next_continuation_token),
            _opt("StartAfter", _enc(page.start_after, encode)),
            _el("KeyCount", len(page.contents) + len(page.common_prefixes)),
            _el("MaxKeys", page.max_keys),
            _opt("Delimiter", _enc(page.delimiter or None, encode)),
            _opt("EncodingType", page.encoding_type),
            _el("IsTruncated", page.is_truncated),
            *(_contents(o, encode, with_owner=page.fetch_owner) for o in page.contents),
            _common_prefixes(page.common_prefixes, encode),
        ),
    )


def render_initiate_multipart_upload(bucket: str, key: str, upload_id: str) -> bytes:
    """``InitiateMultipartUploadResult``."""
    return _document(
        "InitiateMultipartUploadResult",
        (_el("Bucket", bucket), _el("Key", key), _el("UploadId", upload_id)),
    )


def render_complete_multipart_upload(
    location: str,
    bucket: str,
    key: str,
    etag: str,
    *,
    checksums: Mapping[str, str] | None = None,
    checksum_type: str | None = None,
) -> bytes:
    """``CompleteMultipartUploadResult``; ``checksums`` maps ``CRC32``... to base64 values."""
    return _document(
        "CompleteMultipartUploadResult",
        (
            _el("Location", location),
            _el("Bucket", bucket),
            _el("Key", key),
            _el("ETag", quote_etag(etag)),
            _checksums(checksums or {}),
            _opt("ChecksumType", checksum_type),
        ),
    )


@dataclass(frozen=True, slots=True)
class PartInfo:
    """One uploaded part."""

    part_number: int
    last_modified: datetime
    etag: str
    size: int
    checksums: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ListPartsPage:
    """One page of ListParts."""

    bucket: str
    key: str
    upload_id: str
    max_parts: int
    is_truncated: bool
    parts: Sequence[PartInfo] = ()
    part_number_marker: int = 0
    next_part_number_marker: int | None = None
    initiator: Owner | None = None
    owner: Owner | None = None
    storage_class: str = "STANDARD"
    checksum_algorithm: str | None = None
    checksum_type: str | None = None


def render_list_parts(page: ListPartsPage) -> bytes:
    """``ListPartsResult``."""
    parts = "".join(
        "<Part>"
        + _el("PartNumber", p.part_number)
        + _el("LastModified", format_timestamp(p.last_modified))
        + _el("ETag", quote_etag(p.etag))
        + _el("Size", p.size)
        + _checksums(p.checksums)
        + "</Part>"
        for p in page.parts
    )
    next_marker = page.next_part_number_marker
    if next_marker is None:
        next_marker = page.parts[-1].part_number if page.parts else page.part_number_marker
    return _document(
        "ListPartsResult",
        (
            _el("Bucket", page.bucket),
            _el("Key", page.key),
            _el("UploadId", page.upload_id),
            _el("PartNumberMarker", page.part_number_marker),
            _el("NextPartNumberMarker", next_marker),
            _el("MaxParts", page.max_parts),
            _el("IsTruncated", page.is_truncated),
            parts,
            _owner("Initiator", page.initiator),
            _owner("Owner", page.owner),
            _el("StorageClass", page.storage_class),
            _opt("ChecksumAlgorithm", page.checksum_algorithm),
            _opt("ChecksumType", page.checksum_type),
        ),
    )


@dataclass(frozen=True, slots=True)
class UploadInfo:
    """One multipart upload in progress."""

    key: str
    upload_id: str
    initiated: datetime
    owner: Owner | None = None
    initiator: Owner | None = None
    storage_class: str = "STANDARD"
    checksum_algorithm: str | None = None


@dataclass(frozen=True, slots=True)
class ListUploadsPage:
    """One page of ListMultipartUploads."""

    bucket: str
    max_uploads: int
    is_truncated: bool
    uploads: Sequence[UploadInfo] = ()
    common_prefixes: Sequence[str] = ()
    key_marker: str | None = None
    upload_id_marker: str | None = None
    next_key_marker: str | None = None
    next_upload_id_marker: str | None = None
    prefix: str | None = None
    delimiter: str | None = None
    encoding_type: str | None = None


def render_list_multipart_uploads(page: ListUploadsPage) -> bytes:
    """``ListMultipartUploadsResult``."""
    encode = page.encoding_type == "url"
    uploads = "".join(
        "<Upload>"
        + _el("Key", url_encode(u.key) if encode else u.key)
        + _el("UploadId", u.upload_id)
        + _owner("Initiator", u.initiator)
        + _owner("Owner", u.owner)
        + _el("StorageClass", u.storage_class)
        + _el("Initiated", format_timestamp(u.initiated))
        + _opt("ChecksumAlgorithm", u.checksum_algorithm)
        + "</Upload>"
        for u in page.uploads
    )
    return _document(
        "ListMultipartUploadsResult",
        (
            _el("Bucket", page.bucket),
            _el("KeyMarker", _enc(page.key_marker, encode) or ""),
            _el("UploadIdMarker", page.upload_id_marker or ""),
            _el("NextKeyMarker", _enc(page.next_key_marker, encode) or ""),
            _el("NextUploadIdMarker", page.next_upload_id_marker or ""),
            _opt("Prefix", _enc(page.prefix, encode)),
            _opt("Delimiter", _enc(page.delimiter or None, encode)),
            _el("MaxUploads", page.max_uploads),
            _opt("EncodingType", page.encoding_type),
            _el("IsTruncated", page.is_truncated),
            uploads,
            _common_prefixes(page.common_prefixes, encode),
        ),
    )


def render_copy_object_result(
    etag: str, last_modified: datetime, *, checksums: Mapping[str, str] | None = None
) -> bytes:
    """``CopyObjectResult``."""
    return _document(
        "CopyObjectResult",
        (
            _el("LastModified", format_timestamp(last_modified)),
            _el("ETag", quote_etag(etag)),
            _checksums(checksums or {}),
        ),
    )


def render_copy_part_result(
    etag: str, last_modified: datetime, *, checksums: Mapping[str, str] | None = None
) -> bytes:
    """``CopyPartResult`` (UploadPartCopy)."""
    return _document(
        "CopyPartResult",
        (
            _el("LastModified", format_timestamp(last_modified)),
            _el("ETag", quote_etag(etag)),
            _checksums(checksums or {}),
        ),
    )


def render_location_constraint(region: str | None) -> bytes:
    """``LocationConstraint``: empty for ``us-east-1`` (or None), as S3 answers."""
    value = "" if region in (None, DEFAULT_REGION) else escape(region or "")
    return (
        XML_DECLARATION + f'<LocationConstraint xmlns="{NS}">{value}</LocationConstraint>'
    ).encode("utf-8")


@dataclass(frozen=True, slots=True)
class DeletedInfo:
    """One ``Deleted`` entry of DeleteObjects."""

    key: str
    version_id: str | None = None
    delete_marker: bool | None = None
    delete_marker_version_id: str | None = None


@dataclass(frozen=True, slots=True)
class DeleteErrorInfo:
    """One ``Error`` entry of DeleteObjects."""

    key: str
    code: str
    message: str
    version_id: str | None = None


def render_delete_result(
    deleted: Sequence[DeletedInfo], errors: Sequence[DeleteErrorInfo] = ()
) -> bytes:
    """``DeleteResult`` (leave ``deleted`` empty for ``Quiet`` mode)."""
    return _document(
        "DeleteResult",
        (
            *(
                "<Deleted>"
                + _el("Key", d.key)
                + _opt("VersionId", d.version_id)
                + _opt("DeleteMarker", d.delete_marker)
                + _opt("DeleteMarkerVersionId", d.delete_marker_version_id)
                + "</Deleted>"
                for d in deleted
            ),
            *(
                "<Error>"
                + _el("Key", e.key)
                + _opt("VersionId", e.version_id)
                + _el("Code", e.code)
                + _el("Message", e.message)
                + "</Error>"
                for e in errors
            ),
        ),
    )


def render_error(
    code: str,
    message: str,
    *,
    resource: str | None = None,
    request_id: str | None = None,
    host_id: str | None = None,
    extra: Mapping[str, str] | Iterable[tuple[str, str]] = (),
) -> bytes:
    """The S3 ``Error`` document: Code, Message, extra fields, Resource, RequestId, HostId."""
    pairs = extra.items() if isinstance(extra, Mapping) else extra
    return _document(
        "Error",
        (
            _el("Code", code),
            _el("Message", message),
            *(_el(name, value) for name, value in pairs if _XML_NAME_RE.fullmatch(name)),
            _opt("Resource", resource),
            _opt("RequestId", request_id),
            _opt("HostId", host_id),
        ),
        namespace=False,
    )


_XML_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")


def render_s3_error(
    error: S3Error,
    *,
    resource: str | None = None,
    request_id: str | None = None,
    host_id: str | None = None,
) -> bytes:
    """``render_error`` for an ``S3Error`` and its extra fields."""
    return render_error(
        error.code,
        error.message,
        resource=resource,
        request_id=request_id,
        host_id=host_id,
        extra=error.extra,
    )


# --- safe parsing ----------------------------------------------------------------------------


def malformed(detail: str) -> S3Error:
    """``MalformedXML`` with S3's message and ``detail`` appended."""
    return S3Error(
        "MalformedXML",
        "The XML you provided was not well-formed or did not validate against our published "
        f"schema: {detail}",
    )


class _Node:
    __slots__ = ("children", "name", "text")

    def __init__(self, name: str) -> None:
        self.name = name
        self.text: list[str] = []
        self.children: list[_Node] = []

    @property
    def value(self) -> str:
        return "".join(self.text)


class _Forbidden(Exception):
    pass


def _parse_tree(body: bytes, max_size: int) -> _Node:
    if len(body) > max_size:
        raise malformed(f"the document is larger than {max_size} bytes")
    if not body.strip():
        raise malformed("the document is empty")
    parser = expat.ParserCreate(namespace_separator=" ")
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    stack: list[_Node] = []
    roots: list[_Node] = []

    def forbid(*_: object) -> int:
        raise _Forbidden("DTDs and entity declarations are not allowed")

    def start(name: str, _attrs: object) -> None:
        node = _Node(name.rsplit(" ", 1)[-1])
        if stack:
            stack[-1].children.append(node)
        else:
            roots.append(node)
        stack.append(node)
        if len(stack) > MAX_DEPTH:
            raise _Forbidden(f"elements are nested deeper than {MAX_DEPTH}")

    def end(_name: str) -> None:
        stack.pop()

    def data(text: str) -> None:
        if stack:
            stack[-1].text.append(text)

    parser.StartDoctypeDeclHandler = forbid
    parser.EntityDeclHandler = forbid
    parser.UnparsedEntityDeclHandler = forbid
    parser.NotationDeclHandler = forbid
    parser.ExternalEntityRefHandler = forbid
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = data
    try:
        parser.Parse(body, True)
    except _Forbidden as exc:
        raise malformed(str(exc)) from None
    except expat.ExpatError as exc:
        raise malformed(f"not well-formed XML ({expat.ErrorString(exc.code)})") from None
    if len(roots) != 1:
        raise malformed("the document has no root element")
    return roots[0]


def _expect_root(root: _Node, name: str) -> None:
    if root.name != name:
        raise malformed(f"the root element is <{root.name}>, expected <{name}>")


def _no_text(node: _Node) -> None:
    if node.value.strip():
        raise malformed(f"<{node.name}> contains text where elements are expected")


def _leaf(node: _Node) -> str:
    if node.children:
        raise malformed(f"<{node.name}> must not contain elements")
    return node.value


@dataclass(frozen=True, slots=True)
class CompletedPart:
    """One part named in CompleteMultipartUpload; ``checksums`` maps ``CRC32``... to base64."""

    part_number: int
    etag: str
    checksums: Mapping[str, str] = field(default_factory=dict)


def _parse_part_number(text: str) -> int:
    value = text.strip()
    if not value.isascii() or not value.isdigit():
        raise malformed(f"PartNumber {value[:32]!r} is not an integer")
    number = int(value)
    if not 1 <= number <= MAX_PART_NUMBER:
        raise malformed(f"PartNumber {number} is not between 1 and {MAX_PART_NUMBER}")
    return number


def parse_complete_multipart_upload(
    body: bytes, *, max_size: int = DEFAULT_MAX_XML_SIZE
) -> list[CompletedPart]:
    """The parts of a ``CompleteMultipartUpload`` document, in document order.

    ETags are returned without quotes. Raises ``MalformedXML`` (broken XML, DTDs, wrong root,
    unknown elements, a missing or invalid PartNumber or ETag, no part, more than 10000) and
    ``InvalidPartOrder`` (part numbers not strictly ascending).
    """
    root = _parse_tree(body, max_size)
    _expect_root(root, "CompleteMultipartUpload")
    _no_text(root)
    parts: list[CompletedPart] = []
    for node in root.children:
        if node.name != "Part":
            raise malformed(f"unexpected <{node.name}> in <CompleteMultipartUpload>")
        _no_text(node)
        number: int | None = None
        etag: str | None = None
        checksums: dict[str, str] = {}
        for child in node.children:
            text = _leaf(child)
            if child.name == "PartNumber" and number is None:
                number = _parse_part_number(text)
            elif child.name == "ETag" and etag is None:
                etag = unquote_etag(text)
            elif child.name.startswith("Checksum") and len(child.name) > len("Checksum"):
                algorithm = child.name[len("Checksum") :].upper()
                if algorithm in checksums:
                    raise malformed(f"<{child.name}> is given twice in a <Part>")
                checksums[algorithm] = text.strip()
            else:
                raise malformed(f"unexpected or repeated <{child.name}> in <Part>")
        if number is None:
            raise malformed("a <Part> has no <PartNumber>")
        if not etag:
            raise malformed(f"part {number} has no <ETag>")
        parts.append(CompletedPart(number, etag, checksums))
        if len(parts) > MAX_PART_NUMBER:
            raise malformed(f"more than {MAX_PART_NUMBER} parts")
    if not parts:
        raise malformed("<CompleteMultipartUpload> names no part")
    for before, after in itertools.pairwise(parts):
        if after.part_number <= before.part_number:
            raise S3Error("InvalidPartOrder")
    return parts


@dataclass(frozen=True, slots=True)
class ObjectToDelete:
    """One ``Object`` of a DeleteObjects request."""

    key: str
    version_id: str | None = None
    etag: str | None = None


@dataclass(frozen=True, slots=True)
class DeleteRequest:
    """A parsed DeleteObjects request."""

    objects: tuple[ObjectToDelete, ...]
    quiet: bool = False


_DELETE_OBJECT_IGNORED = frozenset(("LastModifiedTime", "Size"))


def parse_delete(body: bytes, *, max_size: int = DEFAULT_MAX_XML_SIZE) -> DeleteRequest:
    """A ``Delete`` document: 1..1000 objects and ``Quiet``.

    Keys are returned exactly as sent (no whitespace stripping). Raises ``MalformedXML``.
    """
    root = _parse_tree(body, max_size)
    _expect_root(root, "Delete")
    _no_text(root)
    quiet: bool | None = None
    objects: list[ObjectToDelete] = []
    for node in root.children:
        if node.name == "Quiet" and quiet is None:
            flag = _leaf(node).strip().lower()
            if flag not in ("true", "false"):
                raise malformed(f"<Quiet> must be true or false, not {flag[:16]!r}")
            quiet = flag == "true"
        elif node.name == "Object":
            _no_text(node)
            key: str | None = None
            version: str | None = None
            etag: str | None = None
            for child in node.children:
                text = _leaf(child)
                if child.name == "Key" and key is None:
                    key = text
                elif child.name == "VersionId" and version is None:
                    version = text.strip()
                elif child.name == "ETag" and etag is None:
                    etag = unquote_etag(text)
                elif child.name not in _DELETE_OBJECT_IGNORED:
                    raise malformed(f"unexpected or repeated <{child.name}> in <Object>")
            if not key:
                raise malformed("an <Object> has no <Key>")
            objects.append(ObjectToDelete(key, version or None, etag))
            if len(objects) > MAX_DELETE_OBJECTS:
                raise malformed(f"more than {MAX_DELETE_OBJECTS} objects")
        else:
            raise malformed(f"unexpected or repeated <{node.name}> in <Delete>")
    if not objects:
        raise malformed("<Delete> names no object")
    return DeleteRequest(tuple(objects), bool(quiet))


def parse_create_bucket_configuration(body: bytes, *, max_size: int = 64 * 1024) -> str | None:
    """The ``LocationConstraint`` of a CreateBucket body (None for an empty body or element).

    Other elements (``Location``, ``Bucket`` of directory buckets) are ignored. Raises
    ``MalformedXML``.
    """
    if not body.strip():
        return None
    root = _parse_tree(body, max_size)
    _expect_root(root, "CreateBucketConfiguration")
    _no_text(root)
    constraint: str | None = None
    for node in root.children:
        if node.name == "LocationConstraint":
            if constraint is not None:
                raise malformed("<LocationConstraint> is given twice")
            constraint = _leaf(node).strip()
    return constraint or None


async def read_xml_body(
    pieces: AsyncIterable[bytes], max_size: int = DEFAULT_MAX_XML_SIZE
) -> bytes:
    """Collect a request body for parsing; ``MalformedXML`` once it exceeds ``max_size``."""
    buffer = bytearray()
    async for piece in pieces:
        buffer.extend(piece)
        if len(buffer) > max_size:
            raise malformed(f"the document is larger than {max_size} bytes")
    return bytes(buffer)


def parse_tagging(body: bytes, *, max_size: int = 64 * 1024) -> list[tuple[str, str]]:
    """The (key, value) pairs of a ``<Tagging><TagSet><Tag>`` document, in order.

    Raises ``MalformedXML``; the tags' own rules are checked by ``frontends.s3.tags``."""
    root = _parse_tree(body, max_size)
    _expect_root(root, "Tagging")
    _no_text(root)
    sets = [n for n in root.children if n.name == "TagSet"]
    if len(sets) != 1 or len(root.children) != 1:
        raise malformed("<Tagging> must hold exactly one <TagSet>")
    _no_text(sets[0])
    tags: list[tuple[str, str]] = []
    for tag in sets[0].children:
        if tag.name != "Tag":
            raise malformed(f"unexpected <{tag.name}> in <TagSet>")
        _no_text(tag)
        fields: dict[str, str] = {}
        for node in tag.children:
            if node.name not in ("Key", "Value") or node.name in fields:
                raise malformed(f"unexpected or repeated <{node.name}> in <Tag>")
            fields[node.name] = _leaf(node)
        if "Key" not in fields:
            raise malformed("a <Tag> has no <Key>")
        tags.append((fields["Key"], fields.get("Value", "")))
    return tags


def render_tagging(tags: Sequence[tuple[str, str]]) -> bytes:
    body = "".join(f"<Tag>{_el('Key', key)}{_el('Value', value)}</Tag>" for key, value in tags)
    return _document("Tagging", [f"<TagSet>{body}</TagSet>"])


@dataclass(frozen=True, slots=True)
class ObjectAttributes:
    """What GetObjectAttributes answers; None fields were not asked for (or do not apply)."""

    etag: str | None = None
    checksums: Mapping[str, str] | None = None
    """``CRC32``... → base64 value."""
    checksum_type: str | None = None
    storage_class: str | None = None
    size: int | None = None
    parts_total: int | None = None
    parts: Sequence[tuple[int, int]] = ()
    """(part number, size) of the page of parts shown."""
    part_marker: int = 0
    next_part_marker: int | None = None
    max_parts: int = 1000
    parts_truncated: bool = False


def render_object_attributes(attributes: ObjectAttributes) -> bytes:
    a = attributes
    body = [_opt("ETag", a.etag)]
    if a.checksums:
        kind = _opt("ChecksumType", a.checksum_type)
        body.append(f"<Checksum>{_checksums(a.checksums)}{kind}</Checksum>")
    if a.parts_total is not None:
        parts = "".join(
            f"<Part>{_el('PartNumber', n)}{_el('Size', size)}</Part>" for n, size in a.parts
        )
        body.append(
            "<ObjectParts>"
            + _el("PartsCount", a.parts_total)
            + _el("PartNumberMarker", a.part_marker)
            + _opt("NextPartNumberMarker", a.next_part_marker)
            + _el("MaxParts", a.max_parts)
            + _el("IsTruncated", a.parts_truncated)
            + parts
            + "</ObjectParts>"
        )
    body += [_opt("StorageClass", a.storage_class), _opt("ObjectSize", a.size)]
    return _document("GetObjectAttributesResponse", body)


def parse_document(body: bytes, root: str, *, max_size: int = 64 * 1024) -> _Node:
    """The hardened parse of a small request document whose root must be ``root``
    (no DTDs or entities). Raises ``MalformedXML``."""
    tree = _parse_tree(body, max_size)
    _expect_root(tree, root)
    _no_text(tree)
    return tree


def leaf_text(node: _Node) -> str:
    """The text of an element that must hold no elements. Raises ``MalformedXML``."""
    return _leaf(node)


def document(root: str, body: Iterable[str]) -> bytes:
    """A response document with S3's namespace."""
    return _document(root, body)
