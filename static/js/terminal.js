// The serial terminal of a guest: xterm.js over the portal's console WebSocket.
// Binary frames carry the console's bytes both ways; text frames carry the bridge's status as
// JSON. A token is minted for every connection (POST to data-token-url); while the guest is not
// running the mint answers 409 and the terminal asks again every few seconds.
(function () {
  "use strict";
  const RETRY_MS = 3000;
  const csrf = () => (document.cookie.match(/(?:^|; )csrftoken=([^;]+)/) || [])[1] || "";
  const wsBase = () => (location.protocol === "https:" ? "wss://" : "ws://") + location.host;

  function start(widget) {
    const box = widget.querySelector(".terminal-box");
    const status = widget.querySelector(".console-status");
    const reconnect = widget.querySelector('[data-console="reconnect"]');
    const term = new Terminal({ cursorBlink: true, scrollback: 10000, fontSize: 14,
      theme: { background: "#0f1524" } });
    const fit = new FitAddon.FitAddon();
    term.loadAddon(fit);
    term.open(box);
    fit.fit();
    new ResizeObserver(() => fit.fit()).observe(box);
    widget.terminal = term; // for tests and the page's own scripts
    let ws = null;
    let retry = null;
    const encoder = new TextEncoder();

    function say(state, message) {
      widget.dataset.state = state;
      status.textContent = message;
    }

    async function connect() {
      clearTimeout(retry);
      reconnect.hidden = true;
      let answer;
      try {
        answer = await fetch(widget.dataset.tokenUrl, { method: "POST", headers: { "X-CSRFToken": csrf() } });
      } catch (err) {
        say("error", "The portal cannot be reached; trying again.");
        retry = setTimeout(connect, RETRY_MS);
        return;
      }
      const body = await answer.json().catch(() => ({}));
      if (answer.status === 409) {
        say("stopped", (body.error || "The guest is not running") + "; the terminal connects when it runs.");
        retry = setTimeout(connect, RETRY_MS);
        return;
      }
      if (!answer.ok) {
        say("error", body.error || "The console cannot be opened (" + answer.status + ").");
        return;
      }
      ws = new WebSocket(wsBase() + body.url);
      ws.binaryType = "arraybuffer";
      ws.onmessage = (event) => {
        if (typeof event.data === "string") {
          const message = JSON.parse(event.data);
          if (message.type === "status") say(message.state, message.message);
        } else {
          term.write(new Uint8Array(event.data));
        }
      };
      ws.onclose = (event) => {
        ws = null;
        const why = event.reason || "the connection closed";
        if (event.code === 4409) {
          say("stopped", why + "; the terminal connects when it runs.");
          retry = setTimeout(connect, RETRY_MS);
          return;
        }
        say("closed", "Disconnected: " + why + " (" + event.code + ").");
        reconnect.textContent = event.code === 4001 ? "Take the console back" : "Reconnect";
        reconnect.hidden = false;
      };
    }

    term.onData((data) => {
      if (ws && ws.readyState === WebSocket.OPEN && widget.dataset.state === "running") {
        ws.send(encoder.encode(data));
      }
    });
    // Ctrl+Shift+C / Ctrl+Shift+V copy and paste; plain Ctrl+C stays the guest's interrupt.
    term.attachCustomKeyEventHandler((event) => {
      if (event.type !== "keydown" || !event.ctrlKey || !event.shiftKey) return true;
      if (event.code === "KeyC") { copy(); return false; }
      if (event.code === "KeyV") { paste(); return false; }
      return true;
    });
    function copy() {
      const text = term.getSelection();
      if (text) navigator.clipboard.writeText(text);
    }
    async function paste() {
      const text = await navigator.clipboard.readText();
      if (text) term.paste(text);
    }
    widget.querySelector('[data-console="copy"]').addEventListener("click", copy);
    widget.querySelector('[data-console="paste"]').addEventListener("click", paste);
    reconnect.addEventListener("click", connect);
    connect();
  }

  function startAll() {
    for (const widget of document.querySelectorAll("[data-terminal]")) {
      if (!widget.terminal) start(widget);
    }
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", startAll);
  else startAll();
})();
