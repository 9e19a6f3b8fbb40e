"""Commands that run models: train, bench, plan."""
from __future__ import annotations

from typing import Any

import click
from click.core import ParameterSource

from ..contract import LR_SCHEDULERS, QUANTIZATIONS, TASKS
from ..errors import AdaptersError
from ..runspec import DEFAULT_MODEL, DEFAULT_STRATEGY, SHARDINGS, RunSpec
from ..text import aligned_table
from . import cli, echo_json
from .tables import plan_rows, train_summary


@cli.command()
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Model name, local directory or hub id.")
@click.option("--strategy", default=DEFAULT_STRATEGY, show_default=True,
              help="Strategy name; NAME@QUANT also sets quantization.")
@click.option("--quantization", type=click.Choice(QUANTIZATIONS), default=None,
              help="Quantize the base (default: the strategy's own, e.g. nf4 for qlora).")
@click.option("--task", type=click.Choice(TASKS), default=None,
              help="Default: the model's own.")
@click.option("--data", default=None,
              help=".jsonl, .json, .csv, .parquet or .txt file, a save_to_disk directory, or builtin:NAME "
              "(python-reference, instructions, stdlib-docstrings); columns: messages, prompt/completion, "
              "instruction/input/output or text (default: built-in real text).")
@click.option("--packing/--no-packing", default=None,
              help="Instruction and chat data: pack several examples into each --seq-len row, attention kept within "
              "each (default: packing, which measured faster).")
@click.option("--train-on-prompt", is_flag=True, default=None,
              help="Instruction and chat data: train on the prompt's tokens too, not the completion's alone.")
@click.option("--max-steps", type=int, default=RunSpec.max_steps, show_default=True)
@click.option("--batch-size", type=int, default=RunSpec.batch_size, show_default=True)
@click.option("--gradient-accumulation-steps", type=int, default=RunSpec.gradient_accumulation_steps, show_default=True)
@click.option("--seq-len", type=int, default=RunSpec.seq_len, show_default=True)
@click.option("--learning-rate", type=float, default=None, help="Default: the strategy's own.")
@click.option("--lr-scheduler", type=click.Choice(LR_SCHEDULERS), default=None,
              help="Learning-rate schedule (default: the strategy's own, cosine).")
@click.option("--warmup-steps", type=int, default=None, help="Steps of linear warm-up.")
@click.option("--warmup-ratio", type=float, default=None, help="Warm-up as a fraction of --max-steps (default: 0).")
@click.option("--weight-decay", type=float, default=None, help="AdamW's weight decay (default: the strategy's, 0).")
@click.option("--max-grad-norm", type=float, default=None, help="Clip gradients to this norm; 0 turns it off "
              "(default: the strategy's, 1.0).")
@click.option("--gradient-checkpointing", is_flag=True, help="Recompute activations in backward to save memory.")
@click.option("--loss-chunk", type=int, default=None, metavar="TOKENS",
              help="Causal LM: compute the loss in chunks of this many tokens, never the whole batch's logits; 0: "
              "the model's own loss (default: a measured chunk size).")
@click.option("--compile/--no-compile", "compile", default=None,
              help="torch.compile each decoder layer (default: the device's measured default).")
@click.option("--memory-limit", default=None, metavar="SIZE",
              help="Fit the run into SIZE (e.g. 6GiB): choose the micro-batch, gradient checkpointing and "
              "accumulation, keeping the effective batch.")
@click.option("--sharding", type=click.Choice(SHARDINGS), default=RunSpec.sharding, show_default=True,
              help="fsdp: shard weights, gradients and optimizer states across the processes of torchrun (FSDP2 "
              "through Accelerate, a unit per decoder layer); none: each process holds the whole model.")
@click.option("--seed", type=int, default=RunSpec.seed, show_default=True)
@click.option("--eval-batches", type=int, default=RunSpec.eval_batches, show_default=True)
@click.option("--eval-every", type=int, default=None, help="Also evaluate the held-out split every N steps.")
@click.option("--log-every", type=int, default=RunSpec.log_every, show_default=True,
              help="Steps between lines of OUTPUT/metrics.jsonl.")
@click.option("--save-every", type=int, default=None, help="Write OUTPUT/checkpoints/step-N every N steps.")
@click.option("--keep-checkpoints", type=int, default=None, help="Keep only the newest K checkpoints.")
@click.option("--report-to", "report_to", multiple=True, metavar="TRACKER",
              help="An Accelerate tracker: tensorboard, wandb, mlflow, ... (repeatable); logs go to OUTPUT/logs.")
@click.option("--output", default=None, help="Directory to save the trained strategy, its checkpoints and metrics in.")
@click.option("--overwrite", is_flag=True, help="Replace --output when it holds an earlier adapters run.")
@click.option("--allow-other-base", is_flag=True, default=None,
              help="With --resume: continue onto a base whose weights differ from the checkpoint's.")
@click.option("--resume", "resume", default=None, metavar="OUTPUT",
              help="Continue the run in OUTPUT: from its newest checkpoint, exactly, with the settings recorded "
              "there; or, when it has none, from its final save with a fresh optimizer and schedule for --max-steps "
              "more steps.")
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE", help="A strategy option (repeatable).")
@click.option("--config", "config_file", default=None, help="TOML file of settings; flags given here win.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def train(ctx: click.Context, assignments: tuple[str, ...], config_file: str | None, resume: str | None,
          as_json: bool, **flags: Any) -> None:
    """Train a strategy on a base model, evaluate it before and after, and save it.

    Exits 130 when interrupted (after writing a checkpoint, with the command to resume), 1 when the
    run failed (a loss, a weight or a held-out metric not finite, or out of memory even with a
    micro-batch of 1); a failed run saves nothing and keeps any earlier save.
    """
    from ..checkpoints import resume_spec
    from ..options import parse_assignments
    from ..runspec import spec_from
    from ..trainer import train as run_training

    given = {k: (list(v) if isinstance(v, tuple) else v) for k, v in flags.items()
             if ctx.get_parameter_source(k) == ParameterSource.COMMANDLINE}
    options = parse_assignments(assignments)
    if given.get("allow_other_base") and resume is None:
        raise AdaptersError("--allow-other-base applies to --resume OUTPUT only: a new run records its own base.")
    if resume is not None:
        if config_file:
            raise AdaptersError("--resume takes the settings recorded in the run; drop --config.")
        spec = resume_spec(resume, given, options)
    else:
        spec = spec_from(config_file, given, options)
    result = run_training(spec, progress=True)
    if not result.main_process:  # in data-parallel runs, one process reports for all
        return
    if as_json:
        echo_json(result.summary())
    else:
        click.echo(train_summary(result))
    ctx.exit({"completed": 0, "interrupted": 130}.get(result.status, 1))


@cli.command()
@click.option("--suite", default=None, help="TOML suite file (benchmarks/suites/*.toml); flags given here win.")
@click.option("--run", "run_dir", default=None, metavar="RUN",
              help="Benchmark a saved run's strategy, with its options, model, quantization, task and data.")
@click.option("--model", default=None, help=f"Model name [default: {DEFAULT_MODEL}].")
@click.option("--strategies", default=None, help="Comma-separated names, NAME@QUANT allowed.")
@click.option("--task", type=click.Choice(TASKS), default=None)
@click.option("--batch-size", type=int, default=None)
@click.option("--seq-len", type=int, default=None)
@click.option("--steps", type=int, default=None, help="Timed steps per repeat.")
@click.option("--warmup", type=int, default=None, help="Untimed steps first.")
@click.option("--repeats", type=int, default=None,
              help="Repeats of the timed steps, and loads of the model: two or more give load time a spread.")
@click.option("--gradient-checkpointing", is_flag=True, default=None)
@click.option("--loss-chunk", type=int, default=None, metavar="TOKENS",
              help="Causal LM: the loss in chunks of this many tokens; 0: the model's own loss.")
@click.option("--compile/--no-compile", "compile", default=None,
              help="torch.compile each decoder layer; compile time is recorded apart from step time.")
@click.option("--seed", type=int, default=None)
@click.option("--quality-steps", type=int, default=None, help="Also measure held-out quality over this many steps.")
@click.option("--find-max-batch", is_flag=True, help="Search each strategy's largest batch size by real runs.")
@click.option("--find-max-seq-len", is_flag=True, help="Search each strategy's largest sequence length by real runs.")
@click.option("--memory-limit", default=None, metavar="SIZE",
              help="Fit each case into SIZE (e.g. 4GiB) as train --memory-limit does: micro-batch, checkpointing and "
              "accumulation chosen, the effective batch kept. With --find-max-*: a try whose peak exceeds SIZE "
              "fails; required on the CPU.")
@click.option("--processes", type=int, default=None,
              help="Measure each strategy as one torchrun of N processes (--batch-size rows each), and in 1 for the "
              "scaling efficiency [default: 1].")
@click.option("--sharding", type=click.Choice(SHARDINGS), default=None,
              help="fsdp: shard weights, gradients and optimizer states across the processes [default: none].")
@click.option("--output", default=None, help="Report file [default: bench-<model>-<time>.json].")
@click.option("--overwrite", is_flag=True, help="Replace an existing --output file, only if it is a benchmark report.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of a table.")
@click.pass_context
def bench(ctx: click.Context, suite: str | None, run_dir: str | None, as_json: bool, find_max_batch: bool,
          find_max_seq_len: bool, overwrite: bool, **flags: Any) -> None:
    """Benchmark strategies for memory and speed, each in a fresh process.

    Every measured peak has the plan's prediction beside it (see `adapters plan`), with its error.
    Interrupted (Ctrl-C, SIGTERM), it still writes the report with what it measured, the rest
    cancelled, and exits 130.

    With --run RUN, it benchmarks what RUN trains: its strategy with its options, on its base model,
    quantization, task and data, at its batch size and sequence length unless given. The strategy is
    applied afresh (memory and speed do not depend on the weights' values); RUN is only read.
    """
    import time

    from ..bench import run_bench, settings_from
    from ..bench.settings import settings_for_run
    from .tables import print_summary

    given = {k: v for k, v in flags.items() if v is not None}
    if find_max_batch and find_max_seq_len:
        raise AdaptersError("give one of --find-max-batch and --find-max-seq-len; search one at a time.")
    if find_max_batch or find_max_seq_len:
        given["find_max"] = "batch_size" if find_max_batch else "seq_len"
    if "strategies" in given:
        given["strategies"] = [s.strip() for s in given["strategies"].split(",") if s.strip()]
    if run_dir is not None and suite is not None:
        raise AdaptersError("give --run or --suite, not both: --run takes its settings from the run.")
    settings = settings_for_run(run_dir, given) if run_dir is not None else settings_from(suite, given)
    if settings.output is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        settings.output = f"bench-{settings.model.replace(':', '-').replace('/', '-')}-{stamp}.json"
    report = run_bench(settings, overwrite=overwrite)
    if as_json:
        echo_json(report)
    else:
        print_summary(report)
        click.echo(f"report written to {report['settings']['output']}")
    if report.get("interrupted"):
        click.echo(f"Interrupted: the report {report['settings']['output']} holds what was measured; "
                   "the other strategies are recorded as cancelled.", err=True)
        ctx.exit(130)


@cli.command()
@click.option("--model", default=DEFAULT_MODEL, show_default=True,
              help="Model name, local directory (config.json is enough) or hub id.")
@click.option("--strategy", "--strategies", "strategies", default=DEFAULT_STRATEGY, show_default=True,
              help="Comma-separated names, NAME@QUANT allowed, or `all` for every strategy and quantization.")
@click.option("--quantization", type=click.Choice(QUANTIZATIONS), default=None,
              help="Quantize the base (default: each strategy's own).")
@click.option("--batch-size", type=int, default=4, show_default=True)
@click.option("--seq-len", type=int, default=512, show_default=True)
@click.option("--task", type=click.Choice(TASKS), default=None)
@click.option("--gradient-checkpointing", is_flag=True, help="Plan with activations recomputed in backward.")
@click.option("--loss-chunk", type=int, default=None, metavar="TOKENS",
              help="Plan the causal-LM loss in chunks of this many tokens; 0: the model's own loss (default: train's).")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default="cuda", show_default=True,
              help="cuda: bf16 under autocast, as training on a GPU runs; cpu: fp32.")
@click.option("--budget", default=None, metavar="SIZE",
              help="Memory to fit in (e.g. 24GiB): a verdict, and the largest batch and sequence that fit.")
@click.option("--processes", type=int, default=1, show_default=True,
              help="Plan one process of a run of this many (--batch-size rows each).")
@click.option("--sharding", type=click.Choice(SHARDINGS), default="none", show_default=True,
              help="fsdp: weights, gradients and optimizer states sharded across the processes (FSDP2).")
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE", help="A strategy option (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(strategies: str, quantization: str | None, assignments: tuple[str, ...], as_json: bool,
         **flags: Any) -> None:
    """Predict each strategy's peak memory from the model's config alone, without loading weights."""
    from ..options import parse_assignments
    from ..plan import PlanSettings, make_plans
    from ..runspec import split_strategy

    specs = [s.strip() for s in strategies.split(",") if s.strip()]
    if quantization and specs != ["all"]:
        specs = [f"{split_strategy(s, quantization)[0]}@{quantization}" for s in specs]
    settings = PlanSettings(strategies=specs, options=parse_assignments(assignments), **flags)
    result = make_plans(settings)
    if as_json:
        echo_json(result)
        return
    headers, rows = plan_rows(result)
    parallel = "FSDP" if result["sharding"] == "fsdp" else "data parallel"
    click.echo(f"{result['model']} ({result['task']}) on {result['device']}, {result['dtype']}: "
               f"batch {result['batch_size']} x seq {result['seq_len']}"
               + (", gradient checkpointing" if result["gradient_checkpointing"] else "")
               + (f"; one of {result['processes']} processes ({parallel})" if result["processes"] > 1 else ""))
    click.echo(aligned_table(rows, headers))
    if result["device"] == "cuda":
        click.echo("Peaks are tensor memory, as torch.cuda.max_memory_allocated reports it; the CUDA context "
                   "and the allocator's cache need about 1 GiB more.")
