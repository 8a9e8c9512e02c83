"""``python run_training.py --config CONFIG.yaml [--device D] [--resume CKPT] [--set key.sub=value ...]``

Also installed as the console script ``codeq-train``.  ``main(argv)`` returns
the exit code: 0 on success, 2 for a user mistake (bad config, unavailable
device, missing data set, unusable checkpoint: one ``error: ...`` line on
stderr, nothing written to disk), 3 when training diverged (a non-finite
loss: one ``error: ...`` line naming epoch, step and term; the last good
checkpoint untouched, no report), 130 when interrupted.

Under ``torchrun`` (see :mod:`codeq.train.distributed`) every rank runs
``main``; setup errors are agreed on by all ranks and printed once by rank 0,
and only rank 0 writes the run directory and prints progress.
"""

from __future__ import annotations

import argparse
import os
import sys

from codeq.checkpoint import load_checkpoint
from codeq.errors import DIVERGED_EXIT_CODE, TrainingDiverged
from codeq.train import distributed as D
from codeq.train.config import ConfigError, check_resume_compatible, load_config, save_config
from codeq.train.logging import is_run_dir, make_run_dir
from codeq.train.precision import backend_flags
from codeq.train.trainer import Trainer

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2 (through main)
        raise ConfigError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="run_training.py",
        description="Train a model with CoDeQ joint pruning + quantization-aware training from a YAML config "
        "(see docs/TRAINING.md).",
    )
    p.add_argument("--config", required=True, metavar="PATH", help="YAML config file")
    p.add_argument("--device", metavar="DEV", help="override the config's device: cpu, cuda, cuda:N or mps")
    p.add_argument("--resume", metavar="CKPT", help="continue training from this checkpoint (e.g. RUN_DIR/checkpoint.th)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config entry, e.g. --set epochs=3 --set optimizer.param_groups.base.lr=0.01 "
        "(value parsed as YAML; repeatable)",
    )
    p.add_argument(
        "--stop-after",
        type=int,
        metavar="N",
        help="stop after N epochs of this invocation (checkpoint saved; continue with --resume), e.g. for job time limits",
    )
    return p


def main(argv=None) -> int:
    ctx = []  # the DistContext once known (for who prints, and to tear the group down)
    try:
        return _main(argv, ctx)
    except ConfigError as exc:
        d = ctx[0] if ctx else None
        if not getattr(exc, "printed", False):  # errors agreed on by all ranks: printed once, by rank 0
            prefix = f"[rank {d.rank}] " if d is not None and not d.is_main else ""
            print(f"{prefix}error: {exc}", file=sys.stderr, flush=True)
        return 2
    except TrainingDiverged as exc:  # every rank stops at the same step; rank 0 says so
        if not ctx or ctx[0].is_main:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return DIVERGED_EXIT_CODE
    except KeyboardInterrupt:
        if not ctx or ctx[0].is_main:
            print("interrupted (the last completed epoch's checkpoint.th can be resumed with --resume)", file=sys.stderr)
        return 130
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    except BaseException:
        if ctx and ctx[0].world_size > 1:  # say which rank failed (the traceback follows)
            print(f"[rank {ctx[0].rank}] training failed:", file=sys.stderr, flush=True)
        raise
    finally:
        if ctx:
            ctx[0].close()  # destroy the process group: other ranks do not wait forever on this one


def _main(argv, ctx_out: list) -> int:
    env = D.launch_env()
    # Everything that can be a user mistake is checked before the run directory
    # exists.  Under torchrun the ranks first agree on it (ctx.agree): one error
    # line from rank 0, exit code 2 on every rank, no hang.
    err, args, cfg = None, None, None
    try:
        args = build_parser().parse_args(argv)
        if args.stop_after is not None and args.stop_after < 1:
            raise ConfigError(f"--stop-after must be at least 1, got {args.stop_after}")
        cfg = load_config(args.config, overrides=args.overrides, device=args.device)
        enabled = D.wants_distributed(cfg.distributed, env)
    except ConfigError as exc:
        if env.world_size == 1:
            raise
        err, enabled = exc, True
    ctx = D.init_distributed(env, enabled, cfg.dist_timeout_min if cfg is not None else None)
    ctx_out.append(ctx)

    ckpt = trainer = None
    if err is None:
        try:
            device = D.resolve_device(cfg.device, ctx)
            if args.resume:
                ckpt = load_checkpoint(args.resume, map_location="cpu")
                check_resume_compatible(ckpt.get("config") or {}, cfg, args.resume)
            trainer = Trainer.from_config(cfg, device, dist=ctx)
            if ckpt is not None:
                trainer.load_checkpoint_state(ckpt, args.resume)
                del ckpt
        except ConfigError as exc:
            err = exc
    ctx.agree(err)  # raises the (first) error on every rank if any rank failed
    trainer.distribute()  # DDP wrap (collective) when distributed

    run_dir = None
    if ctx.is_main:
        ckpt_dir = os.path.dirname(os.path.abspath(args.resume)) if args.resume else None
        if ckpt_dir is not None and is_run_dir(ckpt_dir):
            run_dir = ckpt_dir  # continue the same run: metrics.jsonl is appended to
        else:
            run_dir = make_run_dir(cfg, args.config)
        save_config(cfg, os.path.join(run_dir, "config.yaml"))
        n_q = len(trainer.quantized)
        dist_line = ""
        if ctx.enabled:
            dist_line = (f"\ndistributed: {ctx.world_size} process(es), backend {ctx.backend}, batch_size {cfg.batch_size} "
                         f"per process = global batch {cfg.batch_size * ctx.world_size}")
        print(
            f"run directory: {run_dir}\n"
            f"model {cfg.model} on {trainer.device}, {n_q} quantized layer(s)"
            + (f" ({cfg.quantizer.name})" if cfg.quantizer else "")
            + f", epochs {trainer.start_epoch + 1}..{cfg.epochs}"
            + (", steps replayed as CUDA graphs" if trainer.graph is not None else "")
            + (", channels_last input" if trainer.channels_last else "")
            + (f", amp {cfg.amp}" if cfg.amp != "none" else "")
            + (f", matmul_precision {cfg.matmul_precision}" if trainer.device.type == "cuda" else "")
            + dist_line,
            flush=True,
        )
    with backend_flags(cfg, trainer.device):
        records = trainer.fit(run_dir or "", stop_after=args.stop_after)
    if records and ctx.is_main:
        last = records[-1]
        msg = f"done: epoch {last['epoch']}, val_acc {last['val_acc']:.4f}, best {trainer.best_acc:.4f}"
        if last.get("sparsity_mean") is not None:
            msg += f", mean sparsity {last['sparsity_mean']:.4f}"
        print(msg + f"; run directory {run_dir}", flush=True)
    return 0


if __name__ == "__main__":  # python -m codeq.train.cli
    sys.exit(main())
