// The status page: polls /v1/admin/status with the admin key and renders it.
"use strict";

const REFRESH_MS = 3000;
let timer = null;
let busy = new Set();  // models with a load/unload under way

function setMessage(text, kind) {
  const node = document.getElementById("message");
  node.textContent = text || "";
  node.className = "message " + (kind || "");
  node.hidden = !text;
}

function fill(id, pairs) {
  const dl = document.getElementById(id);
  dl.replaceChildren();
  for (const [term, value] of pairs) {
    dl.append(gw.el("dt", { text: term }), gw.el("dd", { text: value }));
  }
}

function modelState(model) {
  if (busy.has(model.id)) return "working";
  if (model.loading) return "loading";
  return model.loaded ? "loaded" : "unloaded";
}

async function modelAction(model, action) {
  busy.add(model.id);
  render(window.lastStatus);
  try {
    await gw.json("v1/models/" + encodeURIComponent(model.id) + "/" + action, { method: "POST" });
    setMessage("");
  } catch (error) {
    setMessage(action + " " + model.id + ": " + error.message, "error");
  } finally {
    busy.delete(model.id);
    refresh();
  }
}

function renderModels(models) {
  const body = document.querySelector("#models tbody");
  body.replaceChildren();
  for (const model of models) {
    const state = modelState(model);
    const action = model.loaded ? "unload" : "load";
    const button = gw.el("button", {
      type: "button", class: action, text: model.loaded ? "Unload" : "Load",
      disabled: state === "working" || state === "loading",
    });
    button.addEventListener("click", () => modelAction(model, action));
    body.append(gw.el("tr", { "data-model": model.id, "data-state": state },
      gw.el("td", { class: "id", text: model.id }),
      gw.el("td", { text: model.aliases.join(", ") || "–" }),
      gw.el("td", { class: "state " + state, text: state }),
      gw.el("td", { text: gw.bytes(model.size_bytes) }),
      gw.el("td", { text: model.pinned ? "yes" : "no" }),
      gw.el("td", { text: model.loaded ? (model.ttl_left_seconds === null ? "–"
                                          : gw.seconds(model.ttl_left_seconds)) : "" }),
      gw.el("td", { text: model.in_flight }),
      gw.el("td", { text: model.waiting }),
      gw.el("td", {}, button)));
  }
}

function renderSparkline(perMinute) {
  const box = document.getElementById("sparkline");
  box.replaceChildren();
  const peak = Math.max(1, ...perMinute.map((m) => m.requests));
  for (const minute of perMinute.slice(-60)) {
    const bar = gw.el("span", { class: "bar",
                                title: minute.requests + " requests, " + minute.refused + " refused" });
    // Heights through the CSSOM, which the CSP allows (style attributes it would not).
    bar.style.height = Math.max(2, Math.round(100 * minute.requests / peak)) + "%";
    if (minute.refused) {
      const refused = gw.el("span", { class: "refused" });
      refused.style.height = Math.round(100 * minute.refused / minute.requests) + "%";
      bar.append(refused);
    }
    box.append(bar);
  }
}

function off(n, unit) {
  return n ? n + " " + unit : unit + " off";
}

function render(status) {
  if (!status) return;
  const loaded = status.models.filter((m) => m.loaded).length;
  document.getElementById("summary").textContent =
    "version " + status.version + " · up " + gw.seconds(status.uptime_seconds) + " · " +
    loaded + " of " + status.models.length + " models loaded · default " +
    (status.default_model || "none") + (status.auth_enabled ? "" : " · auth off (loopback)");
  renderModels(status.models);

  const mem = status.memory;
  const meter = document.getElementById("memory-meter");
  meter.max = mem.budget_bytes;
  meter.low = 0.7 * mem.budget_bytes;  // <meter> thresholds are absolute values
  meter.high = 0.9 * mem.budget_bytes;
  meter.optimum = 0;
  meter.value = Math.min(mem.used_bytes, mem.budget_bytes);
  fill("memory", [
    ["Budget", gw.bytes(mem.budget_bytes)],
    ["Used (estimated)", gw.bytes(mem.used_bytes)],
    ["MLX active", gw.bytes(mem.mlx_active_bytes)],
    ["Most models loaded", String(mem.max_loaded_models)],
  ]);

  const traffic = status.traffic;
  renderSparkline(traffic.per_minute);
  fill("traffic", [
    ["Requests, last minute", String(traffic.requests_last_minute)],
    ["Refused, last minute", String(traffic.refused_last_minute)],
  ]);

  const lim = status.limits;
  const breaker = lim.breaker || {};
  fill("limits", [
    ["Per key", off(lim.per_key_rpm, "rpm") + ", " + off(lim.per_key_tpm, "tpm")],
    ["Per IP (no key)", off(lim.per_ip_rpm, "rpm")],
    ["Global", off(lim.global_rpm, "rpm")],
    ["Generating", lim.inflight + " of " + lim.max_inflight],
    ["Queued", lim.queued + " of " + lim.max_queue],
    ["Limits kept in", lim.backend + (lim.redis_up === false ? " (down: in-process fallback)" : "")],
    ["Breaker", (breaker.state || "–") + " (" + (breaker.consecutive_failures || 0) + " of " +
                (breaker.failures_to_open || "–") + " failures)"],
  ]);

  const reasons = Object.entries(traffic.refusals_by_reason);
  fill("reasons", reasons.length ? reasons.map(([r, n]) => [r, String(n)])
                                 : [["Since start", "none"]]);
  const refusals = document.querySelector("#refusals tbody");
  refusals.replaceChildren();
  for (const r of traffic.recent_refusals) {
    refusals.append(gw.el("tr", {},
      gw.el("td", { text: gw.ago(r.at) }), gw.el("td", { text: r.status }),
      gw.el("td", { text: r.reason }), gw.el("td", { text: r.path }),
      gw.el("td", { text: r.key_name || "–" }), gw.el("td", { text: r.client_ip || "–" }),
      gw.el("td", { class: "wrap", text: r.message })));
  }

  const keys = document.querySelector("#keys tbody");
  keys.replaceChildren();
  for (const k of status.keys) {
    keys.append(gw.el("tr", { "data-key": k.id },
      gw.el("td", { text: k.name }), gw.el("td", { class: "mono", text: k.id }),
      gw.el("td", { text: k.admin ? "yes" : "no" }),
      gw.el("td", { text: k.models ? k.models.join(", ") : "all" }),
      gw.el("td", { text: k.rpm === null ? "default" : off(k.rpm, "rpm") }),
      gw.el("td", { text: k.tpm === null ? "default" : off(k.tpm, "tpm") }),
      gw.el("td", { text: k.visitor_rpm ? k.visitor_rpm + " rpm" : "–" }),
      gw.el("td", { text: gw.ago(k.last_used) }),
      gw.el("td", { text: k.revoked ? "revoked" : "active" })));
  }

  const targets = [...status.upstreams, ...status.routes];
  document.getElementById("upstreams").textContent = targets.length
    ? targets.map((t) => t.id || t.name || JSON.stringify(t)).join(", ") : "None configured.";
}

async function refresh() {
  clearTimeout(timer);
  try {
    const status = await gw.json("v1/admin/status");
    window.lastStatus = status;
    document.body.dataset.loaded = "yes";
    render(status);
    if (document.getElementById("message").classList.contains("auth")) setMessage("");
  } catch (error) {
    if (error.status === 401 || error.status === 403) {
      document.body.dataset.loaded = "no";
      setMessage(error.status === 401 ? "Enter an admin key to see the gateway's status."
                                      : "This key is not an admin key.", "auth");
    } else {
      setMessage("Cannot reach the gateway: " + error.message, "error");
    }
  }
  timer = setTimeout(refresh, REFRESH_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  gw.keyForm(refresh);
  refresh();
});
