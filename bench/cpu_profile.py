"""Where the CPU time of `pyopd.reverse_kl` goes, next to the memory roofline of its traffic.

For one ISA path (``PYOPD_CPU_ISA``, read once per process) and one thread
count, each shape gets the median of 9 calls of:

  forward            the vocabulary pass (reads student + teacher logits)
  backward, kernel   the gradient kernel into a gradient buffer reused across calls
  backward, new      the same with a new `torch.empty` gradient per call (what
                     torch.compile's custom-op path does): the OS hands out a new
                     mapping whose pages it zeroes on first write
  backward, pool     the eager path's gradient from `pyopd.ops.buffers` (reused)
  fwd+bwd autograd   `reverse_kl(...).kl.sum().backward()`, what a user times
  read 2             `s.sum(); t.sum()`: the forward's traffic with no arithmetic
  read 2, write 1    `torch.add(s, t, out=g)`: the backward's traffic, reused output
  zero pages         `torch.empty(...).fill_(0)` minus `g.fill_(0)`: the cost of the
                     fresh gradient's pages
  copy               `g.copy_(s)`, the benchmarks' bandwidth reference

    PYOPD_CPU_ISA=avx2 python bench/cpu_profile.py --threads 2 >> OUT.md
"""
from __future__ import annotations

import argparse
import os
import time

import torch

import pyopd
from pyopd._machine import cpu_model
from pyopd.ops import vocab as _vocab

SHAPES = ((4096, 32768, torch.float32), (512, 151936, torch.bfloat16))


def _med_ms(fn, reps: int = 9) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[reps // 2] * 1e3


def profile(n: int, v: int, dtype: torch.dtype) -> list[str]:
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(n, v, generator=g) * 2).to(dtype)
    t = (torch.randn(n, v, generator=g) * 2).to(dtype)
    y = torch.randint(0, v, (n,), generator=g)
    buf = torch.empty(n, v, dtype=dtype)
    x = s.clone().requires_grad_()
    outs = _vocab._vocab_stats_fwd._init_fn(s, t, y, None, 1.0)
    kl, hs, stats = outs[0], outs[1], outs[7]
    ones = torch.ones(n)

    def fwd():
        return _vocab._vocab_stats_fwd._init_fn(s, t, y, None, 1.0)

    def bwd_kernel():
        return _vocab.vocab_stats_bwd_into(buf, s, t, y, None, stats, kl, hs, ones, None, None, None, 1.0)

    def bwd_fresh():
        return _vocab._vocab_stats_bwd._init_fn(s, t, y, None, stats, kl, hs, ones, None, None, None,
                                                1.0, dtype)

    def bwd_pool():
        return _vocab._eager_bwd(s, t, y, None, stats, kl, hs, ones, None, None, None, 1.0, dtype)

    def autograd():
        pyopd.reverse_kl(x, t, y).kl.sum().backward()
        x.grad = None

    e = s.element_size()
    nbytes = n * v * e
    rows = [
        ("forward", fwd, 2 * nbytes),
        ("backward, kernel", bwd_kernel, 3 * nbytes),
        ("backward, new gradient tensor", bwd_fresh, 3 * nbytes),
        ("backward, pooled gradient", bwd_pool, 3 * nbytes),
        ("fwd+bwd autograd", autograd, 5 * nbytes),
        ("read 2 (s.sum(); t.sum())", lambda: (s.sum(), t.sum()), 2 * nbytes),
        ("read 2, write 1 (add out=)", lambda: torch.add(s, t, out=buf), 3 * nbytes),
        ("fill, reused buffer", lambda: buf.fill_(0), nbytes),
        ("fill, fresh tensor", lambda: torch.empty(n, v, dtype=dtype).fill_(0), nbytes),
        ("copy (g.copy_(s))", lambda: buf.copy_(s), 2 * nbytes),
    ]
    ms = {name: _med_ms(fn) for name, fn, _ in rows}
    out = [f"### N={n}, V={v}, {str(dtype).replace('torch.', '')}", "",
           "| what | median ms | bytes moved (GB) | GB/s |", "|---|---|---|---|"]
    for name, _, b in rows:
        out.append(f"| {name} | {ms[name]:.1f} | {b / 1e9:.2f} | {b / ms[name] / 1e6:.1f} |")
    zero = ms["fill, fresh tensor"] - ms["fill, reused buffer"]
    kernel_total = ms["forward"] + ms["backward, kernel"]
    roof = ms["read 2 (s.sum(); t.sum())"] + ms["read 2, write 1 (add out=)"]
    out += ["",
            f"- zeroing a fresh [N, V] gradient's pages: ~{zero:.0f} ms "
            f"(fresh minus reused fill); backward with a new tensor minus kernel: "
            f"{ms['backward, new gradient tensor'] - ms['backward, kernel']:.0f} ms",
            f"- forward / read-2: {ms['forward'] / ms['read 2 (s.sum(); t.sum())']:.2f}x; "
            f"backward kernel / read-2-write-1: "
            f"{ms['backward, kernel'] / ms['read 2, write 1 (add out=)']:.2f}x; "
            f"forward + backward kernel against the two traffic-only ops: {kernel_total / roof:.2f}x",
            f"- fwd+bwd through autograd: {5 * nbytes / ms['fwd+bwd autograd'] / 1e6:.1f} GB/s = "
            f"{100 * (5 * nbytes / ms['fwd+bwd autograd']) / (2 * nbytes / ms['copy (g.copy_(s))']):.0f}% "
            f"of the same-run copy", ""]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    info = pyopd.build_info()
    print(f"## {info['cpu_isa']} path, {args.threads} thread(s)\n")
    print(f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs; torch {torch.__version__}; "
          f"PYOPD_CPU_ISA={os.environ.get('PYOPD_CPU_ISA', '(unset)')}; "
          f"load average before: {os.getloadavg()[0]:.2f}\n")
    for shape in SHAPES:
        print("\n".join(profile(*shape)), flush=True)


if __name__ == "__main__":
    main()
