"""argparse value types shared by the CLI's commands: bad values get argparse's usage error."""

from __future__ import annotations

import argparse

from tracemesh.net import parse_addr


def addr(text: str):
    try:
        return parse_addr(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {v}")
    return v
