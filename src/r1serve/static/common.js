// What every console page shares: the header's navigation and sign-in state, and `r1.api`, the one way
// pages call the server.
//
// A signed-in console holds no key: the browser sends the session cookie (HttpOnly, SameSite=Strict),
// and the server takes it only together with the X-R1serve-Console header, which `r1.api` adds and no
// other site's form or page can (see api/sessions.py).
"use strict";
(function () {
  const CSRF = { "X-R1serve-Console": "1" };

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = text;
    return node;
  }

  async function errorText(response) {
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) return body.error.message;
    } catch (e) { /* not JSON: the status says enough */ }
    return "HTTP " + response.status;
  }

  // fetch, same origin, with the console's header (and JSON in and out when a body is given).
  async function api(path, options) {
    const opts = Object.assign({ credentials: "same-origin" }, options || {});
    opts.headers = Object.assign({}, CSRF, opts.headers || {});
    if (opts.json !== undefined) {
      opts.headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(opts.json);
      delete opts.json;
    }
    return fetch(path, opts);
  }

  async function apiJSON(path, options) {
    const response = await api(path, options);
    if (!response.ok) {
      const error = new Error(await errorText(response));
      error.status = response.status;
      throw error;
    }
    return response.json();
  }

  const session = fetch("/console/session", { credentials: "same-origin" })
    .then((r) => r.json())
    .catch(() => ({ open: false, signed_in: false, admin: false }));

  const LINKS = [
    ["/", "Playground", "all"],
    ["/console/usage", "Usage", "all"],
    ["/console/keys", "Keys", "admin"],
    ["/console/models", "Models", "all"],
    ["/console/deployments", "Deployments", "admin"],
    ["/docs", "API docs", "all"],
  ];

  async function signOut() {
    await api("/console/session", { method: "DELETE" });
    location.assign("/console/signin");
  }

  async function header() {
    const top = document.getElementById("top");
    if (!top) return;
    const state = await session;
    const nav = el("nav", "links");
    nav.setAttribute("aria-label", "Console");
    for (const [href, label, who] of LINKS) {
      // Admin pages are listed for admin keys only (the server refuses them to others anyway).
      if (who === "admin" && !(state.admin || state.open)) continue;
      const a = el("a", "", label);
      a.href = href;
      if (location.pathname === href) a.setAttribute("aria-current", "page");
      nav.append(a);
    }
    const who = el("span", "who-am-i small");
    who.id = "who";
    if (state.signed_in) {
      who.append(el("span", "muted", (state.admin ? "admin · " : "") + state.name + " "));
      const out = el("button", "link", "Sign out");
      out.type = "button";
      out.id = "sign-out";
      out.addEventListener("click", signOut);
      who.append(out);
    } else if (state.open) {
      who.append(el("span", "muted", "open server (no keys)"));
    } else {
      const a = el("a", "", "Sign in");
      a.href = "/console/signin";
      a.id = "sign-in-link";
      who.append(a);
    }
    top.append(nav, who);
  }

  function number(value, digits) {
    if (value === undefined || value === null) return "–";
    return Number(value).toLocaleString("en-US", { maximumFractionDigits: digits === undefined ? 0 : digits });
  }

  window.r1 = { api, apiJSON, errorText, el, session, number };
  header();
})();
