"""Commands that use a trained run: generate, eval."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import click
from click.core import ParameterSource

from ..errors import AdaptersError
from ..text import DASH, aligned_table
from . import cli, echo_json


@cli.command()
@click.argument("run", metavar="RUN")
@click.option("--prompt", required=True, help="The text to continue (with the chat template: the user's message).")
@click.option("--chat/--no-chat", default=None,
              help="Render the prompt as a user turn with the tokenizer's chat template, or as plain text "
                   "[default: as RUN was trained: the chat template for chat data].")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True,
              help="0 decodes greedily; above 0 samples, seeded by --seed.")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="With --temperature: nucleus sampling.")
@click.option("--seed", type=int, default=0, show_default=True, help="With --temperature: the sampling seed.")
@click.option("--compare-base", is_flag=True, help="Then the base model's answer to the same prompt.")
@click.pass_context
def generate(ctx: click.Context, run: str, prompt: str, chat: bool | None, max_new_tokens: int, temperature: float,
             top_p: float, seed: int, compare_base: bool) -> None:
    """Continue a prompt with a causal-lm RUN, streamed as it is generated.

    RUN is a run's --output directory or a merged checkpoint. A run trained on chat data gets the
    prompt through its chat template, any other as plain text; --chat or --no-chat chooses. With
    --compare-base, the base model answers too: the same model with its adapter disabled (PEFT
    strategies), or the base loaded again (strategies that change the base's own weights). An
    answer without any text says why on stderr, and the exit code is 2.
    """
    from ..evaluation import inspect_run
    from ..generate import Generator, NothingGenerated, check_decoding, check_generates, check_prompt

    sampling_flags = [f"--{n.replace('_', '-')}" for n in ("top_p", "seed")
                      if ctx.get_parameter_source(n) == ParameterSource.COMMANDLINE]
    if sampling_flags and temperature == 0:
        verb = "applies" if len(sampling_flags) == 1 else "apply"
        raise AdaptersError(f"{' and '.join(sampling_flags)} {verb} to sampling, and decoding is greedy: add "
                            "--temperature T (above 0, e.g. 0.7), or drop them.")
    check_prompt(prompt)
    check_decoding(max_new_tokens, temperature, top_p)
    info = inspect_run(run)
    check_generates(info)  # before any weight loads
    generator = Generator(info)
    options: dict[str, Any] = dict(chat=chat, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                   seed=seed)
    generator.prompt_ids(prompt, chat)  # a prompt --chat cannot render fails before any header
    answers = [(f"{info.describe()}", False)]
    if compare_base:
        answers.append((f"base: {generator.base_source}", True))
    silent = False
    for label, base in answers:
        if compare_base:
            click.echo(f"--- {label} ---")
        try:
            _echo_stream(generator.generate(prompt, base=base, **options))
        except NothingGenerated as exc:  # said here, so that the base still answers after it
            click.echo(f"Error: {exc}", err=True)
            silent = True
    if silent:
        ctx.exit(2)


def _echo_stream(pieces: Iterator[str]) -> None:
    """Each piece as it comes, then one newline (none when nothing came)."""
    printed = False
    try:
        for piece in pieces:
            click.echo(piece, nl=False)
            printed = True
    finally:
        if printed:
            click.echo()


@cli.command("eval")
@click.argument("run", metavar="RUN")
@click.option("--data", default=None, help="Data file, as train takes it [default: the run's own, or built-in].")
@click.option("--split", type=click.Choice(["held-out", "all"]), default="held-out", show_default=True,
              help="held-out: the part training never sees; all: every example (a file kept for evaluation).")
@click.option("--batches", type=int, default=None, help="Batches to score [default: the run's --eval-batches, 8].")
@click.option("--batch-size", type=int, default=None, help="[default: the run's, 4]")
@click.option("--seq-len", type=int, default=None, help="[default: the run's, 128]")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def eval_command(run: str, data: str | None, split: str, batches: int | None, batch_size: int | None,
                 seq_len: int | None, as_json: bool) -> None:
    """Held-out loss and perplexity (causal-lm), or loss and accuracy (classification), of a RUN.

    RUN is a run's --output directory or a merged checkpoint (a plain transformers folder). By default
    it is scored as training scored it: the same data, sequence length, batch size and batches, so a
    run's numbers equal the "after" of its train summary.
    """
    from ..evaluation import evaluate_run

    result = evaluate_run(run, data, batches=batches, batch_size=batch_size, seq_len=seq_len, split=split)
    if as_json:
        echo_json(result)
        return
    if result["strategy"]:
        what = f"run, {result['task']}: {result['strategy']} on {result['model']}"
    else:
        what = f"checkpoint, {result['task']}" + (f", merged into {result['model']}" if result["model"] else "")
    click.echo(f"{result['run']} ({what})")
    click.echo(f"{result['data']}, {result['split']} split ({result['examples']} examples): up to "
               f"{result['batches']} batches of {result['batch_size']} x {result['seq_len']} tokens")
    names = ["loss", "perplexity"] if result["task"] == "causal-lm" else ["loss", "accuracy"]
    click.echo(aligned_table([[_number(result[n], n) for n in names]], names))


def _number(value: float | None, name: str) -> str:
    if value is None:
        return DASH
    return f"{value:.2%}" if name == "accuracy" else f"{value:.4f}"
