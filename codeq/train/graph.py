"""``cuda_graph: true`` (or ``auto`` on a CUDA device): the whole training step
replayed as one CUDA graph.

A small model's step is bound by the host: Python, autograd and a few hundred
kernel launches cost more than the kernels themselves (benchmarks/README.md
has the measured steps).  A graph launches the recorded kernels with one call.

How a step runs (``GraphStep.step``), per epoch:

1. the first ``warmup`` steps run eagerly on a side stream (what CUDA graph
   capture asks for: lazily created state -- optimizer moments, cuBLAS
   workspaces -- must exist before the capture);
2. the next step is captured -- zero_grad, forward, loss terms, backward and
   the optimizer step, on static copies of that batch -- and replayed once;
3. every later batch of the same shape is copied into the static inputs and
   the graph replayed; a batch of another shape (the last, smaller batch of
   an epoch) runs eagerly.

The graph is captured again at the start of every epoch, after the LR
scheduler has moved the learning rates (a graph holds the values it was
captured with).  Adam/AdamW run fused with ``capturable=True`` (their step
counters live on the device), so eager and replayed steps share one optimizer
state.  Every step, eager or replayed, is one real training step on its batch:
the warm-up trains too, nothing is run twice.

The capture runs in "thread_local" mode, so that other threads (the DataLoader's
pin-memory thread) may use CUDA meanwhile.  If the capture fails (some layer
synchronises with the host, say), a warning says why and the run goes on eagerly.
"""

from __future__ import annotations

import torch

from codeq.train.logging import warn

__all__ = ["GraphStep"]


class GraphStep:
    """Runs ``trainer.train_step`` through a CUDA graph (see the module doc)."""

    def __init__(self, trainer, warmup: int = 3):
        self.trainer = trainer
        self.warmup = int(warmup)
        self.stream = torch.cuda.Stream(trainer.device)
        self.failed = False
        self.captures = 0  # statistics, for tests and benchmarks
        self.replays = 0
        self.eager_steps = 0
        self.reset()

    def reset(self) -> None:
        """Drop the graph (its memory too); the next steps warm up and capture anew."""
        self.graph = None
        self.static_in = None
        self.static_out = None
        self.warm_left = self.warmup

    def step(self, x: torch.Tensor, y: torch.Tensor):
        tr = self.trainer
        if self.failed:
            self.eager_steps += 1
            return tr.train_step(x, y)
        if self.graph is None:
            if self.warm_left > 0:
                self.warm_left -= 1
                return self._side_stream_step(x, y)
            return self._capture(x, y)
        sx, sy = self.static_in
        if x.shape != sx.shape or y.shape != sy.shape or x.dtype != sx.dtype or y.dtype != sy.dtype:
            self.eager_steps += 1
            return tr.train_step(x, y)
        sx.copy_(x)
        sy.copy_(y)
        self.graph.replay()
        self.replays += 1
        return self.static_out.clone()  # the next replay overwrites static_out

    def _side_stream_step(self, x, y):
        cur = torch.cuda.current_stream(self.trainer.device)
        self.stream.wait_stream(cur)
        with torch.cuda.stream(self.stream):
            out = self.trainer.train_step(x, y)
        cur.wait_stream(self.stream)
        self.eager_steps += 1
        return out

    def _capture(self, x, y):
        tr = self.trainer
        self.static_in = (x.clone(), y.clone())
        graph = torch.cuda.CUDAGraph()
        tr.optimizer.zero_grad(set_to_none=True)
        try:
            # thread_local: only this thread is held to the capture's rules.  Under the
            # default "global" mode a CUDA call of any other thread -- the DataLoader's
            # pin-memory thread allocating pinned memory, say -- breaks the capture and
            # poisons that thread too.  A host sync in the step itself still fails it.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.static_out = tr.train_step(*self.static_in)
        except Exception as exc:  # noqa: BLE001 -- any failure: say why, train on eagerly
            first = str(exc).splitlines()[0] if str(exc) else ""
            warn(f"cuda_graph: the training step could not be captured as a CUDA graph "
                 f"({type(exc).__name__}: {first}); training on without one")
            self.failed = True
            self.reset()
            torch.cuda.synchronize(tr.device)
            self.eager_steps += 1
            return tr.train_step(x, y)
        self.graph = graph
        self.captures += 1
        graph.replay()  # capturing records the step; this runs it on this batch
        self.replays += 1
        return self.static_out.clone()
