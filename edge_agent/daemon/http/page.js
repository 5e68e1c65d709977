// The search page. Document texts and metadata are untrusted: they only ever reach the page
// through textContent (never innerHTML), and the Content-Security-Policy runs no other script.
"use strict";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "edge-agent-token";

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) h["Authorization"] = "Bearer " + token;
  return h;
}

async function api(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: headers(body !== undefined),
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let data = null;
  try {
    data = await response.json();
  } catch (_) {
    data = null;
  }
  if (response.status === 401) {
    $("token-form").hidden = false;
    throw new Error("this daemon needs its token (enter it above)");
  }
  if (!response.ok) {
    const error = data && data.error ? data.error : {};
    throw new Error((error.code || response.status) + ": " + (error.message || response.statusText));
  }
  return data;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function text(tag, className, content) {
  const node = document.createElement(tag);
  node.className = className;
  node.textContent = content;
  return node;
}

function render(result) {
  const list = $("hits");
  list.replaceChildren();
  for (const hit of result.hits) {
    const item = document.createElement("li");
    item.className = "hit";
    const head = document.createElement("div");
    head.className = "hit-head";
    head.append(
      text("span", "hit-id", hit.id),
      text("span", "hit-score", "score " + Number(hit.score).toFixed(4)),
    );
    if (hit.dense_score != null || hit.keyword_score != null) {
      head.append(text("span", "hit-parts",
        "dense " + (hit.dense_score == null ? "-" : Number(hit.dense_score).toFixed(4)) +
        " · keyword " + (hit.keyword_score == null ? "-" : Number(hit.keyword_score).toFixed(4))));
    }
    item.append(head);
    item.append(text("div", "hit-text", hit.text == null ? "(text not stored)" : hit.text));
    const keys = Object.keys(hit.metadata || {});
    if (keys.length) item.append(text("pre", "hit-meta", JSON.stringify(hit.metadata, null, 1)));
    list.append(item);
  }
  $("status").textContent = result.hits.length + " hits · " + result.mode + " · " +
    (result.timing_ms ? (result.timing_ms.embed + result.timing_ms.search).toFixed(1) + " ms" : "");
}

async function loadCollections() {
  const select = $("collection");
  const previous = select.value;
  const data = await api("GET", "/v1/collections");
  select.replaceChildren();
  for (const c of data.collections) {
    const option = document.createElement("option");
    option.value = c.name;
    option.textContent = c.state === "ok" ? c.name + " (" + c.count + ")" : c.name + " (unavailable)";
    option.disabled = c.state !== "ok";
    select.append(option);
  }
  if (previous) select.value = previous;
  $("status").textContent = data.collections.length ? "" : "no collections yet: add documents first";
}

async function search(event) {
  event.preventDefault();
  showError("");
  const body = { text: $("query").value, k: Number($("k").value) || 10, explain: true };
  if ($("mode").value) body.mode = $("mode").value;
  $("go").disabled = true;
  try {
    const name = encodeURIComponent($("collection").value);
    render(await api("POST", "/v1/collections/" + name + "/search", body));
  } catch (error) {
    showError(String(error.message || error));
  } finally {
    $("go").disabled = false;
    // Searches finished so far: lets a script (and the browser test) wait for this one.
    document.body.dataset.searches = String(Number(document.body.dataset.searches || 0) + 1);
  }
}

async function useToken(event) {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
  $("token-form").hidden = true;
  showError("");
  try {
    await loadCollections();
  } catch (error) {
    showError(String(error.message || error));
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("search-form").addEventListener("submit", search);
  $("token-form").addEventListener("submit", useToken);
  loadCollections().then(
    () => { document.body.dataset.ready = "1"; },
    (error) => { showError(String(error.message || error)); document.body.dataset.ready = "1"; },
  );
});
