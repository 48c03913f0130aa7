"""The admin page in real headless Chromium (Debian's, driven by Playwright)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from provisioning.demo import DEMO_USERS
from tests.cabinet_driver import session

pytestmark = pytest.mark.timeout(180)

ALICE, BOB = DEMO_USERS[0].badge, DEMO_USERS[1].badge
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    exe = os.environ.get("SMARTCAB_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(exe):
        pytest.fail("chromium is not installed (apt-get install chromium; .ci/run does)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_FLAGS)
        yield b
        b.close()


def login(page, url: str, password: str) -> None:
    page.goto(url + "/")
    assert "/login" in page.url  # everything but the kiosk needs a login
    page.fill("input[name=username]", "admin")
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    page.wait_for_selector("#dashboard")


def test_login_and_see_the_transaction(browser, broker, demo_factory):
    demo = demo_factory(broker.port)
    session(demo, BOB, remove=["M-0007"])
    session(demo, ALICE, remove=["D-0042"], add=["M-0007"])
    page = browser.new_page()
    page.goto(demo.url + "/")
    page.fill("input[name=username]", "admin")
    page.fill("input[name=password]", "wrong password")
    page.click("button[type=submit]")
    assert page.locator("[role=alert]").inner_text() == "Wrong username or password."
    login(page, demo.url, demo.admin_password)
    activity = page.locator("#activity").inner_text()
    assert "Alice Martin took D-0042 (Cordless drill 18V)" in activity
    assert "Alice Martin returned M-0007 (Digital multimeter)" in activity
    assert "Bob Nguyen took M-0007" in activity
    out = page.locator("#units-out").inner_text()
    assert "D-0042" in out and "Alice Martin" in out and "M-0007" not in out
    page.goto(demo.url + "/events?type=unit_taken")
    rows = page.locator("#events tbody tr").all_inner_texts()
    assert len(rows) == 2 and all("took" in r for r in rows)
    page.goto(demo.url + "/users")
    assert "Carol Diaz" in page.locator("#users").inner_text()
    page.close()


def test_simulator_panel_drives_a_transaction(browser, demo_factory):
    demo = demo_factory()
    page = browser.new_page()
    login(page, demo.url, demo.admin_password)
    page.wait_for_selector("#sim-inside .chip")
    page.select_option("#sim-badge", ALICE)
    page.click("#sim-tap")
    page.wait_for_function(
        "document.querySelector('#tile-state b').innerText === 'unlocked'", timeout=10000
    )
    page.click("#sim-open")
    page.wait_for_function(
        "document.querySelector('#tile-state b').innerText === 'open'", timeout=10000
    )
    from tests.cabinet_driver import epc_of

    page.click(f"#sim-inside .chip[data-epc='{epc_of(demo, 'TW-0003')}']")
    page.wait_for_selector(f"#sim-outside .chip[data-epc='{epc_of(demo, 'TW-0003')}']")
    page.click("#sim-close")
    page.wait_for_function(
        "document.querySelector('#activity').innerText.includes('Alice Martin took TW-0003')",
        timeout=15000,
    )
    page.screenshot(path=str(demo.data_dir / "dashboard.png"), full_page=True)
    page.close()


def test_kiosk_needs_no_login_and_hostile_input_is_escaped(browser, demo_factory):
    demo = demo_factory()
    page = browser.new_page()
    page.goto(demo.url + "/kiosk")
    assert page.locator("h1").inner_text() == "Tap your badge"
    # A user name with markup must show as text, never run.
    store = demo.app.open_store()
    with store.write():
        uid = store.add_user("<img src=x onerror=alert(1)>Eve")
        store.add_badge("0E0E0E0E", uid)
    store.close()
    session(demo, "0E0E0E0E", remove=["CT-0001"])
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    login(page, demo.url, demo.admin_password)
    assert "<img src=x onerror=alert(1)>Eve took CT-0001" in page.locator("#activity").inner_text()
    assert dialogs == []
    # A POST without the form token is refused.
    status = page.evaluate("fetch('/logout', {method: 'POST'}).then(r => r.status)")
    assert status == 400
    page.close()
