"""Options several commands share: whole-number ranges, the model choice (one model or several fused) and
the marks of a tumor in a CT."""

from __future__ import annotations

import argparse

from ..errors import SimilarPatientsError
from ..search.fusion import FUSION_DEPTH, FUSIONS

#: Options whose values may start with a minus sign (LPS coordinates), with an example value.
_NEGATIVE_EXAMPLES = {"--point": "-1,2,3", "--box": "-10,-10,-10,10,10,10"}


class Parser(argparse.ArgumentParser):
    """argparse's parser, whose bare "expected at least one argument" after --point or --box says why: a
    negative coordinate reads as an option unless it is joined with '='."""

    def error(self, message: str):
        for option, example in _NEGATIVE_EXAMPLES.items():
            if f"argument {option}" in message and "expected" in message:
                message += (
                    f" (a value that starts with '-' reads as an option: join it with '=', e.g. {option}={example})"
                )
        super().error(message)


def whole(low: int, high: int | None = None):
    """An argparse type: a whole number from ``low`` (to ``high``), refused at parsing with the range."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            bound = f"from {low:,} to {high:,}" if high is not None else f"of at least {low:,}"
            raise argparse.ArgumentTypeError(f"must be a whole number {bound}, not '{text}'")
        return value

    return parse


def add_model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        nargs="+",
        metavar="MODEL",
        help="the embedding model; several, or 'all' (every model of the reference), to fuse their rankings",
    )
    fused = parser.add_argument_group("several models (--model A B ... or --model all)")
    fused.add_argument(
        "--fusion",
        choices=FUSIONS,
        default="rrf",
        help="rrf: reciprocal rank fusion (default); percentile: the mean of the models' 'closer than N%%'",
    )
    fused.add_argument(
        "--depth",
        type=whole(1),
        default=FUSION_DEPTH,
        help=f"patients each model contributes (default {FUSION_DEPTH})",
    )


def model_argument(args):
    """``--model``: one name, or the models to fuse ("all" stays as it is)."""
    return args.model[0] if len(args.model) == 1 else args.model


def add_image_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image", required=True, help="the CT: DICOM series folder (or one of its files), NIfTI, NRRD")
    tumor = parser.add_mutually_exclusive_group(required=True)
    tumor.add_argument("--mask", metavar="PATH", help="tumor mask: labelmap, Slicer .seg.nrrd or DICOM SEG")
    tumor.add_argument(
        "--point", nargs="+", action="append", metavar="X,Y,Z", help="a point on the tumor, LPS mm (repeatable)"
    )
    tumor.add_argument(
        "--box", nargs="+", action="append", metavar="X0,Y0,Z0,X1,Y1,Z1", help="opposite box corners (repeatable)"
    )
    parser.add_argument(
        "--segment",
        action="append",
        help="the mask's segment: name or label value (.seg.nrrd, labelmap), number (DICOM SEG); repeat it for "
        "several tumors of one patient",
    )
    parser.add_argument("--ras", action="store_true", help="--point/--box are RAS mm (as Slicer shows them)")
    parser.add_argument("--recipe", help="preprocessing recipe (default: the model's reference recipe)")
    parser.add_argument("--weights", metavar="PATH", help="weights file or folder to use instead of a download")
    parser.add_argument("--accept-licence", action="store_true", help="accept a non-commercial weight licence")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: CUDA when present")


def _numbers(tokens: list[str], count: int, option: str) -> list[float]:
    values = [t for token in tokens for t in token.split(",") if t.strip()]
    try:
        numbers = [float(v) for v in values]
    except ValueError:
        numbers = []
    if len(numbers) != count:
        raise SimilarPatientsError(f"{option} needs {count} numbers (mm), e.g. {option}=-10.5,20,-130; got {tokens}.")
    return numbers


def tumors(args) -> list:
    """The query patient's tumors as the options mark them (one per --segment, --point or --box)."""
    from ..imaging.tumor import tumors_from

    return tumors_from(
        mask=args.mask,
        segments=args.segment,
        points=[_numbers(p, 3, "--point") for p in args.point or []],
        boxes=[_numbers(b, 6, "--box") for b in args.box or []],
        ras=args.ras,
    )
