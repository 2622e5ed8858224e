// Node `ws` client checks against walkie's /echo.
//
// Usage: node node_client.js CHECK BASE_URL
//
// BASE_URL is ws://127.0.0.1:PORT (no path). Every check connects with
// perMessageDeflate enabled and requires walkie to accept it. Checks:
//   deflate  the response negotiated permessage-deflate
//   text     a text message comes back as the same text
//   binary   a binary message comes back as the same bytes, still binary
//   5mib     a 5 MiB binary message (random bytes) and a 5 MiB text
//            message (compressible) come back unchanged
// Exits 0 on success; otherwise prints what went wrong and exits 1.
'use strict';

const crypto = require('crypto');
const WebSocket = require('ws');

const [check, base] = process.argv.slice(2);

function fail(message) {
  console.log(`FAILED: ${message}`);
  process.exit(1);
}

setTimeout(() => fail(`no result within 30s (check ${check})`), 30000).unref();

function show(data) {
  const s = JSON.stringify(data.toString().slice(0, 60));
  return data.length > 60 ? `${s}... (${data.length} bytes)` : s;
}

function open() {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(`${base}/echo`, { perMessageDeflate: true, handshakeTimeout: 10000 });
    ws.once('open', () => resolve(ws));
    ws.once('error', reject);
    ws.once('unexpected-response', (_req, res) => reject(new Error(`HTTP ${res.statusCode}`)));
  });
}

function roundtrip(ws, data, binary) {
  return new Promise((resolve, reject) => {
    const onClose = (code, reason) => reject(new Error(`closed with ${code} ${reason} before the reply`));
    ws.once('close', onClose);
    ws.once('message', (reply, isBinary) => {
      ws.off('close', onClose);
      const sent = Buffer.isBuffer(data) ? data : Buffer.from(data);
      if (isBinary !== binary) {
        reject(new Error(`sent ${binary ? 'binary' : 'text'} ${show(sent)}, got ${isBinary ? 'binary' : 'text'} ${show(reply)}`));
      } else if (!sent.equals(reply)) {
        reject(new Error(`sent ${show(sent)}, got ${show(reply)}`));
      } else {
        resolve();
      }
    });
    ws.send(data, { binary });
  });
}

function close(ws) {
  return new Promise((resolve) => {
    ws.once('close', (code) => resolve(code));
    ws.close(1000, 'done');
  });
}

async function main() {
  const ws = await open();
  const ext = ws.extensions || '';
  if (!ext.startsWith('permessage-deflate')) {
    fail(`offered permessage-deflate, walkie's Sec-WebSocket-Extensions: ${JSON.stringify(ext)}`);
  }
  let note = '';
  switch (check) {
    case 'deflate':
      note = `Sec-WebSocket-Extensions: ${ext}`;
      break;
    case 'text':
      await roundtrip(ws, 'hello from ws — ünïcödé 🦀', false);
      break;
    case 'binary':
      await roundtrip(ws, Buffer.from([0, 1, 2, 0xff, 0xfe, 0x80, 0xc3]), true);
      break;
    case '5mib':
      await roundtrip(ws, crypto.randomBytes(5 << 20), true);
      await roundtrip(ws, 'walkie '.repeat(Math.floor((5 << 20) / 7)), false);
      break;
    default:
      fail(`unknown check ${check}`);
  }
  const code = await close(ws);
  if (code !== 1000) fail(`closed with 1000, walkie answered ${code}`);
  if (note) console.log(note);
  process.exit(0);
}

main().catch((e) => fail(e.message));
