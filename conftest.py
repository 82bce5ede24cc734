"""Shared pytest set-up: names available to every docstring example."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

import diffprog

# Under pytest-xdist each worker gets one core: torch's own intra-op threads on top of that
# would oversubscribe the machine and slow every test down many times over.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace: dict[str, Any]) -> None:
    doctest_namespace["torch"] = torch
    doctest_namespace["dp"] = diffprog
    for name in diffprog.__all__:
        doctest_namespace[name] = getattr(diffprog, name)
