# Sourced by the scripts that start long-lived daemons (dockerd, cbatchd, the registry, TORQUE, OpenPBS,
# Slurm). Closes every descriptor above 2 this shell inherited, so no daemon it starts keeps one: under
# `flock LOCK scripts/<x>-up` a daemon holding the lock file's descriptor holds the lock for as long as it
# runs (dockerd started that way blocked every later `flock LOCK` on the machine).
close_inherited_fds() {
    local fd
    for fd in $(ls "/proc/$BASHPID/fd"); do
        if [ "$fd" -gt 2 ]; then exec {fd}>&- 2>/dev/null || true; fi
    done
}
close_inherited_fds
