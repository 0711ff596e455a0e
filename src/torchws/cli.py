"""``torchws <verb>``: train, demo, models, datasets. Parses arguments and calls library functions, nothing else.

User errors (bad names, missing or malformed data, unusable checkpoints, a run dir that would be overwritten) print
one line ``torchws: error: ...`` on stderr and exit with code 2, like argparse's own errors.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

__all__ = ["main"]

EXIT_USAGE = 2
EXIT_NONFINITE = 3


def _cmd_train(args: argparse.Namespace) -> int:
    from torchws.train import config_from_args, train

    train(config_from_args(args))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from torchws.demo import run_demo

    threads = args.threads if args.threads > 0 else None
    run_demo(args.out_dir, args.budget, data_dir=args.data_dir, threads=threads, seed=args.seed)
    return 0


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
    verbs = parser.add_subparsers(dest="verb", metavar="{train,demo,models,datasets}", required=True)
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
    models = verbs.add_parser("models", help="list registered models")
    models.add_argument("pattern", nargs="?", default="*", help="fnmatch pattern, e.g. '*_gn_ws'")
    models.set_defaults(func=_cmd_models)
    datasets = verbs.add_parser("datasets", help="list datasets")
    datasets.set_defaults(func=_cmd_datasets)
    return parser


_PIP_NAMES = {"sklearn": "scikit-learn", "PIL": "pillow", "yaml": "pyyaml"}


def _user_errors() -> tuple[type[BaseException], ...]:
    from torchws.data import DatasetFormatError, DatasetNotFoundError
    from torchws.train import TrainError

    return (TrainError, DatasetNotFoundError, DatasetFormatError)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``torchws`` console script; returns the exit code."""
    from torchws.train.errors import NonFiniteError

    parser = build_parser()
    args = parser.parse_args(argv)
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
