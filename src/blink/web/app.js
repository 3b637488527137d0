// The page: a conversation over RealtimeClient, with drafts sent per keystroke (pre-loading), Enter to send,
// Stop/Esc to cancel, per-answer timings, documents, settings and a latency chart. No network but this server.
import { RealtimeClient, KeyError } from "./client.js";
import { Documents } from "./documents.js";
import { drawChart, timingsText, answerKind } from "./timings.js";

const $ = (id) => document.getElementById(id);
const ui = {
  status: $("status"), messages: $("messages"), notice: $("notice"), composer: $("composer"), input: $("input"),
  stop: $("stop"), settings: $("settings"), model: $("model"), temperature: $("temperature"),
  maxTokens: $("max-tokens"), instructions: $("instructions"), apiKey: $("api-key"), cache: $("cache"), preload: $("preload"), drop: $("drop"),
  chart: $("chart"), chartDesc: $("chart-desc"),
};
const STATUS_WORDS = { open: "connected", connecting: "connecting…", reconnecting: "reconnecting…", closed: "not connected" };
const ANSWERS_CHARTED = 20;

let client = null;
let current = null; // the answer in flight: {li, text, enter, first, responseId}
let lastDraft = null;
const answers = []; // {ms, kind} of the last answers, for the chart
const documents = new Documents({
  list: $("documents"), form: $("add-document"), text: $("doc-text"), file: $("doc-file"), panel: $("documents-panel"),
  base: location.origin, key: () => ui.apiKey.value.trim(), notice, opened: () => applyRetrieval(),
});

function notice(message) {
  ui.notice.textContent = message || "";
  ui.notice.hidden = !message;
}

function sessionSettings() {
  const settings = {
    temperature: Number(ui.temperature.value),
    max_output_tokens: Math.max(1, Math.round(Number(ui.maxTokens.value)) || 1),
    cache: ui.cache.checked,
    instructions: ui.instructions.value.trim() || null, // null: the model's own default
  };
  if (ui.model.dataset.chosen) settings.model = ui.model.value; // else the session's own (an edge's "auto")
  return settings;
}

function applySettings() {
  client && client.send({ type: "session.update", session: sessionSettings() });
}

function applyRetrieval() {
  if (!client) return;
  const ids = documents.openedIds();
  if (ids.length) client.send({ type: "context.open", document_ids: ids });
  client.send({ type: "session.update", session: { retrieval: ids.length ? { top_k: 4 } : null } });
}

async function connect() {
  notice("");
  if (client) client.close();
  const apiKey = ui.apiKey.value.trim();
  client = new RealtimeClient({ base: location.origin, apiKey });
  client.addEventListener("status", (e) => showStatus(e.detail));
  client.addEventListener("event", (e) => onEvent(e.detail));
  try {
    const models = await client.connect();
    fillModels(models.data.map((m) => m.id));
    await documents.refresh();
  } catch (error) {
    showStatus("closed");
    notice(error instanceof KeyError ? `${error.message}. Enter a valid key in Settings and press Connect.` : `Could not connect: ${error.message}`);
  }
}

function fillModels(ids) {
  const chosen = ui.model.value;
  ui.model.replaceChildren(...ids.map((id) => new Option(id, id, false, id === chosen)));
}

// Shows the session's model, until the user picks one.
function showModel(model) {
  if (ui.model.dataset.chosen || !model) return;
  if (![...ui.model.options].some((o) => o.value === model)) ui.model.append(new Option(model, model));
  ui.model.value = model;
}

function showStatus(status) {
  if (status === "reconnecting") ui.status.dataset.reconnects = String(Number(ui.status.dataset.reconnects || 0) + 1);
  ui.status.dataset.status = status;
  ui.status.textContent = STATUS_WORDS[status] || status;
}

function addMessage(role, text) {
  const li = document.createElement("li");
  li.className = role;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  li.append(body);
  ui.messages.append(li);
  scrollTo(li);
  return li;
}

// Keeps `li` in view, once per frame however many deltas arrive in it (a scroll forces a layout).
let scrollTarget = null;
function scrollTo(li) {
  if (scrollTarget === null) requestAnimationFrame(() => {
    scrollTarget.scrollIntoView({ block: "end" });
    scrollTarget = null;
  });
  scrollTarget = li;
}

function submit(enter) {
  const text = ui.input.value.trim();
  if (!text) return;
  if (current) return notice("An answer is still streaming: wait for it or press Stop (Esc).");
  if (!client || client.status !== "open") return notice("Not connected: the message was not sent.");
  notice("");
  const item = { type: "message", role: "user", content: [{ type: "input_text", text }] };
  client.send({ type: "conversation.item.create", item });
  client.send({ type: "response.create" });
  addMessage("user", text);
  const li = addMessage("assistant", "");
  li.dataset.status = "in_progress";
  current = { li, text: li.querySelector(".text"), enter, first: null, responseId: null, next: 0, deltas: 0 };
  ui.input.value = "";
  lastDraft = null;
  ui.stop.disabled = false;
}

function cancel() {
  if (current && client) client.send({ type: "response.cancel" });
}

function onEvent(event) {
  switch (event.type) {
    case "session.created":
      showModel(event.session.model);
      applySettings();
      if (documents.openedIds().length) applyRetrieval();
      break;
    case "response.created":
      if (current) current.li.dataset.responseId = current.responseId = event.response.id;
      break;
    case "response.output_text.delta":
      if (current) onDelta(event);
      break;
    case "response.output_text.done":
      // the server's whole text: what the page shows must be it (a resumed stream loses and repeats nothing)
      if (current) current.li.dataset.verified = String(current.text.textContent === event.text);
      break;
    case "response.done":
      if (current) finish(event.response);
      break;
    case "error":
      onError(event.error);
      break;
  }
}

function onDelta(event) {
  if (event.delta_index < current.next) return; // already shown (a resume from an earlier point)
  if (event.delta_index > current.next) current.li.dataset.gap = "true";
  current.next = event.delta_index + 1;
  current.text.append(event.delta);
  current.li.dataset.deltas = String(++current.deltas);
  if (current.first === null) {
    // the first token is in the page; the browser paints it in the frame whose callback runs next
    const { li, enter } = current;
    current.first = performance.now();
    li.dataset.firstTokenMs = (current.first - enter).toFixed(1);
    requestAnimationFrame(() => (li.dataset.firstPaintMs = (performance.now() - enter).toFixed(1)));
  }
  scrollTo(current.li);
}

function finish(response) {
  const { li, enter, first } = current;
  current = null;
  ui.stop.disabled = true;
  const shownMs = first === null ? null : first - enter;
  li.dataset.status = response.status;
  if (response.status === "failed") {
    li.classList.add("failed");
    const error = (response.status_details && response.status_details.error) || {};
    li.querySelector(".text").append(`[failed: ${error.message || "no answer"}]`);
  }
  const line = document.createElement("span");
  line.className = "timings";
  const kind = answerKind(response);
  li.dataset.kind = kind;
  const serverTtft = (response.timings || {}).ttft_ms; // the server's own response.create -> first token
  if (serverTtft !== undefined) li.dataset.serverTtftMs = String(serverTtft);
  const bar = document.createElement("span");
  bar.className = `bar ${kind}`;
  bar.style.width = `${Math.max(2, Math.min(120, shownMs || 0))}px`;
  line.append(bar, timingsText(response, shownMs));
  li.append(line);
  if (shownMs !== null) {
    answers.push({ ms: shownMs, kind });
    if (answers.length > ANSWERS_CHARTED) answers.shift();
    drawChart(ui.chart, ui.chartDesc, answers);
  }
}

// Errors that end the answer in flight: no response.done will come for it.
const LOST = new Set(["session_not_found", "response_not_found", "invalid_api_key"]);

function onError(error) {
  const refused = current && !current.responseId; // response.create was refused: no response.created follows
  if (current && (refused || LOST.has(error.code))) {
    current.li.dataset.status = "failed";
    current.li.classList.add("failed");
    current.text.append(refused ? `[refused: ${error.message}]` : `[lost: ${error.message}]`);
    current = null;
    ui.stop.disabled = true;
  }
  if (!refused) notice(error.message);
}

ui.input.addEventListener("input", () => {
  const text = ui.input.value;
  if (!ui.preload.checked || !client || text === lastDraft) return;
  if (client.send({ type: "input_text.draft", text })) lastDraft = text;
});
ui.input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    submit(performance.now());
  }
});
document.addEventListener("keydown", (e) => {
  if (e.key === "Escape" && current) {
    e.preventDefault();
    cancel();
  }
});
ui.composer.addEventListener("submit", (e) => {
  e.preventDefault();
  submit(performance.now());
});
ui.stop.addEventListener("click", cancel);
ui.drop.addEventListener("click", () => client && client.drop());
ui.settings.addEventListener("submit", (e) => {
  e.preventDefault();
  const keyChanged = !client || client.apiKey !== ui.apiKey.value.trim() || client.status === "closed";
  if (keyChanged) connect();
  else applySettings();
});
ui.model.addEventListener("change", () => (ui.model.dataset.chosen = "true"));
for (const input of [ui.model, ui.temperature, ui.maxTokens, ui.cache, ui.instructions]) input.addEventListener("change", applySettings);

connect();
