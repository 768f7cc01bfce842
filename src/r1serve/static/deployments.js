// Deployments (admin): the list with each endpoint URL and a copy button, create from a template, and one
// deployment's detail (replicas, events, live logs; stop, start, extend, scale). Everything goes through
// the deployments API as console calls; the API's error message is what the page shows.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const enc = encodeURIComponent;
  // The log view keeps this many lines: a chatty replica cannot grow the DOM without bound.
  const MAX_LOG_LINES = 400;
  const POLL_MS = 1500;
  // Which operations each status allows (the server's ALLOWED_FROM, so buttons are not offered in vain).
  const STOPPABLE = ["STARTING", "RUNNING", "ERROR"];
  const STARTABLE = ["DRAFT", "STOPPED", "ERROR", "INSUFFICIENT_FUNDS"];

  let selected = null; // the name of the deployment in the detail view
  let current = null; // its last state from the server
  let follow = null; // { name, controller } of the log stream being read
  let pending = []; // log lines received, not yet in the DOM (flushed once per frame)
  let flushing = false;
  let keyed = true; // whether calls need a key (not on an open server): the curl snippet then names one
  let stick = true; // keep the log view at its newest line, unless the reader scrolled up

  function copyButton(url, id) {
    const button = r1.el("button", "copy-url", "Copy URL");
    button.type = "button";
    if (id) button.id = id;
    button.dataset.url = url;
    button.addEventListener("click", () => copy(button));
    return button;
  }

  function copy(button) {
    const url = button.dataset.url;
    const done = () => {
      button.textContent = "Copied";
      setTimeout(() => { button.textContent = "Copy URL"; }, 1500);
    };
    if (navigator.clipboard) navigator.clipboard.writeText(url).then(done, () => {});
  }

  function readyCount(d) {
    return (d.replicas_detail || []).filter((r) => r.status === "READY").length;
  }

  function timeLeft(d) {
    if (!d.expires_at || !["STARTING", "RUNNING"].includes(d.status)) return "–";
    const minutes = Math.max(0, Math.floor((Date.parse(d.expires_at) - Date.now()) / 60000));
    return minutes >= 60 ? Math.floor(minutes / 60) + " h " + (minutes % 60) + " min" : minutes + " min";
  }

  function dollars(value) {
    return "$" + r1.number(value, 6);
  }

  function status(text) {
    const span = r1.el("span", "badge", text);
    span.dataset.status = text;
    return span;
  }

  // ------------------------------------------------------------------------- the list

  function renderList(deployments) {
    $("list-empty").hidden = deployments.length > 0;
    if (!deployments.length) {
      $("deployments-table").replaceChildren();
      return;
    }
    const table = r1.el("table", "data");
    const head = r1.el("tr");
    for (const h of ["name", "status", "ready", "strategy", "time left", "cost", "endpoint URL"]) {
      head.append(r1.el("th", h === "cost" ? "num" : "", h));
    }
    table.append(r1.el("thead"), r1.el("tbody"));
    table.tHead.append(head);
    for (const d of deployments) {
      const tr = r1.el("tr");
      tr.dataset.name = d.name;
      tr.dataset.status = d.status;
      const name = r1.el("td");
      const open = r1.el("a", "", d.name);
      open.href = "#" + d.name;
      name.append(open);
      tr.append(name);
      const st = r1.el("td");
      st.append(status(d.status));
      tr.append(st);
      const cells = [[readyCount(d) + " / " + d.replicas, "ready"], [d.strategy, "strategy"],
        [timeLeft(d), "left"], [dollars(d.cost), "cost"]];
      for (const [text, field] of cells) {
        const td = r1.el("td", field === "cost" ? "num" : "", text);
        td.dataset.field = field;
        tr.append(td);
      }
      const url = r1.el("td", "endpoint");
      url.append(r1.el("code", "", d.endpoints[0].url), " ", copyButton(d.endpoints[0].url));
      tr.append(url);
      if (d.name === selected) tr.setAttribute("aria-current", "true");
      table.tBodies[0].append(tr);
    }
    $("deployments-table").replaceChildren(table);
  }

  async function refresh() {
    const body = await r1.apiJSON("/v1/deployments");
    $("list-error").textContent = "";
    renderList(body.data);
    if (selected) {
      const d = body.data.find((x) => x.name === selected);
      if (d) renderDetail(d);
    }
    document.body.dataset.loaded = "1";
  }

  async function poll() {
    // A background tab asks nothing; it catches up when shown again.
    if (!document.hidden) {
      try {
        await refresh();
      } catch (e) {
        $("list-error").textContent = e.message;
      }
    }
    setTimeout(poll, POLL_MS);
  }

  // ------------------------------------------------------------------------- one deployment

  // A ready-to-paste request to the endpoint URL, as `r1serve deploy create` prints: no model in the body
  // (the URL chooses it), and $R1SERVE_API_KEY where a key goes (the console itself holds none).
  function curl(url) {
    const body = JSON.stringify({ messages: [{ role: "user", content: "Hello!" }], max_tokens: 64 });
    const lines = ["curl -X POST " + url + "/chat/completions", "  -H 'Content-Type: application/json'"];
    if (keyed) lines.push('  -H "Authorization: Bearer $R1SERVE_API_KEY"');
    lines.push("  -d '" + body + "'");
    return lines.join(" \\\n");
  }

  function renderDetail(d) {
    current = d;
    $("detail").hidden = false;
    $("detail").dataset.name = d.name;
    $("detail").dataset.status = d.status;
    $("detail-title").textContent = d.name;
    $("detail-status").replaceWith(Object.assign(status(d.status), { id: "detail-status" }));
    $("detail-summary").textContent = [d.template, d.strategy, readyCount(d) + " / " + d.replicas + " ready",
      "timeout " + r1.number(d.timeout, 2) + " min", "left " + timeLeft(d), "cost " + dollars(d.cost),
      dollars(d.price_per_hour) + " per replica-hour"].join(" · ");
    $("detail-url").textContent = d.endpoints[0].url;
    $("detail-copy").dataset.url = d.endpoints[0].url;
    $("detail-curl").textContent = curl(d.endpoints[0].url);
    $("op-stop").disabled = !STOPPABLE.includes(d.status);
    $("op-start").disabled = !STARTABLE.includes(d.status);
    for (const id of ["op-extend", "op-scale"]) $(id).disabled = d.status === "ARCHIVED";
    if (document.activeElement !== $("scale-replicas")) $("scale-replicas").value = d.replicas;

    const reps = r1.el("table", "data");
    const head = r1.el("tr");
    for (const h of ["replica", "status", "pid", "port", "restarts", "requests", "in flight", "last error"]) head.append(r1.el("th", "", h));
    reps.append(r1.el("thead"), r1.el("tbody"));
    reps.tHead.append(head);
    for (const rep of d.replicas_detail || []) {
      const tr = r1.el("tr");
      tr.dataset.replica = rep.name;
      tr.dataset.status = rep.status;
      tr.append(r1.el("td", "", rep.name));
      const st = r1.el("td");
      st.append(status(rep.status));
      tr.append(st);
      for (const [v, field] of [[rep.pid, "pid"], [rep.port, "port"], [rep.restarts, "restarts"],
        [rep.requests, "requests"], [rep.outstanding, "outstanding"]]) {
        const td = r1.el("td", "", v === null || v === undefined ? "–" : String(v));
        td.dataset.field = field;
        tr.append(td);
      }
      tr.append(r1.el("td", "", rep.last_error || ""));
      reps.tBodies[0].append(tr);
    }
    $("replicas-table").replaceChildren(reps);
    const sources = $("logs-source");
    for (const rep of d.replicas_detail || []) {
      if (![...sources.options].some((o) => o.value === rep.name)) sources.append(new Option(rep.name, rep.name));
    }

    const events = r1.el("table", "data");
    const ehead = r1.el("tr");
    for (const h of ["time", "reason", "replica", "message"]) ehead.append(r1.el("th", "", h));
    events.append(r1.el("thead"), r1.el("tbody"));
    events.tHead.append(ehead);
    // Newest first: the latest change is what one looks for.
    for (const ev of (d.events || []).slice().reverse()) {
      const tr = r1.el("tr");
      tr.dataset.reason = ev.reason;
      for (const v of [ev.time.replace("T", " ").replace("Z", ""), ev.reason, ev.replica || "", ev.message]) tr.append(r1.el("td", "", v));
      events.tBodies[0].append(tr);
    }
    $("events-table").replaceChildren(events);
  }

  async function select(name) {
    if (!name || name === selected) return;
    selected = name;
    $("detail-error").textContent = "";
    $("logs-source").replaceChildren(new Option("all", ""), new Option("supervisor", "supervisor"));
    try {
      renderDetail(await r1.apiJSON("/v1/deployments/" + enc(name)));
    } catch (e) {
      $("detail").hidden = false;
      $("detail-title").textContent = name;
      $("detail-error").textContent = e.message;
      return;
    }
    $("detail-title").focus();
    followLogs(name);
  }

  // ------------------------------------------------------------------------- live logs

  // The follow endpoint is SSE; read it with fetch (EventSource cannot send the console's header).
  async function followLogs(name) {
    if (follow) follow.controller.abort();
    const controller = new AbortController();
    follow = { name, controller };
    $("logs").replaceChildren();
    pending = [];
    stick = true;
    const source = $("logs-source").value;
    $("logs").dataset.source = source;
    $("logs-state").textContent = "following";
    try {
      const query = "?follow=true&tail=" + MAX_LOG_LINES + (source ? "&replica=" + enc(source) : "");
      const response = await r1.api("/v1/deployments/" + enc(name) + "/logs" + query, { signal: controller.signal });
      if (!response.ok) throw new Error(await r1.errorText(response));
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done || controller.signal.aborted) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          for (const line of event.split("\n")) {
            if (line.startsWith("data: ")) receive(JSON.parse(line.slice(6)));
          }
        }
      }
      if (follow && follow.controller === controller) $("logs-state").textContent = "stream ended";
    } catch (e) {
      if (controller.signal.aborted) return;
      $("logs-state").textContent = "";
      $("detail-error").textContent = e.message;
    }
  }

  function receive(line) {
    pending.push(line);
    // Only the last MAX_LOG_LINES can be shown: the rest need not even become elements.
    if (pending.length > MAX_LOG_LINES) pending = pending.slice(-MAX_LOG_LINES);
    if (!flushing) {
      flushing = true;
      requestAnimationFrame(flush);
    }
  }

  function flush() {
    flushing = false;
    const list = $("logs");
    const fragment = document.createDocumentFragment();
    for (const line of pending) {
      const li = r1.el("li");
      li.dataset.source = line.source;
      li.append(r1.el("span", "log-time", line.time.slice(11, 23)), r1.el("span", "log-source", line.source),
        r1.el("span", "log-text", line.line));
      fragment.append(li);
    }
    pending = [];
    list.append(fragment);
    while (list.childElementCount > MAX_LOG_LINES) list.firstElementChild.remove();
    if (stick) list.scrollTop = list.scrollHeight;
  }

  $("logs").addEventListener("scroll", () => {
    const list = $("logs");
    stick = list.scrollHeight - list.scrollTop - list.clientHeight < 24;
  });
  // A reflow (a narrower window, wrapped lines) moves the newest line out of view without a scroll event.
  new ResizeObserver(() => { if (stick) $("logs").scrollTop = $("logs").scrollHeight; }).observe($("logs"));
  $("logs-source").addEventListener("change", () => { if (selected) followLogs(selected); });

  // ------------------------------------------------------------------------- operations

  async function operate(button, path, body) {
    if (!current) return;
    $("detail-error").textContent = "";
    button.disabled = true;
    try {
      const d = await r1.apiJSON("/v1/deployments/" + enc(current.name) + "/" + path,
        { method: "POST", json: body === undefined ? {} : body });
      renderDetail(d);
      if (path === "start") followLogs(current.name);
      await refresh();
    } catch (e) {
      $("detail-error").textContent = e.message;
      if (current) renderDetail(current);
    }
  }

  $("op-stop").addEventListener("click", (e) => operate(e.currentTarget, "stop"));
  $("op-start").addEventListener("click", (e) => operate(e.currentTarget, "start"));
  $("op-extend").addEventListener("click", (e) =>
    operate(e.currentTarget, "extend", { minutes: Number($("extend-minutes").value) }));
  $("op-scale").addEventListener("click", (e) =>
    operate(e.currentTarget, "scale", { replicas: parseInt($("scale-replicas").value, 10) }));
  $("detail-copy").addEventListener("click", (e) => copy(e.currentTarget));

  // ------------------------------------------------------------------------- create

  async function loadTemplates() {
    const body = await r1.apiJSON("/v1/deployment-templates");
    const select = $("dep-template");
    for (const t of body.data) {
      const option = r1.el("option", "", t.id + (t.local ? "" : " (downloads its weights)"));
      option.value = t.id;
      select.append(option);
    }
    // The first template whose weights are here: it starts without the internet.
    const local = body.data.find((t) => t.local);
    if (local) select.value = local.id;
    const describe = () => {
      const t = body.data.find((x) => x.id === select.value);
      $("template-info").textContent = t ? t.description + " " + dollars(t.price_per_hour) + " per replica-hour." : "";
    };
    select.addEventListener("change", describe);
    describe();
  }

  $("dep-strategy").addEventListener("change", () => {
    $("dep-schedule-label").hidden = $("dep-strategy").value !== "SCHEDULED";
  });

  $("create-deployment").addEventListener("submit", async (event) => {
    event.preventDefault();
    $("create-error").textContent = "";
    const body = {
      name: $("dep-name").value.trim(),
      template: $("dep-template").value,
      replicas: parseInt($("dep-replicas").value, 10),
      strategy: $("dep-strategy").value,
      timeout: Number($("dep-timeout").value),
    };
    if (body.strategy === "SCHEDULED") body.schedule = $("dep-schedule").value.trim();
    $("create-submit").disabled = true;
    try {
      const d = await r1.apiJSON("/v1/deployments", { method: "POST", json: body });
      $("dep-name").value = "";
      location.hash = d.name; // the detail view shows the start as it happens
    } catch (e) {
      $("create-error").textContent = e.message;
    } finally {
      $("create-submit").disabled = false;
    }
  });

  window.addEventListener("hashchange", () => select(decodeURIComponent(location.hash.slice(1))));

  r1.session.then((state) => {
    keyed = !state.open;
    loadTemplates().catch((e) => { $("create-error").textContent = e.message; });
    poll();
    if (location.hash.length > 1) select(decodeURIComponent(location.hash.slice(1)));
  });
})();
