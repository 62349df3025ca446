// The guest page's usage graphs (uPlot): the range's history from the stats URL, then, for the
// last hour, each point the page's stream sends as a `stats` event (see guest_detail.html).
(function () {
  "use strict";

  const section = document.getElementById("guest-graphs");
  if (!section || typeof uPlot === "undefined") return;

  const KIB = 1024;
  function bytes(v) {
    if (v == null) return "—";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (Math.abs(v) >= KIB && i < units.length - 1) { v /= KIB; i++; }
    return (i ? v.toFixed(1) : Math.round(v)) + " " + units[i];
  }
  const perSecond = (v) => (v == null ? "—" : bytes(v) + "/s");
  const percent = (v) => (v == null ? "—" : v.toFixed(1) + " %");

  // Each graph: the columns it draws and how their values read.
  const GRAPHS = {
    cpu: { series: [["cpu", "CPU", "#2563eb"]], format: percent, range: [0, 100] },
    mem: { series: [["mem", "Used", "#7c3aed"]], format: bytes },
    disk: { series: [["disk_read", "Read", "#059669"], ["disk_write", "Write", "#d97706"]], format: perSecond },
    net: { series: [["net_rx", "Received", "#0891b2"], ["net_tx", "Sent", "#db2777"]], format: perSecond },
  };
  const COLUMNS = ["t", "cpu", "mem", "disk_read", "disk_write", "net_rx", "net_tx"];

  let data = null; // the range's columns, oldest first
  let plots = {};

  function options(name, width) {
    const spec = GRAPHS[name];
    return {
      width: width,
      height: 160,
      scales: { x: { time: true }, y: spec.range ? { range: spec.range } : { auto: true } },
      axes: [{}, { values: (u, ticks) => ticks.map(spec.format), size: 84 }],
      series: [{}].concat(spec.series.map(([, label, colour]) => ({
        label: label, stroke: colour, width: 1.5, value: (u, v) => spec.format(v), spanGaps: false,
      }))),
      legend: { live: true },
    };
  }

  function columnsFor(name) {
    return [data.t].concat(GRAPHS[name].series.map(([column]) => data[column]));
  }

  function draw() {
    const empty = data.t.length === 0;
    document.getElementById("graphs-empty").hidden = !empty;
    section.dataset.points = String(data.t.length);
    section.querySelectorAll("figure[data-graph]").forEach((figure) => {
      const name = figure.dataset.graph;
      if (plots[name]) {
        plots[name].setData(columnsFor(name));
        return;
      }
      const width = Math.max(240, figure.clientWidth || 320);
      plots[name] = new uPlot(options(name, width), columnsFor(name), figure);
    });
    section.dataset.drawn = "true";
  }

  async function load(range) {
    section.dataset.range = range;
    section.querySelectorAll(".ranges button").forEach((b) => {
      b.setAttribute("aria-pressed", String(b.dataset.range === range));
    });
    const response = await fetch(section.dataset.statsUrl + "?range=" + range, {
      headers: { Accept: "application/json" }, credentials: "same-origin",
    });
    if (!response.ok) {
      document.getElementById("graphs-empty").hidden = false;
      document.getElementById("graphs-empty").textContent = "The graphs cannot be shown now (" + response.status + ").";
      return;
    }
    const body = await response.json();
    data = { limit: body.points };
    COLUMNS.forEach((c) => { data[c] = body[c]; });
    draw();
  }

  // A live point: only the hour range is drawn at full resolution.
  function append(point) {
    if (!data || section.dataset.range !== "hour") return;
    if (data.t.length && point.t <= data.t[data.t.length - 1]) return;
    COLUMNS.forEach((c) => { data[c].push(point[c] === undefined ? null : point[c]); });
    if (data.t.length > data.limit) COLUMNS.forEach((c) => { data[c].shift(); });
    draw();
  }

  const feed = document.getElementById("graph-feed");
  feed.addEventListener("htmx:sseBeforeMessage", (event) => {
    event.preventDefault(); // nothing is swapped: the point is drawn
    try { append(JSON.parse(event.detail.data)); } catch (e) { /* a malformed frame is skipped */ }
  });
  section.querySelectorAll(".ranges button").forEach((b) => {
    b.addEventListener("click", () => load(b.dataset.range));
  });
  window.addEventListener("resize", () => {
    Object.entries(plots).forEach(([name, plot]) => {
      const figure = section.querySelector(`figure[data-graph="${name}"]`);
      plot.setSize({ width: Math.max(240, figure.clientWidth), height: 160 });
    });
  });
  load("hour");
})();
