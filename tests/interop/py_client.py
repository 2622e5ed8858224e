"""Python `websockets` client checks against a running walkie server.

Usage: py_client.py CHECK BASE_URL [ARG]

BASE_URL is ws://127.0.0.1:PORT (no path). Each check opens its own
connection, exits 0 when walkie behaved, and otherwise prints what was
sent and what came back and exits 1. Checks:

  echo-MODE-WHAT   /echo with MODE `deflate` (websockets' default offer of
                   permessage-deflate; the response must accept it) or
                   `plain` (compression=None; the response must have no
                   extension) or `declined` (offers permessage-deflate to a
                   walkie --no-deflate, which must not accept it), WHAT one of: handshake text binary empty
                   1mib burst100 utf8 fragmented ping close
  chat-hello       / answers `hello` with `You said: hello`
  too-big-plain    sends 100 KiB of random bytes uncompressed: walkie
                   (started with --max-message-size 64K) closes with 1009
  too-big-deflate  the same with 100 KiB of zeros compressed by deflate
                   (walkie's limit applies after decompression)
  sigterm PID      connected to /echo, sends SIGTERM to PID (walkie): the
                   client sees close code 1001
"""

import asyncio
import os
import signal
import sys
import time

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK


class CheckFailed(Exception):
    pass


def expect(cond: bool, what: str) -> None:
    if not cond:
        raise CheckFailed(what)


def show(value, limit: int = 80) -> str:
    r = repr(value)
    if len(r) > limit:
        r = r[:limit] + f"... ({len(value)} {'chars' if isinstance(value, str) else 'bytes'})"
    return r


def kind(value) -> str:
    return "text" if isinstance(value, str) else "binary"


async def roundtrip(ws, message, label: str = "") -> None:
    await ws.send(message)
    reply = await asyncio.wait_for(ws.recv(), 10)
    expect(
        type(reply) is type(message) and reply == message,
        f"{label}sent {kind(message)} {show(message)}, got {kind(reply)} {show(reply)}",
    )


def extension_header(ws) -> str | None:
    return ws.response.headers.get("Sec-WebSocket-Extensions")


def check_extension(ws, mode: str) -> None:
    ext = extension_header(ws)
    if mode == "deflate":
        offered = ws.request.headers.get("Sec-WebSocket-Extensions")
        expect(
            offered is not None and "permessage-deflate" in offered,
            f"client did not offer permessage-deflate (request header {offered!r})",
        )
        expect(
            ext is not None and ext.strip().startswith("permessage-deflate"),
            f"offered {offered!r}, response Sec-WebSocket-Extensions is {ext!r}",
        )
        names = [type(e).__name__ for e in ws.protocol.extensions]
        expect(
            names == ["PerMessageDeflate"],
            f"negotiated extensions {names}, expected PerMessageDeflate",
        )
    elif mode == "declined":
        offered = ws.request.headers.get("Sec-WebSocket-Extensions")
        expect(offered is not None and "permessage-deflate" in offered,
               f"client did not offer permessage-deflate (request header {offered!r})")
        expect(ext is None, f"walkie --no-deflate accepted {offered!r}: Sec-WebSocket-Extensions: {ext!r}")
        expect(ws.protocol.extensions == [], f"extensions {ws.protocol.extensions}")
    else:
        expect(ext is None, f"no extension offered, but response has Sec-WebSocket-Extensions: {ext!r}")
        expect(ws.protocol.extensions == [], f"extensions {ws.protocol.extensions}")


async def echo(base: str, mode: str, what: str) -> str:
    compression = None if mode == "plain" else "deflate"
    async with connect(
        base + "/echo",
        compression=compression,
        max_size=None,
        open_timeout=10,
        close_timeout=5,
    ) as ws:
        check_extension(ws, mode)
        if what == "handshake":
            return f"Sec-WebSocket-Extensions: {extension_header(ws)}"
        if what == "text":
            await roundtrip(ws, "hello interop")
        elif what == "binary":
            await roundtrip(ws, bytes(range(256)) * 4)
        elif what == "empty":
            await roundtrip(ws, "", "empty text: ")
            await roundtrip(ws, b"", "empty binary: ")
        elif what == "1mib":
            await roundtrip(ws, os.urandom(1 << 20), "random: ")
            await roundtrip(ws, b"walkie " * ((1 << 20) // 7), "compressible: ")
        elif what == "burst100":
            sent = [f"message {i}" if i % 2 == 0 else f"message {i}".encode() for i in range(100)]
            for m in sent:
                await ws.send(m)
            got = [await asyncio.wait_for(ws.recv(), 10) for _ in sent]
            for i, (s, g) in enumerate(zip(sent, got)):
                expect(
                    type(s) is type(g) and s == g,
                    f"reply {i}: expected {kind(s)} {s!r}, got {kind(g)} {g!r}",
                )
        elif what == "utf8":
            await roundtrip(ws, "héllo wörld — 日本語 — 🦀🎉 — \u0000\uffff\U0010ffff")
        elif what == "fragmented":
            # A text message in three frames, with fragment boundaries in the
            # middle of a 2-byte and of a 4-byte UTF-8 sequence.
            data = "hé🦀!".encode()  # 68 c3 a9 f0 9f a6 80 21
            await ws.send([data[:2], data[2:5], data[5:]], text=True)
            reply = await asyncio.wait_for(ws.recv(), 10)
            expect(reply == "hé🦀!", f"sent fragmented text 'hé🦀!', got {kind(reply)} {reply!r}")
            parts = [b"\x00\x01", b"", b"\x02" * 1000]
            await ws.send(parts)
            reply = await asyncio.wait_for(ws.recv(), 10)
            expect(reply == b"".join(parts), f"sent fragmented binary, got {kind(reply)} {show(reply)}")
        elif what == "ping":
            waiter = await ws.ping(b"interop-ping")
            try:
                latency = await asyncio.wait_for(waiter, 5)
            except asyncio.TimeoutError:
                raise CheckFailed("sent ping 'interop-ping', no pong within 5s")
            await roundtrip(ws, "after ping")
            return f"pong after {latency * 1000:.1f} ms"
        elif what == "close":
            await roundtrip(ws, "before close")
            start = time.monotonic()
            await ws.close(1000, "bye")
            await ws.wait_closed()
            elapsed = time.monotonic() - start
            p = ws.protocol
            expect(p.close_sent is not None and p.close_sent.code == 1000 and p.close_sent.reason == "bye",
                   f"client sent {p.close_sent}")
            expect(p.close_rcvd is not None, f"no close frame received from walkie (sent {p.close_sent})")
            expect(p.close_rcvd.code == 1000, f"walkie answered close 1000 'bye' with {p.close_rcvd}")
            expect(p.close_rcvd_then_sent is False, "close handshake order wrong: walkie closed first")
            try:
                await ws.recv()
                raise CheckFailed("recv after close did not raise")
            except ConnectionClosedOK:
                pass
            except ConnectionClosed as e:
                raise CheckFailed(f"closing was not clean: {e!r}")
            # websockets waits up to close_timeout for the server to close the
            # TCP connection after the close handshake; a prompt one is clean.
            expect(elapsed < 2, f"close took {elapsed:.2f}s (server did not end the TCP connection)")
            return f"walkie answered {p.close_rcvd} in {elapsed * 1000:.1f} ms"
        else:
            raise SystemExit(f"unknown check echo-{mode}-{what}")
    return ""


async def chat_hello(base: str) -> str:
    async with connect(base + "/", open_timeout=10, close_timeout=5) as ws:
        await ws.send("hello")
        reply = await asyncio.wait_for(ws.recv(), 10)
        expect(reply == "You said: hello", f"sent 'hello' to /, got {kind(reply)} {reply!r}")
    return ""


async def too_big(base: str, mode: str) -> str:
    compression = "deflate" if mode == "deflate" else None
    message = os.urandom(100 * 1024) if mode == "plain" else bytes(100 * 1024)
    async with connect(base + "/echo", compression=compression, max_size=None,
                       open_timeout=10, close_timeout=5) as ws:
        check_extension(ws, mode)
        await ws.send(message)
        try:
            reply = await asyncio.wait_for(ws.recv(), 10)
            raise CheckFailed(f"sent {len(message)} bytes, got a reply of {len(reply)} bytes instead of a close")
        except asyncio.TimeoutError:
            raise CheckFailed(f"sent {len(message)} bytes, no close within 10s")
        except ConnectionClosed as e:
            expect(e.rcvd is not None, f"sent {len(message)} bytes, connection ended without a close frame ({e!r})")
            expect(e.rcvd.code == 1009, f"sent {len(message)} bytes, walkie closed with {e.rcvd}, expected 1009")
            return f"walkie closed with {e.rcvd}"


async def sigterm(base: str, pid: int) -> str:
    async with connect(base + "/echo", open_timeout=10, close_timeout=5) as ws:
        await roundtrip(ws, "still here")
        os.kill(pid, signal.SIGTERM)
        try:
            reply = await asyncio.wait_for(ws.recv(), 10)
            raise CheckFailed(f"after SIGTERM got a message {reply!r} instead of a close")
        except asyncio.TimeoutError:
            raise CheckFailed("no close within 10s of SIGTERM")
        except ConnectionClosed as e:
            expect(e.rcvd is not None, f"connection ended without a close frame after SIGTERM ({e!r})")
            expect(e.rcvd.code == 1001, f"after SIGTERM walkie closed with {e.rcvd}, expected 1001")
            return f"walkie closed with {e.rcvd}"


async def main(argv: list[str]) -> str:
    check, base = argv[0], argv[1]
    if check.startswith("echo-"):
        _, mode, what = check.split("-", 2)
        return await echo(base, mode, what)
    if check == "chat-hello":
        return await chat_hello(base)
    if check.startswith("too-big-"):
        return await too_big(base, check.removeprefix("too-big-"))
    if check == "sigterm":
        return await sigterm(base, int(argv[2]))
    raise SystemExit(f"unknown check {check}")


if __name__ == "__main__":
    try:
        note = asyncio.run(asyncio.wait_for(main(sys.argv[1:]), 30))
    except CheckFailed as e:
        print(f"FAILED: {e}")
        sys.exit(1)
    except Exception as e:  # a crash or a protocol error counts as a failure
        print(f"FAILED: {type(e).__name__}: {e}")
        sys.exit(1)
    if note:
        print(note)
