"""Fixtures of the foreign-model zoo (built once per session; see foreign_models.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from foreign_models import ForeignModel, build_foreign

_BUILT: dict[str, ForeignModel] = {}


@pytest.fixture(scope="session")
def foreign_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("foreign")


@pytest.fixture(scope="session")
def foreign(foreign_root):
    """``foreign(name)`` builds (once per session) and returns zoo model ``name``: vgg, resnet18, mlp."""

    def get(name: str) -> ForeignModel:
        if name not in _BUILT:
            _BUILT[name] = build_foreign(name, foreign_root)
        return _BUILT[name]

    return get


@pytest.fixture(scope="session")
def foreign_vgg(foreign) -> ForeignModel:
    return foreign("vgg")


@pytest.fixture(scope="session")
def foreign_mlp(foreign) -> ForeignModel:
    return foreign("mlp")


@pytest.fixture(scope="session")
def foreign_resnet(foreign) -> ForeignModel:
    return foreign("resnet18")
