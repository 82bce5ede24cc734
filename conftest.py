"""Shared pytest set-up: names available to every docstring example."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import diffprog


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace: dict[str, Any]) -> None:
    doctest_namespace["torch"] = torch
    doctest_namespace["dp"] = diffprog
    for name in diffprog.__all__:
        doctest_namespace[name] = getattr(diffprog, name)
