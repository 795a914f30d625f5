"""The real-switch test tier's rules around ``benchmarks._realfs.RealSwitch`` (a real FreeSWITCH 1.10.12 with
the project's own configuration on free ports).

Where the switch comes from: ``$IIM_TEST_FREESWITCH`` or ``/usr/local/freeswitch``, the layout that
``../shared/freeswitch/install`` writes. A fresh clone has none; the tier then skips with the reason, unless
``IIM_REQUIRE_REAL_SWITCH=1`` (set by ``.ci/run`` when ``../shared`` is present), which turns the skip into
a failure so the tier can never silently vanish. The switch inherits the run's ``IIM_TEST_RUN`` marker, so
``tests/run_guard.py`` kills it if pytest dies.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks._realfs import RealSwitch, free_media_port, free_port, freeswitch_home

__all__ = ["RealSwitch", "free_media_port", "free_port", "require_freeswitch", "require_sipp", "running_switch", "skip_or_fail"]

REQUIRE_ENV = "IIM_REQUIRE_REAL_SWITCH"


def skip_or_fail(reason: str) -> None:
    """Skip the real-switch tier with ``reason``, or fail when the run promised to have it."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason}, but {REQUIRE_ENV}=1: the real-switch tier must not be skipped", pytrace=False)
    pytest.skip(reason)


def require_freeswitch() -> Path:
    home = freeswitch_home()
    if home is None:
        skip_or_fail("no FreeSWITCH 1.10.12 installed (../shared/freeswitch/install, or set IIM_TEST_FREESWITCH)")
    assert home is not None
    return home


def require_sipp() -> str:
    sipp = shutil.which("sipp")
    if sipp is None:
        skip_or_fail("no sipp on PATH (Debian package sip-tester)")
    assert sipp is not None
    return sipp


@contextlib.contextmanager
def running_switch(base: Path, **overrides: str) -> Iterator[RealSwitch]:
    """A started switch with the project's configuration; stopped (and its log kept under ``base``) after."""
    switch = RealSwitch(home=require_freeswitch(), base=base)
    switch.render(overrides)
    try:
        switch.start()
        yield switch
    finally:
        switch.stop()
