// walkie.js, the browser client library, in a real Chromium against a walkie
// of its own (started here with an API key and a 1 s ping interval):
//   - disconnect() then connect() settles a command in flight and ends
//     connected, also when getToken is slow;
//   - a command queued while the server is unreachable fails on disconnect();
//   - unsubscribe right after subscribe leaves no subscription on the server,
//     and the channel can be subscribed to again;
//   - subscribe, unsubscribe, subscribe again (all at once): the new
//     subscription gets its history once, not the old one's too;
//   - a refused subscription ends with `unsubscribed` and is forgotten;
//   - getToken giving the token the server refused (4001) stops the client;
//   - a token that expires in 40 days, past setTimeout's longest delay, does
//     not make the refresh timer fire at once (no getToken storm): against a
//     second walkie, with --config and an HS256 secret this file signs with;
//   - the reconnect backoff grows across connections that are closed right
//     after `connect` is answered, and starts afresh after one that stayed up
//     more than 5 s: against a stand-in server written here, since walkie
//     has no way to close every connection right after `connect` with a
//     code the client reconnects after (its own such closes, 1013 for a slow
//     consumer or 1001 at shutdown, cannot be timed by a test);
//   - a dead connection (the server stopped with SIGSTOP, its sockets still
//     open) is noticed through the `ping` command, and the client comes back
//     once the server runs again.

import { createHash, createHmac } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { join } from 'node:path';
import { env, freePort, runTests, startWalkie, waitUntil } from './lib.mjs';

const KEY = 'browser-test-key';
const port = await freePort();
const base = `http://127.0.0.1:${port}`;

async function api(method, body) {
  const r = await fetch(`${base}/api/${method}`, {
    method: 'POST',
    headers: { Authorization: `apikey ${KEY}`, 'Content-Type': 'application/json' },
    body: JSON.stringify(body),
  });
  if (!r.ok) throw new Error(`${method}: ${r.status} ${await r.text()}`);
  return r.json();
}

/** An HS256 JWT of `claims`, signed with `secret`. */
function hs256(secret, claims) {
  const part = (value) => Buffer.from(JSON.stringify(value)).toString('base64url');
  const body = `${part({ alg: 'HS256', typ: 'JWT' })}.${part(claims)}`;
  return `${body}.${createHmac('sha256', secret).update(body).digest('base64url')}`;
}

/** A WebSocket frame from the server (unmasked, one fragment). */
function wsFrame(opcode, payload) {
  const head = payload.length < 126 ? Buffer.from([0x80 | opcode, payload.length]) : Buffer.from([0x80 | opcode, 126, 0, 0]);
  if (payload.length >= 126) head.writeUInt16BE(payload.length, 2);
  return Buffer.concat([head, payload]);
}

/** The text of the first whole (masked) frame from the client in `buf`, or null. */
function firstClientFrame(buf) {
  if (buf.length < 2) return null;
  let len = buf[1] & 0x7f;
  let at = 2;
  if (len === 126) {
    if (buf.length < 4) return null;
    len = buf.readUInt16BE(2);
    at = 4;
  } else if (len === 127) {
    if (buf.length < 10) return null;
    len = Number(buf.readBigUInt64BE(2));
    at = 10;
  }
  const mask = buf[1] & 0x80 ? buf.subarray(at, at + 4) : null;
  if (mask) at += 4;
  if (buf.length < at + len) return null;
  const payload = Buffer.from(buf.subarray(at, at + len));
  if (mask) for (let i = 0; i < len; i++) payload[i] ^= mask[i % 4];
  return payload.toString();
}

/**
 * A stand-in for a walkie on 127.0.0.1: it accepts a WebSocket (walkie.v1),
 * answers the first command (`connect`) with a client id, and then closes
 * with 1011 (reconnect later) after `holdMs(n)` ms, n counting connections
 * from 0 (Infinity: never). `conns` gets { opened, closed } (Date.now()) of
 * each: `closed` is when the close frame was sent.
 */
async function closingServer(holdMs) {
  const conns = [];
  const sockets = new Set();
  const timers = new Set();
  const server = createServer((req, res) => res.writeHead(404).end());
  server.on('upgrade', (req, socket) => {
    const n = conns.length;
    const conn = { opened: Date.now(), closed: null };
    conns.push(conn);
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    socket.on('error', () => {});
    const accept = createHash('sha1')
      .update(`${req.headers['sec-websocket-key']}258EAFA5-E914-47DA-95CA-C5AB0DC85B11`)
      .digest('base64');
    socket.write(
      'HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n' +
        `Sec-WebSocket-Accept: ${accept}\r\nSec-WebSocket-Protocol: walkie.v1\r\n\r\n`,
    );
    let buf = Buffer.alloc(0);
    let answered = false;
    socket.on('data', (chunk) => {
      if (answered) return; // the client's close frame, say
      buf = Buffer.concat([buf, chunk]);
      const text = firstClientFrame(buf);
      if (text === null) return;
      answered = true;
      const { id } = JSON.parse(text);
      socket.write(wsFrame(1, Buffer.from(JSON.stringify({ id, result: { client: `stand-in-${n}`, user: '' } }))));
      const close = () => {
        conn.closed = Date.now();
        const payload = Buffer.concat([Buffer.from([0x03, 0xf3]), Buffer.from('closing at once')]); // 1011
        socket.end(wsFrame(8, payload));
      };
      const hold = holdMs(n);
      if (hold === 0) close();
      else if (Number.isFinite(hold)) {
        const timer = setTimeout(() => {
          timers.delete(timer);
          close();
        }, hold);
        timers.add(timer);
      }
    });
  });
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', resolve);
  });
  return {
    port: server.address().port,
    conns,
    close() {
      for (const timer of timers) clearTimeout(timer);
      for (const socket of sockets) socket.destroy();
      return new Promise((resolve) => server.close(resolve));
    },
  };
}

await runTests(
  async (checks, { page }, onCleanup) => {
    let walkie;
    let stopped = false;
    onCleanup(async () => {
      if (stopped) process.kill(walkie.pid, 'SIGCONT');
      await walkie?.stop();
    });

    await checks.check(`a walkie with a 1 s ping interval starts on port ${port}`, async () => {
      walkie = await startWalkie(port, 'walkie-js', ['--api-key', KEY, '--ping-interval', '1s']);
      await page.goto(`${base}/walkie.d.ts`);
      // Helpers for the checks below, in the page.
      await page.evaluate(async () => {
        window.W = await import('/walkie.js');
        window.wsUrl = `ws://${location.host}/ws`;
        window.sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
        window.until = async (fn, ms, what) => {
          const end = performance.now() + ms;
          while (!fn()) {
            if (performance.now() > end) throw new Error(`${typeof what === 'function' ? what() : what}: not after ${ms} ms`);
            await sleep(20);
          }
        };
        // Watches a promise: { done, value } or { done, error }.
        window.watch = (promise) => {
          const s = { done: false };
          promise.then(
            (value) => Object.assign(s, { done: true, value }),
            (e) => Object.assign(s, { done: true, error: { name: e?.name, code: e?.code, message: e?.message } }),
          );
          return s;
        };
        window.connected = async (options = {}, url = wsUrl) => {
          const w = new W.Walkie(url, options);
          w.connect();
          await until(() => w.state === 'connected', 5000, () => `connected (state ${w.state})`);
          return w;
        };
        window.once = (target, type, ms) =>
          new Promise((resolve, reject) => {
            const timer = setTimeout(() => reject(new Error(`no ${type} event within ${ms} ms`)), ms);
            target.addEventListener(type, (e) => {
              clearTimeout(timer);
              resolve(e.detail);
            }, { once: true });
          });
      });
    });

    await checks.check('disconnect() then connect() at once: a publish in flight settles, and the client ends connected', () =>
      page.evaluate(async () => {
        const w = await connected();
        const p = watch(w.publish('chat:js-reconnect', { n: 1 }));
        w.disconnect();
        w.connect();
        await until(() => p.done && w.state === 'connected', 5000, () => `publish ${JSON.stringify(p)}, state ${w.state}`);
        const r = await w.publish('chat:js-reconnect', { n: 2 });
        w.disconnect();
        return `the publish ${p.error ? `failed (${p.error.message})` : 'was delivered'}; the next got offset ${r.offset}`;
      }),
      { blocking: false },
    );

    await checks.check('disconnect() then connect() with a slow getToken ends connected', () =>
      page.evaluate(async () => {
        let calls = 0;
        const getToken = async () => {
          calls++;
          await sleep(300);
          return undefined; // anonymous
        };
        const w = await connected({ getToken });
        const states = [];
        w.addEventListener('state', (e) => states.push(e.detail.state));
        w.disconnect();
        w.connect();
        // The old socket's close (1000) arrives while the token is fetched.
        await sleep(1000);
        const state = w.state;
        w.disconnect();
        if (state !== 'connected') throw new Error(`state ${state}; states ${states.join(', ')}; ${calls} tokens`);
      }),
      { blocking: false },
    );

    await checks.check('a publish queued while the server is unreachable fails on disconnect()', async () => {
      const nowhere = await freePort();
      return page.evaluate(async (nowhere) => {
        const w = new W.Walkie(`ws://127.0.0.1:${nowhere}/ws`, { minDelay: 100 });
        w.connect();
        const p = watch(w.publish('chat:js-nowhere', 1));
        await sleep(300);
        w.disconnect();
        await until(() => p.done, 2000, 'the queued publish settling');
        if (p.error?.name !== 'WalkieError') throw new Error(JSON.stringify(p));
        if (w.state !== 'disconnected') throw new Error(`state ${w.state}`);
        return p.error.message;
      }, nowhere);
    }, { blocking: false });

    await checks.check('unsubscribe right after subscribe leaves no subscription on the server; subscribing again works', async () => {
      const channel = 'chat:js-unsub';
      const client = await page.evaluate(async (channel) => {
        const w = await connected({ name: 'unsub' });
        window.unsubClient = w;
        const s = w.subscribe(channel);
        s.unsubscribe();
        await w.presence(channel); // answered after the two commands before it
        return w.client;
      }, channel);
      const { clients } = await api('presence', { channel });
      if (client in clients) throw new Error(`the server still has ${client} in ${channel}: ${JSON.stringify(clients)}`);
      return page.evaluate(async (channel) => {
        const w = window.unsubClient;
        const s = w.subscribe(channel);
        const got = [];
        s.addEventListener('publication', (e) => got.push(e.detail.data));
        const failed = once(s, 'error', 3000).then((e) => { throw new Error(`subscribe again: ${e.message}`); }, () => {});
        await Promise.race([once(s, 'subscribed', 3000), failed]);
        await w.publish(channel, 'again');
        await until(() => got.length > 0, 3000, 'the publication');
        await sleep(200);
        w.disconnect();
        if (JSON.stringify(got) !== '["again"]') throw new Error(`got ${JSON.stringify(got)}`);
      }, channel);
    }, { blocking: false });

    await checks.check('subscribe, unsubscribe, subscribe again at once: the history comes once', () =>
      page.evaluate(async () => {
        const channel = 'chat:js-history';
        const w = await connected();
        for (const n of [1, 2, 3]) await w.publish(channel, n);
        const first = w.subscribe(channel, { history: 10 });
        first.unsubscribe();
        const second = w.subscribe(channel, { history: 10 });
        if (second === first) throw new Error('subscribe returned the unsubscribed subscription');
        const got = [];
        second.addEventListener('publication', (e) => got.push(e.detail.offset));
        const errors = [];
        second.addEventListener('error', (e) => errors.push(e.detail.message));
        await until(() => got.length >= 3 || errors.length, 3000, () => `3 publications (got ${JSON.stringify(got)})`);
        await sleep(500);
        w.disconnect();
        if (errors.length) throw new Error(`errors: ${errors.join('; ')}; got ${JSON.stringify(got)}`);
        if (JSON.stringify(got) !== '[1,2,3]') throw new Error(`offsets ${JSON.stringify(got)}`);
      }),
      { blocking: false },
    );

    await checks.check('a refused subscription ends with `unsubscribed` and is forgotten', () =>
      page.evaluate(async () => {
        const w = await connected();
        const s = w.subscribe('nope:js');
        const detail = await once(s, 'unsubscribed', 3000);
        if (detail.code !== 102) throw new Error(`unsubscribed ${JSON.stringify(detail)}`);
        if (s.active) throw new Error('still active');
        const again = w.subscribe('nope:js');
        again.unsubscribe();
        w.disconnect();
        if (again === s) throw new Error('subscribe returned the refused subscription');
      }),
      { blocking: false },
    );

    await checks.check('getToken giving the refused token (4001) again stops the client', () =>
      page.evaluate(async () => {
        let calls = 0;
        const w = new W.Walkie(wsUrl, { getToken: () => (calls++, 'not-a-jwt'), minDelay: 100 });
        const closes = [];
        const errors = [];
        w.addEventListener('disconnected', (e) => closes.push(e.detail.code));
        w.addEventListener('error', (e) => errors.push(e.detail.code));
        const p = watch(w.publish('chat:js-refused', 1));
        w.connect();
        await until(() => w.state === 'disconnected' && closes.length > 0, 3000, () => `stopping (state ${w.state}, closes ${closes}, ${calls} tokens)`);
        await sleep(200);
        w.disconnect();
        if (calls !== 2 || JSON.stringify(closes) !== '[4001]' || !errors.includes(4001) || !p.error) {
          throw new Error(JSON.stringify({ calls, closes, errors, publish: p }));
        }
      }),
      { blocking: false },
    );

    // refreshDelay() clamps to setTimeout's longest delay, 2^31 - 1 ms (24.8
    // days): a token with 40 days left would otherwise ask for (40 days - 1 s)
    // * 0.8 = 2.76e9 ms, which setTimeout takes modulo 2^32 (WebIDL `long`) as
    // a negative delay, that is 0: the refresh would fire at once, its reply
    // (40 days again) schedule the next at once, and so on: getToken called
    // over and over. Clamped, getToken is called once, to connect.
    await checks.check('a token expiring in 40 days (past setTimeout\'s limit) does not make walkie.js refresh at once', async () => {
      const secret = 'walkie-js-clamp-secret';
      const config = join(env('BROWSER_TEST_RUN'), 'walkie-js-clamp.toml');
      writeFileSync(config, `[auth]\nhmac_secret = "${secret}"\n`);
      const clampPort = await freePort();
      const clampWalkie = await startWalkie(clampPort, 'walkie-js-clamp', ['--config', config]);
      onCleanup(() => clampWalkie.stop());
      try {
        const token = hs256(secret, { sub: 'clamp', exp: Math.floor(Date.now() / 1000) + 40 * 86400 });
        const r = await page.evaluate(
          async ({ url, token }) => {
            let calls = 0;
            const errors = [];
            const closes = [];
            let expiresIn;
            const w = new W.Walkie(url, {
              getToken: async () => {
                calls++;
                return token;
              },
            });
            w.addEventListener('connected', (e) => (expiresIn = e.detail.expires_in));
            w.addEventListener('error', (e) => errors.push(e.detail?.message ?? String(e.detail)));
            w.addEventListener('disconnected', (e) => closes.push(e.detail.code));
            w.connect();
            await until(() => w.state === 'connected', 5000, () => `connected (state ${w.state}, errors ${errors})`);
            await sleep(2000);
            const state = w.state;
            const result = { calls, expiresIn, state, errors, closes: [...closes] };
            w.disconnect();
            return result;
          },
          { url: `ws://127.0.0.1:${clampPort}/ws`, token },
        );
        // The case the clamp is for: the delay unclamped would be past
        // setTimeout's limit and would wrap to 0 or less.
        const unclamped = (r.expiresIn - 1) * 800;
        if (!(unclamped > 2 ** 31 - 1 && (unclamped | 0) <= 0)) {
          throw new Error(`expires_in ${r.expiresIn}: not a delay setTimeout would fire at once (${JSON.stringify(r)})`);
        }
        if (r.calls !== 1 || r.state !== 'connected' || r.errors.length || r.closes.length) {
          throw new Error(`getToken called ${r.calls} times in 2 s (once expected): ${JSON.stringify(r)}`);
        }
        return `expires_in ${r.expiresIn} s; getToken called once in 2 s, still connected`;
      } finally {
        await clampWalkie.stop();
      }
    }, { timeout: 30_000, blocking: false });

    // The backoff (minDelay 100: a delay between half of 100 * 2^k ms and all
    // of it after the k-th failure in a row) is reset only by a connection
    // that stayed up STABLE_AFTER (5 s). Against a server that answers
    // `connect` and closes at once, the delay before connection k + 1 is at
    // least 50 * 2^k ms: were the backoff reset by every answered `connect`,
    // each would stay between 50 and 100 ms. After 6 such closes, one
    // connection stays up 6 s: the next delay is again 50 to 100 ms; were
    // the backoff never reset it would be at least 3200 ms.
    await checks.check('reconnect backoff grows across connections closed at once, and starts afresh after one up for 5 s', async () => {
      const QUICK = 6;
      const stand = await closingServer((n) => (n < QUICK ? 0 : n === QUICK ? 6000 : Infinity));
      onCleanup(() => stand.close());
      try {
        await page.evaluate((url) => {
          const w = new W.Walkie(url, { minDelay: 100 });
          window.backoff = { w, connected: 0, closes: [] };
          w.addEventListener('connected', () => backoff.connected++);
          w.addEventListener('disconnected', (e) => backoff.closes.push(`${e.detail.code}${e.detail.reconnect ? '' : ' (final)'}`));
          w.connect();
        }, `ws://127.0.0.1:${stand.port}/ws`);
        const seen = () => page.evaluate(() => ({ connected: backoff.connected, closes: backoff.closes, state: backoff.w.state }));
        // Quick phase: at most 100 + 200 + ... + 3200 = 6.3 s of delays; then 6 s up.
        await waitUntil(async () => (await seen()).connected >= QUICK + 2, 25_000, `${QUICK + 2} connections answered`).catch(async (e) => {
          throw new Error(`${e.message}: ${stand.conns.length} accepted, page ${JSON.stringify(await seen())}`);
        });
        const client = await page.evaluate(() => {
          const r = { connected: backoff.connected, closes: [...backoff.closes] };
          backoff.w.disconnect();
          return r;
        });
        const { conns } = stand;
        const gaps = [];
        for (let k = 0; k <= QUICK; k++) gaps.push(conns[k + 1].opened - conns[k].closed);
        const detail = `delays after each close ${gaps.join(', ')} ms; held ${conns[QUICK].closed - conns[QUICK].opened} ms; page ${JSON.stringify(client)}`;
        const closes = client.closes.slice(0, QUICK + 1);
        if (closes.length !== QUICK + 1 || closes.some((c) => c !== '1011')) throw new Error(`closes seen by the page: ${detail}`);
        for (let k = 0; k < QUICK; k++) {
          // The delay is timed from the close event, which comes after the
          // server sent the close: a strict lower bound (5 ms for clocks).
          if (gaps[k] < 50 * 2 ** k - 5) throw new Error(`delay ${k + 1} below ${50 * 2 ** k} ms: the backoff did not grow; ${detail}`);
        }
        if (gaps[QUICK] >= 2000) throw new Error(`the delay after a connection up 6 s is ${gaps[QUICK]} ms: the backoff did not start afresh; ${detail}`);
        return `delays ${gaps.slice(0, QUICK).join(', ')} ms after quick closes; ${gaps[QUICK]} ms after one up 6 s`;
      } finally {
        await stand.close();
      }
    }, { timeout: 40_000, blocking: false });

    await checks.check(
      'a dead connection (server stopped by SIGSTOP) is noticed by pinging, and the client recovers after SIGCONT',
      async () => {
        const channel = 'chat:js-dead';
        await page.evaluate(async (channel) => {
          const w = await connected();
          window.dead = { w, closes: [], got: [] };
          w.addEventListener('disconnected', (e) => dead.closes.push(`${e.detail.code} ${e.detail.reason}`));
          const s = w.subscribe(channel);
          s.addEventListener('publication', (e) => dead.got.push(e.detail.data));
          await once(s, 'subscribed', 3000);
          await w.publish(channel, 'before');
          await until(() => dead.got.length === 1, 3000, 'the first publication');
        }, channel);
        process.kill(walkie.pid, 'SIGSTOP');
        stopped = true;
        const started = Date.now();
        // ping_interval 1 s: quiet for 2 s, then 2 s for the ping's reply.
        await page.waitForFunction(() => dead.w.state !== 'connected', undefined, { timeout: 8000 }).catch(async () => {
          throw new Error(`still connected ${Date.now() - started} ms after SIGSTOP`);
        });
        const noticed = Date.now() - started;
        await new Promise((resolve) => setTimeout(resolve, 1000));
        process.kill(walkie.pid, 'SIGCONT');
        stopped = false;
        await page.waitForFunction(() => dead.w.state === 'connected', undefined, { timeout: 15_000 });
        await waitUntil(async () => (await api('presence', { channel })).clients[await page.evaluate(() => dead.w.client)], 5000, 'subscribed again');
        await api('publish', { channel, data: 'after' });
        const result = await page.evaluate(async () => {
          await until(() => dead.got.length >= 2, 5000, () => `the publication after (got ${JSON.stringify(dead.got)})`);
          dead.w.disconnect();
          return dead;
        });
        if (JSON.stringify(result.got) !== '["before","after"]' || !/^1006 no reply to ping/.test(result.closes[0])) {
          throw new Error(JSON.stringify(result));
        }
        return `noticed ${noticed} ms after SIGSTOP (${result.closes[0]})`;
      },
      { timeout: 40_000, blocking: false },
    );
  },
  { ms: 120_000 },
);
