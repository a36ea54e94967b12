"""`python -m pixart_fast.train --stage {1,2,3} [--field value ...]`: run one stage of PixArt-alpha training.

The stage picks its recipe (train/recipes.py); every field of TrainConfig is a flag that overrides it.
"""
import argparse
import dataclasses
import sys
import typing

from pixart_fast.train.loop import train
from pixart_fast.train.recipes import RECIPES, TrainConfig


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _converter(kind):
    if kind is bool:
        return _parse_bool
    if typing.get_origin(kind) is not None:  # `X | None`: convert to X
        return next(a for a in typing.get_args(kind) if a is not type(None))
    return kind


def parser() -> argparse.ArgumentParser:
    recipes = "\n".join(f"  stage {s}: model {r.model}, {r.steps} steps x {r.batch_size} images, lr {r.lr}"
                        for s, r in RECIPES.items())
    p = argparse.ArgumentParser(prog="python -m pixart_fast.train", description=__doc__,
                                epilog="recipes (defaults sized for the embedded dataset on a 2-core CPU):\n" + recipes,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        default = "2" if f.name == "stage" else "the stage's recipe"
        p.add_argument("--" + f.name.replace("_", "-"), type=_converter(hints[f.name]), default=None,
                       metavar=f.name.upper(), choices=sorted(RECIPES) if f.name == "stage" else None,
                       help=f"{f.metadata['help']} (default: {default})")
    return p


def config_from_args(argv=None) -> TrainConfig:
    """The stage's recipe with the flags given on the command line replacing its fields."""
    args = vars(parser().parse_args(argv))
    stage = args.pop("stage") or 2
    return dataclasses.replace(RECIPES[stage], **{k: v for k, v in args.items() if v is not None})


def main(argv=None) -> int:
    train(config_from_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
