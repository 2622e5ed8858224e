// walkie.js: the browser client of the Walkie protocol (docs/protocol.md).
// A dependency-free ES module: connect (with a token, and a callback that
// fetches a fresh one), reconnect by itself with exponential backoff and
// jitter, resubscribe with recovery so that nothing is missed or repeated
// across a reconnect while history covers the gap (and say so when it
// could not), presence, history, publish with a promise of the server's
// ack, and events for the UI.
//
//   import { Walkie } from '/walkie.js';
//   const walkie = new Walkie('ws://127.0.0.1:3000/ws');
//   const chat = walkie.subscribe('rooms:lobby', { history: 50 });
//   chat.addEventListener('publication', (e) => show(e.detail.data));
//   walkie.addEventListener('state', (e) => status(e.detail.state));
//   walkie.connect();
//   await chat.publish({ text: 'hi' });

const PROTOCOL = 'walkie.v1';

/** Close codes after which reconnecting cannot help (docs/protocol.md). */
const FINAL_CODES = new Set([1000, 1009, 4000, 4009]);

/** An error reply from the server: `code` as in docs/protocol.md. */
export class WalkieError extends Error {
  constructor(code, message) {
    super(message);
    this.name = 'WalkieError';
    this.code = code;
  }
}

// When to refresh a token the server says expires in `expiresIn` seconds:
// at 80 % of its life, counted from a second less, as the server counts
// whole seconds of its clock (a token may have less than `expiresIn`
// left) and refuses every command once `exp` has passed.
function refreshDelay(expiresIn) {
  return Math.max(500, (expiresIn - 1) * 800);
}

function event(type, detail) {
  return new CustomEvent(type, { detail });
}

/**
 * One channel subscription. Events: `publication`, `join`, `leave`,
 * `subscribed` ({ recovered, offset, epoch, history }), `recovery_failed`
 * ({ offset, epoch }: history no longer covered the gap), `unsubscribed`,
 * `error` (WalkieError).
 */
export class Subscription extends EventTarget {
  constructor(client, channel, options) {
    super();
    this.client = client;
    this.channel = channel;
    this.options = options;
    /** The last position seen: what a reconnect recovers from. */
    this.offset = null;
    this.epoch = null;
    this.active = true;
    this.subscribed = false;
  }

  /** Publishes to this channel; resolves with { offset, epoch, duplicate }. */
  publish(data, options) {
    return this.client.publish(this.channel, data, options);
  }

  presence() {
    return this.client.presence(this.channel);
  }

  presenceStats() {
    return this.client.presenceStats(this.channel);
  }

  history(options) {
    return this.client.history(this.channel, options);
  }

  /** Leaves the channel for good. */
  unsubscribe() {
    if (!this.active) return;
    this.active = false;
    this.client._forget(this);
    if (this.subscribed && this.client.state === 'connected') {
      this.client._call('unsubscribe', { channel: this.channel }).catch(() => {});
    }
    this.subscribed = false;
    this.dispatchEvent(event('unsubscribed', {}));
  }

  _params() {
    const p = { channel: this.channel };
    if (this.options.token) p.token = this.options.token;
    if (this.epoch !== null) {
      p.recover = true;
      p.offset = this.offset;
      p.epoch = this.epoch;
    } else if (this.options.history) {
      p.history = this.options.history;
    }
    return p;
  }

  _subscribed(result, recovering) {
    this.subscribed = true;
    if (recovering && !result.recovered) {
      this.dispatchEvent(event('recovery_failed', { offset: this.offset, epoch: this.epoch }));
    }
    if (!recovering || !result.recovered || this.epoch !== result.epoch) {
      this.offset = result.offset - (result.history || 0);
      this.epoch = result.epoch;
    }
    this.dispatchEvent(event('subscribed', result));
  }

  _push(kind, body) {
    if (kind === 'pub') {
      // A safety net: never hand the application a message twice.
      if (body.offset > 0 && this.offset !== null && body.offset <= this.offset) return;
      if (body.offset > 0) this.offset = body.offset;
      this.dispatchEvent(event('publication', body));
    } else if (kind === 'epoch') {
      // History was lost: offsets start again in a new epoch.
      this.dispatchEvent(event('recovery_failed', { offset: this.offset, epoch: this.epoch }));
      this.offset = 0;
      this.epoch = body.epoch;
    } else if (kind === 'unsubscribe') {
      this.subscribed = false;
      this.dispatchEvent(event('error', new WalkieError(body.code, body.reason)));
    } else {
      this.dispatchEvent(event(kind, body.info));
    }
  }
}

/**
 * A connection to a walkie server that keeps itself connected.
 *
 * Options: `token` (a JWT), `getToken` (async () => JWT: called to connect
 * and before the token expires), `name`, `minDelay` / `maxDelay` (backoff
 * in ms, default 500 / 20000).
 *
 * Events: `state` ({ state, previous }: 'disconnected', 'connecting',
 * 'connected'), `connected` (the connect result), `disconnected` ({ code,
 * reason, reconnect }), `error` (WalkieError or Error).
 */
export class Walkie extends EventTarget {
  constructor(url, options = {}) {
    super();
    this.url = url;
    this.options = options;
    this.state = 'disconnected';
    this.client = null;
    this.user = null;
    this._ws = null;
    this._nextId = 1;
    this._pending = new Map();
    this._subs = new Map();
    this._outbox = [];
    this._attempts = 0;
    this._timer = null;
    this._refreshTimer = null;
    this._wanted = false;
    this._keyPrefix = Math.random().toString(36).slice(2, 10);
    this._keyCounter = 0;
  }

  /** Starts connecting (and keeps reconnecting until `disconnect`). */
  connect() {
    this._wanted = true;
    if (this.state === 'disconnected') this._open();
  }

  /** Closes the connection and stops reconnecting. */
  disconnect() {
    this._wanted = false;
    clearTimeout(this._timer);
    clearTimeout(this._refreshTimer);
    if (this._ws) this._ws.close(1000, 'bye');
    this._setState('disconnected');
  }

  /** A subscription; it (re)subscribes whenever the client is connected. */
  subscribe(channel, options = {}) {
    if (this._subs.has(channel)) return this._subs.get(channel);
    const sub = new Subscription(this, channel, options);
    this._subs.set(channel, sub);
    if (this.state === 'connected') this._resubscribe(sub);
    return sub;
  }

  /**
   * Publishes; resolves with { offset, epoch, duplicate } once the server
   * stored it. Waits for a connection, and retries across reconnects with
   * the same idempotency key, so the message is delivered once. For
   * messages that are stale a moment later (positions), pass
   * `{ retry: false, idempotencyKey: false }`: no retry, no key to store.
   */
  publish(channel, data, options = {}) {
    const params = { channel, data };
    if (options.idempotencyKey !== false) {
      params.idempotency_key =
        options.idempotencyKey || `${this._keyPrefix}-${Date.now().toString(36)}-${++this._keyCounter}`;
    }
    if (options.key) params.key = options.key;
    const retry = options.retry !== false;
    if (!retry && this.state !== 'connected') {
      return Promise.reject(new WalkieError(0, 'not connected'));
    }
    return this._call('publish', params, { retry });
  }

  presence(channel) {
    return this._call('presence', { channel }).then((r) => r.clients);
  }

  presenceStats(channel) {
    return this._call('presence_stats', { channel });
  }

  history(channel, options = {}) {
    const params = { channel };
    if (options.since) params.since = options.since;
    if (options.limit !== undefined) params.limit = options.limit;
    if (options.reverse) params.reverse = true;
    return this._call('history', params);
  }

  _forget(sub) {
    this._subs.delete(sub.channel);
  }

  _setState(state) {
    if (state === this.state) return;
    const previous = this.state;
    this.state = state;
    this.dispatchEvent(event('state', { state, previous }));
  }

  async _token() {
    if (this.options.getToken) return this.options.getToken();
    return this.options.token;
  }

  async _open() {
    this._setState('connecting');
    let token;
    try {
      token = await this._token();
    } catch (e) {
      this.dispatchEvent(event('error', e));
      this._scheduleReconnect();
      return;
    }
    if (!this._wanted) return;
    const ws = new WebSocket(this.url, PROTOCOL);
    this._ws = ws;
    ws.onopen = () => {
      const params = {};
      if (token) params.token = token;
      if (this.options.name) params.name = this.options.name;
      this._send('connect', params)
        .then((result) => this._connected(result))
        .catch((e) => this.dispatchEvent(event('error', e)));
    };
    ws.onmessage = (m) => this._message(m.data);
    ws.onclose = (e) => this._closed(ws, e.code, e.reason);
    ws.onerror = () => {};
  }

  _connected(result) {
    this._attempts = 0;
    this.client = result.client;
    this.user = result.user;
    this._setState('connected');
    this.dispatchEvent(event('connected', result));
    if (result.expires_in !== undefined && this.options.getToken) {
      clearTimeout(this._refreshTimer);
      this._refreshTimer = setTimeout(() => this._refresh(), refreshDelay(result.expires_in));
    }
    for (const sub of this._subs.values()) this._resubscribe(sub);
    const outbox = this._outbox;
    this._outbox = [];
    for (const item of outbox) this._dispatch(item);
  }

  async _refresh() {
    try {
      const token = await this._token();
      const r = await this._call('refresh', { token });
      if (r.expires_in !== undefined) {
        this._refreshTimer = setTimeout(() => this._refresh(), refreshDelay(r.expires_in));
      }
    } catch (e) {
      this.dispatchEvent(event('error', e));
    }
  }

  _resubscribe(sub) {
    const params = sub._params();
    const recovering = params.recover === true;
    this._send('subscribe', params)
      .then((result) => sub._subscribed(result, recovering))
      .catch((e) => sub.dispatchEvent(event('error', e)));
  }

  _closed(ws, code, reason) {
    if (ws !== this._ws) return;
    this._ws = null;
    clearTimeout(this._refreshTimer);
    for (const sub of this._subs.values()) sub.subscribed = false;
    // Commands in flight: a retried publish goes back to the outbox (same
    // idempotency key); anything else fails.
    for (const item of this._pending.values()) {
      if (item.retry) this._outbox.push(item);
      else item.reject(new WalkieError(0, `connection closed (${code})`));
    }
    this._pending.clear();
    // A refused or expired token is final, unless there is a way to get a
    // fresh one.
    const tokenProblem = code === 4001 || code === 4002;
    const final = tokenProblem ? !this.options.getToken : FINAL_CODES.has(code);
    const reconnect = this._wanted && !final;
    this.dispatchEvent(event('disconnected', { code, reason, reconnect }));
    if (reconnect) {
      this._scheduleReconnect();
    } else {
      this._wanted = false;
      this._setState('disconnected');
    }
  }

  _scheduleReconnect() {
    this._setState('connecting');
    const min = this.options.minDelay ?? 500;
    const max = this.options.maxDelay ?? 20000;
    const base = Math.min(max, min * 2 ** this._attempts);
    this._attempts += 1;
    // Full jitter: many clients of a restarted server do not come back at once.
    const delay = base / 2 + Math.random() * (base / 2);
    clearTimeout(this._timer);
    this._timer = setTimeout(() => {
      if (this._wanted) this._open();
    }, delay);
  }

  /** Sends a command when connected, or queues it until then. */
  _call(method, params, { retry = false } = {}) {
    return new Promise((resolve, reject) => {
      const item = { method, params, resolve, reject, retry };
      if (this.state === 'connected') this._dispatch(item);
      else this._outbox.push(item);
    });
  }

  /** Sends a command on the open socket (connect and subscribe use it directly). */
  _send(method, params) {
    return new Promise((resolve, reject) => {
      this._dispatch({ method, params, resolve, reject, retry: false });
    });
  }

  _dispatch(item) {
    const ws = this._ws;
    if (!ws || ws.readyState !== WebSocket.OPEN) {
      if (item.retry) this._outbox.push(item);
      else item.reject(new WalkieError(0, 'not connected'));
      return;
    }
    const id = this._nextId++;
    this._pending.set(id, item);
    ws.send(JSON.stringify({ id, [item.method]: item.params }));
  }

  _message(data) {
    let msg;
    try {
      msg = JSON.parse(data);
    } catch {
      return;
    }
    if (msg.id !== undefined) {
      const item = this._pending.get(msg.id);
      if (!item) return;
      this._pending.delete(msg.id);
      if (msg.error) item.reject(new WalkieError(msg.error.code, msg.error.message));
      else item.resolve(msg.result);
      return;
    }
    for (const kind of ['pub', 'join', 'leave', 'unsubscribe', 'epoch']) {
      const body = msg[kind];
      if (!body) continue;
      const sub = this._subs.get(body.channel);
      if (sub) sub._push(kind, body);
    }
  }
}
