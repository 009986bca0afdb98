// Shared by the console pages: the key (sessionStorage only) and calls to the gateway.
// Every URL is relative to the page, so the console works under a path prefix.
"use strict";

const KEY_NAME = "mlxgw.key";

const gw = {
  // <meta name="mlxgw-root"> says where the gateway's root is, relative to this page.
  root: new URL((document.querySelector('meta[name="mlxgw-root"]') || {}).content || ".",
                document.baseURI),

  url(path) {
    return new URL(path, gw.root).toString();
  },

  key() {
    return sessionStorage.getItem(KEY_NAME) || "";
  },

  setKey(value) {
    if (value) sessionStorage.setItem(KEY_NAME, value);
    else sessionStorage.removeItem(KEY_NAME);
  },

  headers(extra) {
    const headers = Object.assign({}, extra || {});
    const key = gw.key();
    if (key) headers.Authorization = "Bearer " + key;
    return headers;
  },

  // JSON from the gateway; throws an Error carrying .status and the gateway's message.
  async json(path, options) {
    const opts = Object.assign({}, options || {});
    opts.headers = gw.headers(Object.assign(
      opts.body ? { "Content-Type": "application/json" } : {}, opts.headers || {}));
    opts.credentials = "omit";  // the key travels in a header, never in a cookie
    const response = await fetch(gw.url(path), opts);
    let body = null;
    try { body = await response.json(); } catch (_) { body = null; }
    if (!response.ok) {
      const message = body && body.error ? body.error.message : response.statusText;
      const error = new Error(message || ("HTTP " + response.status));
      error.status = response.status;
      throw error;
    }
    return body;
  },

  // Wire the key form present on every page; `onKey` runs when a key is entered.
  keyForm(onKey) {
    const form = document.getElementById("key-form");
    const input = document.getElementById("key-input");
    const forget = document.getElementById("key-forget");
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      gw.setKey(input.value.trim());
      input.value = "";
      gw.showKeyState();
      onKey();
    });
    forget.addEventListener("click", () => {
      gw.setKey("");
      gw.showKeyState();
      onKey();
    });
    gw.showKeyState();
  },

  showKeyState() {
    const has = Boolean(gw.key());
    document.getElementById("key-state").textContent = has ? "key set for this tab" : "no key";
    document.getElementById("key-forget").hidden = !has;
  },

  el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") node.className = value;
      else if (name === "text") node.textContent = value;
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  },

  bytes(n) {
    if (n === null || n === undefined) return "–";
    const units = ["B", "KB", "MB", "GB", "TB"];
    let value = n, unit = 0;
    while (value >= 1000 && unit < units.length - 1) { value /= 1000; unit += 1; }
    return (unit ? value.toFixed(value < 10 ? 2 : 1) : String(value)) + " " + units[unit];
  },

  seconds(s) {
    if (s === null || s === undefined) return "–";
    if (s < 60) return Math.round(s) + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + Math.round(s % 60) + " s";
    return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
  },

  ago(epochSeconds) {
    if (!epochSeconds) return "never";
    return gw.seconds(Math.max(0, Date.now() / 1000 - epochSeconds)) + " ago";
  },
};
