"""The training loop: CE + sum of lambda * loss terms, 3-way param groups,
per-epoch metrics read with one device sync, checkpoints, resume, report."""

from __future__ import annotations

import dataclasses
import os
import random
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import codeq
from codeq.checkpoint import get_rng_state, save_checkpoint, set_rng_state
from codeq.fastpath import FusedWeights
from codeq.losses import group_lasso
from codeq.models import build_model, example_input
from codeq.parametrize import iter_quantizers
from codeq.registry import LOSS_REGISTRY
from codeq.report import compression_report, format_report, save_report
from codeq.train.config import Config, ConfigError, check_resume_compatible, config_to_dict
from codeq.train.data import build_datasets, build_loaders
from codeq.train.distributed import DistContext, check_sync_bn, maybe_test_crash, resolve_device
from codeq.train.graph import GraphStep
from codeq.train.logging import Console, MetricsFile, WandbLogger, warn
from codeq.train.malloc import tune_malloc
from codeq.train.optim import build_optimizer, build_scheduler, graph_capable
from codeq.train.sampling import epoch_seed

__all__ = ["Trainer", "seed_everything", "build_run_model"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def build_run_model(cfg: Config) -> nn.Module:
    """The model of ``cfg`` on the CPU, with its quantizers attached.  Seed
    before calling for a reproducible initialisation."""
    quantizer = dataclasses.asdict(cfg.quantizer) if cfg.quantizer is not None else None
    return build_model(cfg.model, img_size=cfg.img_size, model_kwargs=cfg.model_kwargs, quantizer=quantizer)


class Trainer:
    """Holds the model, optimizer, scheduler and loaders of one run.

    ``Trainer.from_config(cfg, device)`` seeds everything and builds the parts;
    ``fit(run_dir)`` trains, logs, checkpoints and writes the report.
    """

    def __init__(self, cfg: Config, device: torch.device, model: nn.Module, optimizer, scheduler,
                 train_loader, val_loader, generator: torch.Generator, dist: DistContext | None = None):
        tune_malloc()  # no page faults on the step's large CPU tensors (codeq/train/malloc.py)
        self.cfg = cfg
        self.device = device
        self.model = model  # the unwrapped model: state dicts, loss terms, statistics, report
        self.net = torch.compile(model) if cfg.use_compile else model  # what the training forward pass calls
        self.eval_net = self.net  # what evaluation calls (never the DDP wrapper: no collectives there)
        self.dist = dist if dist is not None else DistContext()
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.generator = generator
        self.loss_terms = [(t.name, LOSS_REGISTRY[t.name], float(t.lam), dict(t.kwargs)) for t in cfg.loss_terms]
        self.start_epoch = 0
        self.best_acc = 0.0
        self.quantized = [(name, module, q) for name, module, q in iter_quantizers(model)]
        # Eager fast path (codeq.fastpath): every quantized weight, and the first
        # group-lasso term, in one fused call per step.  Not under torch.compile,
        # which traces the per-layer ops and fuses on its own.
        self.fast, self.fast_term = None, None
        if cfg.fused_weights and not cfg.use_compile and self.quantized:
            gl_index = next((i for i, (_, fn, _, _) in enumerate(self.loss_terms) if fn is group_lasso), None)
            self.fast = FusedWeights(model, group_lasso=self.loss_terms[gl_index][3] if gl_index is not None else None)
            self.fast_term = gl_index
        # cuda_graph: each training step replayed as one CUDA graph (codeq/train/graph.py).
        self.graph = None
        if cfg.cuda_graph == "auto":  # on where it can run: CUDA, one process, a capturable optimizer
            use_graph = device.type == "cuda" and not self.dist.enabled and graph_capable(cfg)
        else:
            use_graph = bool(cfg.cuda_graph)
        if use_graph:
            if device.type != "cuda":
                raise ConfigError(f"cuda_graph: true needs a CUDA device, but the device is '{device}'; "
                                  "set cuda_graph: auto or false (or --set cuda_graph=auto)")
            if self.dist.enabled:
                raise ConfigError("cuda_graph does not work with distributed (DDP) training yet; "
                                  "set cuda_graph: auto or false")
            self.graph = GraphStep(self)

    @classmethod
    def from_config(cls, cfg: Config, device: torch.device | str | None = None,
                    dist: DistContext | None = None) -> "Trainer":
        """Seed, build data sets, model, optimizer, scheduler and loaders (no
        collectives).  With an enabled ``dist`` the loaders read this rank's
        shard; call :meth:`distribute` afterwards to wrap the model in DDP."""
        device = torch.device(device) if device is not None else resolve_device(cfg.device)
        if device.type != "cpu":
            codeq.selfcheck(device)  # fused kernels vs the CPU ones, once, before any compile
        # The base seed on every rank: identical model initialisation everywhere.
        seed_everything(cfg.seed)
        train_ds, val_ds = build_datasets(cfg)  # ConfigError if missing: before anything is written
        model = build_run_model(cfg).to(device)
        optimizer = build_optimizer(cfg, model)
        scheduler = build_scheduler(cfg, optimizer)
        train_loader, val_loader, g = build_loaders(cfg, train_ds, val_ds, device, dist=dist)
        trainer = cls(cfg, device, model, optimizer, scheduler, train_loader, val_loader, g, dist=dist)
        if dist is not None and dist.enabled and cfg.sync_bn:
            check_sync_bn(model, device, dist.world_size)  # a ConfigError now, before any collective
        return trainer

    def distribute(self) -> None:
        """Wrap the model in DistributedDataParallel (after the checkpoint, if
        any, is loaded; DDP broadcasts rank 0's parameters and buffers).  The
        training forward pass goes through the wrapper; loss terms, evaluation,
        statistics and checkpoints use the unwrapped ``self.model``."""
        if not self.dist.enabled:
            return
        ddp = self.dist.wrap(self.model, self.device, sync_bn=self.cfg.sync_bn)
        self.net = torch.compile(ddp) if self.cfg.use_compile else ddp
        self.eval_net = torch.compile(self.model) if self.cfg.use_compile else self.model

    # ------------------------------------------------------------- steps --
    def compute_loss(self, x: torch.Tensor, y: torch.Tensor):
        """(total loss, CE, logits).  The forward pass and the loss terms run in
        one ``parametrize.cached()`` block: each quantizer runs once, and the
        terms see the quantized weights the forward pass used."""
        with parametrize.cached():
            fused_gl = self.fast.prefill() if self.fast is not None else None
            logits = self.net(x)
            ce = F.cross_entropy(logits, y)
            loss = ce
            for i, (_, fn, lam, kwargs) in enumerate(self.loss_terms):
                if i == self.fast_term and fused_gl is not None:
                    term = fused_gl
                else:
                    term = fn(self.model, **kwargs)  # unwrapped: same parameters as the forward
                loss = loss + lam * term
        return loss, ce, logits

    def step(self, x: torch.Tensor, y: torch.Tensor):
        """The training step the epoch loop runs: :meth:`train_step`, replayed as a
        CUDA graph when ``cuda_graph`` is on (codeq/train/graph.py).  (loss, CE,
        n correct) on the device."""
        if self.graph is not None:
            return self.graph.step(x, y)
        return self.train_step(x, y)

    def train_step(self, x: torch.Tensor, y: torch.Tensor):
        """One optimisation step; returns (loss, CE, n correct) as device tensors."""
        self.optimizer.zero_grad(set_to_none=True)
        loss, ce, logits = self.compute_loss(x, y)
        loss.backward()
        self.optimizer.step()
        return loss.detach(), ce.detach(), (logits.detach().argmax(1) == y).sum()

    def train_epoch(self, epoch: int, console: Console | None = None) -> torch.Tensor:
        """Returns [loss sum, CE sum, correct, count] on the device (not read)."""
        cfg = self.cfg
        self.model.train()
        rank = self.dist.rank
        if self.dist.enabled:
            # Augmentation randomness (global RNGs in the main process, worker seeds
            # through the generator) differs per rank: seed + rank, per epoch.
            seed_everything(epoch_seed(cfg.seed + rank, epoch) % 2**32)
        sampler = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)  # the data order: (seed, epoch), the same on all ranks
        self.generator.manual_seed(epoch_seed(cfg.seed + rank, epoch))
        if self.graph is not None:
            self.graph.reset()  # captured anew with this epoch's learning rates
        dev = self.device
        acc = torch.zeros(3, dtype=torch.float64, device=dev)
        n = 0
        n_batches = len(self.train_loader)
        if console is not None:
            console.start_epoch(epoch, cfg.epochs, n_batches)
        for step, (x, y) in enumerate(self.train_loader, 1):
            maybe_test_crash(rank, epoch, step)
            x = x.to(dev, non_blocking=True)
            y = y.to(dev, non_blocking=True)
            loss, ce, correct = self.step(x, y)
            bs = y.shape[0]
            acc += torch.stack([loss.double() * bs, ce.double() * bs, correct.double()])
            n += bs
            if console is not None:
                console.batch()
                if step % cfg.log_interval == 0 and step < n_batches:
                    vals = acc.tolist()  # one sync per log interval
                    console.progress(epoch, cfg.epochs, step, n_batches, vals[0] / n, vals[2] / n)
        return torch.cat([acc, torch.tensor([float(n)], dtype=torch.float64, device=dev)])

    @torch.no_grad()
    def evaluate(self) -> torch.Tensor:
        """Returns [CE sum, correct, count] over the validation set on the device.
        The quantizers run once for the whole pass (one cached() block)."""
        self.model.eval()
        dev = self.device
        acc = torch.zeros(2, dtype=torch.float64, device=dev)
        n = 0
        with parametrize.cached():
            for x, y in self.val_loader:
                x = x.to(dev, non_blocking=True)
                y = y.to(dev, non_blocking=True)
                logits = self.eval_net(x)
                acc += torch.stack([
                    F.cross_entropy(logits.float(), y, reduction="sum").double(),
                    (logits.argmax(1) == y).sum().double(),
                ])
                n += y.shape[0]
        return torch.cat([acc, torch.tensor([float(n)], dtype=torch.float64, device=dev)])

    @torch.no_grad()
    def quant_stats_tensor(self) -> torch.Tensor:
        """L x 5 on the device: sparsity (fraction of w_hat == 0), bit-width,
        dead-zone width d, dead-zone fraction d/2a, number of weights."""
        rows = []
        nan = torch.tensor(float("nan"), device=self.device)
        with parametrize.cached():
            for _, module, q in self.quantized:
                w_hat = module.weight
                w = module.parametrizations["weight"].original
                sparsity = (w_hat == 0).double().mean()
                bits = q.get_bitwidth().to(self.device) if hasattr(q, "get_bitwidth") else nan
                width = q.get_deadzone_width(w) if hasattr(q, "get_deadzone_width") else nan
                frac = q.get_deadzone_fraction() if hasattr(q, "get_deadzone_fraction") else nan
                rows.append(torch.stack([
                    sparsity, bits.double(), width.double(), frac.double(),
                    torch.tensor(float(w_hat.numel()), dtype=torch.float64, device=self.device),
                ]))
        if not rows:
            return torch.zeros(0, 5, dtype=torch.float64, device=self.device)
        return torch.stack(rows)

    def epoch_record(self, epoch: int, train: torch.Tensor, val: torch.Tensor, lrs: dict, seconds: float) -> dict:
        qs = self.quant_stats_tensor()
        # The one device sync of the epoch.
        flat = torch.cat([train, val, qs.reshape(-1)]).cpu().tolist()
        t_loss, t_ce, t_correct, t_n = flat[0:4]
        v_ce, v_correct, v_n = flat[4:7]
        rows = [flat[7 + 5 * i: 12 + 5 * i] for i in range(len(self.quantized))]
        rec = {
            "epoch": epoch + 1,
            "train_loss": t_loss / max(t_n, 1),
            "train_ce": t_ce / max(t_n, 1),
            "train_acc": t_correct / max(t_n, 1),
            "val_loss": v_ce / max(v_n, 1),
            "val_acc": v_correct / max(v_n, 1),
            "lr": lrs.get("base", next(iter(lrs.values()))),
            "lrs": lrs,
            "epoch_time": seconds,
        }
        if rows:
            total = sum(r[4] for r in rows)

            def mean(i):
                vals = [r[i] for r in rows if r[i] == r[i]]  # skip NaN (quantizers without that notion)
                return sum(vals) / len(vals) if vals else None

            rec.update({
                "sparsity_mean": mean(0),
                "sparsity_total": sum(r[0] * r[4] for r in rows) / total,
                "bits_mean": mean(1),
                "deadzone_width_mean": mean(2),
                "deadzone_fraction_mean": mean(3),
                "layers": {
                    name: {
                        "sparsity": r[0],
                        "bits": r[1] if r[1] == r[1] else None,
                        "deadzone_width": r[2] if r[2] == r[2] else None,
                        "deadzone_fraction": r[3] if r[3] == r[3] else None,
                        "numel": int(r[4]),
                    }
                    for (name, _, _), r in zip(self.quantized, rows)
                },
            })
        return rec

    # -------------------------------------------------------- checkpoints --
    def checkpoint_state(self, epoch: int) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "epoch": int(epoch),
            "best_acc": float(self.best_acc),
            "config": config_to_dict(self.cfg),
            "rng": get_rng_state(),
            "codeq_version": codeq.__version__,
        }

    def load_checkpoint_state(self, ckpt: dict, path: str = "the checkpoint") -> None:
        """Restore model, optimizer, scheduler, epoch, best accuracy and RNG
        states (ConfigError when the checkpoint does not fit this config).
        Call before :meth:`distribute`; every rank loads the same file."""
        check_resume_compatible(ckpt.get("config") or {}, self.cfg, path)
        epoch = int(ckpt.get("epoch", 0))
        if epoch >= self.cfg.epochs:
            raise ConfigError(
                f"{path} has already completed {epoch} of {self.cfg.epochs} epochs; "
                f"raise epochs (e.g. --set epochs={epoch + self.cfg.epochs}) to train further"
            )
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0]
            raise ConfigError(f"cannot resume from {path}: its state does not fit this config ({first})") from None
        if self.scheduler is not None and ckpt.get("scheduler") is not None:
            self.scheduler.load_state_dict(ckpt["scheduler"])
            if hasattr(self.scheduler, "T_max"):
                self.scheduler.T_max = self.cfg.epochs  # epochs may have been raised
        self.start_epoch = epoch
        self.best_acc = float(ckpt.get("best_acc", 0.0))
        if ckpt.get("rng") is not None:
            set_rng_state(ckpt["rng"])

    # ---------------------------------------------------------------- fit --
    def fit(self, run_dir: str, run_name: str | None = None, stop_after: int | None = None,
            console: Console | None = None, report: bool = True) -> list[dict]:
        """Train from ``self.start_epoch`` to ``cfg.epochs`` (or ``stop_after``
        epochs of this call), writing metrics.jsonl, checkpoint.th (every
        epoch) and best.th (when val accuracy improves) into ``run_dir``; then
        the compression report.  Returns the epoch records of this call."""
        cfg = self.cfg
        main = self.dist.is_main  # only rank 0 writes files, logs and prints
        metrics = MetricsFile(run_dir, keep_epochs=self.start_epoch) if main else None
        wandb = WandbLogger(cfg, run_dir, run_name or os.path.basename(run_dir), config_to_dict(cfg)) if main else None
        console = (console or Console(cfg.epochs, self.start_epoch)) if main else None
        end = cfg.epochs if stop_after is None else min(cfg.epochs, self.start_epoch + stop_after)
        records = []
        try:
            for epoch in range(self.start_epoch, end):
                t0 = time.perf_counter()
                lrs = {g.get("name", str(i)): float(g["lr"]) for i, g in enumerate(self.optimizer.param_groups)}
                train = self.train_epoch(epoch, console)
                if self.scheduler is not None:
                    self.scheduler.step()
                val = self.evaluate()
                if self.dist.enabled:  # sums over all ranks' shards: one all_reduce of 7 numbers
                    both = self.dist.all_reduce_sum(torch.cat([train, val]))
                    train, val = both[:4], both[4:]
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                rec = self.epoch_record(epoch, train, val, lrs, time.perf_counter() - t0)
                records.append(rec)
                improved = rec["val_acc"] > self.best_acc
                if improved:
                    self.best_acc = rec["val_acc"]
                rec["best_acc"] = self.best_acc
                if not main:
                    continue
                metrics.write(rec)
                wandb.log(rec, step=epoch + 1)
                state = self.checkpoint_state(epoch + 1)
                save_checkpoint(state, os.path.join(run_dir, "checkpoint.th"))
                if improved and cfg.save_best:
                    save_checkpoint(state, os.path.join(run_dir, "best.th"))
                console.end_epoch()
                console.line(_summary_line(rec, cfg.epochs))
        finally:
            if console is not None:
                console.close()
            if wandb is not None:
                wandb.finish()
        if not main:
            return records
        if end < cfg.epochs:
            console.line(
                f"stopped after epoch {end} of {cfg.epochs}; continue with "
                f"--resume {os.path.join(run_dir, 'checkpoint.th')}"
            )
        elif report:
            self.write_report(run_dir, console)
        return records

    def write_report(self, run_dir: str, console: Console | None = None) -> dict | None:
        """The compression report of the final model (codeq.report), printed
        and saved into run_dir; a warning (not a failure) if it cannot be made."""
        out = console.line if console is not None else print
        self.model.eval()
        try:
            rep = compression_report(self.model, example_input(self.cfg.img_size).to(self.device), act_bits=32)
            out(format_report(rep))
            paths = save_report(rep, run_dir)
            out("report: " + ", ".join(str(p) for p in paths.values()))
            return rep
        except Exception as exc:
            warn(f"compression report failed: {type(exc).__name__}: {exc}")
            return None


def _summary_line(rec: dict, epochs: int) -> str:
    s = (f"epoch {rec['epoch']}/{epochs} train_loss {rec['train_loss']:.4f} train_acc {rec['train_acc']:.4f} "
         f"val_loss {rec['val_loss']:.4f} val_acc {rec['val_acc']:.4f} lr {rec['lr']:.3g} "
         f"time {rec['epoch_time']:.1f}s")
    if rec.get("sparsity_mean") is not None:
        s += f" sparsity {rec['sparsity_mean']:.4f}"
    if rec.get("bits_mean") is not None:
        s += f" bits {rec['bits_mean']:.2f}"
    return s
