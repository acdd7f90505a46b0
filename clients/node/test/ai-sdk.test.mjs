// The AI SDK facade driven by the real `ai` package: sendMessage gives the stored answer, and
// resumeStream after the gateway was killed mid-answer gives it too. Run by
// tests/integration/test_facade_ai_sdk.py, which passes TIDEWIRE_URL / TIDEWIRE_TOKEN /
// TIDEWIRE_GATEWAY_PID and restarts the gateway on the same port when this test kills it.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { TidewireChat } from '../chat.mjs';

const URL_ = process.env.TIDEWIRE_URL;
const TOKEN = process.env.TIDEWIRE_TOKEN;

/** Awaits `promise` for at most `ms`, failing with a message that names what was awaited. */
async function within(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms awaiting ${what}`)), ms);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** Polls `check` every 100 ms until it returns a truthy value, for at most `ms`. */
async function eventually(check, ms, what) {
  const deadline = Date.now() + ms;
  let last;
  while (Date.now() < deadline) {
    try {
      last = await check();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`timed out after ${ms} ms awaiting ${what}; last: ${String(last)}`);
}

async function storedAnswer(sid, turnId) {
  return eventually(async () => {
    const r = await fetch(`${URL_}/v1/sessions/${sid}`, { headers: { Authorization: `Bearer ${TOKEN}` } });
    if (!r.ok) return undefined;
    const body = await r.json();
    const m = body.messages.find((x) => x.role === 'assistant' && x.turn_id === turnId
      && x.status !== 'in_progress');
    return m ? { text: m.text } : undefined;
  }, 30_000, `the stored answer of turn ${turnId}`);
}

test('sendMessage streams the answer that the session stores', async () => {
  const chat = new TidewireChat({ url: URL_, token: TOKEN, id: `chat-${Date.now()}` });
  await within(chat.sendMessage({ text: '/sim tokens=200 rate=100 ttft_ms=0\nhello from the AI SDK' }), 60_000,
    'sendMessage to finish');
  assert.equal(chat.status, 'ready', `chat error: ${chat.error}`);
  const assistant = chat.lastMessage;
  assert.equal(assistant.role, 'assistant');
  assert.match(assistant.id, /^t_/); // messageId = the turn id
  const sid = chat.sessions.at(-1);
  const stored = await storedAnswer(sid, assistant.id);
  assert.ok(chat.answer.length > 300);
  assert.equal(chat.answer, stored.text);

  // a second message: the same session, a second turn
  await within(chat.sendMessage({ text: '/sim tokens=20 rate=0\nand again' }), 60_000, 'the second sendMessage');
  assert.equal(chat.sessions.at(-1), sid);
  assert.equal(chat.answer, (await storedAnswer(sid, chat.lastMessage.id)).text);
});

test('resumeStream after the gateway was killed mid-answer gives the stored answer',
  { skip: process.env.TIDEWIRE_GATEWAY_PID ? false : 'TIDEWIRE_GATEWAY_PID not given' }, async () => {
    const chat = new TidewireChat({ url: URL_, token: TOKEN, id: `resume-${Date.now()}` });
    const sending = chat.sendMessage({ text: '/sim tokens=1500 rate=100 ttft_ms=0\nkill the gateway meanwhile' });
    await eventually(() => chat.answer.length > 200, 30_000, 'the first 200 characters of the answer');
    process.kill(Number(process.env.TIDEWIRE_GATEWAY_PID), 'SIGKILL');
    await within(sending, 30_000, 'sendMessage to fail after the gateway died');
    const partial = chat.answer;
    assert.ok(partial.length > 200);
    await eventually(async () => (await fetch(`${URL_}/readyz`)).ok, 60_000, 'the restarted gateway to be ready');
    await within(chat.resumeStream(), 60_000, 'resumeStream to finish');
    assert.equal(chat.status, 'ready', `chat error: ${chat.error}`);
    const turnId = chat.lastMessage.id;
    const stored = await storedAnswer(chat.sessions.at(-1), turnId);
    assert.equal(chat.answer, stored.text);
    assert.ok(chat.answer.startsWith(partial));
    assert.equal(chat.messages.filter((m) => m.role === 'assistant').length, 1);
  });
