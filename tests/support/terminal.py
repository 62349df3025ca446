"""The serial terminal on a guest page, as a browser test drives it (xterm.js's own buffer)."""

from __future__ import annotations

from playwright.sync_api import Page, expect

STEP_MS = 20_000
TERMINAL = "[data-terminal]"

# How many lines of the terminal read exactly `want` (xterm.js's buffer, scrollback included).
COUNT_LINES_JS = """
(want) => {
  const buffer = document.querySelector('[data-terminal]').terminal.buffer.active;
  let n = 0;
  for (let i = 0; i < buffer.length; i++) {
    const line = buffer.getLine(i);
    if (line && line.translateToString(true).trim() === want) n++;
  }
  return n;
}
"""


def lines(page: Page, want: str) -> int:
    return int(page.evaluate(COUNT_LINES_JS, want))


def run_in_terminal(page: Page, command: str, answer: str) -> None:
    """Type a command into the terminal and wait for its answer on a line of its own."""
    before = lines(page, answer)
    page.locator(f"{TERMINAL} .terminal-box").click()
    page.keyboard.type(command)
    page.keyboard.press("Enter")
    page.wait_for_function(
        "([want, n]) => (" + COUNT_LINES_JS + ")(want) > n", arg=[answer, before], timeout=STEP_MS
    )


def terminal_state(page: Page, state: str, timeout: float = STEP_MS) -> None:
    """Wait for the terminal's state; on failure say what its status line said."""
    try:
        expect(page.locator(TERMINAL)).to_have_attribute("data-state", state, timeout=timeout)
    except AssertionError as exc:
        said = page.locator(f"{TERMINAL} .console-status").inner_text()
        raise AssertionError(f"terminal not {state!r}; its status says: {said!r}") from exc


# Whether some line of the terminal contains `text`.
HAS_TEXT_JS = """
(text) => {
  const buffer = document.querySelector('[data-terminal]').terminal.buffer.active;
  for (let i = 0; i < buffer.length; i++) {
    const line = buffer.getLine(i);
    if (line && line.translateToString(true).includes(text)) return true;
  }
  return false;
}
"""


def wait_for_text(page: Page, text: str, timeout: float = STEP_MS) -> None:
    """Wait until a line of the terminal contains `text`."""
    page.wait_for_function(HAS_TEXT_JS, arg=text, timeout=timeout)
