"""Run directory, metrics.jsonl, console output (tqdm on a TTY, plain lines
otherwise) and optional Weights & Biases logging.

wandb is installed by ``make install`` (``pip install .[wandb]``); with
``wandb_project`` set and wandb missing, not logged in, or unreachable, the run
prints ONE warning and goes on (offline, or without wandb).  It never waits on the network for long: wandb.init gets a
bounded ``init_timeout``.
"""

from __future__ import annotations

import json
import os
import sys
import time

from codeq._io import json_safe
from codeq.train.config import Config

__all__ = ["warn", "make_run_dir", "is_run_dir", "Console", "MetricsFile", "WandbLogger", "WANDB_INIT_TIMEOUT"]

WANDB_INIT_TIMEOUT = 20  # seconds


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def make_run_dir(cfg: Config, config_path: str | None) -> str:
    """``save_dir/<run_name or config stem>-<YYYYmmdd-HHMMSS>`` (``-2``, ``-3``, ...
    appended if that exists)."""
    stem = cfg.run_name or (os.path.splitext(os.path.basename(config_path))[0] if config_path else cfg.model)
    base = os.path.join(cfg.save_dir, f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    path, n = base, 1
    while True:
        try:
            os.makedirs(path, exist_ok=False)
            return path
        except FileExistsError:
            n += 1
            path = f"{base}-{n}"


def is_run_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.yaml"))


class MetricsFile:
    """``metrics.jsonl``: one JSON object per completed epoch."""

    def __init__(self, run_dir: str, keep_epochs: int | None = None):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        if keep_epochs is not None and os.path.isfile(self.path):
            # Resuming: drop lines of epochs the checkpoint does not contain.
            with open(self.path, encoding="utf-8") as f:
                lines = [ln for ln in f if ln.strip()]
            kept = []
            for ln in lines:
                try:
                    if int(json.loads(ln).get("epoch", 0)) <= keep_epochs:
                        kept.append(ln if ln.endswith("\n") else ln + "\n")
                except (ValueError, AttributeError):
                    continue
            with open(self.path, "w", encoding="utf-8") as f:
                f.writelines(kept)

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(json_safe(record)) + "\n")
            f.flush()


class Console:
    """tqdm bars over epochs and batches when stderr is a TTY, plain lines otherwise."""

    def __init__(self, epochs: int, start_epoch: int = 0, tty: bool | None = None):
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.epoch_bar = None
        self.batch_bar = None
        if self.tty:
            from tqdm import tqdm

            self._tqdm = tqdm
            self.epoch_bar = tqdm(total=epochs, initial=start_epoch, desc="epochs", position=0, dynamic_ncols=True)

    def line(self, msg: str) -> None:
        if self.tty:
            self._tqdm.write(msg)
        else:
            print(msg, flush=True)

    def start_epoch(self, epoch: int, epochs: int, n_batches: int) -> None:
        if self.tty:
            self.batch_bar = self._tqdm(
                total=n_batches, desc=f"epoch {epoch + 1}/{epochs}", position=1, leave=False, dynamic_ncols=True
            )

    def batch(self, n: int = 1) -> None:
        if self.batch_bar is not None:
            self.batch_bar.update(n)

    def progress(self, epoch: int, epochs: int, step: int, n_batches: int, loss: float, acc: float) -> None:
        if self.batch_bar is not None:
            self.batch_bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.3f}")
        else:
            self.line(f"epoch {epoch + 1}/{epochs} batch {step}/{n_batches} loss {loss:.4f} acc {acc:.3f}")

    def end_epoch(self) -> None:
        if self.batch_bar is not None:
            self.batch_bar.close()
            self.batch_bar = None
        if self.epoch_bar is not None:
            self.epoch_bar.update(1)

    def close(self) -> None:
        for bar in (self.batch_bar, self.epoch_bar):
            if bar is not None:
                bar.close()
        self.batch_bar = self.epoch_bar = None


class WandbLogger:
    """A wandb run when ``cfg.wandb_project`` is set and wandb works; a no-op
    otherwise.  Mode: env ``WANDB_MODE``, else ``cfg.wandb_mode``, else online."""

    def __init__(self, cfg: Config, run_dir: str, run_name: str, config_dict: dict):
        self.run = None
        self.wandb = None
        if not cfg.wandb_project:
            return
        mode = os.environ.get("WANDB_MODE") or cfg.wandb_mode or "online"
        if mode not in ("online", "offline", "disabled"):
            warn(f"WANDB_MODE={mode!r} is not online/offline/disabled; using offline")
            mode = "offline"
        if mode == "disabled":
            return
        try:
            import wandb  # optional dependency
        except Exception as exc:  # ImportError, or a broken install
            warn(f"wandb_project is set but wandb cannot be imported ({type(exc).__name__}); "
                 "logging to metrics.jsonl only (pip install wandb)")
            return
        note = None
        if mode == "online" and not self._logged_in(wandb):
            note = "no wandb login found (run `wandb login` or set WANDB_API_KEY); logging offline to the run directory"
            mode = "offline"
        kwargs = dict(project=cfg.wandb_project, name=run_name, config=config_dict, dir=run_dir)
        try:
            self.run = self._init(wandb, mode, kwargs)
        except Exception as exc:
            if mode == "online":
                try:
                    self.run = self._init(wandb, "offline", kwargs)
                    note = f"wandb online init failed ({_first_line(exc)}); logging offline to the run directory"
                except Exception as exc2:
                    note = f"wandb init failed ({_first_line(exc2)}); logging to metrics.jsonl only"
            else:
                note = f"wandb init failed ({_first_line(exc)}); logging to metrics.jsonl only"
        if note:
            warn(note)
        if self.run is not None:
            self.wandb = wandb

    @staticmethod
    def _logged_in(wandb) -> bool:
        if os.environ.get("WANDB_API_KEY"):
            return True
        try:  # the stored credentials, no prompt, no network
            return bool(wandb.login(prompt=False, verify=False))
        except Exception:
            return True  # cannot tell: try online, fall back to offline on failure

    @staticmethod
    def _init(wandb, mode: str, kwargs: dict):
        try:
            settings = wandb.Settings(init_timeout=WANDB_INIT_TIMEOUT)
        except Exception:
            settings = None
        extra = {"settings": settings} if settings is not None else {}
        return wandb.init(mode=mode, **kwargs, **extra)

    def log(self, record: dict, step: int) -> None:
        if self.run is None:
            return
        flat = {}

        def put(prefix: str, v) -> None:  # nested mappings as "a/b/c" keys
            if isinstance(v, dict):
                for k, x in v.items():
                    put(f"{prefix}/{k}", x)
            else:
                flat[prefix] = v

        for k, v in record.items():
            put("lr" if k == "lrs" else k, v)
        try:
            self.run.log(json_safe(flat), step=step)
        except Exception as exc:
            warn(f"wandb log failed ({_first_line(exc)}); wandb logging stopped")
            self.run = None

    def finish(self) -> None:
        if self.run is not None:
            try:
                self.run.finish()
            except Exception:
                pass
            self.run = None


def _first_line(exc: BaseException) -> str:
    s = str(exc).strip()
    return f"{type(exc).__name__}: {s.splitlines()[0]}" if s else type(exc).__name__
