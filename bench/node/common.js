'use strict';
// What every Node peer shares: the command line (`PORT [deflate]`) and the
// one ready line on stdout, `listening <port>`. Errors go to stderr.
// Exit status 2: bad command line.

function parseArgs(name) {
  const argv = process.argv.slice(2);
  const port = Number(argv[0]);
  const extra = argv[1];
  if (
    argv.length < 1 ||
    argv.length > 2 ||
    !/^\d+$/.test(argv[0]) ||
    port > 65535 ||
    (extra !== undefined && extra !== 'deflate')
  ) {
    process.stderr.write(`usage: ${name} PORT [deflate]\n`);
    process.exit(2);
  }
  return { port, deflate: extra === 'deflate' };
}

function announce(port) {
  // A write to a pipe is asynchronous in Node, but it is queued in order
  // and flushed by the event loop; nothing else is ever written to stdout.
  process.stdout.write(`listening ${port}\n`);
}

function fail(name, what, err) {
  process.stderr.write(`${name}: ${what}: ${err && err.message ? err.message : err}\n`);
  process.exit(1);
}

module.exports = { parseArgs, announce, fail };
