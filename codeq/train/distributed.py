"""Multi-GPU / multi-node training with ``torchrun`` (DistributedDataParallel).

The same config runs on one process or on many::

    python run_training.py --config C.yaml                               # 1 process
    torchrun --nproc_per_node 4 run_training.py --config C.yaml          # 4 processes, DDP

``distributed: auto`` (the default) turns DDP on when torchrun's environment
says ``WORLD_SIZE > 1``; ``distributed: true`` forces it (a one-process group
when not launched by torchrun); ``distributed: false`` refuses a multi-process
launch.  What each process does:

* process group from torchrun's environment (``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``): ``cpu:gloo,cuda:nccl`` on a
  machine with CUDA (NCCL carries the training traffic of a CUDA run, gloo the
  few CPU-side messages), ``gloo`` otherwise, with a finite timeout
  (``dist_timeout_min``);
* a CUDA run uses ``cuda:LOCAL_RANK``;
* ``batch_size`` is per process (global batch = batch_size x world size); the
  learning rate is not rescaled;
* training samples come from :class:`codeq.train.sampling.EpochDistributedSampler`
  (the permutation of ``(seed, epoch)`` a single process uses, dealt out
  round-robin), validation from :class:`codeq.train.sampling.ShardSampler`
  (every image exactly once, no padding);
* epoch sums (loss, correct, count) are all-reduced, so the metrics are those
  of the whole data set; only rank 0 writes files, logs and prints.

Setup errors (config, device, data set, checkpoint) are agreed on by all ranks
(:meth:`DistContext.agree`) before any other collective, so a mistake that only
one node sees still gives one ``error: ...`` line (from rank 0) and exit code 2
on every rank instead of a hang.
"""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils import parametrize

from codeq.errors import ConfigError

__all__ = [
    "LaunchEnv",
    "DistContext",
    "launch_env",
    "wants_distributed",
    "init_distributed",
    "resolve_device",
    "DEFAULT_TIMEOUT_MIN",
]

DEFAULT_TIMEOUT_MIN = 30.0
# Test-only hook: a rank whose number equals this variable raises at its first
# training step (tests/test_train_ddp.py checks that the whole job then exits).


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher (torchrun) put into the environment."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launched: bool = False  # WORLD_SIZE was set


def _env_int(name: str, default: int | None) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer (set by torchrun)") from None


def launch_env() -> LaunchEnv:
    """RANK / WORLD_SIZE / LOCAL_RANK from the environment (torchrun sets them)."""
    world = _env_int("WORLD_SIZE", None)
    if world is None:
        return LaunchEnv()
    rank = _env_int("RANK", None)
    local = _env_int("LOCAL_RANK", None)
    if world < 1 or rank is None or not 0 <= rank < world:
        raise ConfigError(
            f"WORLD_SIZE={world} needs RANK in 0..{world - 1} (got {rank}); launch with torchrun, "
            "which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT"
        )
    return LaunchEnv(rank=rank, world_size=world, local_rank=local if local is not None else 0, launched=True)


def wants_distributed(setting, env: LaunchEnv) -> bool:
    """The config's ``distributed`` (``"auto"``, True, False) against the launch."""
    if setting == "auto":
        return env.world_size > 1
    if setting is False and env.world_size > 1:
        raise ConfigError(
            f"distributed is false but this process is one of WORLD_SIZE={env.world_size} launched by torchrun; "
            "run without torchrun, or set distributed: auto"
        )
    return bool(setting)


class DistContext:
    """This process's place in the job; a single-process stand-in when
    ``enabled`` is False (every method is then a no-op)."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, enabled: bool = False,
                 backend: str | None = None, timeout_min: float | None = None):
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank
        self.enabled = enabled
        self.backend = backend
        self.timeout_min = timeout_min

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def __repr__(self) -> str:
        return (f"DistContext(rank={self.rank}, world_size={self.world_size}, local_rank={self.local_rank}, "
                f"enabled={self.enabled}, backend={self.backend!r})")

    # ------------------------------------------------------ collectives --
    def agree(self, err: BaseException | None) -> None:
        """Every rank calls this once after its setup with its ConfigError (or
        None).  If any rank failed, rank 0 prints ``error: <message>`` (the
        lowest failing rank's message) and all raise that ConfigError, marked
        ``printed``."""
        if not self.enabled:
            if err is not None:
                raise err
            return
        msgs: list = [None] * self.world_size
        dist.all_gather_object(msgs, None if err is None else str(err))
        failed = [(r, m) for r, m in enumerate(msgs) if m is not None]
        if not failed:
            return
        r, m = failed[0]
        everywhere = len(failed) == self.world_size and all(x == m for _, x in failed)
        exc = ConfigError(m if everywhere else f"{m} (on rank {r})")
        if self.is_main:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        # Nobody leaves before rank 0 has printed (torchrun kills the other ranks
        # as soon as the first one exits).
        dist.all_gather_object([None] * self.world_size, None)
        exc.printed = True
        raise exc

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled and self.world_size > 1:
            t = t.clone()
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def close(self) -> None:
        """Destroy the process group (best effort; never raises)."""
        if not self.enabled:
            return
        self.enabled = False
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass

    # ----------------------------------------------------------- model --
    def wrap(self, model: nn.Module, device: torch.device, sync_bn: bool = False) -> nn.Module:
        """``model`` (already on ``device``, identical init on every rank)
        wrapped in DistributedDataParallel; BatchNorm converted to SyncBatchNorm
        first when ``sync_bn``.  The returned wrapper is only for the training
        forward pass; state dicts, loss terms and evaluation use ``model``."""
        if sync_bn:
            convert_sync_bn(model, device, self.world_size)
        kwargs = {}
        if device.type == "cuda":
            kwargs = dict(device_ids=[device.index], output_device=device.index)
        # find_unused_parameters=False: every trainable parameter (weights via the
        # parametrization originals, logit_dz, logit_bit) gets a gradient each step.
        return DistributedDataParallel(model, find_unused_parameters=False, **kwargs)  # buffers: synced from rank 0 (default)


def check_sync_bn(model: nn.Module, device: torch.device, world_size: int) -> None:
    """ConfigError when ``sync_bn: true`` cannot work for this model/device."""
    bns = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for name, m in bns:
        if parametrize.is_parametrized(m):
            raise ConfigError(
                f"sync_bn: true needs the batch norms left unquantized, but '{name}' is quantized; "
                "add it to quantizer.exclude_layers (e.g. [bn])"
            )
    if bns and world_size > 1 and device.type == "cpu":
        raise ConfigError("sync_bn: true needs CUDA devices (SyncBatchNorm does not run on the CPU); "
                          "set sync_bn: false or use --device cuda")


def convert_sync_bn(model: nn.Module, device: torch.device, world_size: int) -> nn.Module:
    """Replace every BatchNorm by SyncBatchNorm in place (same parameters and
    buffers, so optimizer and state-dict keys are unchanged)."""
    check_sync_bn(model, device, world_size)
    if isinstance(model, nn.modules.batchnorm._BatchNorm):
        raise ConfigError("sync_bn: true needs a model that is not itself a single BatchNorm layer")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)  # converts the children in place


def _backend() -> str:
    if torch.cuda.is_available() and dist.is_nccl_available():
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def init_distributed(env: LaunchEnv, enabled: bool, timeout_min: float | None = None) -> DistContext:
    """Initialise the default process group when ``enabled`` (from torchrun's
    environment; a one-process group when not launched by torchrun).  Returns
    the context; a disabled one when not ``enabled``."""
    if not enabled:
        return DistContext(env.rank, env.world_size, env.local_rank, enabled=False)
    if not dist.is_available():
        raise ConfigError("distributed training requested but this PyTorch build has no torch.distributed")
    timeout_min = DEFAULT_TIMEOUT_MIN if timeout_min is None else float(timeout_min)
    timeout = datetime.timedelta(minutes=timeout_min)
    # NCCL: let the watchdog abort a collective that exceeds the timeout and bring
    # the process down (instead of hanging forever).  Torch >= 2.2 defaults to this.
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    backend = _backend()
    if env.launched:
        for k in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(k):
                raise ConfigError(f"WORLD_SIZE is set but {k} is not; launch with torchrun")
        dist.init_process_group(backend=backend, init_method="env://", rank=env.rank,
                                world_size=env.world_size, timeout=timeout)
    else:  # distributed: true without torchrun: a group of one
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return DistContext(env.rank, env.world_size, env.local_rank, enabled=True, backend=backend,
                       timeout_min=timeout_min)


def resolve_device(name: str, ctx: DistContext | None = None) -> torch.device:
    """The torch.device of this process for a config's ``device``; ConfigError
    when it is not available here.  Under DDP, ``cuda`` / ``cuda:N`` become
    ``cuda:LOCAL_RANK`` (made the current device)."""
    distributed = ctx is not None and ctx.enabled
    if name == "mps":
        if distributed:
            raise ConfigError("distributed training does not support device 'mps'; use cuda or cpu")
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError("device 'mps' requested but MPS is not available (it needs a Mac with Apple silicon); "
                              "use --device cpu")
        return torch.device("mps")
    if not name.startswith("cuda"):
        return torch.device(name)
    if not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' requested but no CUDA GPU is available here; use --device cpu")
    n = torch.cuda.device_count()
    if distributed:
        if ctx.local_rank >= n:
            raise ConfigError(
                f"LOCAL_RANK {ctx.local_rank} needs cuda:{ctx.local_rank} but this node has {n} CUDA device(s); "
                f"use torchrun --nproc_per_node {n} or fewer"
            )
        dev = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(dev)
        return dev
    dev = torch.device(name)
    if dev.index is not None and dev.index >= n:
        raise ConfigError(f"device '{name}' requested but only {n} CUDA device(s) exist; use --device cuda:0 or "
                          "--device cpu")
    return dev

