"""`make demo` works end to end against configured services."""

from __future__ import annotations

import asyncio
import os
import sys

from devtools.stack import free_port
from tests.conftest import ROOT


async def test_demo_stores_every_message_and_says_where_to_look(broker: str, database: str) -> None:
    """The demo publishes a fleet plus malformed messages, all of which land, and prints the URLs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")} | {
        "FLEET_KAFKA_BOOTSTRAP_SERVERS": broker,
        "FLEET_DATABASE_URL": database,
        "FLEET_KAFKA_IDEMPOTENT_PRODUCER": "false",  # tansu lacks InitProducerId
        "FLEET_SESSION_TIMEOUT_MS": "6000",
        "FLEET_HTTP_PORT": str(free_port()),
    }
    demo = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "scripts.demo",
        "--seconds",
        "0",
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(demo.communicate(), timeout=150)
    text = output.decode()
    assert demo.returncode == 0, text
    assert "stored 48,003 of 48,003 messages" in text
    assert "dead letter: malformed_json x1" in text
    assert "charging efficiency" in text
    assert "alert: charger_efficiency_low on meter-" in text  # a failing charger, raised
    assert f"localhost:{env['FLEET_HTTP_PORT']}/metrics" in text
