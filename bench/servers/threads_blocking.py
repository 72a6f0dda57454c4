"""Reference: a plain thread-per-connection server whose handler blocks MS milliseconds (every message, or with WHICH=mixed only those starting with B), then echoes."""

import socket
import sys
import threading
import time


def serve(conn: socket.socket, seconds: float, every: bool) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    recv, sendall = conn.recv, conn.sendall
    with conn:
        while True:
            data = recv(65536)
            if not data:
                break
            if seconds and (every or data[:1] == b"B"):
                time.sleep(seconds)
            sendall(data)


def main(port: int, ms: str, which: str = "all") -> None:
    seconds = float(ms) / 1000
    every = which == "all"
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(4096)
    print("READY", flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn, seconds, every), daemon=True).start()


if __name__ == "__main__":
    main(int(sys.argv[1]), *sys.argv[2:4])
