"""dinoalign: give a self-supervised vision backbone (DINOv2, DINOv3) a text interface with
three published recipes (talk2dino, dinotxt, projector), trained, compared and served on the
same data by one DVC + MLflow pipeline.

    dinoalign prepare [-p params.yaml] [section.key=value ...]   run one pipeline stage
    dinoalign params  [-p params.yaml] [section.key=value ...]   print the resolved params
    dinoalign summary [-p params.yaml]                           headline metrics, report, MLflow
    dinoalign infra up|down|status                               the local stack (docs/operations.md)
    dinoalign retrain --new URI [section.key=value ...]          scheduled retraining with promotion
    dinoalign segment|classify --model M --image I --classes "a,b"   inference (dinoalign.infer)
    dinoalign index --model M --out DIR; dinoalign retrieve --model M --index DIR --text T
    dinoalign import-talk2dino --weights W [--config Y] --out DIR   the released Talk2DINO ψ
"""

from __future__ import annotations

import argparse
import errno
import json
import sys
import typing
from pathlib import Path

import yaml

from dinoalign.config import load_params, to_dict
from dinoalign.errors import UserError
from dinoalign.infer_cli import add_inference_commands
from dinoalign.ops.cli import add_ops_commands
from dinoalign.stages import STAGE_NAMES, run_stage, summary


def _params_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-p", "--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. embed.batch_size=64")


class _OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr (exit 2), not usage + error."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="dinoalign",
        description=" ".join(__doc__.split("\n\n")[0].split()),
        epilog="The pipeline stages, in order: " + " -> ".join(STAGE_NAMES)
        + ". `dvc repro` runs them all; `dinoalign <stage>` runs one. README.md has the rest.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)
    for name in STAGE_NAMES:
        _params_args(sub.add_parser(name, help=f"stage: {summary(name)}"))
    _params_args(sub.add_parser("params", help="print the resolved params as YAML"))
    _params_args(sub.add_parser(
        "summary", help="the headline metrics of each evaluated recipe, where the report is, how to browse MLflow"
    ))
    add_ops_commands(sub, _params_args)
    add_inference_commands(sub, _params_args)
    imp = sub.add_parser(
        "import-talk2dino",
        help="turn the official Talk2DINO projection weights into a talk2dino model folder",
    )
    imp.add_argument(
        "--weights",
        required=True,
        help="the official ProjectionLayer state dict: .pth/.pt (read with weights_only=True) "
        "or .safetensors, path or URI",
    )
    imp.add_argument(
        "--config",
        default=None,
        help="its configs/<name>.yaml (default: <stem>.yaml beside the weights or "
        "../configs/<stem>.yaml if present, else the projection is inferred from the keys)",
    )
    imp.add_argument("--out", required=True, help="model folder to write (path or URI)")
    imp.set_defaults(handler=_import_talk2dino)
    return parser


def _summary(params: typing.Any, root: Path) -> str:
    """What ``make demo`` ends with: per recipe the evaluate stage's summary line (each
    number with its chance level, from ``metrics/<recipe>.details.json``), the report's
    path and the MLflow UI command."""
    from dinoalign.evaluate.headline import details_path
    from dinoalign.evaluate.outputs import summary_line
    from dinoalign.storage import under_root

    lines = []
    for recipe in params.evaluate.recipes:
        path = details_path(under_root(params.paths.metrics, root), recipe)
        if path.is_file():
            lines.append(summary_line(recipe, json.loads(path.read_text())))
        else:
            lines.append(f"{recipe}: not evaluated yet ({path} is missing: dvc repro evaluate@{recipe})")
    report = Path(under_root(params.paths.report, root)) / "index.html"
    lines.append(f"report: {report}" if report.is_file() else f"report: not written yet ({report}: dvc repro report)")
    lines.append("MLflow: make mlflow-ui, then http://127.0.0.1:5000")
    return "\n".join(lines)


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dinoalign")
    except PackageNotFoundError:  # a source tree without the installed package
        return "unknown"


def _import_talk2dino(args: argparse.Namespace) -> int:
    """``dinoalign import-talk2dino``: write the recipe folder, print one JSON line;
    a bad file is an InferenceError (one line on stderr and exit code 2, from :func:`main`)."""
    from dinoalign.recipes.talk2dino_release import AUTO_CONFIG, read_talk2dino_release

    released = read_talk2dino_release(args.weights, args.config or AUTO_CONFIG)
    released.save(args.out)
    print(json.dumps({"out": args.out, **released.summary}))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run one command. The only error handler of the package: a
    :class:`~dinoalign.errors.UserError` (a problem the user can fix, from any command)
    prints ``dinoalign <command>: <message>`` on one line and returns its ``exit_code``
    (2 unless documented otherwise); so does a write that found the disk full
    (:func:`dinoalign.storage.disk_full`: the file, the OS's reason, exit 2), wherever it
    was raised; anything else is a bug and keeps its traceback."""
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "handler", None) is not None:  # infra, retrain, inference: commands with their own arguments
            return int(args.handler(args))
        params = load_params(args.params, args.overrides)
        if args.command == "params":
            yaml.safe_dump(to_dict(params), sys.stdout, sort_keys=False)
            return 0
        root = Path(args.params).resolve().parent
        if args.command == "summary":
            print(_summary(params, root))
            return 0
        run_stage(args.command, params, root)
        return 0
    except UserError as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"dinoalign {args.command}: {message}", file=sys.stderr)
        return e.exit_code
    except Exception as e:
        from dinoalign.storage import disk_full

        full = disk_full(e)
        if full is None:
            raise
        if isinstance(full, OSError):
            code = errno.errorcode.get(full.errno, str(full.errno))
            what = f" writing {full.filename}" if full.filename is not None else ""
            reason = f"{' '.join(str(full.strerror or full).split())} ({code})"
        else:  # SQLite's SQLITE_FULL: the MLflow store (tracking.uri) could not grow
            what, reason = " in the MLflow store (tracking.uri)", "SQLite: database or disk is full"
        print(f"dinoalign {args.command}: disk full{what}: {reason}; free space there and run the "
              "command again", file=sys.stderr)
        return UserError.exit_code


if __name__ == "__main__":
    sys.exit(main())
