"""The guest's consoles in real Chromium: type into the serial terminal, see the screen in noVNC.

The whole stack runs (web, worker, listener, beat) on this process's libvirtd with a tiny demo
guest installed through the pages. Everything the user sees arrives through the portal's own
WebSockets; every refusal is tried from the browser (and the wrong Origin from a WebSocket client
that can send one, against the same server).
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone
from playwright.sync_api import Page, expect
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from provisioning.hypervisor import operations
from provisioning.hypervisor.types import GuestState
from provisioning.models import ConsoleSession, Guest
from provisioning.services import consoles
from provisioning.services.demo import DEMO_TEMPLATE_NAME
from tests.factories import PASSWORD
from tests.support.browser import log_in
from tests.support.flows import (
    Demo,
    act,
    ask_for_guest,
    landed_on_request,
    listener_connected,
    watch,
)
from tests.support.stack import ARTIFACTS, Stack, wait_until
from tests.support.terminal import (
    COUNT_LINES_JS,
    STEP_MS,
    TERMINAL,
    lines,
    run_in_terminal,
    terminal_state,
)

pytestmark = [pytest.mark.browser, pytest.mark.qemu, pytest.mark.timeout(300)]

INSTALL_MS = 120_000
BOOT_MS = 90_000
SCREEN = "[data-screen]"

# Pixels of the noVNC canvas that are not black.
LIT_PIXELS_JS = """
() => {
  const canvas = document.querySelector('[data-screen] canvas');
  if (!canvas || !canvas.width || !canvas.height) return 0;
  const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  let lit = 0;
  for (let i = 0; i < data.length; i += 4) if (data[i] | data[i + 1] | data[i + 2]) lit++;
  return lit;
}
"""
MINT_JS = """
async (url) => {
  const csrf = (document.cookie.match(/(?:^|; )csrftoken=([^;]+)/) || [])[1] || '';
  const answer = await fetch(url, {method: 'POST', headers: {'X-CSRFToken': csrf}});
  return [answer.status, await answer.json().catch(() => ({}))];
}
"""
# Open a socket, count what it receives, resolve with its close.
OPEN_JS = """
(url) => new Promise((resolve) => {
  const ws = new WebSocket('ws://' + location.host + url);
  ws.binaryType = 'arraybuffer';
  let messages = 0;
  ws.onmessage = () => { messages++; if (messages >= 1 && url.includes('graphics')) ws.close(); };
  ws.onclose = (e) => resolve({code: e.code, reason: e.reason, messages});
})
"""


def mint(page: Page, uuid: str, kind: str) -> tuple[int, dict[str, object]]:
    status, body = page.evaluate(MINT_JS, f"/guests/{uuid}/console/{kind}/token")
    return int(status), body


def test_a_user_types_into_the_serial_terminal_and_sees_the_screen_through_the_portal(
    qemu_stack: Stack, demo: Demo, make_user, page: Page
) -> None:
    make_user("ann")
    make_user("bob")
    qemu_stack.start("listener", "worker", "beat", "web")
    wait_until(listener_connected, timeout=30, what="the listener to subscribe to libvirt")
    base = qemu_stack.base_url
    seen = watch(page)
    log_in(page, base, "ann", PASSWORD)
    name = demo.new_name()
    assert ask_for_guest(page, DEMO_TEMPLATE_NAME, name).status == 302
    landed_on_request(page)
    # The request page's read-only log is kept scrolled to its newest line as it grows.
    page.wait_for_function(
        """() => { const c = document.getElementById('console');
                   return c && c.scrollHeight > c.clientHeight + 20
                     && c.scrollHeight - c.scrollTop - c.clientHeight < 4; }""",
        timeout=INSTALL_MS,
    )
    with seen.explaining():
        expect(page.locator("#request-state")).to_have_text("Running", timeout=INSTALL_MS)
    guest = Guest.objects.get(name=name)
    uuid = str(guest.uuid)
    page.get_by_role("link", name=f"Open {name}").click()
    expect(page.locator("#guest-state")).to_have_text("Running")

    # --- the serial terminal: the boot log as scrollback, then a shell that answers ---
    terminal_state(page, "running")
    page.wait_for_function("() => (" + COUNT_LINES_JS + ")('VMPORTAL-READY') >= 1", timeout=BOOT_MS)
    run_in_terminal(page, "echo $((6*7))", "42")

    # --- copy and paste through the terminal's buttons; the terminal fits its box ---
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.evaluate("document.querySelector('[data-terminal]').terminal.selectAll()")
    page.locator(f"{TERMINAL} [data-console='copy']").click()
    copied = page.evaluate("navigator.clipboard.readText()")
    assert "echo $((6*7))" in copied and "\n42\n" in copied.replace("\r", ""), copied[-200:]
    page.evaluate("navigator.clipboard.writeText('echo $((2*21))\\n')")
    before = lines(page, "42")
    page.locator(f"{TERMINAL} [data-console='paste']").click()
    page.wait_for_function("(n) => (" + COUNT_LINES_JS + ")('42') > n", arg=before, timeout=STEP_MS)
    cols = page.evaluate("document.querySelector('[data-terminal]').terminal.cols")
    size = page.viewport_size or {"width": 1280, "height": 720}
    page.set_viewport_size({"width": 480, "height": size["height"]})
    page.wait_for_function(
        "(c) => document.querySelector('[data-terminal]').terminal.cols < c", arg=cols
    )
    page.set_viewport_size(size)
    page.wait_for_function(
        "(c) => document.querySelector('[data-terminal]').terminal.cols === c", arg=cols
    )

    # --- the screen: noVNC draws the guest's VGA text console ---
    expect(page.locator(SCREEN)).to_have_attribute("data-state", "running", timeout=STEP_MS)
    wait_until(lambda: page.evaluate(LIT_PIXELS_JS) > 500, timeout=30, what="a drawn screen")
    ARTIFACTS.mkdir(exist_ok=True)
    page.locator(SCREEN).screenshot(path=str(ARTIFACTS / "console-screen.png"))
    page.locator(TERMINAL).screenshot(path=str(ARTIFACTS / "console-terminal.png"))

    # --- refusals, from the browser: a replayed token, an expired one, a foreign user ---
    status, body = mint(page, uuid, "graphics")
    assert status == 200
    first = page.evaluate(OPEN_JS, body["url"])
    assert first["messages"] >= 1, first  # the first use shows the screen
    replay = page.evaluate(OPEN_JS, body["url"])
    assert (replay["code"], replay["messages"]) == (consoles.BAD_TOKEN, 0), replay
    assert "used already" in replay["reason"]
    status, body = mint(page, uuid, "graphics")
    ConsoleSession.objects.filter(opened__isnull=True).update(
        expires=timezone.now() - timedelta(seconds=1)
    )
    expired = page.evaluate(OPEN_JS, body["url"])
    assert (expired["code"], expired["messages"]) == (consoles.BAD_TOKEN, 0), expired
    assert "expired" in expired["reason"]
    _, anns = mint(page, uuid, "graphics")
    bob = page.context.browser.new_context().new_page()  # type: ignore[union-attr]
    log_in(bob, base, "bob", PASSWORD)
    status, _ = mint(bob, uuid, "serial")
    assert status == 404
    foreign = bob.evaluate(OPEN_JS, anns["url"])
    assert (foreign["code"], foreign["messages"]) == (consoles.NO_SUCH_GUEST, 0), foreign
    bob.context.close()
    # A wrong Origin, with ann's session: only a non-browser client can send one.
    _, body = mint(page, uuid, "graphics")
    cookie = "; ".join(f"{c['name']}={c['value']}" for c in page.context.cookies())
    host = base.removeprefix("http://")
    url = f"ws://{host}{body['url']}"
    headers = {"Cookie": cookie}
    with (
        ws_connect(url, origin="http://evil.example", additional_headers=headers) as client,  # type: ignore[arg-type]
        pytest.raises(ConnectionClosed) as closed,
    ):
        client.recv(timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == consoles.BAD_ORIGIN

    # --- pause and resume from the page: the terminal says so, then types again ---
    act(page, seen, "suspend", "Paused")
    terminal_state(page, "paused")
    expect(page.locator(f"{TERMINAL} .console-status")).to_contain_text("paused")
    act(page, seen, "resume", "Running")
    terminal_state(page, "running")
    run_in_terminal(page, "echo $((7*8))", "56")

    # --- a second session takes the console over; the first is told, and can take it back ---
    other = page.context.new_page()
    other.goto(f"{base}/guests/{uuid}/console/serial/")
    expect(other.locator(TERMINAL)).to_have_attribute("data-state", "running", timeout=STEP_MS)
    terminal_state(page, "closed")
    expect(page.locator(f"{TERMINAL} .console-status")).to_contain_text("took over")
    page.get_by_role("button", name="Take the console back").click()
    terminal_state(page, "running")
    expect(other.locator(TERMINAL)).to_have_attribute("data-state", "closed", timeout=STEP_MS)
    other.close()
    run_in_terminal(page, "echo $((3*5))", "15")

    # --- stopped: a token minted before is refused; the terminal comes back when it runs ---
    status, body = mint(page, uuid, "serial")
    assert status == 200
    act(page, seen, "shutdown", "Stopped")
    terminal_state(page, "stopped")
    assert operations.get_info(demo.hv, uuid).state == GuestState.DEFINED
    status, refused = mint(page, uuid, "serial")
    assert status == 409 and "stopped" in str(refused["error"])
    late = page.evaluate(OPEN_JS, body["url"])
    assert (late["code"], late["messages"]) == (consoles.NOT_RUNNING, 0), late
    ready = lines(page, "VMPORTAL-READY")
    act(page, seen, "start", "Running")
    terminal_state(page, "running")
    page.wait_for_function(
        "(n) => (" + COUNT_LINES_JS + ")('VMPORTAL-READY') > n", arg=ready, timeout=BOOT_MS
    )
    run_in_terminal(page, "echo $((9*9))", "81")

    # --- the guest's history lists the console sessions ---
    page.reload()
    history = page.locator("table.console-sessions")
    expect(history).to_contain_text("Serial terminal")
    expect(history).to_contain_text("Graphical console")
    expect(history).to_contain_text("took over")
    sessions = ConsoleSession.objects.filter(guest=guest, opened__isnull=False)
    assert sessions.filter(user__username="ann", kind="serial").count() >= 3
