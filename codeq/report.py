"""Compression report of a (quantized) model: sparsity, bit-widths, MACs and
bit operations (BOPs, arXiv 2512.12981 Eqs. 20-22).

Per layer (every nn.Linear / conv layer, plus any other module whose
``weight`` carries a quantizer)::

    MACs      dense multiply-accumulates per sample
              conv : out_numel_per_sample * in_channels/groups * prod(kernel)
              linear: in_features * out_features * rows, rows = out_numel / out_features
                      (the token count for the linears of a ViT)
    density   nonzero / params  (nonzero = count of ŵ != 0)
    BOPs      MACs * density * b_w * b_a
    dense     MACs * 32 * 32
    relative  Σ BOPs / Σ dense BOPs   (the paper's metric)
    storage   Σ params * b_w * density   (bits)

``b_w`` is the quantizer's bit-width (32 for a layer without a quantizer; a
disabled quantizer keeps its bit-width and is flagged ``enabled=False``),
``b_a`` the activation bit-width (``act_bits``, default 32).

Command line: ``python -m codeq.report CHECKPOINT [--out DIR] [--act-bits 32]``.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys

import torch
from torch import nn
from torch.nn.utils import parametrize

from codeq._io import atomic_write_bytes, json_safe
from codeq.checkpoint import load_model
from codeq.errors import ConfigError
from codeq.models import example_input
from codeq.parametrize import iter_quantizers

__all__ = ["compression_report", "format_report", "render_png", "save_report", "main", "ReportError"]

DENSE_BITS = 32


class ReportError(RuntimeError):
    """A report could not be made (bad checkpoint, bad input)."""


# -------------------------------------------------------------- helpers --
def _layer_kind(m: nn.Module) -> str | None:
    if isinstance(m, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(m, nn.Linear):
        return "linear"
    return None


def _type_name(m: nn.Module) -> str:
    cls = type(m)
    if parametrize.is_parametrized(m) and cls.__bases__ and cls.__name__.startswith("Parametrized"):
        cls = cls.__bases__[0]
    return cls.__name__


def _quantizer_bits(q: nn.Module) -> float:
    if hasattr(q, "get_bitwidth"):
        return float(q.get_bitwidth())
    if hasattr(q, "bitwidth"):
        return float(q.bitwidth)
    return float(DENSE_BITS)


def _batch_size(x) -> int:
    if isinstance(x, torch.Tensor):
        return int(x.shape[0]) if x.dim() > 0 else 1
    if isinstance(x, (tuple, list)):
        for t in x:
            if isinstance(t, torch.Tensor):
                return _batch_size(t)
    if isinstance(x, dict):
        for t in x.values():
            if isinstance(t, torch.Tensor):
                return _batch_size(t)
    raise ReportError("compression_report: example_input must be a tensor (or a tuple/list/dict holding one)")


def _call(model: nn.Module, x):
    if isinstance(x, dict):
        return model(**x)
    if isinstance(x, (tuple, list)):
        return model(*x)
    return model(x)


def _out_numel(out) -> int:
    if isinstance(out, torch.Tensor):
        return out.numel()
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0].numel()
    return 0


# --------------------------------------------------------------- report --
def compression_report(model: nn.Module, example_input, act_bits: int = 32) -> dict:
    """Per-layer and total sparsity, bit-widths, MACs and BOPs of ``model``.

    Runs one forward pass of ``example_input`` (eval mode, no grad) with hooks
    on the layers to measure their output sizes; numbers are per sample
    (divided by the batch size of ``example_input``).  The modules' train/eval
    flags are restored afterwards.  Returns a JSON-serialisable dict with keys
    ``layers`` (list, module order), ``totals``, ``act_bits``, ``batch_size``.
    """
    if isinstance(act_bits, bool) or not float(act_bits) > 0:
        raise ReportError(f"compression_report: act_bits must be a positive number, got {act_bits!r}")
    act_bits = float(act_bits)
    batch = _batch_size(example_input)
    if batch <= 0:
        raise ReportError("compression_report: example_input has batch size 0")

    quantizers = {}
    for name, module, q in iter_quantizers(model):
        quantizers.setdefault(id(module), (name, q))

    targets = []  # (name, module, kind)
    for name, m in model.named_modules():
        kind = _layer_kind(m)
        if kind is None and id(m) not in quantizers:
            continue
        if kind is None and not isinstance(getattr(m, "weight", None), torch.Tensor):
            continue
        targets.append((name, m, kind))

    out_numel = {id(m): 0 for _, m, _ in targets}
    calls = {id(m): 0 for _, m, _ in targets}

    def hook(mod, inp, out):
        out_numel[id(mod)] += _out_numel(out)
        calls[id(mod)] += 1

    handles = [m.register_forward_hook(hook) for _, m, k in targets if k is not None]
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad(), parametrize.cached():
            _call(model, example_input)
            rows = []
            for index, (name, m, kind) in enumerate(targets):
                rows.append(_layer_row(index, name, m, kind, quantizers.get(id(m)), out_numel[id(m)], calls[id(m)],
                                       batch, act_bits))
    finally:
        for h in handles:
            h.remove()
        for m, t in modes:
            m.training = t

    return {"act_bits": act_bits, "batch_size": batch, "layers": rows, "totals": _totals(rows)}


def _layer_row(index, name, m, kind, qinfo, numel_out, ncalls, batch, act_bits) -> dict:
    w = m.weight.detach()
    params = int(w.numel())
    nonzero = int(torch.count_nonzero(w))
    row = {
        "index": index,
        "name": name or "(model)",
        "type": _type_name(m),
        "shape": list(w.shape),
        "params": params,
        "nonzero": nonzero,
        "density": nonzero / params if params else 0.0,
        "sparsity": 1.0 - nonzero / params if params else 0.0,
        "quantizer": None,
        "enabled": None,
        "bits": float(DENSE_BITS),
        "deadzone_fraction": None,
        "calls": ncalls,
    }
    if qinfo is not None:
        q = qinfo[1]
        row["quantizer"] = type(q).__name__
        row["enabled"] = bool(getattr(q, "enabled", True))
        row["bits"] = _quantizer_bits(q)
        if hasattr(q, "get_deadzone_fraction"):
            row["deadzone_fraction"] = float(q.get_deadzone_fraction())

    out_per_sample = numel_out / batch
    if kind == "conv":
        k = math.prod(m.kernel_size) if isinstance(m.kernel_size, tuple) else int(m.kernel_size)
        macs = out_per_sample * (m.in_channels // m.groups) * k
        row["rows"] = None
    elif kind == "linear":
        rows_ = out_per_sample / m.out_features if m.out_features else 0.0
        macs = m.in_features * m.out_features * rows_
        row["rows"] = rows_
    else:
        macs = 0.0
        row["rows"] = None
    row["macs"] = float(macs)
    row["bops"] = float(macs * row["density"] * row["bits"] * act_bits)
    row["dense_bops"] = float(macs * DENSE_BITS * DENSE_BITS)
    row["storage_bits"] = float(params * row["bits"] * row["density"])
    return row


def _totals(rows) -> dict:
    params = sum(r["params"] for r in rows)
    nonzero = sum(r["nonzero"] for r in rows)
    macs = sum(r["macs"] for r in rows)
    bops = sum(r["bops"] for r in rows)
    dense = sum(r["dense_bops"] for r in rows)
    storage = sum(r["storage_bits"] for r in rows)
    rel = bops / dense if dense else None
    return {
        "layers": len(rows),
        "params": params,
        "nonzero": nonzero,
        "sparsity": 1.0 - nonzero / params if params else 0.0,
        "macs": macs,
        "bops": bops,
        "dense_bops": dense,
        "relative_bops": rel,
        "storage_bits": storage,
        "dense_storage_bits": float(params * DENSE_BITS),
        "compression_ratio": (params * DENSE_BITS / storage) if storage else None,
    }


# ---------------------------------------------------------------- text --
def _human(x, unit: str = "") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    x = float(x)
    for div, suf in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.3g} {suf}{unit}" if unit else f"{x / div:.3g}{suf}"
    if x == int(x):
        return f"{int(x)}{(' ' + unit) if unit else ''}"
    return f"{x:.3g}{(' ' + unit) if unit else ''}"


def format_report(report: dict) -> str:
    """The report as an aligned text table, one row per layer and a total row,
    ending with the line ``relative BOPs: R (1/X of a dense 32-bit model)``."""
    head = ["#", "layer", "type", "params", "nonzero", "sparsity", "bits", "dz", "MACs", "BOPs", "rel"]
    table = [head]
    for r in report["layers"]:
        bits = f"{r['bits']:g}" + ("*" if r["enabled"] is False else "")
        table.append([
            str(r["index"]), r["name"], r["type"], _human(r["params"]), _human(r["nonzero"]),
            f"{r['sparsity']:.2%}", bits,
            "-" if r["deadzone_fraction"] is None else f"{r['deadzone_fraction']:.3f}",
            _human(r["macs"]), _human(r["bops"]),
            "-" if not r["dense_bops"] else f"{r['bops'] / r['dense_bops']:.4f}",
        ])
    t = report["totals"]
    rel = t["relative_bops"]
    table.append([
        "", "total", "", _human(t["params"]), _human(t["nonzero"]), f"{t['sparsity']:.2%}", "", "",
        _human(t["macs"]), _human(t["bops"]), "-" if rel is None else f"{rel:.4f}",
    ])
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    left = {1, 2}

    def fmt(row):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    sep = "-" * len(fmt(head))
    lines = [fmt(head), sep] + [fmt(r) for r in table[1:-1]] + [sep, fmt(table[-1])]
    lines.append(
        f"activation bits: {report['act_bits']:g}   weight storage: {_human(t['storage_bits'] / 8, 'B')} "
        f"(dense fp32 {_human(t['dense_storage_bits'] / 8, 'B')})   dense BOPs: {_human(t['dense_bops'], 'BOPs')}   "
        f"BOPs: {_human(t['bops'], 'BOPs')}"
    )
    if any(r["enabled"] is False for r in report["layers"]):
        lines.append("* quantizer disabled (bits shown are the quantizer's; the layer runs in float)")
    if rel is None:
        lines.append("relative BOPs: n/a (no MACs measured)")
    elif rel == 0:
        lines.append("relative BOPs: 0 (every weight pruned)")
    else:
        lines.append(f"relative BOPs: {rel:.4g} (1/{1 / rel:.1f} of a dense 32-bit model)")
    return "\n".join(lines)


# ---------------------------------------------------------------- files --
def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def render_png(report: dict, width: int = 1000):
    """A PIL image: per-layer sparsity (top panel) and weight bit-width (bottom panel)."""
    from PIL import Image, ImageDraw

    rows = report["layers"]
    n = max(len(rows), 1)
    ml, mr, top, panel_h, gap, bottom = 70, 20, 70, 230, 70, 60
    height = top + 2 * panel_h + gap + bottom
    img = Image.new("RGB", (width, height), "white")
    dr = ImageDraw.Draw(img)
    f_title, f_axis, f_tick = _font(20), _font(15), _font(12)
    t = report["totals"]
    rel = t["relative_bops"]
    title = "codeq compression report"
    if rel:
        title += f"  -  relative BOPs {rel:.4g} (1/{1 / rel:.1f}), sparsity {t['sparsity']:.1%}"
    dr.text((ml, 12), title, fill="black", font=f_title)

    max_bits = max([r["bits"] for r in rows] + [8.0])
    max_bits = float(2 ** math.ceil(math.log2(max_bits)))
    plot_w = width - ml - mr
    slot = plot_w / n
    bar_w = min(60.0, max(1.0, slot * 0.7))
    label_every = max(1, math.ceil(n / (plot_w / 28)))
    blue, orange, grey = (52, 101, 164), (230, 126, 34), (170, 170, 170)

    def panel(y0, key, vmax, color, ylabel, ticks, fmt):
        y1 = y0 + panel_h
        for v in ticks:
            y = y1 - v / vmax * panel_h
            dr.line([ml - 5, y, ml, y], fill="black")
            dr.line([ml + 1, y, ml + plot_w - 1, y], fill=(230, 230, 230))
            txt = fmt(v)
            tw = dr.textlength(txt, font=f_tick)
            dr.text((ml - 8 - tw, y - 7), txt, fill="black", font=f_tick)
        dr.text((ml, y0 - 22), ylabel, fill="black", font=f_axis)
        for i, r in enumerate(rows):
            v = r[key]
            x0 = ml + i * slot + (slot - bar_w) / 2
            h = min(max(v, 0.0), vmax) / vmax * panel_h
            c = color if (r["quantizer"] is not None and r["enabled"] is not False) or key == "sparsity" else grey
            if h > 0:
                dr.rectangle([x0, y1 - h, x0 + bar_w, y1], fill=c)
            if i % label_every == 0:
                s = str(r["index"])
                tw = dr.textlength(s, font=f_tick)
                dr.text((x0 + bar_w / 2 - tw / 2, y1 + 4), s, fill="black", font=f_tick)
        dr.rectangle([ml, y0, ml + plot_w, y1], outline="black")

    panel(top, "sparsity", 1.0, blue, "sparsity (fraction of weights exactly 0)",
          [0, 0.25, 0.5, 0.75, 1.0], lambda v: f"{v:.2f}")
    bt = [max_bits * k / 4 for k in range(5)]
    panel(top + panel_h + gap, "bits", max_bits, orange, "weight bit-width", bt, lambda v: f"{v:g}")
    y_leg = height - bottom + 22
    dr.text((ml, y_leg), "layer index", fill="black", font=f_axis)
    x = ml + 140
    for c, lab in ((blue, "sparsity"), (orange, "bits (quantized)"), (grey, "bits (no/disabled quantizer)")):
        dr.rectangle([x, y_leg + 2, x + 14, y_leg + 16], fill=c)
        dr.text((x + 20, y_leg), lab, fill="black", font=f_axis)
        x += 30 + dr.textlength(lab, font=f_axis)
    return img


def save_report(report: dict, out_dir: str, stem: str = "compression_report") -> dict:
    """Write ``<stem>.json`` and ``<stem>.png`` into ``out_dir`` (created if
    needed), each atomically.  Returns ``{"json": path, "png": path}``."""
    os.makedirs(out_dir, exist_ok=True)
    jpath = os.path.join(out_dir, f"{stem}.json")
    ppath = os.path.join(out_dir, f"{stem}.png")
    atomic_write_bytes(jpath, (json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n").encode())
    buf = io.BytesIO()
    render_png(report).save(buf, format="PNG")
    atomic_write_bytes(ppath, buf.getvalue())
    return {"json": jpath, "png": ppath}


# ------------------------------------------------------------------ CLI --
def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg if len(msg) <= 300 else msg[:297] + "..."


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m codeq.report",
                                description="Compression report (sparsity, bits, BOPs) of a codeq trainer checkpoint.")
    p.add_argument("checkpoint", help="trainer checkpoint (.th / .pt)")
    p.add_argument("--out", default=None, help="directory for compression_report.json/.png (default: the checkpoint's)")
    p.add_argument("--act-bits", type=float, default=32.0, help="activation bit-width b_a (default 32)")
    p.add_argument("--stem", default="compression_report", help="file name stem of the outputs")
    args = p.parse_args(argv)
    try:
        if not args.act_bits > 0:
            raise ReportError(f"--act-bits must be positive, got {args.act_bits:g}")
        if os.path.isdir(args.checkpoint):
            raise ReportError(f"{args.checkpoint} is a directory, not a checkpoint file")
        try:
            model, config, _ = load_model(args.checkpoint)
        except ConfigError as e:
            raise ReportError(str(e)) from None
        try:
            rep = compression_report(model, example_input(int(config.get("img_size", 32))), act_bits=args.act_bits)
        except ReportError:
            raise
        except Exception as e:
            raise ReportError(f"forward pass failed: {_one_line(e)}") from None
        print(format_report(rep))
        out = args.out or os.path.dirname(os.path.abspath(args.checkpoint))
        try:
            paths = save_report(rep, out, stem=args.stem)
        except OSError as e:
            raise ReportError(f"cannot write the report to {out}: {_one_line(e)}") from None
        print(f"wrote {paths['json']} and {paths['png']}")
        return 0
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
