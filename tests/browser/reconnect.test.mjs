// Reconnect: with the chat page open, stop walkie (SIGTERM), check the page
// says it is reconnecting, start walkie again on the same port, and check the
// page reconnects by itself and a new message gets its reply.
//
// This stops the walkie that scripts/browser-test started (WALKIE_PID), so it
// runs last; the walkie it starts instead is stopped here and, as a backup, by
// the script's exit trap (through WALKIE_PIDFILE).

import { env, isListening, runTests, startWalkie, waitForText, waitUntil } from './lib.mjs';

const port = Number(env('WALKIE_PORT'));
const pid = Number(env('WALKIE_PID'));
const base = `http://127.0.0.1:${port}/`;
const statusText = (page) => page.locator('#status').textContent();
const isConnected = () => /^connected\b/i.test(document.getElementById('status')?.textContent ?? '');

await runTests(async (checks, { page }, onCleanup) => {
  await checks.check('chat page is open and connected', async () => {
    await page.goto(base);
    await page.waitForFunction(isConnected);
    // Record every text the status line shows from now on.
    await page.evaluate(() => {
      const status = document.getElementById('status');
      window.statusHistory = [status.textContent];
      new MutationObserver(() => window.statusHistory.push(status.textContent)).observe(status, {
        childList: true,
        characterData: true,
        subtree: true,
      });
    });
  });

  const connectedText = await statusText(page).catch(() => null);
  await checks.check(`SIGTERM stops walkie (pid ${pid}) and frees port ${port}`, async () => {
    process.kill(pid, 'SIGTERM');
    await waitUntil(async () => !(await isListening(port)), 10_000, `port ${port} closed`);
  });

  await checks.check(
    'status line changes to say it is reconnecting',
    async () => {
      await page
        .waitForFunction(
          (before) => {
            const text = document.getElementById('status')?.textContent ?? '';
            return text !== before && /reconnecting/i.test(text);
          },
          connectedText,
        )
        .catch(async () => {
          throw new Error(`#status says ${JSON.stringify(await statusText(page))}`);
        });
      return JSON.stringify(await statusText(page));
    },
  );

  await checks.check(
    'the page saw the server close with 1001 (going away)',
    async () => {
      const history = await page.evaluate(() => window.statusHistory);
      const first = history.find((t) => /reconnecting/i.test(t));
      if (!/\(1001\)/.test(first ?? '')) {
        throw new Error(`first disconnected status was ${JSON.stringify(first)}; history ${JSON.stringify(history)}`);
      }
    },
    { blocking: false },
  );

  let restarted;
  await checks.check(`walkie starts again on port ${port}`, async () => {
    restarted = await startWalkie(port, 'main'); // same log as the one it replaces
    onCleanup(() => restarted.stop());
    return `pid ${restarted.pid}`;
  });

  await checks.check('the page reconnects by itself (status shows connected)', async () => {
    await page.waitForFunction(isConnected, undefined, { timeout: 25_000 }).catch(async () => {
      throw new Error(`#status still says ${JSON.stringify(await statusText(page))} after 25 s`);
    });
    return JSON.stringify(await statusText(page));
  }, { timeout: 30_000 });

  const message = 'hello after reconnecting';
  await checks.check(`after reconnecting, "${message}" gets its reply`, async () => {
    await page.locator('#msg').fill(message);
    await page.getByRole('button', { name: 'Send' }).click();
    await waitForText(page, '#chat p', `You said: ${message}`);
  });
});
