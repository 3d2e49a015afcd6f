"""The dashboard page in a real headless Chromium (Debian's package) driven by playwright.

`retire-cluster main` and `retire-cluster worker` run as subprocesses, as a person
would start them; the page is loaded from the URL `main` prints. Skipped when
/usr/bin/chromium is missing (.ci/run installs it with apt-get). Never runs
`playwright install`: the browser is Debian's, given by executable_path.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO / "test-artifacts"
DEVICE = "pi-in-the-drawer"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"),
    pytest.mark.slow,
]


def api(url: str, token: str) -> dict:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)


def wait_for(probe, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout} s")
        time.sleep(0.1)


def test_dashboard_in_chromium(main_process, worker_process) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    main = main_process()
    line = next(x for x in main.output if x.startswith("dashboard and HTTP API: "))
    url = line.split()[4]
    worker_process(main, "--heartbeat-interval", "1", name=DEVICE)
    wait_for(lambda: [d for d in api(url + "api/v1/devices", main.token)["devices"] if d["device_id"] == DEVICE])
    ARTIFACTS.mkdir(exist_ok=True)

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            errors: list = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            requests: list = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(url)
            output, prompt, box = page.locator("#output"), page.locator("#prompt"), page.locator("#input")

            def typed(text: str) -> None:
                box.fill(text)
                box.press("Enter")

            # It asks for the token, refuses a wrong one, takes the right one.
            sync_api.expect(prompt).to_have_text("token:")
            assert box.get_attribute("type") == "password"
            sync_api.expect(output).to_contain_text("needs its cluster token")
            typed("not-the-token")
            sync_api.expect(output).to_contain_text("refused")
            typed(main.token)
            sync_api.expect(prompt).to_have_text("rc>")
            sync_api.expect(output).to_contain_text("1 online")
            assert page.evaluate("sessionStorage.getItem('rc-token')") == main.token

            # `devices` shows the test worker; so does the device grid.
            typed("devices")
            sync_api.expect(output).to_contain_text(DEVICE)
            assert "+---" in output.inner_text()
            sync_api.expect(page.locator(f'#grid [data-device-id="{DEVICE}"]')).to_contain_text("online")

            # A submitted sleep task: progress and result arrive over SSE.
            typed("submit sleep seconds=3 --watch")
            live = page.locator("pre.live").last
            sync_api.expect(live).to_contain_text("output: slept 3 s", timeout=30_000)
            watched = live.inner_text()
            task_id = re.search(r"watching (\w+)", watched).group(1)
            percents = [int(x) for x in re.findall(r"running\s+\[[#-]+\]\s+(\d+)%", watched)]
            assert any(0 < pct < 100 for pct in percents), watched
            assert page.evaluate("window.rc.stats.events.tasks") > 0

            # Tab completes the task id.
            box.fill(f"task {task_id[:5]}")
            box.press("Tab")
            assert box.input_value() == f"task {task_id} ", page.evaluate("[window.rc.state.taskOrder, document.activeElement.id]")
            box.press("Enter")
            sync_api.expect(output).to_contain_text("slept 3 s")
            box.fill("dev")
            box.press("Tab")
            assert box.input_value() == "devices "
            box.fill("")
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

            # A stray word is refused with one sentence naming it, on the main node and on the page.
            typed("grid x")
            sync_api.expect(output).to_contain_text("unexpected word 'x' after `grid`; usage: grid")
            typed("clear now")
            sync_api.expect(output).to_contain_text("unexpected word 'now' after `clear`; usage: clear")

            # Themes switch by command and by button, and survive a reload (as does the token).
            typed("theme amber")
            sync_api.expect(page.locator("body")).to_have_class(re.compile("theme-amber"))
            assert page.evaluate("getComputedStyle(document.body).backgroundColor") == "rgb(12, 8, 0)"
            page.screenshot(path=str(ARTIFACTS / "dashboard-amber.png"))
            page.locator('button[data-theme="blue"]').click()
            sync_api.expect(page.locator("body")).to_have_class(re.compile("theme-blue"))
            box.press("ArrowUp")
            assert box.input_value() == "theme amber"
            page.reload()
            sync_api.expect(prompt).to_have_text("rc>")
            sync_api.expect(page.locator("body")).to_have_class(re.compile("theme-blue"))
            box.press("ArrowUp")
            assert box.input_value() == "theme amber"  # history is in localStorage

            assert errors == []
            outside = [u for u in requests if not u.startswith(url) and not u.startswith("data:")]
            assert outside == [], outside  # nothing fetched from outside: no CDN
        finally:
            browser.close()
