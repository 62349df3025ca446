// The screen of a guest: noVNC over the portal's display WebSocket (RFB bytes as binary frames).
// The socket is opened here and handed to noVNC, so the page can show the close reason.
import RFB from "../vendor/novnc/core/rfb.js";

const RETRY_MS = 3000;
const csrf = () => (document.cookie.match(/(?:^|; )csrftoken=([^;]+)/) || [])[1] || "";
const wsBase = () => (location.protocol === "https:" ? "wss://" : "ws://") + location.host;

function start(widget) {
  const box = widget.querySelector(".screen-box");
  const status = widget.querySelector(".console-status");
  const reconnect = widget.querySelector('[data-console="reconnect"]');
  const scale = widget.querySelector('[data-console="scale"]');
  let rfb = null;
  let retry = null;
  widget.started = true;

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
      say("stopped", (body.error || "The guest is not running") + "; the screen connects when it runs.");
      retry = setTimeout(connect, RETRY_MS);
      return;
    }
    if (!answer.ok) {
      say("error", body.error || "The screen cannot be opened (" + answer.status + ").");
      return;
    }
    const ws = new WebSocket(wsBase() + body.url, ["binary"]);
    ws.addEventListener("close", (event) => {
      rfb = null;
      const why = event.reason || "the connection closed";
      if (event.code === 4409) {
        say("stopped", why + "; the screen connects when it runs.");
        retry = setTimeout(connect, RETRY_MS);
        return;
      }
      say("closed", "Disconnected: " + why + " (" + event.code + ").");
      reconnect.hidden = false;
    });
    rfb = new RFB(box, ws, { shared: true });
    rfb.scaleViewport = scale.checked;
    rfb.addEventListener("connect", () => say("running", "Connected to the screen."));
    widget.rfb = rfb; // for tests
  }

  widget.querySelector('[data-console="ctrl-alt-del"]').addEventListener("click", () => {
    if (rfb) rfb.sendCtrlAltDel();
  });
  widget.querySelector('[data-console="fullscreen"]').addEventListener("click", () => {
    box.requestFullscreen();
  });
  scale.addEventListener("change", () => { if (rfb) rfb.scaleViewport = scale.checked; });
  reconnect.addEventListener("click", connect);
  connect();
}

for (const widget of document.querySelectorAll("[data-screen]")) {
  if (!widget.started) start(widget);
}
