"""What a frame's metadata may be: its types, its text, its size [F-09].

Every put's ``uri``, ``title``, ``kind``, ``parent``, ``tags`` and times pass through
here before anything is written; limits are in UTF-8 bytes, and a breach is an
``InvalidArgument`` naming the field.
"""

from __future__ import annotations

import datetime as _dt
import math
import time
from collections.abc import Mapping
from typing import Any

from .errors import InvalidArgument

# Frame metadata limits, in UTF-8 bytes (docs/format.md [F-09]): a put past one is refused
# before anything is written. Generous for real input (a percent-encoded PATH_MAX path
# fits a URI), small enough that no frame can make its metadata or index entries huge.
MAX_URI_BYTES = 16 << 10  # also the parent URI
MAX_TITLE_BYTES = 4 << 10
MAX_KIND_BYTES = 256
MAX_TAGS = 256
MAX_TAG_KEY_BYTES = 256
MAX_TAG_VALUE_BYTES = 4 << 10


def to_epoch(value: Any) -> float:
    """Epoch seconds from epoch seconds or an aware datetime (None: now)."""
    if value is None:
        return time.time()
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None:
            raise InvalidArgument("timestamp datetime must be timezone-aware")
        return value.timestamp()
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    raise InvalidArgument(f"timestamp must be epoch seconds or an aware datetime, not {value!r}")


def opt_str(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidArgument(f"{name} must be a string, not {type(value).__name__}")
    _utf8(name, value)
    return value


def _utf8(name: str, value: str) -> None:
    """Metadata is stored as UTF-8: a lone surrogate (e.g. from JSON "\\ud800") cannot be."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidArgument(f"{name} is not valid Unicode text (character {e.start})") from None


def check_sizes(meta: Mapping[str, Any]) -> None:
    """Refuse frame metadata past the limits (``MAX_URI_BYTES`` and the others)."""
    for name, limit in (("uri", MAX_URI_BYTES), ("parent", MAX_URI_BYTES), ("title", MAX_TITLE_BYTES),
                        ("kind", MAX_KIND_BYTES)):
        _fits(name, meta[name], limit)
    tags = meta["tags"]
    if len(tags) > MAX_TAGS:
        raise InvalidArgument(f"{len(tags)} tags exceed the limit of {MAX_TAGS} tags")
    for k, v in tags.items():
        _fits("a tag key", k, MAX_TAG_KEY_BYTES)
        _fits(f"tag {k!r}", v, MAX_TAG_VALUE_BYTES)


def _fits(name: str, value: str | None, limit: int) -> None:
    if value is not None and len(value) * 4 > limit:  # only long text can be too long
        size = len(value.encode("utf-8"))
        if size > limit:
            raise InvalidArgument(f"{name} of {size} bytes exceeds the limit of {limit} bytes")


def tags_of(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise InvalidArgument("tags must be a mapping of str to str")
    for k, v in value.items():
        _utf8("tag key", k)
        _utf8(f"tag {k!r}", v)
    return dict(value)
