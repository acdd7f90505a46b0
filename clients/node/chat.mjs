// A headless AI SDK chat: the `ai` package's AbstractChat with its DefaultChatTransport, pointed
// at tidewire's `/v1/ai-sdk/chat`, with the smallest ChatState there is (plain arrays). This is the
// same chat a `useChat` hook drives, without a UI framework.
import { AbstractChat, DefaultChatTransport } from 'ai';

export class ArrayChatState {
  constructor(messages = []) {
    this.messages = messages;
    this.status = 'ready';
    this.error = undefined;
  }
  pushMessage = (message) => { this.messages = this.messages.concat(message); };
  popMessage = () => { this.messages = this.messages.slice(0, -1); };
  replaceMessage = (index, message) => {
    this.messages = [...this.messages.slice(0, index), this.snapshot(message), ...this.messages.slice(index + 1)];
  };
  snapshot = (value) => structuredClone(value);
}

export class TidewireChat extends AbstractChat {
  /** `sessions` collects the X-Tidewire-Session header of every answer (the chat's session id). */
  constructor({ url, token, id, sessions = [], ...rest }) {
    const transport = new DefaultChatTransport({
      api: `${url}/v1/ai-sdk/chat`,
      headers: { Authorization: `Bearer ${token}` },
      fetch: async (input, init) => {
        const response = await fetch(input, init);
        const sid = response.headers.get('x-tidewire-session');
        if (sid) sessions.push(sid);
        return response;
      },
    });
    super({ id, transport, state: new ArrayChatState(), ...rest });
    this.sessions = sessions;
  }

  /** The text of the last assistant message (its text parts, in order). */
  get answer() {
    const last = [...this.messages].reverse().find((m) => m.role === 'assistant');
    return last ? last.parts.filter((p) => p.type === 'text').map((p) => p.text).join('') : '';
  }
}
