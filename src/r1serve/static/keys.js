// API keys (admin): create (the key is shown once, then only its prefix exists anywhere), scopes and
// limits, revoke. Everything goes through the admin API as console calls.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const form = $("create-key");

  function optionalNumber(input, parse) {
    const text = input.value.trim();
    return text ? parse(text) : undefined;
  }

  function limits(k) {
    const parts = [];
    if (k.rpm !== null) parts.push(k.rpm + " req/min");
    if (k.tpm !== null) parts.push(k.tpm + " tok/min");
    if (k.budget_usd !== null) parts.push("$" + k.budget_usd + " / " + k.budget_period);
    return parts.join(", ") || "none";
  }

  async function revoke(key, button) {
    button.disabled = true;
    try {
      await r1.apiJSON("/v1/admin/keys/" + encodeURIComponent(key.id), { method: "DELETE" });
      await list();
    } catch (e) {
      $("keys-error").textContent = e.message;
      button.disabled = false;
    }
  }

  async function list() {
    const body = await r1.apiJSON("/v1/admin/keys");
    const table = r1.el("table", "data");
    const head = r1.el("tr");
    for (const h of ["name", "key", "models", "limits", "admin", "expires", "state", ""]) head.append(r1.el("th", "", h));
    table.append(r1.el("thead"), r1.el("tbody"));
    table.tHead.append(head);
    for (const k of body.data) {
      const tr = r1.el("tr");
      tr.dataset.key = k.prefix;
      const state = k.revoked_at ? "revoked" : k.active ? "active" : "expired";
      for (const text of [k.name, k.prefix, k.models ? k.models.join(", ") : "all", limits(k),
        k.admin ? "yes" : "no", k.expires_at ? k.expires_at.slice(0, 10) : "never", state]) {
        tr.append(r1.el("td", "", text));
      }
      const cell = r1.el("td");
      if (state !== "revoked") {
        const button = r1.el("button", "danger", "Revoke");
        button.type = "button";
        button.setAttribute("aria-label", "Revoke " + k.name);
        button.addEventListener("click", () => revoke(k, button));
        cell.append(button);
      }
      tr.append(cell);
      tr.dataset.state = state;
      table.tBodies[0].append(tr);
    }
    $("keys-table").replaceChildren(table);
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    $("create-error").textContent = "";
    const models = $("key-models").value.split(",").map((s) => s.trim()).filter(Boolean);
    const body = {
      name: $("key-name").value.trim(),
      models: models.length ? models : undefined,
      rpm: optionalNumber($("key-rpm"), (t) => parseInt(t, 10)),
      tpm: optionalNumber($("key-tpm"), (t) => parseInt(t, 10)),
      budget_usd: optionalNumber($("key-budget"), parseFloat),
      budget_period: $("key-period").value,
      expires_at: $("key-expires").value ? $("key-expires").value + "T00:00:00Z" : undefined,
      admin: $("key-admin").checked,
    };
    try {
      const created = await r1.apiJSON("/v1/admin/keys", { method: "POST", json: body });
      // Shown once: it lives in this element until "Done", and nowhere else in the page or the browser.
      $("new-key-value").textContent = created.key;
      $("new-key").hidden = false;
      $("copy-key").focus();
      form.reset();
      await list();
    } catch (e) {
      $("create-error").textContent = e.message;
    }
  });
  $("copy-key").addEventListener("click", () => {
    if (navigator.clipboard) navigator.clipboard.writeText($("new-key-value").textContent).catch(() => {});
  });
  $("dismiss-key").addEventListener("click", () => {
    $("new-key-value").textContent = "";
    $("new-key").hidden = true;
  });

  r1.session.then((s) => {
    if (s.open) {
      $("keys-open").hidden = false;
      $("keys-admin").hidden = true;
      $("keys-table").closest("section").hidden = true;
      return;
    }
    list().catch((e) => { $("keys-error").textContent = e.message; });
  });
})();
