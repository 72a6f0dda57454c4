"""Reference: a plain thread-per-connection server whose handler does WORK (see work.py), then echoes."""

import socket
import sys
import threading
from typing import Callable

from work import make_work


def serve(conn: socket.socket, work: Callable[[bytes], None]) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    recv, sendall = conn.recv, conn.sendall
    with conn:
        while True:
            data = recv(65536)
            if not data:
                break
            work(data)
            sendall(data)


def main(port: int, spec: str) -> None:
    work = make_work(spec)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(4096)
    print("READY", flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn, work), daemon=True).start()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
