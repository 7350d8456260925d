// The daemon's HTTP API as the page uses it: the token pasted at sign-in (kept for the
// tab, in sessionStorage), JSON in and out, and server-sent event streams read with
// fetch (any topic is an event name, which EventSource cannot listen to generically),
// opened with a stream token and resumed after a drop or a restart of the daemon.

const TOKEN_KEY = "agentd.token";

export const session = { token: sessionStorage.getItem(TOKEN_KEY) };

// Settled once a call went through with the tab's token (or none): streams wait for it, so
// none is opened, without a stream token, on a daemon that turns out to want the token.
let admitted;
const admission = new Promise((resolve) => { admitted = resolve; });

export function signIn(token) {
  session.token = token;
  sessionStorage.setItem(TOKEN_KEY, token);
}

export function signOut() {
  session.token = null;
  sessionStorage.removeItem(TOKEN_KEY);
}

/** An answer of the API that is not a success: `status`, `code`, `message`. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/** Call the API: resolves to the decoded JSON (null for 204), rejects with an ApiError. */
export async function api(path, { method = "GET", body, signal } = {}) {
  const headers = {};
  if (session.token) headers.Authorization = `Bearer ${session.token}`;
  const init = { method, headers, signal };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (response.status === 204) return null;
  const data = await response.json().catch(() => null);
  if (response.ok) admitted();
  if (!response.ok) {
    const error = data && data.error ? data.error : { code: "error", message: response.statusText };
    throw new ApiError(response.status, error.code, error.message);
  }
  return data;
}

/** A query string from an object, leaving out empty values. */
export function query(params) {
  const search = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== "") search.set(key, String(value));
  }
  const text = search.toString();
  return text ? `?${text}` : "";
}

const RETRY_MS = [200, 500, 1000, 2000, 5000];

/**
 * A server-sent event stream on `path` (with `params`), read until `close()`: after a drop
 * it reconnects (backing off up to 5 s) with `Last-Event-ID`, so the daemon replays what
 * was missed. `onEvent(name, data, id)` gets each event; `onState(state, why)` "open",
 * "reconnecting", "closed" or "failed" (a refused request: why); `onEnd()` when the server ends the stream on purpose (a
 * task stream after its `end` event): then it does not reconnect.
 */
export class EventStream {
  constructor(path, params, { onEvent, onState = () => {}, onEnd = () => {} }) {
    this.path = path;
    this.params = params;
    this.onEvent = onEvent;
    this.onState = onState;
    this.onEnd = onEnd;
    this.lastId = null;
    this.ended = false;
    this.controller = null;
    this.failures = 0;
    this.run();
  }

  close() {
    this.ended = true;
    if (this.controller) this.controller.abort();
    this.onState("closed");
  }

  async run() {
    while (!this.ended) {
      try {
        const finished = await this.connect();
        if (this.ended) return;
        if (finished) {
          this.ended = true;
          this.onEnd();
          return;
        }
      } catch (error) {
        if (this.ended) return;
        if (error instanceof ApiError && (error.status === 400 || error.status === 404)) {
          // The request itself is wrong (a bad pattern, no such task): retrying cannot help.
          this.ended = true;
          this.onState("failed", error.message);
          return;
        }
      }
      this.onState("reconnecting");
      const delay = RETRY_MS[Math.min(this.failures, RETRY_MS.length - 1)];
      this.failures += 1;
      await new Promise((resolve) => setTimeout(resolve, delay));
    }
  }

  /** One connection: resolves true when the server ended a task stream with `end`. */
  async connect() {
    await admission;
    if (this.ended) return false;
    this.controller = new AbortController();
    const params = { ...this.params };
    const headers = { Accept: "text/event-stream" };
    if (this.lastId !== null) headers["Last-Event-ID"] = this.lastId;
    if (session.token) {
      const grant = await api("/v1/stream-tokens", { method: "POST", body: { path: this.path } });
      params.token = grant.token;
    }
    const response = await fetch(this.path + query(params), { headers, signal: this.controller.signal });
    if (!response.ok) {
      const body = await response.json().catch(() => null);
      throw new ApiError(response.status, body?.error?.code ?? "stream", body?.error?.message ?? response.statusText);
    }
    this.failures = 0;
    this.onState("open");
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let sawEnd = false;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return sawEnd;
      // One split per chunk (a chunk can hold hundreds of events): the rest is kept for the
      // next chunk, never copied once per event.
      const frames = (buffer + value).split("\n\n");
      buffer = frames.pop();
      for (const frame of frames) {
        if (this.dispatch(frame) === "end") sawEnd = true;
      }
    }
  }

  dispatch(frame) {
    let name = "message";
    let data = "";
    for (const line of frame.split("\n")) {
      if (line.startsWith("data:")) data += line.slice(line[5] === " " ? 6 : 5);
      else if (line.startsWith("event:")) name = line.slice(line[6] === " " ? 7 : 6);
      else if (line.startsWith("id:")) this.lastId = line.slice(line[3] === " " ? 4 : 3);
    }
    if (!data) return null;
    this.onEvent(name, JSON.parse(data), this.lastId);
    return name;
  }
}
