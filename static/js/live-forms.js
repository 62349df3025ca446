// What a user has typed, ticked or opened in a live part of a page (one the event stream redraws,
// such as the guest page's status with its snapshot, revert and delete forms) survives the
// redraw. Without this, a frame arriving while someone types (the stream's first frame, a job's
// progress) replaced the form with an empty one, and the next click sent nothing of what they typed.
//
// Only what differs from the page as drawn is carried over (and whether each disclosure is open), to the element with the same key in
// the new part, or to the next redraw that has it. A form that has been sent is spent: its values
// are not carried over again.
(function () {
  "use strict";

  function key(el) {
    if (el.id) return "#" + el.id;
    if (el.tagName === "DETAILS") {
      const form = el.querySelector("form[action]");
      return form ? "details " + form.getAttribute("action") : null;
    }
    if (!el.name || !el.form) return null;
    const which = el.type === "radio" ? "=" + el.value : "";
    return el.form.getAttribute("action") + " " + el.name + which;
  }

  function changed(el) {
    if (el.tagName === "DETAILS") return true; // its open attribute follows the user, so always
    if (el.form && el.form.dataset.sent) return false;
    if (el.type === "checkbox" || el.type === "radio") return el.checked !== el.defaultChecked;
    if (el.tagName === "SELECT") {
      return Array.from(el.options).some((o) => o.selected !== o.defaultSelected);
    }
    if (el.type === "hidden" || el.type === "file") return false;
    return el.value !== el.defaultValue;
  }

  // What found no element in the last redraw (a form hidden while a job runs), for the next one.
  let carried = new Map();

  function read(root) {
    const kept = new Map(carried);
    root.querySelectorAll("input, select, textarea, details").forEach((el) => {
      const k = key(el);
      if (!k) return;
      kept.delete(k); // here to be read, so nothing carried stands for it
      if (changed(el)) {
        if (el.tagName === "DETAILS") kept.set(k, { open: el.open });
        else if (el.type === "checkbox" || el.type === "radio") kept.set(k, { checked: el.checked });
        else if (el.tagName === "SELECT") kept.set(k, { selected: Array.from(el.selectedOptions, (o) => o.value) });
        else kept.set(k, { value: el.value });
      }
    });
    const active = document.activeElement;
    const focus = active && root.contains(active) ? key(active) : null;
    let range = null;
    if (focus && typeof active.selectionStart === "number") {
      range = [active.selectionStart, active.selectionEnd];
    }
    return { kept, focus, range };
  }

  function write(root, state) {
    const unmatched = new Map(state.kept);
    root.querySelectorAll("input, select, textarea, details").forEach((el) => {
      const k = key(el);
      const was = k && state.kept.get(k);
      if (was) {
        unmatched.delete(k);
        if ("open" in was) el.open = was.open;
        else if ("checked" in was) el.checked = was.checked;
        else if ("selected" in was) Array.from(el.options).forEach((o) => { o.selected = was.selected.includes(o.value); });
        else el.value = was.value;
      }
      if (state.focus && k === state.focus && document.activeElement !== el) {
        el.focus({ preventScroll: true });
        if (state.range && typeof el.setSelectionRange === "function") {
          try { el.setSelectionRange(state.range[0], state.range[1]); } catch (e) { /* not a text field */ }
        }
      }
    });
    carried = unmatched;
  }

  let pending = null;
  // The element the stream's frame replaces: the one hx-target names (inherited, as htmx does).
  function target(elt) {
    const holder = elt.closest("[hx-target]");
    const named = holder ? holder.getAttribute("hx-target") : "this";
    return named === "this" ? holder || elt : document.querySelector(named);
  }

  document.addEventListener("htmx:sseBeforeMessage", (event) => {
    pending = null;
    if (event.defaultPrevented) return; // nothing will be swapped (a graph's point)
    const root = target(event.target);
    if (root && root.id) pending = { id: root.id, state: read(root) };
  });
  document.addEventListener("htmx:sseMessage", () => {
    if (!pending) return;
    const root = pending.id ? document.getElementById(pending.id) : null;
    if (root) write(root, pending.state);
    pending = null;
  });
  document.addEventListener("htmx:beforeRequest", (event) => {
    const form = event.target.closest && event.target.closest("form");
    if (form) form.dataset.sent = "yes";
  });
})();
