// A small stacked bar chart in SVG, drawn by hand: one bar per day, one colour per series (CSS classes,
// so light and dark follow the page), a legend, and a title per segment for its value. Built with DOM
// calls (createElementNS, textContent): no markup strings, nothing inline.
"use strict";
(function () {
  const NS = "http://www.w3.org/2000/svg";
  const COLOURS = 8;

  function node(tag, attrs, text) {
    const n = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) n.setAttribute(k, String(v));
    if (text !== undefined) n.textContent = text;
    return n;
  }

  // days: sorted ["2026-12-01", ...]; series: [{name, values: {day: number}}]
  function stacked(container, days, series, format) {
    container.replaceChildren();
    if (!days.length) {
      container.append(r1.el("p", "muted small empty-chart", "No usage in this period."));
      return;
    }
    // Drawn at the container's own width, so its text stays at its CSS size on a 375 px phone too.
    const W = Math.max(300, Math.round(container.clientWidth || 640)), H = 220, left = 56, bottom = 28, top = 10, right = 8;
    const totals = days.map((d) => series.reduce((sum, s) => sum + (s.values[d] || 0), 0));
    const max = Math.max(...totals) || 1;
    const svg = node("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", class: "bars" });
    svg.append(node("title", {}, "Stacked bars: " + series.map((s) => s.name).join(", ")));
    for (const frac of [0, 0.5, 1]) {
      const y = top + (H - top - bottom) * (1 - frac);
      svg.append(node("line", { x1: left, x2: W - right, y1: y, y2: y, class: "grid" }));
      svg.append(node("text", { x: left - 6, y: y + 4, class: "axis", "text-anchor": "end" }, format(max * frac, true)));
    }
    const slot = (W - left - right) / days.length;
    const bar = Math.max(2, Math.min(48, slot * 0.7));
    days.forEach((day, i) => {
      let y = H - bottom;
      const x = left + slot * i + (slot - bar) / 2;
      series.forEach((s, j) => {
        const v = s.values[day] || 0;
        if (!v) return;
        const h = (H - top - bottom) * (v / max);
        y -= h;
        const rect = node("rect", { x, y, width: bar, height: Math.max(h, 0.5), class: "s" + (j % COLOURS) });
        rect.append(node("title", {}, `${day} · ${s.name}: ${format(v)}`));
        svg.append(rect);
      });
      if (days.length <= 14 || i % Math.ceil(days.length / 10) === 0) {
        svg.append(node("text", { x: x + bar / 2, y: H - 10, class: "axis", "text-anchor": "middle" }, day.slice(5)));
      }
    });
    const legend = r1.el("ul", "legend");
    series.forEach((s, j) => {
      const item = r1.el("li");
      const swatch = node("svg", { viewBox: "0 0 10 10", class: "swatch", "aria-hidden": "true" });
      swatch.append(node("rect", { width: 10, height: 10, class: "s" + (j % COLOURS) }));
      item.append(swatch, document.createTextNode(" " + s.name));
      legend.append(item);
    });
    container.append(svg, legend);
  }

  window.r1chart = { stacked };
})();
