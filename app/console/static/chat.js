// The playground: streams /v1/responses, continues the conversation with
// previous_response_id, and shows time to first token and tokens per second per answer.
"use strict";

let previousResponseId = null;
let controller = null;

function setMessage(text) {
  const node = document.getElementById("message");
  node.textContent = text || "";
  node.className = "message error";
  node.hidden = !text;
}

async function loadModels() {
  const select = document.getElementById("model");
  try {
    const list = await gw.json("v1/models");
    const current = select.value;
    select.replaceChildren(...list.data.map((m) =>
      gw.el("option", { value: m.id, text: m.id + (m.loaded ? "" : " (not loaded)") })));
    if (current && list.data.some((m) => m.id === current)) select.value = current;
    setMessage("");
  } catch (error) {
    select.replaceChildren();
    setMessage(error.status === 401 ? "Enter a key to use the playground." : error.message);
  }
}

function newConversation() {
  previousResponseId = null;
  document.getElementById("turns").replaceChildren();
}

// Server-sent events from a fetch body: yields {event, data} per event.
async function* sseEvents(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
      let event = "message";
      const data = [];
      for (const line of block.split(/\r?\n/)) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) yield { event, data: data.join("\n") };
    }
  }
}

function numberOrNull(id) {
  const raw = document.getElementById(id).value.trim();
  return raw === "" ? null : Number(raw);
}

async function send(event) {
  event.preventDefault();
  const promptBox = document.getElementById("prompt");
  const text = promptBox.value.trim();
  if (!text || controller) return;
  promptBox.value = "";
  const turns = document.getElementById("turns");
  turns.append(gw.el("li", { class: "user" }, gw.el("div", { class: "text", text })));
  const answer = gw.el("div", { class: "text" });
  const stats = gw.el("div", { class: "stats", text: "waiting…" });
  const item = gw.el("li", { class: "assistant", "data-status": "streaming" }, answer, stats);
  turns.append(item);

  const request = { model: document.getElementById("model").value, input: text, stream: true };
  const instructions = document.getElementById("instructions").value.trim();
  if (instructions) request.instructions = instructions;
  const temperature = numberOrNull("temperature");
  if (temperature !== null) request.temperature = temperature;
  const maxTokens = numberOrNull("max-tokens");
  if (maxTokens !== null) request.max_output_tokens = maxTokens;
  if (previousResponseId) request.previous_response_id = previousResponseId;

  controller = new AbortController();
  document.getElementById("send").disabled = true;
  document.getElementById("stop").disabled = false;
  const started = performance.now();
  let firstToken = null;
  let finished = null;
  try {
    const response = await fetch(gw.url("v1/responses"), {
      method: "POST", credentials: "omit", signal: controller.signal,
      headers: gw.headers({ "Content-Type": "application/json", Accept: "text/event-stream" }),
      body: JSON.stringify(request),
    });
    if (!response.ok) {
      let message = response.statusText;
      try { message = (await response.json()).error.message; } catch (_) { /* not JSON */ }
      throw new Error(response.status + ": " + message);
    }
    for await (const sse of sseEvents(response.body)) {
      if (sse.data === "[DONE]") break;
      const data = JSON.parse(sse.data);
      const type = data.type || sse.event;
      if (type === "response.created") {
        item.dataset.responseId = data.response.id;
      } else if (type === "response.output_text.delta") {
        if (firstToken === null) firstToken = performance.now();
        answer.textContent += data.delta;
        stats.textContent = "streaming…";
      } else if (type === "response.completed" || type === "response.incomplete") {
        finished = data.response;
      } else if (type === "response.failed" || type === "error") {
        const failure = (data.response && data.response.error) || data.error || data;
        throw new Error(failure.message || "the response failed");
      }
    }
    if (!finished) throw new Error("the stream ended early");
    const ended = performance.now();
    previousResponseId = finished.id;
    item.dataset.responseId = finished.id;
    item.dataset.status = finished.status;
    const tokens = finished.usage ? finished.usage.output_tokens : 0;
    const ttft = firstToken === null ? null : (firstToken - started) / 1000;
    // Decode rate: the tokens after the first, over the time after the first.
    const rate = firstToken !== null && tokens > 1 && ended > firstToken
      ? (tokens - 1) / ((ended - firstToken) / 1000) : null;
    stats.textContent = "TTFT " + (ttft === null ? "–" : ttft.toFixed(2) + " s") + " · " +
      (rate === null ? "–" : rate.toFixed(1)) + " tok/s · " + tokens + " tokens" +
      (finished.status === "incomplete" ? " · cut at max tokens" : "");
  } catch (error) {
    item.dataset.status = "failed";
    stats.textContent = error.name === "AbortError" ? "stopped" : "error: " + error.message;
  } finally {
    controller = null;
    document.getElementById("send").disabled = false;
    document.getElementById("stop").disabled = true;
    loadModels();
  }
}

document.addEventListener("DOMContentLoaded", () => {
  gw.keyForm(loadModels);
  document.getElementById("ask").addEventListener("submit", send);
  document.getElementById("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      document.getElementById("ask").requestSubmit();
    }
  });
  document.getElementById("stop").addEventListener("click", () => controller && controller.abort());
  document.getElementById("new-chat").addEventListener("click", newConversation);
  loadModels();
});
