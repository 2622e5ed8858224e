// A Node `ws` echo server for `walkie connect` to talk to.
//
// Usage: node node_server.js PORT_FILE LOG_FILE
//
// Serves on a free port of 127.0.0.1 with perMessageDeflate enabled, writes
// the port to PORT_FILE once it listens, and appends one JSON line per
// handshake to LOG_FILE (path and negotiated extensions). Echoes every
// message unchanged (text as text, binary as binary).
'use strict';

const fs = require('fs');
const { WebSocketServer } = require('ws');

const [portFile, logFile] = process.argv.slice(2);
const wss = new WebSocketServer({ host: '127.0.0.1', port: 0, perMessageDeflate: true });

wss.on('listening', () => {
  fs.writeFileSync(portFile + '.tmp', `${wss.address().port}\n`);
  fs.renameSync(portFile + '.tmp', portFile);
});

wss.on('connection', (ws, req) => {
  const entry = { path: req.url, extensions: ws.extensions || null, subprotocol: ws.protocol || null };
  fs.appendFileSync(logFile, JSON.stringify(entry) + '\n');
  ws.on('message', (data, isBinary) => ws.send(data, { binary: isBinary }));
  ws.on('error', (e) => console.error(`connection error: ${e.message}`));
});

for (const sig of ['SIGTERM', 'SIGINT']) {
  process.on(sig, () => {
    for (const c of wss.clients) c.terminate();
    wss.close(() => process.exit(0));
  });
}
