"""Shared fixtures: paths to ../shared/data (read in place, skipped when absent) and the test web."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
PHOTOS = os.path.join(SHARED_DATA, "photos-imagenet-sample")
WARCS = os.path.join(SHARED_DATA, "warc")


def _need(path: str) -> str:
    if not os.path.isdir(path):
        pytest.skip(f"shared test data not found at {path} (clone ../shared beside the project)")
    return path


@pytest.fixture(scope="session")
def photos_dir() -> str:
    return _need(PHOTOS)


@pytest.fixture(scope="session")
def warc_dir() -> str:
    return _need(WARCS)


@pytest.fixture(scope="session")
def test_web(tmp_path_factory, photos_dir):
    """The loopback web built from the real photos, alive for the whole test session."""
    from webpairs.testweb import serve_test_web

    with serve_test_web(str(tmp_path_factory.mktemp("testweb")), photos_dir=photos_dir, slow_delay=3.0) as web:
        yield web
