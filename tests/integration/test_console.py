"""The operator console in a real browser against the real sidecar, database and broker.

Debian's chromium (scripts/test-deps.sh installs it), driven headless by Playwright; readings
go through Kafka and the real consumer, sessions and alerts through the sessions worker, and
the sidecar is the real Service listening on a port of its own. Each test keeps a screenshot
of the pages it visits in FLEET_TEST_ARTIFACTS (default .artifacts/console/).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from playwright.async_api import Browser, Page, Request, async_playwright, expect
from pydantic import SecretStr

from consumer.service import Role, Service
from consumer.settings import Settings
from devtools.factories import BASE_TIME, meter, vehicle
from tests.conftest import ROOT, wait_until
from tests.integration.helpers import offsets_reach, publish_readings, running_service
from tests.integration.test_sessions import ingest, sessionize

CHROMIUM = os.environ.get("FLEET_TEST_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("FLEET_TEST_ARTIFACTS") or ROOT / ".artifacts" / "console")
# Readings start half an hour after BASE_TIME (yesterday, when the tests were collected): well
# inside the fleet report's default window (the last 24 h, widened to whole hours).
START = 30
TOKEN = "console-test-token-3f9a"  # noqa: S105 -- a test credential


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    """One headless chromium for the module; each test gets a fresh context (its own
    sessionStorage)."""
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield launched
        await launched.close()


class Tab:
    """A page of a fresh browser context that records every URL it requested and fails the
    test on any uncaught script error."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.requests: list[Request] = []
        self.errors: list[str] = []
        page.on("request", self._record)  # a bound method: Playwright cannot wrap a builtin
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        ARTIFACTS.mkdir(parents=True, exist_ok=True)

    def _record(self, request: Request) -> None:
        self.requests.append(request)

    async def screenshot(self, name: str) -> None:
        await self.page.screenshot(path=ARTIFACTS / f"{name}.png", full_page=True)


@pytest.fixture
async def tab(browser: Browser) -> AsyncIterator[Tab]:
    context = await browser.new_context(viewport={"width": 1280, "height": 800})
    opened = Tab(await context.new_page())
    yield opened
    await context.close()
    assert opened.errors == []


@contextlib.asynccontextmanager
async def sidecar(settings: Settings) -> AsyncIterator[str]:
    """The API role of the real service on its own port; yields the console's base URL."""
    service = Service(settings, Role.API)
    assert await service.start()
    try:
        yield f"http://127.0.0.1:{settings.http_port}"
    finally:
        await service.stop()


async def assign(db: asyncpg.Connection, pairs: list[tuple[str, str]]) -> None:
    await db.executemany(
        "INSERT INTO vehicle_meter_assignments (vehicle_id, meter_id, valid_from) VALUES ($1, $2, $3)",
        [(v, m, BASE_TIME - timedelta(hours=1)) for v, m in pairs],
    )


async def test_the_overview_lists_vehicles_worst_first_a_page_at_a_time_and_filters_by_status(
    settings: Settings, pool: asyncpg.Pool, db: asyncpg.Connection, tab: Tab
) -> None:
    """60 vehicles whose ratios run from 0.60 to 1.19 are shown worst first, 50 and then the
    rest after "Load more"; the status filter leaves only the faulty ones; a phone never has
    to scroll sideways."""
    ratios = {f"v-{i:02d}": round(0.6 + 0.01 * ((i * 37) % 60), 2) for i in range(60)}
    await assign(db, [(v, v.replace("v-", "m-")) for v in ratios])
    readings: list[dict[str, Any]] = []
    for v, ratio in ratios.items():
        for minute in (START, START + 1):
            readings.append(vehicle(v, minute, kwhDeliveredDc=ratio))
            readings.append(meter(v.replace("v-", "m-"), minute, kwhConsumedAc=1.0))
    await ingest(settings, readings)
    await sessionize(pool, settings)  # the hourly totals the report reads
    worst_first = sorted(ratios, key=lambda v: (ratios[v], v))

    async with sidecar(settings) as base:
        page = tab.page
        await page.goto(f"{base}/")
        rows = page.locator("table tbody tr")
        await expect(rows).to_have_count(50)
        await tab.screenshot("overview")
        assert await row_ids(page) == worst_first[:50]
        shown = [float(r) for r in await page.locator("tbody td.ratio").all_inner_texts()]
        assert shown == sorted(shown) == [ratios[v] for v in worst_first[:50]]
        await expect(rows.first.locator(".status")).to_have_text("fault")

        await page.get_by_role("button", name="Load more").click()
        await expect(rows).to_have_count(60)
        assert await row_ids(page) == worst_first
        await expect(page.get_by_role("button", name="Load more")).to_be_hidden()

        await page.get_by_label("Status").select_option("fault")
        faulty = [v for v in worst_first if ratios[v] < settings.efficiency_fault_below]
        await expect(rows).to_have_count(len(faulty))
        assert await row_ids(page) == faulty
        assert set(await page.locator("tbody .status").all_inner_texts()) == {"fault"}
        assert page.url.endswith("#/?status=fault")  # a view an operator can bookmark

        await page.get_by_role("link", name=faulty[0], exact=True).click()
        await expect(page.get_by_role("heading", level=1)).to_have_text(f"Vehicle {faulty[0]}")

        await page.set_viewport_size({"width": 390, "height": 844})
        await page.goto(f"{base}/console/#/")
        await expect(rows).to_have_count(50)
        await tab.screenshot("overview-phone")
        assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


async def row_ids(page: Page) -> list[str]:
    return [
        str(await row.get_attribute("data-vehicle"))
        for row in await page.locator("table tbody tr").all()
    ]


async def test_a_reading_published_to_kafka_appears_on_the_vehicle_page_without_a_reload(
    settings: Settings, db: asyncpg.Connection, tab: Tab
) -> None:
    """The vehicle page shows the live reading, a chart of its two sessions' efficiency
    (one normal, one faulty) and its meter; a new reading sent through Kafka replaces the
    live reading in place, pushed by the stream."""
    await assign(db, [("v-live", "m-live")])
    topic = settings.mixed_topic
    readings: list[dict[str, Any]] = []
    for start, ac in ((START, 1.1), (START + 20, 1.4)):  # ratios 0.9091 and 0.7143
        readings += [vehicle("v-live", m, kwhDeliveredDc=1.0) for m in range(start, start + 5)]
        readings += [meter("m-live", m, kwhConsumedAc=ac) for m in range(start, start + 5)]
    readings += [
        vehicle("v-live", m, kwhDeliveredDc=0.0, soc=40.0) for m in range(START + 25, START + 45)
    ]

    async with running_service(settings):  # consumer, sessions worker and API, as deployed
        sent = await publish_readings(settings.kafka_bootstrap_servers, topic, readings)
        await wait_until(lambda: all_processed(db, topic, sent))
        page = tab.page
        await page.goto(f"http://127.0.0.1:{settings.http_port}/console/#/vehicles/v-live")
        soc = page.locator("#live-reading [data-field=soc]")
        await expect(soc).to_have_text("40.0 %")
        await expect(page.locator("svg.chart circle.point")).to_have_count(2)
        await expect(page.locator("svg.chart circle.status-fault")).to_have_count(1)
        meters = page.get_by_role("region", name="Meters")
        await expect(meters.get_by_role("cell", name="m-live", exact=True)).to_be_visible()
        await expect(page.locator(".stream-state")).to_have_text("Live updates: on", timeout=15_000)
        await tab.screenshot("vehicle")
        await page.evaluate("window.notReloaded = true")

        newer = vehicle("v-live", START + 46, soc=77.5, kwhDeliveredDc=0.0, batteryTemp=31.0)
        await publish_readings(settings.kafka_bootstrap_servers, topic, [newer])
        await expect(soc).to_have_text("77.5 %", timeout=30_000)
        await expect(page.locator("#live-reading [data-field=batteryTemp]")).to_have_text("31.0 °C")
        assert await page.evaluate("window.notReloaded === true")
        assert await page.locator("#live-reading").get_attribute("aria-live") == "polite"
        await tab.screenshot("vehicle-updated")
        await page.goto("about:blank")  # the operator leaves: the stream ends before the sidecar
    streams = [r.url for r in tab.requests if "/v1/stream" in r.url]
    assert streams and all(u.endswith("/v1/stream?vehicleId=v-live&kinds=live") for u in streams)


async def all_processed(db: asyncpg.Connection, topic: str, sent: int) -> bool:
    """Every message sent is stored and the sessions worker has no batch left to look at."""
    return await offsets_reach(db, topic, sent) and not await db.fetchval(
        "SELECT count(*) FROM batch_marks"
    )


async def test_acknowledging_an_open_alert_changes_its_state_in_the_database(
    settings: Settings, pool: asyncpg.Pool, db: asyncpg.Connection, tab: Tab
) -> None:
    """Two batteries overheat; acknowledging one from the alerts page makes its alert
    'acknowledged' in the database and takes it off the list; the other stays open."""
    readings = [
        vehicle(v, START + m, kwhDeliveredDc=0.0, batteryTemp=t)
        for v in ("v-hot-1", "v-hot-2")
        for m, t in enumerate((30.0, 56.0, 57.0))
    ]
    await ingest(settings, readings)
    await sessionize(pool, settings)

    async with sidecar(settings) as base:
        page = tab.page
        await page.goto(f"{base}/console/#/alerts")
        ack = page.get_by_role("button", name="Acknowledge Battery overheating on v-hot-1")
        await expect(ack).to_be_visible()
        await expect(page.get_by_role("row").filter(has_text="v-hot-2")).to_be_visible()
        await tab.screenshot("alerts")

        await ack.focus()
        await page.keyboard.press("Enter")  # the keyboard is enough
        await expect(page.get_by_role("status")).to_have_text(
            "Acknowledged: Battery overheating on v-hot-1."
        )
        await expect(page.get_by_role("row").filter(has_text="v-hot-1")).to_have_count(0)
        await expect(page.get_by_role("row").filter(has_text="v-hot-2")).to_be_visible()
        await tab.screenshot("alerts-acknowledged")

    states = dict(
        await db.fetch("SELECT subject, state FROM alerts WHERE kind = 'battery_overheat'")
    )
    assert states == {"v-hot-1": "acknowledged", "v-hot-2": "open"}


async def test_with_tokens_configured_the_console_asks_for_one_and_never_puts_it_in_a_url(
    settings: Settings, tab: Tab
) -> None:
    """With FLEET_API_TOKENS set the console opens on a token form showing the API's message;
    once a token is entered the overview loads, every /v1 request carries it in the
    Authorization header, and no URL the browser requested ever contains it."""
    token = TOKEN
    configured = settings.model_copy(update={"api_tokens": SecretStr(token), "api_auth": "tokens"})

    async with sidecar(configured) as base:
        page = tab.page
        response = await page.goto(f"{base}/")
        assert response is not None and response.ok, "the console's own files need no token"
        assert page.url.startswith(f"{base}/console/")
        await expect(page.get_by_text("a valid bearer token is required")).to_be_visible()
        field = page.get_by_label("API token", exact=True)
        await expect(field).to_be_focused()
        await tab.screenshot("token-prompt")

        await field.fill("not-the-token")
        # The message is on screen already: wait for the wrong token's answer itself, so the
        # form it brings back is not replaced while the right token is being typed.
        async with page.expect_response(
            lambda r: (
                "/v1/" in r.url and r.request.headers.get("authorization") == "Bearer not-the-token"
            )
        ) as refused:
            await page.keyboard.press("Enter")
        assert (await refused.value).status == 401
        await expect(page.get_by_label("API token", exact=True)).to_be_focused()
        await expect(page.get_by_text("a valid bearer token is required")).to_be_visible()
        await page.get_by_label("API token", exact=True).fill(token)
        await page.get_by_role("button", name="Use this token").click()
        await expect(page.get_by_role("heading", level=1)).to_have_text("Fleet efficiency")
        await expect(
            page.get_by_text("No linked vehicle has readings in this window.")
        ).to_be_visible()
        await page.get_by_role("link", name="Open alerts").click()
        await expect(page.get_by_text("No open alert.")).to_be_visible()
        await tab.screenshot("token-accepted")

        assert await page.evaluate("sessionStorage.length") == 1
        assert await page.evaluate("localStorage.length") == 0
        await page.get_by_role("button", name="Forget token").click()
        await expect(page.get_by_label("API token", exact=True)).to_be_visible()

        assert all(token not in r.url for r in tab.requests)
        api_calls = [r for r in tab.requests if "/v1/" in r.url]
        authorized = [(await r.all_headers()).get("authorization") for r in api_calls]
        assert f"Bearer {token}" in authorized
        assert set(authorized) <= {None, f"Bearer {token}", "Bearer not-the-token"}


async def test_the_consoles_stream_reader_parses_events_however_the_bytes_are_split(
    settings: Settings, tab: Tab
) -> None:
    """The console's own SSE parser (EventSource cannot send a bearer token) gives the same
    events whether the stream arrives whole or a character at a time: CRLF, LF and CR line
    ends, multi-line data, comments (keep-alives), and the last id carried on."""
    wire = (
        ": ping\r\n"
        'event: live\r\nid: 7\r\ndata: {"vehicleId":"v-1",\r\ndata: "soc":61.5}\r\n\r\n'
        "data:no space\n\n"
        'event: reset\rdata: {"reason": "replay window exceeded"}\r\r'
        "id: 9\nevent: alert\n: ping\ndata: x\n\n"
        "event: empty\n\n"
    )
    expected = [
        {"type": "live", "data": '{"vehicleId":"v-1",\n"soc":61.5}', "id": "7"},
        {"type": "message", "data": "no space", "id": "7"},
        {"type": "reset", "data": '{"reason": "replay window exceeded"}', "id": "7"},
        {"type": "alert", "data": "x", "id": "9"},
    ]
    async with sidecar(settings) as base:
        await tab.page.goto(f"{base}/console/#/alerts")
        parse = """async ([wire, step]) => {
            const { SseParser } = await import("./sse.js");
            const parser = new SseParser();
            const events = [];
            for (let i = 0; i < wire.length; i += step) events.push(...parser.push(wire.slice(i, i + step)));
            return events;
        }"""
        assert await tab.page.evaluate(parse, [wire, len(wire)]) == expected
        assert await tab.page.evaluate(parse, [wire, 1]) == expected
