"""cbatchd: the one long-lived root process. Everything here runs as root for the life of the daemon.

Clients and admin tools never import this package.
"""
