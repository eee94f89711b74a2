"""Wire efficiency: bytes on the wire for a forward_backward batch, against the raw tensor
bytes and against the public Tinker SDK's own protobuf encoding of the same batch.

The Tinker SDK (`pip install tinker==0.38.0`; `make bench` installs it) encodes with its
`tinker.proto.request_conv`, which is called here, never copied.
"""

from __future__ import annotations

import argparse

import numpy as np

from bench.common import emit
from tinker_client import types
from tinker_client._convert import forward_backward_input
from tinker_rpc.v1 import service_pb2


def make_batch(rows: int, length: int, prompt_fraction: float, seed: int = 0) -> list[types.Datum]:
    """Next-token datums; the first `prompt_fraction` of each row has weight 0 (a prompt)."""
    rng = np.random.default_rng(seed)
    data = []
    for _ in range(rows):
        tokens = rng.integers(0, 150_000, size=length + 1)
        weights = np.ones(length, dtype=np.float32)
        weights[: int(prompt_fraction * length)] = 0.0
        data.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1].tolist()),
                loss_fn_inputs={"target_tokens": tokens[1:].astype(np.int64), "weights": weights},
            )
        )
    return data


def raw_bytes(data: list[types.Datum]) -> int:
    """Tokens as int32 (what any tokenizer's ids fit in) plus the loss inputs as given."""
    return sum(
        datum.model_input.length * 4 + sum(value.array.nbytes for value in datum.loss_fn_inputs.values())
        for datum in data
    )


def ours(data: list[types.Datum]) -> int:
    request = service_pb2.SessionRequest(
        request_id="r1",
        model_id="run-0123456789abcdef",
        forward_backward=forward_backward_input(data, "cross_entropy", None),
    )
    return request.ByteSize()


def tinker_sdk(data: list[types.Datum]) -> int | None:
    try:
        import tinker
        from tinker.proto.request_conv import forward_backward_request_to_proto
    except ImportError:
        return None
    request = tinker.types.ForwardBackwardRequest(
        forward_backward_input=tinker.types.ForwardBackwardInput(
            data=[
                tinker.types.Datum(
                    model_input=tinker.types.ModelInput.from_ints(datum.model_input.to_ints()),
                    loss_fn_inputs={key: value.to_numpy() for key, value in datum.loss_fn_inputs.items()},
                )
                for datum in data
            ],
            loss_fn="cross_entropy",
        ),
        model_id="run-0123456789abcdef",
        seq_id=1,
    )
    return forward_backward_request_to_proto(request).ByteSize()


def run(rows: int, length: int) -> dict:
    results = []
    for prompt_fraction in (0.0, 0.5):
        data = make_batch(rows, length, prompt_fraction)
        raw, mine, theirs = raw_bytes(data), ours(data), tinker_sdk(data)
        results.append(
            {
                "figure": "wire_efficiency",
                "batch": f"{rows}x{length}, {int(prompt_fraction * 100)}% prompt",
                "raw_tensor_bytes": raw,
                "our_bytes": mine,
                "ours_vs_raw": round(mine / raw, 3),
                "tinker_sdk_bytes": theirs,
                "ours_vs_tinker_sdk": None if theirs is None else round(mine / theirs, 3),
            }
        )
    return {"benchmark": "wire", "results": results}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    args = parser.parse_args(argv)
    report = run(args.rows, args.length)
    emit(report, [key for key in report["results"][0] if key != "figure"])
    return report


if __name__ == "__main__":
    main()
