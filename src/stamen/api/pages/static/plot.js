// `Stamen.linePlot(container, series, options)`: a small line chart in inline SVG, built
// with DOM calls (no library). series: [{name, points: [[x, y], ...], cls}], where cls
// picks the line's color class from stamen.css (`series-0` ... `series-7`).
// options: {xLabel, yLabel, xFormat(x) -> text, yFormat(y) -> text, xMin, xMax,
// height, empty, legend, yZero}. The SVG is drawn at its container's width, so text keeps
// its size on any screen; plots are drawn again when the window is resized.
"use strict";

(function () {
  const SVG = "http://www.w3.org/2000/svg"; // the SVG namespace name, not a fetched URL
  const FALLBACK_WIDTH = 640; // a container not laid out yet
  const MIN_WIDTH = 260;
  const drawn = new Map(); // container -> its last arguments, to redraw on resize
  const MARGIN = { top: 12, right: 14, bottom: 30, left: 52 };

  function svg(tag, attributes, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attributes || {})) node.setAttribute(name, value);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // Round tick steps (1, 2, 5 x 10^k) giving about `count` ticks over [low, high].
  function ticks(low, high, count) {
    if (!(high > low)) return [low];
    const raw = (high - low) / count;
    const power = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw);
    const first = Math.ceil(low / step) * step;
    const out = [];
    for (let value = first; value <= high + step * 1e-9; value += step) out.push(value);
    return out;
  }

  function extent(series, axis, fallback) {
    const values = series.flatMap((s) => s.points.map((p) => p[axis])).filter(Number.isFinite);
    if (!values.length) return fallback;
    // A loop, not Math.min(...values): spreading thousands of points can overflow the stack.
    let low = Infinity, high = -Infinity;
    for (const value of values) {
      if (value < low) low = value;
      if (value > high) high = value;
    }
    return [low, high];
  }

  function linePlot(container, series, options) {
    if (drawn.size > 64) {
      for (const old of drawn.keys()) if (!old.isConnected && old !== container) drawn.delete(old);
    }
    drawn.set(container, [series, options]);
    if (!container.isConnected) {
      // Built before being attached (a card is drawn whole, then shown): its width is
      // known at the next frame.
      requestAnimationFrame(() => container.isConnected && linePlot(container, series, options));
      return;
    }
    const o = Object.assign({ height: 200, xFormat: String, yFormat: String }, options || {});
    const height = o.height;
    const WIDTH = Math.max(MIN_WIDTH, Math.round(container.clientWidth || FALLBACK_WIDTH));
    const [xLow, xHigh] = [o.xMin, o.xMax].every(Number.isFinite)
      ? [o.xMin, o.xMax]
      : extent(series, 0, [0, 1]);
    let [yLow, yHigh] = extent(series, 1, [0, 1]);
    if (o.yZero !== false) yLow = Math.min(0, yLow);
    if (yHigh === yLow) yHigh = yLow + 1;
    const room = (yHigh - yLow) * 0.08; // so that no line runs along the frame
    yHigh += room;
    if (o.yZero === false) yLow -= room;
    const plotW = WIDTH - MARGIN.left - MARGIN.right;
    const plotH = height - MARGIN.top - MARGIN.bottom;
    const x = (v) => MARGIN.left + ((v - xLow) / (xHigh - xLow || 1)) * plotW;
    const y = (v) => MARGIN.top + plotH - ((v - yLow) / (yHigh - yLow)) * plotH;

    const root = svg("svg", {
      viewBox: `0 0 ${WIDTH} ${height}`,
      class: "line-plot",
      role: "img",
      "aria-label": o.label || "plot",
      preserveAspectRatio: "xMidYMid meet",
    });
    const grid = svg("g", { class: "grid" });
    for (const value of ticks(yLow, yHigh, 5)) {
      grid.append(svg("line", { x1: MARGIN.left, x2: WIDTH - MARGIN.right, y1: y(value), y2: y(value) }));
      grid.append(svg("text", { x: MARGIN.left - 6, y: y(value) + 4, class: "tick y" }, o.yFormat(value)));
    }
    for (const value of ticks(xLow, xHigh, 5)) {
      grid.append(svg("text", { x: x(value), y: height - 10, class: "tick x" }, o.xFormat(value)));
    }
    root.append(grid);
    root.append(
      svg("line", {
        class: "axis",
        x1: MARGIN.left,
        x2: WIDTH - MARGIN.right,
        y1: MARGIN.top + plotH,
        y2: MARGIN.top + plotH,
      }),
    );
    if (o.xLabel) {
      // Below the axis, left of the first tick: the corner no tick or line uses.
      root.append(svg("text", { class: "axis-label end", x: MARGIN.left - 12, y: height - 10 }, o.xLabel));
    }
    if (o.yLabel) {
      root.append(
        svg("text", { class: "axis-label", x: 12, y: MARGIN.top + plotH / 2,
          transform: `rotate(-90 12 ${MARGIN.top + plotH / 2})` }, o.yLabel),
      );
    }
    series.forEach((s, index) => {
      const points = s.points.filter((p) => Number.isFinite(p[0]) && Number.isFinite(p[1]));
      if (!points.length) return;
      const cls = "series " + (s.cls || "series-" + (index % 8));
      if (points.length === 1) {
        root.append(svg("circle", { class: cls + " dot", cx: x(points[0][0]), cy: y(points[0][1]), r: 3 }));
        return;
      }
      const d = points.map((p, i) => (i ? "L" : "M") + x(p[0]).toFixed(1) + " " + y(p[1]).toFixed(1)).join(" ");
      root.append(svg("path", { class: cls, d }));
    });

    const legend = document.createElement("ul");
    legend.className = "legend";
    series.forEach((s, index) => {
      const item = document.createElement("li");
      const swatch = document.createElement("span");
      swatch.className = "swatch " + (s.cls || "series-" + (index % 8));
      item.append(swatch, document.createTextNode(s.name));
      legend.append(item);
    });

    container.replaceChildren(root);
    if (series.length > 0 && o.legend !== false) container.append(legend);
    if (!series.some((s) => s.points.length) && o.empty) {
      const note = document.createElement("p");
      note.className = "plot-empty muted small";
      note.textContent = o.empty;
      container.append(note);
    }
  }

  let resizing = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizing);
    resizing = setTimeout(() => {
      for (const [container, [series, options]] of [...drawn]) {
        if (container.isConnected) linePlot(container, series, options);
        else drawn.delete(container);
      }
    }, 100);
  });

  window.Stamen = Object.assign(window.Stamen || {}, { linePlot });
})();
