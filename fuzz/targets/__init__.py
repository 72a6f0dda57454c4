"""One module per parser, each with ``check(data)`` and an atheris entry point."""
