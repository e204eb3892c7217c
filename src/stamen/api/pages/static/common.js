// What every page shares: the API key (asked for on a 401, kept in sessionStorage, sent
// as `Authorization: Bearer`), `Stamen.api` (fetch with that header; JSON errors in
// OpenAI's shape become `ApiError`s), and small DOM helpers that only ever set text.
"use strict";

(function () {
  const KEY_STORAGE = "stamen.apiKey";
  const waiting = []; // resolvers of calls waiting for a key

  class ApiError extends Error {
    constructor(status, message, code) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  function storedKey() {
    try {
      return sessionStorage.getItem(KEY_STORAGE) || "";
    } catch (_) {
      return ""; // storage disabled: the key lives as long as the page
    }
  }

  let memoryKey = storedKey();

  function setKey(key) {
    memoryKey = key;
    try {
      if (key) sessionStorage.setItem(KEY_STORAGE, key);
      else sessionStorage.removeItem(KEY_STORAGE);
    } catch (_) {
      /* storage disabled */
    }
  }

  function headers(extra) {
    const all = Object.assign({}, extra || {});
    if (memoryKey) all["Authorization"] = "Bearer " + memoryKey;
    return all;
  }

  // Show the key form; resolves when the visitor has entered a key.
  function askForKey(reason) {
    const form = document.getElementById("key-form");
    const input = document.getElementById("key-input");
    document.getElementById("key-reason").textContent = reason;
    form.hidden = false;
    input.focus();
    return new Promise((resolve) => waiting.push(resolve));
  }

  function setUpKeyForm() {
    const form = document.getElementById("key-form");
    const input = document.getElementById("key-input");
    const button = document.getElementById("key-button");
    const forget = document.getElementById("key-forget");
    button.hidden = !memoryKey;
    button.addEventListener("click", () => {
      form.hidden = !form.hidden;
      if (!form.hidden) input.focus();
    });
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      setKey(input.value.trim());
      input.value = "";
      form.hidden = true;
      button.hidden = !memoryKey;
      forget.hidden = !memoryKey;
      waiting.splice(0).forEach((resolve) => resolve());
    });
    forget.hidden = !memoryKey;
    forget.addEventListener("click", () => {
      setKey("");
      button.hidden = true;
      forget.hidden = true;
      form.hidden = true;
    });
  }

  async function errorOf(response) {
    let message = response.status + " " + response.statusText;
    let code = null;
    try {
      const body = await response.json();
      if (body && body.error) {
        message = body.error.message || message;
        code = body.error.code || null;
      }
    } catch (_) {
      /* not JSON */
    }
    return new ApiError(response.status, message, code);
  }

  // fetch(path) with the key; on 401 ask for a key and try again. Returns the Response
  // of a 2xx answer, throws ApiError otherwise.
  async function request(path, options) {
    for (;;) {
      const init = Object.assign({}, options || {});
      init.headers = headers(init.headers);
      const response = await fetch(path, init);
      if (response.status === 401) {
        const error = await errorOf(response);
        const why =
          error.code === "invalid_api_key"
            ? "That API key was refused. Enter another one."
            : "This server asks for an API key. It is kept in this tab only (sessionStorage).";
        await askForKey(why);
        continue;
      }
      if (!response.ok) throw await errorOf(response);
      return response;
    }
  }

  async function getJson(path) {
    return (await request(path)).json();
  }

  // el("p", {class: "x"}, "text", child...): attributes are set as attributes, strings
  // become text nodes; nothing is ever parsed as HTML.
  function el(tag, attributes, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes || {})) {
      if (value === null || value === undefined || value === false) continue;
      node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function formatNumber(value, digits) {
    if (value === null || value === undefined || Number.isNaN(value)) return "—";
    return Number(value).toLocaleString("en-US", {
      maximumFractionDigits: digits === undefined ? 1 : digits,
      minimumFractionDigits: 0,
    });
  }

  function shortId(peerId) {
    return peerId.length > 14 ? peerId.slice(0, 12) + "…" : peerId;
  }

  function formatTime(unixSeconds) {
    if (!unixSeconds) return "—";
    return new Date(unixSeconds * 1000).toLocaleString("en-GB", {
      dateStyle: "medium",
      timeStyle: "short",
    });
  }

  window.Stamen = {
    ApiError,
    request,
    getJson,
    el,
    formatNumber,
    formatTime,
    shortId,
  };

  document.addEventListener("DOMContentLoaded", setUpKeyForm);
})();
