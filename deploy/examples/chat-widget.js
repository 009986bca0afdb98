// A small public chat box for mlx-gateway: streams /v1/responses from another origin (CORS),
// keeps the conversation with previous_response_id. Configured by its <script> tag's data-*.
(function () {
  "use strict";
  const script = document.currentScript;
  const config = {
    gateway: (script.dataset.gateway || "").replace(/\/+$/, ""),
    key: script.dataset.key || "",
    model: script.dataset.model || "",
    instructions: script.dataset.instructions || "",
    maxOutputTokens: Number(script.dataset.maxOutputTokens || 200),
    title: script.dataset.title || "Ask us anything",
  };
  let previousResponseId = null;

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text) node.textContent = text;
    return node;
  }

  async function* events(body) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).trim()).join("\n");
        if (data && data !== "[DONE]") yield JSON.parse(data);
      }
    }
  }

  async function ask(question, log, button) {
    log.append(el("li", "user", question));
    const answer = el("li", "assistant", "…");
    log.append(answer);
    button.disabled = true;
    const request = { model: config.model, input: question, stream: true,
                      max_output_tokens: config.maxOutputTokens };
    if (config.instructions) request.instructions = config.instructions;
    if (previousResponseId) request.previous_response_id = previousResponseId;
    try {
      const response = await fetch(config.gateway + "/v1/responses", {
        method: "POST", credentials: "omit",
        headers: { "Content-Type": "application/json", Authorization: "Bearer " + config.key },
        body: JSON.stringify(request),
      });
      if (response.status === 429) {
        const wait = response.headers.get("retry-after");
        throw new Error("Too many questions; try again" + (wait ? " in " + wait + " s." : " soon."));
      }
      if (!response.ok) throw new Error("The assistant is unavailable (" + response.status + ").");
      let text = "";
      for await (const event of events(response.body)) {
        if (event.type === "response.output_text.delta") {
          text += event.delta;
          answer.textContent = text;
          log.scrollTop = log.scrollHeight;
        } else if (event.type === "response.completed" || event.type === "response.incomplete") {
          previousResponseId = event.response.id;
          answer.dataset.responseId = event.response.id;
        } else if (event.type === "response.failed" || event.type === "error") {
          throw new Error("The answer failed; please ask again.");
        }
      }
      answer.dataset.done = "yes";
    } catch (error) {
      answer.className = "error";
      answer.textContent = error.message;
    } finally {
      button.disabled = false;
    }
  }

  function mount() {
    const box = el("section", "mlxgw-widget");
    box.setAttribute("aria-label", config.title);
    const log = el("ol");
    const form = el("form");
    const input = el("input");
    input.placeholder = "Type a question";
    input.setAttribute("aria-label", "Your question");
    const button = el("button", null, "Send");
    button.type = "submit";
    form.append(input, button);
    box.append(el("header", null, config.title), log, form);
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const question = input.value.trim();
      if (!question || button.disabled) return;
      input.value = "";
      ask(question, log, button);
    });
    document.body.append(box);
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", mount);
  else mount();
})();
