"""What every command line here shares: bad input is refused in one line.

The line names the flag, the value and what was expected, and the exit code is 2, argparse's
convention; no usage block, no traceback. Checks run where the arguments are parsed, before
anything trains or loads:

    p = cli.parser(__doc__)
    p.add_argument("--lr", type=cli.above(0.0), default=2e-3)     # a float > 0
    p.add_argument("--steps", type=cli.at_least(1), default=800)  # an integer >= 1
    p.add_argument("--seeds", type=cli.integers(0), default="0,1,2")
    p.add_argument("--device", type=cli.device, default="auto")   # auto -> cuda if present, else cpu
"""

import argparse
import math
from typing import Callable

import torch


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print its usage block first
        self.exit(2, f"error: {message}\n")


def parser(doc: str | None) -> argparse.ArgumentParser:
    """An ArgumentParser whose errors are one line; its description is doc's first paragraph."""
    return OneLineParser(description=(doc or "").split("\n\n")[0])


def _number(text: str, kind: type) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def at_least(low: float, kind: type = int) -> Callable[[str], int | float]:
    """An argparse type: a number >= low (an integer unless kind=float)."""
    def check(text: str) -> int | float:
        value = _number(text, kind)
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'} >= {low:g}, got {text}")
        return value
    return check


def above(low: float) -> Callable[[str], float]:
    """An argparse type: a finite float > low (learning rates, α)."""
    def check(text: str) -> float:
        value = _number(text, float)
        if value <= low:
            raise argparse.ArgumentTypeError(f"expected a number > {low:g}, got {text}")
        return value
    return check


def integers(low: int, high: int | None = None) -> Callable[[str], list[int]]:
    """An argparse type: comma-separated integers, each in [low, high]."""
    def check(text: str) -> list[int]:
        values = [_number(part, int) for part in text.split(",")]
        bad = [v for v in values if v < low or (high is not None and v > high)]
        if bad:
            bounds = f">= {low}" if high is None else f"in {low} ... {high}"
            raise argparse.ArgumentTypeError(f"expected comma-separated integers {bounds}, got {text}")
        return values
    return check


def device(text: str) -> str:
    """An argparse type: auto (CUDA if present, else the CPU), cpu, cuda or cuda:N, if this machine has it."""
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    if dev.type == "cuda" and not (torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count()):
        raise argparse.ArgumentTypeError(f"{text} is not available here ({torch.cuda.device_count()} CUDA "
                                         f"device(s)); expected auto or cpu")
    return text
