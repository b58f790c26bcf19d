// Kiln's chat page: a conversation with the server that served this page, streamed from
// POST /v1/chat/completions and kept in the page.
//
// Rules:
// - The answer is untrusted text: its markdown becomes HTML only through DOMPurify, and the page's
//   Content-Security-Policy (kiln/serve/chat_page.py) loads nothing from anywhere but this server.
// - Stop aborts the fetch; the server sees the connection close and frees the request.
// - The history sent with each request is the finished exchanges of this conversation (a stopped
//   answer counts with what arrived); "New chat" forgets it.
"use strict";

const KEY_STORAGE = "kiln.apiKey";

const ui = Object.fromEntries(
  [
    "model", "new-chat", "settings", "system-prompt", "temperature", "max-tokens", "api-key-field",
    "api-key", "notice", "conversation", "composer", "prompt", "send", "stop",
  ].map((id) => [id.replace(/-(\w)/g, (_, c) => c.toUpperCase()), document.getElementById(id)]),
);

const chat = {
  history: [], // {role, content} of the finished exchanges
  controller: null, // the AbortController of the answer streaming now
};

// --- markdown ----------------------------------------------------------------------------------------

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    node.setAttribute("target", "_blank"); // a link never replaces the conversation
    node.setAttribute("rel", "noopener noreferrer");
  }
});

// Render `text` as sanitized markdown into `target`, code blocks highlighted.
function renderMarkdown(target, text) {
  target.innerHTML = DOMPurify.sanitize(marked.parse(text, { gfm: true, breaks: true }));
  for (const code of target.querySelectorAll("pre code")) hljs.highlightElement(code);
}

// --- server ----------------------------------------------------------------------------------------------

function readStoredKey() {
  try {
    return localStorage.getItem(KEY_STORAGE) ?? "";
  } catch {
    return ""; // storage disabled: the key lives as long as the page
  }
}

function storeKey(key) {
  try {
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
  } catch {
    // storage disabled: nothing to keep
  }
}

function headers(json) {
  const result = json ? { "Content-Type": "application/json" } : {};
  const key = ui.apiKey.value.trim();
  if (key) result.Authorization = `Bearer ${key}`;
  return result;
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (body?.error?.message) return `${response.status}: ${body.error.message}`;
  } catch {
    // not JSON: the status says enough
  }
  return `${response.status} ${response.statusText}`;
}

function notice(text) {
  ui.notice.textContent = text;
}

function askForKey() {
  ui.apiKeyField.hidden = false;
  ui.settings.open = true;
  notice(ui.apiKey.value ? "The server refused this API key." : "This server needs an API key.");
  ui.apiKey.focus();
}

async function loadModels() {
  let response;
  try {
    response = await fetch("v1/models", { headers: headers(false) });
  } catch (error) {
    notice(`Cannot reach the server: ${error.message}`);
    return;
  }
  if (response.status === 401) {
    ui.model.replaceChildren();
    askForKey();
    return;
  }
  if (!response.ok) {
    notice(`Cannot list the models: ${await errorText(response)}`);
    return;
  }
  const { data } = await response.json();
  const previous = ui.model.value;
  ui.model.replaceChildren(...data.map((card) => new Option(card.id, card.id)));
  if (data.some((card) => card.id === previous)) ui.model.value = previous;
  notice("");
}

// The data of each server-sent event in `body`: events end at a blank line, their `data:` lines join
// with "\n", lines starting with ":" are comments (the server's keep-alives).
async function* eventData(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let data = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return; // an event cut off by the end of the stream is dropped, as EventSource does
      buffer += value;
      const cut = buffer.endsWith("\r") ? buffer.length - 1 : buffer.length; // "\r\n" may be split
      const lines = buffer.slice(0, cut).split(/\r\n|\r|\n/);
      buffer = lines.pop() + buffer.slice(cut);
      for (const line of lines) {
        if (line === "") {
          if (data.length) yield data.join("\n");
          data = [];
        } else if (!line.startsWith(":")) {
          const colon = line.indexOf(":");
          const field = colon === -1 ? line : line.slice(0, colon);
          const value = colon === -1 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (field === "data") data.push(value);
        }
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

// --- the conversation -----------------------------------------------------------------------------------

function addMessage(role) {
  const article = document.createElement("article");
  article.className = `message ${role}`;
  const who = document.createElement("div");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "Assistant";
  const content = document.createElement("div");
  content.className = "content";
  article.append(who, content);
  ui.conversation.append(article);
  return { article, content };
}

// A reasoning model's thinking (a server with --reasoning-parser sends it as `reasoning_content`): a
// folded block above the answer, plain text, opened while it streams.
function addThinking(answer) {
  const details = document.createElement("details");
  details.className = "thinking";
  details.open = true;
  const summary = document.createElement("summary");
  summary.textContent = "Thinking";
  const text = document.createElement("div");
  details.append(summary, text);
  answer.content.before(details);
  return { details, text };
}

function addStats(article) {
  const stats = document.createElement("p");
  stats.className = "stats";
  article.append(stats);
  return stats;
}

function scrollToEnd() {
  ui.conversation.scrollTop = ui.conversation.scrollHeight;
}

function formatStats(timing) {
  const parts = [];
  if (timing.first !== null) parts.push(`TTFT ${Math.round(timing.first - timing.sent)} ms`);
  // Counted from usage when the server sent it (include_usage), else one per chunk received.
  const tokens = timing.usage?.completion_tokens ?? timing.chunks;
  parts.push(`${timing.usage ? "" : "~"}${tokens} tokens`);
  const seconds = (timing.last - timing.first) / 1000;
  if (tokens > 1 && seconds > 0) parts.push(`${((tokens - 1) / seconds).toFixed(1)} tokens/s`);
  if (timing.outcome) parts.push(timing.outcome);
  return parts.join(" · ");
}

function setBusy(busy) {
  ui.send.disabled = busy;
  ui.stop.disabled = !busy;
}

function requestBody(messages) {
  const body = { messages, stream: true, stream_options: { include_usage: true } };
  if (ui.model.value) body.model = ui.model.value;
  if (ui.temperature.value !== "") body.temperature = Number(ui.temperature.value);
  if (ui.maxTokens.value !== "") body.max_tokens = Number(ui.maxTokens.value);
  return body;
}

async function send(text) {
  const system = ui.systemPrompt.value.trim();
  const question = { role: "user", content: text };
  const messages = [...(system ? [{ role: "system", content: system }] : []), ...chat.history, question];
  addMessage("user").content.textContent = text;
  const answer = addMessage("assistant");
  const stats = addStats(answer.article);
  answer.article.setAttribute("aria-busy", "true");
  scrollToEnd();

  const controller = new AbortController();
  chat.controller = controller;
  setBusy(true);
  const timing = { sent: performance.now(), first: null, last: null, chunks: 0, usage: null, outcome: "" };
  let content = "";
  let thought = ""; // the reasoning, with a reasoning parser
  let thinking = null; // its block, once some came
  let pending = false; // a render is queued for the next frame
  const render = () => {
    pending = false;
    if (thinking) {
      thinking.text.textContent = thought;
      if (content) thinking.details.open = false; // the answer began: fold the thinking away
    }
    renderMarkdown(answer.content, content);
    stats.textContent = formatStats(timing);
    scrollToEnd();
  };
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST",
      headers: headers(true),
      body: JSON.stringify(requestBody(messages)),
      signal: controller.signal,
    });
    if (response.status === 401) askForKey();
    if (!response.ok) throw new Error(await errorText(response));
    for await (const data of eventData(response.body)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) timing.usage = chunk.usage;
      const choice = chunk.choices?.[0];
      if (choice?.finish_reason) timing.outcome = choice.finish_reason;
      const delta = choice?.delta?.content;
      const reasoning = choice?.delta?.reasoning_content;
      if (reasoning) {
        thinking ??= addThinking(answer);
        thought += reasoning;
      }
      if (delta || reasoning) {
        timing.last = performance.now();
        timing.first ??= timing.last;
        timing.chunks += 1;
        content += delta ?? "";
        if (!pending) {
          pending = true;
          requestAnimationFrame(render);
        }
      }
    }
  } catch (error) {
    if (error.name === "AbortError") {
      timing.outcome = "stopped";
    } else {
      timing.outcome = "failed";
      const alert = document.createElement("p");
      alert.className = "error";
      alert.setAttribute("role", "alert");
      alert.textContent = error.message;
      answer.article.append(alert);
    }
  } finally {
    if (chat.controller === controller) {
      chat.controller = null;
      setBusy(false);
    }
    render();
    answer.article.removeAttribute("aria-busy");
    if (content && !controller.signal.reason?.newChat) {
      chat.history.push(question, { role: "assistant", content });
    }
  }
}

function newChat() {
  chat.controller?.abort({ name: "AbortError", newChat: true });
  chat.controller = null;
  chat.history = [];
  ui.conversation.replaceChildren();
  setBusy(false);
  ui.prompt.focus();
}

// --- controls ------------------------------------------------------------------------------------------

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.prompt.value.trim();
  if (!text || chat.controller) return;
  ui.prompt.value = "";
  send(text);
});

ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault(); // Enter sends; Shift+Enter keeps its newline
    ui.composer.requestSubmit();
  } else if (event.key === "Escape" && chat.controller) {
    chat.controller.abort();
  }
});

ui.stop.addEventListener("click", () => chat.controller?.abort());
ui.newChat.addEventListener("click", newChat);

ui.apiKey.value = readStoredKey();
if (ui.apiKey.value) ui.apiKeyField.hidden = false;
ui.apiKey.addEventListener("change", () => {
  storeKey(ui.apiKey.value.trim());
  loadModels();
});

// For tests and the console: the page's renderer.
window.kilnChat = { renderMarkdown };

loadModels();
ui.prompt.focus();
