"""The operations commands of ``dinoalign``: ``infra up|down|status`` and ``retrain``.

    dinoalign infra up [--bucket dinoalign] [--backend sqlite|postgresql] [--no-ray]
                       [--workers N [--worker-cpus C]]
    dinoalign infra status
    dinoalign infra down
    dinoalign infra dvc-remote NAME s3://bucket/prefix [--default] [--shared]
    dinoalign retrain --new PATH_OR_S3_URI [-p params.yaml] [section.key=value ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from dinoalign.tracking import repo_root


def add_ops_commands(sub: Any, params_args: Any) -> None:
    """Register ``infra`` and ``retrain`` on the ``dinoalign`` sub-parsers; each sets
    ``handler`` (called with the parsed args, returns the exit code)."""
    infra = sub.add_parser("infra", help="the local stack: SeaweedFS S3, mlflow server and Ray head on 127.0.0.1")
    infra.add_argument("--root", type=Path, default=None, help="the checkout (default: $DINOALIGN_ROOT or cwd)")
    isub = infra.add_subparsers(dest="infra_command", required=True)
    up = isub.add_parser("up", help="start the stack, write infra/run/stack.env, point DVC at the bucket")
    up.add_argument("--bucket", default="dinoalign", help="S3 bucket for MLflow artifacts, the DVC remote, checkpoints")
    up.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite",
                    help="MLflow backend store (postgresql: a private cluster from Debian's binaries)")
    up.add_argument("--no-ray", dest="ray", action="store_false", help="do not start a Ray head")
    up.add_argument("--ray-cpus", type=int, default=None, help="CPUs the Ray head offers (default: all)")
    up.add_argument("--workers", type=int, default=0, metavar="N",
                    help="also start N Ray worker nodes on 127.0.0.1 (run inside `unshare -rn`: "
                         "a multi-node Ray listens on every interface)")
    up.add_argument("--worker-cpus", type=int, default=1, metavar="C", help="CPUs each worker node offers (default: 1)")
    up.add_argument("--ray-listen-all", action="store_true",
                    help="start worker nodes outside a private network namespace (Ray listens on every interface)")
    up.add_argument("--no-dvc-remote", dest="dvc_remote", action="store_false",
                    help="leave this checkout's DVC remotes alone")
    up.set_defaults(handler=_infra_up)
    isub.add_parser("status", help="URLs and health of the recorded services").set_defaults(handler=_infra_status)
    isub.add_parser("down", help="stop exactly the recorded processes").set_defaults(handler=_infra_down)
    remote = isub.add_parser("dvc-remote", help="point this checkout's DVC remote NAME at URL on the S3 of the "
                                                "environment (AWS_ENDPOINT_URL; keys only in .dvc/config.local)")
    remote.add_argument("name")
    remote.add_argument("url", help="s3://bucket/prefix")
    remote.add_argument("--default", action="store_true", help="make it this checkout's default remote")
    remote.add_argument("--shared", action="store_true",
                        help="write url and endpoint to the committed .dvc/config (a stable endpoint)")
    remote.set_defaults(handler=_infra_dvc_remote)

    retrain = sub.add_parser("retrain", help="append new caption data, dvc repro, promote the candidate if not worse")
    retrain.add_argument("--new", required=True, metavar="URI",
                         help="new pairs: a csv/tsv/parquet table, a webdataset .tar or a folder of them (local or s3://)")
    retrain.add_argument("-p", "--params", default="params.yaml", help="params file (default: params.yaml)")
    retrain.add_argument("overrides", nargs="*", metavar="retrain.KEY=VALUE",
                         help="retrain.* overrides only, e.g. retrain.tolerance=0.05 retrain.push=false (the "
                              "pipeline it runs reads the params file: edit it, or `dvc exp run -S`)")
    retrain.set_defaults(handler=_retrain)


def _root(args: argparse.Namespace) -> Path:
    return (args.root or repo_root()).resolve()


def _infra_up(args: argparse.Namespace) -> int:
    from dinoalign.ops.stack import StackOptions, up

    state = up(_root(args), StackOptions(bucket=args.bucket, backend=args.backend, ray=args.ray,
                                         ray_cpus=args.ray_cpus, ray_workers=args.workers,
                                         worker_cpus=args.worker_cpus, ray_listen_all=args.ray_listen_all,
                                         dvc_remote=args.dvc_remote))
    for s in state["services"]:
        print(f"infra: {s['name']:<12} pid {s['pid']:<7} {s['url']}   (log {s['log']})")
    print(f"infra: bucket s3://{state['bucket']} (MLflow artifacts under mlflow/, DVC remote under dvc/); "
          f"keys from {state['keys_from']}; MLflow basic auth from {state['mlflow_auth_from']}")
    if state["dvc_remote"]:
        print(f"infra: DVC remote {state['dvc_remote']!r} is this checkout's default (.dvc/config.local)")
    print(f"infra: use it with:  source {state['env_file']}")
    return 0


def _infra_status(args: argparse.Namespace) -> int:
    from dinoalign.ops.stack import status

    state = status(_root(args))
    if not state["services"]:
        print("infra: not up (no infra/run/stack.json); start it with `dinoalign infra up`")
        return 3
    for s in state["services"]:
        health = "healthy" if s["healthy"] else ("UNHEALTHY" if s["alive"] else "DOWN")
        print(f"infra: {s['name']:<12} pid {s['pid']:<7} {health:<9} {s['url']}")
    print(f"infra: env file {state.get('env_file')}")
    return 0 if all(s["healthy"] for s in state["services"]) else 1


def _infra_down(args: argparse.Namespace) -> int:
    from dinoalign.ops.stack import down

    stopped = down(_root(args))
    print(f"infra: stopped {', '.join(stopped)}" if stopped else "infra: nothing was running")
    return 0


def _infra_dvc_remote(args: argparse.Namespace) -> int:
    from dinoalign.storage import configure_dvc_remote, s3_settings

    settings = s3_settings()
    configure_dvc_remote(_root(args), args.name, args.url, default=args.default, shared=args.shared)
    keys = "keys in .dvc/config.local" if settings.access_key else "no keys in the environment (DVC will use its own)"
    print(f"infra: DVC remote {args.name!r} -> {args.url} via {settings.endpoint_url or 'AWS'}; {keys}"
          + ("; default for this checkout" if args.default else ""))
    return 0


def _retrain(args: argparse.Namespace) -> int:
    from dinoalign.config import ConfigError, load_params
    from dinoalign.ops.retrain import retrain

    outside = [o for o in args.overrides if not o.startswith("retrain.")]
    if outside:
        raise ConfigError(f"{outside[0]!r}: only retrain.* may be overridden here; the pipeline "
                          "that `dvc repro` runs reads params.yaml (edit it, or `dvc exp run -S`)")
    params = load_params(args.params, args.overrides)
    root = Path(args.params).resolve().parent
    os.environ.setdefault("DINOALIGN_ROOT", str(root))  # the embedded MLflow store of this checkout
    # stdout carries exactly one JSON record (cron jobs and tests parse it): whatever the
    # libraries print meanwhile (MLflow writes "View run ... at: URL" to sys.stdout when
    # it talks to a tracking server) goes to stderr with the progress messages
    with contextlib.redirect_stdout(sys.stderr):
        result = retrain(params, root, args.new)
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0
