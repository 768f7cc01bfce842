// Models (GET /v1/models: aliases and what they point at, prices) and every engine's health with its
// upstream targets' circuit state (GET /health; addresses and error text only for an admin).
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);

  function table(headers, rows) {
    const t = r1.el("table", "data");
    const head = r1.el("tr");
    for (const h of headers) head.append(r1.el("th", "", h));
    t.append(r1.el("thead"), r1.el("tbody"));
    t.tHead.append(head);
    for (const cells of rows) {
      const tr = r1.el("tr");
      for (const c of cells) tr.append(r1.el("td", "", c === undefined || c === null ? "–" : String(c)));
      t.tBodies[0].append(tr);
    }
    return t;
  }

  async function models() {
    const body = await r1.apiJSON("/v1/models");
    const rows = body.data.map((m) => [m.id, m.root && m.root !== m.id ? "→ " + m.root : "", m.owned_by]);
    $("models-table").replaceChildren(table(["id", "alias of", "owned by"], rows));
  }

  async function health() {
    const response = await r1.api("/health");
    const body = await response.json(); // 503 (degraded) still has the body
    $("health-status").textContent = "Server: " + body.status + " · default model " + body.model;
    const rows = [];
    for (const e of body.engines || []) {
      const name = e.route || e.model || e.name || "engine";
      if (Array.isArray(e.targets)) {
        rows.push([name, "group (" + e.policy + ")", e.status, "", "", "", ""]);
        for (const t of e.targets) {
          rows.push(["  " + t.name, t.kind, t.status, t.circuit, t.outstanding, t.requests, t.failures]);
        }
      } else {
        rows.push([name, e.kind || e.engine || "embedded", e.status, e.circuit, e.running, e.requests, e.failures]);
      }
    }
    const headers = ["engine / target", "kind", "status", "circuit", "outstanding", "requests", "failures"];
    $("health-table").replaceChildren(table(headers, rows));
  }

  Promise.all([models(), health()])
    .then(() => { document.body.dataset.loaded = "1"; })
    .catch((e) => { $("health-status").textContent = e.message; });
})();
