"""Shared fixtures. ``../shared`` (real captions, SCAN's vocab) exists in CI; in a user's clone
the tests that need it skip with a reason. The NLTK data the labels need ship in vocab/nltk_data,
so no test depends on NLTK_DATA or the network."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), 'shared')
sys.path.insert(0, ROOT)


def shared_path(*parts):
    """Path under ../shared, or skip the test (a user's clone has no ../shared)."""
    path = os.path.join(SHARED, *parts)
    if not os.path.exists(path):
        pytest.skip(f'{path} not present (it exists in CI, not in a user clone)')
    return path


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: end-to-end tests (real captions, toy training); CI runs them')
