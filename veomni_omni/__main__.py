"""`python -m veomni_omni diffs --write | --check`: regenerate `patches/*.diff` from the patch set, or fail
when one is stale (what `make diffs` runs; a test checks the same)."""

import argparse
import sys

from .patching import DIFF_DIR, diff_path, stale_diffs
from .patchset import PATCHES


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m veomni_omni", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    diffs = commands.add_parser("diffs", help="the patch set's diffs against the upstream sources")
    group = diffs.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", action="store_true", help="regenerate patches/*.diff")
    group.add_argument("--check", action="store_true", help="fail if any patches/*.diff is stale")
    args = parser.parse_args(argv)
    if args.write:
        DIFF_DIR.mkdir(exist_ok=True)
        for stale in DIFF_DIR.glob("*.diff"):
            stale.unlink()
        for patch in PATCHES:
            diff_path(patch).write_text(patch.diff())
            print(f"wrote {diff_path(patch)}")
        return 0
    stale = stale_diffs(PATCHES)
    if stale:
        print(f"stale diffs: {', '.join(stale)}; run `make diffs`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
