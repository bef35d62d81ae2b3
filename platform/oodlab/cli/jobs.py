"""``oodlab submit`` runs ``oodlab run`` / ``oodlab tune`` on a Ray cluster as a Ray job, and
``oodlab jobs list|status|logs|stop`` manages what was submitted.

The library side (runtime_env, the job client, token auth) is :mod:`oodlab.cluster.jobs`,
after Ray's Jobs API (https://docs.ray.io/en/latest/cluster/running-applications/job-submission/).
It imports Ray only when a command talks to the cluster.
"""

from __future__ import annotations

import argparse
import sys

from oodlab.cli.main import add_set
from oodlab.cluster import jobs
from oodlab.console import stderr


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``oodlab submit`` and ``oodlab jobs`` on the top-level subparsers."""
    s = sub.add_parser(
        "submit", help="run a spec (or a search) on a Ray cluster as a Ray job",
        description="Submit `oodlab run SPEC` (or `oodlab tune SPEC --space SPACE` with --tune) "
                    "as a Ray job. The project is the job's working_dir and this oodlab "
                    "package its py_module; MLflow/S3 settings of this shell are forwarded. "
                    "Prints the job id.",
        epilog="examples:\n  oodlab submit jobs/quickstart.yaml --address http://127.0.0.1:8265"
               " --follow\n  oodlab submit jobs/quickstart.yaml --tune "
               "search_spaces/energy_oe.yaml --set storage=s3://oodlab/runs",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("spec", help="experiment spec (YAML) inside the working dir")
    s.add_argument("--tune", metavar="SPACE", help="run a search over this search space")
    s.add_argument("--name", help="with --tune: search name (the resume key)")
    s.add_argument("--resume", action="store_true", help="with --tune: continue a search")
    add_set(s)
    _address_arg(s)
    s.add_argument("--follow", action="store_true", help="stream the logs until the job ends")
    s.add_argument("--working-dir", help="directory uploaded as the job's working_dir "
                                         "(default: the project root)")
    s.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]",
                   help="extra environment variable for the job (repeatable)")
    s.add_argument("--pass-aws-credentials", action="store_true",
                   help="also forward AWS_ACCESS_KEY_ID/SECRET/SESSION_TOKEN (visible in the "
                        "job's runtime_env on the dashboard)")
    s.add_argument("--python", default="python", help="interpreter on the cluster")
    s.add_argument("--num-cpus", type=float, default=0, help="CPUs reserved for the driver")
    s.add_argument("--num-gpus", type=float, default=0, help="GPUs reserved for the driver")
    s.set_defaults(func=_cmd_submit)

    j = sub.add_parser("jobs", help="list, inspect, follow or stop submitted Ray jobs")
    jsub = j.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    lst = jsub.add_parser("list", help="every job on the cluster, newest first")
    _address_arg(lst)
    for action, text in (("status", "a job's status"), ("logs", "a job's logs"),
                         ("stop", "stop a job and wait until it ends")):
        p = jsub.add_parser(action, help=text)
        p.add_argument("job_id")
        _address_arg(p)
        if action == "logs":
            p.add_argument("--follow", action="store_true", help="stream until the job ends")
    j.set_defaults(func=_cmd_jobs)


def _address_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help=f"Ray dashboard URL (default: RAY_ADDRESS if it is "
                                     f"http(s)://..., else {jobs.DEFAULT_ADDRESS})")


def _cmd_submit(args: argparse.Namespace) -> int:
    sub = jobs.build_submission(args.spec, space=args.tune, overrides=args.set,
                                working_dir=args.working_dir, env=args.env,
                                pass_credentials=args.pass_aws_credentials, python=args.python,
                                resume=args.resume, name=args.name)
    job_id = jobs.submit(sub, args.address, num_cpus=args.num_cpus, num_gpus=args.num_gpus)
    print(job_id)
    if not args.follow:
        print(f"follow with: oodlab jobs logs {job_id} --follow", file=stderr())
        return 0
    final = jobs.follow(job_id, args.address)
    print(f"\njob {job_id}: {final}", file=stderr())
    return 0 if final == "SUCCEEDED" else 1


def _cmd_jobs(args: argparse.Namespace) -> int:
    action = args.jobs_command
    if action == "list":
        rows = jobs.list_jobs(args.address)
        print(f"{'ID':44} {'STATUS':10} ENTRYPOINT")
        for r in rows:
            print(f"{r['id']:44} {r['status']:10} {r['entrypoint'][:80]}")
        return 0
    if action == "status":
        print(jobs.status(args.job_id, args.address))
        return 0
    if action == "logs":
        if args.follow:
            final = jobs.follow(args.job_id, args.address)
            print(f"\njob {args.job_id}: {final}", file=stderr())
            return 0 if final == "SUCCEEDED" else 1
        sys.stdout.write(jobs.logs(args.job_id, args.address))
        return 0
    final = jobs.stop(args.job_id, args.address)
    print(final)
    return 0 if final in jobs.TERMINAL else 1
