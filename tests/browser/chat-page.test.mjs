// Our chat page (web/index.html, served at GET /) in a real Chromium: it
// loads cleanly, connects, and a message typed and sent gets its reply.

import { join } from 'node:path';
import { collectErrors, env, outDir, runTests, sleep, waitForText } from './lib.mjs';

const port = Number(env('WALKIE_PORT'));
const base = `http://127.0.0.1:${port}/`;
const message = 'hello from chromium';

await runTests(async (checks, { page }) => {
  const errors = collectErrors(page);

  await checks.check(`chat page loads from ${base}`, async () => {
    const response = await page.goto(base, { waitUntil: 'load' });
    if (response?.status() !== 200) throw new Error(`GET / answered ${response?.status()}`);
    const type = response.headers()['content-type'] ?? '';
    if (!type.startsWith('text/html')) throw new Error(`GET / has Content-Type ${JSON.stringify(type)}`);
    return `${type}, title ${JSON.stringify(await page.title())}`;
  });

  await checks.check('status line shows connected', async () => {
    await page
      .waitForFunction(() => /^connected\b/i.test(document.getElementById('status')?.textContent ?? ''))
      .catch(async () => {
        const text = await page.locator('#status').textContent().catch(() => null);
        throw new Error(`#status still says ${JSON.stringify(text)}`);
      });
    return JSON.stringify(await page.locator('#status').textContent());
  });

  await checks.check(
    'page loaded with no console error',
    async () => {
      await sleep(500); // late errors (a favicon request, say) land within this
      if (errors.length > 0) throw new Error(errors.join('\n'));
    },
    { blocking: false },
  );

  await checks.check(`typing "${message}" and clicking Send shows "You said: ${message}" in #chat`, async () => {
    await page.locator('#msg').fill(message);
    await page.getByRole('button', { name: 'Send' }).click();
    await waitForText(page, '#chat p', `You said: ${message}`);
  });

  await checks.check(
    'screenshot target/browser/chat.png',
    async () => {
      const path = join(outDir(), 'chat.png');
      await page.screenshot({ path, fullPage: true });
      return path;
    },
    { blocking: false },
  );
});
