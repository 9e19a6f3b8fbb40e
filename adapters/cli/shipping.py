"""Commands that turn a run into something to ship, or bring one in: merge, import."""
from __future__ import annotations

from pathlib import Path

import click

from ..contract import QUANTIZATIONS
from . import cli, echo_json


@cli.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--output", required=True, type=click.Path(path_type=Path),
              help="Directory for the merged checkpoint (a plain transformers model).")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default=None,
              help="The checkpoint's dtype (default: the base's own). The merge itself is done in float32.")
@click.option("--overwrite", is_flag=True, help="Replace --output when it holds an earlier merge or adapters run.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def merge(run: Path, output: Path, dtype: str | None, overwrite: bool, as_json: bool) -> None:
    """Fold the adapter of RUN into its base and save a plain transformers checkpoint.

    The checkpoint loads with AutoModelForCausalLM.from_pretrained(OUTPUT) (or ...ForSequenceClassification),
    with no PEFT and no adapters code. A quantized run (QLoRA) merges into a dequantized copy of its base;
    the base on disk is only read. The checkpoint is reloaded and its logits compared with the adapter
    model's on held-out text before it is kept; OUTPUT/adapters.json records the tolerance and the difference.
    """
    from ..merge import merge_run

    result = merge_run(run, output, dtype=dtype, overwrite=overwrite)
    if as_json:
        echo_json(result.summary())
        return
    auto = "AutoModelForCausalLM" if result.task == "causal-lm" else "AutoModelForSequenceClassification"
    click.echo(f"Merged {result.strategy} run {str(run)!r} into {result.base_model}: {result.output} ({result.dtype})")
    if result.dequantized:
        click.echo(f"The run trained on an {result.quantization}-quantized base: merged into a copy dequantized to "
                   f"float32, saved as {result.dtype}; the base on disk is unchanged.")
    click.echo(f"Checked: reloaded with transformers, its logits on held-out text differ from the adapter model's "
               f"by {result.max_difference:.2g} at most (tolerance: {result.tolerance:g} x {result.scale:.3g}).")
    click.echo(f"Load it with: transformers.{auto}.from_pretrained({str(result.output)!r})")


@cli.command("import")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--model", required=True,
              help="The base model the adapter was made for: name, local directory or hub id.")
@click.option("--output", required=True, type=click.Path(path_type=Path), help="Directory for the adapters run.")
@click.option("--quantization", type=click.Choice(QUANTIZATIONS), default="none", show_default=True,
              help="Quantize the base the run records (nf4 for an adapter trained with QLoRA).")
@click.option("--labels", default=None, metavar="A,B,...",
              help="A SEQ_CLS adapter's class names, in order (default: LABEL_0, LABEL_1, ...).")
@click.option("--overwrite", is_flag=True, help="Replace --output when it holds an earlier adapters run.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def import_(directory: Path, model: str, output: Path, quantization: str, labels: str | None, overwrite: bool,
            as_json: bool) -> None:
    """Wrap an adapter saved by plain PEFT (save_pretrained) in DIRECTORY into an adapters run.

    Its adapter_config.json picks the strategy (LoRA, prefix tuning, or any PEFT type an installed plugin
    reads); its weights are checked against --model (keys and shapes, safetensors only) and the base's
    fingerprint is recorded. adapters load, bench, eval, generate, merge and train --resume then work on
    OUTPUT.
    """
    from ..importing import import_peft

    names = [name.strip() for name in labels.split(",") if name.strip()] if labels else None
    result = import_peft(directory, model, output, quantization=quantization, labels=names, overwrite=overwrite)
    if as_json:
        echo_json(result.summary())
        return
    options = " ".join(f"{k}={v}" for k, v in result.options.items())
    click.echo(f"Imported a PEFT {result.peft_type} adapter as a {result.strategy} run ({options}) on "
               f"{result.base_model}: {result.output}")
    click.echo(f"Checked {result.parameters:,} adapter parameters against the base (names, shapes, finite values); "
               f"recorded its fingerprint {result.fingerprint[:19]}...")
