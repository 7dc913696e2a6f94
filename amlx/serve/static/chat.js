// The amlx chat page: streams replies from /v1/chat/completions (SSE over fetch), keeps the
// conversation, and aborts a reply with Stop (the server then cancels the generation).
// Model text is only ever placed with textContent, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, history: [], controller: null };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

// Text with ``` fences as DOM nodes: code blocks in <pre><code>, the rest as text.
function render(el, text) {
  el.replaceChildren();
  const parts = text.split("```");
  parts.forEach((part, i) => {
    if (i % 2 === 0) {
      const text = i > 0 ? part.replace(/^\n/, "") : part;  // the line break after a closing fence
      if (text) el.append(document.createTextNode(text));
      return;
    }
    const newline = part.indexOf("\n");
    const lang = newline >= 0 ? part.slice(0, newline).trim() : "";
    const code = document.createElement("code");
    code.textContent = (newline >= 0 ? part.slice(newline + 1) : part).replace(/\n$/, "");
    if (/^[\w+-]+$/.test(lang)) code.dataset.lang = lang;
    const pre = document.createElement("pre");
    pre.append(code);
    el.append(pre);
  });
}

function bubble(role, text) {
  const el = document.createElement("div");
  el.className = "msg " + role;
  const body = document.createElement("div");
  body.className = "body";
  render(body, text || "");
  el.append(body);
  $("messages").append(el);
  el.scrollIntoView({ block: "end" });
  return el;
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    if (!r.ok) throw new Error((await r.json()).error.message);
    state.model = (await r.json()).data[0].id;
    $("model").textContent = state.model;
    $("model").dataset.state = "ready";
  } catch (e) {
    $("model").textContent = "cannot list models: " + e.message;
    $("model").dataset.state = "error";
  }
}

// Reads an SSE body, calling onEvent(json) for each `data:` event but [DONE].
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;  // ":" lines are keep-alives
        onEvent(JSON.parse(line.slice(6)));
      }
    }
  }
}

function showStats(el, s) {
  const div = document.createElement("div");
  div.className = "stats";
  const rate = s.tokens > 1 && s.end > s.first ? ((s.tokens - 1) / ((s.end - s.first) / 1000)).toFixed(1) : "–";
  const ttft = s.first ? Math.round(s.first - s.start) + " ms" : "–";
  div.textContent = `${s.tokens} tokens · ${rate} tok/s · TTFT ${ttft}` + (s.stopped ? " · stopped" : "");
  el.append(div);
}

async function send(text) {
  if (!state.model) await loadModel();
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...state.history, { role: "user", content: text });
  state.history.push({ role: "user", content: text });
  bubble("user", text);
  const el = bubble("assistant", "");
  el.dataset.state = "streaming";
  const body = el.querySelector(".body");
  const s = { start: performance.now(), first: 0, end: 0, tokens: 0, stopped: false };
  let reply = "";
  // The reply is drawn at most once a frame: drawing it on every token re-rendered the
  // whole text per token, and a fast stream then kept the page busy for seconds, with
  // the Stop button's click waiting behind it.
  let painting = false;
  const paint = () => {
    painting = false;
    render(body, reply);
    el.scrollIntoView({ block: "end" });
  };
  state.controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: state.controller.signal,
      body: JSON.stringify({ model: state.model, messages, stream: true, stream_options: { include_usage: true },
        temperature: parseFloat($("temperature").value), max_tokens: parseInt($("max-tokens").value, 10) || 512 }),
    });
    if (!r.ok) throw new Error((await r.json()).error.message);
    await readEvents(r, (ev) => {
      if (ev.error) throw new Error(ev.error.message);
      if (ev.usage) s.tokens = ev.usage.completion_tokens;
      for (const choice of ev.choices || []) {
        const piece = choice.delta.content || "";
        if (!piece) continue;
        if (!s.first) s.first = performance.now();
        s.tokens += 1;
        reply += piece;
        if (!painting) {
          painting = true;
          requestAnimationFrame(paint);
        }
      }
    });
  } catch (e) {
    if (e.name === "AbortError") s.stopped = true;
    else bubble("error", e.message);
  } finally {
    s.end = performance.now();
    paint();
    state.controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
    el.dataset.state = s.stopped ? "stopped" : "done";
    showStats(el, s);
    state.history.push({ role: "assistant", content: reply });  // a stopped reply stays as far as it got
  }
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("input").value.trim();
  if (!text || state.controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("clear").addEventListener("click", () => { state.history = []; $("messages").replaceChildren(); });
$("temperature").addEventListener("input", () => { $("temperature-value").textContent = $("temperature").value; });
$("api-key").value = localStorage.getItem("amlx-api-key") || "";
$("api-key").addEventListener("change", () => { localStorage.setItem("amlx-api-key", $("api-key").value); loadModel(); });
loadModel();
