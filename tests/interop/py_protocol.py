"""An independent client of the Walkie protocol (walkie.v1), written only from
docs/protocol.md, the README and `walkie --help`, and checks that run it
against a real `walkie serve`.

Usage: py_protocol.py CHECK BASE_URL [ARG...]
       py_protocol.py config NAME      print the TOML file for server NAME

BASE_URL is ws://127.0.0.1:PORT (no path); the protocol is at BASE_URL/ws and
the HTTP API at http://127.0.0.1:PORT/api/... Each check opens its own
connections, exits 0 when the server did what the document says, and
otherwise prints the command sent, what came back, and the sentence of the
document it contradicts, and exits 1. Every wait is bounded.

Servers (started by scripts/interop):
  open     `walkie serve --in-memory --ping-interval 2s` (no config: anonymous
           clients, an open default namespace)
  auth     `walkie serve --in-memory --config <config auth>`: HS256 secret,
           anonymous connections allowed, an API key, and the namespaces below
  noanon   `walkie serve --in-memory --config <config noanon>`: anonymous = false

Checks on `open`:
  handshake           walkie.v1 selected (alone or among others); refused with
                      HTTP 400 without it, the body saying so
  connect-anonymous   result fields of an anonymous connect
  keepalive S         the server runs --ping-interval Ss: connect says
                      ping_interval S, and a quiet client is pinged then
  before-connect      110 before connect, 111 for a second connect
  bad-commands        104 unknown method, 107 missing or mistyped fields,
                      unknown fields ignored
  close-binary        a binary message closes with 4000
  close-not-json      a text message that is not JSON closes with 4000
  close-not-command   a JSON value that is not an object closes with 4000
  close-two-methods   a command with two keys besides `id` closes with 4000
  ping                the ping command
  open-default        anonymous pub/sub in the default and `rooms` namespaces;
                      102 for any other
  rooms-bridge        a /rooms/NAME member's text and binary messages: pub
                      pushes on rooms:NAME with `text` / `base64`
Checks on `auth`:
  channel-errors      102 unknown namespace / invalid names, 105, 113
  not-available       108 for presence, history, client publish turned off
  pubsub              publish replies and pub pushes in order, offsets +1,
                      reply before the push it causes, unsubscribe, `key`
  no-history          offset 0 in a namespace without history
  idempotency         `duplicate` and nothing delivered twice
  history             since, limit, reverse
  subscribe-history   "history": N replays the last N before live messages
  recovery            missed messages exactly once, in order, then live
  recovery-impossible wrong epoch, history trimmed: recovered false
  recovery-large      1,500 missed (more than the default queue of 1,024):
                      all of them once, in order, then live
  presence            presence and presence_stats
  join-leave          join and leave pushes
  connect-token       user, expires_in; a token without exp
  refresh             refresh before exp keeps the connection; refused refreshes
  expiry              a token not refreshed: close 4002
  jwt-refused         expired / wrongly signed / sub-less token at connect
  claims              `channels` claim (exact, pattern), anonymous refused
  subscription-tokens subscribe.token: granted, other channel, expired,
                      another user's, wrongly signed (101)
  subscription-expiry an expiring subscription token: `unsubscribe` push
  user-channels       notifications:#42 and notifications:#42,43
  http-api            /api/publish, /api/history, the API key, errors
  cli-publish BIN     `walkie publish` (the documented client of the API)
  api-disconnect      /api/disconnect closes the user's connections with 4009
Checks on `noanon`:
  anonymous-refused   connect without a token is refused
"""

import asyncio
import itertools
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import jwt
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Opcode

SECRET = "walkie-interop-hs256-secret-0123456789abcdef"
API_KEY = "walkie-interop-api-key"
STEP = 5  # seconds: the bound on every single wait for the server
QUIET = 0.5  # seconds: how long "nothing more arrives" is watched for

CONFIGS = {
    # Only keys the README's example shows.
    "auth": f"""
[auth]
hmac_secret = "{SECRET}"
anonymous = true
api_key = "{API_KEY}"

[namespaces.chat]
history_size = 100
history_ttl = "1h"
presence = true
join_leave = true
allow_publish = true
private = false

[namespaces.news]
history_size = 100
history_ttl = "1h"
presence = false
join_leave = false
allow_publish = true
private = false

[namespaces.backlog]
history_size = 2000
history_ttl = "1h"
presence = false
join_leave = false
allow_publish = true
private = false

[namespaces.scores]
history_size = 10
history_ttl = "1h"
presence = false
join_leave = false
allow_publish = true
private = false
overflow = "latest_per_key"

[namespaces.live]
history_size = 0
history_ttl = "1h"
presence = false
join_leave = false
allow_publish = true
private = false

[namespaces.ro]
history_size = 100
history_ttl = "1h"
presence = false
join_leave = false
allow_publish = false
private = false

[namespaces.tiny]
history_size = 3
history_ttl = "1h"
presence = false
join_leave = false
allow_publish = true
private = false

[namespaces.priv]
history_size = 10
history_ttl = "1h"
presence = false
join_leave = false
allow_publish = true
private = true

[namespaces.notifications]
history_size = 10
history_ttl = "1h"
presence = false
join_leave = false
allow_publish = true
private = false
""",
    "noanon": f"""
[auth]
hmac_secret = "{SECRET}"
anonymous = false

[namespaces.chat]
history_size = 10
history_ttl = "1h"
presence = true
join_leave = true
allow_publish = true
private = false
""",
}


class CheckFailed(Exception):
    pass


def expect(cond: bool, what: str) -> None:
    if not cond:
        raise CheckFailed(what)


def j(value) -> str:
    s = json.dumps(value, ensure_ascii=False)
    return s if len(s) <= 400 else s[:400] + f"... ({len(s)} chars)"


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def token(sub="42", exp_in: float | None = 3600, key: str = SECRET, **claims) -> str:
    payload = dict(claims)
    if sub is not None:
        payload["sub"] = sub
    if exp_in is not None:
        payload["exp"] = int(time.time() + exp_in)
    return jwt.encode(payload, key, algorithm="HS256")


# ---------------------------------------------------------------- the client


class Walkie:
    """One connection: replies are matched to commands by id, pushes queue up
    in arrival order; every message received is numbered so that checks can
    compare the order of replies and pushes."""

    def __init__(self, ws, label: str):
        self.ws = ws
        self.label = label
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future] = {}
        self.pushes: asyncio.Queue = asyncio.Queue()
        self.seq = itertools.count()
        self.reply_seq: dict[int, int] = {}
        self.stray: list = []  # replies nobody waited for, non-objects, binary
        self.closed = asyncio.get_running_loop().create_future()
        self.client = None
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            while True:
                raw = await self.ws.recv()
                n = next(self.seq)
                if not isinstance(raw, str):
                    self.stray.append(("binary message", raw[:100]))
                    continue
                try:
                    msg = json.loads(raw)
                except ValueError:
                    self.stray.append(("text that is not JSON", raw[:200]))
                    continue
                if not isinstance(msg, dict):
                    self.stray.append(("JSON that is not an object", msg))
                    continue
                if "id" in msg:
                    fut = self.pending.pop(msg["id"], None)
                    if fut is None or fut.done():
                        self.stray.append(("reply to no command in flight", msg))
                    else:
                        self.reply_seq[msg["id"]] = n
                        fut.set_result(msg)
                else:
                    self.pushes.put_nowait((n, msg))
        except ConnectionClosed:
            pass
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - reported by whoever waits
            self.stray.append(("reader failed", repr(e)))
        finally:
            if not self.closed.done():
                self.closed.set_result(self.ws.protocol.close_rcvd)

    def check_stray(self) -> None:
        expect(not self.stray, f"{self.label}: unexpected messages from the server: {self.stray}")

    async def send(self, obj) -> None:
        await asyncio.wait_for(self.ws.send(obj if isinstance(obj, (str, bytes)) else json.dumps(obj)), STEP)

    async def call(self, method: str, params=None, *, raw: dict | None = None) -> tuple[dict, dict]:
        """Sends {"id", method: params}; returns (command, reply)."""
        i = next(self.ids)
        cmd = {"id": i, method: {} if params is None else params}
        if raw:
            cmd.update(raw)
        fut = asyncio.get_running_loop().create_future()
        self.pending[i] = fut
        await self.send(cmd)
        done, _ = await asyncio.wait({fut, self.closed}, timeout=STEP, return_when=asyncio.FIRST_COMPLETED)
        if fut in done:
            return cmd, fut.result()
        self.pending.pop(i, None)
        if self.closed in done:
            raise CheckFailed(f"{self.label}: sent {j(cmd)}; the connection closed ({self.closed.result()}) instead of a reply")
        raise CheckFailed(f"{self.label}: sent {j(cmd)}; no reply within {STEP}s")

    async def ok(self, method: str, params=None, **kw) -> dict:
        cmd, reply = await self.call(method, params, **kw)
        expect(
            "error" not in reply and isinstance(reply.get("result"), dict),
            f"{self.label}: sent {j(cmd)}; expected a result, got {j(reply)}",
        )
        expect(reply["id"] == cmd["id"], f"{self.label}: sent {j(cmd)}; reply has id {reply['id']!r}")
        return reply["result"]

    async def err(self, method: str, params, code: int, why: str, **kw) -> dict:
        cmd, reply = await self.call(method, params, **kw)
        error = reply.get("error")
        expect(
            isinstance(error, dict) and error.get("code") == code and "result" not in reply,
            f"{self.label}: sent {j(cmd)}; expected error {code} ({why}), got {j(reply)}",
        )
        expect(
            isinstance(error.get("message"), str),
            f"{self.label}: sent {j(cmd)}; error has no message string: {j(reply)}",
        )
        return error

    async def push(self, kind: str, what: str = "", timeout: float = STEP, skip=()) -> tuple[int, dict]:
        """The next push, which must be of this kind (pushes of the kinds in
        `skip` are passed over); returns (seq, body)."""
        while True:
            n, msg = await self._next_push(kind, what, timeout)
            if not any(k in msg for k in skip):
                break
        expect(
            len(msg) >= 1 and isinstance(msg.get(kind), dict),
            f"{self.label}: waiting for a {kind} push{what}, got {j(msg)}",
        )
        return n, msg[kind]

    async def _next_push(self, kind: str, what: str, timeout: float) -> tuple[int, dict]:
        get = asyncio.ensure_future(self.pushes.get())
        done, _ = await asyncio.wait({get, self.closed}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if get not in done:
            get.cancel()
            state = f"the connection closed ({self.closed.result()})" if self.closed.done() else f"nothing within {timeout}s"
            raise CheckFailed(f"{self.label}: waiting for a {kind} push{what}: {state}")
        return get.result()

    async def pubs(self, count: int, what: str = "") -> list[dict]:
        return [(await self.push("pub", f" ({i + 1} of {count}){what}"))[1] for i in range(count)]

    async def quiet(self, what: str, wait: float = QUIET) -> None:
        """Nothing arrives for `wait` seconds."""
        await asyncio.sleep(wait)
        if not self.pushes.empty():
            raise CheckFailed(f"{self.label}: {what}, but got {j(self.pushes.get_nowait()[1])}")
        self.check_stray()

    async def closed_with(self, code: int | tuple, what: str, timeout: float = STEP) -> None:
        codes = code if isinstance(code, tuple) else (code,)
        code = " or ".join(map(str, codes))
        try:
            frame = await asyncio.wait_for(asyncio.shield(self.closed), timeout)
        except asyncio.TimeoutError:
            extra = []
            while not self.pushes.empty():
                extra.append(self.pushes.get_nowait()[1])
            raise CheckFailed(f"{self.label}: {what}: expected close {code}, still open after {timeout}s (pushes {j(extra)}, stray {self.stray})")
        expect(frame is not None, f"{self.label}: {what}: expected close {code}, the connection ended without a close frame")
        expect(frame.code in codes, f"{self.label}: {what}: expected close {code}, got {frame}")

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.ws.close(), STEP)
        except Exception:  # noqa: BLE001 - already closed or broken: fine here
            pass
        self.reader.cancel()


async def open_ws(base: str, subprotocols=("walkie.v1",)):
    return await connect(
        base + "/ws",
        subprotocols=list(subprotocols) if subprotocols else None,
        open_timeout=STEP,
        close_timeout=2,
        proxy=None,
        max_size=None,
    )


class Session:
    """`async with Session(base, ...) as c`: a connected Walkie client."""

    def __init__(self, base: str, label: str, token: str | None = None, name: str | None = None, do_connect=True,
                 user: str | None = None):
        if user is not None:
            token = globals()["token"](user)
        self.base, self.label, self.token, self.name, self.do_connect = base, label, token, name, do_connect
        self.c: Walkie | None = None

    async def __aenter__(self) -> Walkie:
        ws = await open_ws(self.base)
        self.c = Walkie(ws, self.label)
        if self.do_connect:
            params = {}
            if self.token is not None:
                params["token"] = self.token
            if self.name is not None:
                params["name"] = self.name
            self.c.connected = await self.c.ok("connect", params)
            self.c.client = self.c.connected.get("client")
            self.c.user = self.c.connected.get("user")
        return self.c

    async def __aexit__(self, *exc) -> None:
        await self.c.close()


def check_pub(p: dict, channel: str, offset: int, data, by: "Walkie | None" = None, what="") -> None:
    """A pub push; `by` is the publishing connection (None: the HTTP API)."""
    user, client = (by.user, by.client) if by is not None else (None, None)
    expect(p.get("channel") == channel, f"pub{what}: channel {p.get('channel')!r}, expected {channel!r}: {j(p)}")
    expect(p.get("offset") == offset, f"pub{what}: offset {p.get('offset')!r}, expected {offset}: {j(p)}")
    expect("data" in p and p["data"] == data, f"pub{what}: data {j(p.get('data'))}, expected {j(data)}")
    if client is None:
        expect("info" not in p, f"pub{what}: published through the HTTP API, so `info` must be absent: {j(p)}")
    else:
        info = p.get("info")
        expect(
            isinstance(info, dict) and info.get("user") == user and info.get("client") == client,
            f"pub{what}: info {j(info)}, expected user {user!r} client {client!r}",
        )


# ---------------------------------------------------------------- checks: open server


async def handshake(base: str) -> str:
    notes = []
    for offer in (["walkie.v1"], ["chat", "walkie.v1"], ["walkie.v1", "chat"]):
        ws = await open_ws(base, offer)
        try:
            header = ws.response.headers.get("Sec-WebSocket-Protocol")
            expect(
                ws.subprotocol == "walkie.v1" and header == "walkie.v1",
                f"offered {offer}: Sec-WebSocket-Protocol in the response is {header!r}, expected 'walkie.v1'",
            )
        finally:
            await asyncio.wait_for(ws.close(), STEP)
    for offer in (None, ["walkie.v2"]):
        try:
            ws = await open_ws(base, offer)
            await asyncio.wait_for(ws.close(), STEP)
            raise CheckFailed(f"offered {offer}: handshake accepted (subprotocol {ws.subprotocol!r}), expected HTTP 400")
        except InvalidStatus as e:
            status = e.response.status_code
            body = (e.response.body or b"").decode("utf-8", "replace")
            expect(status == 400, f"offered {offer}: HTTP {status} {body!r}, expected 400")
            expect("walkie.v1" in body, f"offered {offer}: HTTP 400 body {body!r} does not say that walkie.v1 is needed")
            notes.append(body.strip())
    return f"400 body: {notes[0]!r}"


async def connect_anonymous(base: str) -> str:
    async with Session(base, "A") as a, Session(base, "B", name="bob") as b:
        for c in (a, b):
            r = c.connected
            expect(isinstance(r.get("client"), str) and r["client"], f"{c.label}: connect result {j(r)}: no client id")
            expect(r.get("user") == "", f"{c.label}: anonymous connect: user {r.get('user')!r}, expected \"\" ({j(r)})")
            expect("expires_in" not in r, f"{c.label}: anonymous connect has expires_in: {j(r)}")
            pi = r.get("ping_interval")
            expect(isinstance(pi, int) and pi > 0, f"{c.label}: ping_interval {pi!r} is not a number of seconds ({j(r)})")
            expect(r.get("version") == "walkie.v1", f"{c.label}: version {r.get('version')!r} ({j(r)})")
        expect(a.client != b.client, f"two connections got the same client id {a.client!r}")
    async with Session(base, "C", do_connect=False) as c:
        r = await c.ok("connect", {"name": "x" * 64})
        expect(r.get("user") == "", f"connect with a 64-character name: {j(r)}")
    return f"result {j(a.connected)}"


class PingRecorder(ClientConnection):
    """Notes when each WebSocket ping from the server arrives."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pings: list[float] = []

    def process_event(self, event) -> None:
        if getattr(event, "opcode", None) is Opcode.PING:
            self.pings.append(time.monotonic())
        super().process_event(event)


async def keepalive(base: str, interval: str) -> str:
    """The server runs --ping-interval INTERVAL (seconds). connect reports
    it as ping_interval, and a quiet connection gets a WebSocket ping every
    ping_interval seconds."""
    configured = int(interval)
    ws = await connect(base + "/ws", subprotocols=["walkie.v1"], create_connection=PingRecorder,
                       ping_interval=None, open_timeout=STEP, close_timeout=2, proxy=None)
    c = Walkie(ws, "A")
    try:
        start = time.monotonic()
        r = await c.ok("connect", {})
        reported = r.get("ping_interval")
        watch = configured + 2.5
        await asyncio.sleep(watch)  # quiet: nothing sent
        pings = [round(t - start, 1) for t in ws.pings]
        expect(pings, f"no WebSocket ping within {watch}s of quiet (--ping-interval {interval}s; connect said ping_interval {reported})")
        expect(
            reported == configured and abs(pings[0] - reported) <= 1,
            f"server started with --ping-interval {interval}s; connect said ping_interval {reported} ({j(r)}); "
            f"WebSocket pings arrived {pings} s after connect",
        )
        await c.ok("ping", {})
        c.check_stray()
        return f"ping_interval {reported}; pings at {pings} s"
    finally:
        await c.close()


async def before_connect(base: str) -> str:
    async with Session(base, "A", do_connect=False) as a:
        await a.err("subscribe", {"channel": "news"}, 110, "`connect` must come first")
        await a.err("ping", {}, 110, "`connect` must come first")
        await a.err("publish", {"channel": "news", "data": 1}, 110, "`connect` must come first")
        await a.ok("connect", {})
        await a.err("connect", {}, 111, "already connected")
        await a.ok("ping", {})
        a.check_stray()
    return ""


async def bad_commands(base: str) -> str:
    async with Session(base, "A") as a:
        await a.err("frobnicate", {}, 104, "unknown method")
        await a.err("subscribe", {}, 107, "missing required field channel")
        await a.err("subscribe", {"channel": 5}, 107, "mistyped field channel")
        await a.err("unsubscribe", {"channel": ["news"]}, 107, "mistyped field channel")
        await a.err("publish", {"channel": "news"}, 107, "missing required field data")
        await a.err("publish", {"data": 1}, 107, "missing required field channel")
        await a.err("publish", {"channel": "news", "data": 1, "idempotency_key": 7}, 107, "idempotency_key: a string")
        await a.err("publish", {"channel": "news", "data": 1, "idempotency_key": "k" * 65}, 107, "idempotency_key: at most 64 bytes")
        await a.err("history", {"channel": "news", "limit": "ten"}, 107, "mistyped field limit")
        await a.err("history", {"channel": "news", "reverse": "yes"}, 107, "mistyped field reverse")
        await a.err("subscribe", {"channel": "news", "recover": "yes", "offset": 0, "epoch": "x"}, 107, "mistyped field recover")
        await a.err("presence", {}, 107, "missing required field channel")
        await a.err("refresh", {}, 107, "missing required field token")
        # Unknown fields are ignored.
        r = await a.ok("ping", {"unknown": [1, 2]})
        expect(r == {}, f"ping with an unknown field: result {j(r)}, expected {{}}")
        r = await a.ok("subscribe", {"channel": unique("news-"), "colour": "blue"})
        expect("offset" in r and "epoch" in r, f"subscribe with an unknown field: {j(r)}")
        a.check_stray()
    return ""


async def close_with_4000(base: str, message, what: str) -> str:
    async with Session(base, "A") as a:
        await a.ok("ping", {})
        await a.send(message)
        await a.closed_with(4000, f"after sending {what}")
    return f"closed with {a.closed.result()}"


async def ping(base: str) -> str:
    async with Session(base, "A") as a:
        for _ in range(3):
            start = time.monotonic()
            r = await a.ok("ping", {})
            expect(r == {}, f"ping: result {j(r)}, expected {{}}")
        rtt = time.monotonic() - start
        # Commands in flight together: each reply carries its command's id.
        results = await asyncio.gather(*(a.ok("ping", {}) for _ in range(20)))
        expect(all(r == {} for r in results), f"20 pings in flight: {results}")
        a.check_stray()
        return f"round trip {1000 * rtt:.1f} ms"


async def open_default(base: str) -> str:
    """Without --config: anonymous clients, an open default namespace and
    `rooms` namespace, no other namespace."""
    ch = unique("news-")
    joins = ("join", "leave")  # this namespace may have join/leave on
    async with Session(base, "A") as a, Session(base, "B") as b:
        for x in (a, b):
            r = await x.ok("subscribe", {"channel": ch})
        r = await b.ok("publish", {"channel": ch, "data": {"text": "hi"}})
        for x in (a, b):
            _, p = await x.push("pub", skip=joins)
            check_pub(p, ch, r["offset"], {"text": "hi"}, b)
        room = unique("rooms:")
        await a.ok("subscribe", {"channel": room})
        r = await a.ok("publish", {"channel": room, "data": "in a room"})
        _, p = await a.push("pub", skip=joins)
        check_pub(p, room, r["offset"], "in a room", a)
        await a.err("subscribe", {"channel": "other:x"}, 102, "a namespace the server does not know")
        # Presence, if the default namespace has it: anonymous under "".
        cmd, reply = await a.call("presence", {"channel": ch})
        note = f"presence: {j(reply)}"
        if "error" in reply:
            expect(reply["error"].get("code") == 108, f"sent {j(cmd)}; got {j(reply)}")
        else:
            res = reply["result"]
            expect(set(res.get("clients", {})) == {a.client, b.client}, f"presence: {j(res)}")
            users = res.get("users")
            entries = list(users.values()) if isinstance(users, dict) else users
            expect(isinstance(entries, list) and len(entries) == 1 and entries[0].get("user") == ""
                   and entries[0].get("clients") == 2,
                   f"presence of two anonymous connections: users {j(users)}, expected one entry under \"\" with clients 2")
    return note


async def rooms_bridge(base: str) -> str:
    """A room member's messages (WebSocket /rooms/NAME, README) reach the
    channel rooms:NAME as pub pushes with `text` or `base64`."""
    name = unique("bridge")
    ch = f"rooms:{name}"
    async with Session(base, "A") as a:
        r = await a.ok("subscribe", {"channel": ch})
        member = await connect(base + f"/rooms/{name}", open_timeout=STEP, close_timeout=2, proxy=None)
        try:
            await member.send("hello room")
            await member.send(b"\x00\x01\xfe")
            _, p1 = await a.push("pub", " (a member's text)", skip=("join", "leave"))
            _, p2 = await a.push("pub", " (a member's binary)", skip=("join", "leave"))
        finally:
            await asyncio.wait_for(member.close(), STEP)
        first = r["offset"] + 1
        expect(p1.get("channel") == ch and p1.get("text") == "hello room" and "data" not in p1,
               f"pub from a room member's text message: {j(p1)}, expected text 'hello room'")
        expect(p2.get("channel") == ch and p2.get("base64") == "AAH+" and "data" not in p2,
               f"pub from a room member's binary message: {j(p2)}, expected base64 'AAH+'")
        expect([p1.get("offset"), p2.get("offset")] == [first, first + 1], f"offsets {p1.get('offset')}, {p2.get('offset')}, expected {first}, {first + 1}")
    return f"{j(p1)} {j(p2)}"


# ---------------------------------------------------------------- checks: auth server


async def channel_errors(base: str) -> str:
    async with Session(base, "A", user="a") as a:
        for ch in ("nosuchns:x", "nosuchns:"):
            await a.err("subscribe", {"channel": ch}, 102, "a namespace the server does not know")
        await a.err("publish", {"channel": "nosuchns:x", "data": 1}, 102, "a namespace the server does not know")
        await a.err("history", {"channel": "nosuchns:x"}, 102, "a namespace the server does not know")
        for ch, why in (
            ("", "empty name"),
            ("chat:a b", "whitespace"),
            ("chat:a\tb", "whitespace"),
            ("chat:a\u0001b", "a control character"),
            ("chat:" + "x" * 251, "256 bytes"),
        ):
            await a.err("subscribe", {"channel": ch}, 102, f"invalid channel name ({why})")
        longest = "chat:" + "x" * 250
        await a.ok("subscribe", {"channel": longest})
        await a.err("subscribe", {"channel": longest}, 105, "already subscribed")
        r = await a.ok("unsubscribe", {"channel": longest})
        expect(r == {}, f"unsubscribe: result {j(r)}, expected {{}}")
        await a.err("unsubscribe", {"channel": longest}, 113, "not subscribed")
        await a.err("unsubscribe", {"channel": unique("chat:never-")}, 113, "not subscribed")
        a.check_stray()
    return ""


async def not_available(base: str) -> str:
    async with Session(base, "A", user="a") as a:
        live = unique("live:")
        await a.ok("subscribe", {"channel": live})
        await a.err("presence", {"channel": live}, 108, "presence is off in namespace live")
        await a.err("presence_stats", {"channel": live}, 108, "presence is off in namespace live")
        await a.err("history", {"channel": live}, 108, "history is off in namespace live (history_size = 0)")
        ro = unique("ro:")
        await a.ok("subscribe", {"channel": ro})
        await a.err("publish", {"channel": ro, "data": 1}, 108, "client publish is off in namespace ro")
        a.check_stray()
    return ""


async def pubsub(base: str) -> str:
    ch = unique("news:pubsub-")
    values = [{"text": "hi"}, 42, "plain string", [1, "two", None], None, True, {"nested": {"a": [1.5]}}]
    async with Session(base, "A", user="alice", name="alice") as a, Session(base, "B", user="b") as b:
        sub = await a.ok("subscribe", {"channel": ch})
        expect(sub.get("offset") == 0, f"A: subscribe to a new channel: offset {sub.get('offset')!r}, expected 0: {j(sub)}")
        epoch = sub.get("epoch")
        expect(isinstance(epoch, str) and epoch, f"A: subscribe: epoch {epoch!r}")
        # B publishes without being subscribed.
        for i, v in enumerate(values, 1):
            r = await b.ok("publish", {"channel": ch, "data": v})
            expect(r.get("offset") == i and r.get("epoch") == epoch,
                   f"B: publish {i}: result {j(r)}, expected offset {i} epoch {epoch!r}")
            expect(r.get("duplicate") is False, f"B: publish {i} without an idempotency key: duplicate {r.get('duplicate')!r}")
        for i, (v, p) in enumerate(zip(values, await a.pubs(len(values))), 1):
            check_pub(p, ch, i, v, b, f" {i} to A")
            expect("key" not in p, f"pub {i}: published without key, has key: {j(p)}")
        await a.quiet("B published nothing more")
        await b.quiet("B is not subscribed")

        # A subscriber's own publish: the reply comes before the push.
        await b.ok("subscribe", {"channel": ch})
        n = len(values) + 1
        r = await b.ok("publish", {"channel": ch, "data": "mine"})
        reply_at = b.reply_seq[max(b.reply_seq)]
        at, p = await b.push("pub", " (B's own)")
        expect(reply_at < at, "B: the pub caused by publish arrived before its reply")
        check_pub(p, ch, n, "mine", b, " to B")
        expect(r.get("offset") == n, f"B: publish result {j(r)}, expected offset {n}")
        _, p = await a.push("pub", " (B's own)")
        check_pub(p, ch, n, "mine", b, " to A")

        r = await a.ok("unsubscribe", {"channel": ch})
        expect(r == {}, f"A: unsubscribe: {j(r)}")
        await b.ok("publish", {"channel": ch, "data": "after"})
        _, p = await b.push("pub")
        check_pub(p, ch, n + 1, "after", b)
        await a.quiet("A unsubscribed")
        b.check_stray()
        # `key`: the state key, in a latest-per-key namespace.
        scores = unique("scores:")
        await a.ok("subscribe", {"channel": scores})
        await b.ok("publish", {"channel": scores, "data": {"home": 1}, "key": "match-1"})
        _, p = await a.push("pub", " (keyed)")
        check_pub(p, scores, 1, {"home": 1}, b, " (keyed)")
        expect(p.get("key") == "match-1", f"pub published with key match-1: {j(p)}")
        # "only in namespaces with overflow = latest_per_key; elsewhere error 107"
        cmd, reply = await b.call("publish", {"channel": ch, "data": 1, "key": "k"})
        expect(reply.get("error", {}).get("code") == 107, f"B: sent {j(cmd)}; got {j(reply)}, expected error 107")
        a.check_stray()
    return f"{n + 1} messages, epoch {epoch}; `key` outside latest_per_key: {j(reply)}"


async def no_history(base: str) -> str:
    ch = unique("live:")
    async with Session(base, "A", user="a") as a:
        sub = await a.ok("subscribe", {"channel": ch})
        for v in ("one", "two"):
            r = await a.ok("publish", {"channel": ch, "data": v})
            expect(r.get("offset") == 0, f"publish in a namespace without history: {j(r)}, expected offset 0")
            _, p = await a.push("pub")
            check_pub(p, ch, 0, v, a)
    return f"subscribe {j(sub)}"


async def idempotency(base: str) -> str:
    ch = unique("news:idem-")
    async with Session(base, "A", user="a") as a, Session(base, "B", user="b") as b:
        await a.ok("subscribe", {"channel": ch})
        r1 = await b.ok("publish", {"channel": ch, "data": "once", "idempotency_key": "k-1"})
        expect(r1.get("duplicate") is False and r1.get("offset") == 1, f"first publish with key k-1: {j(r1)}")
        r2 = await b.ok("publish", {"channel": ch, "data": "once", "idempotency_key": "k-1"})
        expect(r2.get("duplicate") is True, f"second publish with key k-1: {j(r2)}, expected duplicate true")
        r3 = await b.ok("publish", {"channel": ch, "data": "other", "idempotency_key": "k" * 64})
        expect(r3.get("duplicate") is False and r3.get("offset") == 2, f"publish with a new 64-byte key: {j(r3)}, expected offset 2")
        _, p = await a.push("pub")
        check_pub(p, ch, 1, "once", b)
        _, p = await a.push("pub")
        check_pub(p, ch, 2, "other", b)
        await a.quiet("the duplicate must not be delivered again")
        h = await a.ok("history", {"channel": ch})
        offs = [x.get("offset") for x in h.get("publications", [])]
        expect(offs == [1, 2], f"history after a duplicate: offsets {offs}, expected [1, 2]")
    return f"duplicate reply {j(r2)}"


async def history(base: str) -> str:
    ch = unique("news:hist-")
    async with Session(base, "A", user="a") as a:
        datas = [{"n": i} for i in range(1, 6)]
        epoch = None
        for d in datas:
            epoch = (await a.ok("publish", {"channel": ch, "data": d}))["epoch"]

        def offsets(r):
            return [p.get("offset") for p in r.get("publications", [])]

        r = await a.ok("history", {"channel": ch})
        expect(r.get("offset") == 5 and r.get("epoch") == epoch, f"history: offset/epoch {j(r)}, expected 5 / {epoch}")
        pubs = r.get("publications")
        expect(isinstance(pubs, list) and offsets(r) == [1, 2, 3, 4, 5], f"history: {j(r)}")
        for i, p in enumerate(pubs, 1):
            expect(p.get("data") == {"n": i}, f"history publication {i}: {j(p)}")
            info = p.get("info")
            expect(isinstance(info, dict) and info.get("user") == a.user and info.get("client") == a.client,
                   f"history publication {i}: info {j(info)}, expected user {a.user!r} client {a.client!r} as in pub pushes")
        results = {}
        for params, want in (
            ({"since": {"offset": 2, "epoch": epoch}}, [3, 4, 5]),
            ({"since": {"offset": 5, "epoch": epoch}}, []),
            ({"since": {"offset": 2, "epoch": epoch}, "limit": 2}, [3, 4]),
            ({"reverse": True}, [5, 4, 3, 2, 1]),
            ({"reverse": True, "limit": 2}, [5, 4]),
            ({"limit": 1000}, [1, 2, 3, 4, 5]),
        ):
            r = await a.ok("history", {"channel": ch, **params})
            expect(offsets(r) == want, f"history {j(params)}: offsets {offsets(r)}, expected {want}")
        # "the oldest kept messages first"; "with reverse, the newest first,
        # down to the first after since"; "larger values count as 1000, 0
        # returns no messages, only the position"; a since of another epoch
        # "is ignored".
        for params, want in (
            ({"limit": 2}, [1, 2]),
            ({"since": {"offset": 2, "epoch": epoch}, "reverse": True}, [5, 4, 3]),
            ({"limit": 5000}, [1, 2, 3, 4, 5]),
            ({"limit": 0}, []),
            ({"since": {"offset": 3, "epoch": "not-" + epoch}}, [1, 2, 3, 4, 5]),
        ):
            r = await a.ok("history", {"channel": ch, **params})
            results[j(params)] = offsets(r)
            expect(offsets(r) == want, f"history {j(params)}: offsets {offsets(r)}, expected {want}")
            expect(r.get("offset") == 5 and r.get("epoch") == epoch, f"history {j(params)}: position {j(r)}")
        a.check_stray()
    return ", ".join(f"{k}: {v}" for k, v in results.items())


async def subscribe_history(base: str) -> str:
    ch = unique("news:replay-")
    async with Session(base, "A", user="a") as a, Session(base, "B", user="b") as b:
        for i in range(1, 6):
            await b.ok("publish", {"channel": ch, "data": i})
        r = await a.ok("subscribe", {"channel": ch, "history": 3})
        expect(r.get("history") == 3 and r.get("offset") == 5, f"subscribe history 3 after 5 messages: {j(r)}, expected history 3, offset 5")
        reply_at = a.reply_seq[max(a.reply_seq)]
        got = []
        for i in (3, 4, 5):
            at, p = await a.push("pub", f" (history {i})")
            expect(at > reply_at, "a pub from history arrived before the subscribe reply")
            check_pub(p, ch, i, i, b)
            got.append(i)
        await b.ok("publish", {"channel": ch, "data": 6})
        _, p = await a.push("pub", " (live 6)")
        check_pub(p, ch, 6, 6, b)
        await a.quiet("after the live message")
        # More than the namespace keeps: tiny keeps 3.
        tiny = unique("tiny:")
        for i in range(1, 6):
            await b.ok("publish", {"channel": tiny, "data": i})
        # "N at most the namespace's history size, else error 107"
        async with Session(base, "C", user="c") as c:
            cmd, reply = await c.call("subscribe", {"channel": tiny, "history": 10})
            expect(reply.get("error", {}).get("code") == 107, f"C: sent {j(cmd)}; got {j(reply)}, expected error 107")
            r = await c.ok("subscribe", {"channel": tiny, "history": 3})
            expect(r.get("history") == 3, f"subscribe history 3 in a namespace keeping 3: {j(r)}")
            for i in (3, 4, 5):
                _, p = await c.push("pub")
                check_pub(p, tiny, i, i, b)
            await c.quiet("history size is 3")
    return f"history 10 where 3 are kept: {j(reply)}"


async def recovery(base: str) -> str:
    ch = unique("news:recover-")
    async with Session(base, "B", user="b") as b:
        async with Session(base, "A1", user="a1") as a:
            sub = await a.ok("subscribe", {"channel": ch})
            epoch = sub["epoch"]
            for i in (1, 2):
                await b.ok("publish", {"channel": ch, "data": i})
            last = None
            for p in await a.pubs(2):
                last = p
            expect(last.get("offset") == 2, f"A1: last pub {j(last)}")
        # A1 is gone; three messages while it is away.
        for i in (3, 4, 5):
            await b.ok("publish", {"channel": ch, "data": i})
        async with Session(base, "A2", user="a2") as a:
            expect(a.client, "A2: no client id")
            r = await a.ok("subscribe", {"channel": ch, "recover": True, "offset": 2, "epoch": epoch})
            expect(r.get("recovered") is True, f"A2: recover from 2 in epoch {epoch}: {j(r)}, expected recovered true")
            expect(r.get("epoch") == epoch, f"A2: recover: epoch {j(r)}, expected {epoch}")
            expect(r.get("history") == 3, f"A2: recover: `history` {r.get('history')!r}, expected 3 messages to follow ({j(r)})")
            reply_at = a.reply_seq[max(a.reply_seq)]
            for i in (3, 4, 5):
                at, p = await a.push("pub", f" (missed {i})")
                expect(at > reply_at, "a recovered pub arrived before the subscribe reply")
                check_pub(p, ch, i, i, b, f" (missed {i})")
            await b.ok("publish", {"channel": ch, "data": 6})
            _, p = await a.push("pub", " (live 6)")
            check_pub(p, ch, 6, 6, b, " (live 6)")
            await a.quiet("every message arrived once")
        # Nothing missed: recovered, nothing follows.
        async with Session(base, "A3", user="a3") as a:
            r = await a.ok("subscribe", {"channel": ch, "recover": True, "offset": 6, "epoch": epoch})
            expect(r.get("recovered") is True and r.get("offset") == 6, f"A3: recover from the current offset: {j(r)}")
            await a.quiet("nothing was missed")
    return f"reply {j(r)}"


async def recovery_large(base: str) -> str:
    """docs/protocol.md: a recovery larger than the connection's queue
    (`--client-queue`, 1024 by default) comes piece by piece; the client
    still gets every missed message once, in order, then live ones."""
    ch = unique("backlog:")
    missed = 1500
    async with Session(base, "B", user="b") as b:
        async with Session(base, "A1", user="a1") as a:
            epoch = (await a.ok("subscribe", {"channel": ch}))["epoch"]
        for i in range(1, missed + 1):
            await b.ok("publish", {"channel": ch, "data": i})
        async with Session(base, "A2", user="a2") as a:
            r = await a.ok("subscribe", {"channel": ch, "recover": True, "offset": 0, "epoch": epoch})
            expect(r.get("recovered") is True and r.get("history") == missed and r.get("offset") == missed,
                   f"A2: recover {missed} missed: {j(r)}, expected recovered true, history {missed}")
            await b.ok("publish", {"channel": ch, "data": missed + 1})
            for i in range(1, missed + 2):
                _, p = await a.push("pub", f" ({i} of {missed + 1})")
                check_pub(p, ch, i, i, b, f" ({i} of {missed + 1})")
            await a.quiet("every message arrived once")
    return f"{missed} recovered, then live"


async def recovery_impossible(base: str) -> str:
    ch = unique("news:norecover-")
    async with Session(base, "B", user="b") as b:
        for i in (1, 2, 3):
            r = await b.ok("publish", {"channel": ch, "data": i})
        epoch = r["epoch"]
        wrong = "not-" + epoch
        async with Session(base, "A", user="a") as a:
            r = await a.ok("subscribe", {"channel": ch, "recover": True, "offset": 1, "epoch": wrong})
            expect(r.get("recovered") is False, f"recover with a wrong epoch: {j(r)}, expected recovered false")
            expect(r.get("offset") == 3 and r.get("epoch") == epoch,
                   f"recover with a wrong epoch: {j(r)}, expected the new starting point offset 3 epoch {epoch}")
            await a.quiet("nothing from history follows an impossible recovery")
            await b.ok("publish", {"channel": ch, "data": 4})
            _, p = await a.push("pub")
            check_pub(p, ch, 4, 4, b, " (live after failed recovery)")
        # History trimmed: tiny keeps 3, the client missed 6.
        tiny = unique("tiny:")
        for i in range(1, 8):
            r = await b.ok("publish", {"channel": tiny, "data": i})
        tepoch = r["epoch"]
        async with Session(base, "C", user="c") as c:
            r = await c.ok("subscribe", {"channel": tiny, "recover": True, "offset": 1, "epoch": tepoch})
            expect(r.get("recovered") is False and r.get("offset") == 7 and r.get("epoch") == tepoch,
                   f"recover from 1 in a channel keeping 3 of 7: {j(r)}, expected recovered false, offset 7")
            await c.quiet("nothing from history follows an impossible recovery")
        # An offset in the future of the channel cannot be recovered either.
        async with Session(base, "D", user="d") as d:
            r = await d.ok("subscribe", {"channel": ch, "recover": True, "offset": 99, "epoch": epoch})
            expect(r.get("recovered") is False and r.get("offset") == 4, f"recover from 99 of 4: {j(r)}")
            await d.quiet("nothing follows")
    return ""


async def presence(base: str) -> str:
    ch = unique("chat:presence-")
    t7 = token("7", info={"color": "red"})
    async with (
        Session(base, "A", user="alice", name="alice") as a,
        Session(base, "B", token=t7, name="ignored") as b,
        Session(base, "C", token=t7) as c,
        Session(base, "D", do_connect=False) as d,
    ):
        # "name ... at most 64 characters": a longer one is refused (107)
        # or shown cut to 64.
        long_name = "n" * 60 + "é" * 10
        cmd, reply = await d.call("connect", {"name": long_name, "token": token("long")})
        d.client = reply.get("result", {}).get("client")
        if "error" in reply:
            expect(reply["error"].get("code") == 107, f"D: sent {j(cmd)}; got {j(reply)}, expected 107 or a name cut to 64")
        else:
            await d.ok("subscribe", {"channel": ch})
        for x in (a, b, c):
            await x.ok("subscribe", {"channel": ch})
        r = await a.ok("presence", {"channel": ch})
        clients = r.get("clients")
        if d.client is not None:
            shown = clients.get(d.client, {}).get("info", {}).get("name") if isinstance(clients, dict) else None
            expect(isinstance(shown, str) and len(shown) <= 64,
                   f"connect with a {len(long_name)}-character name was accepted, and presence shows info.name {shown!r} "
                   f"({len(shown) if isinstance(shown, str) else '-'} characters); the doc says at most 64")
            await d.ok("unsubscribe", {"channel": ch})
            r = await a.ok("presence", {"channel": ch})
            clients = r.get("clients")
        expect(isinstance(clients, dict) and set(clients) == {a.client, b.client, c.client},
               f"presence: clients {j(clients)}, expected keys {[a.client, b.client, c.client]}")
        want = {
            a.client: {"user": "alice", "client": a.client, "info": {"name": "alice"}},
            b.client: {"user": "7", "client": b.client, "info": {"color": "red"}},
            c.client: {"user": "7", "client": c.client, "info": {"color": "red"}},
        }
        for cid, w in want.items():
            got = clients[cid]
            for k, v in w.items():
                expect(got.get(k) == v, f"presence entry {cid}: {j(got)}, expected {k} = {j(v)}")
        users = r.get("users")
        # "one entry per user ... (anonymous connections under \"\")": an
        # object keyed by user id, or a list of entries.
        entries = list(users.values()) if isinstance(users, dict) else users
        expect(isinstance(entries, list) and len(entries) == 2, f"presence: users {j(users)}, expected 2 entries")
        by_user = {e.get("user"): e for e in entries}
        expect(set(by_user) == {"alice", "7"}, f"presence users: {j(users)}")
        if isinstance(users, dict):
            expect(set(users) == {"alice", "7"}, f"presence users keyed by {list(users)}")
        expect(by_user["7"].get("clients") == 2 and by_user["7"].get("info") == {"color": "red"}, f"presence user 7: {j(by_user['7'])}")
        expect(by_user["alice"].get("clients") == 1, f"presence user alice: {j(by_user['alice'])}")
        s = await a.ok("presence_stats", {"channel": ch})
        expect(s.get("clients") == 3 and s.get("users") == 2, f"presence_stats: {j(s)}, expected clients 3 users 2")
        await c.ok("unsubscribe", {"channel": ch})
        s = await a.ok("presence_stats", {"channel": ch})
        expect(s.get("clients") == 2 and s.get("users") == 2, f"presence_stats after C unsubscribed: {j(s)}")
    named = f"shown as {len(shown)} characters" if d.client is not None else f"refused: {j(reply)}"
    return f"users {'object' if isinstance(users, dict) else 'list'}: {j(users)}; a {len(long_name)}-character name: {named}"


async def join_leave(base: str) -> str:
    ch = unique("chat:jl-")
    notes = []

    async def next_about(x, kind, other):
        """The next push; the doc does not say whether a client gets its own
        join, so one about itself is skipped (and noted)."""
        while True:
            _, msg = await x.push(kind, f" about {other.label}")
            if kind == "join" and msg.get("info", {}).get("client") == x.client:
                notes.append(f"{x.label} got its own join")
                continue
            return msg

    async with Session(base, "A", user="a") as a:
        await a.ok("subscribe", {"channel": ch})
        async with Session(base, "B", user="bob", name="bob") as b:
            await b.ok("subscribe", {"channel": ch})
            want = {"user": "bob", "client": b.client, "info": {"name": "bob"}}
            m = await next_about(a, "join", b)
            expect(m.get("channel") == ch and m.get("info") == want, f"A: join push {j(m)}, expected info {j(want)}")
            await b.ok("unsubscribe", {"channel": ch})
            m = await next_about(a, "leave", b)
            expect(m.get("channel") == ch and m.get("info") == want, f"A: leave push after unsubscribe {j(m)}, expected info {j(want)}")
        async with Session(base, "C", token=token("9", info={"role": "mod"})) as c:
            await c.ok("subscribe", {"channel": ch})
            want = {"user": "9", "client": c.client, "info": {"role": "mod"}}
            m = await next_about(a, "join", c)
            expect(m.get("info") == want, f"A: join push {j(m)}, expected info {j(want)}")
        m = await next_about(a, "leave", c)  # C disconnected
        expect(m.get("channel") == ch and m.get("info") == want, f"A: leave push after disconnect {j(m)}, expected info {j(want)}")
        await a.quiet("no more joins or leaves")
    return "; ".join(sorted(set(notes))) or "no own join"


async def connect_token(base: str) -> str:
    t = token("42", exp_in=600, info={"a": 1})
    async with Session(base, "A", token=t) as a:
        r = a.connected
        expect(r.get("user") == "42", f"connect with sub 42: {j(r)}")
        expect(isinstance(r.get("expires_in"), int) and 590 <= r["expires_in"] <= 600, f"connect with a token expiring in 600s: {j(r)}")
        expect(r.get("version") == "walkie.v1", f"{j(r)}")
    async with Session(base, "B", token=token("43", exp_in=None)) as b:
        r = b.connected
        expect(r.get("user") == "43" and "expires_in" not in r, f"connect with a token without exp: {j(r)}, expected no expires_in")
    async with Session(base, "C") as c:
        expect(c.connected.get("user") == "", f"anonymous connect: {j(c.connected)}")
    return ""


async def refresh(base: str) -> str:
    async with Session(base, "A", token=token("42", exp_in=3)) as a:
        r = a.connected
        expect(r.get("expires_in") in (1, 2, 3), f"connect with a token expiring in 3s: {j(r)}")
        r = await a.ok("refresh", {"token": token("42", exp_in=600)})
        expect(isinstance(r.get("expires_in"), int) and 590 <= r["expires_in"] <= 600, f"refresh with a token for 600s: {j(r)}")
        await a.err("refresh", {"token": token("42", exp_in=-10)}, 109, "token expired")
        await a.err("refresh", {"token": token("42", key="wrong-" + SECRET)}, 101, "a bad token")
        cmd, reply = await a.call("refresh", {"token": token("43", exp_in=600)})
        expect("error" in reply and "result" not in reply, f"refresh with a token for another sub: sent {j(cmd)}, got {j(reply)}")
        other = reply["error"]
        await asyncio.sleep(4)  # past the first token's exp
        r = await a.ok("ping", {})
        expect(not a.closed.done(), "closed although refreshed")
    return f"refresh for another sub: {j(other)}"


async def expiry(base: str) -> str:
    async with Session(base, "A", token=token("42", exp_in=2)) as a:
        start = time.monotonic()
        await a.closed_with(4002, "token expired 2s after connect, not refreshed", timeout=8)
        return f"closed with {a.closed.result()} after {time.monotonic() - start:.1f}s"


async def jwt_refused(base: str) -> str:
    notes = []
    # "a token that is not valid ... closes the connection with 4001; an
    # expired token closes it with 4002. Neither gets a reply."
    cases = [
        ("expired", token("42", exp_in=-60), (4002,)),
        ("wrong signature", token("42", key="wrong-" + SECRET), (4001,)),
        ("not a JWT", "not-a-jwt", (4001,)),
        ("no sub", token(None), (4001,)),
    ]
    for what, tok, close in cases:
        async with Session(base, what, do_connect=False) as c:
            cmd = {"token": tok}
            try:
                _, reply = await c.call("connect", cmd)
            except CheckFailed:
                reply = None  # closed without a reply
            expect(reply is None, f"connect with a token ({what}): got {j(reply)}, expected no reply")
            await c.closed_with(close, f"connect with a token ({what})")
            notes.append(f"{what}: {j(reply) if reply else 'no reply'}, {c.closed.result()}")
    return "; ".join(notes)


async def claims(base: str) -> str:
    t = token("42", channels=["priv:a", "priv:b*"])
    async with Session(base, "A", token=t) as a, Session(base, "Anon") as anon:
        await a.ok("subscribe", {"channel": "priv:a"})
        await a.ok("subscribe", {"channel": "priv:bcd"})
        e = await a.err("subscribe", {"channel": "priv:c"}, 103, "permission denied: not in the token's channels")
        await a.err("subscribe", {"channel": "priv:ab"}, 103, "permission denied: `priv:a` is exact")
        await anon.err("subscribe", {"channel": "priv:a"}, 103, "permission denied: anonymous, no channels claim")
        # A private channel's messages reach its subscribers.
        await a.ok("publish", {"channel": "priv:a", "data": "p"})
        _, p = await a.push("pub")
        check_pub(p, "priv:a", 1, "p", a)
        a.check_stray()
    return f"denied: {j(e)}"


async def subscription_tokens(base: str) -> str:
    async with Session(base, "A", user="42") as a:
        st = token("42", exp_in=600, channel="priv:z")
        r = await a.ok("subscribe", {"channel": "priv:z", "token": st})
        expect("offset" in r and "epoch" in r, f"subscribe with a subscription token: {j(r)}")
        await a.err("subscribe", {"channel": "priv:y", "token": st}, 103, "the subscription token grants priv:z, not priv:y")
        await a.err("subscribe", {"channel": "priv:x", "token": token("42", exp_in=-60, channel="priv:x")}, 109, "token expired")
        cmd, reply = await a.call("subscribe", {"channel": "priv:w", "token": token("43", channel="priv:w")})
        expect("error" in reply and "result" not in reply, f"subscription token of another user: sent {j(cmd)}, got {j(reply)}")
        await a.err("subscribe", {"channel": "priv:v", "token": token("42", channel="priv:v", key="wrong-" + SECRET)},
                    101, "unauthorized: a bad token (a wrongly signed subscription token)")
        a.check_stray()
    return f"another user's subscription token: {j(reply['error'])}"


async def subscription_expiry(base: str) -> str:
    """A subscription token that expires: the server removes the
    subscription with an `unsubscribe` push (channel, code, reason)."""
    async with Session(base, "A", user="42") as a:
        await a.ok("subscribe", {"channel": "priv:expiring", "token": token("42", exp_in=2, channel="priv:expiring")})
        _, u = await a.push("unsubscribe", " (subscription token expired)", timeout=8)
        expect(u.get("channel") == "priv:expiring" and isinstance(u.get("code"), int) and isinstance(u.get("reason"), str),
               f"unsubscribe push {j(u)}, expected channel priv:expiring, a code and a reason")
        await a.err("unsubscribe", {"channel": "priv:expiring"}, 113, "not subscribed: the server removed the subscription")
        await a.ok("ping", {})
    return f"push {j(u)}"


async def user_channels(base: str) -> str:
    mine = "notifications:#42"
    both = "notifications:#42,43"
    async with (
        Session(base, "U42a", token=token("42")) as u1,
        Session(base, "U42b", token=token("42")) as u2,
        Session(base, "U43", token=token("43")) as u3,
        Session(base, "U44", token=token("44")) as u4,
        Session(base, "Anon") as anon,
    ):
        for x in (u1, u2):
            await x.ok("subscribe", {"channel": mine})
        await u3.err("subscribe", {"channel": mine}, 103, "notifications:#42 is user 42's")
        await anon.err("subscribe", {"channel": mine}, 103, "notifications:#42 is user 42's")
        r = await u1.ok("publish", {"channel": mine, "data": "to all my tabs"})
        for x in (u1, u2):
            _, p = await x.push("pub")
            check_pub(p, mine, r["offset"], "to all my tabs", u1)
        for x in (u1, u3):
            await x.ok("subscribe", {"channel": both})
        await u4.err("subscribe", {"channel": both}, 103, "notifications:#42,43 is users 42's and 43's")
        r = await u3.ok("publish", {"channel": both, "data": "dm"})
        for x in (u1, u3):
            _, p = await x.push("pub")
            check_pub(p, both, r["offset"], "dm", u3)
        for x in (u2, u4, anon):
            await x.quiet("not subscribed to the dm channel")
    return ""


def http(base: str, path: str, body, key: str | None = API_KEY) -> tuple[int, str, object]:
    url = base.replace("ws://", "http://", 1) + path
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    if key is not None:
        req.add_header("Authorization", f"apikey {key}")
    try:
        with urllib.request.urlopen(req, timeout=STEP) as resp:
            status, ctype, text = resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()
    except urllib.error.HTTPError as e:
        status, ctype, text = e.code, e.headers.get("Content-Type", ""), e.read().decode()
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    return status, ctype, (parsed if parsed is not None else text)


async def http_api(base: str) -> str:
    ch = unique("news:api-")
    notes = []
    async with Session(base, "A", user="a") as a:
        sub = await a.ok("subscribe", {"channel": ch})
        results = []
        for i, d in enumerate([{"title": "hello"}, 7], 1):
            status, _, r = await asyncio.to_thread(http, base, "/api/publish", {"channel": ch, "data": d})
            expect(status == 200 and isinstance(r, dict), f"POST /api/publish {j({'channel': ch, 'data': d})}: HTTP {status} {j(r)}")
            expect(r.get("offset") == i and r.get("epoch") == sub["epoch"] and r.get("duplicate") is False,
                   f"POST /api/publish: {j(r)}, expected offset {i} epoch {sub['epoch']} duplicate false")
            _, p = await a.push("pub", " (from the HTTP API)")
            check_pub(p, ch, i, d, what=" from the HTTP API")
            results.append(r)
        body = {"channel": ch, "data": "idem", "idempotency_key": "api-1"}
        _, _, r1 = await asyncio.to_thread(http, base, "/api/publish", body)
        _, _, r2 = await asyncio.to_thread(http, base, "/api/publish", body)
        expect(isinstance(r1, dict) and r1.get("duplicate") is False and r1.get("offset") == 3, f"POST /api/publish with a new idempotency key: {j(r1)}")
        expect(isinstance(r2, dict) and r2.get("duplicate") is True, f"POST /api/publish, the same idempotency key again: {j(r2)}")
        _, p = await a.push("pub")
        check_pub(p, ch, 3, "idem")
        await a.quiet("a duplicate is not delivered again")

        status, _, h = await asyncio.to_thread(http, base, "/api/history", {"channel": ch, "limit": 10})
        expect(status == 200 and isinstance(h, dict), f"POST /api/history: HTTP {status} {j(h)}")
        offs = [p.get("offset") for p in h.get("publications", [])]
        expect(offs == [1, 2, 3] and h.get("offset") == 3 and h.get("epoch") == sub["epoch"], f"POST /api/history: {j(h)}")

        for what, path, body, key in (
            ("wrong API key", "/api/publish", {"channel": ch, "data": 1}, "wrong"),
            ("no API key", "/api/publish", {"channel": ch, "data": 1}, None),
            ("wrong API key", "/api/history", {"channel": ch}, "wrong"),
            ("body not JSON", "/api/publish", b"{not json", API_KEY),
            ("no channel", "/api/publish", {"data": 1}, API_KEY),
            ("unknown namespace", "/api/publish", {"channel": "nosuchns:x", "data": 1}, API_KEY),
            ("invalid channel name", "/api/publish", {"channel": "chat:a b", "data": 1}, API_KEY),
        ):
            status, ctype, r = await asyncio.to_thread(http, base, path, body, key)
            expect(400 <= status < 500, f"POST {path} ({what}): HTTP {status} {j(r)}, expected a 4xx")
            expect(isinstance(r, dict) and "json" in ctype, f"POST {path} ({what}): HTTP {status} {ctype!r} body {j(r)} is not a JSON object")
            notes.append(f"{what}: {status} {j(r)}")
        await a.quiet("refused publishes deliver nothing")
    return "; ".join(notes)


async def cli_publish(base: str, binary: str) -> str:
    ch = "notifications:#42"
    url = base.replace("ws://", "http://", 1)
    async with Session(base, "U42", token=token("42")) as u:
        sub = await u.ok("subscribe", {"channel": ch})
        start = sub["offset"]

        def run(*args):
            return subprocess.run(
                [binary, "publish", "--url", url, *args], capture_output=True, text=True, timeout=STEP * 2,
                env={**os.environ, "WALKIE_API_KEY": API_KEY},
            )

        p1 = await asyncio.to_thread(run, ch, '{"title":"Hi"}')
        expect(p1.returncode == 0, f"walkie publish {ch}: exit {p1.returncode}, stderr {p1.stderr!r}")
        out = json.loads(p1.stdout)
        expect(out.get("offset") == start + 1 and out.get("epoch") == sub["epoch"] and out.get("duplicate") is False,
               f"walkie publish printed {p1.stdout!r}")
        _, p = await u.push("pub")
        check_pub(p, ch, start + 1, {"title": "Hi"})
        p2 = await asyncio.to_thread(run, ch, "plain words", "--text", "--idempotency-key", "cli-1")
        p3 = await asyncio.to_thread(run, ch, "plain words", "--text", "--idempotency-key", "cli-1")
        expect(p2.returncode == 0 and p3.returncode == 0, f"walkie publish --text: {p2.stderr!r} {p3.stderr!r}")
        expect(json.loads(p3.stdout).get("duplicate") is True, f"walkie publish, same idempotency key: {p3.stdout!r}")
        _, p = await u.push("pub")
        check_pub(p, ch, start + 2, "plain words")
        await u.quiet("the duplicate is not delivered")
    return p1.stdout.strip()


async def api_disconnect(base: str) -> str:
    """/api/disconnect closes the user's connections with 4009 (its body,
    {"user": ID}, is not in the docs: the one field the README implies)."""
    async with (
        Session(base, "U77a", user="77") as a,
        Session(base, "U77b", user="77") as b,
        Session(base, "U78", user="78") as c,
    ):
        status, _, r = await asyncio.to_thread(http, base, "/api/disconnect", {"user": "77"})
        expect(200 <= status < 300, f"POST /api/disconnect {{\"user\": \"77\"}}: HTTP {status} {j(r)}")
        for x in (a, b):
            await x.closed_with(4009, "after /api/disconnect of its user")
        await c.ok("ping", {})
        c.check_stray()
    return f"HTTP {status} {j(r)}; closed with {a.closed.result()}"


# ---------------------------------------------------------------- checks: noanon server


async def anonymous_refused(base: str) -> str:
    """Without a token a client is anonymous, "allowed only if the server
    allows anonymous connections": refused here, by a reply with error 101
    (unauthorized: missing token) or by close 4001 (unauthorized)."""
    async with Session(base, "Anon", do_connect=False) as c:
        try:
            _, reply = await c.call("connect", {})
        except CheckFailed:
            reply = None  # closed (or silent: closed_with says which)
        if reply is None:
            await c.closed_with(4001, "connect without a token to a server with anonymous = false")
        else:
            expect("result" not in reply and isinstance(reply.get("error"), dict) and reply["error"].get("code") == 101,
                   f"connect without a token to a server with anonymous = false: {j(reply)}, expected error 101")
    async with Session(base, "T", user="42") as t:
        expect(t.connected.get("user") == "42", f"connect with a token: {j(t.connected)}")
        await t.ok("subscribe", {"channel": "chat:x"})
    return f"reply {j(reply) if reply else None}, close {c.closed.result() if c.closed.done() else 'none'}"


CHECKS = {
    "handshake": handshake,
    "connect-anonymous": connect_anonymous,
    "keepalive": keepalive,
    "before-connect": before_connect,
    "bad-commands": bad_commands,
    "close-binary": lambda base: close_with_4000(base, b'{"id": 9, "ping": {}}', "a binary message"),
    "close-not-json": lambda base: close_with_4000(base, "hello, not JSON", "text that is not JSON"),
    "close-not-command": lambda base: close_with_4000(base, "[1, 2]", "a JSON array"),
    "close-two-methods": lambda base: close_with_4000(base, '{"id": 9, "ping": {}, "extra": 1}', "two keys besides id"),
    "ping": ping,
    "open-default": open_default,
    "rooms-bridge": rooms_bridge,
    "channel-errors": channel_errors,
    "not-available": not_available,
    "pubsub": pubsub,
    "no-history": no_history,
    "idempotency": idempotency,
    "history": history,
    "subscribe-history": subscribe_history,
    "recovery": recovery,
    "recovery-impossible": recovery_impossible,
    "recovery-large": recovery_large,
    "presence": presence,
    "join-leave": join_leave,
    "connect-token": connect_token,
    "refresh": refresh,
    "expiry": expiry,
    "jwt-refused": jwt_refused,
    "claims": claims,
    "subscription-tokens": subscription_tokens,
    "subscription-expiry": subscription_expiry,
    "user-channels": user_channels,
    "http-api": http_api,
    "cli-publish": cli_publish,
    "api-disconnect": api_disconnect,
    "anonymous-refused": anonymous_refused,
}


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "config":
        print(CONFIGS[sys.argv[2]].lstrip())
        sys.exit(0)
    if len(sys.argv) < 3 or sys.argv[1] not in CHECKS:
        raise SystemExit(f"usage: {sys.argv[0]} CHECK BASE_URL [ARG...]; checks: {' '.join(CHECKS)}")
    check, base, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    try:
        note = asyncio.run(asyncio.wait_for(CHECKS[check](base, *args), 30))
    except CheckFailed as e:
        print(f"FAILED: {e}")
        sys.exit(1)
    except Exception as e:  # a crash or a protocol error counts as a failure
        print(f"FAILED: {type(e).__name__}: {e}")
        sys.exit(1)
    if note:
        print(note)
