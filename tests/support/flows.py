"""Helpers for the browser flows: a page watcher, the guest form, libvirt tidy-up.

Hosts, templates and guests come from tests/factories.py and the fixtures in tests/conftest.py.
"""

from __future__ import annotations

import contextlib
import html
import re
import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from django.conf import settings
from playwright.sync_api import Page, Response, Route, expect

from provisioning.hypervisor import operations, storage
from provisioning.hypervisor.connection import Hypervisor
from provisioning.hypervisor.errors import HypervisorError
from provisioning.models import Guest, GuestTemplate, Job
from provisioning.services.consoles import console_log_path
from provisioning.services.provision.spec import data_volume, seed_volume, system_volume
from vmportal import heartbeat

# Runs in every document the page loads: a mark that a reload would wipe, the SSE connections
# htmx opened, and every SSE message as it arrived (before htmx swaps it in).
RECORDER_JS = """
window.__flow = {mark: null, sseOpen: 0, messages: [], swaps: []};
document.addEventListener('htmx:sseOpen', () => { window.__flow.sseOpen += 1; });
document.addEventListener('htmx:sseBeforeMessage', (e) => {
  window.__flow.messages.push({type: e.detail.type, data: e.detail.data, at: Date.now()});
});
document.addEventListener('htmx:beforeSwap', (e) => {
  window.__flow.swaps.push({
    url: e.detail.pathInfo.requestPath, status: e.detail.xhr.status,
    data: e.detail.serverResponse, at: Date.now(),
  });
});
"""

# Sets window.__flowSeen[key] to the page's clock the moment selector's data-state is `state`.
OBSERVE_JS = """
([key, selector, state]) => {
  window.__flowSeen = window.__flowSeen || {};
  const check = () => {
    const el = document.querySelector(selector);
    if (el && el.dataset.state === state && !window.__flowSeen[key]) {
      window.__flowSeen[key] = Date.now();
      observer.disconnect();
    }
  };
  const observer = new MutationObserver(check);
  observer.observe(document.body, {subtree: true, childList: true, attributes: true});
  check();
}
"""

STATE_RE = re.compile(r'id="request-state">([^<]*)<')
BADGE_RE = re.compile(r'id="(?:guest|request)-state">([^<]*)<|data-state="([^"]*)"')
CONSOLE_RE = re.compile(r'<pre class="console" id="console">(.*?)</pre>', re.S)


def new_name(prefix: str) -> str:
    """A guest name no earlier run used."""
    return f"{prefix}{secrets.token_hex(3)}"


# --- processes and libvirt -----------------------------------------------------------------


def listener_connected() -> bool:
    """True once a listener process reports a live libvirt subscription."""
    return any(i.get("connected") for i in heartbeat.alive("listener").values())


def remove_qemu_guest(hv: Hypervisor, name: str, pool: str) -> None:
    """Destroy and undefine the guest called name; remove its disks, save and log files.

    Only what carries that guest's UUID: the pool's folder is shared with every libvirtd on
    the machine.
    """
    guests = {g.uuid: g for g in Guest.objects.filter(name=name)}
    info = operations.find_by_name(hv, name)
    if info is not None:
        guests.setdefault(uuid.UUID(info.uuid), Guest(name=name, uuid=uuid.UUID(info.uuid)))
        operations.destroy(hv, info.uuid)
        operations.undefine(hv, info.uuid)
    for guest in guests.values():
        for volume in (system_volume(guest), data_volume(guest), seed_volume(guest)):
            with contextlib.suppress(HypervisorError):  # no pool: nothing of ours is in it
                storage.delete_volume(hv, pool, volume)
        for path in (console_log_path(guest.uuid), Path(settings.SAVE_DIR) / f"{guest.uuid}.save"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


# --- the browser ----------------------------------------------------------------------------


@dataclass
class Watch:
    """What a page did: documents loaded, event streams opened, polls refused, SSE messages."""

    page: Page
    loads: int = 0
    streams: list[tuple[str, int]] = field(default_factory=list)
    blocked_polls: list[str] = field(default_factory=list)

    def mark(self) -> int:
        """Mark the current document once loaded (a reload would wipe it); the loads so far."""
        self.page.wait_for_load_state("load")
        self.page.evaluate("window.__flow.mark = 'still-here'")
        return self.loads

    def assert_not_reloaded(self, since_loads: int) -> None:
        """The document marked by `mark` is still the one shown, and nothing loaded since."""
        assert self.loads == since_loads, f"{self.loads - since_loads} page load(s) happened"
        assert self.page.evaluate("window.__flow.mark") == "still-here"

    def sse_opened(self) -> int:
        """How many event streams htmx opened in the current document."""
        return int(self.page.evaluate("window.__flow.sseOpen"))

    def messages(self) -> list[dict[str, Any]]:
        """The SSE messages the current document received, oldest first."""
        return list(self.page.evaluate("window.__flow.messages"))

    def streamed_statuses(self) -> list[str]:
        """The request statuses the request page's event stream delivered, in order."""
        found = (STATE_RE.search(m["data"]) for m in self.messages() if m["type"] == "status")
        return [html.unescape(m.group(1)).strip() for m in found if m]

    def streamed_consoles(self) -> list[tuple[str, str]]:
        """(status, console text) of every streamed request-status that carried a console."""
        pairs = []
        for m in self.messages():
            state, console = STATE_RE.search(m["data"]), CONSOLE_RE.search(m["data"])
            if state and console:
                pairs.append((html.unescape(state.group(1)), html.unescape(console.group(1))))
        return pairs

    def timeline(self) -> str:
        """What reached the current document and when: SSE messages and htmx responses."""
        events = [("sse " + m["type"], m["at"], m["data"]) for m in self.messages()]
        swaps = self.page.evaluate("window.__flow.swaps")
        events += [(f"xhr {s['status']} {s['url']}", s["at"], s["data"]) for s in swaps]
        lines = []
        for what, at, data in sorted(events, key=lambda e: e[1]):
            found = BADGE_RE.search(data or "")
            state = (found.group(1) or found.group(2)) if found else "-"
            lines.append(f"{at:.0f} {what}: {state}")
        return "\n".join(lines)

    @contextlib.contextmanager
    def explaining(self) -> Iterator[None]:
        """Add the timeline to a failed expectation, to tell a missed event from a stale swap."""
        try:
            yield
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- what the page received:\n{self.timeline()}") from exc

    def stream_responses(self, path: str) -> list[int]:
        """HTTP statuses of the event-stream responses for `path`."""
        return [status for url, status in self.streams if url.endswith(path)]


def watch(page: Page, *, block_request_polling: bool = False) -> Watch:
    """Watch `page`; optionally refuse the request page's htmx polls so only SSE is left."""
    w = Watch(page)
    page.add_init_script(RECORDER_JS)

    def loaded(_page: Page) -> None:
        w.loads += 1

    def responded(response: Response) -> None:
        if response.url.endswith("/events"):
            w.streams.append((response.url, response.status))

    page.on("load", loaded)
    page.on("response", responded)
    if block_request_polling:

        def no_polling(route: Route) -> None:
            if route.request.headers.get("hx-request") == "true":
                w.blocked_polls.append(route.request.url)
                route.abort()
            else:
                route.continue_()

        page.route(re.compile(r"/requests/\d+/$"), no_polling)
    return w


def observe_state(page: Page, key: str, selector: str, state: str) -> None:
    """Start timing: the page notes when `selector` first carries data-state=`state`."""
    page.evaluate(OBSERVE_JS, [key, selector, state])


def seen_at_ms(page: Page, key: str, *, timeout_ms: float) -> float:
    """The page-clock time (ms since the epoch) `observe_state` saw its state, waiting for it."""
    handle = page.wait_for_function(
        "key => window.__flowSeen && window.__flowSeen[key]", arg=key, timeout=timeout_ms
    )
    return float(handle.json_value())


def ask_for_guest(page: Page, template_name: str, name: str, **sizes: str) -> Response:
    """From the dashboard: New guest, pick the template's card, fill the form, submit; the POST."""
    page.get_by_role("link", name="New guest").click()
    page.locator("a.template-card", has_text=template_name).click()
    expect(page.get_by_role("heading", name=template_name)).to_be_visible()
    page.get_by_label("Name", exact=True).fill(name)
    labels = {"vcpus": "vCPUs", "memory_mib": "Memory (MiB)", "disk_mib": "Disk (MiB)"}
    for key, value in sizes.items():
        page.get_by_label(labels[key]).fill(value)
    with page.expect_response(lambda r: r.request.method == "POST") as posted:
        page.get_by_role("button", name="Create guest").click()
    return posted.value


def landed_on_request(page: Page) -> int:
    """Wait for the request page the form redirects to; its request id."""
    expect(page).to_have_url(re.compile(r"/requests/\d+/$"))
    found = re.search(r"/requests/(\d+)/$", page.url)
    assert found is not None
    return int(found.group(1))


# Under TCG a lifecycle action's job ends in seconds; generous for a loaded machine.
ACTION_MS = 60_000


@dataclass
class Demo:
    """The demo template on QEMU_URI and the guest names to remove afterwards."""

    hv: Hypervisor
    template: GuestTemplate
    names: list[str] = field(default_factory=list)

    def new_name(self) -> str:
        name = new_name("vmportal-bf-")
        self.names.append(name)
        return name


def act(page: Page, seen: Watch, action: str, state: str) -> None:
    """Press an action button on the guest page and wait for the state badge and the buttons."""
    page.locator(f'[data-action="{action}"]').click()
    with seen.explaining():
        expect(page.locator("#guest-messages")).to_have_text(f"{Job.Kind(action).label} queued.")
        expect(page.locator("#guest-state")).to_have_text(state, timeout=ACTION_MS)
        # The buttons come back once the job is over.
        expect(page.locator("[data-action]").first).to_be_visible(timeout=ACTION_MS)
