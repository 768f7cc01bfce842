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
    const load = (e) => (e.slots !== undefined
      ? "running " + e.running + " · queued " + e.queued + " · slots " + e.slots : undefined);
    for (const e of body.engines || []) {
      const name = e.route || e.name || e.model || e.provider || "engine";
      if (Array.isArray(e.targets)) {
        rows.push([name, "group (" + e.policy + ")", e.status, "", "", ""]);
        for (const t of e.targets) {
          const counts = "outstanding " + t.outstanding + " · requests " + t.requests + " · failures " + t.failures;
          rows.push(["↳ " + t.name, t.kind, t.status, t.circuit, counts, t.last_error || (t.engine && load(t.engine))]);
        }
      } else {
        const kind = e.kind || (e.slots !== undefined ? "embedded" : undefined);
        const where = e.kind === "upstream" ? [e.provider, e.model, e.base_url].filter(Boolean).join(" · ") : load(e);
        rows.push([name, kind, e.status, e.circuit, where, e.last_error]);
      }
    }
    const headers = ["engine / target", "kind", "status", "circuit", "load", "detail"];
    $("health-table").replaceChildren(table(headers, rows));
  }

  Promise.all([models(), health()])
    .then(() => { document.body.dataset.loaded = "1"; })
    .catch((e) => { $("health-status").textContent = e.message; });
})();
