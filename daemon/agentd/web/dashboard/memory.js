// Memory: search a namespace by meaning (each result with its score), open a memory to
// edit it (with its history) or forget it; the sessions alive, most recently active first
// (found by the start of their ids), and a session's messages.

import { api, query } from "./api.js";
import { choice, field, h, pretty, table, when } from "./dom.js";
import { act } from "./notice.js";

export async function memoryView(params) {
  const stats = await api("/v1/memory/stats");
  const namespaces = Object.keys(stats.namespaces);
  if (!namespaces.includes("default")) namespaces.unshift("default");
  const namespace = params.get("namespace") || "default";
  const q = params.get("q") || "";
  const open = params.get("id");
  const session = params.get("session") || "";
  const sessions = params.get("sessions") || "";
  const element = h("section", { "aria-labelledby": "memory-title" },
    h("h2", { id: "memory-title" }, "Memory"),
    h("p", { className: "muted" }, `Embedder ${stats.embedder} · `,
      namespaces.map((name) => `${name}: ${stats.namespaces[name] ?? 0}`).join(", "),
      ` · ${stats.sessions} sessions, ${stats.messages} messages`));
  const search = h("form", { className: "toolbar", role: "search", onsubmit: (event) => {
    event.preventDefault();
    const data = new FormData(search);
    location.hash = `#/memory${query({ namespace: data.get("namespace"), q: data.get("q").trim() })}`;
  } },
  choice("Namespace", "namespace", namespaces.map((name) => [name, name]), namespace),
  field("Meaning", { name: "q", value: q, type: "search", required: true }),
  h("button", { type: "submit" }, "Search"));
  element.append(search);
  if (q) element.append(await results(namespace, q));
  if (open) element.append(await memoryDetail(Number(open), namespace, q));
  element.append(await sessionPanel(session, sessions));
  return { element };
}

async function results(namespace, q) {
  const { results: found } = await api(`/v1/memory/search${query({ namespace, q, k: 20 })}`);
  if (!found.length) return h("p", { className: "muted" }, "Nothing found.");
  return h("ol", { className: "results", "aria-label": "Results, best first" }, found.map((memory) =>
    h("li", {}, h("span", { className: "score", title: "cosine similarity" }, memory.score.toFixed(3)), " ",
      h("a", { href: `#/memory${query({ namespace, q, id: memory.id })}` }, memory.text))));
}

async function memoryDetail(id, namespace, q) {
  const [memory, { history }] = await Promise.all([api(`/v1/memory/${id}`), api(`/v1/memory/${id}/history`)]);
  const back = `#/memory${query({ namespace, q })}`;
  const text = h("textarea", { id: "memory-text", name: "text", rows: "4" });
  text.value = memory.text;
  const form = h("form", { className: "edit", onsubmit: async (event) => {
    event.preventDefault();
    if (await act(`Saved memory ${id}`, () => api(`/v1/memory/${id}`, { method: "PATCH", body: { text: text.value } }))) {
      window.dispatchEvent(new HashChangeEvent("hashchange"));
    }
  } },
  h("label", { for: "memory-text" }, "Text"), text,
  h("button", { type: "submit" }, "Save"), " ",
  h("button", { type: "button", className: "danger", onclick: async () => {
    if (!confirm(`Forget memory ${id}?`)) return;
    if (await act(`Forgot memory ${id}`, () => api(`/v1/memory/${id}`, { method: "DELETE" }))) location.hash = back;
  } }, "Forget"));
  return h("article", { className: "panel", "aria-labelledby": "memory-detail" },
    h("h3", { id: "memory-detail" }, `Memory ${id}`),
    h("p", { className: "muted" }, `${memory.namespace} · created ${when(memory.created_at)} · updated ${when(memory.updated_at)}`),
    form, h("h4", {}, "Metadata"), pretty(memory.metadata),
    h("h4", {}, "History"),
    h("ol", { className: "history" }, history.map((change) => h("li", {},
      h("strong", {}, change.event), ` ${when(change.at)}`,
      change.old_text !== null ? [": was ", h("q", {}, change.old_text)] : null))));
}

async function sessionPanel(id, prefix) {
  const form = h("form", { className: "toolbar", role: "search", onsubmit: (event) => {
    event.preventDefault();
    location.hash = `#/memory${query({ sessions: new FormData(form).get("sessions").trim() })}`;
  } }, field("Session id starts with", { name: "sessions", value: prefix, type: "search" }),
  h("button", { type: "submit" }, "Find"));
  const panel = h("article", { className: "panel", "aria-labelledby": "sessions-title" },
    h("h3", { id: "sessions-title" }, "Sessions"), form);
  const { sessions } = await api(`/v1/sessions${query({ prefix, limit: 50 })}`);
  panel.append(sessions.length
    ? table("Sessions alive, the most recently active first", [
      ["Session", (s) => h("a", { href: `#/memory${query({ session: s.id, sessions: prefix })}`,
        "aria-current": s.id === id ? "true" : null }, s.id)],
      ["Messages", (s) => String(s.messages)],
      ["Last active", (s) => when(s.updated_at)],
      ["Expires", (s) => when(s.expires_at)],
    ], sessions)
    : h("p", { className: "muted" }, prefix ? `No session starts with ${prefix}.` : "No sessions."));
  if (id) {
    const { messages } = await api(`/v1/sessions/${encodeURIComponent(id)}/messages`);
    panel.append(h("h4", {}, `Session ${id}`), messages.length
      ? h("ol", { className: "messages", "aria-label": `Messages of ${id}` },
        messages.map((m) => h("li", {}, h("strong", {}, m.role), " ", m.content)))
      : h("p", { className: "muted" }, "No messages."));
  }
  return panel;
}
