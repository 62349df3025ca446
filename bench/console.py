"""console_echo_p95_ms, console_echo_vs_virsh: a keystroke in the browser terminal to its echo.

A tiny guest runs its shell on ttyS0 (kernel + the runtime initramfs, on qemu:///system). Its
owner opens the portal's full-screen serial terminal in Debian's Chromium. A sample starts when
xterm.js takes a keystroke (its onData event, where a real key press becomes input) and the
keystroke comes from xterm.js's own input path (`terminal.input(ch, true)`, as typed). xterm.js
sends it over the console WebSocket, the guest's tty echoes it, the bridge sends it back. Stages
of each sample: the echo's frame arrives (`term.write`), xterm.js has parsed it, and the animation
frame after that, the one that draws it. console_echo_p95_ms is to the drawn frame.

The anchor is `virsh console --force` on the same guest in the same run, driven through a pty:
from writing a byte to the pty until its echo is read back, with nothing drawn. The ratio
compares like with like: the portal's p95 until the echo is in the terminal (parsed, before its
next paint) over virsh's p95 until the echo is read. Reported beside it: the drawn time over
virsh, and the same samples with the keys pressed through Playwright (Chrome DevTools input
events, whose own round trips add milliseconds no user's key press has).
"""

from __future__ import annotations

import contextlib
import os
import pty
import select
import shutil
import string
import time
import uuid as uuidlib
from pathlib import Path
from typing import Any

from bench.browser import ARGS, CHROMIUM
from bench.common import median, p95, wait_for
from bench.context import Context
from bench.stack import PASSWORD, QEMU_URI

STAGE = Path("/var/lib/libvirt/boot/vmportal-bench-console")
LOG_DIR = Path("/var/log/libvirt/qemu")

# Resolves with {drawn, arrived, parsed}: ms from the next keydown to the animation frame after
# xterm.js parsed the echo of `ch` (the frame that draws it), to the echo's WebSocket frame
# arriving, and to xterm.js having parsed it.
INPUT_JS = "(ch) => document.querySelector('[data-terminal]').terminal.input(ch, true)"
ARM_JS = """
(ch) => {
  const term = document.querySelector('[data-terminal]').terminal;
  if (!window.__wrapped) {
    window.__wrapped = true;
    const write = term.write.bind(term);
    term.write = (data, cb) => { window.__arrived = performance.now(); return write(data, cb); };
  }
  window.__echo = new Promise((resolve) => {
    let down = null;
    const typed = term.onData(() => { down = performance.now(); typed.dispose(); });
    const sub = term.onWriteParsed(() => {
      const b = term.buffer.active;
      const line = b.getLine(b.baseY + b.cursorY).translateToString(true);
      if (down !== null && line.endsWith(ch)) {
        sub.dispose();
        const parsed = performance.now();
        requestAnimationFrame(() => resolve({
          drawn: performance.now() - down, arrived: window.__arrived - down, parsed: parsed - down,
        }));
      }
    });
  });
}
"""


def _boot_guest(ctx: Context) -> tuple[str, str]:
    """A running tiny guest with a shell on its serial console; (uuid, name)."""
    from django.conf import settings
    from lxml import etree

    from provisioning.demo import tinyguest
    from provisioning.hypervisor import operations
    from provisioning.hypervisor.connection import get_hypervisor

    guest = tinyguest.cached(settings.DEMO_DIR) or tinyguest.build(settings.DEMO_DIR)
    STAGE.mkdir(mode=0o755, parents=True, exist_ok=True)
    for source, name in ((guest.kernel, "vmlinuz"), (guest.runtime_initrd, "initrd.img")):
        shutil.copyfile(source, STAGE / name)
        (STAGE / name).chmod(0o644)
    uuid = str(uuidlib.uuid4())
    name = f"bench-console-{uuid[:6]}"
    root = etree.Element("domain", type=ctx.domain_type)
    etree.SubElement(root, "name").text = name
    etree.SubElement(root, "uuid").text = uuid
    etree.SubElement(root, "memory", unit="MiB").text = "256"
    os_el = etree.SubElement(root, "os")
    etree.SubElement(os_el, "type").text = "hvm"
    etree.SubElement(os_el, "kernel").text = str(STAGE / "vmlinuz")
    etree.SubElement(os_el, "initrd").text = str(STAGE / "initrd.img")
    etree.SubElement(os_el, "cmdline").text = "console=ttyS0"
    etree.SubElement(etree.SubElement(root, "features"), "acpi")
    devices = etree.SubElement(root, "devices")
    serial = etree.SubElement(devices, "serial", type="pty")
    etree.SubElement(serial, "log", file=str(LOG_DIR / f"vmportal-{uuid}.log"), append="off")
    etree.SubElement(serial, "target", port="0")
    hv = get_hypervisor(QEMU_URI)
    operations.create_transient(hv, etree.tostring(root, encoding="unicode"))
    ctx.made.domain(QEMU_URI, uuid)
    ctx.made.file(LOG_DIR / f"vmportal-{uuid}.log")
    wait_for(
        lambda: "VMPORTAL-READY" in _read(LOG_DIR / f"vmportal-{uuid}.log"),
        timeout=120,
        what="the console guest's READY line",
        every=0.2,
    )
    return uuid, name


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _typing(page: Any, count: int, *, press: bool) -> dict[str, list[float]]:
    """`count` keystrokes (after 5 to warm up); each stage's milliseconds per sample."""
    stages: dict[str, list[float]] = {"drawn": [], "arrived": [], "parsed": []}
    letters = string.ascii_lowercase
    for i in range(count + 5):
        ch = letters[i % len(letters)]
        if i and i % 40 == 0:
            page.keyboard.press("Control+u")  # the shell clears its line
        page.evaluate(ARM_JS, ch)
        if press:
            page.keyboard.press(ch)
        else:
            page.evaluate(INPUT_JS, ch)
        times = page.evaluate("window.__echo")
        if i >= 5:
            for stage, values in stages.items():
                values.append(float(times[stage]))
    page.keyboard.press("Control+u")
    return stages


def _portal_samples(ctx: Context, uuid: str, count: int) -> dict[str, dict[str, list[float]]]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page()
            page.goto(f"{ctx.stack.base_url}/accounts/login/")
            page.get_by_label("Username").fill("bench-watcher")
            page.get_by_label("Password").fill(PASSWORD)
            page.get_by_role("button", name="Log in").click()
            page.goto(f"{ctx.stack.base_url}/guests/{uuid}/console/serial/")
            page.wait_for_selector("[data-terminal][data-state='running']", timeout=30_000)
            page.locator("[data-terminal] .terminal-box").click()
            page.keyboard.press("Enter")
            return {
                "typed": _typing(page, count, press=False),
                "pressed": _typing(page, count, press=True),
            }
        finally:
            browser.close()


def _virsh_samples(uuid: str, count: int) -> list[float]:
    pid, fd = pty.fork()
    if pid == 0:  # the child: virsh on the pty
        os.execvp("virsh", ["virsh", "-c", QEMU_URI, "console", uuid, "--force"])
    samples: list[float] = []
    seen = bytearray()

    def read_until(want: bytes, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while want not in seen:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"virsh console: no {want!r} within {timeout} s")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                seen.extend(os.read(fd, 4096))

    try:
        read_until(b"Escape character", 15)
        # virsh may still be opening the stream: press Enter until the shell's prompt shows.
        for _ in range(15):
            os.write(fd, b"\r")
            try:
                read_until(b"# ", 1)
                break
            except RuntimeError:
                continue
        else:
            raise RuntimeError("virsh console: the guest's shell never prompted")
        letters = string.ascii_lowercase
        for i in range(count + 5):
            if i and i % 40 == 0:
                os.write(fd, b"\x15")
                time.sleep(0.05)
            seen.clear()
            ch = letters[i % len(letters)].encode()
            start = time.perf_counter()
            os.write(fd, ch)
            read_until(ch, 5)
            if i >= 5:
                samples.append((time.perf_counter() - start) * 1000)
        os.write(fd, b"\x15")  # the shell clears its line
        time.sleep(0.1)
        os.write(fd, b"\x1d")  # virsh's escape (Ctrl-]), a read of its own
    finally:
        _end_child(pid)
        os.close(fd)
    return samples


def _end_child(pid: int, timeout: float = 5.0) -> None:
    """Reap the child, killing it if it has not left by itself within timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done:
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, 9)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def run(ctx: Context) -> dict[str, Any]:
    """Portal samples, then virsh samples, on one guest."""
    from provisioning.models import Guest

    uuid, name = _boot_guest(ctx)
    Guest.objects.create(
        owner=ctx.seed.watcher,
        host=ctx.seed.local,
        name=name,
        uuid=uuid,
        state=Guest.State.RUNNING,
    )
    count = ctx.runs(30, 100)
    try:
        portal = _portal_samples(ctx, uuid, count)
        virsh = _virsh_samples(uuid, count)
    finally:
        Guest.objects.filter(uuid=uuid).delete()
        ctx.made.remove(QEMU_URI, uuid)
        shutil.rmtree(STAGE, ignore_errors=True)
    typed, pressed = portal["typed"], portal["pressed"]
    details: dict[str, Any] = {
        "console_echo_virsh_ms": virsh,
        "console_echo_virsh_p95_ms": p95(virsh),
        "console_echo_virsh_median_ms": median(virsh),
    }
    for name, stages in (("", typed), ("pressed_", pressed)):
        for stage, values in stages.items():
            details[f"console_echo_{name}{stage}_ms"] = values
            details[f"console_echo_{name}{stage}_p95_ms"] = p95(values)
            details[f"console_echo_{name}{stage}_median_ms"] = median(values)
    details["console_echo_drawn_vs_virsh"] = p95(typed["drawn"]) / p95(virsh)
    return {
        "figures": {
            "console_echo_p95_ms": p95(typed["drawn"]),
            "console_echo_vs_virsh": p95(typed["parsed"]) / p95(virsh),
        },
        "details": details,
    }
