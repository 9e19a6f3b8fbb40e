"""The documentation's commands are real: each parses, the cheap ones run as written, and the site builds.

- Every `adapters` command in a fenced bash or console block of README.md and docs/*.md (also under `torchrun`,
  `accelerate launch` and `python -m`) is parsed by the real click command line, so a renamed or removed flag,
  a bad choice or a missing argument fails here.
- The README's tour (its blocks marked ``<!-- tour -->``) runs in order, as written, in one folder, followed by
  the Python example that uses its run (docs/training.md, ``<!-- tour-python -->``); every other block marked
  ``<!-- run -->`` runs as written too. A console block's shown output is compared with what the command
  printed, numbers masked (they are measurements) and table padding ignored.
- Every command that no test runs as written is listed in `PARSE_ONLY` with the reason; a new command that is
  neither run nor listed fails, and so does a reason that no longer matches any command.
- ``mkdocs build --strict`` builds the site (mkdocs.yml) into a temporary folder: a broken link or anchor, a
  page left out of the navigation, or a missing snippet fails.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import click
import pytest

from cli_helpers import bench_case_in_process, run_captured

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Commands parsed but not run here, each group with its reason: (reason, patterns); a command is excused when one
# pattern matches it (re.search over the command as written, comments dropped).
PARSE_ONLY: list[tuple[str, list[str]]] = [
    ("several processes (torchrun, accelerate launch, bench --processes): tests/test_distributed.py, "
     "test_multinode.py and test_bench_processes.py run them on random:tiny",
     [r"^torchrun ", r"^accelerate launch ", r"--processes [2-9]"]),
    ("a user's own files, named as placeholders, or what a parse-only command above them writes",
     [r"\bbase\.json\b", r"\ba\.json b\.json\b", r"\bmy-peft-lora\b", r"\bpath/to/"]),
    ("the plugin guide's own plugin: tests/test_plugin_kit.py pip-installs it and runs `adapters check` and "
     "`adapters strategies` with it",
     [r"\bnorm-tuning\b"]),
    ("the PEFT methods by name: tests/test_peft_methods.py lists them, trains loha, prompt-tuning and "
     "adaption-prompt, and runs the kit over every method",
     [r"^adapters strategies loha\b", r"--strategy (loha|boft)\b", r"^adapters check vera\b"]),
    ("the LoRA variants on the real SmolLM2: tests/test_lora_variants.py trains each on SmolLM2, checks that plain "
     "PEFT reproduces its save, and plans DoRA",
     [r"--set (use_dora|use_rslora|lora_plus_ratio|init)="]),
    ("CUDA only: tests/test_activations.py runs the offload hooks on the CPU and checks the CPU refusal; its "
     "`gpu`-marked test and benchmarks/gpu/run.sh run it on a device",
     [r"--offload-activations\b"]),
    ("ten minutes of `adapters recommend` on the real SmolLM2: tests/test_recommend.py runs recommend on random:tiny "
     "(exclusion without a run, the budget, the ranking, a second call agreeing), and benchmarks/recommend.py runs "
     "this very call",
     [r"^adapters recommend --model smollm2-135m\b"]),
    ("minutes of training or benchmarking the real SmolLM2 on 2 CPU cores (the same commands run at small sizes in "
     "tests/test_runs.py, test_instructions.py, test_merge.py, test_generate.py, test_evaluation.py, test_fit.py, "
     "test_checkpoint_layers.py, test_bench.py and test_api.py)",
     [r"^adapters train .*--max-steps (?:[5-9]|\d\d)\b", r"^adapters train --resume ",
      r"^adapters train --strategy lora@int8 ", r"^adapters train --data chat\.jsonl ",
      r"^adapters train --model smollm2-135m --strategy qlora --max-steps 4 ", r"^adapters (merge|generate|eval) ",
      r"\bbench --(model smollm2-135m --strategies|suite|run|strategies lora,lora@nf4 --find-max)"]),
]


@dataclass
class Block:
    page: str
    marker: str | None
    lang: str
    text: str


@dataclass
class Command:
    page: str
    marker: str | None
    line: str  # as written, continuation lines joined and comments dropped
    args: list[str]  # what follows `adapters`
    shown: list[str] | None  # the output shown under it in a console block (None in a bash block)


def blocks() -> list[Block]:
    found = []
    for page in PAGES:
        text = page.read_text()
        for match in re.finditer(r"(?:<!-- ([\w-]+) -->\n)?^(`{3,})(\w*)\n(.*?)^\2$", text, re.S | re.M):
            found.append(Block(str(page.relative_to(ROOT)), match.group(1), match.group(3), match.group(4)))
    return found


def _logical_lines(text: str) -> list[str]:
    return text.replace("\\\n", " ").splitlines()


def adapters_args(line: str) -> list[str] | None:
    """What follows `adapters` in a shell line (`adapters`, `.venv/bin/adapters`, `... -m adapters`), else None."""
    tokens = shlex.split(line, comments=True)
    if tokens and tokens[0].endswith("adapters"):
        return tokens[1:]
    for i, token in enumerate(tokens[:-1]):
        if token == "-m" and tokens[i + 1] == "adapters":
            return tokens[i + 2:]
    return None


def commands() -> list[Command]:
    found = []
    for block in blocks():
        if block.lang in ("bash", "sh", "shell"):
            for line in _logical_lines(block.text):
                for part in _and_parts(line):
                    if (args := adapters_args(part)) is not None:
                        found.append(Command(block.page, block.marker, _written(part), args, None))
        elif block.lang == "console":
            current = None
            for line in _logical_lines(block.text):
                if line.startswith("$ "):
                    args = adapters_args(line[2:])
                    current = None if args is None else Command(block.page, block.marker, _written(line[2:]), args, [])
                    if current:
                        found.append(current)
                elif current is not None:
                    current.shown.append(line)
    return found


def _and_parts(line: str) -> list[str]:
    return [part.strip() for part in line.split("&&")]


def _written(line: str) -> str:
    return shlex.join(shlex.split(line, comments=True))


def parse(args: list[str]) -> None:
    """Parse ``adapters ARGS`` with the real command line, running nothing; a click error raises."""
    from adapters.cli import cli

    assert args, "a bare `adapters`"
    command = cli.get_command(click.Context(cli), args[0])
    assert command is not None, f"no command `adapters {args[0]}`"
    command.make_context(args[0], list(args[1:]))


ALL = commands()


def test_the_docs_have_the_commands_they_should():
    pages = {c.page for c in ALL}
    assert {"README.md", "docs/training.md", "docs/data.md", "docs/benchmarks.md", "docs/devices.md",
            "docs/memory.md", "docs/plugins.md"} <= pages, pages
    assert sum(c.marker == "tour" for c in ALL) >= 6


@pytest.mark.parametrize("command", ALL, ids=[f"{c.page}: {c.line[:70]}" for c in ALL])
def test_every_documented_command_parses(command):
    try:
        parse(command.args)
    except click.ClickException as exc:
        pytest.fail(f"{command.page}: `{command.line}` does not parse: {exc.format_message()}")


def test_every_command_and_option_of_the_cli_is_documented():
    from adapters.cli import cli

    text = "".join(page.read_text() for page in PAGES)
    missing = [f"adapters {name}" for name in cli.commands if f"adapters {name}" not in text]
    missing += [f"adapters {name} {flag}" for name, command in cli.commands.items() for param in command.params
                for flag in (*param.opts, *param.secondary_opts)
                if flag.startswith("--") and flag != "--help" and not re.search(re.escape(flag) + r"(?![\w-])", text)]
    assert not missing, f"not in README.md or docs/: {missing}"


RUN_MARKERS = ("tour", "run")


def _reason(command: Command) -> str | None:
    for reason, patterns in PARSE_ONLY:
        if any(re.search(p, command.line) for p in patterns):
            return reason
    return None


def test_every_command_is_run_or_says_why_not():
    run = {c.line for c in ALL if c.marker in RUN_MARKERS}
    unexcused = [f"{c.page}: {c.line}" for c in ALL if c.marker not in RUN_MARKERS and c.line not in run
                 and _reason(c) is None]
    assert not unexcused, "neither run by a test nor listed in PARSE_ONLY with a reason:\n" + "\n".join(unexcused)
    stale = [p for _, patterns in PARSE_ONLY for p in patterns if not any(re.search(p, c.line) for c in ALL)]
    assert not stale, f"PARSE_ONLY patterns that match no documented command: {stale}"


# --------------------------------------------------------------------------------------------
# Running them: the tour and the blocks marked `run`, in this process (bench's cases too), in a fresh folder.


def _masked(lines: list[str]) -> list[str]:
    """Output as compared: numbers masked (measurements), table padding and borders collapsed, blank lines
    dropped, and "slower" read as "faster" (which of two close strategies is faster on a busy CPU is noise)."""
    out = []
    for line in lines:
        line = re.sub(r"\d[\d,.]*", "0", line).replace("slower", "faster")
        line = re.sub(r"[\s\u2500-\u257f]+", " ", line).strip()
        if line:
            out.append(line)
    return out


def _python_block(page: str, marker: str) -> str:
    (block,) = [b for b in blocks() if b.page == page and b.marker == marker]
    return block.text


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """Every command of the tour, then the Python example on its run, then every `run` block: (command, result)."""
    import adapters.bench.runner

    folder = tmp_path_factory.mktemp("docs-run")
    results = []
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setattr(adapters.bench.runner, "run_case", bench_case_in_process)
        for command in [c for c in ALL if c.marker == "tour"]:
            results.append((command, run_captured(*command.args)))
        exec(compile(_python_block("docs/training.md", "tour-python"), "docs/training.md", "exec"), {})
        for command in [c for c in ALL if c.marker == "run"]:
            results.append((command, run_captured(*command.args)))
    return folder, results


def test_the_tour_and_the_run_blocks_run_as_written(ran):
    _, ran = ran
    assert [c.line for c, _ in ran] == [c.line for c in ALL if c.marker == "tour"] + \
        [c.line for c in ALL if c.marker == "run"]
    failed = [f"{c.page}: {c.line}\n{r.stderr[-2000:]}" for c, r in ran if r.returncode != 0]
    assert not failed, "\n\n".join(failed)


def test_shown_output_is_what_the_commands_print(ran):
    _, ran = ran
    for command, result in ran:
        if command.shown:
            assert _masked(command.shown) == _masked(result.stdout.splitlines()), \
                f"{command.page}: the output shown under `{command.line}` is not what it prints now:\n{result.stdout}"


def test_the_tour_trains_saves_and_writes_its_reports(ran):
    import json

    folder, ran = ran
    outputs = {c.line.split()[1]: r for c, r in ran if c.marker == "tour"}
    manifest = json.loads((folder / "runs" / "lora" / "adapters.json").read_text())
    assert manifest["strategy"] == "lora" and (folder / "runs" / "lora" / "adapter_model.safetensors").exists()
    report = json.loads((folder / "bench.json").read_text())
    assert [r["strategy"] for r in report["results"]] == ["lora", "qlora"]
    assert all(r["status"] == "ok" for r in report["results"])
    assert "<svg" in (folder / "bench.html").read_text()
    assert re.search(r"^qlora ran [\d.]+ ± [\d.]+× (faster|slower) than lora", outputs["compare"].stdout, re.M)
    assert (folder / "runs" / "tiny" / "adapters.json").exists()  # the Python example's own run


def test_the_config_file_example_is_a_valid_config(tmp_path):
    """docs/training.md's run.toml, read as `adapters train --config run.toml --max-steps 5` reads it."""
    import adapters
    from adapters.runspec import spec_from

    path = tmp_path / "run.toml"
    path.write_text(_python_block("docs/training.md", "config-file"))
    spec = spec_from(str(path), {"max_steps": 5}, {})
    assert (spec.model, spec.strategy, spec.quantization, spec.max_steps, spec.options) == \
        ("smollm2-135m", "lora", "nf4", 5, {"r": 8})
    run = adapters.resolve(spec, data=False)
    assert run.quantization == "nf4"


def test_the_site_builds_strictly(tmp_path):
    """mkdocs.yml with the material theme, every page in the navigation, links and anchors checked."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    home = (tmp_path / "site" / "index.html").read_text()
    assert "A five-minute tour" in home and "matrix:start" in home  # the README's sections, included
    assert "--8&lt;--" not in home and "--8<--" not in home
    assert not (ROOT / "site").exists()
