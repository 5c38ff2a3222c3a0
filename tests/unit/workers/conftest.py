"""The media extra (real speech models and ffmpeg) is installed by ./scripts/test; a machine without
it skips the tests that need it, except in CI, where they must run."""

from __future__ import annotations

import os

import pytest

from workers.speech import missing_media


@pytest.fixture
def media() -> None:
    """Skip (outside CI) when the media extra is not installed."""
    missing = missing_media()
    if missing and not os.environ.get("CI"):
        pytest.skip(f"the media extra is not installed (missing {', '.join(missing)})")
