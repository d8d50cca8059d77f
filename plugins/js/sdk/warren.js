// The Warren plugin SDK for JavaScript (QuickJS, built with
// componentize-qjs --sync): a thin layer over the bindings of the
// `warren:plugin@0.3.0` world (its `plugin-script` variant) (`wit/plugin.wit`).
//
// A plugin is an ES module that exports `handler`:
//
//   import { Manifest, Subscription, exportPlugin, forward, publish } from "./warren.js";
//
//   export const handler = exportPlugin({
//     manifest: () =>
//       new Manifest("echo", "0.1.0").subscribe(Subscription.queue("echo.in")),
//     handle(d) {
//       publish(forward(d, "", "echo.out"));
//     },
//   });
//
// built with `componentize-qjs --wit wit -n plugin --js plugin.js --sync -o plugin.wasm`
// (`--sync`: Warren does not run the component-model async ABI).
//
// `handle` returning acknowledges the delivery once the messages given to
// `publish` are safe. Throw `Retry` for a transient failure (delivered
// again later, `d.attempt` counting up, until the subscription's attempt
// limit) and `Reject` to dead-letter it now. Anything else thrown is a
// fault: its stack goes to the host's log at error level and the delivery
// is dead-lettered as a trap whose reason is its one-line summary
// (`TypeError: x is undefined`).
//
// State that must outlive a delivery goes in the plugin's key-value bucket,
// `kv` (`get`, `set`, `delete`, `increment`, `getJson`, `setJson`), with
// `.withState()` in the manifest: `const seen = kv.increment("count:" + id, 1)`.
// Its writes are part of the delivery: they reach the store only if
// `handle` returns, and a retry, reject or fault discards them. A refused
// operation throws `KvError`; uncaught, `unavailable` retries the delivery
// and the others reject it.
//
// Records have camelCase fields (`d.routingKey`), enums are strings
// (`"topic"`), `option` is a value or null, `list<u8>` a Uint8Array:
// `text(d.body)` decodes UTF-8 (QuickJS has no TextDecoder). There is no
// filesystem, network or environment at run time. Warren instantiates the
// plugin afresh for every delivery unless the operator sets
// `instance = "reuse"`, when module-level state survives from one delivery
// to the next until the instance is dropped (after a set number of
// deliveries or any trap): never keep there what one message must not see
// of another.

import host from "warren:plugin/host@0.3.0";
import http from "warren:plugin/http@0.3.0";
import kvHost from "warren:plugin/kv@0.3.0";

/**
 * A transient failure: deliver the message again after a delay; `delayMs`
 * asks for at least that delay (a downstream's `Retry-After`).
 */
export class Retry extends Error {
  constructor(reason, delayMs = null) {
    super(reason);
    this.name = "Retry";
    this.delayMs = delayMs;
  }
}

/**
 * An outbound call that produced no response: `kind` is `denied` (the
 * message names the rule), `timeout`, `too-large`, `invalid` or `failed`.
 * Uncaught, a timeout or failure retries the delivery, the others reject it.
 */
export class HttpError extends Error {
  constructor(kind, text) {
    super(`outbound call ${kind}: ${text}`);
    this.name = "HttpError";
    this.kind = kind;
  }
}

/** A whole response, whatever its status (redirects are returned). */
export class Response {
  constructor(r) {
    this.status = r.status;
    this.headers = Object.fromEntries(r.headers);
    this.body = r.body;
  }
  header(name) {
    return this.headers[name.toLowerCase()] ?? null;
  }
  get ok() {
    return this.status >= 200 && this.status < 300;
  }
  text() {
    return text(this.body);
  }
  json() {
    return JSON.parse(text(this.body));
  }
  /** Throw `Retry` after the `Retry-After` for 429 and 503. */
  retryIfBusy() {
    if (this.status === 429 || this.status === 503) {
      const secs = parseInt(this.header("retry-after"), 10);
      throw new Retry(`downstream answered ${this.status}`, Number.isFinite(secs) ? secs * 1000 : 1000);
    }
    return this;
  }
}

/**
 * Call `url` under the plugin's grants: `{ method, headers, body, json,
 * timeoutMs }`; returns a `Response`.
 */
export function fetch(url, opts = {}) {
  const headers = Object.entries(opts.headers ?? {});
  let body = opts.body ?? null;
  if (opts.json !== undefined) {
    body = JSON.stringify(opts.json);
    headers.push(["content-type", "application/json"]);
  }
  if (typeof body === "string") body = utf8(body);
  try {
    return new Response(
      http.fetch({ method: opts.method ?? "GET", url, headers, body, timeoutMs: opts.timeoutMs ?? null }),
    );
  } catch (e) {
    // The error variant, thrown as is or as an Error's `payload`.
    const v = e && typeof e.tag === "string" ? e : e?.payload;
    if (v && typeof v.tag === "string") throw new HttpError(v.tag, v.val);
    throw e;
  }
}

/**
 * A key-value operation the host refused: `kind` is `limit-exceeded` (a
 * key, a value or the delivery's writes over a limit; `text` names it),
 * `invalid` (an empty key, `increment` of a value that is not an integer, a
 * value that is not JSON) or `unavailable` (the store cannot be reached).
 * Uncaught, `unavailable` retries the delivery and the others reject it.
 */
export class KvError extends Error {
  constructor(kind, text) {
    const words = {
      "limit-exceeded": "state limit exceeded",
      invalid: "invalid state operation",
      unavailable: "state unavailable",
    };
    super(`${words[kind] ?? kind}: ${text}`);
    this.name = "KvError";
    this.kind = kind;
    this.text = text;
  }
}

function kvCall(call) {
  try {
    return call();
  } catch (e) {
    // The error variant, thrown as is or as an Error's `payload`.
    const v = e && typeof e.tag === "string" ? e : e?.payload;
    if (v && typeof v.tag === "string") throw new KvError(v.tag, v.val);
    throw e;
  }
}

/**
 * The plugin's key-value bucket. Writes are pending until `handle`
 * returns; reads see this delivery's own pending writes. Values are
 * `Uint8Array`s; `set` takes a string too (stored as UTF-8).
 */
export const kv = {
  /** The value of `key` (a `Uint8Array`), or null. */
  get: (key) => kvCall(() => kvHost.get(key)) ?? null,
  /** Set `key` to `value` (bytes, or a string stored as UTF-8). */
  set: (key, value) => kvCall(() => kvHost.set(key, typeof value === "string" ? utf8(value) : value)),
  /** Delete `key`. */
  delete: (key) => kvCall(() => kvHost.delete(key)),
  /**
   * Add `delta` to the integer in `key` (absent counts as 0) and return the
   * value this delivery now sees (a number: exact up to 2^53).
   */
  increment: (key, delta = 1) => kvCall(() => kvHost.increment(key, delta)),
  /** `increment` without its answer: adds at commit, no read of the key. */
  add: (key, delta = 1) => kvCall(() => kvHost.add(key, delta)),
  /** The value of `key` parsed as JSON, or null when absent. */
  getJson(key) {
    const value = this.get(key);
    if (value === null) return null;
    try {
      return JSON.parse(text(value));
    } catch (e) {
      throw new KvError("invalid", `value of ${key} is not JSON: ${e.message}`);
    }
  },
  /** Set `key` to `value` as JSON. */
  setJson(key, value) {
    this.set(key, JSON.stringify(value));
  },
};

export const get = (url, opts = {}) => fetch(url, { ...opts, method: "GET" });
export const post = (url, opts = {}) => fetch(url, { ...opts, method: "POST" });

/** A permanent failure: dead-letter the message now. */
export class Reject extends Error {
  constructor(reason) {
    super(reason);
    this.name = "Reject";
  }
}

/** A queue the plugin consumes, built by chaining. */
export class Subscription {
  constructor(queue) {
    this.queue = queue;
    this.kind = "quorum";
    this.bind = null;
    this.prefetch = 64;
    this.messageTtlMs = null;
    this.maxAttempts = null;
  }

  /** Consume quorum queue `name` with prefetch 64 and the host's attempt limit. */
  static queue(name) {
    return new Subscription(name);
  }

  /** Bind the queue to `exchange` (declared with `kind`) with `keys`. */
  bindTo(exchange, kind, keys) {
    this.bind = { exchange, kind, keys: [...keys] };
    return this;
  }

  /** Declare a classic queue instead of a quorum queue. */
  classic() {
    this.kind = "classic";
    return this;
  }

  withPrefetch(n) {
    this.prefetch = n;
    return this;
  }

  /** Dead-letter after `n` attempts (1 = never retry). */
  withMaxAttempts(n) {
    this.maxAttempts = n;
    return this;
  }
}

/** What a plugin is and what it consumes, built by chaining. */
export class Manifest {
  constructor(name, version) {
    this.name = name;
    this.version = version;
    this.subscriptions = [];
    this.outputs = { exchanges: [], queues: [] };
    this.limits = {
      memoryBytes: null,
      deadlineMs: null,
      maxConcurrency: null,
      wallDeadlineMs: null,
      maxResponseBytes: null,
    };
    this.outbound = [];
    this.state = false;
  }

  /** Say the plugin uses key-value state (`kv`): sets `state`. */
  withState() {
    this.state = true;
    return this;
  }

  /** Ask to call `origin` (`https://*.example.com` for subdomains); the operator grants. */
  allowOutbound(origin) {
    this.outbound.push(origin);
    return this;
  }

  /** Wall-clock budget of all outbound calls of one delivery. */
  wallDeadlineMs(ms) {
    this.limits.wallDeadlineMs = ms;
    return this;
  }

  subscribe(s) {
    this.subscriptions.push(s);
    return this;
  }

  /** Declare exchange `name` (durable, of `kind`) as a destination of outputs. */
  outputExchange(name, kind) {
    this.outputs.exchanges.push({ name, kind });
    return this;
  }

  /** Declare quorum queue `name` as a destination of outputs. */
  outputQueue(name) {
    return this.output({ name, kind: "quorum", bind: null, maxLength: null });
  }

  /** Declare queue `q` (see `boundedCatchAll`). */
  output(q) {
    this.outputs.queues.push(q);
    return this;
  }

  deadlineMs(ms) {
    this.limits.deadlineMs = ms;
    return this;
  }

  memoryBytes(n) {
    this.limits.memoryBytes = n;
    return this;
  }

  maxConcurrency(n) {
    this.limits.maxConcurrency = n;
    return this;
  }
}

/**
 * Classic queue `name` bound to `exchange` (declared with `kind`) with
 * `keys`, keeping at most `maxLength` messages: a catch-all for outputs
 * nobody may read.
 */
export function boundedCatchAll(name, exchange, kind, keys, maxLength) {
  return { name, kind: "classic", bind: { exchange, kind, keys: [...keys] }, maxLength };
}

/** No property set and no headers (published persistent). */
export function properties() {
  return {
    contentType: null,
    contentEncoding: null,
    headers: [],
    deliveryMode: null,
    priority: null,
    correlationId: null,
    replyTo: null,
    expiration: null,
    messageId: null,
    timestamp: null,
    messageType: null,
    userId: null,
    appId: null,
  };
}

/** The value (`{ tag, val }`) of top-level header `key`, or null. */
export function header(props, key) {
  const h = props.headers.find((h) => h.parent === 0 && h.key === key);
  return h ? h.value : null;
}

/** A message with `body` (bytes, or a string sent as UTF-8). */
export function message(exchange, routingKey, body, props = properties()) {
  return {
    exchange,
    routingKey,
    body: typeof body === "string" ? utf8(body) : body,
    properties: props,
  };
}

/** Delivery `d` (body, every property and header) to `exchange` with `routingKey`. */
export function forward(d, exchange, routingKey) {
  return { exchange, routingKey, body: d.body, properties: d.properties };
}

/** Queue `msg` for publishing once `handle` returns; throws `Reject` if the host will not take it. */
export function publish(msg) {
  try {
    host.publish(msg);
  } catch (e) {
    if (e && e.tag === "limit-exceeded") throw new Reject(`publish refused: ${e.val}`);
    if (e && e.tag === "invalid") throw new Reject(`invalid output: ${e.val}`);
    throw e;
  }
}

/** A per-plugin setting from the host's `warren.toml`, or null. */
export function config(key) {
  return host.config(key) ?? null;
}

/**
 * A secret the operator gives the plugin in `[plugin.<name>] config` (as
 * `{ file = ".." }` or `{ env = ".." }`; Warren never shows its value).
 * Throws Reject, naming the key, when it is not configured: no delivery
 * can succeed until the operator sets it. Never log it.
 */
export function secret(key) {
  const value = host.config(key);
  if (value === undefined || value === null) {
    throw new Reject(`secret "${key}" is not configured ([plugin.<name>] config)`);
  }
  return value;
}

/** Log through the host; lines carry the plugin's name and version. */
export const log = {
  debug: (text) => host.log("debug", String(text)),
  info: (text) => host.log("info", String(text)),
  warn: (text) => host.log("warn", String(text)),
  error: (text) => host.log("error", String(text)),
};

/** The UTF-8 text of `bytes` (invalid sequences become U+FFFD). */
export function text(bytes) {
  let out = "";
  for (let i = 0; i < bytes.length; ) {
    const b = bytes[i];
    const need = b < 0x80 ? 0 : b >= 0xf0 && b < 0xf8 ? 3 : b >= 0xe0 ? 2 : b >= 0xc2 ? 1 : -1;
    let cp = need === 0 ? b : need === 1 ? b & 0x1f : need === 2 ? b & 0x0f : b & 0x07;
    let ok = need >= 0 && i + need < bytes.length;
    for (let k = 1; ok && k <= need; k++) {
      const c = bytes[i + k];
      ok = (c & 0xc0) === 0x80;
      cp = (cp << 6) | (c & 0x3f);
    }
    const min = [0, 0x80, 0x800, 0x10000][need];
    if (!ok || cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) {
      out += "\ufffd";
      i += 1;
    } else {
      out += String.fromCodePoint(cp);
      i += need + 1;
    }
  }
  return out;
}

/** `s` encoded as UTF-8. */
export function utf8(s) {
  const out = [];
  for (const ch of s) {
    const cp = ch.codePointAt(0);
    if (cp < 0x80) out.push(cp);
    else if (cp < 0x800) out.push(0xc0 | (cp >> 6), 0x80 | (cp & 0x3f));
    else if (cp < 0x10000) out.push(0xe0 | (cp >> 12), 0x80 | ((cp >> 6) & 0x3f), 0x80 | (cp & 0x3f));
    else
      out.push(
        0xf0 | (cp >> 18),
        0x80 | ((cp >> 12) & 0x3f),
        0x80 | ((cp >> 6) & 0x3f),
        0x80 | (cp & 0x3f),
      );
  }
  return new Uint8Array(out);
}

function summary(e) {
  if (e instanceof Error) {
    const first = String(e.message).split("\n")[0];
    return first ? `${e.name}: ${first}` : e.name;
  }
  return `uncaught ${typeof e}: ${String(e).split("\n")[0]}`;
}

/**
 * The `handler` export for `plugin` (an object with `manifest()` and
 * `handle(delivery)`): `export const handler = exportPlugin({ ... })`.
 */
export function exportPlugin(plugin) {
  return {
    manifest() {
      try {
        return plugin.manifest();
      } catch (e) {
        trap(e);
      }
    },
    handle(delivery) {
      try {
        plugin.handle(delivery);
      } catch (e) {
        if (e instanceof Retry && e.delayMs != null)
          throw { tag: "retry-after", val: { reason: e.message || "Retry", delayMs: e.delayMs } };
        if (e instanceof Retry) throw { tag: "retry", val: e.message || "Retry" };
        if (e instanceof HttpError)
          throw { tag: e.kind === "timeout" || e.kind === "failed" ? "retry" : "reject", val: e.message };
        if (e instanceof KvError)
          throw { tag: e.kind === "unavailable" ? "retry" : "reject", val: e.message };
        if (e instanceof Reject) throw { tag: "reject", val: e.message || "Reject" };
        trap(e);
      }
    },
  };
}

// Ends the call as a trap: the stack to the host's log, and an Error whose
// message is the one-line summary thrown out of the export, which the
// runtime turns into a trap and Warren into the trap's reason.
function trap(e) {
  const line = summary(e);
  host.log("error", e?.stack ? `${line}\n${e.stack}` : line);
  throw new Error(line);
}
