"""Commands that run models: train, bench, plan, recommend. Their run settings are `RunSpec`'s, generated
(`adapters.cli.settings`); each command adds only its own."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..errors import AdaptersError
from ..runspec import DEFAULT_STRATEGY
from ..text import aligned_table
from . import cli, echo_json
from .settings import given, spec_options
from .tables import plan_rows, train_summary


@cli.command()
@spec_options("train")
@click.option("--config", "config_file", default=None, help="TOML file of settings; flags given here win.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def train(ctx: click.Context, config_file: str | None, as_json: bool, **_: Any) -> None:
    """Train a strategy on a base model, evaluate it before and after, and save it.

    Exits 130 when interrupted (after writing a checkpoint, with the command to resume), 1 when the
    run failed (a loss, a weight or a held-out metric not finite, or out of memory even with a
    micro-batch of 1); a failed run saves nothing and keeps any earlier save.
    """
    from ..resuming import resume_spec
    from ..runspec import spec_from
    from ..training import train as run_training

    values = given(ctx, "train")
    options = values.pop("options", {})
    if values.get("allow_other_base") and not values.get("resume"):
        raise AdaptersError("--allow-other-base applies to --resume OUTPUT only: a new run records its own base.")
    if values.pop("resume", False):
        if config_file:
            raise AdaptersError("--resume takes the settings recorded in the run; drop --config.")
        spec = resume_spec(values.pop("output"), values, options)
    else:
        spec = spec_from(config_file, values, options)
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
              help="Benchmark what a saved run trains: its strategy and options, model, quantization, task, data "
              "and batch, as it recorded them.")
@click.option("--strategies", default=None, metavar="NAMES",
              help="Comma-separated names, NAME@QUANT allowed [default: the four built-ins and QLoRA].")
@spec_options("bench")
@click.option("--steps", type=int, default=None, help="Timed steps per repeat [default: 3].")
@click.option("--warmup", type=int, default=None, help="Untimed steps first [default: 1].")
@click.option("--repeats", type=int, default=None,
              help="Repeats of the timed steps, and loads of the model: two or more give load time a spread "
              "[default: 1].")
@click.option("--quality-steps", type=int, default=None, help="Also measure held-out quality over this many steps.")
@click.option("--find-max-batch", is_flag=True, help="Search each strategy's largest batch size by real runs.")
@click.option("--find-max-seq-len", is_flag=True,
              help="Search each strategy's largest sequence length by real runs. With --find-max-*, --memory-limit "
              "is the search's limit: a try whose peak exceeds it fails (required on the CPU).")
@click.option("--processes", type=int, default=None,
              help="Measure each strategy as one torchrun of N processes (--batch-size rows each), and in 1 for the "
              "scaling efficiency [default: 1].")
@click.option("--output", "report", default=None, help="Report file [default: bench-<model>-<time>.json].")
@click.option("--overwrite", is_flag=True, help="Replace an existing --output file, only if it is a benchmark report.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of a table.")
@click.pass_context
def bench(ctx: click.Context, suite: str | None, run_dir: str | None, strategies: str | None, as_json: bool,
          find_max_batch: bool, find_max_seq_len: bool, overwrite: bool, report: str | None, **flags: Any) -> None:
    """Benchmark strategies for memory and speed, each in a fresh process, as `adapters train` runs them.

    Every measured peak has the plan's prediction beside it (see `adapters plan`), with its error.
    Interrupted (Ctrl-C, SIGTERM), it still writes the report with what it measured, the rest
    cancelled, and exits 130.

    With --run RUN, it benchmarks what RUN trains: its strategy with its options, on its base model,
    quantization, task and data, with its batch and the rest of its settings unless given. The strategy is
    applied afresh (memory and speed do not depend on the weights' values); RUN is only read.
    """
    import time

    from ..bench import run_bench, settings_from
    from ..bench.settings import settings_for_run
    from .tables import print_summary

    values = given(ctx, "bench")
    values.update({k: v for k, v in flags.items() if v is not None and k in ("steps", "warmup", "repeats",
                                                                              "quality_steps", "processes")})
    if find_max_batch and find_max_seq_len:
        raise AdaptersError("give one of --find-max-batch and --find-max-seq-len; search one at a time.")
    if find_max_batch or find_max_seq_len:
        values["find_max"] = "batch_size" if find_max_batch else "seq_len"
    if strategies is not None:
        values["strategies"] = [s.strip() for s in strategies.split(",") if s.strip()]
    if report is not None:
        values["output"] = report
    if run_dir is not None and suite is not None:
        raise AdaptersError("give --run or --suite, not both: --run takes its settings from the run.")
    settings = settings_for_run(run_dir, values) if run_dir is not None else settings_from(suite, values)
    if settings.output is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        settings.output = f"bench-{settings.spec.model.replace(':', '-').replace('/', '-')}-{stamp}.json"
    result = run_bench(settings, overwrite=overwrite)
    if as_json:
        echo_json(result)
    else:
        print_summary(result)
        click.echo(f"report written to {result['settings']['output']}")
    if result.get("interrupted"):
        click.echo(f"Interrupted: the report {result['settings']['output']} holds what was measured; "
                   "the other strategies are recorded as cancelled.", err=True)
        ctx.exit(130)


@cli.command()
@click.option("--strategy", "--strategies", "strategies", default=DEFAULT_STRATEGY, show_default=True,
              help="Comma-separated names, NAME@QUANT allowed, or `all` for every strategy and quantization.")
@spec_options("plan")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default="cuda", show_default=True,
              help="cuda: bf16 under autocast, as training on a GPU runs; cpu: fp32.")
@click.option("--budget", default=None, metavar="SIZE",
              help="Memory to fit in (e.g. 24GiB): a verdict, and the largest batch and sequence that fit.")
@click.option("--processes", type=int, default=1, show_default=True,
              help="Plan one process of a run of this many (--batch-size rows each).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.pass_context
def plan(ctx: click.Context, strategies: str, device: str, budget: str | None, processes: int, as_json: bool,
         **_: Any) -> None:
    """Predict each strategy's peak memory from the model's config alone, without loading weights."""
    from ..plan import PlanSettings, make_plans

    specs = [s.strip() for s in strategies.split(",") if s.strip()]
    settings = PlanSettings.of(**given(ctx, "plan"), strategies=specs, device=device, budget=budget,
                               processes=processes)
    result = make_plans(settings)
    if as_json:
        echo_json(result)
        return
    headers, rows = plan_rows(result)
    parallel = "FSDP" if result["sharding"] == "fsdp" else "data parallel"
    click.echo(f"{result['model']} ({result['task']}) on {result['device']}, {result['dtype']}: "
               f"batch {result['batch_size']} x seq {result['seq_len']}"
               + (", gradient checkpointing" if result["gradient_checkpointing"] else "")
               + (f" of the first {result['checkpoint_layers']} layers" if result.get("checkpoint_layers") else "")
               + (", activations offloaded to host memory" if result["offload_activations"] else "")
               + (", optimizer in backward" if result["optimizer_in_backward"] else "")
               + (", no float32 master weights" if result["master_weights"] == "none" else "")
               + (f"; one of {result['processes']} processes ({parallel})" if result["processes"] > 1 else ""))
    click.echo(aligned_table(rows, headers))
    if result["device"] == "cuda":
        click.echo("Peaks are tensor memory, as torch.cuda.max_memory_allocated reports it; the CUDA context "
                   "and the allocator's cache need about 1 GiB more.")


@cli.command()
@click.option("--candidates", default=None, metavar="NAMES",
              help="Comma-separated strategies, NAME@QUANT allowed [default: the built-ins, installed plugins' "
              "strategies, and PEFT's ia3 and loha].")
@spec_options("bench")
@click.option("--budget-minutes", type=float, default=10.0, show_default=True,
              help="Wall time for the whole call; a run still going at the end is stopped, keeping what was measured.")
@click.option("--budget-tokens", type=int, default=None,
              help="Tokens each candidate trains before its held-out loss is measured [default: 16 steps' worth].")
@click.option("--output", default=None, metavar="DIR",
              help="A new directory for the reports [default: recommend-<model>-<time>].")
@click.option("--json", "as_json", is_flag=True, help="Print the recommendation as JSON.")
@click.pass_context
def recommend(ctx: click.Context, candidates: str | None, budget_minutes: float, budget_tokens: int | None,
              output: str | None, as_json: bool, **_: Any) -> None:
    """Which strategy for this model, data, memory and time: plan every candidate (those that do not fit are
    excluded without running), bench the rest for speed, memory and held-out loss after the same tokens, and
    recommend one by compare's noise rules, saying why each other lost. Candidates the time budget cannot
    measure are listed as not measured.

    --memory-limit defaults to the device's memory. Interrupted (Ctrl-C), it keeps what it measured in its
    output directory and exits 130."""
    from ..recommend import RecommendSettings
    from ..recommend import recommend as run_recommend
    from ..recommend.render import text, train_command

    names = [s.strip() for s in candidates.split(",") if s.strip()] if candidates is not None else None
    settings = RecommendSettings.of(**given(ctx, "bench"), candidates=names, budget_minutes=budget_minutes,
                                    budget_tokens=budget_tokens, output=output)
    result = run_recommend(settings, progress=lambda line: click.echo(line, err=True))
    if as_json:
        echo_json(result)
    else:
        click.echo(text(result))
        command = train_command(result)
        if command:
            click.echo(f"Train it: {command}")
        click.echo(f"Reports in {Path(result['files']['result']).parent}/ (report.html, bench.json, recommend.json)")
    if result.get("interrupted"):
        ctx.exit(130)
