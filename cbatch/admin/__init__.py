"""Admin and user tools run on demand: ``cbatch check``, node check, ``install-hooks``, ``cbatch images``,
the submit filter."""
