"""Values that travel together as one tensor and are read by name.

A training step's losses and correct count, an epoch's sums, the layers'
statistics: each is made as ``{name: 0-d tensor}`` where it is computed and
stacked into one device tensor, so that the host reads it once (per
``log_interval``, per epoch) and nothing reads it by position.  Adding a value
is one entry where it is made plus its use where it is read::

    step = Named.of({"loss": loss, "ce": ce, "correct": correct})
    (rec,) = read(step)            # one host read: {"loss": ..., "ce": ..., "correct": ...}
"""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["Named", "read"]


@dataclasses.dataclass(frozen=True, eq=False)
class Named:
    """``data``'s last dimension holds one value per name of ``names``; a
    leading dimension, if any, holds rows (steps of a window, layers)."""

    names: tuple[str, ...]
    data: torch.Tensor

    @classmethod
    def of(cls, values: dict) -> "Named":
        """One row from {name: 0-d tensor} (of one dtype: the caller picks it)."""
        return cls(tuple(values), torch.stack(list(values.values())))

    @classmethod
    def rows(cls, rows: list["Named"], device=None) -> "Named":
        """Rows of the same names stacked into one tensor; none: no names, no rows
        (float64 on ``device``)."""
        if not rows:
            return cls((), torch.zeros(0, 0, dtype=torch.float64, device=device))
        return cls(rows[0].names, torch.stack([r.data for r in rows]))

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.data[..., self.names.index(name)]

    def clone(self) -> "Named":
        return Named(self.names, self.data.clone())


def read(*groups: Named) -> list:
    """The values of ``groups`` on the host with one device read: a group of
    one row as {name: float}, a group of rows as a list of those."""
    flat = torch.cat([g.data.reshape(-1) for g in groups]).cpu().tolist()
    out, at = [], 0
    for g in groups:
        n, width = g.data.numel(), len(g.names) or 1
        rows = [dict(zip(g.names, flat[i:i + width])) for i in range(at, at + n, width)]
        out.append(rows if g.data.dim() > 1 else (rows[0] if rows else {}))
        at += n
    return out
