"""Driving the console in a real browser: Debian's chromium through Playwright, one browser per module.

`Visit` is one signed-in tab at a given width that records every console error, uncaught page error and
failed request (a response of 400 or more counts unless the test said it expects it), and checks each page
with axe-core (vendored from npm: `axe.min.js`, MPL-2.0, version in axe.VERSION) for serious or critical
violations.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
AXE = (Path(__file__).parent / "axe.min.js").read_text()
WIDTHS = {"desktop": 1280, "phone": 390}
SHOTS = os.environ.get("KEEL_CONSOLE_SCREENSHOTS")  # a folder: `make console-screenshots` writes docs/console


class Visit:
    """One browser context (its own cookies) at `width` px, signed in to the console at `base`."""

    def __init__(self, browser: Any, base: str, width: int) -> None:
        self.base = base
        self.context = browser.new_context(viewport={"width": width, "height": 900})
        self.page = self.context.new_page()
        self.page.set_default_timeout(15_000)
        self.problems: list[str] = []
        self.expected_status: set[tuple[str, int]] = set()
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda exc: self.problems.append(f"page error: {exc}"))
        self.streamed: set[str] = set()
        self.page.on("requestfailed", self._failed)
        self.page.on("response", self._response)

    def _failed(self, req: Any) -> None:
        path = req.url.removeprefix(self.base).split("?")[0]
        if path in self.streamed and req.failure == "net::ERR_ABORTED":
            return  # chromium may mark a fully read fetch stream aborted when the page moves on (see `streams`)
        if path.endswith("/static/favicon.svg") and req.failure == "net::ERR_ABORTED":
            return  # the browser's own icon fetch, cut short when a test moves on quickly (not the page's request)
        self.problems.append(f"request failed: {req.method} {req.url} {req.failure} (on {self.page.url})")

    def streams(self, path: str) -> None:
        """`path` answers with a stream its page reads to the end with fetch; chromium sometimes reports such a
        request aborted when the page later navigates, though its body was read. The test must check that the
        stream's last event arrived."""
        self.streamed.add(path)

    def _console(self, msg: Any) -> None:
        if msg.type == "error":
            if any(msg.text.endswith(f"status of {s} ()") or f"status of {s}" in msg.text
                   for _, s in self.expected_status):
                return  # chromium's own line for a response the test expects (e.g. the not-found page)
            self.problems.append(f"console error: {msg.text}")

    def _response(self, response: Any) -> None:
        path = response.url.removeprefix(self.base)
        if response.status >= 400 and (path.split("?")[0], response.status) not in self.expected_status:
            self.problems.append(f"{response.status} for {response.url}")

    def expect(self, path: str, status: int) -> None:
        self.expected_status.add((path, status))

    def sign_in_with_key(self, key: str) -> None:
        self.page.goto(self.base + "/console/")
        self.page.get_by_role("textbox", name="API key").fill(key)
        self.page.get_by_role("button", name="Sign in with key").click()
        self.page.wait_for_url("**/console/overview")

    def sign_in_with_password(self, email: str, password: str) -> None:
        self.page.goto(self.base + "/console/sign-in")
        self.page.get_by_role("textbox", name="Email").fill(email)
        self.page.get_by_label("Password", exact=True).fill(password)
        self.page.get_by_role("button", name="Sign in", exact=True).click()
        self.page.wait_for_url("**/console/overview")

    def open(self, path: str) -> Any:
        response = self.page.goto(self.base + path)
        self.page.wait_for_load_state("load")
        return response

    def nav(self) -> list[str]:
        return self.page.get_by_role("navigation", name="Console").get_by_role("link").all_inner_texts()

    def check_accessibility(self) -> None:
        """axe-core on the page as it is now: no serious or critical violation."""
        self.page.evaluate(AXE)  # through the DevTools protocol: the page's CSP still forbids any other script
        result = self.page.evaluate("async () => JSON.stringify(await axe.run(document, "
                                    "{resultTypes: ['violations']}))")
        bad = [v for v in json.loads(result)["violations"] if v["impact"] in ("serious", "critical")]
        assert not bad, f"{self.page.url}: " + "; ".join(
            f"{v['id']} ({v['impact']}): {v['help']} at {[n['target'] for n in v['nodes'][:3]]}" for v in bad)

    def shot(self, name: str) -> None:
        """A full-page screenshot `name`.png into $KEEL_CONSOLE_SCREENSHOTS, when it is set."""
        if SHOTS:
            Path(SHOTS).mkdir(parents=True, exist_ok=True)
            self.page.screenshot(path=str(Path(SHOTS) / f"{name}.png"), full_page=True)

    def visit_all(self, shots: bool = False) -> list[str]:
        """Every page the navigation offers, each loaded, on screen with its heading, and accessible (and with
        `shots`, each page's screenshot under its path's name)."""
        labels = self.nav()
        for label in labels:
            link = self.page.get_by_role("navigation", name="Console").get_by_role("link", name=label, exact=True)
            href = link.get_attribute("href")
            link.click()
            self.page.wait_for_url(self.base + href)
            self.page.wait_for_load_state("load")
            assert self.page.get_by_role("heading", level=1).count() == 1, (self.page.url, self.page.content()[:3000])
            self.check_accessibility()
            if shots:
                self.shot(href.rsplit("/", 1)[1])
        return labels

    def close(self) -> None:
        self.context.close()
        assert not self.problems, "\n".join(self.problems)
