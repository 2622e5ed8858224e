// /echo from a page's own WebSocket (binaryType 'arraybuffer'): text comes
// back as the same text, binary as the same bytes, each with its own type.

import { env, runTests } from './lib.mjs';

const port = Number(env('WALKIE_PORT'));
const url = `ws://127.0.0.1:${port}/echo`;

await runTests(async (checks, { page }) => {
  await checks.check('a page is open to run the WebSocket in', async () => {
    const response = await page.goto(`http://127.0.0.1:${port}/health`);
    if (response?.status() !== 200) throw new Error(`GET /health answered ${response?.status()}`);
  });

  await checks.check(`new WebSocket('${url}') opens`, async () => {
    const info = await page.evaluate(
      (url) =>
        new Promise((resolve, reject) => {
          const ws = new WebSocket(url);
          ws.binaryType = 'arraybuffer';
          const inbox = [];
          let wake = () => {};
          ws.onmessage = (event) => {
            inbox.push(event.data);
            wake();
          };
          ws.onopen = () => resolve({ extensions: ws.extensions, protocol: ws.protocol });
          ws.onclose = (event) => {
            reject(new Error(`closed with ${event.code} ${event.reason}`));
            wake();
          };
          // Resolves with the next message, rejects once the socket is closed.
          const next = () =>
            new Promise((res, rej) => {
              const take = () => {
                if (inbox.length > 0) res(inbox.shift());
                else if (ws.readyState >= WebSocket.CLOSING) rej(new Error('the socket closed'));
                else wake = take;
              };
              take();
            });
          window.echo = { ws, next };
        }),
      url,
    );
    return `extensions ${JSON.stringify(info.extensions)}`;
  });

  const text = 'echo: héllo, мир 👋 <b>&amp;</b>';
  await checks.check(
    'a text message comes back unchanged, as text',
    async () => {
      const got = await page.evaluate(async (text) => {
        window.echo.ws.send(text);
        const data = await window.echo.next();
        return { type: typeof data, isArrayBuffer: data instanceof ArrayBuffer, data: typeof data === 'string' ? data : null };
      }, text);
      if (got.type !== 'string') throw new Error(`came back as ${got.isArrayBuffer ? 'ArrayBuffer' : got.type}`);
      if (got.data !== text) throw new Error(`came back as ${JSON.stringify(got.data)}, sent ${JSON.stringify(text)}`);
    },
    { blocking: false },
  );

  await checks.check(
    'a binary (ArrayBuffer) message comes back unchanged, as an ArrayBuffer',
    async () => {
      const got = await page.evaluate(async () => {
        const bytes = new Uint8Array(300);
        for (let i = 0; i < bytes.length; i++) bytes[i] = (i * 7) & 0xff; // includes 0x00 and invalid UTF-8
        window.echo.ws.send(bytes.buffer);
        const data = await window.echo.next();
        return {
          type: typeof data,
          isArrayBuffer: data instanceof ArrayBuffer,
          sent: Array.from(bytes),
          received: data instanceof ArrayBuffer ? Array.from(new Uint8Array(data)) : String(data).slice(0, 80),
        };
      });
      if (!got.isArrayBuffer) throw new Error(`came back as ${got.type}: ${JSON.stringify(got.received)}`);
      if (got.received.length !== got.sent.length) {
        throw new Error(`came back with ${got.received.length} bytes, sent ${got.sent.length}`);
      }
      const at = got.sent.findIndex((b, i) => b !== got.received[i]);
      if (at !== -1) throw new Error(`byte ${at} came back as ${got.received[at]}, sent ${got.sent[at]}`);
    },
    { blocking: false },
  );

  await checks.check(
    'large messages (1 MiB text, 256 KiB random binary) come back unchanged',
    async () => {
      const got = await page.evaluate(async () => {
        const digest = async (data) => {
          const buffer = typeof data === 'string' ? new TextEncoder().encode(data) : data;
          return Array.from(new Uint8Array(await crypto.subtle.digest('SHA-256', buffer)))
            .map((b) => b.toString(16).padStart(2, '0'))
            .join('');
        };
        const text = 'walkie '.repeat(Math.ceil((1 << 20) / 7)).slice(0, 1 << 20);
        const random = new Uint8Array(256 * 1024);
        for (let i = 0; i < random.length; i += 65536) crypto.getRandomValues(random.subarray(i, i + 65536));
        window.echo.ws.send(text);
        window.echo.ws.send(random.buffer);
        const a = await window.echo.next();
        const b = await window.echo.next();
        return {
          text: [typeof a, typeof a === 'string' ? a.length : -1, (await digest(a)) === (await digest(text))],
          binary: [b instanceof ArrayBuffer, b.byteLength ?? -1, (await digest(b)) === (await digest(random.buffer))],
        };
      });
      const problems = [];
      if (got.text[0] !== 'string' || !got.text[2]) problems.push(`text came back as ${got.text[0]} of length ${got.text[1]}, different`);
      if (!got.binary[0] || !got.binary[2]) problems.push(`binary came back ${got.binary[0] ? 'as' : 'not as'} an ArrayBuffer of ${got.binary[1]} bytes, different`);
      if (problems.length) throw new Error(problems.join('\n'));
    },
    { blocking: false, timeout: 30_000 },
  );

  await checks.check(
    'the echo socket closes cleanly (1000)',
    async () => {
      const code = await page.evaluate(
        () =>
          new Promise((resolve) => {
            window.echo.ws.onclose = (event) => resolve(event.code);
            window.echo.ws.close(1000, 'done');
          }),
      );
      if (code !== 1000) throw new Error(`closed with ${code}`);
    },
    { blocking: false },
  );
});
