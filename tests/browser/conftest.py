"""Fixtures of the browser tests."""
from __future__ import annotations

import pytest

from .jupyter_harness import browser_unavailable_reason


@pytest.fixture
def fail_without_browser():
    """Used under CI=true when no browser can run: the browser tests fail instead of skipping."""
    pytest.fail(f"CI=true, so the browser tests must run, but {browser_unavailable_reason()}; "
                "`make setup` installs Debian's chromium when it runs as root or with passwordless sudo")
