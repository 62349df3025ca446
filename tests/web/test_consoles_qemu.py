"""Browser consoles on a real QEMU guest, through the real ASGI application in this process.

The tiny guest boots its runtime (kernel + runtime initramfs, no install) with a shell on ttyS0
and a VNC display on the host's loopback. The consumers run on this test's event loop (Channels
driven through asgiref's communicator, no web server), so the churn test can count what this
process holds. The real-browser side is tests/web/browser/test_consoles_qemu.py.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from provisioning.demo import tinyguest
from provisioning.hypervisor import (
    Hypervisor,
    HypervisorError,
    define,
    destroy,
    get_info,
    resume,
    start,
    suspend,
)
from provisioning.hypervisor.consoles import SerialConsole, open_serial_consoles
from provisioning.hypervisor.types import GuestState
from provisioning.models import ConsoleSession, Guest
from provisioning.services import consoles
from tests.factories import make_guest, make_host, make_user
from tests.support.consoles import Viewer, history, open_fds, run_async, session_cookie, token_for
from tests.support.domains import Cleanup, domain_xml, new_uuid
from tests.support.libvirt import QEMU_URI, console_dir
from tests.support.qemu import DEMO_CACHE, DOMAIN_TYPE, STAGE_PARENT, read_console, unique
from tests.support.stack import wait_until
from vmportal.asgi import application

pytestmark = [pytest.mark.qemu, pytest.mark.django_db(transaction=True), pytest.mark.timeout(240)]

BOOT_S = 120
STEP_S = 20


@dataclass
class Running:
    hv: Hypervisor
    uuid: str
    log: str


@pytest.fixture(scope="module")
def running() -> Iterator[Running]:
    """One persistent tiny guest running its shell, for the whole module."""
    guest = tinyguest.cached(DEMO_CACHE) or tinyguest.build(DEMO_CACHE)
    stage = STAGE_PARENT / unique("console")
    stage.mkdir(mode=0o755, parents=True)
    shutil.copyfile(guest.kernel, stage / "vmlinuz")
    shutil.copyfile(guest.runtime_initrd, stage / "initrd.img")
    for path in stage.iterdir():
        path.chmod(0o644)
    hv = Hypervisor(QEMU_URI)
    cleanup = Cleanup(hv)
    uuid = cleanup.add(new_uuid())
    # The portal's own log name, so the bridge finds the scrollback where it looks.
    log = str(console_dir() / f"vmportal-{uuid}.log")
    xml = domain_xml(
        uuid=uuid,
        domain_type=DOMAIN_TYPE,
        memory_mib=256,
        kernel=str(stage / "vmlinuz"),
        initrd=str(stage / "initrd.img"),
        cmdline="console=ttyS0",
        serial_log=log,
        vnc=True,
    )
    try:
        define(hv, xml)
        start(hv, uuid)
        wait_until(
            lambda: "VMPORTAL-READY" in read_console(console_dir() / f"vmportal-{uuid}.log"),
            timeout=BOOT_S,
            what="the tiny guest's READY line",
            every=0.2,
        )
        yield Running(hv, uuid, log)
    finally:
        cleanup.run()
        hv.close()
        shutil.rmtree(stage, ignore_errors=True)


@pytest.fixture
def row(running: Running) -> Guest:
    """The guest's row in the portal, owned by ann, on a host that is this libvirtd."""
    host = make_host("local", uri=QEMU_URI, pool=None)
    return make_guest(
        owner=make_user("ann"), host=host, uuid=running.uuid, state=Guest.State.RUNNING
    )


def viewer_of(row: Guest, kind: str = "serial") -> Viewer:
    owner = row.owner
    return Viewer(
        application, row.uuid, token_for(row, owner, kind), kind=kind, cookie=session_cookie(owner)
    )


async def connected(row: Guest) -> Viewer:
    viewer = viewer_of(row)
    assert await viewer.connect()
    await viewer.until(lambda v: v.state() == "running", timeout=STEP_S, what="the running status")
    return viewer


async def echo(viewer: Viewer, a: int, b: int) -> None:
    """Type a shell sum and wait for its answer on a line of its own."""
    await viewer.type(f"echo $(({a}*{b}))\r")
    want = f"\r\n{a * b}\r\n".encode()
    await viewer.until(lambda v: want in v.output, timeout=STEP_S, what=f"{a * b} echoed")


def ensure_running(running: Running) -> None:
    if get_info(running.hv, running.uuid).state is GuestState.PAUSED:
        resume(running.hv, running.uuid)
    if get_info(running.hv, running.uuid).state is not GuestState.RUNNING:
        start(running.hv, running.uuid)


def test_typing_runs_shell_commands_after_the_boot_log_as_scrollback(row: Guest) -> None:
    async def go() -> None:
        viewer = await connected(row)
        assert b"VMPORTAL-READY" in viewer.output, "the scrollback starts with the serial log"
        await echo(viewer, 6, 7)
        await viewer.leave()

    run_async(go)
    [session] = history(row)
    assert session.user == row.owner and session.kind == ConsoleSession.Kind.SERIAL
    assert session.closed is not None and "closed by the viewer" in session.close_reason
    assert session.duration is not None and session.duration > 0


def test_a_pause_is_shown_and_typing_works_again_after_resume(row: Guest, running: Running) -> None:
    async def go() -> None:
        viewer = await connected(row)
        try:
            await asyncio.to_thread(suspend, running.hv, running.uuid)
            await viewer.until(lambda v: v.state() == "paused", timeout=STEP_S, what="paused")
            assert "paused" in viewer.statuses[-1]["message"]
            await asyncio.to_thread(resume, running.hv, running.uuid)
            await viewer.until(lambda v: v.state() == "running", timeout=STEP_S, what="running")
            await echo(viewer, 7, 8)
        finally:
            await viewer.leave()
            ensure_running(running)

    run_async(go)


def test_a_second_viewer_takes_the_console_over_and_the_first_is_told(row: Guest) -> None:
    async def go() -> None:
        first = await connected(row)
        second = await connected(row)
        code, reason = await first.closed()
        assert code == consoles.TAKEN_OVER and "took over" in reason
        await echo(second, 3, 5)
        await second.leave()

    run_async(go)
    sessions = history(row)
    assert len(sessions) == 2 and "took over" in sessions[0].close_reason


def test_a_stopped_guest_is_shown_and_the_terminal_reattaches_when_it_starts(
    row: Guest, running: Running
) -> None:
    async def go() -> None:
        viewer = await connected(row)
        try:
            await asyncio.to_thread(destroy, running.hv, running.uuid)
            await viewer.until(lambda v: v.state() == "stopped", timeout=STEP_S, what="stopped")
            assert "reconnects" in viewer.statuses[-1]["message"]
            await asyncio.to_thread(start, running.hv, running.uuid)
            await viewer.until(
                lambda v: v.state() == "running", timeout=STEP_S, what="running again"
            )
            ready = viewer.output.count(b"VMPORTAL-READY")
            await viewer.until(
                lambda v: v.output.count(b"VMPORTAL-READY") > ready,
                timeout=BOOT_S,
                what="the second boot's READY line",
            )
            await echo(viewer, 9, 9)
        finally:
            await viewer.leave()
            ensure_running(running)

    run_async(go)


def test_the_display_speaks_rfb_through_libvirt(row: Guest) -> None:
    async def go() -> None:
        viewer = viewer_of(row, "graphics")
        assert await viewer.connect()
        await viewer.until(lambda v: len(v.output) >= 12, timeout=STEP_S, what="the RFB greeting")
        assert bytes(viewer.output[:4]) == b"RFB "
        await viewer.leave()

    run_async(go)
    [session] = history(row)
    assert session.kind == ConsoleSession.Kind.GRAPHICS and session.closed is not None


def test_an_idle_console_is_closed(row: Guest, settings) -> None:
    settings.CONSOLE_IDLE_SECONDS = 2

    async def go() -> tuple[int, str]:
        viewer = await connected(row)
        close = await viewer.closed(timeout=15)
        await viewer.leave()
        return close

    code, reason = run_async(go)
    assert code == consoles.IDLE and "without input" in reason
    assert "without input" in history(row)[0].close_reason


def test_two_hundred_sessions_leave_no_stream_descriptor_or_task_behind(row: Guest) -> None:
    async def go() -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        # One session first, so what stays for good (libvirt's event loop, pools) is counted.
        await (await connected(row)).leave()
        before = (open_fds(), len(asyncio.all_tasks()), open_serial_consoles())
        for _ in range(200):
            viewer = await connected(row)
            await viewer.leave()
        await asyncio.sleep(0)
        after = (open_fds(), len(asyncio.all_tasks()), open_serial_consoles())
        return before, after

    before, after = run_async(go)
    assert after[2] == 0 and before[2] == 0, "every libvirt console session was closed"
    assert after[1] == before[1], f"tasks {before[1]} -> {after[1]}"
    assert after[0] <= before[0] + 2, f"file descriptors {before[0]} -> {after[0]}"
    assert ConsoleSession.objects.filter(closed__isnull=True).count() == 0


def test_an_attach_that_loses_the_race_with_a_starting_guest_is_tried_again(
    row: Guest, monkeypatch: pytest.MonkeyPatch
) -> None:
    # libvirt reports a guest started a moment before its pty is assigned; openConsole then
    # fails ("PTY device is not yet assigned"). That race is injected here once.
    real = SerialConsole.attach
    calls: list[int] = []

    def attach(self: SerialConsole) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise HypervisorError("operation failed: PTY device is not yet assigned")
        real(self)

    monkeypatch.setattr(SerialConsole, "attach", attach)

    async def go() -> None:
        viewer = await connected(row)
        await echo(viewer, 4, 4)
        await viewer.leave()

    run_async(go)
    assert len(calls) >= 2
