"""The simulator's truth against the platform: sessions, charger, overheat and silence alerts,
and the alerts topic, through real consumer processes each killed once (`make proof`, smaller)."""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts.sessions_proof import prove


@pytest.mark.timeout(600)
async def test_sessions_and_alerts_match_the_simulators_truth(
    broker: str, admin_dsn: str, tmp_path: Path
) -> None:
    proof = await prove(
        tmp_path, broker, admin_dsn, devices=40, hours=36, database="fleet_test_sessions_proof"
    )
    print(proof.figures)
    assert proof.failures == []
    assert proof.figures["truth_sessions"] >= 50
    assert proof.figures["failing_with_k_sessions_after"] >= 1
    assert proof.figures["overheat_alerts"] >= 1 and proof.figures["silent_alerts"] >= 1
