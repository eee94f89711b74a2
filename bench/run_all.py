"""`make bench`: every benchmark in one run, one JSON object per line on stdout."""

from __future__ import annotations

import sys

from bench import (
    attention_shapes,
    cluster,
    decode_steps,
    fused_norms,
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
    train_while_sampling.main(extra)
    memory.main(extra)
    rl_loop.main(extra)
    load.main(extra)
    cluster.main([])
    attention_shapes.main([])
    # Last: these set this process up as the worker's (its allocator, its attention kernels).
    sampling.main(extra)
    decode_steps.main(extra)
    fused_norms.main(extra)
    token_choice.main([])


if __name__ == "__main__":
    main()
