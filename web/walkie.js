// walkie.js: the browser client of the Walkie protocol (docs/protocol.md).
// A dependency-free ES module: connect (with a token, and a callback that
// fetches a fresh one), reconnect by itself with exponential backoff and
// jitter (also when the connection went dead without a close: it pings a
// server that stays silent), resubscribe with recovery so that nothing is
// missed or repeated across a reconnect while history covers the gap (and
// say so when it could not), presence, history, publish with a promise of
// the server's ack, and events for the UI.
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

/** setTimeout's longest delay: a longer one fires at once. */
const MAX_DELAY = 2 ** 31 - 1;

/** A connection that stayed up this long (ms) starts the backoff afresh. */
const STABLE_AFTER = 5000;

/**
 * How long (ms) a socket may take to open and answer `connect` before it is
 * given up and another is tried (the server itself waits 10 s for `connect`).
 */
const CONNECT_TIMEOUT = 15000;

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
// left) and refuses every command once `exp` has passed. At most
// setTimeout's limit (about 24.8 days): a longer delay would fire at once.
function refreshDelay(expiresIn) {
  const ms = (expiresIn - 1) * 800;
  return Math.min(MAX_DELAY, Math.max(500, Number.isFinite(ms) ? ms : MAX_DELAY));
}

// The server pings a quiet connection every `ping_interval` seconds, but a
// browser answers WebSocket pings by itself and never shows them to the
// page. So the client watches for a connection that went dead without a
// close (a laptop's sleep, a dropped network): when nothing at all came
// from the server for `idle` ms it sends the `ping` command, and if nothing
// comes back within `wait` ms it drops the socket and reconnects.
function pingTimes(pingInterval) {
  const ms = pingInterval * 1000;
  return {
    idle: Math.min(MAX_DELAY, ms + Math.min(5000, Math.max(1000, ms / 2))),
    wait: Math.min(5000, Math.max(2000, ms)),
  };
}

function event(type, detail) {
  return new CustomEvent(type, { detail });
}

/**
 * One channel subscription. Events: `publication`, `join`, `leave`,
 * `subscribed` ({ recovered, offset, epoch, history }), `recovery_failed`
 * ({ offset, epoch }: history no longer covered the gap), `unsubscribed`
 * ({ code, reason } when the server refused the subscription or ended it;
 * {} after `unsubscribe()`: either way the subscription is over and the
 * client forgets it), `error` (WalkieError: comes before the
 * `unsubscribed` of a refused or ended subscription).
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
    /** False once unsubscribed (by `unsubscribe()` or by the server). */
    this.active = true;
    /** True between the server's subscribe reply and the connection's end. */
    this.subscribed = false;
    // The socket the last subscribe went out on.
    this._socket = null;
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
    const client = this.client;
    const socket = this._socket;
    this._end();
    // A subscribe sent on this socket is (or will be) a subscription on the
    // server, reply or not yet: the server handles commands in order, so an
    // unsubscribe sent now ends it.
    if (socket && socket === client._ws) {
      client._send('unsubscribe', { channel: this.channel }).catch(() => {});
    }
    this.dispatchEvent(event('unsubscribed', {}));
  }

  _end() {
    this.active = false;
    this.subscribed = false;
    this._socket = null;
    this.client._forget(this);
  }

  /** The server refused the subscription or ended it: forget it. */
  _ended(error) {
    if (!this.active) return;
    this._end();
    this.dispatchEvent(event('error', error));
    this.dispatchEvent(event('unsubscribed', { code: error.code, reason: error.message }));
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
      this._ended(new WalkieError(body.code, body.reason));
    } else {
      this.dispatchEvent(event(kind, body.info));
    }
  }
}

/**
 * A connection to a walkie server that keeps itself connected.
 *
 * Options: `token` (a JWT), `getToken` (async () => JWT: called to connect
 * and before the token expires), `name` (shown to other clients as
 * `info.name` in presence and join/leave, where the token has no `info`),
 * `minDelay` / `maxDelay` (backoff in ms, default 500 / 20000).
 *
 * Events: `state` ({ state, previous }: 'disconnected', 'connecting',
 * 'connected'), `connected` (the connect result), `disconnected` ({ code,
 * reason, reconnect }; code 1006 where the client itself gave the socket up:
 * no answer to `ping`, or no `connect` reply in time), `error` (WalkieError
 * or Error).
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
    // Bumped whenever a connection attempt starts or a socket is dropped:
    // callbacks of an older one (a token fetched, a refresh, a timer) find
    // it changed and do nothing.
    this._gen = 0;
    this._nextId = 1;
    this._pending = new Map();
    this._subs = new Map();
    this._outbox = [];
    this._attempts = 0;
    this._timer = null;
    this._refreshTimer = null;
    this._connectTimer = null;
    this._pingTimer = null;
    this._pongTimer = null;
    this._lastSeen = 0;
    this._connectedAt = 0;
    // True from connect() until the client stops (disconnect(), or a close
    // after which reconnecting cannot help): meanwhile a token is being
    // fetched, a socket is open, or a reconnect is scheduled.
    this._wanted = false;
    this._token = undefined; // the token of the current connection
    this._refused = null; // { token, code } of a 4001 or 4002 close
    this._keyPrefix = Math.random().toString(36).slice(2, 10);
    this._keyCounter = 0;
  }

  /** Starts connecting (and keeps reconnecting until `disconnect`). */
  connect() {
    if (this._wanted) return;
    this._wanted = true;
    this._attempts = 0;
    this._open();
  }

  /**
   * Closes the connection and stops reconnecting. Commands not answered
   * yet (publishes waiting for a connection included) fail with a
   * WalkieError (code 0); subscriptions are kept for the next `connect`.
   */
  disconnect() {
    const hadSocket = this._ws !== null;
    this._stop();
    if (hadSocket && !this._wanted) {
      this.dispatchEvent(event('disconnected', { code: 1000, reason: 'disconnect()', reconnect: false }));
    }
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
   * the same idempotency key, so the message is delivered once; fails if
   * the client stops first (a publish already sent may then have been
   * stored all the same: retry it with the same key, which the error
   * carries as `idempotencyKey`). For messages that are stale a moment later
   * (positions), pass `{ retry: false, idempotencyKey: false }`: no retry,
   * no key to store.
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
    return this._call('publish', params, { retry }).catch((e) => {
      // For a retry that cannot be delivered twice: the key it was sent with.
      if (e instanceof WalkieError && params.idempotency_key) e.idempotencyKey = params.idempotency_key;
      throw e;
    });
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
    if (this._subs.get(sub.channel) === sub) this._subs.delete(sub.channel);
  }

  _setState(state) {
    if (state === this.state) return;
    const previous = this.state;
    this.state = state;
    this.dispatchEvent(event('state', { state, previous }));
  }

  async _getToken() {
    if (this.options.getToken) return this.options.getToken();
    return this.options.token;
  }

  async _open() {
    const gen = ++this._gen;
    this._setState('connecting');
    let token;
    try {
      token = await this._getToken();
    } catch (e) {
      if (gen !== this._gen || !this._wanted) return;
      this.dispatchEvent(event('error', e));
      if (gen === this._gen) this._scheduleReconnect();
      return;
    }
    if (gen !== this._gen || !this._wanted) return;
    if (this._refused && token === this._refused.token) {
      // getToken gave the token the server refused: it would be refused again.
      const { code } = this._refused;
      this._stop(new WalkieError(code, `the server refused the token (close ${code}) and getToken returned it again`));
      return;
    }
    let ws;
    try {
      ws = new WebSocket(this.url, PROTOCOL);
    } catch (e) {
      // A malformed URL, say: trying again cannot help.
      this._stop(e);
      return;
    }
    this._ws = ws;
    this._token = token;
    this._connectTimer = setTimeout(() => this._closed(ws, 1006, 'no connect reply in time'), CONNECT_TIMEOUT);
    ws.onopen = () => {
      const params = {};
      if (token) params.token = token;
      if (this.options.name) params.name = this.options.name;
      this._send('connect', params).then(
        (result) => {
          if (ws === this._ws) this._connected(result);
        },
        (e) => {
          if (ws === this._ws) this.dispatchEvent(event('error', e));
        },
      );
    };
    ws.onmessage = (m) => this._message(m.data);
    ws.onclose = (e) => this._closed(ws, e.code, e.reason);
    ws.onerror = () => {};
  }

  _connected(result) {
    clearTimeout(this._connectTimer);
    this._connectTimer = null;
    this._connectedAt = Date.now();
    this._refused = null;
    this.client = result.client;
    this.user = result.user;
    if (result.expires_in !== undefined && this.options.getToken) this._scheduleRefresh(result.expires_in);
    if (typeof result.ping_interval === 'number' && result.ping_interval > 0) {
      this._pingTimes = pingTimes(result.ping_interval);
      this._lastSeen = performance.now();
      this._watch(this._gen);
    }
    // Subscriptions and queued commands first, in the order they were made;
    // then the events (whose listeners may subscribe, publish, disconnect).
    for (const sub of [...this._subs.values()]) this._resubscribe(sub);
    const outbox = this._outbox;
    this._outbox = [];
    for (const item of outbox) this._dispatch(item);
    const gen = this._gen;
    this._setState('connected');
    if (gen === this._gen) this.dispatchEvent(event('connected', result));
  }

  _scheduleRefresh(expiresIn) {
    clearTimeout(this._refreshTimer);
    const gen = this._gen;
    this._refreshTimer = setTimeout(() => this._refresh(gen), refreshDelay(expiresIn));
  }

  async _refresh(gen) {
    try {
      const token = await this._getToken();
      if (gen !== this._gen) return; // the connection it was for is gone
      const r = await this._send('refresh', { token });
      if (gen !== this._gen) return;
      this._token = token;
      if (r.expires_in !== undefined) this._scheduleRefresh(r.expires_in);
    } catch (e) {
      if (gen === this._gen) this.dispatchEvent(event('error', e));
    }
  }

  /** Every so often: has the server sent anything lately? If not, ask. */
  _watch(gen) {
    if (gen !== this._gen) return;
    const { idle, wait } = this._pingTimes;
    const quiet = performance.now() - this._lastSeen;
    if (quiet < idle) {
      this._pingTimer = setTimeout(() => this._watch(gen), idle - quiet);
      return;
    }
    const ws = this._ws;
    this._send('ping', {}).catch(() => {});
    // Any message from the server clears it (see _message). One already
    // running is left to fire: `wait` may be longer than `idle`.
    if (this._pongTimer === null) {
      this._pongTimer = setTimeout(() => this._closed(ws, 1006, 'no reply to ping'), wait);
    }
    this._pingTimer = setTimeout(() => this._watch(gen), idle);
  }

  _resubscribe(sub) {
    const ws = this._ws;
    if (!ws || !sub.active || sub._socket === ws) return;
    sub._socket = ws;
    sub.subscribed = false; // pushes are dropped until the reply
    const params = sub._params();
    const recovering = params.recover === true;
    this._send('subscribe', params).then(
      (result) => {
        if (sub._socket === ws && sub.active) sub._subscribed(result, recovering);
      },
      (e) => {
        if (sub._socket !== ws || !sub.active) return;
        // Refused by the server: it would be refused after every reconnect
        // too. (Code 0: the connection went; it subscribes on the next.)
        if (e.code) sub._ended(e);
        else sub.dispatchEvent(event('error', e));
      },
    );
  }

  /**
   * Drops the current socket at once: its handlers go, it is closed, its
   * timers stop, and the commands it had in flight are returned.
   */
  _detach() {
    const ws = this._ws;
    this._ws = null;
    this._gen++;
    for (const timer of ['_refreshTimer', '_connectTimer', '_pingTimer', '_pongTimer']) {
      clearTimeout(this[timer]);
      this[timer] = null;
    }
    this._connectedAt = 0;
    for (const sub of this._subs.values()) {
      sub.subscribed = false;
      sub._socket = null;
    }
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      if (ws.readyState === WebSocket.OPEN) ws.close(1000, 'bye');
      else if (ws.readyState === WebSocket.CONNECTING) ws.onopen = () => ws.close(1000, 'bye');
    }
    const pending = [...this._pending.values()];
    this._pending.clear();
    return pending;
  }

  /**
   * Stops for good (until the next `connect`): no socket, no reconnect, and
   * every command not answered yet fails.
   */
  _stop(error) {
    this._wanted = false;
    clearTimeout(this._timer);
    this._timer = null;
    const failed = [...this._detach(), ...this._outbox];
    this._outbox = [];
    const gen = this._gen;
    if (error) this.dispatchEvent(event('error', error));
    for (const item of failed) item.reject(new WalkieError(0, 'disconnected'));
    if (gen === this._gen) this._setState('disconnected');
  }

  _closed(ws, code, reason) {
    if (ws !== this._ws) return;
    const stable = this._connectedAt !== 0 && Date.now() - this._connectedAt >= STABLE_AFTER;
    const pending = this._detach();
    if (stable) this._attempts = 0;
    const tokenProblem = code === 4001 || code === 4002;
    if (tokenProblem) this._refused = { token: this._token, code };
    // A refused or expired token is final, unless there is a way to get a
    // fresh one.
    const final = tokenProblem ? !this.options.getToken : FINAL_CODES.has(code);
    const reconnect = this._wanted && !final;
    // Commands in flight: a retried publish goes back to the outbox, ahead
    // of those queued after it (same idempotency key); anything else fails,
    // and so does everything once the client stops.
    const failed = [];
    const retried = [];
    for (const item of pending) (reconnect && item.retry ? retried : failed).push(item);
    this._outbox = [...retried, ...this._outbox];
    if (!reconnect) {
      this._wanted = false;
      failed.push(...this._outbox);
      this._outbox = [];
    }
    const gen = this._gen;
    this.dispatchEvent(event('disconnected', { code, reason, reconnect }));
    for (const item of failed) item.reject(new WalkieError(0, `connection closed (${code})`));
    if (gen !== this._gen) return; // a listener called connect() or disconnect()
    if (reconnect) this._scheduleReconnect();
    else this._setState('disconnected');
  }

  _scheduleReconnect() {
    if (!this._wanted) return;
    const min = this.options.minDelay ?? 500;
    const max = this.options.maxDelay ?? 20000;
    const base = Math.min(max, min * 2 ** this._attempts);
    this._attempts = Math.min(this._attempts + 1, 30);
    // Equal jitter: a delay between half the backoff and all of it, so that
    // the many clients of a restarted server do not all come back at once.
    const delay = Math.min(MAX_DELAY, base / 2 + Math.random() * (base / 2));
    clearTimeout(this._timer);
    const gen = this._gen;
    this._timer = setTimeout(() => {
      this._timer = null;
      if (this._wanted && gen === this._gen) this._open();
    }, delay);
    this._setState('connecting');
  }

  /** Sends a command when connected, or queues it until then. */
  _call(method, params, { retry = false } = {}) {
    return new Promise((resolve, reject) => {
      const item = { method, params, resolve, reject, retry };
      if (this.state === 'connected') this._dispatch(item);
      else this._outbox.push(item);
    });
  }

  /**
   * Sends a command on the open socket, or fails at once (connect,
   * subscribe, unsubscribe, refresh and ping belong to one connection).
   */
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
    // Anything from the server shows the connection is alive.
    this._lastSeen = performance.now();
    if (this._pongTimer !== null) {
      clearTimeout(this._pongTimer);
      this._pongTimer = null;
    }
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
      // Until its subscribe reply, pushes for the channel belong to an
      // earlier subscription (the server sends a subscription's reply
      // before any of its pushes).
      if (sub && sub.subscribed) sub._push(kind, body);
    }
  }
}
