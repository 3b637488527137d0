// blink's realtime protocol from a browser: one WebSocket to /v1/realtime, the API key as a subprotocol, and a
// reconnect that continues the session and resumes the response in flight. Uses nothing but the public protocol
// (docs/protocol.md), so it doubles as the reference client.
//
//   const client = new RealtimeClient({ base: location.origin, apiKey });
//   client.addEventListener("event", (e) => e.detail /* each server event, as JSON */);
//   client.addEventListener("status", (e) => e.detail /* "connecting" | "open" | "reconnecting" | "closed" */);
//   await client.connect();          // the models; rejects with KeyError (a clear message) if the key is refused
//   client.send({ type: "input_text.draft", text });
//
// Lifecycle: closed -> connecting -> open -> (connection lost) reconnecting -> open ... -> closed (close()).
// While reconnecting, send() returns false and the event is dropped: drafts are hints, and a submit is refused
// by the page with a message. After a reconnect the client sends response.resume for the response it was
// reading, from the last delta_index it saw, so no text is lost or repeated.

const KEY_SUBPROTOCOL = "openai-insecure-api-key.";
const RETRY_MS = [100, 250, 500, 1000, 2000, 4000]; // then every 4 s

export class KeyError extends Error {}

export function authHeaders(apiKey) {
  return apiKey ? { Authorization: `Bearer ${apiKey}` } : {};
}

// GET a JSON resource of the API with the key; throws KeyError on 401 and Error (with the server's message)
// on any other failure.
export async function api(base, apiKey, path, init = {}) {
  const headers = { ...authHeaders(apiKey), ...(init.headers || {}) };
  const response = await fetch(base + path, { ...init, headers });
  const body = await response.json().catch(() => ({}));
  if (response.ok) return body;
  const message = (body.error && body.error.message) || `HTTP ${response.status}`;
  if (response.status === 401) throw new KeyError(`The API key was refused: ${message}`);
  const error = new Error(message);
  error.status = response.status;
  throw error;
}

export class RealtimeClient extends EventTarget {
  constructor({ base, apiKey = "" }) {
    super();
    this.base = base;
    this.apiKey = apiKey;
    this.sessionId = null;
    this.status = "closed";
    this.reading = null; // {responseId, after}: the response in flight and the last delta_index seen
    this.ws = null;
    this.attempt = 0;
    this.timer = null;
  }

  // Checks the key over HTTP first (a browser never sees why a WebSocket handshake failed), then opens. Resolves
  // to GET /v1/models' answer, once the session is open.
  async connect() {
    const models = await api(this.base, this.apiKey, "/v1/models");
    this.wanted = true;
    this._open();
    await new Promise((resolve, reject) => {
      const settle = (e) => {
        if (e.detail !== "open" && e.detail !== "closed") return; // still trying
        this.removeEventListener("status", settle);
        if (e.detail === "open") resolve();
        else reject(new Error("the connection closed"));
      };
      this.addEventListener("status", settle);
    });
    return models;
  }

  close() {
    this.wanted = false;
    clearTimeout(this.timer);
    if (this.ws) this.ws.close(1000);
    this._status("closed");
  }

  // Drops the connection as a network failure would (for trying reconnect and resume by hand).
  drop() {
    if (this.ws) this.ws.close(4000, "dropped by the page");
  }

  send(event) {
    if (this.status !== "open") return false;
    this.ws.send(JSON.stringify(event));
    return true;
  }

  _url() {
    const url = new URL("/v1/realtime", this.base);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    if (this.sessionId) url.searchParams.set("session_id", this.sessionId);
    return url.toString();
  }

  _open() {
    this._status(this.sessionId ? "reconnecting" : "connecting");
    const protocols = ["realtime"];
    if (this.apiKey) protocols.push(KEY_SUBPROTOCOL + this.apiKey);
    const ws = new WebSocket(this._url(), protocols);
    this.ws = ws;
    ws.onmessage = (message) => this._receive(JSON.parse(message.data));
    ws.onclose = () => {
      if (this.ws !== ws) return;
      this.ws = null;
      if (!this.wanted) return;
      this._status("reconnecting");
      const delay = RETRY_MS[Math.min(this.attempt, RETRY_MS.length - 1)];
      this.attempt += 1;
      this.timer = setTimeout(() => this._retry(), delay);
    };
  }

  async _retry() {
    if (!this.wanted) return;
    try {
      await api(this.base, this.apiKey, "/v1/models");
    } catch (error) {
      if (error instanceof KeyError) {
        this.wanted = false;
        this._status("closed");
        this._emit({ type: "error", error: { code: "invalid_api_key", message: error.message } });
        return;
      }
      // the server is not reachable yet: try again later
    }
    if (this.wanted && !this.ws) this._open();
  }

  _receive(event) {
    if (event.type === "session.created") {
      this.attempt = 0;
      const resumed = this.sessionId === event.session.id;
      this.sessionId = event.session.id;
      this._status("open");
      if (resumed && this.reading) {
        const { responseId, after } = this.reading;
        this.send({ type: "response.resume", response_id: responseId, after });
      }
    } else if (event.type === "response.created") {
      this.reading = { responseId: event.response.id, after: -1 };
    } else if (event.type === "response.output_text.delta" && this.reading) {
      this.reading.after = event.delta_index;
    } else if (event.type === "response.done") {
      this.reading = null;
    } else if (event.type === "error" && event.error.code === "session_not_found") {
      this.sessionId = null; // expired: the next connection starts a new session
      this.reading = null;
    }
    this._emit(event);
  }

  _emit(event) {
    this.dispatchEvent(new CustomEvent("event", { detail: event }));
  }

  _status(status) {
    if (this.status === status) return;
    this.status = status;
    this.dispatchEvent(new CustomEvent("status", { detail: status }));
  }
}
