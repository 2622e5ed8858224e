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
//   - a dead connection (the server stopped with SIGSTOP, its sockets still
//     open) is noticed through the `ping` command, and the client comes back
//     once the server runs again.

import { freePort, runTests, startWalkie, waitUntil } from './lib.mjs';

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
