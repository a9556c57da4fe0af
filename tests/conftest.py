"""Fixtures shared by the trainer-level tests: the tiny built-in models and the mixed task."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Untrained tiny student and teachers (seconds to build), cached per test module."""
    from pyopd.tasks.prepare import prepare_models

    return prepare_models(scale="tiny", cache_dir=tmp_path_factory.mktemp("cache"), seed=0, log=None)


@pytest.fixture(scope="module")
def task():
    from pyopd.tasks.registry import get_task

    return get_task("mixed")
