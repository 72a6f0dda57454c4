"""The differential harness of the C hot path (fuzz/hot_path_diff.py): scripts, the client, the server, the diff.

- ``script``: a seed (or bytes) decides what the clients do, and what the
  echo must be;
- ``client``: plays a script over real loopback sockets, plain or TLS;
- ``server``: a listener with a recording handler, started with the C or
  the Python hot path, and what it saw;
- ``compare``: the differences between two runs, readably.
"""
