"""Naming rules shared by the configuration and the services."""

from __future__ import annotations

import ipaddress
import re

_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")

BUCKET_NAME_RULE = (
    "3-63 lowercase letters, digits, '-' or '.', starting and ending with a letter or digit, "
    "no '..', not an IP address"
)


def is_valid_bucket_name(value: str) -> bool:
    """True when ``value`` follows S3's bucket naming rules (DNS-compatible names)."""
    return bool(_BUCKET_NAME.fullmatch(value)) and ".." not in value and not _is_ip(value)


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True
