'use strict';
// Node `ws` echo peer: a WebSocketServer on 127.0.0.1, any path, every text
// or binary message sent back with the same type (the Buffer is sent as
// is, text is not decoded and re-encoded). Pings and the closing handshake
// are answered by ws. `bufferutil` is installed, as ws's README advises
// for performance (native masking); UTF-8 is validated with Node's
// built-in `buffer.isUtf8`, so `utf-8-validate` is not needed.
//
// `deflate`: permessage-deflate with ws's defaults (context takeover,
// 15-bit windows) except `threshold: 0`, so every message is compressed,
// and zlib level 1 (walkie's default level; zlib's default, which ws
// keeps, is 6). ws runs zlib asynchronously on libuv's
// thread pool; the JavaScript itself is single-threaded, and the suite's
// taskset keeps every thread of the process on one core.

const { WebSocketServer } = require('ws');
const { parseArgs, announce, fail } = require('./common');

const NAME = 'ws-echo';
const { port, deflate } = parseArgs(NAME);

const wss = new WebSocketServer({
  host: '127.0.0.1',
  port,
  perMessageDeflate: deflate
    ? { threshold: 0, zlibDeflateOptions: { level: 1 } }
    : false,
});

wss.on('error', (err) => fail(NAME, 'listen', err));
wss.on('listening', () => announce(wss.address().port));
wss.on('connection', (ws) => {
  // Per-connection errors (a client that drops the socket) are normal
  // under load; ws closes the socket, and nothing is logged.
  ws.on('error', () => {});
  ws.on('message', (data, isBinary) => {
    ws.send(data, { binary: isBinary });
  });
});
