// Waiting tasks: the questions tasks ask (`ctx.ask`), newest first, each with a form to
// answer it; the answer is what `ask` returns, and the task runs on.

import { api, query } from "./api.js";
import { h, pretty, when } from "./dom.js";
import { act } from "./notice.js";

export async function approvalsView(params) {
  const before = params.get("before") || "";
  const page = await api(`/v1/approvals${query({ before, limit: 50 })}`);
  const element = h("section", { "aria-labelledby": "approvals-title" },
    h("h2", { id: "approvals-title" }, "Waiting for an answer"),
    page.approvals.length
      ? h("ol", { className: "approvals" }, page.approvals.map((asked) => h("li", { "data-id": String(asked.task_id) },
        h("article", { className: "panel" },
          h("h3", {}, h("a", { href: `#/tasks/${asked.task_id}` }, `Task ${asked.task_id}`), ` ${asked.name}`),
          question(asked.task_id, asked)))))
      : h("p", { className: "muted" }, "No task is waiting for an answer."),
    page.next ? h("a", { href: `#/approvals${query({ before: page.next })}` }, "Older →") : null);
  return { element };
}

/** A task's question and the form that answers it: the text is sent as JSON when it is
 *  JSON (`true`, `{"approved": false}`), else as a string. */
export function question(taskId, asked, answered = () => window.dispatchEvent(new HashChangeEvent("hashchange"))) {
  const id = `answer-${taskId}`;
  const input = h("input", { id, name: "answer", required: true, autocomplete: "off" });
  const send = async (answer) => {
    if (await act(`Answered task ${taskId}`, () => api(`/v1/tasks/${taskId}/answer`, { method: "POST", body: { answer } }))) {
      answered();
    }
  };
  const form = h("form", { className: "toolbar", onsubmit: (event) => {
    event.preventDefault();
    let answer = input.value;
    try {
      answer = JSON.parse(answer);
    } catch {
      // not JSON: the text itself is the answer
    }
    send(answer);
  } },
  h("label", { for: id }, "Answer"), input, h("button", { type: "submit" }, "Send"),
  h("button", { type: "button", onclick: () => send(true) }, "Approve"),
  h("button", { type: "button", className: "danger", onclick: () => send(false) }, "Reject"));
  return h("div", { className: "question" },
    h("p", { className: "prompt" }, asked.prompt),
    Object.keys(asked.data || {}).length ? pretty(asked.data) : null,
    h("p", { className: "muted" }, asked.wake_at ? `Times out ${when(asked.wake_at)}` : "No time limit"),
    form);
}
