"""`make bench`: every benchmark in one run, one JSON object per line on stdout."""

from __future__ import annotations

from bench import sampling, training


def main() -> None:
    training.main([])
    sampling.main([])


if __name__ == "__main__":
    main()
