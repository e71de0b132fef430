"""The `fluxbatch submit` and `fluxbatch schedule` subcommands: argument parsing and dispatch.

The work lives in `jobs/submit.py` (Ray Jobs API) and `jobs/schedule.py` (cron runs with locks).
"""

from __future__ import annotations

import argparse
import shlex


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add `submit` and `schedule` to the fluxbatch command line."""
    submit = sub.add_parser(
        "submit", help="run a job spec on a Ray cluster through the Ray Jobs API and follow its logs",
        description="Upload the spec's folder as the job's working directory, run the job there, follow its "
        "logs; exit 0 only if the job succeeded. The cluster's token comes from --token-file, $RAY_AUTH_TOKEN, "
        "$RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.")
    submit.add_argument("spec", metavar="SPEC.yaml", help="a render job, synthesis or catalog spec")
    submit.add_argument("--address", required=True, help="the cluster's dashboard, e.g. http://HEAD:8265")
    submit.add_argument("--working-dir", help="folder to upload (default: the spec's folder); must hold the spec")
    submit.add_argument("--command", dest="command_words",
                        help="fluxbatch subcommand to run, e.g. 'catalog run' (default: from the spec's fields)")
    submit.add_argument("--python", default="python", help="interpreter on the cluster (default: python)")
    submit.add_argument("--token-file", help="file holding the cluster's auth token")
    submit.add_argument("--env", action="append", default=[], metavar="NAME",
                        help="also pass this environment variable to the job (e.g. AWS_SECRET_ACCESS_KEY; repeatable)")
    submit.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                        help="gitignore-style pattern not to upload (repeatable)")
    submit.add_argument("--submission-id", help="id for the job (default: fluxbatch-<command>-<spec>-<time>)")
    submit.add_argument("--no-wait", action="store_true", help="submit and exit without following the logs")

    schedule = sub.add_parser(
        "schedule", help="run jobs on their cron expressions, one run per job at a time, with a history",
        description="Start each job of SPEC when its cron expression falls due; never two runs of one job at "
        "once; every outcome is a line of STATE/history.jsonl.")
    schedule.add_argument("spec", metavar="SPEC.yaml", help="schedule: state folder, timezone, jobs")
    schedule.add_argument("--once", action="store_true",
                          help="start what is due now, wait for it, exit (1 if a run failed); for system cron")


def run_command(args: argparse.Namespace) -> int:
    """Run `submit` or `schedule`; their errors (FluxbatchError) print as one line in `jobs.cli.main`, exit 2."""
    from jobs.schedule import run_schedule
    from jobs.submit import submit

    if args.command == "submit":
        return submit(args.spec, args.address, token_file=args.token_file, follow=not args.no_wait,
                      working_dir=args.working_dir, command=shlex.split(args.command_words or "") or None,
                      python=args.python, env_names=args.env, excludes=args.exclude,
                      submission_id=args.submission_id)
    return run_schedule(args.spec, once=args.once)
