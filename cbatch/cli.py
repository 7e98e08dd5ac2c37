"""The ``cbatch`` command: parses arguments and routes to the module that owns each subcommand.

Nothing here decides anything. Each route names ``module:function``; the module is imported only when its
subcommand runs, so ``cbatch run`` inside a job does not pay for YAML or the Docker SDK.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from cbatch.core.errors import CbatchError

DEFAULT_CONFIG = "/etc/cbatch/cbatch.yaml"


class _Parser(argparse.ArgumentParser):
    """argparse with cbatch's one-line error format (users read these in a job's .e file)."""

    def error(self, message):
        subject = self.prog.partition(" ")[2] or "arguments"
        print(f"cbatch: {subject}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cbatch", description="Run batch jobs in container images.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    c = sub.add_parser("check", help="validate the site config, show what a script would run, or check this node")
    c.add_argument("--config", default=None, help=f"site config (default {DEFAULT_CONFIG})")
    c.add_argument("--queue", "-q", default=None, help="queue (or Slurm partition) to check the script against")
    c.add_argument("--user", default=None, help="check as this user (default: you)")
    c.add_argument("--node", action="store_true", help="check this node: engine, daemon, hooks, config")
    c.add_argument("--mom-priv", default=None, help="with --node: pbs_mom's mom_priv directory")
    c.add_argument("script", nargs="?", help="job script to check")
    c.set_defaults(route="cbatch.admin.checks:command")

    r = sub.add_parser("run", help="run a command in a container from inside a job")
    r.add_argument("--image", default=None)
    r.add_argument("--mount", action="append", default=[], metavar="SRC:DST[:ro|rw]")
    r.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    r.add_argument("--workdir", default=None)
    r.add_argument("--network", default=None)
    r.add_argument("--readonly", action="store_true")
    r.add_argument("--entrypoint", action="store_true", help="use the image's entrypoint")
    r.add_argument("--socket", default=None, help=argparse.SUPPRESS)
    r.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD [ARGS...]")
    r.set_defaults(route="cbatch.clients.runcmd:command")

    lo = sub.add_parser("local", help="run a job script on this node the way pbs_mom would")
    lo.add_argument("--queue", "-q", default=None, help="queue (default: the script's #PBS -q, else batch)")
    lo.add_argument("-l", dest="resources", action="append", default=[], metavar="RESOURCES")
    lo.add_argument("-v", dest="variables", action="append", default=[], metavar="VAR=VAL")
    lo.add_argument("-N", dest="name", default=None)
    lo.add_argument("--user", default=None, help="(root) run the job as this user")
    lo.add_argument("--socket", default=None, help=argparse.SUPPRESS)
    lo.add_argument("script")
    lo.add_argument("args", nargs=argparse.REMAINDER)
    lo.set_defaults(route="cbatch.emulator.localcmd:command")

    ih = sub.add_parser("install-hooks", help="install the pbs_mom hooks and print the mom_priv/config lines")
    ih.add_argument("--mom-priv", default=None,
                    help="pbs_mom's mom_priv (default: $PBS_HOME/mom_priv, else /var/spool/torque/mom_priv)")
    ih.add_argument("--libexec", default="/usr/libexec/cbatch")
    ih.add_argument("--hooks", choices=("c", "python"), default=None,
                    help="which client the shims run (default: c when <libexec>/cbatch-client exists)")
    ih.add_argument("--client", default=None, help="the C client (default: <libexec>/cbatch-client)")
    ih.add_argument("--mom-config", default=None, metavar="PATH",
                    help="pbs_mom's config file to put the $job_starter line in (default: MOM_PRIV/config)")
    ih.add_argument("--no-mom-config", action="store_true",
                    help="only print the $job_starter line instead of writing it")
    ih.add_argument("--pbs", action="store_true",
                    help="OpenPBS / PBS Pro: import cbatch's hooks with qmgr instead of TORQUE's mom_priv files")
    ih.add_argument("--pbs-exec", default="/opt/pbs", metavar="DIR",
                    help="with --pbs: PBS_EXEC of /etc/pbs.conf (qmgr is DIR/bin/qmgr; default /opt/pbs)")
    ih.add_argument("--remove", action="store_true", help="with --pbs: delete cbatch's PBS hooks")
    ih.add_argument("--config", default=None, metavar="PATH",
                    help="with --pbs: the site config the queuejob hook checks against (default /etc/cbatch/cbatch.yaml)")
    ih.set_defaults(route="cbatch.admin.install:command")

    for name in ("prologue", "epilogue"):
        h = sub.add_parser(name, help=f"the batch system's {name} (root)")
        # --slurm picks slurm.py's hook (which uses hooks.py's sequence); hooks.py never imports slurm.py.
        h.add_argument("--slurm", dest="route", action="store_const", const=f"cbatch.clients.slurm:{name}",
                       help="read the job from Slurm's environment")
        h.add_argument("--socket", default=None, help=argparse.SUPPRESS)
        h.add_argument("args", nargs=argparse.REMAINDER)
        h.set_defaults(route=f"cbatch.clients.hooks:{name}_command")

    im = sub.add_parser("images", help="list, sync or prune this node's images")
    im.add_argument("action", nargs="?", choices=("list", "sync", "prune"), default="list")
    im.add_argument("--config", default=None)
    im.add_argument("--dry-run", action="store_true", help="with prune: list what would be removed")
    im.add_argument("--socket", default=None, help=argparse.SUPPRESS)
    im.set_defaults(route="cbatch.admin.images:command")

    # Listed for --help only: main() hands its raw arguments (qsub's own syntax) to the filter.
    sub.add_parser("submit-filter", help="Torque SUBMITFILTER: check #CBATCH directives at qsub time",
                   add_help=False)
    return p


def route(target: str):
    """Import ``module:function`` lazily and return the function."""
    module, _, func = target.partition(":")
    return getattr(importlib.import_module(module), func)


# Commands whose arguments belong to another program (qsub's options for the submit filter): argparse
# would reject them, so they get the raw argument list.
RAW_ROUTES = {"submit-filter": "cbatch.admin.submitfilter:main"}


def main(argv=None) -> int:
    """Entry point of the ``cbatch`` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in RAW_ROUTES:
        return int(route(RAW_ROUTES[argv[0]])(argv[1:]) or 0)
    args = _parser().parse_args(argv)
    try:
        status = route(args.route)(args)
    except CbatchError as exc:
        print(exc.message, file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
