/**
 * tidewire.js: a dependency-free browser client for the Tidewire protocol (PROTOCOL.md, v1).
 *
 * One `TidewireClient` follows one session. It keeps `lastSeenSeq`, says `hello` first on every
 * (re)connect so the server replays exactly what was missed, reconnects with jittered exponential
 * backoff, resends unacknowledged messages until they are acked (the server dedupes by
 * `client_msg_id`), and reassembles each assistant turn from its deltas by code-point offset, so the
 * text is exact across drops and replays. It is an ES module with no build step: import it from
 * `/static/tidewire.js` or copy the file.
 */

/** Sequenced event types, in PROTOCOL.md order. */
export const EVENT_TYPES = Object.freeze([
  "message",
  "turn_start",
  "delta",
  "status",
  "tool_call",
  "tool_result",
  "turn_end",
]);

/** Delivery modes a client may ask for in `hello`. */
export const DELIVERY_MODES = Object.freeze(["tokens", "phrases", "batched"]);

/** `turn_end.status` values: a history message with one of these is a finished answer. */
export const TURN_END_STATUSES = Object.freeze(["completed", "cancelled", "failed", "timed_out"]);

const SEQUENCED = new Set(EVENT_TYPES);
const BACKOFF_BASE_MS = 250;
const BACKOFF_CAP_MS = 30_000;
const WS_OPEN = 1;
const EVENTSOURCE_CLOSED = 2;

/** Error codes after which resending the same frame cannot succeed, so it is dropped. */
const FINAL_SEND_ERRORS = new Set(["bad_frame", "too_large", "forbidden", "not_found", "conflict"]);
/** Error codes that mean "nothing was accepted, try again later". */
const RETRY_SEND_ERRORS = new Set(["degraded", "rate_limited", "internal"]);
/** HTTP statuses worth retrying: the request may not have been processed, and retrying is safe. */
const RETRY_HTTP_STATUSES = new Set([408, 425, 429, 500, 502, 503, 504]);

/**
 * Reconnect delay with full jitter: uniform in [0, min(30 s, 250 ms * 2^attempt)).
 * Full jitter spreads a crowd of clients dropped at the same moment (a gateway restart) over the
 * whole window instead of letting them return in synchronized waves.
 * @param {number} attempt 0 for the first retry after a drop
 * @param {() => number} [random] source of [0, 1) numbers, injectable for tests
 * @returns {number} milliseconds
 */
export function backoffDelay(attempt, random = Math.random) {
  const ceiling = Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2 ** Math.max(0, attempt));
  return Math.floor(random() * ceiling);
}

/** An HTTP error from the Tidewire API; `code` is the protocol error code when the body had one. */
export class ApiError extends Error {
  /**
   * @param {number} status
   * @param {any} body parsed response body (an error object, or null)
   */
  constructor(status, body) {
    const err = body && typeof body.error === "object" && body.error !== null ? body.error : body;
    super((err && err.message) || `HTTP ${status}`);
    this.name = "ApiError";
    this.status = status;
    this.code = (err && err.code) || null;
    this.retryAfterMs = (err && err.retry_after_ms) ?? null;
    this.body = body;
  }
}

/**
 * Calls the Tidewire HTTP API with the bearer token and JSON bodies.
 * @param {string} baseUrl "" for same origin, or e.g. "https://chat.example.com"
 * @param {string|null} token bearer token
 * @param {string} method
 * @param {string} path e.g. "/v1/sessions"
 * @param {any} [body] sent as JSON when given
 * @param {{timeoutMs?: number, fetchImpl?: typeof fetch}} [options]
 * @returns {Promise<any>} the parsed JSON body (null when empty)
 * @throws {ApiError} on a non-2xx answer (network failures reject with the fetch error)
 */
export async function api(baseUrl, token, method, path, body, options = {}) {
  const { timeoutMs = 15_000, fetchImpl = globalThis.fetch } = options;
  const headers = { Accept: "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  const init = { method, headers, signal: AbortSignal.timeout(timeoutMs) };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const res = await fetchImpl(joinUrl(baseUrl, path), init);
  const text = await res.text();
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = { message: text };
    }
  }
  if (!res.ok) throw new ApiError(res.status, data);
  return data;
}

/**
 * Where to resume after rendering `GET /v1/sessions/{sid}`: the seq of the last finished item
 * (a user message or an ended answer), capped by `last_seq`. Not `last_seq` alone: a running
 * turn is not (fully) in history, and if `last_seq` already counts some of its events, resuming
 * from it would skip the start of that answer. Resuming from here replays it from `turn_start`.
 * @param {{last_seq: number, messages: {seq: number, role: string, status?: string}[]}} history
 * @returns {number}
 */
export function resumePoint(history) {
  let lastFinished = 0;
  for (const m of history.messages) {
    if (m.role === "user" || TURN_END_STATUSES.includes(m.status)) lastFinished = Math.max(lastFinished, m.seq);
  }
  return Math.min(history.last_seq, lastFinished);
}

/**
 * Rebuilds each turn's text from deltas addressed by code-point offset.
 * A delta covers [offset, offset + length) in code points; ranges already covered (replays,
 * merged deltas overlapping what was seen) are ignored, so the text is never doubled. Only the
 * gap-free prefix is exposed: a hole would mean a missed delta, which resume fills later.
 */
export class TurnAssembler {
  /** @type {Map<string, {points: string[], filled: number, text: string, final: string|null}>} */
  #turns = new Map();

  /**
   * Applies one delta.
   * @returns {string} the text this delta added to the end of the turn's visible prefix
   */
  apply(turnId, offset, text) {
    const turn = this.#turn(turnId);
    const points = Array.from(text); // code points, not UTF-16 units
    for (let i = 0; i < points.length; i++) {
      const at = offset + i;
      if (turn.points[at] === undefined) turn.points[at] = points[i];
    }
    const before = turn.text.length;
    while (turn.points[turn.filled] !== undefined) turn.text += turn.points[turn.filled++];
    return turn.text.slice(before);
  }

  /** Records `turn_end.text`, the stable whole answer, which wins over the assembled text. */
  finish(turnId, text) {
    this.#turn(turnId).final = text;
  }

  /** The turn's text: the final text once ended, else the gap-free assembled prefix. */
  text(turnId) {
    const turn = this.#turns.get(turnId);
    if (!turn) return "";
    return turn.final ?? turn.text;
  }

  clear() {
    this.#turns.clear();
  }

  #turn(turnId) {
    let turn = this.#turns.get(turnId);
    if (!turn) {
      turn = { points: [], filled: 0, text: "", final: null };
      this.#turns.set(turnId, turn);
    }
    return turn;
  }
}

/**
 * A client for one session.
 *
 * Events (DOM CustomEvents, payload in `event.detail`):
 * - `state`   {state: "connecting"|"connected"|"reconnecting"|"offline", retryInMs?}
 * - `event`   a sequenced event, new to this client (seq > lastSeenSeq), after turn text is updated
 * - `ack`     an ack frame: the message is durable
 * - `error`   an error frame (`ref`, when present, names the client_msg_id it concerns)
 * - `reset`   the ready frame: the server could not resume, reload history with GET
 * - `unauthorized` the token was refused (close 4401 / HTTP 401); call setToken() to continue
 * - `forbidden`    the session is not the token's (close 4403 / HTTP 403); the client stops
 */
export class TidewireClient extends EventTarget {
  /**
   * @param {object} options
   * @param {string} [options.baseUrl] "" for same origin
   * @param {string|null} [options.token] bearer token
   * @param {string|null} [options.sessionId] required for SSE; WebSocket may omit it (ready names it)
   * @param {"tokens"|"phrases"|"batched"} [options.delivery]
   * @param {"ws"|"sse"} [options.transport]
   * @param {number} [options.lastSeenSeq] resume point, e.g. from GET /v1/sessions/{sid}
   * @param {number} [options.pingIntervalMs] app-level ping period
   * @param {number} [options.silenceTimeoutMs] no frame for this long means the socket is dead
   * @param {typeof WebSocket} [options.WebSocketImpl] for non-browser hosts and tests
   * @param {typeof EventSource} [options.EventSourceImpl]
   * @param {typeof fetch} [options.fetchImpl]
   */
  constructor({
    baseUrl = "",
    token = null,
    sessionId = null,
    delivery = "tokens",
    transport = "ws",
    lastSeenSeq = 0,
    pingIntervalMs = 15_000,
    silenceTimeoutMs = 35_000,
    WebSocketImpl = globalThis.WebSocket,
    EventSourceImpl = globalThis.EventSource,
    fetchImpl = (...args) => globalThis.fetch(...args),
  } = {}) {
    super();
    if (!DELIVERY_MODES.includes(delivery)) throw new TypeError(`unknown delivery mode: ${delivery}`);
    if (transport !== "ws" && transport !== "sse") throw new TypeError(`unknown transport: ${transport}`);
    if (transport === "sse" && !sessionId) throw new TypeError("the SSE transport needs a sessionId");
    this.baseUrl = baseUrl;
    this.token = token;
    this.sessionId = sessionId;
    this.delivery = delivery;
    this.transport = transport;
    /** Highest seq applied; the resume point sent in every hello. */
    this.lastSeenSeq = lastSeenSeq;
    this.pingIntervalMs = pingIntervalMs;
    this.silenceTimeoutMs = silenceTimeoutMs;
    this.#WebSocket = WebSocketImpl;
    this.#EventSource = EventSourceImpl;
    this.#fetch = fetchImpl;
  }

  #WebSocket;
  #EventSource;
  #fetch;
  #socket = null; // the live WebSocket or EventSource; handlers of any other one are ignored
  #ready = false; // hello answered (ws) / stream open (sse): sends may go out
  #started = false;
  #halted = null; // null | "closed" | "unauthorized" | "forbidden"
  #attempt = 0;
  #retryTimer = null;
  #flushTimer = null;
  #heartbeat = null;
  #lastFrameAt = 0;
  #lastPingAt = 0;
  #posting = false;
  #postAgain = false;
  #postFailures = 0;
  #state = "offline";
  #turns = new TurnAssembler();
  /** Unacked sends, in send order; resent after every reconnect until acked. */
  #pending = new Map();
  #onOnline = () => {
    if (this.#retryTimer !== null) this.#open();
  };

  /** The current connection state (see the `state` event). */
  get state() {
    return this.#state;
  }

  /** client_msg_ids sent but not yet acked. */
  get pendingIds() {
    return [...this.#pending.keys()];
  }

  /** Opens the connection; it then stays up (reconnecting as needed) until close(). */
  connect() {
    this.#started = true;
    this.#halted = null;
    globalThis.addEventListener?.("online", this.#onOnline);
    this.#open();
  }

  /** Closes for good: no reconnect. Unacked sends stay in `pendingIds`. */
  close() {
    this.#started = false;
    this.#halt("closed");
    globalThis.removeEventListener?.("online", this.#onOnline);
  }

  /**
   * Sends a user message. It is kept and resent with the same client_msg_id after every
   * reconnect until acked: the server dedupes, so a message is never lost nor doubled.
   * @returns {string} the client_msg_id
   */
  send(text) {
    const clientMsgId = crypto.randomUUID();
    this.#pending.set(clientMsgId, { type: "send", client_msg_id: clientMsgId, text });
    if (this.#ready) {
      if (this.transport === "ws") this.#sendFrame(this.#pending.get(clientMsgId));
      else this.#postPending();
    }
    return clientMsgId;
  }

  /**
   * Stops the named turn, or the current one. Goes over the socket when connected, else over HTTP,
   * so Stop works even while the socket is reconnecting.
   * @returns {Promise<void>}
   */
  async stop(turnId) {
    if (this.transport === "ws" && this.#ready) {
      this.#sendFrame(turnId ? { type: "stop", turn_id: turnId } : { type: "stop" });
      return;
    }
    try {
      await this.#api("POST", `${this.#sessionPath()}/stop`, turnId ? { turn_id: turnId } : {});
    } catch (err) {
      this.#emit("error", errorFrame(err));
    }
  }

  /** Switches delivery mode; takes effect through a fresh hello, so it reconnects now. */
  setDelivery(mode) {
    if (!DELIVERY_MODES.includes(mode)) throw new TypeError(`unknown delivery mode: ${mode}`);
    if (mode === this.delivery) return;
    this.delivery = mode;
    if (this.#started && !this.#halted) this.#open();
  }

  /** Replaces the token (e.g. after `unauthorized`); resumes if the old token had stopped us. */
  setToken(token) {
    this.token = token;
    if (this.#started && this.#halted === "unauthorized") {
      this.#halted = null;
      this.#attempt = 0;
      this.#open();
    }
  }

  /**
   * Re-reads the stream from `seq` (replay of everything after it). Used after a `reset`, once
   * history has been reloaded, so a turn in progress is replayed from its start.
   */
  resumeFrom(seq) {
    this.lastSeenSeq = seq;
    if (this.#started && !this.#halted) this.#open();
  }

  /** The text of a turn so far (exact, code-point reassembled), or its final text once ended. */
  turnText(turnId) {
    return this.#turns.text(turnId);
  }

  // ---- connection lifecycle -------------------------------------------------------------------

  #open() {
    clearTimeout(this.#retryTimer);
    this.#retryTimer = null;
    this.#drop();
    this.#setState("connecting");
    if (this.transport === "sse") this.#openEventSource();
    else this.#openWebSocket();
  }

  /** Forgets the current socket without waiting: a half-open socket may never finish closing. */
  #drop() {
    const socket = this.#socket;
    this.#socket = null;
    this.#ready = false;
    clearInterval(this.#heartbeat);
    this.#heartbeat = null;
    if (!socket) return;
    try {
      socket.close();
    } catch {
      // already closed
    }
  }

  #halt(reason) {
    this.#halted = reason;
    clearTimeout(this.#retryTimer);
    clearTimeout(this.#flushTimer);
    this.#retryTimer = this.#flushTimer = null;
    this.#drop();
    this.#setState("offline");
  }

  #scheduleReconnect(delay = backoffDelay(this.#attempt)) {
    if (this.#halted || !this.#started) return;
    this.#attempt++;
    clearTimeout(this.#retryTimer);
    this.#retryTimer = setTimeout(() => this.#open(), delay);
    this.#setState("reconnecting", { retryInMs: delay });
  }

  /** The stream is live: reset backoff and push out everything still unacked. */
  #connected() {
    this.#ready = true;
    this.#attempt = 0;
    this.#setState("connected");
    this.#flushPending();
  }

  /** (Re)sends every unacked message, in order (safe: the server dedupes by client_msg_id). */
  #flushPending() {
    if (this.transport === "ws") for (const frame of this.#pending.values()) this.#sendFrame(frame);
    else this.#postPending();
  }

  /** Stops for a reason reconnecting cannot fix, and tells the app why. */
  #refuse(reason, code) {
    this.#halt(reason);
    this.#emit(reason, { code });
  }

  // ---- WebSocket transport --------------------------------------------------------------------

  #openWebSocket() {
    let ws;
    try {
      ws = new this.#WebSocket(this.#wsUrl());
    } catch {
      this.#scheduleReconnect();
      return;
    }
    this.#socket = ws;
    let heardFrom = false;
    this.#startHeartbeat(ws);
    ws.onopen = () => {
      if (ws !== this.#socket) return;
      const hello = { type: "hello", last_seen_seq: this.lastSeenSeq, delivery: this.delivery };
      if (this.sessionId) hello.session_id = this.sessionId;
      this.#sendFrame(hello);
    };
    ws.onmessage = (msg) => {
      if (ws !== this.#socket) return;
      heardFrom = true;
      this.#lastFrameAt = Date.now();
      this.#onFrame(parseJson(msg.data));
    };
    ws.onerror = () => {}; // a close event always follows
    ws.onclose = (ev) => {
      if (ws !== this.#socket) return;
      this.#socket = null;
      this.#ready = false;
      clearInterval(this.#heartbeat);
      if (ev.code === 1006 && !heardFrom) this.#probeThenReconnect(); // upgrade refused, or server down
      else this.#onClose(ev.code);
    };
  }

  #onClose(code) {
    switch (code) {
      case 4401:
        this.#refuse("unauthorized", code);
        return;
      case 4403:
        this.#refuse("forbidden", code);
        return;
      case 1012: // server restarting: another instance is likely up, come back soon (still jittered)
        this.#scheduleReconnect(backoffDelay(0));
        return;
      default: // 4408 heartbeat timeout, 4410 too far behind, 4429, 1006...: resume from lastSeenSeq
        this.#scheduleReconnect();
    }
  }

  /**
   * App-level heartbeat: proxies and NATs can silently kill an idle TCP connection, which the
   * browser only notices much later. The server answers every ping, so 35 s without any frame
   * means the socket is dead: drop it and resume on a fresh one.
   */
  #startHeartbeat(ws) {
    this.#lastFrameAt = this.#lastPingAt = Date.now();
    const tick = Math.max(10, Math.min(this.pingIntervalMs, this.silenceTimeoutMs) / 3);
    this.#heartbeat = setInterval(() => {
      if (ws !== this.#socket) return;
      const now = Date.now();
      if (now - this.#lastFrameAt >= this.silenceTimeoutMs) {
        this.#drop();
        this.#scheduleReconnect();
      } else if (now - this.#lastPingAt >= this.pingIntervalMs && ws.readyState === WS_OPEN) {
        this.#lastPingAt = now;
        this.#sendFrame({ type: "ping" });
      }
    }, tick);
  }

  #sendFrame(frame) {
    const ws = this.#socket;
    if (!ws || ws.readyState !== WS_OPEN) return; // resent after the next ready
    ws.send(JSON.stringify(frame));
  }

  #wsUrl() {
    const url = new URL(joinUrl(this.baseUrl, "/v1/ws"), globalThis.location?.href);
    if (url.protocol === "https:") url.protocol = "wss:";
    else if (url.protocol === "http:") url.protocol = "ws:";
    if (this.token) url.searchParams.set("access_token", this.token);
    return url.href;
  }

  // ---- SSE transport --------------------------------------------------------------------------

  #openEventSource() {
    const url = new URL(joinUrl(this.baseUrl, `${this.#sessionPath()}/events`), globalThis.location?.href);
    url.searchParams.set("after", String(this.lastSeenSeq));
    url.searchParams.set("delivery", this.delivery);
    if (this.token) url.searchParams.set("access_token", this.token);
    const es = new this.#EventSource(url.href);
    this.#socket = es;
    es.onopen = () => {
      if (es === this.#socket) this.#connected();
    };
    for (const type of [...EVENT_TYPES, "ready", "ack"]) {
      es.addEventListener(type, (msg) => {
        if (es === this.#socket) this.#onFrame({ type, ...parseJson(msg.data) });
      });
    }
    es.onerror = (ev) => {
      if (es !== this.#socket) return;
      if (typeof ev.data === "string") {
        this.#onFrame({ type: "error", ...parseJson(ev.data) }); // `event: error` from the server
        return;
      }
      this.#ready = false;
      if (es.readyState === EVENTSOURCE_CLOSED) {
        this.#socket = null;
        this.#probeThenReconnect();
      } else {
        // The browser retries by itself and sends Last-Event-ID; seq dedupe covers any overlap.
        this.#setState("connecting");
      }
    };
  }

  /**
   * Browsers hide the HTTP status of a refused WebSocket upgrade or EventSource request, so when a
   * connection fails before any frame arrives, ask the API why: 401 and 403/404 stop the client
   * (reconnecting cannot help); anything else, including the server being down, means retry.
   */
  async #probeThenReconnect() {
    if (this.sessionId) {
      try {
        await this.#api("HEAD", this.#sessionPath());
      } catch (err) {
        if (this.#socket || this.#halted || !this.#started) return; // superseded meanwhile
        if (err instanceof ApiError && err.status === 401) {
          this.#refuse("unauthorized", 401);
          return;
        }
        if (err instanceof ApiError && (err.status === 403 || err.status === 404)) {
          this.#refuse("forbidden", err.status);
          return;
        }
      }
    }
    if (!this.#socket) this.#scheduleReconnect();
  }

  /** Posts unacked messages one by one, in order; a retryable failure pauses the queue. */
  async #postPending() {
    if (this.#posting) {
      this.#postAgain = true;
      return;
    }
    this.#posting = true;
    try {
      do {
        this.#postAgain = false;
        for (const frame of [...this.#pending.values()]) {
          if (!this.#ready || this.#halted) return;
          if (!this.#pending.has(frame.client_msg_id)) continue;
          try {
            const ack = await this.#api("POST", `${this.#sessionPath()}/messages`, {
              client_msg_id: frame.client_msg_id,
              text: frame.text,
            });
            this.#postFailures = 0;
            this.#onAck({ type: "ack", ...ack });
          } catch (err) {
            if (err instanceof ApiError && !RETRY_HTTP_STATUSES.has(err.status)) {
              this.#pending.delete(frame.client_msg_id);
              this.#emit("error", { ...errorFrame(err), ref: frame.client_msg_id });
              if (err.status === 401) {
                this.#refuse("unauthorized", 401);
                return;
              }
              continue;
            }
            this.#retryPendingLater(err.retryAfterMs ?? backoffDelay(this.#postFailures++));
            return; // keep order: later messages wait behind this one
          }
        }
      } while (this.#postAgain);
    } finally {
      this.#posting = false;
    }
  }

  // ---- frames ---------------------------------------------------------------------------------

  #onFrame(frame) {
    if (!frame || typeof frame.type !== "string") return;
    if (SEQUENCED.has(frame.type) && Number.isInteger(frame.seq)) {
      this.#onEvent(frame);
      return;
    }
    switch (frame.type) {
      case "ready":
        this.#onReady(frame);
        break;
      case "ack":
        this.#onAck(frame);
        break;
      case "error":
        this.#onError(frame);
        break;
      default: // pong, and frame types added later
    }
  }

  /**
   * Applies a sequenced event once. Merged deltas (phrases/batched delivery, replay from the log)
   * carry the seq of their last member, so seq may jump forward: that is not a gap.
   */
  #onEvent(ev) {
    if (ev.seq <= this.lastSeenSeq) return; // already seen (replay overlap, SSE retry)
    this.lastSeenSeq = ev.seq;
    if (ev.type === "delta") this.#turns.apply(ev.turn_id, ev.offset, ev.text);
    else if (ev.type === "turn_end") this.#turns.finish(ev.turn_id, ev.text);
    this.#emit("event", ev);
  }

  #onReady(ready) {
    if (ready.session_id) this.sessionId = ready.session_id;
    if (ready.reset) {
      // The server cannot replay from our seq: continue from its last_seq and let the app reload.
      this.lastSeenSeq = ready.last_seq;
      this.#turns.clear();
      this.#emit("reset", ready);
    }
    this.#connected();
  }

  #onAck(ack) {
    this.#pending.delete(ack.client_msg_id);
    this.#emit("ack", ack);
  }

  #onError(error) {
    const ref = error.ref;
    if (ref && this.#pending.has(ref) && FINAL_SEND_ERRORS.has(error.code)) this.#pending.delete(ref);
    else if (RETRY_SEND_ERRORS.has(error.code) && this.#pending.size > 0) {
      this.#retryPendingLater(error.retry_after_ms ?? backoffDelay(1));
    }
    this.#emit("error", error);
  }

  /** Resends every unacked message after `delayMs`. */
  #retryPendingLater(delayMs) {
    if (this.#flushTimer !== null) return;
    this.#flushTimer = setTimeout(() => {
      this.#flushTimer = null;
      if (this.#ready) this.#flushPending(); // else the next connect resends anyway
    }, delayMs);
  }

  // ---- small things ---------------------------------------------------------------------------

  #setState(state, extra = {}) {
    this.#state = state;
    this.#emit("state", { state, ...extra });
  }

  #emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  #sessionPath() {
    if (!this.sessionId) throw new Error("no session yet");
    return `/v1/sessions/${encodeURIComponent(this.sessionId)}`;
  }

  #api(method, path, body) {
    return api(this.baseUrl, this.token, method, path, body, { fetchImpl: this.#fetch });
  }
}

/** Parses a frame; anything that is not JSON yields null and is ignored. */
function parseJson(text) {
  try {
    return JSON.parse(text);
  } catch {
    return null;
  }
}

/** Joins a base URL ("" = same origin) and an absolute API path. */
function joinUrl(baseUrl, path) {
  return `${(baseUrl || "").replace(/\/+$/, "")}${path}`;
}

/** Turns an ApiError or network failure into the shape of a protocol error frame. */
function errorFrame(err) {
  if (err instanceof ApiError) {
    return { type: "error", code: err.code || "internal", message: err.message, status: err.status };
  }
  return { type: "error", code: "internal", message: String((err && err.message) || err) };
}

// ---- rendering helpers for apps ---------------------------------------------------------------

/**
 * Index just past the last phrase boundary in `text` (a sentence or clause end followed by
 * whitespace, or a newline), or 0. Screen-reader announcements cut here so they read whole
 * phrases instead of one word per token.
 */
export function phraseEnd(text) {
  const boundary = /[.!?…;:]\s|\n/g;
  let end = 0;
  for (let m = boundary.exec(text); m; m = boundary.exec(text)) end = m.index + m[0].length;
  return end;
}

const HTML_ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

/** Escapes text for HTML element content and attribute values. */
export function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => HTML_ESCAPES[c]);
}

/**
 * A tiny, safe Markdown renderer for `turn_end.text`: paragraphs, line breaks, **bold**, *italic*,
 * `code`, fenced code blocks, headings and lists. Safe because the whole input is HTML-escaped
 * first and only fixed tags are added afterwards; there are no links or raw HTML.
 * @returns {string} HTML
 */
export function renderMarkdown(source) {
  const lines = escapeHtml(String(source).replace(/\u0000/g, "\uFFFD"))
    .replace(/\r\n?/g, "\n")
    .split("\n");
  const out = [];
  let paragraph = [];
  let list = null; // {tag, start, items: string[][]}
  let code = null; // string[] while inside a fence

  const flushParagraph = () => {
    if (paragraph.length) out.push(`<p>${paragraph.map(renderInline).join("<br>")}</p>`);
    paragraph = [];
  };
  const flushList = () => {
    if (!list) return;
    const start = list.tag === "ol" && list.start !== 1 ? ` start="${list.start}"` : "";
    const items = list.items.map((item) => `<li>${item.map(renderInline).join("<br>")}</li>`).join("");
    out.push(`<${list.tag}${start}>${items}</${list.tag}>`);
    list = null;
  };

  for (const line of lines) {
    if (code) {
      if (/^\s*```/.test(line)) {
        out.push(`<pre><code>${code.join("\n")}</code></pre>`);
        code = null;
      } else {
        code.push(line);
      }
      continue;
    }
    if (/^\s*```/.test(line)) {
      flushParagraph();
      flushList();
      code = [];
      continue;
    }
    if (!line.trim()) {
      flushParagraph();
      flushList();
      continue;
    }
    const heading = /^(#{1,6})\s+(.*)$/.exec(line);
    if (heading) {
      flushParagraph();
      flushList();
      const level = Math.min(6, heading[1].length + 2); // inside a chat bubble, # is a small heading
      out.push(`<h${level}>${renderInline(heading[2])}</h${level}>`);
      continue;
    }
    const bullet = /^\s*[-*+]\s+(.*)$/.exec(line);
    const numbered = /^\s*(\d{1,9})[.)]\s+(.*)$/.exec(line);
    if (bullet || numbered) {
      flushParagraph();
      const tag = bullet ? "ul" : "ol";
      if (list && list.tag !== tag) flushList();
      if (!list) list = { tag, start: numbered ? Number(numbered[1]) : 1, items: [] };
      list.items.push([bullet ? bullet[1] : numbered[2]]);
      continue;
    }
    if (list && /^\s+\S/.test(line)) {
      list.items[list.items.length - 1].push(line.trim()); // continuation of the last item
      continue;
    }
    flushList();
    paragraph.push(line);
  }
  if (code) out.push(`<pre><code>${code.join("\n")}</code></pre>`); // unterminated fence
  flushParagraph();
  flushList();
  return out.join("\n");
}

/** Inline Markdown on already-escaped text; code spans are set aside so their content stays literal. */
function renderInline(text) {
  const spans = [];
  return text
    .replace(/`([^`]+)`/g, (_, span) => `\u0000${spans.push(span) - 1}\u0000`)
    .replace(/\*\*(?=\S)([\s\S]*?\S)\*\*/g, "<strong>$1</strong>")
    .replace(/__(?=\S)([\s\S]*?\S)__/g, "<strong>$1</strong>")
    .replace(/(^|[^*\w])\*(?=\S)([^*]*?\S)\*(?![*\w])/g, "$1<em>$2</em>")
    .replace(/(^|[^_\w])_(?=\S)([^_]*?\S)_(?![_\w])/g, "$1<em>$2</em>")
    .replace(/\u0000(\d+)\u0000/g, (_, i) => `<code>${spans[Number(i)]}</code>`);
}
