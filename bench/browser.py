"""event_to_dom_p95_ms: a libvirt lifecycle event to the updated badge in Chromium.

A guest runs on the test driver; its owner has the dashboard open in Debian's Chromium (driven by
Playwright). The bench suspends and resumes the domain straight through libvirt, as `virsh
suspend` would, so the portal learns of it only by the lifecycle event: listener, database,
Redis pub/sub, the dashboard's SSE stream, htmx's swap. A MutationObserver in the page stamps
Date.now() when the row's badge shows the new state; both clocks are this machine's.
"""

from __future__ import annotations

import shutil
import time
from typing import Any

from bench.common import p95
from bench.context import Context
from bench.stack import PASSWORD, TEST_URI

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# Records every state the badge takes, with the page's clock, from the moment it is installed.
RECORD_JS = """
(selector) => {
  window.__states = [];
  let last = null;
  const check = () => {
    const el = document.querySelector(selector);
    const state = el ? el.dataset.state : null;
    if (state !== last) { last = state; window.__states.push({state, at: Date.now()}); }
  };
  new MutationObserver(check).observe(document.body,
    {subtree: true, childList: true, attributes: true, attributeFilter: ['data-state']});
  check();
}
"""
SSE_OPEN_JS = """
window.__sseOpen = 0;
document.addEventListener('htmx:sseOpen', () => { window.__sseOpen += 1; });
"""
SEEN_JS = """
([state, since]) => (window.__states || []).find(s => s.state === state && s.at >= since) || null
"""


def _target(ctx: Context) -> Any:
    from bench.common import wait_for
    from provisioning.models import ProvisioningRequest
    from provisioning.services.provision import Overrides, request_submit

    made = request_submit(
        owner=ctx.seed.watcher, template=ctx.seed.persistent, overrides=Overrides(name="watched")
    )
    wait_for(
        lambda: ProvisioningRequest.objects.get(pk=made.pk).status == "running",
        timeout=60,
        what="the watched guest to run",
    )
    assert made.guest is not None
    ctx.made.domain(TEST_URI, str(made.guest.uuid))
    return made.guest


def _measure(page: Any, hv: Any, uuid: str, state: str) -> float:
    from provisioning.hypervisor import operations

    since = time.time() * 1000
    if state == "paused":
        operations.suspend(hv, uuid)
    else:
        operations.resume(hv, uuid)
    seen = page.wait_for_function(SEEN_JS, arg=[state, since], timeout=30_000).json_value()
    return float(seen["at"]) - since


def run(ctx: Context) -> dict[str, Any]:
    """Suspend and resume the watched guest; each badge change is one sample."""
    from playwright.sync_api import sync_playwright

    from provisioning.hypervisor.connection import get_hypervisor

    guest = _target(ctx)
    uuid = str(guest.uuid)
    hv = get_hypervisor(TEST_URI)
    samples: list[float] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page()
            page.add_init_script(SSE_OPEN_JS)
            page.goto(f"{ctx.stack.base_url}/accounts/login/")
            page.get_by_label("Username").fill("bench-watcher")
            page.get_by_label("Password").fill(PASSWORD)
            page.get_by_role("button", name="Log in").click()
            page.wait_for_selector(f"#guest-{uuid} [data-state='running']")
            page.wait_for_function("window.__sseOpen > 0", timeout=15_000)
            page.evaluate(RECORD_JS, f"#guest-{uuid} [data-state]")
            # One unrecorded round: the stream subscribes just after htmx reports it open.
            _measure(page, hv, uuid, "paused")
            _measure(page, hv, uuid, "running")
            for _ in range(ctx.runs(10, 30)):
                samples.append(_measure(page, hv, uuid, "paused"))
                samples.append(_measure(page, hv, uuid, "running"))
        finally:
            browser.close()
    return {
        "figures": {"event_to_dom_p95_ms": p95(samples)},
        "details": {"event_to_dom_ms": samples, "event_to_dom_samples": len(samples)},
    }
