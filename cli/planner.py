"""`kvweave planner`: the command of controlplane/planner_main.py, handed the worker's Ray actor class
for `--connector ray` (the control plane never imports the worker; this layer may, and does so only
for that connector, so the other connectors' planner loads no torch)."""
from __future__ import annotations

import argparse

from cli.serve import ray_actor_class
from controlplane import planner_main


def add_parser(sub: argparse._SubParsersAction) -> None:
    planner_main.add_parser(sub).set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return planner_main.run(args, ray_actor=ray_actor_class)
