// blink's router on Cloudflare Workers: it terminates the client's HTTP and WebSocket connections and forwards each
// request, unbuffered, to one upstream: the nearest healthy `blink edge`, or the core. A module Worker in plain
// JavaScript: no build step, no dependency at run time. README.md has the rules, the settings and how to deploy.
//
// The rules, first match wins (blink edge's policy, the part decidable from the request alone):
//   (a) the body's `model` (POST /v1/chat/completions, /v1/completions) or `?model=` is in CORE_MODELS -> core
//   (b) the prompt is longer than EDGE_MAX_PROMPT_CHARS characters                                      -> core
//   (c) a generation (those two POSTs, the WebSocket at /v1/realtime): the edge whose colos hold the
//       request's colo, else the first; an unhealthy one is passed over for the next; none healthy      -> core
//   (d) everything else (GET /v1/models, /healthz, /readyz, /metrics, documents, the browser client)     -> core:
//       the core serves every model, so its answers are the whole deployment's
// Every response carries `x-blink-router: <upstream name>` and `x-blink-router-rule: <why>`.

const ROUTER_HEADER = "x-blink-router";
const RULE_HEADER = "x-blink-router-rule";
const CORE = "core";
const GENERATION_PATHS = new Set(["/v1/chat/completions", "/v1/completions"]);
const REALTIME_PATH = "/v1/realtime";
const EDGE_FIELDS = new Set(["name", "url", "colos"]);
const DEFAULT_MAX_PROMPT_CHARS = 6000;
const DEFAULT_HEALTH_TTL_S = 5;
const PROBE_TIMEOUT_MS = 2000; // a /readyz slower than this counts as failed
const MAX_INSPECTED_BYTES = 4 << 20; // a larger body is not read for its model: it goes to the core, streamed
// the handshake's own headers: fetch() makes its own for the upstream connection
const HANDSHAKE_HEADERS = [
  "connection",
  "upgrade",
  "sec-websocket-key",
  "sec-websocket-version",
  "sec-websocket-extensions",
];

class Misconfigured extends Error {}

class Unreachable extends Error {}

// Health of the edges, per isolate: Workers keep module state for an isolate's life, which is the cache the TTL
// bounds. One request at a time probes an edge (it claims the check); the others meanwhile use the last result.
// No promise is shared between requests: the runtime cancels one request's I/O when that request ends.
class EdgeHealth {
  #checks = new Map(); // edge url -> {healthy, at (ms), checking}

  async healthy(edge, ttlMs) {
    const last = this.#checks.get(edge.url);
    const now = Date.now();
    // a claim whose request was cancelled mid-probe lapses after the probe's own timeout
    const valid = last?.checking ? Math.max(ttlMs, 2 * PROBE_TIMEOUT_MS) : ttlMs;
    if (last !== undefined && now - last.at < valid) return last.healthy;
    this.#checks.set(edge.url, { healthy: last?.healthy ?? true, at: now, checking: true });
    const healthy = await probe(edge, Math.min(ttlMs, PROBE_TIMEOUT_MS));
    this.#checks.set(edge.url, { healthy, at: Date.now(), checking: false });
    return healthy;
  }

  // the edge refused a connection: unhealthy until its next check, a TTL from now
  markDown(edge) {
    this.#checks.set(edge.url, { healthy: false, at: Date.now(), checking: false });
  }
}

const health = new EdgeHealth();

export default {
  async fetch(request, env) {
    let settings;
    try {
      settings = readSettings(env);
    } catch (err) {
      if (err instanceof Misconfigured) return errorResponse(500, "router_misconfigured", err.message);
      throw err;
    }
    const url = new URL(request.url);
    const websocket = request.headers.get("upgrade")?.toLowerCase() === "websocket";
    const req = await inspect(request, url, websocket);
    const passedOver = new Set();
    for (;;) {
      const [upstream, rule] = await choose(settings, req, request.cf?.colo, passedOver);
      try {
        const relay = websocket ? relayWebSocket : forward;
        return await relay(request, target(upstream, url), req.body, tags(upstream, rule));
      } catch (err) {
        if (!(err instanceof Unreachable)) throw err;
        // an edge that refuses the connection is passed over, as an unhealthy one, when the body can be sent again
        if (upstream.name === CORE || !req.replayable) {
          const message = `the upstream ${upstream.name} (${upstream.url}) is unreachable: ${err.message}`;
          return errorResponse(502, "upstream_unreachable", message, tags(upstream, rule));
        }
        health.markDown(upstream);
        passedOver.add(upstream.name);
      }
    }
  },
};

// ---- settings ---------------------------------------------------------------------------------------------------

// The router's settings from its [vars]; Misconfigured names the first one that is wrong.
function readSettings(env) {
  return {
    core: { name: CORE, url: httpUrl("CORE_URL", env.CORE_URL) },
    coreModels: new Set(
      String(env.CORE_MODELS ?? "")
        .split(",")
        .map((model) => model.trim())
        .filter(Boolean),
    ),
    edges: readEdges(env.EDGES),
    maxPromptChars: positive("EDGE_MAX_PROMPT_CHARS", env.EDGE_MAX_PROMPT_CHARS, DEFAULT_MAX_PROMPT_CHARS, true),
    healthTtlMs: 1000 * positive("HEALTH_TTL_S", env.HEALTH_TTL_S, DEFAULT_HEALTH_TTL_S, false),
  };
}

function httpUrl(name, value) {
  let url;
  try {
    url = new URL(value);
  } catch {
    throw new Misconfigured(`${name} must be an http(s) URL, not ${JSON.stringify(value ?? null)}`);
  }
  if (!["http:", "https:"].includes(url.protocol) || url.search || url.hash) {
    throw new Misconfigured(`${name} must be an http(s) URL with no query or fragment, not ${JSON.stringify(value)}`);
  }
  return url.href.replace(/\/+$/, "");
}

// EDGES: a JSON list (a string, or a list where wrangler.toml gives one) of {name, url, colos?}; empty: no edge
function readEdges(value) {
  if (value === undefined || value === "") return [];
  let edges = value;
  if (typeof value === "string") {
    try {
      edges = JSON.parse(value);
    } catch (err) {
      throw new Misconfigured(`EDGES is not valid JSON (${err.message}): ${JSON.stringify(value)}`);
    }
  }
  if (!Array.isArray(edges)) throw new Misconfigured('EDGES must be a JSON list of {"name", "url", "colos"}');
  const names = new Set([CORE]);
  return edges.map((edge, i) => {
    if (edge === null || typeof edge !== "object" || Array.isArray(edge)) {
      throw new Misconfigured(`EDGES[${i}] must be an object {"name", "url", "colos"}`);
    }
    const unknown = Object.keys(edge).filter((key) => !EDGE_FIELDS.has(key));
    if (unknown.length) throw new Misconfigured(`EDGES[${i}] has unknown fields: ${unknown.join(", ")}`);
    if (typeof edge.name !== "string" || !edge.name || names.has(edge.name)) {
      throw new Misconfigured(`EDGES[${i}].name must be a non-empty name of its own (not "core", not repeated)`);
    }
    names.add(edge.name);
    const colos = edge.colos ?? [];
    if (!Array.isArray(colos) || !colos.every((colo) => typeof colo === "string")) {
      throw new Misconfigured(`EDGES[${i}].colos must be a list of colo codes such as "FRA"`);
    }
    const upperColos = colos.map((colo) => colo.toUpperCase());
    return { name: edge.name, url: httpUrl(`EDGES[${i}].url`, edge.url), colos: upperColos };
  });
}

function positive(name, value, fallback, integer) {
  if (value === undefined || value === "") return fallback;
  const number = Number(value);
  if (!(number > 0) || !Number.isFinite(number) || (integer && !Number.isInteger(number))) {
    const kind = integer ? "a positive integer" : "a positive number";
    throw new Misconfigured(`${name} must be ${kind}, not ${JSON.stringify(value)}`);
  }
  return number;
}

// ---- routing ----------------------------------------------------------------------------------------------------

// What routing needs from the request: whether it generates, the models it names, its prompt's length, and the body
// to send on (the bytes read, or the client's stream when it was not read). `replayable`: the body can be sent to a
// second upstream.
async function inspect(request, url, websocket) {
  const models = [url.searchParams.get("model")];
  const untouched = { models, promptChars: 0, body: request.body, replayable: request.body === null };
  if (websocket) return { ...untouched, generation: url.pathname === REALTIME_PATH };
  if (request.method !== "POST" || !GENERATION_PATHS.has(url.pathname)) return { ...untouched, generation: false };
  if (Number(request.headers.get("content-length")) > MAX_INSPECTED_BYTES) {
    return { ...untouched, generation: true, promptChars: Infinity }; // long by any measure
  }
  const body = await request.arrayBuffer();
  let json = null;
  try {
    json = JSON.parse(new TextDecoder().decode(body));
  } catch {
    // not JSON: routed as a generation, and the upstream answers its 400
  }
  models.push(json?.model);
  return { models, promptChars: promptChars(json), body, replayable: true, generation: true };
}

// [upstream, rule] for a request, never one in `passedOver`.
async function choose(settings, req, colo, passedOver) {
  const { core, coreModels, edges } = settings;
  if (!req.generation) return [core, "not-generation"];
  if (req.models.some((model) => typeof model === "string" && coreModels.has(model))) return [core, "core-model"];
  if (req.promptChars > settings.maxPromptChars) return [core, "long-prompt"];
  for (const edge of nearestFirst(edges, colo)) {
    if (!passedOver.has(edge.name) && (await health.healthy(edge, settings.healthTtlMs))) return [edge, "edge"];
  }
  return [core, "no-healthy-edge"];
}

// the edges, the one serving `colo` first (else the first listed), then the others in their order
function nearestFirst(edges, colo) {
  const near = edges.findIndex((edge) => typeof colo === "string" && edge.colos.includes(colo.toUpperCase()));
  return near <= 0 ? edges : [edges[near], ...edges.slice(0, near), ...edges.slice(near + 1)];
}

// characters (code points) of the prompt's text: chat messages' contents, or a completion's prompt
function promptChars(body) {
  if (body === null || typeof body !== "object") return 0;
  if (Array.isArray(body.messages)) return body.messages.reduce((n, message) => n + textChars(message?.content), 0);
  return textChars(body.prompt);
}

function textChars(value) {
  if (typeof value === "string") {
    let n = 0;
    for (const _ of value) n++;
    return n;
  }
  if (Array.isArray(value)) return value.reduce((n, part) => n + textChars(part?.text ?? part), 0);
  return 0;
}

async function probe(edge, timeoutMs) {
  try {
    const response = await fetch(`${edge.url}/readyz`, { signal: AbortSignal.timeout(timeoutMs) });
    await response.body?.cancel();
    return response.status === 200;
  } catch {
    return false; // refused, reset or too slow: unhealthy until the next check
  }
}

// ---- forwarding -------------------------------------------------------------------------------------------------

function target(upstream, url) {
  return { upstream, href: `${upstream.url}${url.pathname}${url.search}` };
}

function tags(upstream, rule) {
  return { [ROUTER_HEADER]: upstream.name, [RULE_HEADER]: rule };
}

async function connect(href, init) {
  try {
    return await fetch(href, { ...init, redirect: "manual" });
  } catch (err) {
    throw new Unreachable(err.message);
  }
}

// HTTP: the request's method, headers (Authorization included) and body to the upstream; its response back as it
// comes, body streamed (SSE token by token), with the router's headers added.
async function forward(request, { href }, body, headers) {
  const response = await connect(href, { method: request.method, headers: request.headers, body });
  return withHeaders(response, headers);
}

function withHeaders(response, headers) {
  const out = new Response(response.body, response);
  for (const [name, value] of Object.entries(headers)) out.headers.set(name, value);
  return out;
}

// WebSocket: a socket to the upstream (offering the client's subprotocols, with its Authorization), then a pair for
// the client, and every message and close relayed both ways. A refused handshake (401, 403, 404) is answered as the
// upstream answered it. Workers' WebSocket has no send-side backpressure: messages are relayed as they arrive, and
// the upstream bounds each stream's queue (its slow-client policy).
async function relayWebSocket(request, { href }, _body, headers) {
  const upstreamHeaders = new Headers(request.headers);
  for (const name of HANDSHAKE_HEADERS) upstreamHeaders.delete(name);
  upstreamHeaders.set("upgrade", "websocket");
  const response = await connect(href, { headers: upstreamHeaders });
  const upstream = response.webSocket;
  if (!upstream) return withHeaders(response, headers);
  const [client, server] = Object.values(new WebSocketPair());
  server.accept();
  upstream.accept();
  relay(server, upstream);
  relay(upstream, server);
  const protocol = response.headers.get("sec-websocket-protocol");
  const answer = protocol ? { ...headers, "sec-websocket-protocol": protocol } : headers;
  return new Response(null, { status: 101, webSocket: client, headers: answer });
}

function relay(from, to) {
  from.addEventListener("message", (event) => {
    try {
      to.send(event.data);
    } catch {
      close(from, 1011, "the other side of the router is gone");
    }
  });
  from.addEventListener("close", (event) => {
    close(to, closeCode(event.code), event.reason);
    close(from, closeCode(event.code), event.reason); // completes the closing handshake on this side
  });
  from.addEventListener("error", () => close(to, 1011, "the other side of the router failed"));
}

// a received close code that may be sent on: 1005 (none given) and 1006 (dropped) are never sent in a frame
function closeCode(code) {
  if (code === 1005) return 1000;
  return code === 1006 || code === 1015 ? 1011 : code;
}

function close(socket, code, reason) {
  try {
    socket.close(code, reason);
  } catch {
    // already closed
  }
}

function errorResponse(status, code, message, headers = {}) {
  const error = { message, type: "server_error", param: null, code };
  return Response.json({ error }, { status, headers });
}
