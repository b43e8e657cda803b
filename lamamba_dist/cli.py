"""The `lamamba` command line: one entry point, one subcommand per job.

Each subcommand lives in the module that implements it, which exposes
``add_parser(subparsers)`` returning the parser; the parser's ``func`` default
receives the parsed ``argparse.Namespace`` and returns an exit code. Modules are
imported lazily by name so that ``lamamba --help`` stays fast and never imports
torch extensions, Ray or DeepSpeed.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lamamba_dist.errors import CLIError

__all__ = ["BENCHES", "COMMANDS", "CLIError", "build_parser", "main"]

# (subcommand, module that defines it, one-line help). Order = order in --help.
COMMANDS: list[tuple[str, str, str]] = [
    ("flops", "lamamba_dist.flops", "parameters and forward multiply-adds of a model"),
    ("models", "lamamba_dist.model_list", "list the registered model sizes"),
    ("convert-official", "lamamba_dist.convert", "import a checkpoint of the official LaMamba-Diff code"),
    ("bench", "lamamba_dist.bench.model", "benchmarks, JSON out: `lamamba bench [model]` training-step img/s, memory and MFU of several models in one run; `lamamba bench train|sample|loader|vae|kernels|scaling|table ...`"),
    ("parity", "lamamba_dist.parity", "fast vs reference kernels: 200-step loss curves on fixed data, gap vs run-to-run noise"),
    ("sample", "lamamba_dist.sample", "sample images (PNGs, grid, ADM npz) from weights or a run, on one or many ranks"),
    ("eval", "lamamba_dist.evaluate", "FID, sFID, IS, precision and recall of a sample npz against a reference batch"),
    ("bench-sample", "lamamba_dist.bench.sample", "= `lamamba bench sample`: images/s of DDPM+CFG sampling for several models in one run"),
    ("train", "lamamba_dist.train.cli", "train or resume (rerun the same command) with DeepSpeed ZeRO; exit 3 = saved on signal, requeue"),
    ("bench-train", "lamamba_dist.bench.train", "= `lamamba bench train`: the trainer's real step (DeepSpeed ZeRO) for a matrix of configurations in one launch; --fit-batch: largest micro-batch"),
    ("export", "lamamba_dist.train.export", "write a run's EMA (or raw) weights as one safetensors file"),
    ("report", "lamamba_dist.report", "an offline HTML report of a run (finished or live): curves, sample grids, checkpoint and requeue timeline"),
    ("demo", "lamamba_dist.demo", "end-to-end CPU demo: shapes dataset, tiny VAE, Ray preprocessing, 2-rank DeepSpeed training, sample grid"),
    ("preprocess", "lamamba_dist.data_pipeline.preprocess", "encode an ImageNet-style folder into VAE-latent WebDataset shards with Ray (rerun resumes)"),
    ("bench-loader", "lamamba_dist.bench.loader", "= `lamamba bench loader`: latent loader samples/s per worker on CPU (JSON)"),
    ("bench-table", "lamamba_dist.bench.table", "= `lamamba bench table`: the README's performance table (markdown) from `lamamba bench` JSON files"),
    ("bench-scaling", "lamamba_dist.bench.scaling", "= `lamamba bench scaling`: markdown tables of `bench train` JSON files (docs/scaling.md)"),
    ("bench-vae", "lamamba_dist.bench.vae", "= `lamamba bench vae`: VAE posterior-encode images/s of preprocessing, without Ray (JSON)"),
    ("bench-kernels", "lamamba_dist.bench.kernels", "= `lamamba bench kernels`: the selective-scan kernels of SS2D by backend on one GPU (JSON)"),
    ("submit", "lamamba_dist.cluster.commands", "submit a training job to Slurm (submitit): one task per GPU, requeue + resume on preemption"),
    ("status", "lamamba_dist.cluster.commands", "state, requeues, events, logs and checkpoints of a `lamamba submit` job folder"),
    ("cancel", "lamamba_dist.cluster.commands", "cancel the Slurm job of a job folder (--save: checkpoint first, no requeue)"),
]


# `lamamba bench WHAT ...` runs the command of the bench WHAT (lamamba_dist/bench/); without WHAT, the model bench.
# The per-bench command names (bench-train, bench-sample, bench-loader, bench-vae) stay as aliases.
BENCHES: dict[str, str] = {"model": "bench", "train": "bench-train", "sample": "bench-sample",
                           "loader": "bench-loader", "vae": "bench-vae", "kernels": "bench-kernels",
                           "scaling": "bench-scaling", "table": "bench-table"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lamamba",
        description="Train, sample and evaluate LaMamba-Diff (and the DiT baseline) on one GPU or a Slurm cluster.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module, help_text in COMMANDS:
        # A tiny placeholder parser: the real one is built only for the command that runs.
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _real_parser(name: str, module: str, help_text: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lamamba")
    sub = parser.add_subparsers(dest="command")
    mod = importlib.import_module(module)
    mod.add_parser(sub, name, help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0
    if argv[0] in ("-V", "--version"):
        from lamamba_dist import __version__

        print(__version__)
        return 0
    if argv[0] == "bench" and len(argv) > 1 and argv[1] in BENCHES:
        argv = [BENCHES[argv[1]], *argv[2:]]
    table = {name: (name, module, h) for name, module, h in COMMANDS}
    if argv[0] not in table:
        top.print_usage(sys.stderr)
        print(f"lamamba: error: unknown command {argv[0]!r}; choose from: {', '.join(table)}", file=sys.stderr)
        return 2
    parser = _real_parser(*table[argv[0]])
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CLIError as e:
        print(f"lamamba {argv[0]}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
