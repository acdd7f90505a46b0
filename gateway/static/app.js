/**
 * The Tidewire chat page: a sessions list and one live conversation.
 *
 * Opening a session renders its durable history (GET), then streams from a TidewireClient that
 * resumes right after the last *completed* item rendered, so a reload in the middle of an answer
 * replays that answer from its start and continues it live. The session id lives in the URL
 * (`?session=`), the dev token in sessionStorage (taken once from `?token=` or `#token=`).
 */
import {
  ApiError,
  TURN_END_STATUSES,
  TidewireClient,
  api,
  phraseEnd,
  renderMarkdown,
  resumePoint,
} from "./tidewire.js";

const TOKEN_KEY = "tidewire.token";
const LOW_POWER_KEY = "tidewire.lowPower";
const STATUS_NOTES = { cancelled: "Stopped", failed: "Failed", timed_out: "Timed out" };
const LIVE_REGION_KEEP = 20; // announcements kept in the live region; older ones are pruned

const $ = (id) => document.getElementById(id);
const ui = {
  connState: $("conn-state"),
  sessions: $("sessions"),
  newChat: $("new-chat"),
  sidebarToggle: $("sessions-toggle"),
  notice: $("notice"),
  messages: $("messages"),
  form: $("composer-form"),
  composer: $("composer"),
  stop: $("stop"),
  lowPower: $("low-power"),
  live: $("live-region"),
};

/** Everything about the open conversation; reset by clearConversation(). */
const view = {
  token: null,
  sessionId: null,
  client: null,
  opening: 0, // generation counter: a slow history load for a session we left is discarded
  reloading: false, // true while history is reloaded after a reset: events are replayed after
  turns: new Map(), // turn_id -> {el, events, answerEl, answer: Text, done, streamed, announced}
  usersByTurn: new Map(), // turn_id -> .user element
  usersByClientId: new Map(), // client_msg_id -> .user element (sent from this page)
  running: new Set(), // turn ids between turn_start and turn_end
  countdown: null,
  pinned: true, // the reader is at the bottom: keep following new text
  scrollQueued: false,
};

// ---- start-up ---------------------------------------------------------------------------------

wireControls();
start().catch(showFailure);

async function start() {
  view.token = takeToken();
  const sessions = await loadSessions();
  const requested = new URL(location.href).searchParams.get("session");
  const sid = requested || sessions[0]?.session_id || (await createSession());
  await openSession(sid);
}

/** Dev mode hands the token over in the URL; keep it for this tab and take it out of sight. */
function takeToken() {
  const url = new URL(location.href);
  const fragment = new URLSearchParams(url.hash.slice(1));
  const fromUrl =
    url.searchParams.get("token") ||
    url.searchParams.get("access_token") ||
    fragment.get("token") ||
    fragment.get("access_token");
  if (fromUrl) {
    storage("sessionStorage", TOKEN_KEY, fromUrl);
    for (const key of ["token", "access_token"]) {
      url.searchParams.delete(key);
      fragment.delete(key);
    }
    url.hash = fragment.toString();
    history.replaceState(history.state, "", url);
  }
  return fromUrl || storage("sessionStorage", TOKEN_KEY);
}

function wireControls() {
  ui.lowPower.checked = storage("localStorage", LOW_POWER_KEY) === "1";
  ui.lowPower.addEventListener("change", () => {
    storage("localStorage", LOW_POWER_KEY, ui.lowPower.checked ? "1" : "0");
    view.client?.setDelivery(delivery());
  });
  ui.form.addEventListener("submit", (e) => {
    e.preventDefault();
    sendMessage();
  });
  ui.composer.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      sendMessage();
    }
  });
  ui.stop.addEventListener("click", () => {
    const current = [...view.running].at(-1);
    if (current) view.client?.stop(current);
  });
  ui.newChat.addEventListener("click", async () => {
    setSidebarOpen(false);
    try {
      await openSession(await createSession());
      await loadSessions();
    } catch (err) {
      showFailure(err);
    }
  });
  ui.sessions.addEventListener("click", (e) => {
    const button = e.target.closest("button[data-session-id]");
    if (button && button.dataset.sessionId !== view.sessionId) {
      openSession(button.dataset.sessionId).catch(showFailure);
    }
    setSidebarOpen(false);
  });
  ui.sidebarToggle.addEventListener("click", () => setSidebarOpen(!document.body.classList.contains("sidebar-open")));
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape") setSidebarOpen(false);
  });
  ui.messages.addEventListener("scroll", () => {
    const list = ui.messages;
    view.pinned = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  });
}

function delivery() {
  return ui.lowPower.checked ? "batched" : "tokens";
}

// ---- sessions ---------------------------------------------------------------------------------

function http(method, path, body) {
  return api("", view.token, method, path, body);
}

function fetchHistory(sid) {
  return http("GET", `/v1/sessions/${encodeURIComponent(sid)}`);
}

async function createSession() {
  const { session_id: sid } = await http("POST", "/v1/sessions");
  return sid;
}

/** Lists the subject's sessions, newest first. The page still works if the list is unavailable. */
async function loadSessions() {
  let sessions = [];
  try {
    sessions = (await http("GET", "/v1/sessions")).sessions ?? [];
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) throw err;
    console.warn("sessions list unavailable", err);
  }
  ui.sessions.replaceChildren(
    ...sessions.map((s) => {
      const item = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.dataset.sessionId = s.session_id;
      const title = document.createElement("span");
      title.className = "title";
      title.textContent = s.title || "New chat";
      const when = document.createElement("span");
      when.className = "when";
      when.textContent = formatWhen(s.created_at);
      button.append(title, when);
      item.append(button);
      return item;
    }),
  );
  markActiveSession(view.sessionId);
  return sessions;
}

function markActiveSession(sid) {
  for (const button of ui.sessions.querySelectorAll("button[data-session-id]")) {
    if (button.dataset.sessionId === sid) button.setAttribute("aria-current", "page");
    else button.removeAttribute("aria-current");
  }
}

/** Shows one session: history first, then the live stream resumed right after it. */
async function openSession(sid) {
  const opening = ++view.opening;
  view.client?.close();
  view.client = null;
  view.reloading = false;
  view.sessionId = sid;
  const url = new URL(location.href);
  url.searchParams.set("session", sid);
  history.replaceState(history.state, "", url);
  markActiveSession(sid);
  clearConversation();
  hideNotice();

  const past = await fetchHistory(sid);
  if (opening !== view.opening) return; // the user moved on meanwhile
  const lastSeenSeq = renderHistory(past);

  const client = new TidewireClient({ token: view.token, sessionId: sid, delivery: delivery(), lastSeenSeq });
  const mine = (handler) => (e) => {
    if (client === view.client) handler(e.detail);
  };
  client.addEventListener("state", mine(showConnState));
  client.addEventListener("event", mine((ev) => !view.reloading && applyEvent(ev)));
  client.addEventListener("ack", mine(confirmSent));
  client.addEventListener("error", mine(showServerError));
  client.addEventListener("reset", mine(() => reloadAfterReset(client)));
  client.addEventListener("unauthorized", mine(askForToken));
  client.addEventListener("forbidden", mine(() => showNotice("This chat is not available to you.")));
  view.client = client;
  client.connect();
  ui.composer.focus();
}

/**
 * Renders the finished part of durable history and returns the seq to resume after
 * (see resumePoint): a turn still running is left to the replay, which rebuilds it from its start.
 */
function renderHistory(past) {
  clearConversation();
  for (const m of [...past.messages].sort((a, b) => a.seq - b.seq)) {
    if (m.role === "user") addUser(m);
    else if (TURN_END_STATUSES.includes(m.status)) endTurn(ensureTurn(m.turn_id), m.status, m.text);
  }
  view.pinned = true;
  scrollToBottom();
  return resumePoint(past);
}

/** After `ready {reset}`: reload history, then replay from it (events meanwhile are replayed too). */
async function reloadAfterReset(client) {
  view.reloading = true;
  try {
    const past = await fetchHistory(view.sessionId);
    if (client !== view.client) return;
    client.resumeFrom(renderHistory(past));
  } catch (err) {
    if (client !== view.client) return;
    showFailure(err);
    clearConversation();
    client.resumeFrom(0); // rebuild everything from the stream instead
  } finally {
    view.reloading = false;
  }
}

// ---- the conversation -------------------------------------------------------------------------

function clearConversation() {
  ui.messages.replaceChildren();
  view.turns.clear();
  view.usersByTurn.clear();
  view.usersByClientId.clear();
  view.running.clear();
  updateStop();
}

function sendMessage() {
  const text = ui.composer.value.trim();
  if (!text || !view.client) return;
  const clientMsgId = view.client.send(text);
  const el = addUser({ text, client_msg_id: clientMsgId });
  el.classList.add("pending");
  ui.composer.value = "";
  ui.composer.focus();
  view.pinned = true;
  scrollToBottom();
}

/** Adds a user message once: echoes of our own optimistic message and replays update it instead. */
function addUser({ seq, turn_id: turnId, client_msg_id: clientMsgId, text }) {
  let el = (turnId && view.usersByTurn.get(turnId)) || (clientMsgId && view.usersByClientId.get(clientMsgId));
  if (!el) {
    el = document.createElement("article");
    el.className = "user";
    const body = document.createElement("div");
    body.className = "text";
    body.textContent = text;
    el.append(body);
    ui.messages.append(el);
  }
  if (clientMsgId) {
    el.dataset.clientMsgId = clientMsgId;
    view.usersByClientId.set(clientMsgId, el);
  }
  if (turnId) view.usersByTurn.set(turnId, el);
  if (seq !== undefined) {
    el.dataset.seq = String(seq);
    el.classList.remove("pending");
  }
  return el;
}

function confirmSent(ack) {
  const el = view.usersByClientId.get(ack.client_msg_id);
  if (el) addUser({ seq: ack.seq, turn_id: ack.turn_id, client_msg_id: ack.client_msg_id });
}

function applyEvent(ev) {
  if (ev.type === "message") {
    addUser(ev);
    followNewText();
    return;
  }
  const turn = ensureTurn(ev.turn_id);
  if (turn.done) return; // replay of a turn already shown complete from history
  turn.streamed = true;
  followNewText();
  switch (ev.type) {
    case "turn_start":
      setRunning(ev.turn_id, true);
      break;
    case "delta":
      setRunning(ev.turn_id, true);
      showAnswerSoFar(turn, view.client.turnText(ev.turn_id));
      break;
    case "status":
      addTurnEvent(turn, "p", "status", ev.text);
      announce(ev.text);
      break;
    case "tool_call": {
      const badge = addTurnEvent(turn, "span", "badge tool-call", `→ ${ev.name}`);
      badge.dataset.callId = ev.call_id;
      badge.dataset.name = ev.name;
      badge.title = JSON.stringify(ev.args ?? {});
      break;
    }
    case "tool_result": {
      const call = turn.events.querySelector(`.tool-call[data-call-id="${CSS.escape(ev.call_id)}"]`);
      const name = call ? call.dataset.name : "tool";
      const label = ev.ok ? `✓ ${name}` : `✗ ${name}: ${ev.text}`;
      const badge = addTurnEvent(turn, "span", `badge tool-result ${ev.ok ? "ok" : "failed"}`, label);
      badge.dataset.callId = ev.call_id;
      badge.title = ev.text;
      break;
    }
    case "turn_end":
      endTurn(turn, ev.status, ev.text);
      loadSessions().catch(() => {}); // a first answer may have given the chat its title
      break;
    default: // event types added later
  }
}

/** The assistant element of a turn, created on first sight. */
function ensureTurn(turnId) {
  let turn = view.turns.get(turnId);
  if (turn) return turn;
  const el = document.createElement("article");
  el.className = "assistant";
  el.dataset.turnId = turnId;
  const events = document.createElement("div");
  events.className = "turn-events";
  const answer = document.createElement("div");
  answer.className = "answer";
  const text = document.createTextNode("");
  answer.append(text);
  el.append(events, answer);
  ui.messages.append(el);
  // streamed: seen live (not from history), so its end is announced; announced: UTF-16 index read out so far
  turn = { el, events, answerEl: answer, answer: text, done: false, streamed: false, announced: 0 };
  view.turns.set(turnId, turn);
  return turn;
}

function addTurnEvent(turn, tag, className, text) {
  const el = document.createElement(tag);
  el.className = className;
  el.textContent = text;
  turn.events.append(el);
  return el;
}

/** Appends what is new (the assembled text only ever grows) and announces finished phrases. */
function showAnswerSoFar(turn, text) {
  const shown = turn.answer.length;
  if (text.length > shown) turn.answer.appendData(text.slice(shown));
  const pending = text.slice(turn.announced);
  const end = phraseEnd(pending);
  if (end > 0) {
    announce(pending.slice(0, end));
    turn.announced += end;
  }
}

function endTurn(turn, status, text) {
  turn.done = true;
  turn.el.dataset.status = status;
  turn.answer.data = text; // the stable text is authoritative
  if (turn.streamed) announce(text.slice(turn.announced));
  setRunning(turn.el.dataset.turnId, false);

  const footer = document.createElement("footer");
  if (STATUS_NOTES[status]) {
    const note = document.createElement("span");
    note.className = "turn-note";
    note.textContent = STATUS_NOTES[status];
    footer.append(note);
  }
  if (text) {
    const full = document.createElement("div");
    full.className = "full-answer";
    full.hidden = true;
    const toggle = document.createElement("button");
    toggle.type = "button";
    toggle.className = "full-toggle";
    toggle.textContent = "Show full answer";
    toggle.setAttribute("aria-expanded", "false");
    toggle.addEventListener("click", () => {
      const open = full.hidden;
      if (open && !full.innerHTML) full.innerHTML = renderMarkdown(text); // escaped, fixed tags only
      full.hidden = !open;
      turn.answerEl.hidden = open;
      toggle.textContent = open ? "Hide full answer" : "Show full answer";
      toggle.setAttribute("aria-expanded", String(open));
    });
    turn.el.insertBefore(full, turn.answerEl.nextSibling);
    footer.prepend(toggle);
  }
  if (footer.childElementCount) turn.el.append(footer);
}

function setRunning(turnId, running) {
  if (running) view.running.add(turnId);
  else view.running.delete(turnId);
  updateStop();
}

function updateStop() {
  ui.stop.disabled = view.running.size === 0;
}

// ---- status, notices, accessibility -----------------------------------------------------------

/** `#conn-state` text is exactly: connected | connecting | offline | reconnecting in Ns. */
function showConnState({ state, retryInMs }) {
  clearInterval(view.countdown);
  ui.connState.dataset.state = state;
  if (state !== "reconnecting") {
    ui.connState.textContent = state;
    return;
  }
  const deadline = Date.now() + (retryInMs ?? 0);
  const render = () => {
    ui.connState.textContent = `reconnecting in ${Math.max(0, Math.ceil((deadline - Date.now()) / 1000))}s`;
  };
  render();
  view.countdown = setInterval(render, 250);
}

/** Appends a phrase to the polite live region (never per token). */
function announce(text) {
  const phrase = text.trim();
  if (!phrase) return;
  const p = document.createElement("p");
  p.textContent = phrase;
  ui.live.append(p);
  while (ui.live.childElementCount > LIVE_REGION_KEEP) ui.live.firstElementChild.remove();
}

function showServerError(error) {
  const el = error.ref && view.usersByClientId.get(error.ref);
  if (el && !el.dataset.seq) {
    el.classList.add("failed");
    el.title = error.message;
  }
  const retrying = error.code === "degraded" || error.code === "rate_limited";
  showNotice(retrying ? `${error.message} (retrying)` : error.message || error.code);
}

function showNotice(text) {
  ui.notice.replaceChildren(text);
  ui.notice.hidden = false;
}

function hideNotice() {
  ui.notice.hidden = true;
  ui.notice.replaceChildren();
}

function showFailure(err) {
  const status = err instanceof ApiError ? err.status : 0;
  if (status === 401) askForToken();
  else if (status === 403 || status === 404) showNotice("This chat is not available to you.");
  else showNotice(`Something went wrong: ${err.message}`);
  if (!view.client) showConnState({ state: "offline" });
}

/** The token was refused: offer to paste a fresh one (dev mode prints it). */
function askForToken() {
  const form = document.createElement("form");
  form.className = "token-form";
  const label = document.createElement("label");
  label.append("Your token is missing or expired. Paste a new one: ");
  const input = document.createElement("input");
  input.id = "token-input";
  input.type = "password";
  input.required = true;
  label.append(input);
  const button = document.createElement("button");
  button.type = "submit";
  button.textContent = "Use token";
  form.append(label, button);
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    view.token = input.value.trim();
    storage("sessionStorage", TOKEN_KEY, view.token);
    hideNotice();
    if (view.client) view.client.setToken(view.token);
    else start().catch(showFailure);
  });
  ui.notice.replaceChildren(form);
  ui.notice.hidden = false;
  showConnState({ state: "offline" });
}

// ---- layout -----------------------------------------------------------------------------------

function setSidebarOpen(open) {
  document.body.classList.toggle("sidebar-open", open);
  ui.sidebarToggle.setAttribute("aria-expanded", String(open));
}

/** Follows new text while the reader is at the bottom; reading further up is left alone. */
function followNewText() {
  if (view.pinned) scrollToBottom();
}

function scrollToBottom() {
  if (view.scrollQueued) return;
  view.scrollQueued = true;
  requestAnimationFrame(() => {
    view.scrollQueued = false;
    ui.messages.scrollTop = ui.messages.scrollHeight;
  });
}

// ---- small things -----------------------------------------------------------------------------

/** Reads (or writes, given a value) web storage, which privacy settings may disable or forbid. */
function storage(areaName, key, value) {
  try {
    if (value === undefined) return window[areaName].getItem(key);
    window[areaName].setItem(key, value);
  } catch {
    // storage unavailable: the value lives for this page only
  }
  return value ?? null;
}

function formatWhen(createdAt) {
  if (createdAt === undefined || createdAt === null) return "";
  const when = typeof createdAt === "number" ? new Date(createdAt < 1e12 ? createdAt * 1000 : createdAt) : new Date(createdAt);
  if (Number.isNaN(when.getTime())) return "";
  return when.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}
