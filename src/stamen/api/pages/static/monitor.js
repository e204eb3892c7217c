// The swarm monitor: for each model, its blocks against the hosts serving them, the
// hosts' details, and plots of the last minutes. Polls `/v1/swarm` every POLL_MS and
// `/v1/swarm/history` (new samples only) every sampling interval. A host that the
// history saw but the swarm no longer lists is drawn as offline ("gone") with its last
// span, so that a host that died is visible, not just missing.
"use strict";

(function () {
  const { el, getJson, formatNumber, shortId, linePlot } = window.Stamen;
  const POLL_MS = 1000;
  const STATES = ["online", "joining", "offline"];
  let history = []; // samples, oldest first
  let windowS = 600;
  let intervalS = 2;
  const colorOf = new Map(); // peer id -> series index, stable across redraws

  function colorIndex(peerId) {
    if (!colorOf.has(peerId)) colorOf.set(peerId, colorOf.size % 8);
    return colorOf.get(peerId);
  }

  // [start, end) ranges of blocks no online host serves.
  function gaps(model) {
    const covered = new Array(model.num_blocks).fill(false);
    for (const host of model.hosts) {
      if (host.state !== "online") continue;
      for (let b = host.start; b < Math.min(host.end, model.num_blocks); b++) covered[b] = true;
    }
    const out = [];
    for (let b = 0; b < covered.length; b++) {
      if (covered[b]) continue;
      if (out.length && out[out.length - 1][1] === b) out[out.length - 1][1] = b + 1;
      else out.push([b, b + 1]);
    }
    return { covered, ranges: out };
  }

  function rangeText([start, end]) {
    return end - start === 1 ? `block ${start}` : `blocks ${start}–${end - 1}`;
  }

  // Hosts seen in the history for this model but absent now, with their last sample.
  function goneHosts(model) {
    const present = new Set(model.hosts.map((h) => h.peer_id));
    const lastSeen = new Map();
    for (const sample of history) {
      const m = sample.models.find((x) => x.model === model.model);
      if (!m) continue;
      for (const host of m.hosts) lastSeen.set(host.peer_id, { host, time_s: sample.time_s });
    }
    const now = history.length ? history[history.length - 1].time_s : 0;
    return [...lastSeen.values()]
      .filter((seen) => !present.has(seen.host.peer_id))
      .map((seen) => ({ ...seen.host, state: "offline", gone_s: Math.max(0, now - seen.time_s) }));
  }

  function hostLabel(host) {
    return host.public_name || shortId(host.peer_id);
  }

  function stateBadge(host) {
    const text = host.gone_s !== undefined ? "offline (gone)" : host.state;
    const state = STATES.includes(host.state) ? host.state : "offline";
    return el("span", { class: "badge state-" + state }, text);
  }

  function blockMap(model, hosts, coverage) {
    const n = model.num_blocks;
    const map = el("div", {
      class: "blockmap",
      role: "img",
      "aria-label":
        `${n} blocks; ` +
        (coverage.ranges.length
          ? "not served: " + coverage.ranges.map(rangeText).join(", ")
          : "every block is served by an online host"),
    });
    map.style.gridTemplateColumns = `var(--map-label) repeat(${n}, minmax(0, 1fr))`;
    map.append(el("div", { class: "map-label axis-label" }, "block"));
    for (let b = 0; b < n; b++) {
      const show = b === 0 || b === n - 1 || b % 5 === 0;
      map.append(el("div", { class: "map-axis" }, show ? String(b) : ""));
    }
    for (const host of hosts) {
      const gone = host.gone_s !== undefined;
      map.append(
        el("div", { class: "map-label", title: host.peer_id },
          el("span", { class: "swatch series-" + colorIndex(host.peer_id) }),
          hostLabel(host)),
      );
      for (let b = 0; b < n; b++) {
        const inSpan = b >= host.start && b < host.end;
        const state = gone ? "gone" : STATES.includes(host.state) ? host.state : "offline";
        const cls = inSpan ? "cell state-" + state : "cell vacant";
        const title = inSpan ? `block ${b}: ${hostLabel(host)} (${gone ? "gone" : host.state})` : null;
        map.append(el("div", { class: cls, title }));
      }
    }
    map.append(el("div", { class: "map-label strong" }, "coverage"));
    for (let b = 0; b < n; b++) {
      const ok = coverage.covered[b];
      map.append(
        el("div", {
          class: "cell " + (ok ? "covered" : "uncovered"),
          title: `block ${b}: ${ok ? "served" : "served by no online host"}`,
        }),
      );
    }
    return map;
  }

  function mapLegend() {
    const item = (cls, text) => el("li", {}, el("span", { class: "key cell " + cls }), text);
    return el("ul", { class: "legend map-legend" },
      item("state-online", "online"), item("state-joining", "joining"),
      item("state-offline", "offline"), item("state-gone", "gone (not listed any more)"),
      item("uncovered", "served by no online host"));
  }

  function hostTable(hosts) {
    const head = el("tr", {},
      ...["Host", "Blocks", "State", "Throughput", "Free cache", "Version", "Transport", "Reached"].map(
        (name) => el("th", { scope: "col" }, name)));
    const rows = hosts.map((host) => {
      const gone = host.gone_s !== undefined;
      return el("tr", { class: gone ? "gone" : null },
        el("th", { scope: "row", title: host.peer_id },
          el("span", { class: "swatch series-" + colorIndex(host.peer_id) }),
          el("span", { class: "host-name" }, hostLabel(host)),
          host.public_name ? el("span", { class: "peer-id" }, shortId(host.peer_id)) : null),
        el("td", { class: "num" }, `[${host.start}, ${host.end})`),
        el("td", {}, stateBadge(host),
          gone ? el("span", { class: "muted small" }, ` not seen for ${Math.round(host.gone_s)} s`) : null),
        el("td", { class: "num" }, gone ? "—" : formatNumber(host.throughput) + " tok/s"),
        el("td", { class: "num" }, gone ? "—" : formatNumber(host.cache_tokens_left, 0) + " tokens"),
        el("td", {}, host.version || "—"),
        el("td", {}, host.transport || "—"),
        el("td", {}, host.address_kind || "—"));
    });
    return el("div", { class: "table-wrap" },
      el("table", { class: "hosts" }, el("thead", {}, head), el("tbody", {}, ...rows)));
  }

  function relativeX() {
    const now = history.length ? history[history.length - 1].time_s : 0;
    const oldest = history.length ? history[0].time_s : now;
    return { now, xMin: Math.max(-windowS, oldest - now), xMax: 0 };
  }

  function minutesAgo(seconds) {
    if (Math.abs(seconds) < 1e-6) return "now";
    const minutes = -seconds / 60;
    return minutes >= 1 ? `-${formatNumber(minutes, 1)} min` : `-${formatNumber(-seconds, 1)} s`;
  }

  function throughputPlot(container, model) {
    const { now, xMin, xMax } = relativeX();
    const byHost = new Map();
    for (const sample of history) {
      const m = sample.models.find((x) => x.model === model.model);
      for (const host of m ? m.hosts : []) {
        if (!byHost.has(host.peer_id)) byHost.set(host.peer_id, { host, points: [] });
        byHost.get(host.peer_id).points.push([sample.time_s - now, host.throughput ?? NaN]);
      }
    }
    const series = [...byHost.values()].map(({ host, points }) => ({
      name: hostLabel(host) + ` [${host.start}, ${host.end})`,
      points,
      cls: "series-" + colorIndex(host.peer_id),
    }));
    linePlot(container, series, {
      label: `Announced throughput of each host of ${model.model}`,
      yLabel: "tok/s",
      xFormat: minutesAgo,
      yFormat: (v) => formatNumber(v, 0),
      xMin,
      xMax,
      empty: "No samples yet.",
    });
  }

  function modelCard(model) {
    const coverage = gaps(model);
    const hosts = [...model.hosts, ...goneHosts(model)].sort(
      (a, b) => a.start - b.start || (a.gone_s !== undefined) - (b.gone_s !== undefined) ||
        a.peer_id.localeCompare(b.peer_id));
    const online = model.hosts.filter((h) => h.state === "online").length;
    const ready = model.ready !== undefined ? model.ready : coverage.ranges.length === 0;
    const card = el("section", { class: "card model", "aria-labelledby": "model-" + model.model },
      el("div", { class: "model-head" },
        el("h2", { id: "model-" + model.model }, model.model),
        el("span", { class: "badge " + (ready ? "ok" : "bad"), "data-testid": "serve-state" },
          ready ? "Can serve now" : "Cannot serve now")),
      el("p", { class: "muted" },
        `${model.covered_blocks} of ${model.num_blocks} blocks covered · ${online} of ` +
          `${model.hosts.length} listed hosts online`),
    );
    if (coverage.ranges.length) {
      card.append(el("p", { class: "alert", role: "alert" },
        "Not served by any online host: " + coverage.ranges.map(rangeText).join(", ") + "."));
    } else if (!ready) {
      card.append(el("p", { class: "alert warn" },
        "Every block has a host, but no route is usable now (hosts busy, banned or out of cache)."));
    }
    card.append(el("h3", {}, "Blocks"), blockMap(model, hosts, coverage), mapLegend());
    card.append(el("h3", {}, "Hosts"));
    card.append(hosts.length ? hostTable(hosts) : el("p", { class: "muted" }, "No host serves this model."));
    const plot = el("div", { class: "plot" });
    card.append(el("h3", {}, "Throughput of each host"), plot);
    throughputPlot(plot, model);
    return card;
  }

  function ratePlot() {
    const { now, xMin, xMax } = relativeX();
    const points = history.map((s) => [s.time_s - now, s.tokens_per_s]);
    linePlot(document.getElementById("rate-plot"), [{ name: "tokens/s", points, cls: "series-rate" }], {
      label: "Tokens generated per second by this API",
      yLabel: "tok/s",
      xFormat: minutesAgo,
      yFormat: (v) => formatNumber(v, 1),
      xMin,
      xMax,
      legend: false,
      empty: "No samples yet.",
    });
  }

  let lastSwarm = null;
  let drawnState = ""; // what the page shows now: redraw only when it changes

  function draw() {
    if (lastSwarm === null) return;
    const state = JSON.stringify(lastSwarm) + "|" + history.length + "|" +
      (history.length ? history[history.length - 1].time_s : "");
    if (state === drawnState) return; // keeps a visitor's text selection between changes
    drawnState = state;
    const container = document.getElementById("models");
    const cards = lastSwarm.models.map(modelCard);
    container.replaceChildren(...(cards.length ? cards : [el("p", { class: "card muted" }, "No model is served.")]));
    ratePlot();
  }

  async function pollSwarm() {
    const status = document.getElementById("monitor-status");
    try {
      lastSwarm = await getJson("/v1/swarm");
      status.textContent =
        (lastSwarm.ready ? "Ready" : "Not ready") +
        " · updated " + new Date().toLocaleTimeString("en-GB");
      status.classList.remove("error");
      draw();
    } catch (error) {
      status.textContent = "Cannot read /v1/swarm: " + error.message;
      status.classList.add("error");
    }
  }

  async function pollHistory() {
    const since = history.length ? history[history.length - 1].time_s : null;
    const query = since === null ? "" : "?since=" + encodeURIComponent(since);
    try {
      const body = await getJson("/v1/swarm/history" + query);
      windowS = body.window_s;
      intervalS = body.interval_s;
      document.getElementById("interval").textContent = formatNumber(intervalS, 1);
      document.getElementById("window").textContent = formatNumber(windowS / 60, 1);
      history = history.concat(body.data);
      const cutoff = history.length ? history[history.length - 1].time_s - windowS : 0;
      history = history.filter((s) => s.time_s >= cutoff);
    } catch (_) {
      /* the swarm poll reports errors */
    }
  }

  async function loop(poll, periodMs) {
    for (;;) {
      if (!document.hidden) await poll();
      await new Promise((resolve) => setTimeout(resolve, periodMs()));
    }
  }

  document.addEventListener("DOMContentLoaded", async () => {
    await pollHistory();
    loop(pollSwarm, () => POLL_MS);
    loop(pollHistory, () => intervalS * 1000);
  });
})();
