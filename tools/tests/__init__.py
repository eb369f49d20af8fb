"""Tests of the developer tools (CPU; `make test` collects them with `tests`)."""
