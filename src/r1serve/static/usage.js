// Usage over time by model and by key. Each chart is ONE server-side grouped query
// (GET /v1/usage/series?by=model|key: per day and series, every ledger row counted), so its totals never
// come from one page of rows. An admin sees every key; any other key sees its own usage.
"use strict";
(function () {
  const metric = document.getElementById("metric");
  const since = document.getElementById("since");
  const status = document.getElementById("usage-status");
  const data = { model: [], key: [] };
  const start = new Date(Date.now() - 29 * 86400000);
  since.value = start.toISOString().slice(0, 10);

  // Axis ticks (tick = true) of a small count keep a decimal: 0, 0.5, 1 rather than 0, 1, 1.
  function format(v, tick) {
    if (metric.value === "cost_usd") return "$" + r1.number(v, 6);
    return r1.number(v, tick && v < 10 ? 1 : 0);
  }

  function seriesName(by, row) {
    if (by === "model") return row.model;
    return row.key_prefix ? row.key_name + " (" + row.key_prefix + ")" : row.key_name;
  }

  function draw(by) {
    const rows = data[by];
    const days = [...new Set(rows.map((r) => r.date))].sort();
    const byName = new Map();
    const totals = new Map();
    const FIELDS = ["requests", "prompt_tokens", "reasoning_tokens", "answer_tokens", "cost_usd"];
    for (const row of rows) {
      const name = seriesName(by, row);
      if (!byName.has(name)) byName.set(name, { name, values: {} });
      byName.get(name).values[row.date] = (byName.get(name).values[row.date] || 0) + row[metric.value];
      const t = totals.get(name) || Object.fromEntries(FIELDS.map((f) => [f, 0]));
      for (const f of FIELDS) t[f] += row[f];
      totals.set(name, t);
    }
    r1chart.stacked(document.getElementById("chart-" + by), days, [...byName.values()], format);
    const table = r1.el("table", "data");
    table.dataset.by = by;
    const head = r1.el("tr");
    for (const h of [by, "requests", "prompt", "reasoning", "answer", "cost"]) head.append(r1.el("th", "", h));
    table.append(r1.el("thead"), r1.el("tbody"));
    table.tHead.append(head);
    for (const [name, t] of totals) {
      const tr = r1.el("tr");
      tr.dataset.series = name;
      tr.append(r1.el("td", "", name));
      for (const f of FIELDS) {
        const td = r1.el("td", "num", f === "cost_usd" ? "$" + r1.number(t[f], 6) : r1.number(t[f]));
        td.dataset.field = f;
        tr.append(td);
      }
      table.tBodies[0].append(tr);
    }
    document.getElementById("table-" + by).replaceChildren(table);
  }

  async function load() {
    status.textContent = "Loading…";
    try {
      const q = since.value ? "&since=" + encodeURIComponent(since.value) : "";
      const [model, key] = await Promise.all([
        r1.apiJSON("/v1/usage/series?by=model" + q), r1.apiJSON("/v1/usage/series?by=key" + q),
      ]);
      data.model = model.data;
      data.key = key.data;
      draw("model");
      draw("key");
      status.textContent = "";
      document.body.dataset.loaded = String(Date.now());
    } catch (e) {
      status.textContent = e.status === 401 ? "Your session has ended: sign in again." : e.message;
    }
  }

  metric.addEventListener("change", () => { draw("model"); draw("key"); });
  document.getElementById("usage-controls").addEventListener("submit", (event) => {
    event.preventDefault();
    load();
  });
  load();
})();
