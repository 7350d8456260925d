// Tasks: the list (filtered by state, name and queue, a page at a time), the dead-letter
// list with bulk requeue, and one task's page: its arguments, result or error, attempts,
// timings, LLM usage, its children as a tree, and while it runs its progress and tokens
// live from `/v1/tasks/{id}/stream`; cancel, requeue and delete.

import { api, EventStream, query } from "./api.js";
import { question } from "./approvals.js";
import { badge, choice, duration, field, h, pretty, when } from "./dom.js";
import { act, tell } from "./notice.js";

const STATES = ["", "queued", "running", "waiting", "succeeded", "failed", "dead", "cancelled"];
const FINAL = new Set(["succeeded", "failed", "dead", "cancelled"]);
const REQUEUEABLE = new Set(["failed", "dead", "cancelled"]);
const PAGE = 50;
const TREE_LIMIT = 200; // children shown on a task's page, at most

export async function taskListView(params) {
  const filters = { status: params.get("status") || "", name: params.get("name") || "",
                    queue: params.get("queue") || "" };
  const before = params.get("before") || "";
  const page = await api(`/v1/tasks${query({ ...filters, before, limit: PAGE })}`);
  const dead = filters.status === "dead";
  const form = h("form", { className: "toolbar", onsubmit: (event) => {
    event.preventDefault();
    const data = new FormData(event.target);
    location.hash = `#/tasks${query({ status: data.get("status"), name: data.get("name").trim(),
                                      queue: data.get("queue").trim() })}`;
  } },
  choice("State", "status", STATES.map((s) => [s, s || "any"]), filters.status),
  field("Name", { name: "name", value: filters.name }),
  field("Queue", { name: "queue", value: filters.queue }),
  h("button", { type: "submit" }, "Filter"));

  const picks = [];
  const rows = page.tasks.map((task) => {
    const pick = REQUEUEABLE.has(task.status)
      ? h("input", { type: "checkbox", value: String(task.id), "aria-label": `Select task ${task.id}` })
      : null;
    if (pick) picks.push(pick);
    return h("tr", { "data-id": String(task.id) },
      h("td", {}, pick),
      h("td", {}, h("a", { href: `#/tasks/${task.id}` }, String(task.id))),
      h("td", {}, task.name), h("td", {}, task.queue), h("td", {}, badge(task.status)),
      h("td", { className: "num" }, `${task.attempts}/${task.max_attempts}`),
      h("td", {}, when(task.created_at)),
      h("td", {}, task.finished_at && task.started_at ? duration(task.finished_at - task.started_at) : "—"),
      h("td", { className: "error-text" }, task.error ? String(task.error).split("\n")[0] : ""));
  });
  const selectAll = h("input", { type: "checkbox", "aria-label": "Select all on this page",
    onchange: (event) => { for (const pick of picks) pick.checked = event.target.checked; } });
  const requeue = h("button", { type: "button", onclick: async () => {
    const ids = picks.filter((pick) => pick.checked).map((pick) => Number(pick.value));
    if (!ids.length) return;
    let done = 0;
    for (const id of ids) {
      if (await act(`Requeued task ${id}`, () => api(`/v1/tasks/${id}/requeue`, { method: "POST" }))) done += 1;
    }
    tell(`Requeued ${done} of ${ids.length} tasks`);
    window.dispatchEvent(new HashChangeEvent("hashchange"));
  } }, "Requeue selected");
  const next = page.next
    ? h("a", { href: `#/tasks${query({ ...filters, before: page.next })}` }, "Older tasks →") : null;
  const element = h("section", { "aria-labelledby": "tasks-title" },
    h("h2", { id: "tasks-title" }, dead ? "Dead letters" : "Tasks"),
    dead ? h("p", {}, "Tasks that used all their attempts. Requeue runs them again with a fresh count.") : null,
    form,
    h("p", { className: "toolbar" }, requeue),
    h("table", { className: "tasks" },
      h("caption", {}, `${page.tasks.length} task${page.tasks.length === 1 ? "" : "s"}${before ? " (older)" : ""}`),
      h("thead", {}, h("tr", {}, h("th", { scope: "col" }, selectAll),
        ...["Id", "Name", "Queue", "State", "Attempts", "Created", "Ran", "Error"].map(
          (title) => h("th", { scope: "col" }, title)))),
      h("tbody", {}, rows)),
    next);
  return { element };
}

export async function taskView(id) {
  let task = await api(`/v1/tasks/${id}`);
  const element = h("section", { "aria-labelledby": "task-title" });
  const progress = h("ol", { className: "progress", "aria-label": "Progress" });
  const tokens = h("pre", { className: "tokens" });
  const tree = h("div", { className: "tree" });
  const details = h("div");
  // Tokens are not kept: only what arrives while the stream is open is shown, so the page
  // says whether it is.
  const live = h("span", { className: "stream-state", "data-state": "idle", "aria-label": "Stream" }, "not followed");
  let stream = null;
  let resumeAfter = null; // the last event id a closed stream saw: a new one starts there

  function show() {
    details.replaceChildren(summary(task, update));
  }

  /** Read the task again and show it; a failure (the daemon away) is told, not thrown. */
  function update() {
    refresh().catch((error) => tell(`Task ${id} could not be read again: ${error.message}`));
  }

  async function refresh() {
    try {
      task = await api(`/v1/tasks/${id}`);
    } catch (error) {
      if (error.status === 404) {
        element.replaceChildren(h("h2", { id: "task-title" }, `Task ${id}`), h("p", {}, "Deleted."));
        return;
      }
      throw error;
    }
    show();
    tree.replaceChildren(await childTree(task));
    follow();
  }

  /** While the task is unfinished (again, after a requeue), follow its stream. */
  function follow() {
    if (FINAL.has(task.status) || (stream && !stream.ended)) return;
    if (stream) resumeAfter = stream.lastId;
    stream = new EventStream(`/v1/tasks/${id}/stream`, resumeAfter ? { since: resumeAfter } : {}, {
      onEvent: (name, data) => {
        if (name === "task.progress") {
          progress.append(h("li", {}, h("strong", {}, data.data.kind), " ", JSON.stringify(data.data.data ?? {})));
        } else if (name === "task.token" && data.data.task_id === id) {
          tokens.textContent += data.data.text;
        } else if (name !== "task" && name !== "task.token") {
          update();
        }
      },
      onState: (value, why) => {
        live.textContent = why ? `${value}: ${why}` : value;
        live.dataset.state = value;
      },
      onEnd: () => {
        live.textContent = "ended";
        live.dataset.state = "ended";
        update();
      },
    });
  }

  show();
  tree.replaceChildren(await childTree(task));
  element.append(h("h2", { id: "task-title" }, `Task ${id}: `, task.name),
    details,
    h("h3", {}, "Progress"), progress,
    h("h3", {}, "Tokens ", live), tokens,
    h("h3", {}, "Children"), tree);
  follow();
  return { element, leave: () => stream && stream.close() };
}

function summary(task, changed) {
  const actions = [];
  if (!FINAL.has(task.status)) {
    actions.push(h("button", { type: "button", onclick: async () => {
      await act(`Cancelled task ${task.id}`, () => api(`/v1/tasks/${task.id}/cancel`, { method: "POST" }));
      changed();
    } }, "Cancel"));
  }
  if (REQUEUEABLE.has(task.status)) {
    actions.push(h("button", { type: "button", onclick: async () => {
      await act(`Requeued task ${task.id}`, () => api(`/v1/tasks/${task.id}/requeue`, { method: "POST" }));
      changed();
    } }, "Requeue"));
  }
  if (FINAL.has(task.status)) {
    actions.push(h("button", { type: "button", className: "danger", onclick: async () => {
      if (!confirm(`Delete task ${task.id}?`)) return;
      await act(`Deleted task ${task.id}`, () => api(`/v1/tasks/${task.id}`, { method: "DELETE" }));
      location.hash = "#/tasks";
    } }, "Delete"));
  }
  const ran = task.started_at && task.finished_at ? duration(task.finished_at - task.started_at) : "—";
  const waited = task.started_at ? duration(task.started_at - task.created_at) : "—";
  return h("div", {},
    h("p", { className: "toolbar" }, badge(task.status), ...actions),
    h("dl", { className: "facts" },
      h("dt", {}, "Queue"), h("dd", {}, task.queue),
      h("dt", {}, "Attempts"), h("dd", { "data-field": "attempts" }, `${task.attempts} of ${task.max_attempts}`),
      h("dt", {}, "Created"), h("dd", {}, when(task.created_at)),
      h("dt", {}, "Started"), h("dd", {}, `${when(task.started_at)} (waited ${waited})`),
      h("dt", {}, "Finished"), h("dd", {}, `${when(task.finished_at)} (ran ${ran})`),
      h("dt", {}, "Parent"), h("dd", {}, task.parent_id ? h("a", { href: `#/tasks/${task.parent_id}` }, String(task.parent_id)) : "—"),
      h("dt", {}, "Correlation"), h("dd", {}, task.correlation_id ?? "—"),
      h("dt", {}, "LLM usage"), h("dd", { "data-field": "usage" }, usage(task.usage))),
    task.waiting_for ? [h("h3", {}, "Waiting for"), waitingFor(task, changed)] : null,
    h("h3", {}, "Arguments"), pretty(task.args),
    task.error ? [h("h3", {}, "Error"), h("pre", { className: "error-text", "data-field": "error" }, String(task.error))] : null,
    task.result !== null && task.result !== undefined
      ? [h("h3", {}, "Result"), h("div", { "data-field": "result" }, pretty(task.result))] : null);
}

function waitingFor(task, changed) {
  const wait = task.waiting_for;
  if (wait.kind === "ask") return question(task.id, wait, changed);
  if (wait.kind === "event") return h("p", {}, `an event on ${wait.pattern} `, h("code", {}, JSON.stringify(wait.match)));
  return h("p", {}, `its time: ${when(wait.wake_at)}`);
}

function usage(value) {
  if (!value || !Object.keys(value).length) return "none";
  return Object.entries(value).map(([key, amount]) => `${key} ${typeof amount === "object" ? JSON.stringify(amount) : amount}`).join(", ");
}

/** The task's descendants as nested lists, read breadth-first up to TREE_LIMIT tasks. */
async function childTree(task) {
  if (!task.children.length) return h("p", { className: "muted" }, "None.");
  let budget = TREE_LIMIT;
  async function branch(ids) {
    const list = h("ul", {});
    for (const id of ids) {
      if (budget <= 0) {
        list.append(h("li", { className: "muted" }, "… more"));
        break;
      }
      budget -= 1;
      const child = await api(`/v1/tasks/${id}`);
      const item = h("li", {}, h("a", { href: `#/tasks/${id}` }, `${id} ${child.name}`), " ", badge(child.status));
      if (child.children.length) item.append(await branch(child.children));
      list.append(item);
    }
    return list;
  }
  return branch(task.children);
}
