"""Calls every codeq CUDA kernel once on small and medium inputs and synchronises.

The target of compute-sanitizer in benchmarks/gpu_check.sh (memcheck, racecheck,
synccheck, initcheck): every kernel and every launch path (the single-block and
the multi-block selection, the uniform small / grid paths, the multi-tensor
group lasso with more layers than one launch holds) runs at least once, for
each of the four dtypes.  Run it with PYTORCH_NO_CUDA_MEMORY_CACHING=1 so that
every tensor is its own allocation and an out-of-bounds access is visible.

    python benchmarks/cuda_driver.py [--sizes 1,1000,70000] [--dtypes float32,float16]

Exits 0 with a message when there is no CUDA GPU.
"""

from __future__ import annotations

import argparse
import sys

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,1000,65536,70001", help="comma-separated element counts")
    ap.add_argument("--dtypes", default="float32,float64,float16,bfloat16")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("cuda_driver: no CUDA GPU visible; nothing to run (skipped).")
        return 0
    import codeq

    if not codeq._ext.has_kernel("cuda"):
        print(f"cuda_driver: codeq has no CUDA kernels: {codeq.info()}", file=sys.stderr)
        return 1
    ops = torch.ops.codeq
    dev = torch.device("cuda")
    sizes = [int(s) for s in args.sizes.split(",") if s]
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",") if d]
    gen = torch.Generator(device="cpu").manual_seed(0)
    for dtype in dtypes:
        th = torch.float64 if dtype == torch.float64 else torch.float32
        ldz = torch.tensor(2.0, dtype=th, device=dev)
        lbit = torch.tensor(1.0, dtype=th, device=dev)
        for n in sizes:
            w = (torch.randn(n, generator=gen, dtype=torch.float64) * 0.02).to(dtype).to(dev)
            g = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype).to(dev)
            a = ops.abs_quantile(w, 0.99)
            for learnable in (True, False):
                cfg = ([4.0], [2.0], [8.0], [learnable], [0.0])
                w_hat, gl, (sc,), norms = ops.deadzone_forward([w], [ldz], [lbit], *cfg)
                (gw,), (gdz,), (gbit,) = ops.deadzone_backward([g], gl, [w], w_hat, [sc], norms, [ldz], [lbit], *cfg[1:])
            # misaligned (storage offset 1): the element-by-element paths
            if n > 2:
                ops.abs_quantile(w[1:], 0.99)
                cfg = ([4.0], [2.0], [8.0], [True], [0.0])
                wh1, gl1, sc1, nm1 = ops.deadzone_forward([w[1:]], [ldz], [lbit], *cfg)
                ops.deadzone_backward([g[1:]], gl1, [w[1:]], wh1, sc1, nm1, [ldz], [lbit], *cfg[1:])
            # several layers with the group lasso (the training step's call)
            if n > 1:
                ws2 = [w.reshape(1, -1), w[: n // 2].reshape(-1, 1)]
                cfg = ([4.0, 4.0], [2.0, 2.0], [8.0, 8.0], [True, False], [1e-3, 2e-3])
                whs, glm, scs, nms = ops.deadzone_forward(ws2, [ldz, ldz], [lbit, lbit], *cfg)
                ops.deadzone_backward([torch.ones_like(x) for x in ws2], torch.ones_like(glm), ws2, whs, scs, nms,
                                      [ldz, ldz], [lbit, lbit], *cfg[1:])
            uh, us = ops.uniform_forward(w, 4)
            ops.uniform_backward(g, w, us, 4)
            torch.cuda.synchronize()
            print(f"cuda_driver: {dtype} n={n}: a={float(a):.6g} scalars={[round(float(v), 6) for v in sc]} "
                  f"dlogit_dz={float(gdz):.4g} ok")
        # group lasso: ViT-like shapes plus more layers than one launch carries
        shapes = [(576, 192), (192, 192), (768, 192), (192, 768), (192, 3, 16, 16), (7, 5), (0, 3)]
        shapes += [(9 + i, 2 + i % 33) for i in range(60)]
        ws = [(torch.randn(s, generator=gen, dtype=torch.float64) * 0.05).to(dtype).to(dev) for s in shapes]
        lams = [1e-4] * len(ws)
        loss, norms = ops.group_lasso_forward(ws, lams)
        ops.group_lasso_backward(torch.ones((), dtype=loss.dtype, device=dev), ws, norms, lams)
        torch.cuda.synchronize()
        print(f"cuda_driver: {dtype} group lasso over {len(ws)} layers: loss={float(loss):.6g} ok")
    print("cuda_driver: all kernels ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
