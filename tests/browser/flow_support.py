"""Helpers for the browser flows: hosts and templates, a page watcher, libvirt tidy-up."""

from __future__ import annotations

import contextlib
import html
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth.models import User
from playwright.sync_api import Page, Response, Route, expect

from provisioning.hypervisor import operations, storage
from provisioning.hypervisor.connection import Hypervisor, get_hypervisor
from provisioning.hypervisor.errors import HypervisorError
from provisioning.models import Guest, GuestTemplate, Host, Media, StoragePool
from provisioning.services.consoles import console_log_path
from vmportal import heartbeat

TEST_URI = "test+unix:///default"
TEST_POOL = "default-pool"
QEMU_URI = "qemu:///system"
LOCAL = "local"  # the host name whose queue (hv.local) the stack's worker serves
# Placement counts every other domain on a host against it (the test driver's own "test" domain
# has 8 GiB; other tests' guests share both drivers): room to spare, so only our guests matter.
ROOMY = {"capacity_vcpus": 1024, "capacity_memory_mib": 1 << 20}

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


# --- hosts, templates and guests ------------------------------------------------------------


@contextlib.contextmanager
def driver_host() -> Iterator[Host]:
    """The local host on the shared test driver; its guests' domains and volumes go afterwards."""
    hv = get_hypervisor(TEST_URI)  # held open so the driver keeps its state between calls
    host = Host.objects.create(name=LOCAL, uri=TEST_URI, **ROOMY)
    StoragePool.objects.create(host=host, name=TEST_POOL, path=f"/{TEST_POOL}")
    try:
        yield host
    finally:
        # Only what this test's guests made: other tests may share the driver at the same time.
        guests = list(Guest.objects.filter(host=host))
        for guest in guests:
            operations.destroy(hv, str(guest.uuid))
            operations.undefine(hv, str(guest.uuid))
        disks = {f"{g.name}-{g.uuid.hex[:8]}" for g in guests}
        for volume in storage.list_volumes(hv, TEST_POOL):
            if volume.name.split(".")[0] in disks:
                storage.delete_volume(hv, TEST_POOL, volume.name)


def kernel_template(host: Host, name: str = "Tiny (test driver)") -> GuestTemplate:
    """A direct-kernel-boot install template on `host` (paths the test driver never reads)."""
    media = Media.objects.create(
        name=f"tiny for {name}",
        kind=Media.Kind.KERNEL,
        kernel_path="/var/lib/libvirt/boot/vmportal/tiny-vmlinuz",
        initrd_path="/var/lib/libvirt/boot/vmportal/tiny-initrd.img",
    )
    return GuestTemplate.objects.create(
        name=name,
        description="A tiny guest on libvirt's test driver.",
        method=GuestTemplate.Method.KERNEL,
        media=media,
        pool=StoragePool.objects.get(host=host, name=TEST_POOL),
        kernel_cmdline="console=ttyS0 vmportal.install=1",
        memory_mib_default=256,
        disk_mib_min=64,
        disk_mib_default=64,
        install_timeout_minutes=5,
    )


def make_guest(owner: User, template: GuestTemplate, name: str) -> Guest:
    """A running guest row (no libvirt domain): enough for pages that only list guests."""
    assert template.pool is not None
    return Guest.objects.create(
        owner=owner,
        host=template.pool.host,
        template=template,
        template_version=template.version,
        name=name,
        state=Guest.State.RUNNING,
        persistent=True,
    )


def listener_connected() -> bool:
    """True once a listener process reports a live libvirt subscription."""
    return any(i.get("connected") for i in heartbeat.alive("listener").values())


def remove_qemu_guest(hv: Hypervisor, name: str, pool: str) -> None:
    """Destroy and undefine the domain called name; remove its volumes, save and log files."""
    uuids = {str(u) for u in Guest.objects.filter(name=name).values_list("uuid", flat=True)}
    info = operations.find_by_name(hv, name)
    if info is not None:
        uuids.add(info.uuid)
        operations.destroy(hv, info.uuid)
        operations.undefine(hv, info.uuid)
    with contextlib.suppress(HypervisorError):  # no pool: nothing of ours is left in it
        for volume in storage.list_volumes(hv, pool):
            if volume.name.startswith(f"{name}-"):
                storage.delete_volume(hv, pool, volume.name)
    for uuid in uuids:
        for path in (console_log_path(uuid), Path(settings.SAVE_DIR) / f"{uuid}.save"):
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
