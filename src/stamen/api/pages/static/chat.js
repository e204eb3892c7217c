// The chat page: a conversation with a served model through `/v1/chat/completions` with
// `stream: true`, read with fetch + ReadableStream and parsed as server-sent events (only
// `data:` lines carry chunks; `:` lines are keep-alives). Stop aborts the request (an
// AbortController): the server sees the disconnect, cancels the generation and frees
// the hosts' cache. Answers are rendered by `Stamen.renderMarkdown`, never as HTML.
// Each assistant message carries data-state: streaming, done, stopped or error.
"use strict";

(function () {
  const { el, getJson, request, renderMarkdown, formatNumber } = window.Stamen;
  let conversation = []; // {role, content} sent with each request
  let controller = null; // the AbortController of the request in flight

  const $ = (id) => document.getElementById(id);

  async function loadModels() {
    const select = $("model");
    try {
      const models = (await getJson("/v1/models")).data.map((m) => m.id);
      const base = models.filter((id) => !id.startsWith("ft:"));
      const tuned = models.filter((id) => id.startsWith("ft:"));
      const option = (id) => el("option", { value: id }, id);
      select.replaceChildren(...base.map(option));
      if (tuned.length) select.append(el("optgroup", { label: "Fine-tuned" }, ...tuned.map(option)));
    } catch (error) {
      setStats("Cannot list models: " + error.message, true);
    }
  }

  function setStats(text, isError) {
    $("stats").textContent = text;
    $("stats").classList.toggle("error", Boolean(isError));
  }

  function addMessage(role, content) {
    $("empty-chat").hidden = true;
    const body = el("div", { class: "message-body" });
    const item = el("li", { class: "message " + role, "data-role": role },
      el("span", { class: "message-role" }, role === "user" ? "You" : "Assistant"), body);
    if (role === "user") body.textContent = content; // a user's text is shown as typed
    $("messages").append(item);
    item.scrollIntoView({ block: "end" });
    return { item, body };
  }

  // Feeds bytes of an SSE stream; calls onData(text) for each event's data.
  function sseParser(onData) {
    const decoder = new TextDecoder();
    let buffer = "";
    let data = [];
    function line(text) {
      if (text === "") {
        if (data.length) onData(data.join("\n"));
        data = [];
      } else if (text.startsWith("data:")) {
        data.push(text.slice(text.startsWith("data: ") ? 6 : 5));
      } // comments (":") and other fields are not used by this API
    }
    return {
      push(bytes) {
        buffer += decoder.decode(bytes, { stream: true });
        const lines = buffer.split(/\r\n|\r|\n/);
        buffer = lines.pop();
        lines.forEach(line);
      },
      end() {
        if (buffer) line(buffer);
        line("");
      },
    };
  }

  function requestBody(model) {
    const system = $("system").value.trim();
    const messages = system ? [{ role: "system", content: system }, ...conversation] : conversation;
    const body = { model, messages, stream: true, stream_options: { include_usage: true } };
    const temperature = parseFloat($("temperature").value);
    const maxTokens = parseInt($("max-tokens").value, 10);
    if (Number.isFinite(temperature)) body.temperature = temperature;
    if (Number.isFinite(maxTokens)) body.max_tokens = maxTokens;
    return body;
  }

  // One answer streaming into `view`: its text, timings and how it ended.
  function answer(view) {
    const started = performance.now();
    const state = { text: "", tokens: 0, first: null, last: null, finish: null, usage: null, error: null };
    let drawPending = false;
    function draw() {
      drawPending = false;
      view.body.replaceChildren(renderMarkdown(state.text));
    }
    function onData(data) {
      if (data === "[DONE]") return;
      let chunk;
      try {
        chunk = JSON.parse(data);
      } catch (_) {
        return;
      }
      if (chunk.error) {
        state.error = chunk.error.message || "the stream ended with an error";
        return;
      }
      if (chunk.usage) state.usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const content = choice.delta && choice.delta.content;
        if (content) {
          const now = performance.now();
          if (state.first === null) state.first = now;
          state.last = now;
          state.tokens += 1;
          state.text += content;
          if (!drawPending) {
            drawPending = true;
            requestAnimationFrame(draw);
          }
        }
        if (choice.finish_reason) state.finish = choice.finish_reason;
      }
      showTimings(state, started, "streaming");
    }
    return { state, onData, draw, started };
  }

  function showTimings(state, started, how) {
    const parts = [];
    if (state.first !== null) parts.push(`first token after ${formatNumber((state.first - started) / 1000, 2)} s`);
    const tokens = state.usage ? state.usage.completion_tokens : state.tokens;
    parts.push(`${tokens} tokens`);
    if (state.first !== null && state.last > state.first && state.tokens > 1) {
      // Rate of the tokens after the first: time to first token is reported apart.
      const rate = (state.tokens - 1) / ((state.last - state.first) / 1000);
      parts.push(`${formatNumber(rate, 1)} tokens/s`);
    }
    parts.push(how);
    setStats(parts.join(" · "), how.startsWith("error"));
    return parts.slice(0, -1).join(" · ");
  }

  function setBusy(busy) {
    $("send").disabled = busy;
    $("stop").disabled = !busy;
    $("model").disabled = busy;
  }

  async function send(text) {
    const model = $("model").value;
    if (!model) return setStats("No model to talk to.", true);
    conversation.push({ role: "user", content: text });
    // "New conversation" during this answer replaces `conversation`: the answer then
    // belongs to the discarded one and must not leak into the new.
    const thread = conversation;
    addMessage("user", text);
    const view = addMessage("assistant", "");
    view.item.dataset.state = "streaming";
    const run = answer(view);
    controller = new AbortController();
    setBusy(true);
    let ending = "done";
    try {
      const response = await request("/v1/chat/completions", {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
        body: JSON.stringify(requestBody(model)),
        signal: controller.signal,
      });
      const parser = sseParser(run.onData);
      const reader = response.body.getReader();
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        parser.push(value);
      }
      parser.end();
      if (run.state.error) ending = "error";
    } catch (error) {
      if (error.name === "AbortError") ending = "stopped";
      else {
        ending = "error";
        run.state.error = error.message;
      }
    } finally {
      controller = null;
      setBusy(false);
    }
    run.draw();
    view.item.dataset.state = ending;
    if (run.state.text) thread.push({ role: "assistant", content: run.state.text });
    const how = ending === "done" ? "finished: " + (run.state.finish || "end of stream") : ending;
    const timings = showTimings(run.state, run.started, ending === "error" ? "error: " + run.state.error : how);
    if (ending === "stopped") view.item.append(el("p", { class: "message-note" }, "Stopped."));
    if (ending === "error") view.item.append(el("p", { class: "message-note error" }, "Error: " + run.state.error));
    // Each answer keeps its own figures, so that two answers can be compared.
    view.item.append(el("p", { class: "message-note timings" }, timings +
      (ending === "done" && run.state.finish ? " · " + run.state.finish : "")));
    $("prompt").focus();
  }

  document.addEventListener("DOMContentLoaded", () => {
    loadModels();
    $("composer").addEventListener("submit", (event) => {
      event.preventDefault();
      const text = $("prompt").value.trim();
      if (!text || controller !== null) return;
      $("prompt").value = "";
      send(text);
    });
    $("prompt").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        $("composer").requestSubmit();
      }
    });
    $("stop").addEventListener("click", () => {
      if (controller !== null) controller.abort();
    });
    $("settings").addEventListener("submit", (event) => event.preventDefault());
    $("clear").addEventListener("click", () => {
      if (controller !== null) controller.abort();
      conversation = [];
      $("messages").replaceChildren();
      $("empty-chat").hidden = false;
      setStats("");
      $("prompt").focus();
    });
  });
})();
