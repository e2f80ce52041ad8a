"""The quick demo, run once per test session (tests/test_demo.py and the search-vs-eval test share it)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory):
    """(result, echoed lines, settings) of `run_demo` with DemoSettings.quick() into a temp folder."""
    from teranprep.pipeline.demo import DemoSettings, run_demo
    lines = []
    settings = DemoSettings.quick()
    result = run_demo(tmp_path_factory.mktemp("quick-demo") / "demo", settings, echo=lines.append)
    return result, lines, settings
