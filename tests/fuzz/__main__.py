"""`make fuzz`: every surface at `--inputs` inputs (100,000 by default); exit 1 on any exception."""

from __future__ import annotations

import argparse
import sys

from tests.fuzz.harness import run
from tests.fuzz.surfaces import all_surfaces


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz")
    parser.add_argument("--inputs", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--surface", action="append", help="only these surfaces (repeatable)")
    args = parser.parse_args()
    failed = False
    for surface in all_surfaces():
        if args.surface and surface.name not in args.surface:
            continue
        tally = run(surface, args.inputs, args.seed)
        print(tally.line(), flush=True)
        for text in tally.exceptions[:3]:
            print("  EXCEPTION:", text.replace("\n", "\n    "), flush=True)
        failed = failed or bool(tally.exceptions)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
