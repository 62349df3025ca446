"""The guest rows' cells the dashboard draws and its event stream redraws."""

from __future__ import annotations

from django.template import Context, Template

from provisioning.templatetags import rows


def test_a_state_badge_names_the_state_and_escapes_the_reason() -> None:
    html = rows.state_badge("paused", 'user <"paused">', "Paused")

    assert html == (
        '<span class="badge state-paused" data-state="paused" '
        'title="user &lt;&quot;paused&quot;&gt;">Paused</span>'
    )


def test_addresses_go_one_a_line_and_none_is_a_dash() -> None:
    assert rows.address_list(["192.0.2.5", "<fe80::1>"]) == (
        '<span class="address">192.0.2.5</span><br><span class="address">&lt;fe80::1&gt;</span>'
    )
    assert rows.address_list([]) == '<span class="muted">—</span>'


def test_the_page_and_the_stream_draw_the_same_cell() -> None:
    page = Template("{% load rows %}{% state_badge s r d %}{% address_list a %}").render(
        Context({"s": "running", "r": "booted", "d": "Running", "a": ["192.0.2.9"]})
    )

    assert page == rows.state_badge("running", "booted", "Running") + rows.address_list(
        ["192.0.2.9"]
    )
