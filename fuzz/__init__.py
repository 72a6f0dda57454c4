"""Coverage-guided fuzzing of netpool's sans-I/O parsers (see fuzz/README.md)."""
