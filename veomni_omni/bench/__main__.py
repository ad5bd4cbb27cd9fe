"""`python -m veomni_omni.bench <name> [options]`; `--help` after a name shows its options."""

from __future__ import annotations

import importlib
import sys

from . import BENCHMARKS


def _usage() -> str:
    lines = ["usage: python -m veomni_omni.bench <name> [--json] [--quick] [options]", "", "benchmarks:"]
    lines += [f"  {name:<10} {description}" for name, (_, description) in BENCHMARKS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        print(f"unknown benchmark {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    return importlib.import_module(f"{__package__}.{BENCHMARKS[name][0]}").main(rest)


if __name__ == "__main__":
    sys.exit(main())
