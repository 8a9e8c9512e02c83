"""The training loop: CE + sum of lambda * loss terms, 3-way param groups,
step losses read once per log interval (progress, a stop at the first
non-finite one), per-epoch metrics read with one device sync, relative BOPs,
checkpoints, resume, training curves and the compression report."""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import codeq
from codeq._io import read_jsonl, write_json
from codeq.checkpoint import get_rng_state, save_checkpoint, set_rng_state
from codeq.errors import TrainingDiverged
from codeq.export import export_model
from codeq.fastpath import FusedWeights
from codeq.losses import group_lasso
from codeq.models import build_model, example_input
from codeq.parametrize import iter_quantizers
from codeq.plots import save_figure, training_curves_figure
from codeq.registry import LOSS_REGISTRY
from codeq.report import METRICS, CompressionMeter, compression_report, format_report, layer_macs, relative_bops, \
    save_report
from codeq.train.budget import BudgetController, Knob
from codeq.train.config import Config, ConfigError, check_resume_compatible, config_to_dict
from codeq.train.data import build_datasets, build_loaders
from codeq.train.distributed import DistContext, check_sync_bn, maybe_test_crash, resolve_device
from codeq.train.graph import GraphStep
from codeq.train.logging import Console, MetricsFile, WandbLogger, warn
from codeq.train.malloc import tune_malloc
from codeq.train.optim import build_optimizer, build_scheduler, graph_capable
from codeq.train.precision import autocast, wants_channels_last
from codeq.train.sampling import epoch_seed

__all__ = ["Trainer", "seed_everything", "build_run_model"]

CURVES_EVERY_S = 60.0  # training_curves.png is redrawn at most this often (and after the last epoch)


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
        self._curves_failed = False  # training_curves.png: warn once, then stop drawing
        self._curves_at = -math.inf  # when it was last drawn (time.monotonic)
        self.best_acc = 0.0
        self.quantized = [(name, module, q) for name, module, q in iter_quantizers(model)]
        # channels_last: the batches in NHWC (the parameters stay as they are, docs/TRAINING.md#speed).
        self.channels_last = wants_channels_last(cfg.channels_last, model)
        self.memory_format = torch.channels_last if self.channels_last else torch.preserve_format
        # amp: fp16 needs a gradient scaler (its small gradients would underflow).
        self.scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None
        # Eager fast path (codeq.fastpath): every quantized weight, and the first
        # group-lasso term, in one fused call per step.  Not under torch.compile,
        # which traces the per-layer ops and fuses on its own.
        self.fast, self.fast_term = None, None
        if cfg.fused_weights and not cfg.use_compile and self.quantized:
            gl_index = next((i for i, (_, fn, _, _) in enumerate(self.loss_terms) if fn is group_lasso), None)
            self.fast = FusedWeights(model, group_lasso=self.loss_terms[gl_index][3] if gl_index is not None else None)
            self.fast_term = gl_index
        # The Linear and conv layers with their dense MACs, measured once (one forward
        # pass): the paper's relative BOPs of every epoch (the meter, which a budget
        # also reads) and eval_bobs' published-trainer figure.
        macs = layer_macs(model, example_input(cfg.img_size).to(device))
        self.meter = CompressionMeter(model, macs)
        self.bops_layers = []
        if cfg.eval_bobs:
            qs = {id(m): q for _, m, q in self.quantized}
            self.bops_layers = [(name, m, mac, qs.get(id(m))) for name, m, mac in macs]
        # budget: the regulariser strengths follow a controller (codeq/train/budget.py).
        self.budget, self._budget_warned = None, False
        if cfg.budget is not None:
            knobs = [Knob(name, scale, self._writer(name)) for name, scale in cfg.budget_strengths().items()]
            self.budget = BudgetController(cfg.budget, knobs, cfg.epochs, len(train_loader))
        # cuda_graph: each training step replayed as one CUDA graph (codeq/train/graph.py).
        self.graph = None
        if cfg.cuda_graph == "auto":  # on where it can run: CUDA, one process, graph_capable
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

    # ------------------------------------------------------------ budget --
    def _writer(self, name: str):
        """The setter of one strength a budget controls (a name of Config.budget_strengths)."""
        parts = name.split(".")
        if parts[0] == "optimizer":  # optimizer.param_groups.<dz|bit>.weight_decay

            def write(v):  # looked up each time: load_state_dict replaces the group dicts
                for g in self.optimizer.param_groups:
                    if g.get("name") == parts[2]:
                        g["weight_decay"] = v
            return write
        kwargs = self.loss_terms[int(parts[1])][3]  # loss_terms.<i>.kwargs.<lambda_dz|lambda_bit>

        def write_term(v):
            kwargs[parts[3]] = v
        return write_term

    def budget_metric(self) -> float:
        """The budget's metric now (one host read; under DDP rank 0's value on every rank)."""
        v = self.meter.values()[METRICS.index(self.cfg.budget.metric)].reshape(1)
        if self.dist.enabled:
            v = self.dist.all_reduce_sum(v if self.dist.rank == 0 else torch.zeros_like(v))
        return float(v.item())

    def steer(self, epoch: int, step: int) -> None:
        """One controller update after ``step`` steps of ``epoch`` (at each progress read)."""
        if self.budget is not None:
            self.budget.update(self.budget_metric(), epoch * len(self.train_loader) + step)

    # ------------------------------------------------------------- steps --
    def batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch on the device, the images in the run's memory format."""
        return (x.to(self.device, non_blocking=True, memory_format=self.memory_format),
                y.to(self.device, non_blocking=True))

    def autocast(self):
        """The run's ``amp`` autocast (no weight cache inside a CUDA graph)."""
        return autocast(self.cfg.amp, self.device, cache=self.graph is None)

    def compute_loss(self, x: torch.Tensor, y: torch.Tensor):
        """(total loss, [CE, term_1, ..., term_k], logits): the terms unweighted,
        in ``loss_terms`` order.  The forward pass and the loss terms run in one
        ``parametrize.cached()`` block: each quantizer runs once, and the terms
        see the quantized weights the forward pass used.  Under ``amp`` the
        block is autocast; the cross-entropy takes float32 logits."""
        with parametrize.cached(), self.autocast():
            fused_gl = self.fast.prefill() if self.fast is not None else None
            logits = self.net(x)
            ce = F.cross_entropy(logits.float(), y)
            loss = ce
            parts = [ce]
            for i, (_, fn, lam, kwargs) in enumerate(self.loss_terms):
                if i == self.fast_term and fused_gl is not None:
                    term = fused_gl
                else:
                    term = fn(self.model, **kwargs)  # unwrapped: same parameters as the forward
                loss = loss + lam * term
                parts.append(term)
        return loss, parts, logits

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The training step the epoch loop runs: :meth:`train_step`, replayed as a
        CUDA graph when ``cuda_graph`` is on (codeq/train/graph.py)."""
        if self.graph is not None:
            return self.graph.step(x, y)
        return self.train_step(x, y)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimisation step; returns [loss, CE, term_1..term_k, n correct]
        as one float32 device tensor (nothing read on the host)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss, parts, logits = self.compute_loss(x, y)
        if self.scaler is not None:  # amp: fp16 -- a step with inf/nan gradients is skipped, the scale lowered
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        correct = (logits.detach().argmax(1) == y).sum()
        # float32: exact counts and no overflow whatever the loss dtype
        return torch.stack([v.detach().float() for v in (loss, *parts)] + [correct.float()])

    def term_keys(self) -> list[str]:
        """The loss terms' names in the epoch records (``name``, or ``name_i``
        when two terms share one)."""
        names = [t[0] for t in self.loss_terms]
        return [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]

    def value_names(self) -> list[str]:
        """What each entry of :meth:`train_step`'s values but the last is."""
        return (["the total loss", "the cross-entropy"]
                + [f"loss term loss_terms[{i}] ({name})" for i, (name, _, _, _) in enumerate(self.loss_terms)])

    def train_epoch(self, epoch: int, console: Console | None = None) -> torch.Tensor:
        """Returns [loss sum, CE sum, correct, count, term_1 sum, ..., term_k sum]
        on the device.  The step values are read on the host once per
        ``log_interval`` steps and at the end of the epoch; a non-finite loss
        among them raises :class:`~codeq.errors.TrainingDiverged` (on every rank
        under DDP) naming the first bad step."""
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
        totals = torch.zeros(3 + len(self.loss_terms) + 1, dtype=torch.float64)  # sums of values, count
        window, sizes = [], []
        n_batches = len(self.train_loader)
        if console is not None:
            console.start_epoch(epoch, cfg.epochs, n_batches)
        step = 0
        for step, (x, y) in enumerate(self.train_loader, 1):
            maybe_test_crash(rank, epoch, step)
            x, y = self.batch(x, y)
            window.append(self.step(x, y))
            sizes.append(y.shape[0])
            if console is not None:
                console.batch()
            if step % cfg.log_interval == 0 or step == n_batches:
                self._read_window(window, sizes, totals, epoch, step, n_batches)
                self.steer(epoch, step)
                if console is not None and step < n_batches:
                    n = totals[-1].item()
                    console.progress(epoch, cfg.epochs, step, n_batches, totals[0].item() / n, totals[-2].item() / n)
        if window:  # a loader shorter than its len()
            self._read_window(window, sizes, totals, epoch, step, n_batches)
            self.steer(epoch, step)
        k = len(self.loss_terms)
        order = [0, 1, 2 + k, 3 + k] + list(range(2, 2 + k))  # loss, CE, correct, count, terms
        return totals[order].to(self.device)

    def _read_window(self, window: list, sizes: list, totals: torch.Tensor, epoch: int, step: int,
                     n_batches: int) -> None:
        """Add the values of the last ``len(window)`` steps (up to ``step``) to
        ``totals``; raise TrainingDiverged at the first non-finite one.  Empties
        both lists."""
        vals = torch.stack(window).double().cpu()  # the one host read of the window
        bad = ~torch.isfinite(vals[:, :-1])
        hit = None  # (step, rank, column) of the first non-finite value
        if bad.any():
            i = int(bad.any(1).nonzero()[0])
            cols = bad[i].nonzero().flatten().tolist()
            col = next((c for c in cols if c > 0), 0)  # a part rather than the total it sums
            hit = (step - len(window) + 1 + i, self.dist.rank, col)
            value = float(vals[i, col])
        if self.dist.enabled:  # every rank stops together, at the earliest bad step of any rank
            slots = torch.zeros(self.dist.world_size, 2, dtype=torch.float64)
            if hit is not None:
                slots[self.dist.rank] = torch.tensor([hit[0], hit[2] + 1], dtype=torch.float64)
            slots = self.dist.all_reduce_sum(slots.to(self.device)).cpu().tolist()
            hits = [(int(s), r, int(c) - 1) for r, (s, c) in enumerate(slots) if s > 0]
            hit = min(hits) if hits else None
        if hit is not None:
            bad_step, bad_rank, col = hit
            what = self.value_names()[col]
            if bad_rank != self.dist.rank:
                shown = "not finite"
            else:
                shown = "nan" if value != value else ("inf" if value > 0 else "-inf")
            where = f" on rank {bad_rank}" if self.dist.enabled else ""
            raise TrainingDiverged(f"training diverged: {what} is {shown} at epoch {epoch + 1}/{self.cfg.epochs}, "
                                   f"step {bad_step}/{n_batches}{where}", epoch + 1, bad_step, what)
        bs = torch.tensor(sizes, dtype=torch.float64)
        totals[:-2] += (vals[:, :-1] * bs[:, None]).sum(0)
        totals[-2] += vals[:, -1].sum()
        totals[-1] += bs.sum()
        window.clear()
        sizes.clear()

    @torch.no_grad()
    def evaluate(self) -> torch.Tensor:
        """Returns [CE sum, correct, count] over the validation set on the device.
        The quantizers run once for the whole pass (one cached() block)."""
        self.model.eval()
        dev = self.device
        acc = torch.zeros(2, dtype=torch.float64, device=dev)
        n = 0
        with parametrize.cached(), self.autocast():
            for x, y in self.val_loader:
                x, y = self.batch(x, y)
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

    @torch.no_grad()
    def bops_tensor(self) -> torch.Tensor:
        """L x 2 on the device for the layers of ``bops_layers``: the fraction
        of output channels whose ŵ is all zero, and the bit-width of an enabled
        quantizer (NaN: none)."""
        rows = []
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=self.device)
        with parametrize.cached():
            for _, module, _, q in self.bops_layers:
                pruned = (module.weight.flatten(1).abs().amax(1) == 0).double().mean()
                active = q is not None and q.enabled and hasattr(q, "get_bitwidth")
                bits = q.get_bitwidth().to(self.device).double() if active else nan
                rows.append(torch.stack([pruned, bits]))
        return torch.stack(rows) if rows else torch.zeros(0, 2, dtype=torch.float64, device=self.device)

    def epoch_record(self, epoch: int, train: torch.Tensor, val: torch.Tensor, lrs: dict, seconds: float) -> dict:
        with parametrize.cached():  # each quantizer once for all three
            qs = self.quant_stats_tensor()
            bops = self.bops_tensor()
            meter = self.meter.values()
        # The one device sync of the epoch.
        flat = torch.cat([train, val, meter, qs.reshape(-1), bops.reshape(-1)]).cpu().tolist()
        b_flat = flat[len(flat) - 2 * len(self.bops_layers):]
        t_loss, t_ce, t_correct, t_n = flat[0:4]
        k = len(train) - 4
        terms = flat[4:4 + k]
        v_ce, v_correct, v_n = flat[4 + k:7 + k]
        compression = dict(zip(METRICS, flat[7 + k:7 + k + len(METRICS)]))
        first_row = 7 + k + len(METRICS)
        rows = [flat[first_row + 5 * i: first_row + 5 * i + 5] for i in range(len(self.quantized))]
        rec = {
            "epoch": epoch + 1,
            "train_loss": t_loss / max(t_n, 1),
            "train_ce": t_ce / max(t_n, 1),
            "train_acc": t_correct / max(t_n, 1),
            "train_loss_terms": {name: v / max(t_n, 1) for name, v in zip(self.term_keys(), terms)},
            "val_loss": v_ce / max(v_n, 1),
            "val_acc": v_correct / max(v_n, 1),
            "lr": lrs.get("base", next(iter(lrs.values()))),
            "lrs": lrs,
            "epoch_time": seconds,
            # the paper's relative BOPs (Eqs. 20-22), as the compression report counts them
            "relative_bops": compression["rel_bops"],
        }
        if self.bops_layers:
            b = relative_bops([{"name": name, "macs": macs, "row_sparsity": b_flat[2 * i],
                                "bits": b_flat[2 * i + 1] if b_flat[2 * i + 1] == b_flat[2 * i + 1] else None}
                               for i, (name, _, macs, _) in enumerate(self.bops_layers)],
                              self.cfg.default_weight_bitrate, self.cfg.default_activation_bitrate)
            rec["published_bops"] = b["relative"]
            rec["published_bops_layers"] = b["layers"]
        if self.budget is not None:
            rec["budget"] = self.budget.record()
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
            "budget": self.budget.state_dict() if self.budget is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
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
        if self.budget is not None and ckpt.get("budget") is not None:
            self.budget.load_state_dict(ckpt["budget"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
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
        the compression report.  Returns the epoch records of this call.
        Raises :class:`~codeq.errors.TrainingDiverged` at the first
        non-finite training loss; nothing of that epoch is written."""
        cfg = self.cfg
        main = self.dist.is_main  # only rank 0 writes files, logs and prints
        metrics = MetricsFile(run_dir, keep_epochs=self.start_epoch) if main else None
        wandb = WandbLogger(cfg, run_dir, run_name or os.path.basename(run_dir), config_to_dict(cfg)) if main else None
        console = (console or Console(cfg.epochs, self.start_epoch)) if main else None
        end = cfg.epochs if stop_after is None else min(cfg.epochs, self.start_epoch + stop_after)
        records = []
        if self.budget is not None and self.budget.start is None:
            self.budget.begin(self.budget_metric())  # the schedule starts from the model as built
        try:
            for epoch in range(self.start_epoch, end):
                t0 = time.perf_counter()
                lrs = {g.get("name", str(i)): float(g["lr"]) for i, g in enumerate(self.optimizer.param_groups)}
                train = self.train_epoch(epoch, console)
                if self.scheduler is not None:
                    self.scheduler.step()
                val = self.evaluate()
                if self.dist.enabled:  # sums over all ranks' shards: one all_reduce
                    both = self.dist.all_reduce_sum(torch.cat([train, val]))
                    train, val = both[:len(train)], both[len(train):]
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                rec = self.epoch_record(epoch, train, val, lrs, time.perf_counter() - t0)
                records.append(rec)
                improved = rec["val_acc"] > self.best_acc
                if improved:
                    self.best_acc = rec["val_acc"]
                rec["best_acc"] = self.best_acc
                due = self.budget.milestone_due() if self.budget is not None else None
                if due is not None:
                    rec["milestone"] = self.budget.mark_saved(due, epoch + 1, rec["val_acc"])
                if not main:
                    continue
                if due is not None:
                    self.save_milestone(run_dir, rec["milestone"], console)
                metrics.write(rec)
                self.draw_curves(run_dir, metrics.path, final=epoch + 1 == end)
                wandb.log(rec, step=epoch + 1)
                state = self.checkpoint_state(epoch + 1)
                save_checkpoint(state, os.path.join(run_dir, "checkpoint.th"))
                if improved and cfg.save_best:
                    save_checkpoint(state, os.path.join(run_dir, "best.th"))
                console.end_epoch()
                console.line(_summary_line(rec, cfg.epochs))
                if self.budget is not None and self.budget.saturated and not self._budget_warned:
                    self._budget_warned = True
                    warn(f"budget: the controller is at its limit (budget.max_factor {cfg.budget.max_factor:g} x "
                         f"the configured strengths) and {cfg.budget.metric} is still {rec['budget']['value']:.4g} "
                         f"against {rec['budget']['target']:.4g} scheduled; the logits may move no faster than "
                         "their learning rate allows (a theta_l2 pull under Adam: about lr per step) -- raise the "
                         "dz/bit lr, train longer or set a later budget.reach_by")
        except TrainingDiverged as exc:
            if not main:
                raise
            self.draw_curves(run_dir, metrics.path, final=True)
            ckpt = os.path.join(run_dir, "checkpoint.th")
            if os.path.isfile(ckpt):
                best = " and best.th are" if os.path.isfile(os.path.join(run_dir, "best.th")) else " is"
                kept = (f"{ckpt} (epoch {exc.epoch - 1}){best} untouched; continue from there with "
                        f"--resume {ckpt} and a lower learning rate or λ")
            else:
                kept = "no checkpoint was written (the first epoch diverged); lower the learning rate or λ"
            raise TrainingDiverged(f"{exc}; {kept}", exc.epoch, exc.step, exc.term) from None
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
        if self.budget is not None and end == cfg.epochs:
            self.write_budget(run_dir, console)
        return records

    def save_milestone(self, run_dir: str, milestone: dict, console: Console) -> None:
        """milestone-<target>.th and its compact export milestone-<target>/ (the
        export failing is a warning: the checkpoint is what matters)."""
        stem = os.path.join(run_dir, f"milestone-{milestone['target']:g}")
        save_checkpoint(self.checkpoint_state(milestone["epoch"]), stem + ".th")
        milestone["checkpoint"] = stem + ".th"
        try:
            export_model(self.model, stem, config=config_to_dict(self.cfg))
            milestone["export"] = stem
        except Exception as exc:  # noqa: BLE001 -- an export never stops training
            warn(f"milestone export {stem} failed: {type(exc).__name__}: {exc}")
        console.line(f"milestone {self.cfg.budget.metric} {milestone['target']:g} held for an epoch: "
                     f"{milestone['value']:.4g}, val_acc {milestone['val_acc']:.4f} -> {stem}.th")

    def write_budget(self, run_dir: str, console: Console) -> dict:
        """budget.json (target, reached value, error, milestones) and its line in the console."""
        s = self.budget.summary()
        write_json(os.path.join(run_dir, "budget.json"), s)
        err = s["relative_error"]
        verdict = "on target" if s["within_tolerance"] else f"outside the ±{self.cfg.budget.tolerance:.0%} tolerance"
        console.line(f"budget: {s['metric']} target {s['target']:g}, reached {s['reached']:.4g} "
                     f"({err:+.1%}, {verdict})")
        if s["missed_milestones"]:
            console.line("budget: milestones never held for an epoch: "
                         + ", ".join(f"{t:g}" for t in s["missed_milestones"]))
        return s

    def draw_curves(self, run_dir: str, metrics_path: str, final: bool = False) -> None:
        """training_curves.png from every epoch of metrics.jsonl: after the
        first epoch, after the last one of the call (``final``), and between
        them at most every CURVES_EVERY_S seconds, so that drawing never costs
        a short epoch much; a warning, once, if it cannot be drawn."""
        if self._curves_failed or not (final or time.monotonic() - self._curves_at >= CURVES_EVERY_S):
            return
        if not os.path.isfile(metrics_path):
            return
        self._curves_at = time.monotonic()
        try:
            records = read_jsonl(metrics_path)
            save_figure(training_curves_figure(records, os.path.basename(os.path.normpath(run_dir))),
                        os.path.join(run_dir, "training_curves.png"))
        except Exception as exc:  # noqa: BLE001 -- a picture never stops training
            warn(f"training_curves.png not drawn: {type(exc).__name__}: {exc}")
            self._curves_failed = True

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
    if rec.get("relative_bops") is not None:
        s += f" relative BOPs {rec['relative_bops']:.4g}"
    b = rec.get("budget")
    if b is not None:
        s += f" | budget {b['metric']} {b['value']:.4g} (target {b['target']:.4g}, u {b['u']:.3g})"
    return s
