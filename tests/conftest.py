"""Shared test setup: everything runs offline; expensive imports happen once per session."""

import os

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_var] = "1"  # hub calls would otherwise retry for ~30-50 s

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def transformers():
    """The transformers package (imported once: ~4.5 s), or skip where it is not installed."""
    return pytest.importorskip("transformers")
