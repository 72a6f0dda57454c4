"""The chat example: the smallest model of a stateful netpool server.

``netpool run netpool.examples.chat.chat:handler --on-connect
netpool.examples.chat.chat:joined --on-close netpool.examples.chat.chat:left
--framing line`` serves it; README.md says how to talk to it and what it teaches.
"""
