"""The long soak (marked slow, ``make test-all``): 20,000 quick-start steps with injected faults — the
same checks as tests/integration/test_reliability_soak.py, ten times longer (about 8 minutes on two
CPU cores)."""

import pytest

from tests.integration.test_reliability_soak import soak


@pytest.mark.slow
def test_long_soak_with_injected_faults(tmp_path, monkeypatch):
    soak(tmp_path, monkeypatch, 20_000)
