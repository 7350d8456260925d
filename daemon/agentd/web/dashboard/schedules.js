// Schedules: each with its next fire, last fire and outcome, counts and missed fires
// (refreshed every few seconds); pause, resume and run now; a form to create one (kept
// across restarts).

import { api } from "./api.js";
import { badge, choice, field, h, when } from "./dom.js";
import { act, tell } from "./notice.js";

const REFRESH_MS = 2000;

export async function schedulesView() {
  const element = h("section", { "aria-labelledby": "schedules-title" });
  const body = h("div");
  async function draw() {
    const { schedules } = await api("/v1/schedules");
    body.replaceChildren(schedules.length ? scheduleTable(schedules, redraw)
      : h("p", { className: "muted" }, "No schedule yet."));
  }
  // After an action, or on the timer: a failure (the daemon away) is told, not thrown.
  const redraw = () => draw().catch((error) => tell(`Schedules could not be read: ${error.message}`));
  await draw();
  element.append(h("h2", { id: "schedules-title" }, "Schedules"), body, createForm(draw));
  const timer = setInterval(redraw, REFRESH_MS);
  return { element, leave: () => clearInterval(timer) };
}

function trigger(s) {
  if (s.every !== undefined) return `every ${s.every} s`;
  if (s.cron !== undefined) return `cron ${s.cron}`;
  return `at ${when(s.at)}`;
}

function scheduleTable(schedules, changed) {
  const run = (label, path) => async () => {
    await act(label, () => api(path, { method: "POST" }));
    changed();
  };
  return h("table", { className: "schedules" },
    h("caption", {}, `${schedules.length} schedule${schedules.length === 1 ? "" : "s"}`),
    h("thead", {}, h("tr", {}, ["Id", "When", "Does", "Next fire", "Last fire", "Outcome", "Fires",
                                "Missed", "Failed in a row", "Actions"].map((t) => h("th", { scope: "col" }, t)))),
    h("tbody", {}, schedules.map((s) => h("tr", { "data-id": s.id },
      h("td", {}, s.id, s.paused ? [" ", badge("paused")] : null),
      h("td", {}, trigger(s)),
      h("td", {}, s.task ? `task ${s.task}` : `event ${s.event}`),
      h("td", {}, s.paused ? "—" : when(s.next_fire)),
      h("td", {}, when(s.last_fire)),
      h("td", {}, s.last_outcome ? badge(s.last_outcome) : "—",
        s.last_task_id ? [" ", h("a", { href: `#/tasks/${s.last_task_id}` }, `task ${s.last_task_id}`)] : null),
      h("td", { className: "num", "data-field": "fires" }, String(s.fires)),
      h("td", { className: "num", "data-field": "misses" }, String(s.misses)),
      h("td", { className: "num" }, String(s.failures_in_row)),
      h("td", {},
        s.paused
          ? h("button", { type: "button", onclick: run(`Resumed ${s.id}`, `/v1/schedules/${encodeURIComponent(s.id)}/resume`) }, "Resume")
          : h("button", { type: "button", onclick: run(`Paused ${s.id}`, `/v1/schedules/${encodeURIComponent(s.id)}/pause`) }, "Pause"),
        " ",
        h("button", { type: "button", onclick: run(`Ran ${s.id}`, `/v1/schedules/${encodeURIComponent(s.id)}/run`) }, "Run now"))))));
}

function createForm(created) {
  const error = h("p", { className: "error", role: "alert" });
  const form = h("form", { className: "create", "aria-labelledby": "create-title", onsubmit: async (event) => {
    event.preventDefault();
    const data = new FormData(form);
    const schedule = { id: data.get("id").trim(), task: data.get("task").trim() };
    const kind = data.get("kind");
    const value = data.get("value").trim();
    schedule[kind] = kind === "cron" ? value : Number(value);
    try {
      const args = data.get("args").trim();
      if (args) schedule.args = JSON.parse(args);
      await api("/v1/schedules", { method: "POST", body: schedule });
      error.textContent = "";
      form.reset();
      await act(`Created ${schedule.id}`, () => created());
    } catch (failure) {
      error.textContent = failure.message;
    }
  } },
  h("h3", { id: "create-title" }, "New schedule"),
  field("Id", { name: "id", required: true }),
  choice("Trigger", "kind", [["every", "every (seconds)"], ["cron", "cron"], ["at", "at (Unix time)"]], "every"),
  field("Value", { name: "value", required: true, placeholder: "60, or */5 * * * *" }),
  field("Task", { name: "task", required: true }),
  field("Arguments (JSON)", { name: "args", placeholder: "{}" }),
  h("button", { type: "submit" }, "Create"), error);
  return form;
}
