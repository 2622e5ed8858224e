"""A Python `websockets` server for `walkie connect` to talk to.

Usage: py_server.py PORT_FILE LOG_FILE

Serves on a free port of 127.0.0.1, writes the port to PORT_FILE once it
listens, and appends one JSON line per handshake to LOG_FILE (path,
negotiated extensions, negotiated subprotocol).

Every path echoes messages unchanged, except `/close1008...`, which closes
the connection with 1008 right after the first message. The subprotocol
`chat` is selected when the client offers it; a client offering none gets
none. permessage-deflate is accepted when offered (websockets' default).
"""

import asyncio
import json
import os
import signal
import sys

from websockets.asyncio.server import serve


def select_subprotocol(connection, subprotocols):
    return "chat" if "chat" in subprotocols else None


async def main(port_file: str, log_file: str) -> None:
    async def handler(ws):
        entry = {
            "path": ws.request.path,
            "extensions": ws.response.headers.get("Sec-WebSocket-Extensions"),
            "subprotocol": ws.subprotocol,
        }
        with open(log_file, "a", encoding="utf-8") as log:
            log.write(json.dumps(entry) + "\n")
        if ws.request.path.startswith("/close1008"):
            await ws.recv()
            await ws.close(1008, "policy violation")
            return
        async for message in ws:
            await ws.send(message)

    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set_result, None)
    async with serve(
        handler,
        "127.0.0.1",
        0,
        select_subprotocol=select_subprotocol,
        max_size=None,
    ) as server:
        port = server.sockets[0].getsockname()[1]
        with open(port_file + ".tmp", "w", encoding="utf-8") as f:
            f.write(f"{port}\n")
        # Rename so that a reader never sees a half-written file.
        os.replace(port_file + ".tmp", port_file)
        await stop


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
