"""The soak server's handler: line echo, STARTTLS, a flood on request, and an INFO control line."""

import dataclasses
import json


def handler(message: bytes, conn) -> None:
    if message == b"STARTTLS":
        conn.send(b"PROCEED")
        conn.start_tls()
    elif message == b"INFO":
        conn.send(json.dumps(dataclasses.asdict(conn.listener.info())).encode())
    elif message == b"FLOOD":
        while True:  # until send_timeout closes this client, which never reads
            conn.send(b"z" * 65536)
    else:
        conn.send(message)
