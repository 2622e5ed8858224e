// The demo pages (web/demos/, on walkie.js) in a real Chromium, against a
// walkie of their own (started here with an API key, durable history):
//   - every demo page loads with no console error, and a screenshot of each
//     is saved (docs/screenshots/ holds the README's copies);
//   - two chat pages see each other's messages and each other in the
//     member list;
//   - a notification published over HTTP pops up in the user's page;
//   - the server is stopped and restarted under an open chat page: the page
//     says it is reconnecting, comes back by itself, and shows every message
//     published while it was away, once each, in order.

import { join } from 'node:path';
import { collectErrors, freePort, isListening, outDir, runTests, sleep, startWalkie, waitUntil } from './lib.mjs';

const KEY = 'browser-test-key';
const port = await freePort();
const base = `http://127.0.0.1:${port}`;
const args = ['--api-key', KEY];

async function publish(channel, data, extra = {}) {
  const r = await fetch(`${base}/api/publish`, {
    method: 'POST',
    headers: { Authorization: `apikey ${KEY}`, 'Content-Type': 'application/json' },
    body: JSON.stringify({ channel, data, ...extra }),
  });
  if (!r.ok) throw new Error(`publish to ${channel}: ${r.status} ${await r.text()}`);
  return r.json();
}

const connected = (page) =>
  page.waitForFunction(() => document.getElementById('status')?.textContent === 'connected', undefined, {
    timeout: 15_000,
  });
const messages = (page) => page.$$eval('#messages .msg', (els) => els.map((e) => e.textContent));
const members = (page) => page.$$eval('#members li', (els) => els.map((e) => e.textContent));

await runTests(
  async (checks, { context, page }, onCleanup) => {
    let walkie = await checks.check(`a walkie for the demos starts on port ${port}`, async () => {
      const w = await startWalkie(port, 'demos', args);
      return w;
    });
    onCleanup(() => walkie?.stop());

    const screenshot = (p, name) => p.screenshot({ path: join(outDir(), `demo-${name}.png`) });

    const alice = page;
    const bob = await context.newPage();
    const aliceErrors = collectErrors(alice);
    const bobErrors = collectErrors(bob);

    await checks.check('two chat pages connect and see each other in the member list', async () => {
      await alice.goto(`${base}/demos/chat?nick=alice&room=lobby`);
      await connected(alice);
      await bob.goto(`${base}/demos/chat?nick=bob&room=lobby`);
      await connected(bob);
      for (const p of [alice, bob]) {
        await waitUntil(async () => {
          const m = await members(p);
          return m.includes('alice') && m.includes('bob');
        }, 10_000, 'member list with alice and bob');
      }
      return JSON.stringify(await members(alice));
    });

    await checks.check("each page shows the other's messages", async () => {
      await alice.fill('#text', 'hi bob');
      await alice.click('#send');
      await waitUntil(async () => (await messages(bob)).some((m) => m === 'alicehi bob'), 10_000, 'bob sees alice');
      await bob.fill('#text', 'hello alice');
      await bob.click('#send');
      await waitUntil(async () => (await messages(alice)).some((m) => m === 'bobhello alice'), 10_000, 'alice sees bob');
      await screenshot(alice, 'chat');
    });

    await checks.check('a notification published over HTTP pops up in the user page', async () => {
      const p = await context.newPage();
      const errors = collectErrors(p);
      await p.goto(`${base}/demos/notifications?user=42`);
      await connected(p);
      await publish('notifications:#42', { title: 'Build finished', body: 'all green' });
      await p.waitForSelector('.toast >> text=Build finished', { timeout: 10_000 });
      await screenshot(p, 'notifications');
      if (errors.length) throw new Error(errors.join('\n'));
      await p.close();
    });

    for (const [name, prepare] of [
      ['scores', async () => {
        await publish('scores:live', { match: 'Lions vs Tigers', home: 2, away: 1, minute: 67 }, { key: 'Lions vs Tigers' });
        await publish('scores:live', { match: 'Owls vs Hawks', home: 0, away: 0, minute: 12 }, { key: 'Owls vs Hawks' });
      }],
      ['game', async () => {}],
      ['dashboard', async () => {}],
    ]) {
      await checks.check(`the ${name} demo loads with no console error`, async () => {
        await prepare();
        const p = await context.newPage();
        const errors = collectErrors(p);
        await p.goto(`${base}/demos/${name}`);
        await connected(p);
        if (name === 'scores') {
          // A late joiner sees the latest state at once, from history.
          await p.waitForSelector('tr[data-match="Lions vs Tigers"] >> text=2 – 1', { timeout: 10_000 });
        }
        if (name === 'game') {
          await p.mouse.move(300, 300);
          await p.mouse.move(420, 330, { steps: 10 });
        }
        if (name === 'dashboard') {
          await p.waitForFunction(() => document.getElementById('logs').childElementCount > 0, undefined, { timeout: 10_000 });
          await sleep(2500);
        }
        await sleep(500);
        await screenshot(p, name);
        if (errors.length) throw new Error(errors.join('\n'));
        await p.close();
      });
    }

    await checks.check('the multiplayer demo shows another player moving', async () => {
      const one = await context.newPage();
      const two = await context.newPage();
      await one.goto(`${base}/demos/game`);
      await two.goto(`${base}/demos/game`);
      await connected(one);
      await connected(two);
      await one.mouse.move(200, 200);
      await one.mouse.move(260, 240, { steps: 5 });
      await two.waitForFunction(() => /^2 player/.test(document.getElementById('players').textContent), undefined, {
        timeout: 10_000,
      });
      await one.close();
      await two.close();
    });

    await checks.check('walkie.js refreshes an expiring token without reconnecting', async () => {
      const p = await context.newPage();
      await p.goto(`${base}/demos/notifications?user=7`);
      const result = await p.evaluate(async () => {
        const { Walkie } = await import('/walkie.js');
        let fetches = 0;
        const getToken = async () => {
          fetches++;
          const r = await fetch('/demo/token?user=7&ttl=3');
          return (await r.json()).token;
        };
        const w = new Walkie(`ws://${location.host}/ws`, { getToken });
        const closes = [];
        w.addEventListener('disconnected', (e) => closes.push(e.detail.code));
        w.connect();
        // Two token lifetimes: without a refresh the server closes with 4002.
        await new Promise((resolve) => setTimeout(resolve, 7000));
        const state = w.state;
        // Before disconnect(), whose own close is reported too.
        const closed = [...closes];
        w.disconnect();
        return { state, fetches, closes: closed };
      });
      await p.close();
      if (result.state !== 'connected' || result.closes.length > 0 || result.fetches < 3) {
        throw new Error(JSON.stringify(result));
      }
      return `${result.fetches} tokens fetched, no reconnect`;
    });

    await checks.check('the chat pages loaded with no console error', async () => {
      await sleep(300);
      const errors = [...aliceErrors, ...bobErrors];
      if (errors.length) throw new Error(errors.join('\n'));
    }, { blocking: false });

    await bob.close();
    await checks.check('the server stops (SIGTERM) under the open chat page, which says it is reconnecting', async () => {
      await walkie.stop();
      await waitUntil(async () => !(await isListening(port)), 10_000, 'port closed');
      await alice.waitForFunction(() => /reconnecting/.test(document.getElementById('status').textContent), undefined, {
        timeout: 10_000,
      });
    });

    const missed = ['missed 1', 'missed 2', 'missed 3', 'missed 4', 'missed 5'];
    await checks.check('the server restarts and messages are published while the page is away', async () => {
      walkie = await startWalkie(port, 'demos', args);
      for (const text of missed) await publish('chat:lobby', { nick: 'api', text });
    });

    await checks.check('the page comes back by itself with every missed message, once each, in order', async () => {
      await connected(alice);
      const want = missed.map((t) => 'api' + t);
      await waitUntil(async () => {
        const seen = await messages(alice);
        return want.every((w) => seen.includes(w));
      }, 15_000, 'missed messages');
      await sleep(500);
      const got = (await messages(alice)).filter((m) => m.startsWith('apimissed'));
      if (JSON.stringify(got) !== JSON.stringify(want)) throw new Error(`got ${JSON.stringify(got)}`);
      const all = await messages(alice);
      if (new Set(all).size !== all.length) throw new Error(`duplicates: ${JSON.stringify(all)}`);
      return `${got.length} recovered`;
    });
  },
  { ms: 150_000 },
);
