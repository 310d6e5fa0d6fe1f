"""The fuzzers' shared Hypothesis settings (tests/test_fuzz_*.py). The budget is
``RESID_FUZZ_EXAMPLES`` examples a property (default 25): set it higher for a longer run,
e.g. ``RESID_FUZZ_EXAMPLES=2000 pytest tests/test_fuzz_sae.py``."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

EXAMPLES = int(os.environ.get("RESID_FUZZ_EXAMPLES", "25"))


def fuzz_settings(*suppress: HealthCheck) -> settings:
    """``EXAMPLES`` examples a property, no deadline (each fuzzer bounds an example's time
    itself), no example database (every run draws afresh), and ``HealthCheck.too_slow``
    and ``suppress`` suppressed."""
    return settings(max_examples=EXAMPLES, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, *suppress])  # fmt: skip
