// Type declarations for walkie.js (served at /walkie.js and /walkie.d.ts).
// The protocol behind them: docs/protocol.md.

/** Who published, or who joined or left. */
export interface ClientInfo {
  user: string;
  client: string;
  /** The `info` claim of the client's token, if any. */
  info?: Record<string, unknown>;
}

/** A message on a channel. Exactly one of data, text, base64 is set. */
export interface Publication {
  channel: string;
  /** 1, 2, 3... in channels with history; 0 otherwise. */
  offset: number;
  /** A JSON value (published through the protocol or the HTTP API). */
  data?: unknown;
  /** Text sent by a member of a room by URL. */
  text?: string;
  /** Binary data sent by a member of a room by URL, base64-encoded. */
  base64?: string;
  /** Absent for messages from the HTTP API. */
  info?: ClientInfo;
  /** The state key, in latest-per-key channels. */
  key?: string;
}

export interface SubscribeResult {
  offset: number;
  epoch: string;
  /** Set when the subscription recovered after a reconnect. */
  recovered?: boolean;
  /** How many messages from history follow. */
  history: number;
}

export interface PublishResult {
  offset: number;
  epoch: string;
  /** The idempotency key was seen before: nothing was delivered again. */
  duplicate: boolean;
}

export interface HistoryResult {
  offset: number;
  epoch: string;
  publications: Omit<Publication, 'channel'>[];
}

export interface ConnectResult {
  client: string;
  user: string;
  version: string;
  /**
   * Seconds between the server's keepalive pings; absent if it sends none.
   * A browser never sees those pings, so walkie.js sends the `ping` command
   * when the server was silent for longer than this (plus a margin) and
   * reconnects if no answer comes within a few seconds.
   */
  ping_interval?: number;
  expires_in?: number;
}

export type State = 'disconnected' | 'connecting' | 'connected';

export interface WalkieOptions {
  /** A JWT for `connect`. */
  token?: string;
  /**
   * Called for a token to connect with and before the current one expires.
   * After a close for a refused (4001) or expired (4002) token the client
   * reconnects with the token it returns, and stops if that is the same one.
   */
  getToken?: () => Promise<string> | string;
  /**
   * A display name, at most 64 characters: shown to other members as
   * `info.name` in presence and in join/leave events, unless the token
   * has an `info` claim.
   */
  name?: string;
  /**
   * Backoff bounds in milliseconds (default 500 and 20000): the delay before
   * a reconnect doubles with each failed attempt and starts again from
   * `minDelay` only after a connection stayed up for 5 seconds.
   */
  minDelay?: number;
  maxDelay?: number;
}

export interface SubscribeOptions {
  /** Replay the last N messages on the first subscribe. */
  history?: number;
  /** A subscription token (for private channels). */
  token?: string;
}

export interface PublishOptions {
  /** Defaults to a fresh key per call, kept across retries; false: none. */
  idempotencyKey?: string | false;
  /** Retry across reconnects (default true); false fails at once when offline. */
  retry?: boolean;
  /** The state key (latest-per-key namespaces only). */
  key?: string;
}

export interface HistoryOptions {
  since?: { offset: number; epoch: string };
  limit?: number;
  reverse?: boolean;
}

/**
 * An error reply; `code` as in docs/protocol.md. 0: no reply will come (the
 * connection closed, or the client stopped: `disconnect()`, a close after
 * which it does not reconnect); 4001 or 4002 (an `error` event, and the
 * client stops) when getToken returned the token the server had just refused.
 */
export class WalkieError extends Error {
  code: number;
  /**
   * On a failed `publish` that had one: the idempotency key it was sent
   * with. A publish that failed because the connection went may have been
   * stored all the same; retrying with this key cannot deliver it twice.
   */
  idempotencyKey?: string;
}

export class Subscription extends EventTarget {
  readonly channel: string;
  /** The last offset and epoch seen. */
  readonly offset: number | null;
  readonly epoch: string | null;
  /** False once unsubscribed, by `unsubscribe()` or by the server. */
  readonly active: boolean;
  publish(data: unknown, options?: PublishOptions): Promise<PublishResult>;
  presence(): Promise<Record<string, ClientInfo>>;
  presenceStats(): Promise<{ clients: number; users: number }>;
  history(options?: HistoryOptions): Promise<HistoryResult>;
  /** Leaves the channel for good (the client forgets it: `subscribe` makes a new one). */
  unsubscribe(): void;
  addEventListener(type: 'publication', listener: (e: CustomEvent<Publication>) => void): void;
  addEventListener(type: 'join' | 'leave', listener: (e: CustomEvent<ClientInfo>) => void): void;
  addEventListener(type: 'subscribed', listener: (e: CustomEvent<SubscribeResult>) => void): void;
  addEventListener(type: 'recovery_failed', listener: (e: CustomEvent<{ offset: number; epoch: string }>) => void): void;
  /**
   * The subscription is over and forgotten: after `unsubscribe()` (no
   * detail), or when the server refused it or ended it (an `unsubscribe`
   * push: a subscription token expired, say), with the server's code and
   * reason; an `error` event comes first then. It is not retried after a
   * reconnect: subscribe again (with a fresh token, say).
   */
  addEventListener(type: 'unsubscribed', listener: (e: CustomEvent<{ code?: number; reason?: string }>) => void): void;
  addEventListener(type: 'error', listener: (e: CustomEvent<WalkieError>) => void): void;
}

export class Walkie extends EventTarget {
  constructor(url: string, options?: WalkieOptions);
  readonly state: State;
  /** This connection's id and user, once connected. */
  readonly client: string | null;
  readonly user: string | null;
  /** Starts connecting, and keeps reconnecting until `disconnect()` or a final close. */
  connect(): void;
  /**
   * Closes the connection and stops reconnecting. Commands not answered
   * yet, queued publishes included, fail with a WalkieError (code 0);
   * subscriptions are kept for the next `connect()`.
   */
  disconnect(): void;
  subscribe(channel: string, options?: SubscribeOptions): Subscription;
  publish(channel: string, data: unknown, options?: PublishOptions): Promise<PublishResult>;
  presence(channel: string): Promise<Record<string, ClientInfo>>;
  presenceStats(channel: string): Promise<{ clients: number; users: number }>;
  history(channel: string, options?: HistoryOptions): Promise<HistoryResult>;
  addEventListener(type: 'state', listener: (e: CustomEvent<{ state: State; previous: State }>) => void): void;
  addEventListener(type: 'connected', listener: (e: CustomEvent<ConnectResult>) => void): void;
  /**
   * The connection closed. `reconnect`: false when the client stopped for
   * good (`disconnect()`, or a close code after which reconnecting cannot
   * help). Code 1006 with a reason also where the client gave the socket up
   * itself: no answer to `ping`, or no `connect` reply in time.
   */
  addEventListener(
    type: 'disconnected',
    listener: (e: CustomEvent<{ code: number; reason: string; reconnect: boolean }>) => void,
  ): void;
  addEventListener(type: 'error', listener: (e: CustomEvent<Error>) => void): void;
}
