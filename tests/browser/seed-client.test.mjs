// The seed's example client (seed-client.html, byte-for-byte as the guide
// printed it) against walkie. It hardcodes ws://localhost:3000, so the script
// runs a walkie on 127.0.0.1:3000 for it; the HTML itself is served from a
// tiny static server on a free port.

import { readFile } from 'node:fs/promises';
import http from 'node:http';
import { join } from 'node:path';
import { env, outDir, runTests, waitForText } from './lib.mjs';

const seedPort = Number(env('WALKIE_SEED_PORT'));
const html = await readFile(new URL('./seed-client.html', import.meta.url));
const message = 'hello from the seed client';

await runTests(async (checks, { page }, onCleanup) => {
  const server = http.createServer((request, response) => {
    if (request.method === 'GET' && (request.url === '/' || request.url === '/seed-client.html')) {
      response.writeHead(200, { 'Content-Type': 'text/html', 'Content-Length': html.length });
      response.end(html);
    } else {
      response.writeHead(404, { 'Content-Type': 'text/plain' });
      response.end('not found\n');
    }
  });
  onCleanup(() => new Promise((resolve) => server.close(resolve)));
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', resolve);
  });
  const url = `http://127.0.0.1:${server.address().port}/seed-client.html`;

  const logged = [];
  page.on('console', (m) => logged.push(`${m.type()}: ${m.text()}`));
  const connected = page.waitForEvent('console', {
    predicate: (m) => m.text() === 'Connected to server',
    timeout: 15_000,
  });
  connected.catch(() => {}); // awaited below; don't let an early failure go unhandled

  await checks.check(`seed client page loads from ${url}`, async () => {
    const response = await page.goto(url, { waitUntil: 'load' });
    if (response?.status() !== 200) throw new Error(`static server answered ${response?.status()}`);
  });

  await checks.check(`seed client logs "Connected to server" (ws://localhost:${seedPort})`, async () => {
    await connected.catch(() => {
      throw new Error(`no "Connected to server" in the console; it logged: ${JSON.stringify(logged)}`);
    });
  });

  await checks.check(`seed client: typing "${message}" and clicking Send shows "You said: ${message}"`, async () => {
    await page.locator('#msg').fill(message);
    await page.getByRole('button', { name: 'Send' }).click();
    await waitForText(page, '#chat p', `You said: ${message}`);
  });

  await checks.check(
    'screenshot target/browser/seed-client.png',
    async () => {
      const path = join(outDir(), 'seed-client.png');
      await page.screenshot({ path, fullPage: true });
      return path;
    },
    { blocking: false },
  );
});
