"""The training loop: CE + sum of lambda * loss terms, 3-way param groups,
step losses read once per log interval (progress, a stop at the first
non-finite one), per-epoch metrics read with one device sync, relative BOPs,
checkpoints, resume, training curves and the compression report.  Step and
epoch values are named where they are made and read by name
(codeq/train/values.py)."""

from __future__ import annotations

import contextlib
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
from codeq.models import build_model, example_input
from codeq.parametrize import iter_quantizers
from codeq.plots import save_figure, training_curves_figure
from codeq.report import METRICS, CompressionMeter, compression_report, format_report, layer_macs, relative_bops, \
    save_report
from codeq.train.budget import BudgetController, Knob, group_setting
from codeq.train.config import Config, ConfigError, check_resume_compatible, config_to_dict
from codeq.train.data import build_datasets, build_loaders
from codeq.train.distributed import DistContext, check_sync_bn, resolve_device
from codeq.train.graph import GraphStep
from codeq.train.logging import Console, MetricsFile, WandbLogger, warn
from codeq.train.malloc import tune_malloc
from codeq.train.optim import build_optimizer, build_scheduler, graph_capable
from codeq.train.precision import autocast, wants_channels_last
from codeq.train.sampling import epoch_seed
from codeq.train.terms import build_loss_terms
from codeq.train.values import Named, read

__all__ = ["Trainer", "seed_everything", "build_run_model"]

CURVES_EVERY_S = 60.0  # training_curves.png is redrawn at most this often (and after the last epoch)
# The step values that are counts, summed over the steps as they are; every other
# step value is a batch mean, summed weighted by its batch size.
COUNTS = ("correct",)
# What evaluate sums over the validation set, from each batch's logits and labels
# (named here because a shard may hold no batch to name them).
VAL_SUMS = {
    "ce": lambda logits, y: F.cross_entropy(logits.float(), y, reduction="sum"),
    "correct": lambda logits, y: (logits.argmax(1) == y).sum(),
}


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
        if device.type == "cpu":
            tune_malloc()  # no page faults on the step's large CPU tensors (codeq/train/malloc.py; measured there)
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
        self.loss_terms = build_loss_terms(cfg.loss_terms)
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
        # term that declares itself a group lasso, in one fused call per step.  Not
        # under torch.compile, which traces the per-layer ops and fuses on its own.
        self.fast, self.fast_term = None, None
        if cfg.fused_weights and not cfg.use_compile and self.quantized:
            self._fuse(next((t for t in self.loss_terms if t.fusable), None))
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
            knobs = [Knob(s.name, s.value, self.loss_terms[s.term].knob(s.key) if s.term is not None
                          else group_setting(optimizer, s.group, s.key)) for s in cfg.budget_strengths()]
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

    def _fuse(self, term) -> None:
        """The fast path with ``term``'s group lasso (None: the quantized weights alone)."""
        self.fast = FusedWeights(self.model, group_lasso=term.fused_layers(self.model) if term is not None else None)
        self.fast_term, self._fused_kwargs = term, dict(term.kwargs) if term is not None else None

    # ------------------------------------------------------------ budget --
    def budget_metric(self) -> float:
        """The budget's metric now (one host read; under DDP rank 0's value on every rank)."""
        v = Named(METRICS, self.meter.values())[self.cfg.budget.metric].reshape(1)
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
        """(total loss, {"ce": CE, term.value_name: term, ...}, logits): the terms
        unweighted, in ``loss_terms`` order.  The forward pass and the loss terms
        run in one ``parametrize.cached()`` block: each quantizer runs once, and
        the terms see the quantized weights the forward pass used.  Under ``amp``
        the block is autocast; the cross-entropy takes float32 logits."""
        if self.fast_term is not None and self.fast_term.kwargs != self._fused_kwargs:
            self._fuse(self.fast_term)  # a knob moved the fused term's lambdas
        fast = self.fast.prefilled() if self.fast is not None else contextlib.nullcontext()
        with parametrize.cached(), self.autocast(), fast as fused_gl:
            logits = self.net(x)
            ce = F.cross_entropy(logits.float(), y)
            loss = ce
            parts = {"ce": ce}
            for t in self.loss_terms:
                # unwrapped model: the same parameters as the forward
                value = fused_gl if t is self.fast_term and fused_gl is not None else t(self.model)
                loss = loss + t.strength * value
                parts[t.value_name] = value
        return loss, parts, logits

    def step(self, x: torch.Tensor, y: torch.Tensor) -> Named:
        """The training step the epoch loop runs: :meth:`train_step`, replayed as a
        CUDA graph when ``cuda_graph`` is on (codeq/train/graph.py)."""
        if self.graph is not None:
            return self.graph.step(x, y)
        return self.train_step(x, y)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> Named:
        """One optimisation step; returns its values (loss, ce, each term's
        ``value``, correct: the number of correct predictions) as one float32
        device tensor (nothing read on the host)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss, parts, logits = self.compute_loss(x, y)
        if self.scaler is not None:  # amp: fp16 -- a step with inf/nan gradients is skipped, the scale lowered
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        values = {"loss": loss, **parts, "correct": (logits.detach().argmax(1) == y).sum()}
        # float32: exact counts and no overflow whatever the loss dtype
        return Named.of({name: v.detach().float() for name, v in values.items()})

    def describe(self, value: str) -> str:
        """A step value in words (the divergence message)."""
        titles = {"loss": "the total loss", "ce": "the cross-entropy"}
        titles.update((t.value_name, t.title) for t in self.loss_terms)
        return titles.get(value, value)

    def train_epoch(self, epoch: int, console: Console | None = None) -> Named:
        """Returns the sums of the step values over the epoch (batch means
        weighted by the batch size) and ``count``, the number of images, on the
        device.  The step values are read on the host once per
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
        totals = None  # the sums so far, on the host (Named, float64)
        window, sizes = [], []
        n_batches = len(self.train_loader)
        if console is not None:
            console.start_epoch(epoch, cfg.epochs, n_batches)
        step = 0
        for step, (x, y) in enumerate(self.train_loader, 1):
            x, y = self.batch(x, y)
            window.append(self.step(x, y))
            sizes.append(y.shape[0])
            if console is not None:
                console.batch()
            if step % cfg.log_interval == 0 or step == n_batches:
                totals = self._read_window(window, sizes, totals, epoch, step, n_batches)
                self.steer(epoch, step)
                if console is not None and step < n_batches:
                    n = totals["count"].item()
                    console.progress(epoch, cfg.epochs, step, n_batches, totals["loss"].item() / n,
                                     totals["correct"].item() / n)
        if window:  # a loader shorter than its len()
            totals = self._read_window(window, sizes, totals, epoch, step, n_batches)
            self.steer(epoch, step)
        if totals is None:  # the step values name the sums: none without a step
            raise ConfigError("the training set gave no batch; check the data set and dataset.train_size")
        return Named(totals.names, totals.data.to(self.device))

    def _read_window(self, window: list, sizes: list, totals: Named | None, epoch: int, step: int,
                     n_batches: int) -> Named:
        """``totals`` (None: zeros) plus the values of the last ``len(window)``
        steps (up to ``step``), with ``count``; raise TrainingDiverged at the
        first non-finite value.  Empties both lists."""
        names = window[0].names
        vals = Named.rows(window).data.double().cpu()  # the one host read of the window
        bad = ~torch.isfinite(vals)
        hit = None  # (step, rank, column) of the first non-finite value
        if bad.any():
            i = int(bad.any(1).nonzero()[0])
            cols = bad[i].nonzero().flatten().tolist()
            col = next((c for c in cols if names[c] != "loss"), cols[0])  # a part rather than the total it sums
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
            what = self.describe(names[col])
            if bad_rank != self.dist.rank:
                shown = "not finite"
            else:
                shown = "nan" if value != value else ("inf" if value > 0 else "-inf")
            where = f" on rank {bad_rank}" if self.dist.enabled else ""
            raise TrainingDiverged(f"training diverged: {what} is {shown} at epoch {epoch + 1}/{self.cfg.epochs}, "
                                   f"step {bad_step}/{n_batches}{where}", epoch + 1, bad_step, what)
        bs = torch.tensor(sizes, dtype=torch.float64)
        means = torch.tensor([n not in COUNTS for n in names])
        sums = torch.empty(len(names), dtype=torch.float64)
        sums[means] = (vals[:, means] * bs[:, None]).sum(0)
        sums[~means] = vals[:, ~means].sum(0)
        sums = torch.cat([sums, bs.sum().reshape(1)])
        window.clear()
        sizes.clear()
        start = torch.zeros_like(sums) if totals is None else totals.data  # from +0.0 (-0.0 sums read 0.0)
        return Named(names + ("count",), start + sums)

    @torch.no_grad()
    def evaluate(self) -> Named:
        """Returns the sums of :data:`VAL_SUMS` and ``count``, the number of
        images, over the validation set on the device (zeros for an empty
        shard).  The quantizers run once for the whole pass (one cached() block)."""
        self.model.eval()
        dev = self.device
        acc = torch.zeros(len(VAL_SUMS), dtype=torch.float64, device=dev)
        n = 0
        with parametrize.cached(), self.autocast():
            for x, y in self.val_loader:
                x, y = self.batch(x, y)
                logits = self.eval_net(x)
                acc += torch.stack([value(logits, y).double() for value in VAL_SUMS.values()])
                n += y.shape[0]
        count = torch.tensor([float(n)], dtype=torch.float64, device=dev)
        return Named((*VAL_SUMS, "count"), torch.cat([acc, count]))

    @torch.no_grad()
    def quant_stats(self) -> Named:
        """A row per quantized layer, on the device: sparsity (fraction of
        w_hat == 0), bits, deadzone_width d, deadzone_fraction d/2a, numel
        (NaN: a quantizer without that notion)."""
        rows = []
        nan = torch.tensor(float("nan"), device=self.device)
        with parametrize.cached():
            for _, module, q in self.quantized:
                w_hat = module.weight
                w = module.parametrizations["weight"].original
                rows.append(Named.of({
                    "sparsity": (w_hat == 0).double().mean(),
                    "bits": (q.get_bitwidth().to(self.device) if hasattr(q, "get_bitwidth") else nan).double(),
                    "deadzone_width": (q.get_deadzone_width(w) if hasattr(q, "get_deadzone_width") else nan).double(),
                    "deadzone_fraction": (q.get_deadzone_fraction() if hasattr(q, "get_deadzone_fraction")
                                          else nan).double(),
                    "numel": torch.tensor(float(w_hat.numel()), dtype=torch.float64, device=self.device),
                }))
        return Named.rows(rows, self.device)

    @torch.no_grad()
    def bops_stats(self) -> Named:
        """A row per layer of ``bops_layers``, on the device: row_sparsity, the
        fraction of output channels whose ŵ is all zero, and bits, the
        bit-width of an enabled quantizer (NaN: none)."""
        rows = []
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=self.device)
        with parametrize.cached():
            for _, module, _, q in self.bops_layers:
                active = q is not None and q.enabled and hasattr(q, "get_bitwidth")
                rows.append(Named.of({
                    "row_sparsity": (module.weight.flatten(1).abs().amax(1) == 0).double().mean(),
                    "bits": q.get_bitwidth().to(self.device).double() if active else nan,
                }))
        return Named.rows(rows, self.device)

    def epoch_record(self, epoch: int, train: Named, val: Named, lrs: dict, seconds: float) -> dict:
        """The epoch's line of metrics.jsonl from the sums of :meth:`train_epoch`
        and :meth:`evaluate` and the model's state now."""
        with parametrize.cached():  # each quantizer once for all three
            layers, bops, meter = self.quant_stats(), self.bops_stats(), Named(METRICS, self.meter.values())
        t, v, compression, rows, b_rows = read(train, val, meter, layers, bops)  # the one device sync of the epoch
        n_t, n_v = max(t["count"], 1), max(v["count"], 1)
        rec = {
            "epoch": epoch + 1,
            "train_loss": t["loss"] / n_t,
            "train_ce": t["ce"] / n_t,
            "train_acc": t["correct"] / n_t,
            "train_loss_terms": {term.key: t[term.value_name] / n_t for term in self.loss_terms},
            "val_loss": v["ce"] / n_v,
            "val_acc": v["correct"] / n_v,
            "lr": lrs.get("base", next(iter(lrs.values()))),
            "lrs": lrs,
            "epoch_time": seconds,
            # the paper's relative BOPs (Eqs. 20-22), as the compression report counts them
            "relative_bops": compression["rel_bops"],
        }
        if self.bops_layers:
            b = relative_bops([{"name": name, "macs": macs, "row_sparsity": r["row_sparsity"],
                                "bits": _known(r["bits"])} for (name, _, macs, _), r in zip(self.bops_layers, b_rows)],
                              self.cfg.default_weight_bitrate, self.cfg.default_activation_bitrate)
            rec["published_bops"] = b["relative"]
            rec["published_bops_layers"] = b["layers"]
        if self.budget is not None:
            rec["budget"] = self.budget.record()
        if rows:
            total = sum(r["numel"] for r in rows)

            def mean(stat):
                vals = [r[stat] for r in rows if _known(r[stat]) is not None]
                return sum(vals) / len(vals) if vals else None

            rec.update({
                "sparsity_mean": mean("sparsity"),
                "sparsity_total": sum(r["sparsity"] * r["numel"] for r in rows) / total,
                "bits_mean": mean("bits"),
                "deadzone_width_mean": mean("deadzone_width"),
                "deadzone_fraction_mean": mean("deadzone_fraction"),
                "layers": {
                    # each statistic, NaN as None (sparsity as it is), numel an int
                    name: {**{k: _known(v) for k, v in r.items()}, "sparsity": r["sparsity"], "numel": int(r["numel"])}
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
                    both = self.dist.all_reduce_sum(torch.cat([train.data, val.data]))
                    k = len(train.names)
                    train, val = Named(train.names, both[:k]), Named(val.names, both[k:])
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
            # the b_a of the meter's relative BOPs (the epochs' relative_bops and a budget's metric)
            rep = compression_report(self.model, example_input(self.cfg.img_size).to(self.device),
                                     act_bits=self.meter.act_bits)
            out(format_report(rep))
            paths = save_report(rep, run_dir)
            out("report: " + ", ".join(str(p) for p in paths.values()))
            return rep
        except Exception as exc:
            warn(f"compression report failed: {type(exc).__name__}: {exc}")
            return None


def _known(x: float) -> float | None:
    """None for NaN (a quantizer without that notion), else x."""
    return x if x == x else None


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
