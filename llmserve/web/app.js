// The llmserve playground: a client of the public API only (/v1/models, /v1/chat/completions).
// Every model or user string reaches the page through textContent or a text node, never as
// markup; the server's Content-Security-Policy forbids inline script besides.

const $ = (id) => document.getElementById(id);
const STORE_KEY = "llmserve.playground.conversations";
const CURRENT_KEY = "llmserve.playground.current";
const SETTINGS_KEY = "llmserve.playground.settings";
const API_KEY = "llmserve.playground.apiKey"; // sessionStorage: gone with the tab
const RESUME_TRIES = 5;

// ---- storage ---------------------------------------------------------------------------

function load(storage, key, fallback) {
  try {
    const value = JSON.parse(storage.getItem(key));
    return value ?? fallback;
  } catch {
    return fallback;
  }
}

let conversations = load(localStorage, STORE_KEY, []);
let current = localStorage.getItem(CURRENT_KEY);

function save() {
  localStorage.setItem(STORE_KEY, JSON.stringify(conversations));
  if (current) localStorage.setItem(CURRENT_KEY, current);
}

function conversation() {
  let conv = conversations.find((c) => c.id === current);
  if (!conv) {
    conv = { id: crypto.randomUUID(), title: "New chat", messages: [], created: Date.now() };
    conversations.unshift(conv);
    current = conv.id;
  }
  return conv;
}

// ---- settings ----------------------------------------------------------------------------

const fields = { system: "system", temperature: "temperature", top_p: "top-p",
                 max_tokens: "max-tokens", tools: "tools" };

function restoreSettings() {
  const saved = load(localStorage, SETTINGS_KEY, {});
  for (const [name, id] of Object.entries(fields)) {
    if (saved[name] !== undefined) $(id).value = saved[name];
    $(id).addEventListener("change", saveSettings);
  }
  $("model").addEventListener("change", saveSettings);
}

function saveSettings() {
  const values = { model: $("model").value };
  for (const [name, id] of Object.entries(fields)) values[name] = $(id).value;
  localStorage.setItem(SETTINGS_KEY, JSON.stringify(values));
}

function number(id) {
  const text = $(id).value.trim();
  return text === "" ? undefined : Number(text);
}

// ---- API -----------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body) {
    super(body?.error?.message || `HTTP ${status}`);
    this.status = status;
    this.param = body?.error?.param;
  }
}

// fetch with the key (asked for once a call gets a 401, then kept in sessionStorage).
async function api(path, options = {}) {
  for (;;) {
    const headers = { ...(options.headers || {}) };
    const key = sessionStorage.getItem(API_KEY);
    if (key) headers.Authorization = `Bearer ${key}`;
    const response = await fetch(path, { ...options, headers });
    if (response.status !== 401) return response;
    await askKey(Boolean(key));
  }
}

async function failure(response) {
  let body = null;
  try {
    body = await response.json();
  } catch { /* not JSON */ }
  return new ApiError(response.status, body);
}

function askKey(rejected) {
  const dialog = $("key-dialog");
  $("key-error").hidden = !rejected;
  $("key-input").value = "";
  return new Promise((resolve, reject) => {
    dialog.oncancel = (event) => { // Escape: this call goes without a key, and fails
      event.preventDefault();
      dialog.close();
      reject(new Error("This server needs an API key."));
    };
    $("key-form").onsubmit = (event) => {
      event.preventDefault();
      const key = $("key-input").value.trim();
      if (!key) return;
      sessionStorage.setItem(API_KEY, key);
      dialog.close();
      resolve();
    };
    if (!dialog.open) dialog.showModal();
    $("key-input").focus();
  });
}

async function loadModels() {
  const response = await api("/v1/models");
  if (!response.ok) throw await failure(response);
  const { data } = await response.json();
  const select = $("model");
  select.replaceChildren(...data.map((m) => new Option(m.id, m.id)));
  const saved = load(localStorage, SETTINGS_KEY, {}).model;
  if (data.some((m) => m.id === saved)) select.value = saved;
}

// Reads an SSE body, calling onEvent({id, data}) per event; returns when the body ends.
async function readEvents(body, onEvent) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    const blocks = buffer.split(/\r\n\r\n|\n\n|\r\r/);
    buffer = blocks.pop();
    for (const block of blocks) {
      let id = null;
      const data = [];
      for (const line of block.split(/\r\n|\n|\r/)) {
        if (line === "" || line.startsWith(":")) continue; // keep-alive comments
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let text = colon < 0 ? "" : line.slice(colon + 1);
        if (text.startsWith(" ")) text = text.slice(1);
        if (field === "id") id = text;
        else if (field === "data") data.push(text);
      }
      if (data.length) onEvent({ id, data: data.join("\n") });
    }
  }
}

// ---- one answer --------------------------------------------------------------------------

let active = null; // the answer being streamed: {controller, id, stopped, ...}

function requestBody(conv, model, store) {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  for (const m of conv.messages) {
    if (m.role === "assistant") {
      if (!m.content && !m.tool_calls?.length) continue; // nothing came: not history
      const message = { role: "assistant", content: m.content || null };
      if (m.tool_calls?.length) message.tool_calls = m.tool_calls;
      messages.push(message);
    } else {
      messages.push({ role: m.role, content: m.content });
    }
  }
  const body = { model, messages, stream: true, stream_options: { include_usage: true } };
  if (store) body.store = true; // kept by the server, so a dropped stream resumes
  const optional = { temperature: number("temperature"), top_p: number("top-p"),
                     max_tokens: number("max-tokens") };
  for (const [name, value] of Object.entries(optional)) if (value !== undefined) body[name] = value;
  const tools = $("tools").value.trim();
  if (tools) {
    try {
      body.tools = JSON.parse(tools);
    } catch (error) {
      throw new Error(`The tools are not valid JSON: ${error.message}`);
    }
  }
  return body;
}

let storeOff = false; // the server keeps nothing (--store none): streams cannot resume

async function send(text) {
  const conv = conversation();
  if (conv.messages.length === 0) conv.title = text.slice(0, 60);
  conv.messages.push({ role: "user", content: text });
  const answer = { role: "assistant", content: "", reasoning: "", tool_calls: [], stats: null };
  conv.messages.push(answer);
  save();
  renderList();
  renderConversation();
  const view = document.querySelector("#messages .message:last-child");
  const run = { controller: new AbortController(), id: null, lastEventId: null, done: false,
                stopped: false, started: performance.now(), firstAt: null, chunks: 0 };
  active = run;
  setBusy(true);
  try {
    await stream(conv, answer, view, run);
  } catch (error) {
    if (!run.stopped) answer.error = error.message;
  } finally {
    active = null;
    const ended = performance.now();
    answer.stats = stats(run, answer.usage, ended);
    if (run.stopped) answer.stopped = true;
    delete answer.usage;
    save();
    paintAnswer(view, answer, false);
    setBusy(false);
  }
}

async function stream(conv, answer, view, run) {
  const model = $("model").value;
  let response;
  for (;;) {
    const body = requestBody(conv, model, !storeOff);
    response = await api("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body), signal: run.controller.signal,
    });
    if (response.ok) break;
    const error = await failure(response);
    if (error.status === 400 && error.param === "store" && !storeOff) {
      storeOff = true; // this server keeps no completions: stream without resuming
      continue;
    }
    throw error;
  }
  let tries = 0;
  for (;;) {
    try {
      await readEvents(response.body, (event) => onEvent(event, answer, view, run));
    } catch (error) {
      if (run.stopped) return;
      if (!run.id || storeOff) throw new Error(`The connection dropped: ${error.message}`);
    }
    if (run.done || run.stopped) return;
    // The stream ended before [DONE]: follow the stored stream on from the last event seen.
    if (!run.id || storeOff) throw new Error("The stream ended before the answer did.");
    if (++tries > RESUME_TRIES) throw new Error("The connection dropped and did not come back.");
    await new Promise((resolve) => setTimeout(resolve, 250 * tries));
    if (run.stopped) return;
    const headers = run.lastEventId === null ? {} : { "Last-Event-ID": run.lastEventId };
    try {
      response = await api(`/v1/chat/completions/${encodeURIComponent(run.id)}?stream=true`,
                           { headers, signal: run.controller.signal });
    } catch (error) {
      if (run.stopped) return;
      continue; // the server is not back yet: try again
    }
    if (!response.ok) throw await failure(response);
    run.resumed = (run.resumed || 0) + 1;
  }
}

function onEvent(event, answer, view, run) {
  if (event.id !== null) run.lastEventId = event.id;
  if (event.data === "[DONE]") {
    run.done = true;
    return;
  }
  let chunk;
  try {
    chunk = JSON.parse(event.data);
  } catch {
    return;
  }
  if (chunk.error) { // an error event: the answer ends here, and says why
    answer.error = chunk.error.message || "The server ended the answer with an error.";
    paintAnswer(view, answer, true);
    return;
  }
  if (chunk.id && !run.id) {
    run.id = chunk.id;
    view.dataset.id = run.id; // the stored completion's id, for whoever inspects the page
    if (run.stopped) stopRun(run); // Stop was pressed before the id was known
  }
  if (chunk.usage) answer.usage = chunk.usage;
  const choice = chunk.choices?.[0];
  if (!choice) return;
  const delta = choice.delta || {};
  const reasoning = delta.reasoning_content ?? delta.reasoning;
  let grew = false;
  if (delta.content) {
    answer.content += delta.content;
    grew = true;
  }
  if (reasoning) {
    answer.reasoning += reasoning;
    grew = true;
  }
  for (const call of delta.tool_calls || []) {
    const slot = (answer.tool_calls[call.index] ||= {
      id: "", type: "function", function: { name: "", arguments: "" } });
    if (call.id) slot.id = call.id;
    if (call.function?.name) slot.function.name += call.function.name;
    if (call.function?.arguments) slot.function.arguments += call.function.arguments;
    grew = true;
  }
  if (grew) {
    run.chunks += 1;
    if (run.firstAt === null) run.firstAt = performance.now();
  }
  if (choice.finish_reason) answer.finish_reason = choice.finish_reason;
  paintAnswer(view, answer, true);
}

function stats(run, usage, ended) {
  const out = {};
  if (run.firstAt !== null) out.ttft_ms = Math.round(run.firstAt - run.started);
  if (usage) {
    out.prompt_tokens = usage.prompt_tokens;
    out.completion_tokens = usage.completion_tokens;
  }
  const tokens = usage ? usage.completion_tokens : run.chunks;
  const seconds = run.firstAt === null ? 0 : (ended - run.firstAt) / 1000;
  // Tokens after the first over the time they took: the decoding speed.
  if (tokens > 1 && seconds > 0) out.tokens_per_s = (tokens - 1) / seconds;
  if (run.resumed) out.resumed = run.resumed;
  return out;
}

function stopRun(run) {
  run.stopped = true;
  run.controller.abort();
  // A stored stream runs on without its client (so that it can resume): deleting it is
  // what cancels it. Without the store, the hang-up alone cancels the generation.
  if (run.id && !storeOff) {
    const key = sessionStorage.getItem(API_KEY);
    // keepalive: sent even while the page goes away (a closed tab stops its answer too)
    fetch(`/v1/chat/completions/${encodeURIComponent(run.id)}`, {
      method: "DELETE", keepalive: true,
      headers: key ? { Authorization: `Bearer ${key}` } : {},
    }).catch(() => {});
  }
}

function stop() {
  if (!active) return;
  const run = active;
  if (run.id || storeOff) stopRun(run);
  else {
    run.stopped = true; // onEvent stops it once the first chunk names it
    setTimeout(() => { if (!run.controller.signal.aborted) run.controller.abort(); }, 10000);
  }
}

// ---- rendering (text only: textContent and text nodes) -------------------------------------

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// Inline Markdown: `code`, **bold**, *italic*; everything else is plain text.
function inline(text) {
  const out = [];
  const pattern = /`([^`\n]+)`|\*\*([^*\n]+)\*\*|\*([^*\n]+)\*/g;
  let at = 0;
  for (const match of text.matchAll(pattern)) {
    if (match.index > at) out.push(document.createTextNode(text.slice(at, match.index)));
    if (match[1] !== undefined) out.push(el("code", "", match[1]));
    else if (match[2] !== undefined) out.push(el("strong", "", match[2]));
    else out.push(el("em", "", match[3]));
    at = match.index + match[0].length;
  }
  if (at < text.length) out.push(document.createTextNode(text.slice(at)));
  return out;
}

// A small Markdown subset: fenced code blocks, headings, lists, paragraphs.
function markdown(text) {
  const nodes = [];
  const lines = text.split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    const fence = line.match(/^\s*```\s*([\w+-]*)/);
    if (fence) {
      const code = [];
      i += 1;
      while (i < lines.length && !/^\s*```\s*$/.test(lines[i])) code.push(lines[i++]);
      i += 1; // the closing fence (or the end of a block still streaming)
      const pre = el("pre");
      const codeNode = el("code", "", code.join("\n"));
      if (fence[1]) codeNode.dataset.lang = fence[1];
      pre.append(codeNode);
      nodes.push(pre);
      continue;
    }
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    if (heading) {
      const h = el(`h${Math.min(heading[1].length + 2, 6)}`);
      h.append(...inline(heading[2]));
      nodes.push(h);
      i += 1;
      continue;
    }
    const item = /^\s*(?:[-*+]|\d+[.)])\s+/;
    if (item.test(line)) {
      const list = el(/^\s*\d/.test(line) ? "ol" : "ul");
      while (i < lines.length && item.test(lines[i])) {
        const li = el("li");
        li.append(...inline(lines[i].replace(item, "")));
        list.append(li);
        i += 1;
      }
      nodes.push(list);
      continue;
    }
    if (line.trim() === "") {
      i += 1;
      continue;
    }
    const para = [];
    while (i < lines.length && lines[i].trim() !== "" && !/^\s*```/.test(lines[i])
           && !/^#{1,6}\s/.test(lines[i]) && !item.test(lines[i])) para.push(lines[i++]);
    const p = el("p");
    para.forEach((text, n) => {
      if (n) p.append(el("br"));
      p.append(...inline(text));
    });
    nodes.push(p);
  }
  return nodes;
}

function folded(summary, body, className) {
  const details = el("details", className);
  details.append(el("summary", "", summary), el("pre", "", body));
  return details;
}

function paintAnswer(view, answer, streaming) {
  const list = $("messages");
  const following = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  view.classList.toggle("streaming", streaming);
  const body = view.querySelector(".body");
  const parts = [];
  if (answer.reasoning) parts.push(folded("Reasoning", answer.reasoning, "reasoning"));
  parts.push(...markdown(answer.content));
  for (const call of answer.tool_calls || []) {
    let args = call.function.arguments;
    try {
      args = JSON.stringify(JSON.parse(args), null, 2);
    } catch { /* still streaming, or not JSON: shown as it is */ }
    parts.push(folded(`Tool call: ${call.function.name}`, args, "tool-call"));
  }
  if (answer.error) parts.push(el("p", "error", `Error: ${answer.error}`));
  body.replaceChildren(...parts);
  const footer = view.querySelector(".stats");
  footer.textContent = streaming ? "" : statsText(answer);
  if (following) list.scrollTop = list.scrollHeight; // keep the end in view, unless scrolled up
}

function statsText(answer) {
  const s = answer.stats;
  if (!s) return "";
  const parts = [];
  if (s.prompt_tokens !== undefined) {
    parts.push(`${s.prompt_tokens} prompt + ${s.completion_tokens} completion tokens`);
  }
  if (s.ttft_ms !== undefined) parts.push(`TTFT ${s.ttft_ms} ms`);
  if (s.tokens_per_s !== undefined) parts.push(`${s.tokens_per_s.toFixed(1)} tok/s`);
  if (s.resumed) parts.push(`resumed ${s.resumed}×`);
  if (answer.stopped) parts.push("stopped");
  else if (answer.finish_reason && answer.finish_reason !== "stop") {
    parts.push(`finish: ${answer.finish_reason}`);
  }
  return parts.join(" · ");
}

function messageView(message) {
  const view = el("article", `message ${message.role}`);
  view.append(el("div", "role", message.role === "user" ? "You" : "Assistant"), el("div", "body"));
  if (message.role === "assistant") {
    view.append(el("div", "stats"));
    paintAnswer(view, message, false);
  } else {
    view.querySelector(".body").append(el("p", "text", message.content)); // as typed
  }
  return view;
}

function renderConversation() {
  const conv = conversation();
  $("messages").replaceChildren(...conv.messages.map(messageView));
  $("messages").scrollTop = $("messages").scrollHeight;
}

function renderList() {
  const items = conversations.map((conv) => {
    const li = el("li", conv.id === current ? "current" : "");
    const open = el("button", "open", conv.title || "New chat");
    open.type = "button";
    open.addEventListener("click", () => {
      if (active) return;
      current = conv.id;
      save();
      renderList();
      renderConversation();
    });
    const remove = el("button", "delete", "×");
    remove.type = "button";
    remove.title = "Delete this chat";
    remove.addEventListener("click", () => {
      if (active && conv.id === current) return;
      conversations = conversations.filter((c) => c !== conv);
      if (current === conv.id) current = conversations[0]?.id ?? null;
      save();
      renderList();
      renderConversation();
    });
    li.append(open, remove);
    return li;
  });
  $("conversations").replaceChildren(...items);
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  document.body.classList.toggle("busy", busy);
}

function notice(text) {
  $("notice").textContent = text;
  $("notice").hidden = !text;
}

// ---- wiring ------------------------------------------------------------------------------

function submit() {
  const text = $("input").value;
  if (!text.trim() || active) return;
  $("input").value = "";
  send(text);
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  submit();
});
$("input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    submit();
  }
});
$("stop").addEventListener("click", stop);
window.addEventListener("pagehide", () => {
  if (active) stopRun(active);
});
$("new-chat").addEventListener("click", () => {
  if (active) return;
  if (conversation().messages.length) current = null; // an empty chat is new already
  conversation();
  save();
  renderList();
  renderConversation();
  $("input").focus();
});

restoreSettings();
renderConversation();
renderList();
loadModels().then(() => notice(""),
                  (error) => notice(`Could not list the models: ${error.message}`));
