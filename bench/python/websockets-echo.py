"""Python `websockets` echo peer: the library's asyncio server, any path,
every text or binary message sent back with the same type (str for text,
bytes for binary), as in its documented echo example. Pings and the
closing handshake are answered by websockets. Standard asyncio event loop
(single-threaded; no uvloop, which websockets does not require).

Command line: PORT [deflate]. stdout carries only `listening <port>`;
errors go to stderr; exit status 2 on a bad command line.

Without `deflate`: `compression=None`. With it: websockets' default
permessage-deflate settings (those of `compression="deflate"`: context
takeover, 12-bit windows, memLevel 5) but at zlib level 1, walkie's default
level (zlib's default, which websockets keeps, is 6). websockets has no size
threshold: it compresses every message.

Everything else is websockets' default, including its keepalive (a ping
after 20 s of silence, close after 20 s more without a pong) and the
1 MiB message limit.
"""

import asyncio
import sys

from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory

NAME = "websockets-echo"


def parse_args():
    argv = sys.argv[1:]
    if (
        not 1 <= len(argv) <= 2
        or not argv[0].isdigit()
        or int(argv[0]) > 65535
        or (len(argv) == 2 and argv[1] != "deflate")
    ):
        print(f"usage: {NAME} PORT [deflate]", file=sys.stderr)
        sys.exit(2)
    return int(argv[0]), len(argv) == 2


async def echo(websocket):
    # The loop ends when the client closes; a client that drops the TCP
    # connection (as a load generator does at the end of a run) raises
    # ConnectionClosedError, which is expected and not worth a traceback.
    try:
        async for message in websocket:
            await websocket.send(message)
    except ConnectionClosed:
        pass


def deflate_extension():
    # What `compression="deflate"` enables (websockets 17.4,
    # `enable_server_permessage_deflate`), with level 1 added.
    return ServerPerMessageDeflateFactory(
        server_max_window_bits=12,
        client_max_window_bits=12,
        compress_settings={"level": 1, "memLevel": 5},
    )


async def main(port, deflate):
    try:
        server = await serve(
            echo,
            "127.0.0.1",
            port,
            compression=None,
            extensions=[deflate_extension()] if deflate else None,
        )
    except OSError as err:
        print(f"{NAME}: listen: {err}", file=sys.stderr)
        sys.exit(1)
    bound = server.sockets[0].getsockname()[1]
    print(f"listening {bound}", flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    port, deflate = parse_args()
    try:
        asyncio.run(main(port, deflate))
    except KeyboardInterrupt:
        pass
