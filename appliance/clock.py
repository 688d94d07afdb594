"""Time helpers: one representation of instants (aware UTC datetimes) and months."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def utcnow() -> datetime:
    """Return the current instant as an aware UTC datetime."""
    return datetime.now(UTC)


def to_micros(moment: datetime) -> int:
    """Encode an aware datetime as integer microseconds since the epoch (storage form)."""
    if moment.tzinfo is None:
        raise ValueError("naive datetime: instants must carry a timezone")
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_micros(value: int) -> datetime:
    """Decode integer microseconds since the epoch into an aware UTC datetime."""
    return _EPOCH + timedelta(microseconds=value)


def month_of(moment: datetime) -> str:
    """Return the UTC calendar month of ``moment`` as ``YYYY-MM`` (usage-counter period)."""
    utc = moment.astimezone(UTC)
    return f"{utc.year:04d}-{utc.month:02d}"  # strftime costs ~10x more, per backend call
