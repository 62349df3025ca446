"""The guest page's usage graphs in Chromium: drawn from the stored history, then moved live by
the real listener's sampling rounds through the page's event stream."""

from __future__ import annotations

import time

import pytest
from playwright.sync_api import Page, expect

from provisioning.hypervisor import operations
from provisioning.models import Host
from provisioning.services import stats
from tests.conftest import test_hv as driver
from tests.factories import PASSWORD, make_guest, make_template, make_user
from tests.support.browser import log_in
from tests.support.domains import domain_xml
from tests.support.stack import ARTIFACTS

pytestmark = [pytest.mark.browser, pytest.mark.timeout(90)]

POINTS_AT_LEAST = "(n) => +document.getElementById('guest-graphs').dataset.points >= n"

# Whether a canvas has anything drawn on it (uPlot draws its series and axes on canvases).
DRAWN = """(figure) => {
  const canvas = figure.querySelector("canvas");
  if (!canvas) return false;
  const pixels = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  for (let i = 3; i < pixels.length; i += 4) if (pixels[i] !== 0) return true;
  return false;
}"""


def test_the_graphs_draw_the_history_and_move_with_each_sampling_round(
    stack, test_host: Host, page: Page
) -> None:
    owner = make_user("ann")
    guest = make_guest(owner=owner, host=test_host, template=make_template(host=test_host))
    operations.create_transient(driver(), domain_xml(uuid=str(guest.uuid), name=guest.name))
    store = stats.Store(interval=1)
    now = int(time.time())
    history = [
        (str(guest.uuid), now - 60 + i, (20 + i % 30, 3e7 + i * 1e5, 4096.0 * i, 1024.0, 10.0, 5.0))
        for i in range(60)
    ]
    store.write(history, publish=False)
    # Rounds every second here (10 s by default), so the page sees several while the test waits.
    stack.env["VMPORTAL_STATS_INTERVAL"] = "1"
    stack.start("web")
    try:
        log_in(page, stack.base_url, "ann", PASSWORD)
        page.goto(f"{stack.base_url}/guests/{guest.uuid}/")
        graphs = page.locator("#guest-graphs")
        expect(graphs).to_have_attribute("data-drawn", "true")
        expect(graphs).to_have_attribute("data-points", "60")
        for name in ("cpu", "mem", "disk", "net"):
            figure = page.locator(f'figure[data-graph="{name}"]')
            assert figure.evaluate(DRAWN), f"the {name} graph drew nothing"
        expect(page.locator("#graphs-empty")).to_be_hidden()

        # The listener samples the guest (the test driver reports no counters: points of
        # unknowns) and each point reaches the open page over its stream.
        stack.start("listener")
        page.wait_for_function(POINTS_AT_LEAST, arg=62, timeout=30_000)
        assert len(stats.series(guest.uuid, "hour")["t"]) >= 62
        page.locator("#guest-graphs").screenshot(path=str(ARTIFACTS / "graphs.png"))

        page.get_by_role("button", name="Last day").click()
        expect(graphs).to_have_attribute("data-range", "day")
        expect(page.get_by_role("button", name="Last day")).to_have_attribute(
            "aria-pressed", "true"
        )
    finally:
        stats.forget_guest(guest.uuid)


def test_a_guest_never_sampled_says_so_instead_of_empty_axes(
    stack, test_host: Host, page: Page
) -> None:
    owner = make_user("bea")
    guest = make_guest(owner=owner, host=test_host, template=make_template(host=test_host))
    stack.start("web")
    log_in(page, stack.base_url, "bea", PASSWORD)
    page.goto(f"{stack.base_url}/guests/{guest.uuid}/")

    expect(page.locator("#guest-graphs")).to_have_attribute("data-drawn", "true")
    expect(page.locator("#graphs-empty")).to_be_visible()
    expect(page.locator("#graphs-empty")).to_contain_text("No usage recorded yet")
