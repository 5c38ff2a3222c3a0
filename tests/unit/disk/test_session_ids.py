"""Session ids: what passes, and what the refusal says."""

from __future__ import annotations

import pytest

from rmq.core.errors import ConfigError
from rmq.disk.session_ids import validate_session_id

from .helpers import BAD_IDS, BAD_VALUES


@pytest.mark.parametrize("value", ["a", "Z", "0", "job-42_b", "a" * 128, "A-_-z"])
def test_valid_ids_pass_unchanged(value):
    assert validate_session_id(value) == value


@pytest.mark.parametrize("value", BAD_IDS + BAD_VALUES)
def test_invalid_ids_are_config_errors_naming_the_value(value):
    with pytest.raises(ConfigError) as info:
        validate_session_id(value)
    message = str(info.value)
    assert "invalid session id" in message
    assert len(message) < 200  # long values are truncated
    assert repr(value)[:20] in message
