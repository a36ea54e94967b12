"""`python -m pixart_fast.train --stage {1,2,3} [--field value ...]`: run one stage of PixArt-alpha training.

The stage picks its recipe (train/recipes.py); every field of TrainConfig is a flag that overrides it.
"""
import argparse
import dataclasses
import re
import sys
import typing

from pixart_fast.checkpoints import matching_configs, training_metadata
from pixart_fast.cli import UserError, run
from .loop import train
from .recipes import RECIPES, TrainConfig


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


def _show(value) -> str:
    """A recipe value as the command line takes it."""
    if isinstance(value, bool):
        return str(value).lower()
    return "none" if value is None else str(value)


def _stages(stages: list[int]) -> str:
    return f"stage {stages[0]}" if len(stages) == 1 else \
        "stages " + ", ".join(map(str, stages[:-1])) + f" and {stages[-1]}"


def _help(field: dataclasses.Field) -> str:
    """A field's help text with its default stated once: the recipes' value ("0.03"), or each stage's where they
    differ ("stage 1: 2000, stage 2: 1200, ..."). A text that states its default itself ("...; default: the
    embedded tiny T5") is left as it is; a trailing "(paper: X)" joins the default's parentheses."""
    text = field.metadata["help"]
    if "default:" in text:
        return text
    if field.name == "stage":
        default = "2"
    else:
        by_value = {}
        for stage, recipe in RECIPES.items():
            by_value.setdefault(_show(getattr(recipe, field.name)), []).append(stage)
        default = (next(iter(by_value)) if len(by_value) == 1 else
                   ", ".join(f"{_stages(stages)}: {value}" for value, stages in by_value.items()))
    paper = re.search(r"\s*\((paper: [^()]*)\)$", text)
    if paper:
        return f"{text[:paper.start()]} (default: {default}; {paper.group(1)})"
    return f"{text} (default: {default})"


def parser() -> argparse.ArgumentParser:
    recipes = "\n".join(f"  stage {s}: model {r.model}, {r.steps} steps x {r.batch_size} images, lr {r.lr}"
                        for s, r in RECIPES.items())
    p = argparse.ArgumentParser(prog="python -m pixart_fast.train", description=__doc__,
                                epilog="recipes (defaults sized for the embedded dataset on a 2-core CPU):\n" + recipes,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        p.add_argument("--" + f.name.replace("_", "-"), type=_converter(hints[f.name]), default=None,
                       metavar=f.name.upper(), choices=f.metadata["choices"],
                       help=_help(f).replace("%", "%%"))
    return p


def config_from_args(argv=None) -> TrainConfig:
    """The stage's recipe with the flags given on the command line replacing its fields. --init of released weights
    (a diffusers folder, an official .pth) without --model: the model config they fit, when only one does."""
    args = vars(parser().parse_args(argv))
    stage = args.pop("stage") or 2
    if args["init"] and args["model"] is None and not training_metadata(args["init"]).get("model"):
        fits = matching_configs(args["init"])
        if len(fits) > 1:
            raise UserError(f"--init {args['init']} fits several models ({', '.join(fits)}); pass --model")
        if fits:
            args["model"] = fits[0]
            print(f"--init {args['init']}: model {fits[0]}")
    return dataclasses.replace(RECIPES[stage], **{k: v for k, v in args.items() if v is not None})


def main(argv=None) -> int:
    train(config_from_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
