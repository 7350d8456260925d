// The system view: the daemon's state from `/v1/status` and `/healthz`, refreshed every
// few seconds: queues (depth and workers), plugins (reload one), background loops, loop
// lag, throughput (tasks finished per second over the last hour: the daemon's samples,
// then the page's), the store's sizes, the daemons sharing a PostgreSQL store, safe mode,
// and the last errors (of plugins, loops and tasks).

import { api } from "./api.js";
import { badge, h, svg, table, when } from "./dom.js";
import { seed, throughput } from "./metrics.js";
import { act } from "./notice.js";

const REFRESH_MS = 2000;
const CHART = { width: 600, height: 120 };

export async function systemView() {
  const element = h("section", { "aria-labelledby": "system-title" });
  seed(await api("/v1/tasks/throughput"));
  async function draw() {
    const [status, health, { queues }, failed, dead] = await Promise.all([
      api("/v1/status"), api("/healthz"), api("/v1/queues"),
      api("/v1/tasks?status=failed&limit=5"), api("/v1/tasks?status=dead&limit=5")]);
    element.replaceChildren(
      h("h2", { id: "system-title" }, "System"),
      safeMode(status.safe_mode) ?? "",
      h("dl", { className: "facts" },
        h("dt", {}, "Health"), h("dd", {}, badge(health.status)),
        h("dt", {}, "Version"), h("dd", {}, status.version),
        h("dt", {}, "Uptime"), h("dd", {}, `${Math.round(status.uptime)} s`),
        h("dt", {}, "Loop lag"), h("dd", { "data-field": "loop-lag" }, `${(status.loop_lag * 1000).toFixed(1)} ms`),
        h("dt", {}, "Tasks running here"), h("dd", {}, String(status.tasks.running_here)),
        h("dt", {}, "Handlers"), h("dd", {}, `${status.handlers.running} running, ${status.handlers.failed} failed, ${status.handlers.dropped} dropped`),
        h("dt", {}, "Node"), h("dd", {}, status.node)),
      h("h3", {}, "Throughput"), chart(throughput()),
      table("Queues", [["Name", (q) => h("span", { "data-queue": q.name }, q.name)],
                       ["Workers here", (q) => String(q.workers)], ["Queued", (q) => String(q.queued)],
                       ["Due", (q) => String(q.due)], ["Running", (q) => String(q.running)]], queues),
      table("Plugins", [["Name", (p) => p.name], ["State", (p) => badge(p.state)],
                        ["Error", (p) => p.error ?? ""],
                        ["", (p) => status.safe_mode ? "" : h("button", { type: "button",
                          "aria-label": `Reload plugin ${p.name}`,
                          onclick: () => act(`Reloaded plugin ${p.name}`,
                            () => api(`/v1/plugins/${encodeURIComponent(p.name)}/reload`, { method: "POST" })) },
                          "Reload")]], status.plugins),
      table("Background loops", [["Name", (l) => l.name], ["State", (l) => badge(l.state)],
                                 ["Restarts", (l) => String(l.restarts)],
                                 ["Last error", (l) => l.last_error ?? ""]], status.loops),
      table("Store", [["", ([key]) => key], ["", ([, value]) => String(value)]],
            Object.entries(status.store)),
      table("Daemons on this store", [["Node", (d) => d.id === status.node ? `${d.id} (this one)` : d.id],
                                      ["Started", (d) => when(d.started_at)],
                                      ["Heartbeat", (d) => when(d.heartbeat_at)]],
            status.daemons),
      h("h3", {}, "Last errors"), lastErrors(health, [...failed.tasks, ...dead.tasks]));
  }
  await draw();
  const timer = setInterval(() => draw().catch(() => {}), REFRESH_MS);
  return { element, leave: () => clearInterval(timer) };
}

function safeMode(mode) {
  if (!mode) return null;
  return h("div", { className: "alert", role: "alert" },
    h("strong", {}, "Safe mode: "), mode.reason ?? "", " (no plugin, no task runs). ",
    mode.cleared ? "Cleared: the next start is a normal one; restart the daemon to leave it."
      : h("button", { type: "button", onclick: () => act("Safe mode cleared for the next start",
        () => api("/v1/safe-mode/clear", { method: "POST" })) }, "Clear for the next start"));
}

function lastErrors(health, tasks) {
  const items = [
    ...health.plugins.filter((p) => p.error).map((p) => h("li", {}, `plugin ${p.name}: ${p.error}`)),
    ...health.loops.filter((l) => l.last_error).map((l) => h("li", {}, `loop ${l.name}: ${l.last_error}`)),
    ...health.warnings.map((w) => h("li", {}, w.warning)),
    ...tasks.sort((a, b) => (b.finished_at ?? 0) - (a.finished_at ?? 0)).map((t) => h("li", {},
      h("a", { href: `#/tasks/${t.id}` }, `task ${t.id} ${t.name}`), ` ${t.status} ${when(t.finished_at)}: `,
      String(t.error ?? "").split("\n")[0])),
  ];
  return items.length ? h("ul", { className: "errors" }, items) : h("p", { className: "muted" }, "None.");
}

/** Tasks finished per second as a line, the newest at the right. */
function chart(rates) {
  const span = rates.length ? (rates.at(-1)[0] - rates[0][0]) / 1000 : 0;
  const over = span < 120 ? `${Math.round(span)} s` : `${Math.round(span / 60)} min`;
  const label = rates.length
    ? `Tasks finished per second over the last ${over}; now ${rates.at(-1)[1].toFixed(1)}`
    : "Tasks finished per second: measuring";
  const figure = svg("svg", { viewBox: `0 0 ${CHART.width} ${CHART.height}`, role: "img",
                              "aria-label": label, class: "chart" });
  const top = Math.max(1, ...rates.map(([, rate]) => rate));
  if (rates.length > 1) {
    const start = rates[0][0];
    const span = Math.max(1, rates.at(-1)[0] - start);
    const points = rates.map(([t, rate]) =>
      `${((t - start) / span * CHART.width).toFixed(1)},${(CHART.height - rate / top * (CHART.height - 10)).toFixed(1)}`);
    figure.append(svg("polyline", { points: points.join(" "), class: "line" }));
  }
  return h("figure", {}, figure,
    h("figcaption", {}, rates.length ? `${label} (peak ${top.toFixed(1)}/s)` : label));
}
