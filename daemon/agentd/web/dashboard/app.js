// The dashboard's shell: sign-in when the daemon asks for a token, the navigation (the
// view is in the URL's hash, so views can be bookmarked and the back button works), the
// task counters in the header and the notices at the bottom.

import { api, ApiError, session, signIn, signOut } from "./api.js";
import { approvalsView } from "./approvals.js";
import { h } from "./dom.js";
import { sample } from "./metrics.js";
import { liveView } from "./live.js";
import { memoryView } from "./memory.js";
import { schedulesView } from "./schedules.js";
import { systemView } from "./system.js";
import { taskListView, taskView } from "./tasks.js";

const main = document.getElementById("main");
const counters = document.getElementById("counters");
const signOutButton = document.getElementById("sign-out");
const STATES = ["queued", "running", "waiting", "succeeded", "failed", "dead", "cancelled"];
const COUNTER_MS = 2000;

let leave = null; // the current view's cleanup (it closes its streams and timers)
let counterTimer = null;

const ROUTES = [
  [/^#\/live$/, () => liveView()],
  [/^#\/tasks\/(\d+)$/, (m) => taskView(Number(m[1]))],
  [/^#\/tasks(?:\?(.*))?$/, (m) => taskListView(new URLSearchParams(m[1] || ""))],
  [/^#\/dead$/, () => taskListView(new URLSearchParams("status=dead"))],
  [/^#\/approvals(?:\?(.*))?$/, (m) => approvalsView(new URLSearchParams(m[1] || ""))],
  [/^#\/schedules$/, () => schedulesView()],
  [/^#\/memory(?:\?(.*))?$/, (m) => memoryView(new URLSearchParams(m[1] || ""))],
  [/^#\/system$/, () => systemView()],
];

async function route() {
  if (leave) leave();
  leave = null;
  const hash = location.hash || "#/live";
  for (const link of document.querySelectorAll("nav a")) {
    const current = hash === link.getAttribute("href") || hash.startsWith(`${link.getAttribute("href")}/`)
      || hash.startsWith(`${link.getAttribute("href")}?`);
    if (current) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  for (const [pattern, make] of ROUTES) {
    const match = hash.match(pattern);
    if (match) {
      try {
        const view = await make(match);
        main.replaceChildren(view.element);
        leave = view.leave || null;
        // When each view showed (DevTools' performance panel; the tests read the first).
        performance.mark("agentd.view", { detail: hash });
      } catch (error) {
        if (error instanceof ApiError && error.status === 401) return askForToken();
        main.replaceChildren(h("p", { className: "error" }, `This view failed: ${error.message}`));
      }
      return;
    }
  }
  main.replaceChildren(h("p", {}, "No such view."));
}

async function refreshCounters() {
  try {
    const { by_status: byStatus } = await api("/v1/tasks/counts");
    sample(byStatus);
    counters.replaceChildren(...STATES.flatMap((state) => [
      h("dt", {}, h("a", { href: `#/tasks?status=${state}` }, state)),
      h("dd", { className: `s-${state}`, "data-state": state }, String(byStatus[state] || 0)),
    ]));
    counters.classList.remove("stale");
    performance.mark("agentd.counters");
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) askForToken();
    else counters.classList.add("stale");
  }
}

function askForToken() {
  if (document.getElementById("token")) return; // already asking
  if (leave) leave();
  leave = null;
  clearInterval(counterTimer);
  counters.replaceChildren();
  signOutButton.hidden = true;
  const input = h("input", { id: "token", name: "token", type: "password", autocomplete: "off",
                             required: true });
  const error = h("p", { className: "error", role: "alert" });
  const form = h("form", { className: "sign-in" },
    h("h2", {}, "Sign in"),
    h("p", {}, "This daemon asks for its API token ([server] token). It is kept for this tab only."),
    h("label", { for: "token" }, "API token"), input,
    h("button", { type: "submit" }, "Sign in"), error);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    signIn(input.value.trim());
    try {
      await api("/v1/task-types"); // a quick question that needs the token
      main.replaceChildren();
      start();
    } catch (failure) {
      signOut();
      error.textContent = failure.status === 401 ? "That token is not this daemon's." : failure.message;
    }
  });
  main.replaceChildren(form);
  input.focus();
}

/** Show the view and the counters, both at once: if the daemon wants a token and the tab
 *  has none (or a wrong one), either answers 401 and the sign-in form replaces them. */
function start() {
  signOutButton.hidden = !session.token;
  clearInterval(counterTimer);
  counterTimer = setInterval(refreshCounters, COUNTER_MS);
  refreshCounters();
  route();
}

signOutButton.addEventListener("click", () => {
  if (leave) leave();
  leave = null;
  signOut();
  askForToken();
});
window.addEventListener("hashchange", () => {
  if (!document.getElementById("token")) route();
});
start();
