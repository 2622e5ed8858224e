'use strict';
// uWebSockets.js echo peer (npm package `uwebsockets`, a repackaging of the
// uWebSockets.js v20 binaries): the WebSockets example of uWS.js, on any
// path (`/*`), 16 MiB max payload. Every text or binary message goes back
// with the same type. Pings and the closing handshake are answered by uWS.
// uWS runs its own single-threaded event loop inside Node's; Node's helper
// threads stay idle, and the suite's taskset keeps them on the same core.
//
// `deflate`: permessage-deflate with uWS's SHARED_COMPRESSOR (no context
// takeover, no memory per socket, the example's choice) and the default
// shared decompressor; every message is sent with `compress = true`, and
// uWS has no size threshold.

const uWS = require('uwebsockets');
const { parseArgs, announce, fail } = require('./common');

const NAME = 'uws-echo';
const { port, deflate } = parseArgs(NAME);

uWS
  .App()
  .ws('/*', {
    compression: deflate ? uWS.SHARED_COMPRESSOR : uWS.DISABLED,
    maxPayloadLength: 16 * 1024 * 1024,
    message: (ws, message, isBinary) => {
      // `message` is only valid during this call; send copies it out.
      ws.send(message, isBinary, deflate);
    },
  })
  .listen('127.0.0.1', port, (token) => {
    if (!token) {
      fail(NAME, 'listen', `cannot listen on 127.0.0.1:${port}`);
    }
    announce(uWS.us_socket_local_port(token));
  });
