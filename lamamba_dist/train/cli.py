"""``lamamba train`` and ``lamamba export``: thin entry points over :mod:`lamamba_dist.train`."""

from __future__ import annotations

def add_parser(sub, name: str, help_text: str):
    p = sub.add_parser(
        name, help=help_text,
        description="Train (or resume: rerun the same command) under torchrun, the deepspeed launcher, Slurm or plain "
                    "python. Resumes from the newest complete checkpoint under [checkpoint] dir by itself, also on a "
                    "different number of ranks. Exit codes: 0 done, 3 stopped by SIGUSR2/SIGTERM or a first Ctrl-C "
                    "after saving (requeue and rerun), 1 failed, 2 bad input, 130 a second Ctrl-C (no save).",
    )
    p.add_argument("--config", required=True, help="experiment TOML (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (TOML syntax), e.g. --set train.steps=1000; repeatable")
    p.add_argument("--move-damaged-aside", action="store_true",
                   help="when checkpoint folders exist but none verifies: move them to [checkpoint] dir/damaged/ and "
                        "start at step 0 (without this flag training refuses to start over them)")
    p.add_argument("--dry-run", action="store_true",
                   help="parse the config, build the model on the meta device and the DeepSpeed config, then exit")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from lamamba_dist.errors import CLIError
    from lamamba_dist.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        raise CLIError(str(e)) from None
    if args.dry_run:
        from lamamba_dist.train.dryrun import dry_run

        try:
            print(dry_run(cfg))
        except (ValueError, KeyError, TypeError) as e:  # TypeError: an arch_overrides key the model lacks
            raise CLIError(f"{args.config}: {e}") from None
        return 0
    from lamamba_dist.data import DataError
    from lamamba_dist.train import run_training
    from lamamba_dist.train.checkpoint import CheckpointError
    from lamamba_dist.train.trainer import SaveError, TrainingError

    try:
        return run_training(cfg, move_damaged_aside=args.move_damaged_aside)
    except SaveError as e:  # storage failed during the run (disk full...): exit 1, as for any failed run
        import sys

        print(f"lamamba train: error: {e}", file=sys.stderr)
        return 1
    except (TrainingError, CheckpointError, DataError) as e:  # bad config, data or checkpoint for this config
        raise CLIError(str(e)) from None
    except KeyboardInterrupt:  # a second Ctrl-C (the first one saves and exits with 3)
        import sys

        print("lamamba train: interrupted (second SIGINT): exited without saving; the newest complete checkpoint "
              "is unchanged", file=sys.stderr)
        return 130


def add_export_parser(sub, name: str, help_text: str):
    p = sub.add_parser(
        name, help=help_text,
        description="Write the EMA (default) or raw fp32 weights of a run's newest complete checkpoint (or of one "
                    "step_XXXXXXXX folder) as one safetensors file for `lamamba sample --weights`.",
    )
    p.add_argument("run_dir", help="run directory ([checkpoint] dir) or one step_XXXXXXXX folder")
    p.add_argument("out", help="output .safetensors file")
    p.add_argument("--raw", action="store_true", help="export the raw (non-EMA) fp32 weights")
    p.add_argument("--no-verify", action="store_true",
                   help="do not check the files against the checkpoint's COMPLETE.json (sizes and sha256): damaged "
                        "weights then export without an error")
    p.set_defaults(func=run_export)
    return p


def run_export(args) -> int:
    from lamamba_dist.errors import CLIError
    from lamamba_dist.train.checkpoint import CheckpointError, load_inference_weights
    from lamamba_dist.weights import save_weights

    import sys

    warn = lambda msg: print(f"lamamba export: WARNING: {msg}", file=sys.stderr)  # noqa: E731
    if args.no_verify:
        warn("--no-verify: the weights are NOT checked against the checkpoint's COMPLETE.json; a damaged file "
             "exports silently")
    try:
        sd, meta = load_inference_weights(args.run_dir, ema=not args.raw, verify=not args.no_verify, warn=warn)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        raise CLIError(f"{e}" + ("" if args.no_verify else " (--no-verify reads it anyway)")) from None
    meta = {k: v for k, v in meta.items() if k != "checkpoint"} | {"source_checkpoint": meta.get("checkpoint")}
    from pathlib import Path

    if Path(args.out).is_dir():
        raise CLIError(f"{args.out} is an existing folder; give the output file's path")
    try:
        path = save_weights(args.out, sd, meta)
    except OSError as e:  # disk full, read-only, a file where a folder should be: nothing half-written is left
        raise CLIError(f"cannot write {args.out}: {e.strerror or e}") from None
    n = sum(v.numel() for v in sd.values())
    print(f"wrote {path}: {meta['model']} @ {meta['resolution']}px, step {meta.get('step')}, "
          f"{'raw' if args.raw else 'EMA'} weights, {n / 1e6:.2f}M values")
    return 0
