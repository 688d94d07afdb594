"""Per-bucket CORS: the rules' XML (Put/GetBucketCors), their stored form, and matching.

A browser asks first with a preflight (``OPTIONS`` with ``Origin`` and
``Access-Control-Request-Method``); the first rule whose origins, methods and headers all
match answers it, as S3 does. Actual requests with an ``Origin`` get the CORS headers of
the first rule matching origin and method. Origins and allowed headers may hold one
``*`` wildcard; header names match case-insensitively.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from frontends.s3 import xml as s3xml
from frontends.s3.errors import S3Error

METHODS = ("GET", "PUT", "POST", "DELETE", "HEAD")
MAX_RULES = 100


@dataclass(frozen=True, slots=True)
class CorsRule:
    origins: tuple[str, ...]
    methods: tuple[str, ...]
    headers: tuple[str, ...] = ()
    expose: tuple[str, ...] = ()
    max_age: int | None = None
    rule_id: str | None = None

    def allows(self, origin: str, method: str, headers: Sequence[str] = ()) -> bool:
        return (
            method in self.methods
            and any(_wild(p, origin) for p in self.origins)
            and all(any(_wild(p.lower(), h.lower()) for p in self.headers) for h in headers)
        )

    def response_headers(
        self, origin: str, *, preflight: bool, requested: Sequence[str] = ()
    ) -> dict[str, str]:
        """The ``Access-Control-*`` headers for a request this rule allows."""
        wildcard = "*" in self.origins
        out = {
            "Access-Control-Allow-Origin": "*" if wildcard else origin,
            "Access-Control-Allow-Methods": ", ".join(self.methods),
            "Vary": "Origin, Access-Control-Request-Headers, Access-Control-Request-Method",
        }
        if not wildcard:
            out["Access-Control-Allow-Credentials"] = "true"
        if preflight and requested:
            out["Access-Control-Allow-Headers"] = ", ".join(requested)
        if self.expose:
            out["Access-Control-Expose-Headers"] = ", ".join(self.expose)
        if preflight and self.max_age is not None:
            out["Access-Control-Max-Age"] = str(self.max_age)
        return out


def _wild(pattern: str, value: str) -> bool:
    if "*" not in pattern:
        return pattern == value
    head, _, tail = pattern.partition("*")
    return len(value) >= len(head) + len(tail) and value.startswith(head) and value.endswith(tail)


def parse_cors_xml(body: bytes) -> list[CorsRule]:
    """Rules from a ``<CORSConfiguration>`` document. Raises ``MalformedXML`` (also for
    rules S3 refuses: no origin or method, an unknown method, two wildcards)."""
    root = s3xml.parse_document(body, "CORSConfiguration")
    rules: list[CorsRule] = []
    for node in root.children:
        if node.name != "CORSRule":
            raise s3xml.malformed(f"unexpected <{node.name}> in <CORSConfiguration>")
        fields: dict[str, list[str]] = {}
        for child in node.children:
            fields.setdefault(child.name, []).append(s3xml.leaf_text(child).strip())
        unknown = set(fields) - {
            "AllowedOrigin",
            "AllowedMethod",
            "AllowedHeader",
            "ExposeHeader",
            "MaxAgeSeconds",
            "ID",
        }
        if unknown:
            raise s3xml.malformed(f"unexpected <{sorted(unknown)[0]}> in <CORSRule>")
        origins, methods = fields.get("AllowedOrigin", []), fields.get("AllowedMethod", [])
        if not origins or not methods:
            raise s3xml.malformed("a <CORSRule> needs an AllowedOrigin and an AllowedMethod")
        for method in methods:
            if method not in METHODS:
                raise S3Error(
                    "InvalidRequest",
                    f"Found unsupported HTTP method in CORS config. Unsupported method is {method}",
                )
        for pattern in origins + fields.get("AllowedHeader", []):
            if pattern.count("*") > 1:
                raise S3Error("InvalidRequest", f"{pattern!r} can not have more than one wildcard.")
        max_age = fields.get("MaxAgeSeconds", [])
        if len(max_age) > 1 or (max_age and not re.fullmatch(r"\d{1,9}", max_age[0])):
            raise s3xml.malformed("<MaxAgeSeconds> must be one non-negative integer")
        rules.append(
            CorsRule(
                tuple(origins),
                tuple(methods),
                tuple(fields.get("AllowedHeader", [])),
                tuple(fields.get("ExposeHeader", [])),
                int(max_age[0]) if max_age else None,
                fields["ID"][0] if fields.get("ID") else None,
            )
        )
    if not rules:
        raise s3xml.malformed("<CORSConfiguration> holds no <CORSRule>")
    if len(rules) > MAX_RULES:
        raise S3Error("InvalidRequest", f"A CORS configuration holds at most {MAX_RULES} rules.")
    return rules


def render_cors_xml(rules: Sequence[CorsRule]) -> bytes:
    parts = []
    for rule in rules:
        body = "".join(
            [f"<ID>{s3xml.escape(rule.rule_id)}</ID>" if rule.rule_id else ""]
            + [f"<AllowedOrigin>{s3xml.escape(o)}</AllowedOrigin>" for o in rule.origins]
            + [f"<AllowedMethod>{m}</AllowedMethod>" for m in rule.methods]
            + [f"<AllowedHeader>{s3xml.escape(h)}</AllowedHeader>" for h in rule.headers]
            + [f"<ExposeHeader>{s3xml.escape(h)}</ExposeHeader>" for h in rule.expose]
            + (
                [f"<MaxAgeSeconds>{rule.max_age}</MaxAgeSeconds>"]
                if rule.max_age is not None
                else []
            )
        )
        parts.append(f"<CORSRule>{body}</CORSRule>")
    return s3xml.document("CORSConfiguration", parts)


def dump_rules(rules: Sequence[CorsRule]) -> str:
    """The stored form (JSON)."""
    return json.dumps(
        [
            {
                "origins": r.origins,
                "methods": r.methods,
                "headers": r.headers,
                "expose": r.expose,
                "max_age": r.max_age,
                "id": r.rule_id,
            }
            for r in rules
        ]
    )


def load_rules(stored: str) -> list[CorsRule]:
    """Rules from their stored form ("" = none)."""
    if not stored:
        return []
    raw: list[Mapping[str, object]] = json.loads(stored)
    return [
        CorsRule(
            tuple(r["origins"]),  # type: ignore[arg-type]
            tuple(r["methods"]),  # type: ignore[arg-type]
            tuple(r["headers"]),  # type: ignore[arg-type]
            tuple(r["expose"]),  # type: ignore[arg-type]
            r["max_age"],  # type: ignore[arg-type]
            r["id"],  # type: ignore[arg-type]
        )
        for r in raw
    ]


def first_match(
    rules: Sequence[CorsRule], origin: str, method: str, headers: Sequence[str] = ()
) -> CorsRule | None:
    return next((r for r in rules if r.allows(origin, method, headers)), None)


def requested_headers(value: str | None) -> list[str]:
    """The names in ``Access-Control-Request-Headers``."""
    return [h.strip() for h in (value or "").split(",") if h.strip()]
