"""Session ids, and the ``session_<id>`` names they give under the session root.

An id comes from a task's arguments, that is from whoever sent the task, so it is checked before
any file is touched. Besides ``session_<id>``, the id names files in rmq's own state: the failure
mark ``.rmq/failed/<id>`` and the lease ``.rmq/leases/<id>.<pid>.<task>.<token>``, which is split
at its first dot to read the id back. Hence the narrow alphabet: no ``/``, no NUL, and no dot (so
neither ``.`` nor ``..``).
"""

from __future__ import annotations

import re

from rmq.core.errors import ConfigError

__all__ = ["SESSION_ID_PATTERN", "SESSION_PREFIX", "validate_session_id"]

#: the start of every session directory's name; cleanup touches no other entry of the root
SESSION_PREFIX = "session_"
#: a valid session id, to match with ``fullmatch``
SESSION_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,128}")


def validate_session_id(value: object) -> str:
    """Return ``value`` if it is a valid session id (``[A-Za-z0-9_-]{1,128}``).

    Raises:
        ConfigError: naming the (truncated) bad value.
    """
    if isinstance(value, str) and SESSION_ID_PATTERN.fullmatch(value):
        return value
    shown = repr(value)
    if len(shown) > 60:
        shown = f"{shown[:50]}...' ({len(value) if isinstance(value, str) else '?'} characters)"
    raise ConfigError(f"invalid session id {shown}: use 1-128 characters from A-Z a-z 0-9 _ -")
