"""The ``camserve`` command-line tools over the engine."""
