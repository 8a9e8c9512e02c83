"""Compact export of a trained (fake-quantized) model: integer levels packed to
the learned bit-width, zeros stored sparsely, scalars kept bit-exact.

An export is a directory ``OUT`` with two files:

``model.safetensors``
    every tensor of the plain (quantizer-free) state dict.  A quantized weight
    ``K`` is stored as ``codeq::K::codes`` (uint8, its bit streams one after
    another, each byte-aligned) and ``codeq::K::scalars`` ([s, delta] in the
    quantizer's compute dtype: float32 for float32/16 weights, float64 for
    float64); every other tensor (biases, BN statistics, unquantized or
    non-decodable weights) is stored as it is under its own key.
``layout.json``
    format name and version, the trainer's architecture config (when the
    model came from a checkpoint), the SHA-256 of ``model.safetensors``, and
    per quantized weight: shape, dtype, quantizer, bit-width B, Q, numel,
    nonzero count and the streams (byte offset and length inside ``codes``):

    - ``mask``: where the nonzero levels are, coded as whichever is smaller:
      ``bitmap`` (numel bits), ``rice`` (the gaps between nonzeros, Golomb-Rice
      with parameter k: a unary stream of quotients and a stream of k-bit
      remainders), ``all`` (every level nonzero: no bits) or ``none`` (no
      nonzero: no bits);
    - ``sign``: one bit per nonzero level (1 = negative);
    - ``mag``: |q| - 1 of each nonzero level in ceil(log2 Q) bits (0 bits for
      B = 2, whose nonzero levels are +-1).  With the sign bit a nonzero level
      costs B bits (1 bit for B = 2).

    Bits are packed little-endian within bytes (numpy ``bitorder="little"``),
    values least significant bit first, elements in row-major order.
    ``layout_sha256`` is the SHA-256 of the layout's own canonical JSON.

Decoding rebuilds ŵ with the quantizer's own float ops: ``s*q + delta*sign(q)``
(dead zone) or ``s*q`` (uniform) in the compute dtype, cast to the weight
dtype, so the rebuilt weights equal the fake-quantized ŵ exactly.  The export
checks this for every layer before writing (a layer whose levels do not
rebuild ŵ exactly is stored as a plain float tensor instead, ``encoding:
"raw"``) and reads the files back afterwards.  The sign of zero is not kept:
a pruned weight is +0.0 after loading (ŵ may hold -0.0 there when delta < 0),
which changes no product or sum except the sign of an all-zero result.

Command line: ``python -m codeq.export CHECKPOINT OUT`` (export, then read
back and compare), ``python -m codeq.export --check OUT`` (verify an export);
``--format onnx`` writes and checks an ONNX file with integer weights instead
(:mod:`codeq.onnx_export`).  Errors are one line ``error: ...`` on stderr with
exit status 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from codeq import onnx_export
from codeq._io import atomic_path, atomic_write_bytes
from codeq.checkpoint import load_model
from codeq.errors import ConfigError, ExportError
from codeq.levels import dequantize, integer_levels, plain_state_dict, quantized_weights, same_values
from codeq.models import build_model

__all__ = [
    "ExportError",
    "export_model",
    "export_checkpoint",
    "check_export",
    "load",
    "load_state_dict",
    "plain_state_dict",
    "FORMAT",
    "VERSION",
]

FORMAT = "codeq-export"
VERSION = 1
TENSOR_FILE = "model.safetensors"
LAYOUT_FILE = "layout.json"
_PREFIX = "codeq::"
_MAX_RICE_K = 24


# ------------------------------------------------------------ bit streams --
def _pack_bits(bits: np.ndarray) -> bytes:
    return np.packbits(bits.astype(np.uint8, copy=False), bitorder="little").tobytes()


def _unpack_bits(buf: np.ndarray, nbits: int) -> np.ndarray:
    if nbits > buf.size * 8:
        raise ExportError(f"bit stream too short: {nbits} bits needed, {buf.size * 8} stored")
    return np.unpackbits(buf, count=nbits, bitorder="little")


def _pack_uint(vals: np.ndarray, width: int) -> bytes:
    if width == 0 or vals.size == 0:
        return b""
    bits = (vals.astype(np.int64)[:, None] >> np.arange(width, dtype=np.int64)) & 1
    return _pack_bits(bits.reshape(-1))


def _unpack_uint(buf: np.ndarray, count: int, width: int) -> np.ndarray:
    if width == 0 or count == 0:
        return np.zeros(count, dtype=np.int64)
    bits = _unpack_bits(buf, count * width).reshape(count, width).astype(np.int64)
    return (bits << np.arange(width, dtype=np.int64)).sum(axis=1)


def _rice_cost(gaps: np.ndarray, k: int) -> tuple[int, int]:
    """(unary bits, remainder bits) of Golomb-Rice coding the gaps with parameter k."""
    return int((gaps >> k).sum()) + gaps.size, gaps.size * k


def _rice_encode(gaps: np.ndarray, k: int) -> tuple[bytes, bytes, int]:
    qt = gaps >> k
    unary_bits = int(qt.sum()) + gaps.size
    bits = np.ones(unary_bits, dtype=np.uint8)
    bits[np.cumsum(qt + 1) - 1] = 0  # each quotient: qt ones then a zero
    rem = gaps & ((1 << k) - 1)
    return _pack_bits(bits), _pack_uint(rem, k), unary_bits


def _rice_decode(ubuf: np.ndarray, rbuf: np.ndarray, count: int, k: int, unary_bits: int) -> np.ndarray:
    bits = _unpack_bits(ubuf, unary_bits)
    zeros = np.flatnonzero(bits == 0)
    if zeros.size != count or (count and zeros[-1] != unary_bits - 1):
        raise ExportError("corrupt mask: the Golomb-Rice stream does not hold the stated number of nonzeros")
    qt = np.diff(zeros, prepend=-1) - 1
    return (qt << k) | _unpack_uint(rbuf, count, k)


def _ceil_log2(x: int) -> int:
    return 0 if x <= 1 else int(math.ceil(math.log2(x)))


# --------------------------------------------------------- level encoding --
def _encode_levels(q: np.ndarray, Q: int) -> tuple[bytes, dict]:
    """Code the integer levels q (flat int64, |q| <= Q).  Returns (codes, streams)."""
    n = q.size
    pos = np.flatnonzero(q)
    c = pos.size
    streams: dict = {}
    chunks: list[bytes] = []

    def add(name, data, **extra):
        off = sum(len(b) for b in chunks)
        chunks.append(data)
        streams[name] = {"offset": off, "nbytes": len(data), **extra}

    if c == 0:
        streams["mask"] = {"coding": "none"}
    elif c == n:
        streams["mask"] = {"coding": "all"}
    else:
        gaps = np.diff(pos, prepend=-1) - 1
        best_k, best = 0, None
        for k in range(0, _MAX_RICE_K + 1):
            u, r = _rice_cost(gaps, k)
            cost = (u + 7) // 8 + (r + 7) // 8
            if best is None or cost < best:
                best_k, best = k, cost
        if best < (n + 7) // 8:
            ub, rb, unary_bits = _rice_encode(gaps, best_k)
            add("mask", ub, coding="rice", k=best_k, unary_bits=unary_bits)
            add("mask_rem", rb)
        else:
            mask = np.zeros(n, dtype=np.uint8)
            mask[pos] = 1
            add("mask", _pack_bits(mask), coding="bitmap")
    vals = q[pos]
    add("sign", _pack_bits(vals < 0))
    m = _ceil_log2(Q)
    add("mag", _pack_uint(np.abs(vals) - 1, m), bits=m)
    return b"".join(chunks), streams


def _stream(codes: np.ndarray, streams: dict, name: str) -> np.ndarray:
    st = streams.get(name)
    if not isinstance(st, dict):
        raise ExportError(f"corrupt layout: stream {name!r} missing")
    off, nb = st.get("offset"), st.get("nbytes")
    if not (isinstance(off, int) and isinstance(nb, int) and 0 <= off and 0 <= nb and off + nb <= codes.size):
        raise ExportError(f"corrupt layout: stream {name!r} lies outside the stored codes")
    return codes[off:off + nb]


def _decode_levels(codes: np.ndarray, info: dict) -> np.ndarray:
    n, c, Q = int(info["numel"]), int(info["nonzero"]), int(info["Q"])
    if not (0 <= c <= n) or Q < 1:
        raise ExportError("corrupt layout: bad numel/nonzero/Q")
    streams = info["streams"]
    coding = streams.get("mask", {}).get("coding")
    if coding == "none":
        pos = np.zeros(0, dtype=np.int64)
    elif coding == "all":
        pos = np.arange(n, dtype=np.int64)
    elif coding == "bitmap":
        pos = np.flatnonzero(_unpack_bits(_stream(codes, streams, "mask"), n))
    elif coding == "rice":
        m = streams["mask"]
        gaps = _rice_decode(_stream(codes, streams, "mask"), _stream(codes, streams, "mask_rem"), c, int(m["k"]),
                            int(m["unary_bits"]))
        pos = np.cumsum(gaps + 1) - 1
    else:
        raise ExportError(f"unknown mask coding {coding!r}")
    if pos.size != c or (c and (pos[-1] >= n or pos[0] < 0)):
        raise ExportError("corrupt mask: nonzero count or positions do not match the layout")
    sign = _unpack_bits(_stream(codes, streams, "sign"), c).astype(bool)
    mbits = int(streams["mag"]["bits"])
    if mbits != _ceil_log2(Q):
        raise ExportError("corrupt layout: magnitude width does not match Q")
    mag = _unpack_uint(_stream(codes, streams, "mag"), c, mbits) + 1
    if c and mag.max() > Q:
        raise ExportError("corrupt levels: a magnitude exceeds Q")
    q = np.zeros(n, dtype=np.int64)
    q[pos] = np.where(sign, -mag, mag)
    return q


# ------------------------------------------------------------------ files --
def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _layout_digest(layout: dict) -> str:
    return hashlib.sha256(_canonical({k: v for k, v in layout.items() if k != "layout_sha256"})).hexdigest()


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def _dtype_of(name: str) -> torch.dtype:
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype):
        raise ExportError(f"corrupt layout: unknown dtype {name!r}")
    return dt


def _json_safe(obj):
    """A plain-JSON copy of a config (tuples -> lists, other objects -> str)."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return str(obj)


def _human_bytes(n: float) -> str:
    for div, suf in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= div:
            return f"{n / div:.2f} {suf}"
    return f"{int(n)} B"


# ----------------------------------------------------------------- export --
@torch.no_grad()
def export_model(model: nn.Module, out_path: str, config: dict | None = None, verbose: bool = False) -> dict:
    """Export ``model`` (quantizers attached as weight parametrizations) to the
    directory ``out_path`` (created if needed; its two files are replaced
    atomically), then read the export back and check that it rebuilds every
    tensor of :func:`plain_state_dict` exactly (:class:`ExportError` if not).  ``config`` is the trainer's architecture config
    (plain dict) that :func:`load` rebuilds the model from; without it only
    :func:`load_state_dict` can read the export.

    Returns a summary: paths, ``bytes`` (both files), ``tensor_file_bytes``,
    ``fp32_bytes`` (the plain state dict with every float tensor in float32),
    ``theoretical_bytes`` (Σ nonzero·B + numel mask bits over the quantized
    weights, plus the other tensors as stored), and per-layer ``layers``.
    """
    if os.path.exists(out_path) and not os.path.isdir(out_path):
        raise ExportError(f"{out_path} exists and is not a directory")
    os.makedirs(out_path, exist_ok=True)

    plain = plain_state_dict(model)
    qmods = quantized_weights(model)
    tensors: dict = {}
    layers: dict = {}
    raw_reasons: dict = {}
    for mname, (module, q) in qmods.items():
        key = f"{mname}.weight" if mname else "weight"
        if key not in plain:  # pragma: no cover - shared module under two names
            continue
        w_hat = plain[key]
        found = "not a single quantizer parametrization" if q is None else \
            integer_levels(q, module.parametrizations["weight"].original, w_hat)
        if isinstance(found, str):
            raw_reasons[key] = found
            continue
        encoding, s, delta, B, Qi, lv = found.encoding, found.s, found.delta, found.bits, found.Q, found.levels
        qn = lv.to(torch.int64).reshape(-1).cpu().numpy()
        codes, streams = _encode_levels(qn, Qi)
        tensors[f"{_PREFIX}{key}::codes"] = torch.frombuffer(bytearray(codes), dtype=torch.uint8) if codes else \
            torch.zeros(0, dtype=torch.uint8)
        tensors[f"{_PREFIX}{key}::scalars"] = torch.stack([s.reshape(()), delta.reshape(())]).cpu().contiguous()
        nz = int(np.count_nonzero(qn))
        layers[key] = {
            "encoding": encoding,
            "quantizer": type(q).__name__,
            "shape": list(w_hat.shape),
            "dtype": _dtype_name(w_hat.dtype),
            "scalar_dtype": _dtype_name(s.dtype),
            "bits": B,
            "Q": Qi,
            "numel": int(qn.size),
            "nonzero": nz,
            "streams": streams,
            "nbytes": len(codes) + 2 * s.element_size(),
            "theoretical_bits": nz * B + int(qn.size),
        }
    for k, v in plain.items():
        if k not in layers:
            tensors[k] = v.detach().cpu().contiguous().clone()

    fp32_bytes = sum(v.numel() * (4 if v.is_floating_point() else v.element_size()) for v in plain.values())
    other_bytes = sum(v.numel() * v.element_size() for k, v in plain.items() if k not in layers)
    theo_bytes = sum(L["theoretical_bits"] for L in layers.values()) / 8 + other_bytes

    tpath = os.path.join(out_path, TENSOR_FILE)
    lpath = os.path.join(out_path, LAYOUT_FILE)
    with atomic_path(tpath) as tmp:
        save_file(tensors, tmp, metadata={"format": FORMAT, "version": str(VERSION)})
        sha = _sha256_file(tmp)
    layout = {
        "format": FORMAT,
        "version": VERSION,
        "tensor_file": TENSOR_FILE,
        "sha256": sha,
        "config": _json_safe(config) if config is not None else None,
        "keys": list(plain.keys()),
        "layers": layers,
        "raw": raw_reasons,
    }
    layout["layout_sha256"] = _layout_digest(layout)
    atomic_write_bytes(lpath, json.dumps(layout, separators=(",", ":"), allow_nan=False).encode() + b"\n")

    # read the files back: the export must rebuild exactly the tensors of the model
    _verify(plain, load_state_dict(out_path))

    tbytes = os.path.getsize(tpath)
    total = tbytes + os.path.getsize(lpath)
    summary = {
        "dir": out_path,
        "tensor_file": tpath,
        "layout_file": lpath,
        "bytes": total,
        "tensor_file_bytes": tbytes,
        "fp32_bytes": int(fp32_bytes),
        "theoretical_bytes": float(theo_bytes),
        "fraction_of_fp32": total / fp32_bytes if fp32_bytes else None,
        "quantized_layers": len(layers),
        "raw_layers": raw_reasons,
        "layers": {k: {"nbytes": L["nbytes"], "bits": L["bits"], "nonzero": L["nonzero"], "numel": L["numel"],
                       "mask": L["streams"]["mask"]["coding"]} for k, L in layers.items()},
    }
    if verbose:
        print(format_summary(summary))
    return summary


def format_summary(summary: dict) -> str:
    fp32, total, theo = summary["fp32_bytes"], summary["bytes"], summary["theoretical_bytes"]
    lines = [
        f"exported {summary['quantized_layers']} quantized weight(s) to {summary['dir']}",
        f"  size: {_human_bytes(total)} ({total} bytes: tensors {summary['tensor_file_bytes']}, "
        f"layout {total - summary['tensor_file_bytes']})",
        f"  fp32 state dict: {_human_bytes(fp32)} ({fp32} bytes) -> {total / fp32:.4f} of fp32, "
        f"{fp32 / total:.1f}x smaller" if fp32 and total else "  fp32 state dict: 0 bytes",
        f"  theoretical (Σ nonzero·bits + mask bits + other tensors): {_human_bytes(theo)} "
        f"({theo:.0f} bytes) -> export is {total / theo:.3f}x of it" if theo else "  theoretical: 0 bytes",
    ]
    for k, why in summary["raw_layers"].items():
        lines.append(f"  stored as float: {k} ({why})")
    return "\n".join(lines)


# ------------------------------------------------------------------- load --
def _read_layout(out_path: str) -> dict:
    if not os.path.isdir(out_path):
        raise ExportError(f"no export directory at {out_path}")
    lpath = os.path.join(out_path, LAYOUT_FILE)
    if not os.path.isfile(lpath):
        raise ExportError(f"{out_path} is not a codeq export (no {LAYOUT_FILE})")
    try:
        with open(lpath, "rb") as f:
            layout = json.loads(f.read().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ExportError(f"corrupt {LAYOUT_FILE} in {out_path}: {e}") from None
    if not isinstance(layout, dict) or layout.get("format") != FORMAT:
        raise ExportError(f"{lpath} is not a {FORMAT} layout")
    if layout.get("version") != VERSION:
        raise ExportError(f"{lpath}: unsupported format version {layout.get('version')!r} (this codeq reads {VERSION})")
    if layout.get("layout_sha256") != _layout_digest(layout):
        raise ExportError(f"{lpath} was modified or is corrupt (layout checksum mismatch)")
    return layout


def load_state_dict(out_path: str, verify: bool = True) -> dict:
    """The plain state dict (ŵ for every quantized weight, every other tensor
    as exported) of the export in ``out_path``.  Checks the SHA-256 of the
    tensor file first (``verify=False`` skips it); raises :class:`ExportError`
    on any mismatch or corruption."""
    layout = _read_layout(out_path)
    tpath = os.path.join(out_path, str(layout.get("tensor_file", TENSOR_FILE)))
    if not os.path.isfile(tpath):
        raise ExportError(f"missing tensor file {tpath}")
    if verify and _sha256_file(tpath) != layout.get("sha256"):
        raise ExportError(f"{tpath} is corrupt or truncated (SHA-256 mismatch with {LAYOUT_FILE})")
    try:
        tensors = load_file(tpath)
    except Exception as e:
        raise ExportError(f"cannot read {tpath}: {' '.join(str(e).split())}") from None
    out = {}
    try:
        for key in layout["keys"]:
            info = layout["layers"].get(key)
            if info is None:
                if key not in tensors:
                    raise ExportError(f"tensor {key!r} missing from {tpath}")
                out[key] = tensors[key]
                continue
            codes_t = tensors.get(f"{_PREFIX}{key}::codes")
            scal = tensors.get(f"{_PREFIX}{key}::scalars")
            if codes_t is None or scal is None or scal.numel() != 2:
                raise ExportError(f"codes or scalars of {key!r} missing from {tpath}")
            if _dtype_name(scal.dtype) != info["scalar_dtype"]:
                raise ExportError(f"scalars of {key!r} have dtype {scal.dtype}, layout says {info['scalar_dtype']}")
            shape = [int(d) for d in info["shape"]]
            if math.prod(shape) != int(info["numel"]):
                raise ExportError(f"corrupt layout: shape and numel of {key!r} disagree")
            q = _decode_levels(codes_t.numpy(), info)
            qt = torch.from_numpy(q).reshape(shape)
            out[key] = dequantize(info["encoding"], qt, scal[0], scal[1], _dtype_of(info["dtype"]))
    except ExportError:
        raise
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise ExportError(f"corrupt export in {out_path}: {type(e).__name__}: {' '.join(str(e).split())}") from None
    return out


def load(out_path: str) -> nn.Module:
    """Rebuild the exported model as a plain nn.Module (no quantizer attached,
    eval mode) whose weights equal the fake-quantized ŵ.  Needs an export made
    from a checkpoint (with its config) of a model in codeq's registry."""
    layout = _read_layout(out_path)
    if not isinstance(layout.get("config"), dict):
        raise ExportError(f"{out_path} has no architecture config (exported from an in-memory model): "
                          "use codeq.export.load_state_dict() with your own model")
    sd = load_state_dict(out_path)
    config = layout["config"]
    try:
        model = build_model(config["model"], img_size=int(config.get("img_size", 32)),
                            model_kwargs=config.get("model_kwargs"))
    except (ConfigError, KeyError, TypeError, ValueError) as e:
        raise ExportError(f"cannot build the architecture of {out_path}: {' '.join(str(e).split())}") from None
    try:
        model.load_state_dict(sd, strict=True)
    except Exception as e:
        raise ExportError(f"exported tensors do not fit the architecture: {' '.join(str(e).split())[:300]}") from None
    return model.eval()


# -------------------------------------------------------------------- CLI --
def export_checkpoint(checkpoint: str, out_path: str, verbose: bool = True) -> dict:
    """Export a trainer checkpoint: rebuild the model (quantizers attached,
    trained state loaded) and export it with its config, so :func:`load` can
    rebuild the architecture.  Prints the size summary when ``verbose``."""
    try:
        model, _, ckpt = load_model(checkpoint)
    except ConfigError as e:
        raise ExportError(str(e)) from None
    config = ckpt["config"]
    if not isinstance(config, dict):
        raise ExportError(f"{checkpoint}: the checkpoint's config is not a plain dict")
    summary = export_model(model, out_path, config=config)
    if verbose:
        print(format_summary(summary))
    return summary


def _verify(expected: dict, got: dict) -> None:
    if set(expected) != set(got):
        raise ExportError(f"read-back check failed: keys differ ({sorted(set(expected) ^ set(got))[:3]})")
    for k, v in expected.items():
        if not same_values(got[k], v.detach().cpu()):
            raise ExportError(f"read-back check failed: {k} differs from the model's tensor")


def check_export(out_path: str) -> dict:
    """Read an export completely (layout checksum, SHA-256, every layer decoded)
    and return a short description; raises :class:`ExportError`."""
    layout = _read_layout(out_path)
    sd = load_state_dict(out_path)
    return {"tensors": len(sd), "quantized_layers": len(layout["layers"]),
            "has_config": isinstance(layout.get("config"), dict)}


FORMATS = ("codeq", "onnx")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m codeq.export",
        description="Export a codeq trainer checkpoint: CHECKPOINT OUT, or --check OUT to verify an export. "
                    "--format codeq (default): a directory of packed sparse integer levels, read by "
                    "codeq.export.load. --format onnx: an ONNX file with INT4/INT8 weights for ONNX Runtime "
                    "and other runtimes (OUT ending in .onnx, or a directory that gets model.onnx); needs "
                    "pip install 'codeq[onnx]'.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="CHECKPOINT OUT (export) or OUT (with --check)")
    p.add_argument("--check", action="store_true", help="verify an existing export (codeq: checksums, full "
                   "decode; onnx: onnx.checker, integer weights, ONNX Runtime against PyTorch)")
    p.add_argument("--format", default=None, help="codeq or onnx (default: onnx for a .onnx path, else codeq)")
    p.add_argument("--onnx-form", default="cast", help="how the graph turns the integers into weights: cast "
                   "(Cast, Mul; default) or qdq (DequantizeLinear, for consumers that look for Q/DQ)")
    args = p.parse_args(argv)
    n = 1 if args.check else 2
    try:
        if len(args.paths) != n:
            raise ExportError("expected OUT with --check" if args.check else "expected CHECKPOINT OUT")
        out = args.paths[-1]
        fmt = args.format or ("onnx" if out.endswith(".onnx") else "codeq")
        if fmt not in FORMATS:
            raise ExportError(f"unknown --format {fmt!r} (choose one of: {', '.join(FORMATS)})")
        if fmt == "onnx":
            if args.onnx_form not in onnx_export.FORMS:
                raise ExportError(f"unknown --onnx-form {args.onnx_form!r} (choose one of: "
                                  f"{', '.join(onnx_export.FORMS)})")
            path = out if out.endswith(".onnx") else os.path.join(out, "model.onnx")
            if args.check:
                info = onnx_export.check_onnx(path)
                print(f"ok: {path}: {len(info['layers'])} integer weight(s) rebuilt bit for bit in ONNX Runtime, "
                      f"outputs within {info['max_rel_error']:.1e} of PyTorch's (recorded at export)")
            else:
                info = onnx_export.export_checkpoint_onnx(args.paths[0], path, form=args.onnx_form)
                print(onnx_export.format_summary(info))
        elif args.check:
            info = check_export(out)
            print(f"ok: {out}: {info['tensors']} tensors, {info['quantized_layers']} packed layers"
                  + ("" if info["has_config"] else " (no architecture config)"))
        else:
            export_checkpoint(args.paths[0], out)
        return 0
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
