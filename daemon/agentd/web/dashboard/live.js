// The live view: the daemon's events as they happen, from `/v1/stream`. Topic patterns
// choose the stream; pause holds the list still (events keep counting); a correlation id
// narrows it to one run. The list is bounded and consecutive token events of one task are
// folded into one row, so a thousand events a second never freeze the tab: rows are added
// once per animation frame, newest first.

import { EventStream } from "./api.js";
import { h } from "./dom.js";

const MAX_ROWS = 500;
const MAX_PENDING = 2000;
const clock = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit" });

export function liveView() {
  // `ticks`: events received in each quarter second of the last second, for the rate.
  const state = { topics: "**", following: null, paused: false, received: 0, ticks: [0, 0, 0, 0],
                  pending: [], frame: 0, lastRow: null, stream: null };
  const list = h("ol", { className: "events", "aria-label": "Events, newest first" });
  const status = h("span", { className: "stream-state", "data-state": "connecting" }, "connecting");
  const rate = h("output", { "aria-label": "Events per second" }, "0");
  const total = h("output", { "aria-label": "Events received" }, "0");
  const topics = h("input", { name: "topics", value: state.topics, id: "topics",
                              "aria-describedby": "topics-help" });
  const follow = h("input", { name: "correlation", id: "correlation", placeholder: "any" });
  const pause = h("button", { type: "button", "aria-pressed": "false" }, "Pause");
  const held = h("span", { className: "held" });

  function open() {
    if (state.stream) state.stream.close();
    state.stream = new EventStream("/v1/stream", { topics: state.topics }, {
      onEvent: (name, event) => receive(event),
      onState: (value, why) => {
        status.textContent = why ? `${value}: ${why}` : value;
        status.dataset.state = value;
      },
    });
  }

  function receive(event) {
    if (!event || event.topic === undefined) return; // a control event (gap, lagged)
    state.received += 1;
    state.ticks[3] += 1;
    if (state.following && event.correlation_id !== state.following) return;
    state.pending.push(event);
    if (state.pending.length > MAX_PENDING) state.pending.splice(0, state.pending.length - MAX_PENDING);
    if (!state.paused && !state.frame) state.frame = requestAnimationFrame(render);
  }

  function render() {
    state.frame = 0;
    // Only the newest MAX_ROWS can stay on the list: older ones are not built at all.
    const batch = state.pending.splice(0).slice(-MAX_ROWS);
    const fresh = document.createDocumentFragment();
    const rows = [];
    for (const event of batch) {
      if (fold(event)) continue;
      const row = eventRow(event);
      rows.push(row);
      state.lastRow = row;
    }
    for (let i = rows.length - 1; i >= 0; i -= 1) fresh.append(rows[i]);
    list.prepend(fresh);
    while (list.childElementCount > MAX_ROWS) list.lastElementChild.remove();
    held.textContent = "";
  }

  /** Fold a token event into the row above when it is the same task's: true if folded. */
  function fold(event) {
    const row = state.lastRow;
    if (!row || !event.topic.endsWith(".token") || row.dataset.topic !== event.topic
        || row.dataset.task !== String(event.data.task_id)) return false;
    const count = Number(row.dataset.count) + 1;
    row.dataset.count = String(count);
    row.querySelector(".text").textContent += event.data.text ?? "";
    row.querySelector(".count").textContent = `×${count}`;
    return true;
  }

  function eventRow(event) {
    const time = clock.format(event.time * 1000);
    const token = event.topic.endsWith(".token");
    const row = h("li", { "data-topic": event.topic, "data-task": String(event.data.task_id ?? ""),
                          "data-count": "1" },
      h("time", {}, time),
      h("span", { className: "topic" }, event.topic, token ? h("span", { className: "count" }, "") : null),
      event.correlation_id
        ? h("button", { type: "button", className: "link", title: "Follow this correlation id",
                        onclick: () => followId(event.correlation_id) }, event.correlation_id.slice(0, 12))
        : h("span", { className: "muted" }, "—"),
      token ? h("span", { className: "text" }, event.data.text ?? "")
        : h("code", { className: "text" }, summary(event.data)));
    row.append(event.data.task_id !== undefined
      ? h("a", { href: `#/tasks/${event.data.task_id}` }, `task ${event.data.task_id}`) : h("span"));
    return row;
  }

  function followId(id) {
    follow.value = id;
    state.following = id;
    list.replaceChildren();
    state.lastRow = null;
  }

  const form = h("form", { className: "toolbar", onsubmit: (event) => {
    event.preventDefault();
    state.topics = topics.value.trim() || "**";
    state.following = follow.value.trim() || null;
    list.replaceChildren();
    state.lastRow = null;
    open();
  } },
  h("label", { for: "topics" }, "Topics"), topics,
  h("span", { id: "topics-help", className: "muted" }, "patterns, comma-separated: task.*, user.**"),
  h("label", { for: "correlation" }, "Correlation id"), follow,
  h("button", { type: "submit" }, "Apply"));
  pause.addEventListener("click", () => {
    state.paused = !state.paused;
    pause.textContent = state.paused ? "Resume" : "Pause";
    pause.setAttribute("aria-pressed", String(state.paused));
    if (!state.paused && state.pending.length) render();
  });

  const ticker = setInterval(() => {
    rate.textContent = String(state.ticks.reduce((sum, n) => sum + n, 0));
    state.ticks = [state.ticks[1], state.ticks[2], state.ticks[3], 0];
    total.textContent = String(state.received);
    if (state.paused && state.pending.length) held.textContent = `${state.pending.length} new while paused`;
  }, 250);

  open();
  const element = h("section", { "aria-labelledby": "live-title" },
    h("h2", { id: "live-title" }, "Live events"),
    form,
    h("p", { className: "toolbar" }, pause, " Stream: ", status, " · ", rate, " events/s · ",
      total, " received ", held),
    list);
  return { element, leave: () => { clearInterval(ticker); state.stream.close(); } };
}

function summary(data) {
  const text = JSON.stringify(data);
  return text.length > 240 ? `${text.slice(0, 240)}…` : text;
}
