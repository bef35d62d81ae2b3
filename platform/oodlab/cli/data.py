"""``oodlab data list``: every registered dataset (built-in and external) with its role."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``oodlab data`` (with its ``list`` action) on the top-level subparsers."""
    data = sub.add_parser("data", help="built-in and external datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    dl = data_sub.add_parser("list", help="list every registered dataset with its role and size")
    dl.set_defaults(func=_cmd_data_list)


def _cmd_data_list(args: argparse.Namespace) -> int:
    from oodlab.data import list_datasets

    rows = list_datasets()
    w = max(len(d.name) for d in rows) + 2
    print(f"{'name':<{w}}{'role':<10}{'source':<10}{'count':>7}  description")
    for d in rows:
        count = "" if d.count is None else str(d.count)
        print(f"{d.name:<{w}}{d.role:<10}{d.source:<10}{count:>7}  {d.description}")
    return 0
