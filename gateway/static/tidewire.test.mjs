// Unit tests for tidewire.js, no browser needed: node gateway/static/tidewire.test.mjs
import assert from "node:assert/strict";
import test from "node:test";

import {
  TidewireClient,
  TurnAssembler,
  backoffDelay,
  phraseEnd,
  renderMarkdown,
  resumePoint,
} from "./tidewire.js";

const tick = (ms = 0) => new Promise((resolve) => setTimeout(resolve, ms));

// ---- backoff ------------------------------------------------------------------------------------

test("backoff is full jitter under an exponential ceiling capped at 30 s", () => {
  const top = () => 0.999999;
  assert.equal(backoffDelay(0, () => 0), 0);
  assert.equal(backoffDelay(0, top), 249);
  assert.equal(backoffDelay(1, top), 499);
  assert.equal(backoffDelay(6, top), 15_999);
  assert.equal(backoffDelay(7, top), 29_999); // 32 s capped
  assert.equal(backoffDelay(10_000, top), 29_999); // no overflow to Infinity/NaN
  for (let i = 0; i < 1000; i++) {
    const d = backoffDelay(3);
    assert.ok(d >= 0 && d < 2000 && Number.isInteger(d));
  }
});

// ---- turn assembly ------------------------------------------------------------------------------

test("deltas are placed by code-point offset, not UTF-16 index", () => {
  const a = new TurnAssembler();
  const answer = "Hi 👋🏽 café — 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ok";
  const points = Array.from(answer);
  let offset = 0;
  for (const size of [2, 3, 1, 4, 5, 100]) {
    const piece = points.slice(offset, offset + size).join("");
    a.apply("t1", offset, piece);
    offset += Array.from(piece).length;
  }
  assert.equal(a.text("t1"), answer);
});

test("replayed and overlapping deltas never duplicate text", () => {
  const a = new TurnAssembler();
  assert.equal(a.apply("t", 0, "héllo "), "héllo ");
  assert.equal(a.apply("t", 0, "héllo "), ""); // replay of the same delta
  assert.equal(a.apply("t", 3, "lo wor"), "wor"); // merged delta overlapping what was seen
  assert.equal(a.apply("t", 9, "ld🌍"), "ld🌍");
  assert.equal(a.text("t"), "héllo world🌍");
});

test("a gap hides later text until it is filled", () => {
  const a = new TurnAssembler();
  assert.equal(a.apply("t", 5, "world"), "");
  assert.equal(a.text("t"), "");
  assert.equal(a.apply("t", 0, "hello"), "helloworld");
  a.finish("t", "helloworld!");
  assert.equal(a.text("t"), "helloworld!");
});

// ---- resume point ------------------------------------------------------------------------------

test("resume point is the last finished history item, even when last_seq counts a running turn", () => {
  const messages = [
    { seq: 1, role: "user", turn_id: "a", text: "q1", status: "completed" },
    { seq: 9, role: "assistant", turn_id: "a", text: "a1", status: "completed" },
    { seq: 10, role: "user", turn_id: "b", text: "q2", status: "completed" },
    { seq: 14, role: "assistant", turn_id: "b", text: "partial", status: "running" },
  ];
  assert.equal(resumePoint({ last_seq: 14, messages }), 10); // replays turn b from turn_start (11)
  assert.equal(resumePoint({ last_seq: 9, messages: messages.slice(0, 2) }), 9);
  assert.equal(resumePoint({ last_seq: 0, messages: [] }), 0);
});

// ---- rendering helpers --------------------------------------------------------------------------

test("phraseEnd cuts after the last sentence or clause boundary", () => {
  assert.equal(phraseEnd("no boundary yet"), 0);
  assert.equal(phraseEnd("One. Two"), 5);
  assert.equal(phraseEnd("Pi is 3.14 and"), 0); // a dot inside a number is not a boundary
  assert.equal(phraseEnd("a; b: c\nd"), 8);
});

test("markdown escapes HTML before formatting", () => {
  const html = renderMarkdown('<img src=x onerror="alert(1)"> **bold** & *it* `<b>**x**</b>`');
  assert.ok(!html.includes("<img"));
  assert.ok(html.includes("&lt;img src=x onerror=&quot;alert(1)&quot;&gt;"));
  assert.ok(html.includes("<strong>bold</strong>"));
  assert.ok(html.includes("<em>it</em>"));
  assert.ok(html.includes("<code>&lt;b&gt;**x**&lt;/b&gt;</code>"));
  assert.ok(html.includes("&amp;"));
});

test("markdown renders paragraphs, line breaks, lists and code blocks", () => {
  const html = renderMarkdown(
    "Para one\nstill one\n\n- a\n- **b**\n\n3. x\n4. y\n\n```\n*raw*\n```\n2 * 3 * 4",
  );
  assert.equal(
    html,
    [
      "<p>Para one<br>still one</p>",
      "<ul><li>a</li><li><strong>b</strong></li></ul>",
      '<ol start="3"><li>x</li><li>y</li></ol>',
      "<pre><code>*raw*</code></pre>",
      "<p>2 * 3 * 4</p>",
    ].join("\n"),
  );
});

// ---- the client against a fake WebSocket ------------------------------------------------------

class FakeWebSocket {
  static instances = [];
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    FakeWebSocket.instances.push(this);
    queueMicrotask(() => {
      this.readyState = 1;
      this.onopen?.({});
    });
  }
  send(data) {
    this.sent.push(JSON.parse(data));
  }
  close() {
    this.readyState = 3;
  }
  // test side
  receive(frame) {
    this.onmessage?.({ data: JSON.stringify(frame) });
  }
  serverClose(code) {
    this.readyState = 3;
    this.onclose?.({ code });
  }
  static last() {
    return FakeWebSocket.instances[FakeWebSocket.instances.length - 1];
  }
}

function makeClient(options = {}) {
  FakeWebSocket.instances = [];
  const client = new TidewireClient({
    baseUrl: "https://chat.example",
    token: "tok",
    sessionId: "s1",
    WebSocketImpl: FakeWebSocket,
    fetchImpl: async () => new Response(null, { status: 200 }),
    ...options,
  });
  const seen = { event: [], state: [], ack: [], reset: [], unauthorized: [], error: [] };
  for (const type of Object.keys(seen)) client.addEventListener(type, (e) => seen[type].push(e.detail));
  return { client, seen };
}

async function connectReady(client, lastSeq = 0) {
  client.connect();
  await tick();
  const ws = FakeWebSocket.last();
  ws.receive({ type: "ready", session_id: "s1", last_seq: lastSeq });
  return ws;
}

test("hello comes first with the resume point, on the token-bearing URL", async () => {
  const { client, seen } = makeClient({ lastSeenSeq: 7, delivery: "phrases" });
  const ws = await connectReady(client, 7);
  assert.equal(ws.url, "wss://chat.example/v1/ws?access_token=tok");
  assert.deepEqual(ws.sent[0], { type: "hello", last_seen_seq: 7, delivery: "phrases", session_id: "s1" });
  assert.deepEqual(
    seen.state.map((s) => s.state),
    ["connecting", "connected"],
  );
  client.close();
});

test("events at or below lastSeenSeq are ignored; merged deltas may jump seq", async () => {
  const { client, seen } = makeClient({ lastSeenSeq: 2 });
  const ws = await connectReady(client, 2);
  ws.receive({ type: "turn_start", seq: 2, turn_id: "t" }); // already seen
  ws.receive({ type: "turn_start", seq: 3, turn_id: "t" });
  ws.receive({ type: "delta", seq: 6, turn_id: "t", offset: 0, text: "ab😀" }); // merged 4..6
  ws.receive({ type: "delta", seq: 5, turn_id: "t", offset: 1, text: "b" }); // stale
  ws.receive({ type: "delta", seq: 7, turn_id: "t", offset: 3, text: "!" });
  assert.deepEqual(
    seen.event.map((e) => e.seq),
    [3, 6, 7],
  );
  assert.equal(client.lastSeenSeq, 7);
  assert.equal(client.turnText("t"), "ab😀!");
  client.close();
});

test("unacked sends are resent with the same client_msg_id after a reconnect", async () => {
  const orig = Math.random;
  Math.random = () => 0; // no backoff wait
  try {
    const { client, seen } = makeClient();
    const ws1 = await connectReady(client);
    const id1 = client.send("first");
    const id2 = client.send("second");
    assert.deepEqual(
      ws1.sent.slice(1).map((f) => [f.type, f.client_msg_id, f.text]),
      [
        ["send", id1, "first"],
        ["send", id2, "second"],
      ],
    );
    ws1.receive({ type: "ack", client_msg_id: id1, seq: 1, turn_id: "t1", duplicate: false });
    assert.deepEqual(client.pendingIds, [id2]);
    ws1.receive({ type: "message", seq: 1, turn_id: "t1", client_msg_id: id1, role: "user", text: "first" });

    ws1.serverClose(1012);
    assert.equal(seen.state.at(-1).state, "reconnecting");
    await tick(5);
    const ws2 = FakeWebSocket.last();
    assert.notEqual(ws2, ws1);
    await tick();
    assert.deepEqual(ws2.sent[0], { type: "hello", last_seen_seq: 1, delivery: "tokens", session_id: "s1" });
    assert.equal(ws2.sent.length, 1, "nothing is sent before ready");
    ws2.receive({ type: "ready", session_id: "s1", last_seq: 1 });
    assert.deepEqual(ws2.sent[1], { type: "send", client_msg_id: id2, text: "second" });
    ws2.receive({ type: "ack", client_msg_id: id2, seq: 2, turn_id: "t2", duplicate: true });
    assert.deepEqual(client.pendingIds, []);
    assert.equal(seen.ack.length, 2);
    client.close();
  } finally {
    Math.random = orig;
  }
});

test("4401 stops reconnecting until a new token is set", async () => {
  const { client, seen } = makeClient();
  const ws = await connectReady(client);
  ws.serverClose(4401);
  assert.equal(seen.unauthorized.length, 1);
  assert.equal(client.state, "offline");
  await tick(300);
  assert.equal(FakeWebSocket.instances.length, 1);
  client.setToken("fresh");
  assert.equal(FakeWebSocket.instances.length, 2);
  assert.equal(FakeWebSocket.last().url, "wss://chat.example/v1/ws?access_token=fresh");
  client.close();
});

test("4403 stops for good", async () => {
  const { client } = makeClient();
  const ws = await connectReady(client);
  ws.serverClose(4403);
  await tick(300);
  assert.equal(FakeWebSocket.instances.length, 1);
  assert.equal(client.state, "offline");
});

test("ready with reset moves to the server's last_seq and asks the app to reload", async () => {
  const { client, seen } = makeClient({ lastSeenSeq: 50 });
  const ws = await connectReady(client, 10);
  assert.equal(seen.reset.length, 0);
  ws.receive({ type: "ready", session_id: "s1", last_seq: 10, reset: true });
  assert.equal(seen.reset.length, 1);
  assert.equal(client.lastSeenSeq, 10);
  ws.receive({ type: "turn_start", seq: 11, turn_id: "t" });
  assert.equal(seen.event.at(-1).seq, 11);
  client.close();
});

test("silence past the heartbeat limit drops the socket and resumes on a new one", async () => {
  const orig = Math.random;
  Math.random = () => 0;
  try {
    const { client } = makeClient({ pingIntervalMs: 30, silenceTimeoutMs: 90 });
    const ws = await connectReady(client);
    await tick(50);
    assert.ok(ws.sent.some((f) => f.type === "ping"), "pings while idle");
    await tick(120);
    assert.ok(FakeWebSocket.instances.length >= 2, "reconnected after silence");
    assert.equal(FakeWebSocket.instances[1].sent[0].type, "hello");
    client.close();
  } finally {
    Math.random = orig;
  }
});

test("setDelivery reconnects with the new mode in hello", async () => {
  const { client } = makeClient();
  await connectReady(client);
  client.setDelivery("batched");
  await tick();
  assert.equal(FakeWebSocket.last().sent[0].delivery, "batched");
  client.close();
});

test("a send refused for good is dropped; a degraded one is retried", async () => {
  const orig = Math.random;
  Math.random = () => 0;
  try {
    const { client, seen } = makeClient();
    const ws = await connectReady(client);
    const big = client.send("x".repeat(10));
    ws.receive({ type: "error", code: "too_large", message: "too large", ref: big });
    assert.deepEqual(client.pendingIds, []);
    assert.equal(seen.error.length, 1);
    const id = client.send("hi");
    ws.receive({ type: "error", code: "degraded", message: "busy", retry_after_ms: 20 });
    const before = ws.sent.filter((f) => f.client_msg_id === id).length;
    await tick(40);
    assert.equal(ws.sent.filter((f) => f.client_msg_id === id).length, before + 1);
    client.close();
  } finally {
    Math.random = orig;
  }
});

// ---- the client against a fake EventSource ----------------------------------------------------

class FakeEventSource extends EventTarget {
  static last = null;
  constructor(url) {
    super();
    this.url = url;
    this.readyState = 0;
    FakeEventSource.last = this;
    queueMicrotask(() => {
      this.readyState = 1;
      this.onopen?.({});
    });
  }
  close() {
    this.readyState = 2;
  }
  emit(type, data) {
    const ev = new Event(type);
    ev.data = JSON.stringify(data);
    this.dispatchEvent(ev);
  }
}

test("SSE: resumes with after=N, applies named events, and sends over POST", async () => {
  const posts = [];
  const fetchImpl = async (url, init) => {
    posts.push([url, init.method, init.headers.Authorization, JSON.parse(init.body)]);
    const body = JSON.parse(init.body);
    return new Response(JSON.stringify({ client_msg_id: body.client_msg_id, seq: 4, turn_id: "t2", duplicate: false }));
  };
  const client = new TidewireClient({
    baseUrl: "http://h",
    token: "tok",
    sessionId: "s1",
    transport: "sse",
    lastSeenSeq: 3,
    EventSourceImpl: FakeEventSource,
    fetchImpl,
  });
  const events = [];
  const acks = [];
  client.addEventListener("event", (e) => events.push(e.detail));
  client.addEventListener("ack", (e) => acks.push(e.detail));
  client.connect();
  await tick();
  const es = FakeEventSource.last;
  assert.equal(es.url, "http://h/v1/sessions/s1/events?after=3&delivery=tokens&access_token=tok");
  const id = client.send("hello");
  await tick(5);
  assert.deepEqual(posts, [["http://h/v1/sessions/s1/messages", "POST", "Bearer tok", { client_msg_id: id, text: "hello" }]]);
  assert.equal(acks[0].client_msg_id, id);
  es.emit("message", { seq: 4, turn_id: "t2", client_msg_id: id, role: "user", text: "hello" });
  es.emit("delta", { seq: 6, turn_id: "t2", offset: 0, text: "yo" });
  es.emit("delta", { seq: 6, turn_id: "t2", offset: 0, text: "yo" }); // browser retry overlap
  assert.deepEqual(
    events.map((e) => [e.type, e.seq]),
    [
      ["message", 4],
      ["delta", 6],
    ],
  );
  assert.equal(client.turnText("t2"), "yo");
  client.close();
});
