"""A/B of the gradient-in-forward fused-linear op against the materialised logits, in one process.

    python bench/fused_linear_ab.py N H V DTYPE CHUNK THREADS [ORDER]
    e.g. python bench/fused_linear_ab.py 4096 1024 32768 float32 256 2 mat,loss,mat,loss

Providers (loss = kl.sum(), gradients w.r.t. the student's hidden states and weight):
  mat   pyopd.reverse_kl(h @ W.T, ht @ Wt.T).kl.sum(), autograd through the matmuls
  loss  pyopd.fused_linear_reverse_kl_loss(..., coef=ones, chunk_size=CHUNK)
  rec   pyopd.fused_linear_reverse_kl(..., chunk_size=CHUNK).kl.sum()
Each entry of ORDER: one warm-up call, then the median of 3 timed calls, and the
page faults per call. Alternating the providers in one process is what makes the
ratio trustworthy on a shared machine.
"""
from __future__ import annotations

import resource
import sys
import time

import torch

import pyopd


def main(argv: list[str]) -> None:
    if len(argv) < 6:
        raise SystemExit(__doc__)
    n, h, v = int(argv[0]), int(argv[1]), int(argv[2])
    dt, chunk, threads = getattr(torch, argv[3]), int(argv[4]), int(argv[5])
    order = argv[6].split(",") if len(argv) > 6 else ["mat", "loss", "mat", "loss"]
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x = (torch.randn(n, h) * 0.5).to(dt).requires_grad_()
    w = (torch.randn(v, h) * 0.05).to(dt).requires_grad_()
    xt, wt = (torch.randn(n, h) * 0.5).to(dt), (torch.randn(v, h) * 0.05).to(dt)
    y = torch.randint(0, v, (n,))
    coef = torch.ones(n)

    def mat():
        pyopd.reverse_kl(x @ w.T, xt @ wt.T, y).kl.sum().backward()

    def loss():
        pyopd.fused_linear_reverse_kl_loss(x, w, xt, wt, coef, y, chunk_size=chunk)[0].backward()

    def rec():
        pyopd.fused_linear_reverse_kl(x, w, xt, wt, y, chunk_size=chunk).kl.sum().backward()

    fns = {"mat": mat, "loss": loss, "rec": rec}
    res: dict[str, list[float]] = {}
    for name in order:
        f = fns[name]

        def call():
            f()
            x.grad = w.grad = None

        call()
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            call()
            ts.append(time.perf_counter() - t0)
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) // 3
        res.setdefault(name, []).append(sorted(ts)[1])
        print(f"{name}: {sorted(ts)[1] * 1e3:.0f} ms, {faults} page faults per call", flush=True)
    print({k: [round(t * 1e3) for t in v] for k, v in res.items()})


if __name__ == "__main__":
    main(sys.argv[1:])
