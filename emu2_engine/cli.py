"""The command-line parser of the engine's entry points: argparse, but a bad argument is said in
one line (`prog: error: what`), as every other bad input is, without argparse's usage block
before it (`--help` still prints the usage)."""

from __future__ import annotations

import argparse
import sys


class ArgumentParser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` whose errors are one line on stderr, with exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        text = " ".join(message.split())
        sys.stderr.write(f"{self.prog}: error: {text} (see --help)\n")
        sys.exit(2)
