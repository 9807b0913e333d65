"""The project's tests, laid out like the package; shared helpers in ``tests.support``."""
