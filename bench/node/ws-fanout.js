'use strict';
// Node `ws` fan-out peer: the broadcast loop from ws's README ("Server
// broadcast"): every message received is sent to every open client, the
// sender included, with its type kept. `ws` frames it once per client.

const { WebSocketServer, WebSocket } = require('ws');
const { parseArgs, announce, fail } = require('./common');

const NAME = 'ws-fanout';
const { port, deflate } = parseArgs(NAME);
if (deflate) {
  process.stderr.write(`${NAME}: the fan-out cases run without compression\n`);
  process.exit(3);
}

const wss = new WebSocketServer({ host: '127.0.0.1', port, perMessageDeflate: false });

wss.on('error', (err) => fail(NAME, 'listen', err));
wss.on('listening', () => announce(wss.address().port));
wss.on('connection', (ws) => {
  ws.on('error', () => {});
  ws.on('message', (data, isBinary) => {
    for (const client of wss.clients) {
      if (client.readyState === WebSocket.OPEN) {
        client.send(data, { binary: isBinary });
      }
    }
  });
});
