"""The real-switch tier: one FreeSWITCH per module, with the project's configuration on free ports."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.real_switch import RealSwitch, running_switch


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if Path(str(item.fspath)).parent == Path(__file__).parent:
            item.add_marker(pytest.mark.real_switch)


@pytest.fixture(scope="module")
def real_switch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealSwitch]:
    with running_switch(tmp_path_factory.mktemp("freeswitch")) as switch:
        yield switch
