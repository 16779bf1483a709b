"""Operators teach it, in Chromium: a false alarm marked normal on the page scores lower
when sent again, one audit line is written, the bank id changes, and undo restores both.

Needs Debian's ``chromium`` and Playwright (skips without them, except under CI).
"""

from __future__ import annotations

import httpx
import pytest

from anomalyclip.inspection.bank import bank_id
from benchmarks.load_test import ServerProcess, free_port, random_server_command
from tests.browser import CHROMIUM, CHROMIUM_ARGS, require_browser
from tests.helpers import noise_png

pytestmark = pytest.mark.browser


def test_marking_a_false_alarm_normal_teaches_the_stream_and_undo_restores(tmp_path):
    require_browser()
    from playwright.sync_api import expect, sync_playwright

    part = tmp_path / "part_017.png"
    part.write_bytes(noise_png(seed=17))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with (
        ServerProcess(random_server_command(port), url),
        sync_playwright() as playwright,
    ):
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True,
            args=CHROMIUM_ARGS,
        )  # fmt: skip
        try:
            page = context.new_page()
            page.set_default_timeout(60_000)
            page.goto(url)
            rows = page.locator("#stream-results tr.stream-row")
            page.set_input_files("#stream-input", [str(part)])
            expect(rows).to_have_count(1)
            first = float(rows.nth(0).get_attribute("data-score"))
            sha = rows.nth(0).get_attribute("data-sha256")
            expect(page.locator("#stream-bank")).to_have_attribute("data-bank-id", "empty")

            rows.nth(0).locator(".mark-normal").click()
            taught = bank_id([sha])
            expect(page.locator("#stream-bank")).to_have_attribute("data-bank-id", taught)
            audit = httpx.get(f"{url}/v1/streams/line/audit").json()
            assert len(audit) == 1
            assert (audit[0]["verdict"], audit[0]["image_sha256"]) == ("normal", sha)
            assert (audit[0]["bank_before"], audit[0]["bank_after"]) == ("empty", taught)

            page.set_input_files("#stream-input", [str(part)])
            expect(rows).to_have_count(2)
            again = float(rows.nth(0).get_attribute("data-score"))
            assert again < first - 0.01  # now compared with itself among the good parts

            page.click("#stream-undo")
            expect(page.locator("#stream-bank")).to_have_attribute("data-bank-id", "empty")
            page.set_input_files("#stream-input", [str(part)])
            expect(rows).to_have_count(3)
            assert float(rows.nth(0).get_attribute("data-score")) == pytest.approx(first, abs=1e-6)
            audit = httpx.get(f"{url}/v1/streams/line/audit").json()
            assert [entry["verdict"] for entry in audit] == ["normal", "undo"]
            assert audit[1]["bank_after"] == "empty"
        finally:
            context.close()
