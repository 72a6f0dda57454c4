"""The gateway example: an HTTP front end, a pooled netpool TCP back end, users in SQLite.

    browser/wrk --HTTP/1.1--> frontend (netpool listener, HttpFramer)
                --length-prefixed protocol over a ConnectionPool + CircuitBreaker-->
              backend (netpool listener, framing="length") --> SQLite (salted pbkdf2/scrypt hashes)

Run it: ``make gateway`` or ``python -m netpool.examples.gateway run``.
"""
