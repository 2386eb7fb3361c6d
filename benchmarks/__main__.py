"""`make bench` / `python -m benchmarks [--only NAME] [bench options]`: run the benchmarks."""

import argparse

from benchmarks import int8, loader, prune, train_step

# benchmarks.serve (`make bench-serve`) is not here: it needs locust's venv and two servers.
BENCHES = {"train_step": train_step, "int8": int8, "loader": loader, "prune": prune}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", choices=sorted(BENCHES), help="run one benchmark")
    args, rest = parser.parse_known_args()
    for name, bench in BENCHES.items():
        if args.only in (None, name):
            print(f"== {name}: {bench.__doc__.strip().splitlines()[0]}")
            bench.main(rest)


if __name__ == "__main__":
    main()
