"""Fine-tunes a LoRA adapter to answer a few questions, through a real server.

Starts `tinker-server` on the embedded model, trains with forward_backward + optim_step
over the gRPC stream, and shows greedy completions before and after.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from server_process import running_server  # noqa: E402

from tinker_client import ServiceClient, types  # noqa: E402

QA_PAIRS = [
    ("What is the capital of France?", "Paris"),
    ("What color is the sky?", "Blue"),
    ("How many legs does a spider have?", "Eight"),
    ("What do bees make?", "Honey"),
    ("Which planet is red?", "Mars"),
    ("What is frozen water?", "Ice"),
]
STEPS = 60
ADAM = types.AdamParams(learning_rate=2e-3)


def prompt_tokens(tokenizer, question: str) -> list[int]:
    return tokenizer.encode(f"Q: {question}\nA:")


def make_datum(tokenizer, question: str, answer: str) -> types.Datum:
    """Next-token prediction on the answer only: prompt tokens get weight 0."""
    prompt = prompt_tokens(tokenizer, question)
    completion = tokenizer.encode(f" {answer}", add_special_tokens=False) + [tokenizer.eos_token_id]
    tokens = prompt + completion
    weights = [0.0] * (len(prompt) - 1) + [1.0] * len(completion)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights},
    )


def completions(sampling_client, tokenizer) -> list[str]:
    params = types.SamplingParams(max_tokens=12, temperature=0.0)
    futures = [
        sampling_client.sample(types.ModelInput.from_ints(prompt_tokens(tokenizer, question)), 1, params)
        for question, _ in QA_PAIRS
    ]
    return [
        tokenizer.decode(future.result().sequences[0].tokens, skip_special_tokens=True).strip() for future in futures
    ]


@dataclass
class Outcome:
    base_model: str
    losses: list[float]
    before: list[str]
    after: list[str]

    @property
    def learned(self) -> bool:
        return self.losses[-1] <= self.losses[0] / 2


def fine_tune(service: ServiceClient, base_model: str, position: int = 0, show_console: bool = False) -> Outcome:
    """The demo's loop on one base model: completions before, STEPS steps, completions after;
    `show_console`: print the run's console page first, to watch its loss curve fall."""
    training = service.create_lora_training_client(base_model, rank=16, seed=0).result()
    if show_console:
        print(f"watch the run's loss curve in the console: {training.get_console_url()}", flush=True)
    tokenizer = training.get_tokenizer()
    data = [make_datum(tokenizer, question, answer) for question, answer in QA_PAIRS]
    answer_tokens = sum(sum(datum.loss_fn_inputs["weights"].data) for datum in data)

    before = completions(training.save_weights_and_get_sampling_client("before").result(), tokenizer)
    losses = []
    with tqdm(range(STEPS), desc=f"training {base_model}", unit="step", position=position) as progress:
        for _ in progress:
            # Both requests are queued at once; the server runs them in order.
            backward = training.forward_backward(data, "cross_entropy")
            training.optim_step(ADAM)
            losses.append(backward.result().metrics["loss:sum"] / answer_tokens)
            progress.set_postfix(loss=f"{losses[-1]:.3f}")
    after = completions(training.save_weights_and_get_sampling_client("after").result(), tokenizer)
    return Outcome(base_model, losses, before, after)


def report(outcome: Outcome) -> None:
    losses = outcome.losses
    print(f"\n{outcome.base_model}: loss per answer token {losses[0]:.3f} -> {losses[-1]:.3f}", end=" ")
    print(f"({losses[-1] / losses[0]:.1%} of the start)")
    print(f"{'question':<36} {'target':<8} {'before':<16} after")
    for (question, answer), old, new in zip(QA_PAIRS, outcome.before, outcome.after, strict=True):
        print(f"{question:<36} {answer:<8} {old!r:<16} {new!r}")
    correct = sum(new == answer for (_, answer), new in zip(QA_PAIRS, outcome.after, strict=True))
    print(f"{correct}/{len(QA_PAIRS)} answers exact after training")


def main() -> int:
    started = time.monotonic()
    # The console on any free port; its URL comes to the client with the server's capabilities.
    with tempfile.TemporaryDirectory() as data_dir, running_server(Path(data_dir), ["--console-port", "0"]) as address:
        print(f"server up at {address} ({time.monotonic() - started:.1f}s)")
        service = ServiceClient(base_url=address)
        base_model = service.get_server_capabilities().supported_models[0].model_name
        outcome = fine_tune(service, base_model, show_console=True)
        service.close()
        report(outcome)
        print(f"total {time.monotonic() - started:.0f}s")
        if sys.stdin.isatty():  # someone is watching: leave the console up to look at the run
            input("the server and its console stay up until you press Enter ")
    return 0 if outcome.learned else 1


if __name__ == "__main__":
    sys.exit(main())
