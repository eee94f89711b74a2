// The run page's curves: each <figure data-series> becomes an SVG line with one
// <circle class="point"> per step, redrawn from the run's metrics.json every 2 seconds,
// so a run is followed as it trains without reloading the page. No library, no build step.
"use strict";

(function () {
  const SVG = "http://www.w3.org/2000/svg";
  const WIDTH = 480, HEIGHT = 180;
  const LEFT = 58, RIGHT = 12, TOP = 10, BOTTOM = 24;
  const REFRESH_MS = 2000;

  function element(name, attributes, parent) {
    const node = document.createElementNS(SVG, name);
    for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
    parent.appendChild(node);
    return node;
  }

  function format(value) {
    const size = Math.abs(value);
    return size !== 0 && (size >= 1e5 || size < 1e-3) ? value.toExponential(2) : String(Number(value.toPrecision(4)));
  }

  // [low, high] with room around a flat series.
  function range(values) {
    let low = Math.min(...values), high = Math.max(...values);
    if (low === high) {
      const pad = Math.abs(low) * 0.1 || 1;
      low -= pad;
      high += pad;
    }
    return [low, high];
  }

  function label(svg, x, y, text, anchor) {
    element("text", { x, y, "text-anchor": anchor, class: "label" }, svg).textContent = text;
  }

  function draw(figure, steps, values) {
    const svg = figure.querySelector("svg");
    svg.replaceChildren();
    const points = steps.map((step, index) => [step, values[index]]).filter(([, value]) => value !== null);
    figure.dataset.points = String(points.length);
    const latest = figure.querySelector(".latest");
    latest.textContent = points.length ? "latest " + format(points[points.length - 1][1]) : "no steps yet";
    element("line", { x1: LEFT, y1: HEIGHT - BOTTOM, x2: WIDTH - RIGHT, y2: HEIGHT - BOTTOM, class: "axis" }, svg);
    element("line", { x1: LEFT, y1: TOP, x2: LEFT, y2: HEIGHT - BOTTOM, class: "axis" }, svg);
    if (!points.length) return;
    const [firstStep, lastStep] = range(points.map(([step]) => step));
    const [low, high] = range(points.map(([, value]) => value));
    const x = (step) => LEFT + ((step - firstStep) / (lastStep - firstStep)) * (WIDTH - LEFT - RIGHT);
    const y = (value) => TOP + ((high - value) / (high - low)) * (HEIGHT - TOP - BOTTOM);
    label(svg, LEFT - 4, TOP + 8, format(high), "end");
    label(svg, LEFT - 4, HEIGHT - BOTTOM, format(low), "end");
    label(svg, LEFT, HEIGHT - 6, "step " + points[0][0], "start");
    label(svg, WIDTH - RIGHT, HEIGHT - 6, "step " + points[points.length - 1][0], "end");
    const line = points.map(([step, value]) => x(step).toFixed(1) + "," + y(value).toFixed(1)).join(" ");
    element("polyline", { points: line, class: "line" }, svg);
    for (const [step, value] of points) {
      const dot = element("circle", { cx: x(step), cy: y(value), r: 2.5, class: "point" }, svg);
      dot.dataset.step = String(step);
      dot.dataset.value = String(value);
      element("title", {}, dot).textContent = "step " + step + ": " + format(value);
    }
  }

  async function refresh(main) {
    const response = await fetch(main.dataset.metricsUrl, { credentials: "same-origin", cache: "no-store" });
    if (!response.ok) return;
    const columns = await response.json();
    for (const figure of main.querySelectorAll("figure[data-series]")) {
      draw(figure, columns.step, columns[figure.dataset.series]);
    }
    document.getElementById("steps").textContent = String(columns.steps);
    const status = document.getElementById("status");
    status.textContent = columns.status;
    status.className = "status " + columns.status;
  }

  const main = document.querySelector("main[data-metrics-url]");
  if (main) {
    const tick = () => refresh(main).catch(() => {}).finally(() => setTimeout(tick, REFRESH_MS));
    tick();
  }
})();
