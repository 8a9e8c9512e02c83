"""Training to a budget (``budget:`` in the config): one run that ends at a
target relative BOPs, sparsity, mean bit-width or export size, without a
search over λ.

The strengths of the dead-zone and bit-width regularisers are treated as one
Lagrange multiplier.  The config's strengths are the controller's unit: every
``update`` sets each controlled strength to ``u x`` its configured value, where
``u >= 0`` is the output of a PI controller on the normalised error between
the measured metric and a scheduled target (docs/TRAINING.md, "Training to a
budget", has the equations)::

    size(m)  = m for rel_bops, bits, size_bytes;  1 - m for sparsity (density)
    tau(p)   = the target at run progress p: from the start's value to the
               target, geometrically, by p = reach_by (milestones: in steps)
    e        = ln(size(m) / size(tau))        > 0: not compressed enough
    I       <- max(0, I + e dt)               dt: epochs since the last update
    u        = clip(kp e + ki I, 0, max_factor)   (I held where u would pass max_factor)

The controlled strengths (whichever the config sets above 0,
``Config.budget_strengths``): the weight decay of the ``dz`` / ``bit``
parameter groups and the ``lambda_dz`` / ``lambda_bit`` of ``theta_l2`` terms,
each written through a :class:`Setting` (``LossTerm.knob``,
:func:`group_setting`); ``sparsity`` moves the dead-zone ones, ``bits`` the
bit-width ones, ``rel_bops`` and ``size_bytes`` both (bit-width ones only with
learnable bit-widths).  The controller runs on the host at every progress
read of the trainer (each ``log_interval`` steps and at the end of an epoch),
on a metric computed on the device (:class:`codeq.report.CompressionMeter`).
"""

from __future__ import annotations

import math

__all__ = ["BudgetController", "Knob", "Setting", "group_setting", "size_of"]


def size_of(metric: str, value: float) -> float:
    """The quantity that falls as the model is compressed: density for
    sparsity, the value itself for the others."""
    return 1.0 - value if metric == "sparsity" else value


class Setting:
    """A handle on one value a budget steers: ``key`` of the dicts that
    ``where()`` returns, looked up at every access, so that it follows dicts
    that are replaced (``optimizer.load_state_dict`` replaces the param groups)."""

    def __init__(self, where, key: str):
        self.where, self.key = where, key

    def get(self):
        return self.where()[0][self.key]

    def set(self, value) -> None:
        for d in self.where():
            d[self.key] = value


def group_setting(optimizer, group: str, key: str) -> Setting:
    """The handle on hyper-parameter ``key`` (``weight_decay``) of the
    optimizer's param group named ``group`` (codeq/train/optim.py names them)."""
    return Setting(lambda: [g for g in optimizer.param_groups if g.get("name") == group], key)


class Knob:
    """One controlled strength: ``set(u)`` writes ``u x scale`` through
    ``setting`` (a :class:`Setting`, or anything with ``set(value)``)."""

    def __init__(self, name: str, scale: float, setting):
        self.name, self.scale, self.setting = name, float(scale), setting

    def set(self, u: float) -> float:
        value = u * self.scale
        self.setting.set(value)
        return value


class BudgetController:
    """The schedule, the PI controller and the milestones of one budget (see
    the module doc).  ``steps_per_epoch`` x ``epochs`` is the run's length;
    ``knobs`` are the strengths it writes.  All state is host floats and ints
    (:meth:`state_dict`), identical on every DDP rank given the same metric."""

    def __init__(self, cfg, knobs: list[Knob], epochs: int, steps_per_epoch: int):
        self.cfg = cfg
        self.metric = cfg.metric
        self.knobs = knobs
        self.epochs = int(epochs)
        self.steps_per_epoch = max(int(steps_per_epoch), 1)
        self.targets = list(cfg.milestones) if cfg.milestones else [cfg.target]
        self.start = None  # the metric before the first step
        self.integral = 0.0
        self.u = 0.0
        self.last_step = 0  # global step of the last update
        self.value = None  # the metric at the last update
        self.held_since = None  # global step since which the metric has held the current milestone
        self.saved: list[dict] = []  # milestones reached: {"target", "epoch", "value", "val_acc"}
        self.apply()

    # ------------------------------------------------------------ schedule --
    def _progress(self, step: int) -> float:
        return step / (self.epochs * self.steps_per_epoch)

    def _segment(self, p: float) -> tuple[int, float]:
        """(index of the target being approached or held, fraction of its ramp done)."""
        k = len(self.targets)
        seg = self.cfg.reach_by / k
        if p >= self.cfg.reach_by:
            return k - 1, 1.0
        # a segment owns its right end: the update that closes a hold still counts for its milestone
        i = min(max(math.ceil(p / seg - 1e-9) - 1, 0), k - 1)
        ramp = seg if k == 1 else seg / 3  # milestones: ramp a third of the segment, hold the rest
        return i, min(1.0, (p - i * seg) / ramp)

    def target_at(self, step: int) -> float:
        """The scheduled target after ``step`` global steps."""
        i, frac = self._segment(self._progress(step))
        end = size_of(self.metric, self.targets[i])
        begin = size_of(self.metric, self.start if i == 0 else self.targets[i - 1])
        begin = max(begin, end)  # already below it: hold the target, never ask for less compression
        size = begin * (end / begin) ** frac if begin > 0 and end > 0 else end
        return size_of(self.metric, size)  # size_of is its own inverse

    # ------------------------------------------------------------ control --
    def error(self, value: float, target: float) -> float:
        """ln(size(value) / size(target)); > 0 while not compressed enough."""
        s, t = size_of(self.metric, value), size_of(self.metric, target)
        tiny = 1e-12
        return math.log(max(s, tiny) / max(t, tiny))

    def begin(self, value: float) -> None:
        """The metric before the first step (the schedule's starting point)."""
        if self.start is None:
            self.start = float(value)
            self.value = float(value)

    def update(self, value: float, step: int) -> float:
        """One controller step at global ``step`` with the measured metric;
        writes the knobs and returns u."""
        if self.start is None:
            self.begin(value)
        dt = (step - self.last_step) / self.steps_per_epoch
        target = self.target_at(step)
        e = self.error(value, target)
        kp, ki, top = self.cfg.kp, self.cfg.ki, self.cfg.max_factor
        integral = max(0.0, self.integral + e * dt)
        if ki > 0:  # anti-windup: the integral stops where u would pass max_factor
            integral = min(integral, max(0.0, (top - kp * e) / ki))
        self.integral = integral
        self.u = min(top, max(0.0, kp * e + ki * integral))
        i, frac = self._segment(self._progress(step))
        # held: the schedule sits at the milestone and the metric is within tolerance of it or past it
        # (training compresses a model on its own too, and λ >= 0 cannot pull it back)
        if frac >= 1.0 and self.error(value, self.targets[i]) <= math.log1p(self.cfg.tolerance) \
                and all(s["target"] != self.targets[i] for s in self.saved):
            self.held_since = step if self.held_since is None else self.held_since
        else:
            self.held_since = None
        self.last_step, self.value = step, float(value)
        self.apply()
        return self.u

    @property
    def saturated(self) -> bool:
        """Whether u is at max_factor (the metric is not following however hard it pulls)."""
        return self.u >= self.cfg.max_factor

    def apply(self) -> dict:
        """Write u into every knob; {knob name: strength}."""
        return {k.name: k.set(self.u) for k in self.knobs}

    def lambdas(self) -> dict:
        return {k.name: self.u * k.scale for k in self.knobs}

    # --------------------------------------------------------- milestones --
    def milestone_due(self) -> float | None:
        """The milestone to save now (at an epoch's end): the current target of
        a ``milestones`` budget once the metric has stayed within ``tolerance``
        of it, or below it, for an epoch; None otherwise."""
        if not self.cfg.milestones or self.held_since is None \
                or self.last_step - self.held_since < self.steps_per_epoch:
            return None
        i, _ = self._segment(self._progress(self.last_step))
        return self.targets[i]

    def mark_saved(self, target: float, epoch: int, val_acc: float) -> dict:
        rec = {"target": target, "epoch": int(epoch), "value": self.value, "val_acc": float(val_acc)}
        self.saved.append(rec)
        self.held_since = None
        return rec

    # -------------------------------------------------------------- state --
    def record(self) -> dict:
        """What the epoch record logs: the metric, the scheduled and final
        targets, u and each controlled strength."""
        return {"metric": self.metric, "value": self.value, "target": self.target_at(self.last_step),
                "final_target": self.targets[-1], "u": self.u, "lambdas": self.lambdas()}

    def summary(self) -> dict:
        """The end of the run: final target, reached value, relative error, milestones."""
        target = self.targets[-1]  # above 0 for every metric (BudgetConfig.validate)
        err = (self.value - target) / target
        saved = {s["target"] for s in self.saved}
        return {"metric": self.metric, "target": target, "reached": self.value, "relative_error": err,
                "within_tolerance": abs(err) <= self.cfg.tolerance,
                "milestones": list(self.saved),
                "missed_milestones": [t for t in self.cfg.milestones if t not in saved]}

    def state_dict(self) -> dict:
        return {"start": self.start, "integral": self.integral, "u": self.u, "last_step": self.last_step,
                "value": self.value, "held_since": self.held_since, "saved": [dict(s) for s in self.saved]}

    def load_state_dict(self, state: dict) -> None:
        self.start = state["start"]
        self.integral = float(state["integral"])
        self.u = float(state["u"])
        self.last_step = int(state["last_step"])
        self.value = state["value"]
        self.held_since = state["held_since"]
        self.saved = [dict(s) for s in state["saved"]]
        self.apply()
