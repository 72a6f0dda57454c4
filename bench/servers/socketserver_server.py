"""Reference: socketserver.ThreadingTCPServer echo server (a thread per connection)."""

import socketserver
import sys


class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        recv, sendall = self.request.recv, self.request.sendall
        while True:
            data = recv(65536)
            if not data:
                break
            sendall(data)


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 4096


if __name__ == "__main__":
    with Server(("127.0.0.1", int(sys.argv[1])), Echo) as server:
        print("READY", flush=True)
        server.serve_forever()
