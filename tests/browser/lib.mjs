// Shared helpers of the browser tests: launching Chromium, printing
// `ok - ...` / `not ok - ...` lines, timeouts, and (re)starting walkie.
//
// The tests are run by scripts/browser-test, which passes:
//   WALKIE_BIN        the walkie binary
//   WALKIE_PORT       the port of the walkie it started on 127.0.0.1
//   WALKIE_PID        that walkie's process id (the reconnect test stops it)
//   WALKIE_SEED_PORT  the port of the second walkie, for the seed's client (3000)
//   WALKIE_PIDFILE    every walkie a test starts is appended here, so that the
//                     script's exit trap stops it too
//   BROWSER_TEST_OUT  where screenshots and walkie logs go
//   BROWSER_TEST_RUN  a scratch directory, removed at exit (walkie data dirs)

import { spawn } from 'node:child_process';
import { appendFileSync, mkdirSync, openSync, closeSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import { chromium } from 'playwright-core';

export const CHROMIUM = process.env.CHROMIUM_BIN || '/usr/bin/chromium';
// Without the background-networking flags Chromium tries to reach Google's
// services, which a closed network refuses.
export const CHROMIUM_ARGS = [
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

/** Reads a required environment variable. */
export function env(name) {
  const value = process.env[name];
  if (!value) {
    throw new Error(`${name} is not set: run the browser tests with scripts/browser-test`);
  }
  return value;
}

export function outDir() {
  const dir = env('BROWSER_TEST_OUT');
  mkdirSync(dir, { recursive: true });
  return dir;
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Rejects with `what timed out` if `promise` takes longer than `ms`. */
export function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: timed out after ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** Polls `fn` until it returns a truthy value. */
export async function waitUntil(fn, ms, what, every = 100) {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await fn();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`${what}: still not true after ${ms} ms`);
    await sleep(every);
  }
}

/**
 * Prints one line per check. A check that fails stops the checks after it
 * in the same file (they are reported as `not ok ... # not run`), unless it
 * was marked `{ blocking: false }`.
 */
export class Checks {
  constructor() {
    this.failed = 0;
    this.passed = 0;
    this.blockedBy = null;
  }

  async check(name, fn, { timeout = 20_000, blocking = true } = {}) {
    if (this.blockedBy) {
      this.failed++;
      console.log(`not ok - ${name} # not run: "${this.blockedBy}" failed`);
      return undefined;
    }
    try {
      const note = await withTimeout(Promise.resolve().then(fn), timeout, name);
      this.passed++;
      console.log(`ok - ${name}${typeof note === 'string' && note ? ` # ${note}` : ''}`);
      return note;
    } catch (error) {
      this.failed++;
      console.log(`not ok - ${name}`);
      for (const line of String(error?.message ?? error).split('\n').slice(0, 12)) {
        console.log(`#   ${line}`);
      }
      if (blocking) this.blockedBy = name;
      return undefined;
    }
  }
}

/** Launches headless Chromium with a fresh user data dir. */
export async function launchBrowser() {
  const userDataDir = await mkdtemp(join(tmpdir(), 'walkie-chromium-'));
  let context;
  try {
    context = await chromium.launchPersistentContext(userDataDir, {
      executablePath: CHROMIUM,
      headless: true,
      args: CHROMIUM_ARGS,
      viewport: { width: 900, height: 600 },
      timeout: 60_000,
    });
  } catch (error) {
    await rm(userDataDir, { recursive: true, force: true });
    throw error;
  }
  context.setDefaultTimeout(10_000);
  context.setDefaultNavigationTimeout(15_000);
  const page = context.pages()[0] ?? (await context.newPage());
  return {
    context,
    page,
    async close() {
      await withTimeout(context.close(), 15_000, 'closing Chromium').catch(() => {});
      await rm(userDataDir, { recursive: true, force: true }).catch(() => {});
    },
  };
}

/**
 * Runs one test file: launches Chromium, calls `body(checks, browser)`,
 * closes everything, and sets the exit code. `ms` bounds the whole file.
 */
export async function runTests(body, { ms = 120_000 } = {}) {
  const file = basename(process.argv[1] ?? 'test');
  const checks = new Checks();
  const hardStop = setTimeout(() => {
    console.log(`not ok - ${file} finished # timed out after ${ms} ms`);
    process.exit(1);
  }, ms);
  hardStop.unref();
  let browser;
  const cleanups = [];
  try {
    browser = await checks.check('Chromium starts', () => launchBrowser(), { timeout: 60_000 });
    if (browser) await body(checks, browser, (fn) => cleanups.push(fn));
  } catch (error) {
    checks.failed++;
    console.log(`not ok - ${file} ran to the end`);
    for (const line of String(error?.stack ?? error).split('\n').slice(0, 12)) {
      console.log(`#   ${line}`);
    }
  } finally {
    if (browser) await browser.close();
    for (const cleanup of cleanups.reverse()) {
      await Promise.resolve().then(cleanup).catch((e) => console.log(`# cleanup: ${e?.message ?? e}`));
    }
    clearTimeout(hardStop);
  }
  process.exitCode = checks.failed > 0 ? 1 : 0;
}

/** A port nothing listens on right now. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/** Collects the page's console errors and uncaught exceptions. */
export function collectErrors(page) {
  const errors = [];
  page.on('console', (message) => {
    if (message.type() === 'error') {
      const { url, lineNumber } = message.location();
      errors.push(`console error: ${message.text()}${url ? ` (${url}:${lineNumber})` : ''}`);
    }
  });
  page.on('pageerror', (error) => errors.push(`uncaught exception: ${error.message}`));
  return errors;
}

/** Waits until an element of `selector` has exactly the text `text`. */
export async function waitForText(page, selector, text, timeout = 10_000) {
  try {
    await page.waitForFunction(
      ([sel, t]) => [...document.querySelectorAll(sel)].some((e) => e.textContent === t),
      [selector, text],
      { timeout },
    );
  } catch (error) {
    const seen = await page
      .evaluate((sel) => [...document.querySelectorAll(sel)].map((e) => e.textContent), selector)
      .catch(() => []);
    throw new Error(
      `no ${selector} with text ${JSON.stringify(text)} within ${timeout} ms; ` +
        `found ${JSON.stringify(seen.slice(-5))}`,
    );
  }
}

/** True if something accepts TCP connections on host:port. */
export function isListening(port, host = '127.0.0.1') {
  return new Promise((resolve) => {
    const socket = net.connect({ port, host });
    socket.setTimeout(1000);
    socket.once('connect', () => {
      socket.destroy();
      resolve(true);
    });
    socket.once('timeout', () => {
      socket.destroy();
      resolve(true);
    });
    socket.once('error', () => resolve(false));
  });
}

/** The environment for walkie: no WALKIE_* settings from the caller but the log filter. */
function walkieEnv() {
  const clean = {};
  for (const [key, value] of Object.entries(process.env)) {
    if (!key.startsWith('WALKIE_') || key === 'WALKIE_LOG') clean[key] = value;
  }
  return clean;
}

/**
 * Starts `walkie serve --bind 127.0.0.1:port`, appending its log to
 * BROWSER_TEST_OUT/walkie-<name>.log, and waits until `GET /` answers 200.
 * Returns { pid, stop() }.
 */
export async function startWalkie(port, name = String(port), extraArgs = []) {
  const log = join(outDir(), `walkie-${name}.log`);
  const fd = openSync(log, 'a');
  // History lives in the run's scratch directory (removed by the script at
  // exit), so that a rerun starts from empty channels.
  const scratch = process.env.BROWSER_TEST_RUN || join(tmpdir(), `walkie-browser-${process.pid}`);
  const args = ['serve', '--bind', `127.0.0.1:${port}`, '--data-dir', join(scratch, `data-${name}`), ...extraArgs];
  const child = spawn(env('WALKIE_BIN'), args, {
    stdio: ['ignore', fd, fd],
    env: walkieEnv(),
  });
  closeSync(fd);
  let exited = null;
  const exit = new Promise((resolve) => {
    child.once('exit', (code, signal) => {
      exited = signal ?? code;
      resolve();
    });
  });
  if (child.pid) appendFileSync(env('WALKIE_PIDFILE'), `${child.pid}\n`);
  const stop = async () => {
    if (exited !== null) return;
    child.kill('SIGTERM');
    const stopped = await withTimeout(exit, 8_000, 'walkie stopping').then(
      () => true,
      () => false,
    );
    if (!stopped) {
      child.kill('SIGKILL');
      await exit;
    }
  };
  try {
    await waitUntil(
      async () => {
        if (exited !== null) throw new Error(`walkie exited (${exited}) before answering; see ${log}`);
        try {
          const response = await fetch(`http://127.0.0.1:${port}/`, { signal: AbortSignal.timeout(1000) });
          await response.arrayBuffer();
          return response.status === 200;
        } catch {
          return false;
        }
      },
      15_000,
      `walkie on 127.0.0.1:${port} answering GET /`,
    );
  } catch (error) {
    await stop();
    throw error;
  }
  return { pid: child.pid, stop };
}
