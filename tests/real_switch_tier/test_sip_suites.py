"""The ``sip-tests/`` suites in CI: the runner's own table (``tests/sip_suites.py``), played through Kamailio,
the real FreeSWITCH and ``iim serve``, each suite one test (its SIP outcome and IIM's rows)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.kamailio_edge import require_kamailio
from tests.pg import PgCluster, PgDatabase
from tests.real_switch import require_freeswitch, require_sipp
from tests.sip_suites import SUITES, Load, Rig, Suite, play, running_rig


@pytest.fixture(scope="module")
def rig(pg_cluster: PgCluster, pg_db: PgDatabase, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    require_freeswitch()
    require_sipp()
    require_kamailio()
    # A short load run: the tier proves the suite works; its numbers come from `sip-tests/run --rate --calls`.
    with running_rig(tmp_path_factory.mktemp("sip-tests"), pg_cluster, pg_db, load=Load(rate=10, calls=40)) as rig:
        yield rig


@pytest.mark.parametrize("suite", SUITES, ids=[suite.name for suite in SUITES])
def test_the_suite_gives_the_caller_the_expected_answer_and_leaves_iims_rows(rig: Rig, suite: Suite) -> None:
    outcome = play(rig, suite)
    assert outcome.passed, outcome.report()
