'use strict';
// uWebSockets.js fan-out peer: every connection (any path) subscribes to
// one topic on open; every message received is published to the topic with
// `app.publish` (uWS's pub/sub: the message is framed once and written to
// every subscriber, the sender included), with its type kept.

const uWS = require('uwebsockets');
const { parseArgs, announce, fail } = require('./common');

const NAME = 'uws-fanout';
const { port, deflate } = parseArgs(NAME);
if (deflate) {
  process.stderr.write(`${NAME}: the fan-out cases run without compression\n`);
  process.exit(3);
}

const app = uWS.App();
app
  .ws('/*', {
    compression: uWS.DISABLED,
    maxPayloadLength: 16 * 1024 * 1024,
    // Subscribers of a busy topic must not be cut off at uWS's default
    // 64 KiB backpressure limit: the benchmark counts lost messages.
    maxBackpressure: 64 * 1024 * 1024,
    open: (ws) => {
      ws.subscribe('fanout');
    },
    message: (ws, message, isBinary) => {
      app.publish('fanout', message, isBinary);
    },
  })
  .listen('127.0.0.1', port, (token) => {
    if (!token) {
      fail(NAME, 'listen', `cannot listen on 127.0.0.1:${port}`);
    }
    announce(uWS.us_socket_local_port(token));
  });
