"""Shared fixtures: uvloop for every async test, the shipped model, the real data folder."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import uvloop
from hypothesis import settings

from daemon.logs import configure_logging
from engines.chooser import DEFAULT_MODEL

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
MINUTE_CSV = SHARED_DATA / "us_equity_minute_2013-10.csv"
SPY_DAILY_CSV = SHARED_DATA / "spy_daily_1998-2021.csv"


configure_logging("info")

# Shared two-core machines stall now and then; a property is about inputs, not wall time.
settings.register_profile("tradingd", deadline=None)
settings.load_profile("tradingd")


def pytest_asyncio_loop_factories(config: Any, item: Any) -> Mapping[str, Callable[[], Any]]:
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture(scope="session")
def shipped_model() -> Path:
    return DEFAULT_MODEL


@pytest.fixture(scope="session")
def minute_csv() -> Path:
    if not MINUTE_CSV.is_file():
        pytest.skip(f"real minute bars not found at {MINUTE_CSV} (the shared data folder is absent)")
    return MINUTE_CSV


@pytest.fixture
def model_copy(tmp_path: Path, shipped_model: Path) -> Path:
    """The shipped model (and its manifest) in a folder of the test's own, so what is written
    beside it (a qualification.json) lands there, not in the package."""
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(shipped_model, folder / shipped_model.name)
    manifest = shipped_model.with_name(shipped_model.stem + ".manifest.json")
    shutil.copy(manifest, folder / manifest.name)
    return folder / shipped_model.name
