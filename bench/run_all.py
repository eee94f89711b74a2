"""`make bench`: every benchmark in one run, one JSON object per line on stdout."""

from __future__ import annotations

import sys

from bench import (
    cluster,
    decode_steps,
    latency,
    load,
    memory,
    rl_loop,
    sampling,
    token_choice,
    train_while_sampling,
    training,
    wire,
)


def main() -> None:
    """Extra arguments (e.g. --base-model PATH for a GPU run) go to every benchmark that takes them."""
    extra = sys.argv[1:]
    training.main(extra)
    latency.main(extra)
    wire.main([])
    sampling.main(extra)
    decode_steps.main(extra)
    train_while_sampling.main(extra)
    memory.main(extra)
    rl_loop.main(extra)
    load.main(extra)
    cluster.main([])
    token_choice.main([])  # last: it sets this process's allocator as the worker's


if __name__ == "__main__":
    main()
