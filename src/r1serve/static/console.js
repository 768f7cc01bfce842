// The playground: chat with a model served here, streaming over fetch.
//
// Model output is untrusted. The reasoning reaches the page through textContent only; the answer as
// markdown through markdown.js (raw HTML shown as text, images never loaded, DOMPurify over the result),
// as DOM nodes, never an HTML string. The page's Content-Security-Policy is the second line behind that.
// The reasoning and the answer are re-rendered at most once per animation frame, however fast tokens
// arrive, so that long streams keep the page responsive (each message counts its renders in
// data-renders, which the tests compare with the frames that passed).
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const ui = {
    model: $("model"), modelNote: $("model-note"), system: $("system"), temperature: $("temperature"),
    topP: $("top_p"), maxTokens: $("max_tokens"), budget: $("max_reasoning_tokens"), apiKey: $("api-key"),
    newChat: $("new-chat"), messages: $("messages"), composer: $("composer"), prompt: $("prompt"),
    send: $("send"), stop: $("stop"), status: $("status"),
  };
  // The conversation as the API sees it: answers only, reasoning never goes back to the model.
  let history = [];
  let running = null; // the AbortController of the request in flight

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  let signedIn = false;
  r1.session.then((s) => {
    signedIn = !!s.signed_in;
    if (s.open) ui.apiKey.closest("label").nextElementSibling.textContent = "This server's API is open: no key is needed.";
    if (signedIn) {
      ui.apiKey.placeholder = "signed in as " + s.name;
      ui.apiKey.closest("label").nextElementSibling.textContent = "Signed in: the console's session is used unless you enter a key.";
    }
  });

  function headers() {
    // The console's header: with it, a signed-in session's cookie counts (api/sessions.py).
    const h = { "Content-Type": "application/json", "X-R1serve-Console": "1" };
    // A key typed here lives in this input only: no cookie, no storage.
    const key = ui.apiKey.value.trim();
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  async function errorText(response) {
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) return body.error.message;
    } catch (e) { /* not JSON: the status says enough */ }
    return "HTTP " + response.status;
  }

  async function loadModels() {
    ui.status.textContent = "Loading models…";
    try {
      const response = await fetch("/v1/models", { headers: headers() });
      if (!response.ok) {
        ui.status.textContent = response.status === 401
          ? "This server needs an API key: sign in, or enter it on the left."
          : await errorText(response);
        return;
      }
      const list = (await response.json()).data || [];
      const previous = ui.model.value;
      ui.model.replaceChildren();
      for (const card of list) {
        const label = card.root && card.root !== card.id ? card.id + " → " + card.root : card.id;
        const option = el("option", "", label);
        option.value = card.id;
        option.dataset.root = card.root || card.id;
        ui.model.append(option);
      }
      if (previous && list.some((c) => c.id === previous)) ui.model.value = previous;
      showModelNote();
      ui.status.textContent = list.length ? "" : "No models are served.";
    } catch (e) {
      ui.status.textContent = "Could not reach the server: " + e.message;
    }
  }

  function showModelNote() {
    const option = ui.model.selectedOptions[0];
    ui.modelNote.textContent = option && option.dataset.root !== option.value
      ? "An alias of " + option.dataset.root : "";
  }

  function numberField(input, parse) {
    const text = input.value.trim();
    if (!text) return undefined; // blank: the model's default
    const value = parse(text);
    return Number.isFinite(value) ? value : undefined;
  }

  function requestBody(messages) {
    const body = {
      model: ui.model.value, messages, stream: true, stream_options: { include_usage: true },
    };
    const fields = {
      temperature: numberField(ui.temperature, parseFloat),
      top_p: numberField(ui.topP, parseFloat),
      max_tokens: numberField(ui.maxTokens, (t) => parseInt(t, 10)),
      max_reasoning_tokens: numberField(ui.budget, (t) => parseInt(t, 10)),
    };
    for (const [name, value] of Object.entries(fields)) if (value !== undefined) body[name] = value;
    return body;
  }

  function addUserMessage(text) {
    const item = el("li", "msg user");
    item.append(el("div", "who", "You"), el("div", "text", text));
    ui.messages.append(item);
  }

  // One assistant message: its elements, its streamed text, its timings, rendered once per frame.
  function assistantView() {
    const item = el("li", "msg assistant");
    const details = el("details", "reasoning empty");
    details.open = true;
    const summary = el("summary", "", "Thinking…");
    const reasoningText = el("div", "text reasoning-text");
    details.append(summary, reasoningText);
    const answer = el("div", "answer markdown");
    const stats = el("dl", "stats");
    item.append(el("div", "who", "Assistant"), details, answer, stats);
    ui.messages.append(item);

    const view = {
      item, details, summary, answer, stats,
      reasoning: "", content: "", reasoningChunks: 0, truncated: false, usage: null, requestId: "",
      sent: performance.now(), firstToken: 0, firstReasoning: 0, firstAnswer: 0, ended: 0, pending: false,
      renders: 0, chunks: 0, shownReasoning: "", shownContent: "",
    };
    // While streaming, the blocks that are complete (up to the last blank line outside a code fence) are
    // rendered once and kept; each frame re-renders only the growing tail, so a frame's work stays small
    // however long the answer gets. When the stream ends the whole answer is rendered as one document
    // (a list or a link reference spanning blocks comes out right).
    const done = el("div", "md-done");
    const tail = el("div", "md-tail");
    let doneUpTo = 0; // content[0:doneUpTo] is rendered into `done`
    let scanFrom = 0; // where the next scan for a block end starts (never inside a code fence)
    let inFence = false;
    function blockEnd() {
      const text = view.content;
      let end = doneUpTo;
      let i = scanFrom;
      for (;;) {
        const nl = text.indexOf("\n", i);
        if (nl < 0) break;
        const line = text.slice(i, nl).trim();
        if (line.startsWith("```") || line.startsWith("~~~")) inFence = !inFence;
        else if (!line && !inFence) end = nl + 1;
        i = nl + 1;
      }
      // Resume at the last complete line next time, and only from outside a fence with known state.
      scanFrom = i;
      return end;
    }
    function renderAnswer(final) {
      if (final) {
        answer.replaceChildren(r1markdown.render(view.content));
        return;
      }
      if (!done.isConnected) answer.replaceChildren(done, tail);
      const end = blockEnd();
      if (end > doneUpTo) {
        done.append(r1markdown.render(view.content.slice(doneUpTo, end)));
        doneUpTo = end;
      }
      tail.replaceChildren(r1markdown.render(view.content.slice(doneUpTo)));
    }
    view.render = function (_frameTime, final) {
      view.pending = false;
      view.renders += 1;
      item.dataset.renders = String(view.renders);
      item.dataset.chunks = String(view.chunks);
      if (view.shownReasoning !== view.reasoning) {
        reasoningText.textContent = view.reasoning;
        view.shownReasoning = view.reasoning;
      }
      if (view.shownContent !== view.content || final) {
        renderAnswer(!!final);
        view.shownContent = view.content;
      }
      if (view.reasoning) details.classList.remove("empty");
    };
    view.schedule = function () {
      if (!view.pending) {
        view.pending = true;
        requestAnimationFrame(view.render);
      }
    };
    return view;
  }

  function thoughtSummary(view) {
    const until = view.firstAnswer || view.ended || performance.now();
    const seconds = Math.max(0, (until - view.firstReasoning) / 1000);
    const details = view.usage && view.usage.completion_tokens_details;
    const tokens = details && details.reasoning_tokens ? details.reasoning_tokens : view.reasoningChunks;
    let text = "Thought for " + seconds.toFixed(1) + " s";
    if (view.ended) text += " · " + tokens + " tokens";
    if (view.truncated) text += " · cut by the thinking budget";
    return text;
  }

  function startAnswer(view) {
    // The answer begins: the panel closes (the user may open it again) and says how long it took.
    view.firstAnswer = performance.now();
    view.details.open = false;
    view.summary.textContent = thoughtSummary(view);
  }

  function showStats(view, note) {
    const usage = view.usage || {};
    const reasoningTokens = (usage.completion_tokens_details || {}).reasoning_tokens;
    const completion = usage.completion_tokens;
    const answerTokens = completion !== undefined && reasoningTokens !== undefined ? completion - reasoningTokens : undefined;
    const ms = (t) => (t ? Math.round(t - view.sent) + " ms" : "–");
    const genSeconds = view.firstToken && view.ended > view.firstToken ? (view.ended - view.firstToken) / 1000 : 0;
    const rows = [
      ["prompt_tokens", "prompt", usage.prompt_tokens],
      ["reasoning_tokens", "reasoning", reasoningTokens],
      ["answer_tokens", "answer", answerTokens],
      ["ttft", "first token", ms(view.firstToken)],
      ["ttfa", "first answer token", ms(view.firstAnswer)],
      ["tokens_per_s", "tokens/s", completion && genSeconds ? (completion / genSeconds).toFixed(1) : undefined],
      ["cost", "cost", usage.estimated_cost !== undefined && usage.estimated_cost !== null ? "$" + usage.estimated_cost : undefined],
      ["request_id", "request id", view.requestId || undefined],
    ];
    view.stats.replaceChildren();
    for (const [key, label, value] of rows) {
      if (value === undefined || value === null) continue;
      const row = el("div");
      row.dataset.stat = key;
      row.append(el("dt", "", label), el("dd", "", String(value)));
      view.stats.append(row);
    }
    if (note) view.stats.append(el("div", "note", note));
  }

  // "Copy as curl / Python": the exact request, with $R1SERVE_API_KEY where the key was. The JSON has its
  // single quotes escaped (\u0027, the same JSON), so it sits in shell and Python quotes unchanged.
  function snippets(body, keyed) {
    const json = JSON.stringify(body, null, 2).replaceAll("'", "\\u0027");
    const url = location.origin + "/v1/chat/completions";
    const curl = ["curl -N " + url, "  -H 'Content-Type: application/json'"];
    if (keyed) curl.push('  -H "Authorization: Bearer $R1SERVE_API_KEY"');
    curl.push("  -d '" + json + "'");
    const python = [
      "import json", "import os", "", "import httpx", "",
      "body = json.loads(r'''" + json + "''')",
      keyed ? 'headers = {"Authorization": "Bearer " + os.environ["R1SERVE_API_KEY"]}' : "headers = {}",
      'with httpx.stream("POST", "' + url + '", json=body, headers=headers, timeout=None) as r:',
      "    for line in r.iter_lines():", "        print(line)",
    ];
    return { curl: curl.join(" \\\n"), python: python.join("\n") };
  }

  function addCopyButtons(view) {
    const code = snippets(view.body, view.keyed);
    const bar = el("div", "copy");
    const shown = el("pre", "snippet");
    shown.hidden = true;
    for (const [kind, label] of [["curl", "Copy as curl"], ["python", "Copy as Python"]]) {
      const button = el("button", "", label);
      button.type = "button";
      button.dataset.copy = kind;
      button.addEventListener("click", () => {
        shown.textContent = code[kind];
        shown.dataset.kind = kind;
        shown.hidden = false;
        if (navigator.clipboard) navigator.clipboard.writeText(code[kind]).catch(() => {}); // shown anyway
      });
      bar.append(button);
    }
    view.item.append(bar, shown);
  }

  function onChunk(view, chunk) {
    view.chunks += 1;
    if (chunk.usage) view.usage = chunk.usage;
    for (const choice of chunk.choices || []) {
      const delta = choice.delta || {};
      if (choice.reasoning_truncated) view.truncated = true;
      if (delta.reasoning_content) {
        if (!view.firstToken) view.firstToken = performance.now();
        if (!view.firstReasoning) view.firstReasoning = performance.now();
        view.reasoning += delta.reasoning_content;
        view.reasoningChunks += 1;
      }
      if (delta.content) {
        if (!view.firstToken) view.firstToken = performance.now();
        // Whitespace alone between the reasoning and the answer does not start the answer.
        if (!view.firstAnswer && view.firstReasoning && !(view.content + delta.content).trim()) {
          view.content += delta.content;
          continue;
        }
        view.content += delta.content;
        if (!view.firstAnswer && view.firstReasoning) startAnswer(view);
        else if (!view.firstAnswer) view.firstAnswer = performance.now();
      }
    }
    view.schedule();
  }

  // Server-sent events over fetch (EventSource cannot POST): split on newlines, keep the unfinished tail.
  async function readEvents(response, view) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let tail = "";
    for (;;) {
      const { value, done } = await reader.read();
      tail += decoder.decode(value || new Uint8Array(), { stream: !done });
      const lines = tail.split("\n");
      tail = lines.pop();
      for (const raw of lines) {
        const line = raw.trim();
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const event = JSON.parse(data);
        if (event.error) throw new Error(event.error.message || "the stream failed");
        onChunk(view, event);
      }
      if (done) return;
    }
  }

  function setRunning(controller) {
    running = controller;
    ui.send.disabled = !!controller;
    ui.stop.disabled = !controller;
  }

  async function send(text) {
    const messages = [];
    const system = ui.system.value.trim();
    if (system) messages.push({ role: "system", content: system });
    messages.push(...history, { role: "user", content: text });
    addUserMessage(text);
    const view = assistantView();
    view.body = requestBody(messages);
    view.keyed = !!ui.apiKey.value.trim() || signedIn;
    const controller = new AbortController();
    setRunning(controller);
    let note = "";
    try {
      const response = await fetch("/v1/chat/completions", {
        method: "POST", headers: headers(), body: JSON.stringify(view.body), signal: controller.signal,
      });
      view.requestId = response.headers.get("x-request-id") || "";
      if (!response.ok) throw new Error(await errorText(response));
      await readEvents(response, view);
      history = [...messages.filter((m) => m.role !== "system"), { role: "assistant", content: view.content }];
    } catch (e) {
      if (e.name === "AbortError") {
        note = "stopped";
      } else {
        view.item.append(el("p", "error", e.message));
      }
    } finally {
      view.ended = performance.now();
      view.render(0, true);
      if (view.firstReasoning) {
        // Also when no answer came (a budget of max_tokens spent thinking, an unclosed tag): never "thinking forever".
        view.details.open = false;
        view.summary.textContent = thoughtSummary(view);
      }
      showStats(view, note);
      addCopyButtons(view);
      view.item.dataset.state = "done";
      setRunning(null);
    }
  }

  ui.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = ui.prompt.value.trim();
    if (!text || running || !ui.model.value) return;
    ui.prompt.value = "";
    send(text);
  });
  ui.prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      ui.composer.requestSubmit();
    }
  });
  ui.stop.addEventListener("click", () => running && running.abort());
  ui.newChat.addEventListener("click", () => {
    if (running) running.abort();
    history = [];
    ui.messages.replaceChildren();
    ui.prompt.focus();
  });
  ui.model.addEventListener("change", showModelNote);
  ui.apiKey.addEventListener("change", loadModels);
  loadModels();
})();
