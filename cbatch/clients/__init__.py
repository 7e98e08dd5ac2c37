"""Short-lived processes that talk to cbatchd: the job starter and ``cbatch run`` (as the job user), the
prologue/epilogue and Slurm Prolog/Epilog (as root, started by the batch system). Lean: stdlib only."""
