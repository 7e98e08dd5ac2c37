"""Container engines: the only code that talks to a container runtime (imported only by the daemon)."""
