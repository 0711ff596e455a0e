"""``torchws <verb>``: train, demo, sweep, report, analyze, models, datasets. Parses arguments and calls library
functions, nothing else.

User errors (bad names, missing or malformed data, unusable checkpoints, a run dir that would be overwritten) print
one line ``torchws: error: ...`` on stderr and exit with code 2, like argparse's own errors.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

__all__ = ["main"]

EXIT_USAGE = 2
EXIT_NONFINITE = 3
SMOOTHNESS_DATA = "docs/figures/smoothness.json"


def _cmd_train(args: argparse.Namespace) -> int:
    from torchws.train import config_from_args, train

    train(config_from_args(args))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from torchws.demo import run_demo

    threads = args.threads if args.threads > 0 else None
    run_demo(args.out_dir, args.budget, data_dir=args.data_dir, threads=threads, seed=args.seed)
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from torchws.experiments import resolve_grid, run_sweep

    name = "quick" if args.quick else args.grid
    fields = ("dataset", "data_dir", "arch", "setups", "batches", "seeds", "train_images", "eval_images", "epochs",
              "image_size", "search_batch", "search_lrs", "search_seed", "search_extend", "max_steps")  # fmt: skip
    spec = resolve_grid(name, **{f: getattr(args, f) for f in fields})
    out = args.out_dir or f"runs/sweep/{spec.name}"
    results = args.results or f"{out}/results.jsonl"
    command = "torchws " + " ".join(shlex.quote(a) for a in args.argv)
    run_sweep(spec, results, f"{out}/runs", jobs=args.jobs, threads=args.threads, command=command)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from torchws.experiments.report import write_report

    smoothness = args.smoothness
    if smoothness is None and Path(SMOOTHNESS_DATA).is_file():  # the repository's own probe data
        smoothness = SMOOTHNESS_DATA
    smoothness = None if smoothness == "none" else smoothness
    result = write_report(args.results, args.out, args.figures, smoothness=smoothness, title=args.title,
                          notes=args.notes, runs_dir=args.runs_dir)  # fmt: skip
    verdicts = ", ".join(f"({k}) {v}" for k, v in result["verdicts"].items())
    print(f"wrote {args.out} ({'complete' if result['complete'] else 'partial'}): {verdicts}")
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    import json

    from torchws.experiments.analyze import analyze_checkpoint, format_analysis

    result = analyze_checkpoint(args.checkpoint, data_dir=args.data_dir, batch=args.batch,
                                micro_batch=args.micro_batch, steps=args.steps)  # fmt: skip
    print(format_analysis(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _add_report_parsers(verbs: argparse._SubParsersAction) -> None:
    report = verbs.add_parser("report", help="Markdown report, figures and verdicts from a sweep's results file")
    report.add_argument("results", help="results file written by `torchws sweep` (JSON lines)")
    report.add_argument("--out", default="docs/results.md", help="Markdown file to write")
    report.add_argument("--figures", default="docs/figures", help="folder for the figures")
    report.add_argument("--smoothness", default=None, help="probe data of scripts/smoothness.py for claim (vi) "
                        f"(default: {SMOOTHNESS_DATA} when it exists); 'none' to leave the claim untested")  # fmt: skip
    report.add_argument("--title", default=None)
    report.add_argument("--notes", default=None, help="Markdown file inserted after the protocol")
    report.add_argument("--runs-dir", default=None, help="the sweep's run dirs (OUT/runs): also analyze the final "
                        "checkpoints at 2 images per step")  # fmt: skip
    report.set_defaults(func=_cmd_report)
    analyze = verbs.add_parser("analyze", help="gradient identity, kept fraction and loss-landscape probes of a "
                               "checkpoint written by `torchws train`")  # fmt: skip
    analyze.add_argument("checkpoint", help="last.pt or best.pt of a run")
    analyze.add_argument("--data-dir", default=None, help="where the run's dataset lives now (default: as saved)")
    analyze.add_argument("--batch", type=int, default=64, help="training images to measure on (default 64)")
    analyze.add_argument("--micro-batch", type=int, default=None, help="images per forward (default: the run's)")
    analyze.add_argument("--steps", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.4], help="probe step sizes")
    analyze.add_argument("--json", default=None, help="also write the measurements to this JSON file")
    analyze.set_defaults(func=_cmd_analyze)


def _add_sweep_parser(verbs: argparse._SubParsersAction) -> None:
    sweep = verbs.add_parser("sweep", help="train a grid of norm setups x images per step x seeds (resumable)")
    sweep.add_argument("--grid", default="default", help="default (about 6 h on 2 cores) or quick (~10 min)")
    sweep.add_argument("--quick", action="store_true", help="same as --grid quick")
    sweep.add_argument("--out-dir", default=None, help="run dirs go to OUT/runs (default runs/sweep/<grid>)")
    sweep.add_argument("--results", default=None, help="JSON-lines results file (default OUT/results.jsonl)")
    sweep.add_argument("--jobs", type=int, default=1, help="training processes at once (default 1)")
    sweep.add_argument("--threads", type=int, default=None, help="threads per process (default CPUs // jobs)")
    sweep.add_argument("--dataset", default=None, help="registered dataset (default fashion_mnist)")
    sweep.add_argument("--data-dir", default=None, help="where the dataset lives")
    sweep.add_argument("--arch", default=None, help="model family; setup s trains <arch>_<s> (default cifar_resnet8)")
    sweep.add_argument("--setups", nargs="+", default=None, help="e.g. bn gn gn_ws bn_ws bcn_est_ws ln_ws")
    sweep.add_argument("--batches", nargs="+", type=int, default=None, help="images per step")
    sweep.add_argument("--seeds", nargs="+", type=int, default=None)
    sweep.add_argument("--train-images", type=int, default=None, help="training subset size (in-memory datasets)")
    sweep.add_argument("--eval-images", type=int, default=None, help="evaluate on the first N test images")
    sweep.add_argument("--epochs", type=int, default=None, help="epochs, the same for every batch size")
    sweep.add_argument("--image-size", type=int, default=None, help="crop size for imagefolder")
    sweep.add_argument("--search-batch", type=int, default=None, help="images per step of the lr search")
    sweep.add_argument("--search-lrs", nargs="+", type=float, default=None, help="candidate base lrs at 256 images")
    sweep.add_argument("--search-seed", type=int, default=None, help="seed of the lr search runs")
    sweep.add_argument("--search-extend", type=int, default=None, help="extensions (x2 / /2) of the candidates while "
                       "the best is the largest / smallest tried (default 3)")  # fmt: skip
    sweep.add_argument("--max-steps", type=int, default=None, help="cut every run after N steps (smoke tests)")
    sweep.set_defaults(func=_cmd_sweep)


def _cmd_models(args: argparse.Namespace) -> int:
    from torchws.models import get_model_info, list_models

    names = list_models(args.pattern)
    if not names:
        print(f"no model matches {args.pattern!r}", file=sys.stderr)
        return 1
    for name in names:
        info = get_model_info(name)
        size = "x".join(str(s) for s in info.input_size[1:])
        print(f"{name:32s} {info.family:14s} norm={info.norm:3s} ws={'yes' if info.ws else 'no ':3s} input {size}")
    return 0


def _cmd_datasets(args: argparse.Namespace) -> int:
    from torchws.data import dataset_info, list_datasets

    for name in list_datasets():
        if name == "imagefolder":
            print(f"{name:16s} ImageNet layout <data-dir>/train/<class>/*, <data-dir>/val/<class>/* (needs --data-dir)")
            continue
        channels, size, classes = dataset_info(name)
        print(f"{name:16s} {channels} x {size} x {size} px, {classes} classes")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line of stderr (exit code 2), like every other user error of the CLI."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``torchws`` with one subparser per verb."""
    from torchws.train import add_config_flags

    parser = _Parser(prog="torchws", description="Weight Standardization for PyTorch.")
    verbs = parser.add_subparsers(dest="verb", metavar="{train,demo,sweep,report,analyze,models,datasets}",
                                  required=True)  # fmt: skip
    train = verbs.add_parser("train", help="train a model (single process or under torchrun)")
    add_config_flags(train)
    train.set_defaults(func=_cmd_train)
    demo = verbs.add_parser("demo", help="BN vs GN vs GN+WS at 2 images per step on Fashion-MNIST")
    demo.add_argument("--budget", default="small", help="tiny, small (default, ~10 min on 2 cores), medium, full, "
                      "or a number of training images")  # fmt: skip
    demo.add_argument("--out-dir", default="runs/demo", help="where results.json and curves.png go")
    demo.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX files")
    demo.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: at 2 images per step "
                      "more threads barely help, and on a busy machine they spin; 0: torch's choice)")  # fmt: skip
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_demo)
    _add_sweep_parser(verbs)
    _add_report_parsers(verbs)
    models = verbs.add_parser("models", help="list registered models")
    models.add_argument("pattern", nargs="?", default="*", help="fnmatch pattern, e.g. '*_gn_ws'")
    models.set_defaults(func=_cmd_models)
    datasets = verbs.add_parser("datasets", help="list datasets")
    datasets.set_defaults(func=_cmd_datasets)
    return parser


_PIP_NAMES = {"sklearn": "scikit-learn", "PIL": "pillow", "yaml": "pyyaml"}


def _user_errors() -> tuple[type[BaseException], ...]:
    from torchws.data import DatasetFormatError, DatasetNotFoundError
    from torchws.experiments import ExperimentError
    from torchws.train import TrainError

    return (TrainError, DatasetNotFoundError, DatasetFormatError, ExperimentError)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``torchws`` console script; returns the exit code."""
    from torchws.train.errors import NonFiniteError

    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except NonFiniteError as e:  # the run diverged; last.pt holds the weights before (docs/reliability.md)
        print(f"torchws: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_NONFINITE
    except _user_errors() as e:
        message = " ".join(str(e).split())  # one line, whatever the library put in it
        print(f"torchws: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except ImportError as e:  # an optional dependency (scikit-learn for digits, Pillow for image folders)
        if isinstance(e, ModuleNotFoundError) and e.name:
            package = _PIP_NAMES.get(e.name, e.name)
            message = f"this needs the package {e.name!r}, which is not installed: pip install {package}"
        else:
            message = " ".join(str(e).split())
        print(f"torchws: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("torchws: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
