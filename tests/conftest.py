"""Test-suite settings shared by every test file."""

from __future__ import annotations

import os

from hypothesis import settings

# CI must not pass or fail by the luck of the draw: by default the property tests draw the
# same examples on every run (derandomize). HYPOTHESIS_PROFILE=explore draws new ones each
# run, to hunt for bugs locally; a failure it finds is printed with the seed to replay it.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
