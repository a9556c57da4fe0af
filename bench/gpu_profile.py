"""GPU measurements beyond the benchmarks, run by bench/gpu_check.sh (phase "profile").

1. Fixed cost of one call: the CUDA kernels that one `pyopd.reverse_kl` forward
   and forward + backward launch (torch.profiler), and the host time per call
   at a tiny shape, where the kernels themselves take microseconds.
2. Fused linear chunk sweep at N=8192, H=4096, V=151936 bf16: time and peak
   extra memory of `fused_linear_reverse_kl` (logits recomputed in backward)
   and, when this checkout has it, `fused_linear_reverse_kl_loss` (gradient in
   forward) for several chunk sizes, next to the materialised path
   (`reverse_kl(h @ W.T, ht @ Wt.T)`), all differentiating only the KL.

    python bench/gpu_profile.py OUT.md
"""
from __future__ import annotations

import sys
import time
from collections import Counter

import torch

import pyopd


def _med_ms(fn, reps=10):
    for _ in range(2):
        fn()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return sorted(ts)[len(ts) // 2]


def fixed_cost(lines):
    lines += ["## Fixed cost of one call", ""]
    g = torch.Generator(device="cuda").manual_seed(0)
    for n, v in ((8, 4096), (4096, 32000)):
        s = torch.randn(n, v, device="cuda", generator=g).bfloat16()
        t = torch.randn(n, v, device="cuda", generator=g).bfloat16()
        y = torch.randint(0, v, (n,), device="cuda", generator=g)
        x = s.clone().requires_grad_()

        def fwd():
            return pyopd.reverse_kl(s, t, y)

        def fb():
            pyopd.reverse_kl(x, t, y).kl.sum().backward()
            x.grad = None

        for name, fn in (("forward", fwd), ("forward+backward", fb)):
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            reps = 200
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            host_us = (time.perf_counter() - t0) / reps * 1e6  # enqueue time (no sync)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            torch.cuda.synchronize()
            wall_us = (time.perf_counter() - t0) / reps * 1e6
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize()
            kernels = Counter(e.name for e in prof.events()
                              if e.device_type == torch.autograd.DeviceType.CUDA)
            total = sum(kernels.values())
            lines.append(f"- N={n}, V={v} bf16, {name}: host {host_us:.0f} us/call to enqueue, "
                         f"{wall_us:.0f} us/call back to back; {total} device activities:")
            for k, c in kernels.most_common():
                lines.append(f"  - {c} x `{k[:110]}`")
    lines.append("")


def kernel_times(lines):
    """Device time of each kernel of one reverse_kl forward + backward at the benchmark
    shapes (torch.profiler), against the bytes the kernel must move: what the kernels
    reach without the host's share of a call."""
    lines += ["## Kernel time at the benchmark shapes", "",
              "| shape | kernel | calls | device ms | GB moved | GB/s |", "|---|---|---|---|---|---|"]
    g = torch.Generator(device="cuda").manual_seed(0)
    for n, v, dt in ((8192, 151936, torch.bfloat16), (4096, 32768, torch.float32)):
        s = (torch.randn(n, v, device="cuda", generator=g) * 2).to(dt)
        t = (torch.randn(n, v, device="cuda", generator=g) * 2).to(dt)
        y = torch.randint(0, v, (n,), device="cuda", generator=g)
        x = s.clone().requires_grad_()

        def fb():
            r = pyopd.reverse_kl(x, t, y)
            (r.kl.sum() + 0.01 * r.student_entropy.sum() - r.student_logprob.sum()).backward()
            x.grad = None

        for _ in range(3):
            fb()
        torch.cuda.synchronize()
        reps = 5
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                fb()
            torch.cuda.synchronize()
        e = s.element_size()
        for a in sorted(prof.key_averages(), key=lambda a: -a.device_time_total):
            if "vocab_stats" not in a.key:
                continue
            ms = a.device_time_total / 1e3 / reps
            # forward reads student + teacher; backward reads both and writes the gradient
            gb = n * v * e * (3 if "bwd" in a.key else 2) / 1e9
            lines.append(f"| N={n} V={v} {str(dt)[6:]} | `{a.key[:60]}` | {a.count // reps} | "
                         f"{ms:.3f} | {gb:.2f} | {gb / (ms / 1e3):.0f} |")
        del s, t, x
        torch.cuda.empty_cache()
    lines.append("")


def _peak(fn):
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def chunk_sweep(lines):
    n, h, v = 8192, 4096, 151936
    g = torch.Generator(device="cuda").manual_seed(0)
    sh = (torch.randn(n, h, device="cuda", generator=g) * 0.5).bfloat16()
    sw = (torch.randn(v, h, device="cuda", generator=g) * 0.02).bfloat16()
    th = (torch.randn(n, h, device="cuda", generator=g) * 0.5).bfloat16()
    tw = (torch.randn(v, h, device="cuda", generator=g) * 0.02).bfloat16()
    y = torch.randint(0, v, (n,), device="cuda", generator=g)
    grads_mib = (sh.numel() + sw.numel()) * 2 / 2**20
    lines += ["## Fused linear + reverse KL: chunk sweep", "",
              f"N={n}, H={h}, V={v}, bf16; loss = kl.sum(), gradient w.r.t. the student's hidden "
              f"states and weight (the returned gradients are {grads_mib:.0f} MiB and are counted "
              "in the peak). Median of 10 (CUDA events).", "",
              "| provider | chunk rows | fwd+bwd ms | x materialised | peak extra MiB | beyond the gradients MiB |",
              "|---|---|---|---|---|---|"]

    def run(kind, chunk):
        x, w = sh.detach().requires_grad_(), sw.detach().requires_grad_()
        if kind == "materialised":
            with torch.no_grad():
                zt = th @ tw.T
            loss = pyopd.reverse_kl(x @ w.T, zt, y).kl.sum()
        elif kind == "recompute":
            loss = pyopd.fused_linear_reverse_kl(x, w, th, tw, y, chunk_size=chunk).kl.sum()
        else:
            coef = torch.ones(n, device="cuda")
            loss, _ = pyopd.fused_linear_reverse_kl_loss(x, w, th, tw, coef, y, chunk_size=chunk)
        loss.backward()
        return loss

    cases = [("materialised", None)]
    cases += [("recompute", c) for c in (None, 256, 512, 1024, 2048)]
    if hasattr(pyopd, "fused_linear_reverse_kl_loss"):
        cases += [("grad-in-forward", c) for c in (None, 256, 512, 1024, 2048)]
    base_ms = None
    for kind, chunk in cases:
        try:
            ms = _med_ms(lambda: run(kind, chunk))
            mib = _peak(lambda: run(kind, chunk))
        except Exception as e:  # noqa: BLE001 - record it and go on with the sweep
            lines.append(f"| {kind} | {chunk or 'default'} | failed: {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120] if str(e) else ''} | | | |")
            continue
        base_ms = ms if kind == "materialised" else base_ms
        ratio = f"{ms / base_ms:.2f}" if base_ms else "-"
        lines.append(f"| {kind} | {chunk or ('-' if kind == 'materialised' else 'default')} | {ms:.1f} | {ratio} | {mib:.0f} | "
                     f"{mib - grads_mib:.0f} |")
        torch.cuda.empty_cache()
    lines.append("")


def main(out):
    lines = [f"# GPU profile: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
             f"pyopd {pyopd.build_info()}", ""]
    import os

    parts = (fixed_cost, kernel_times, chunk_sweep)
    wanted = os.environ.get("PYOPD_PROFILE_PARTS")  # e.g. "fixed_cost,kernel_times"
    if wanted:
        parts = tuple(p for p in parts if p.__name__ in wanted.split(","))
    for part in parts:
        try:
            part(lines)
        except Exception as e:  # noqa: BLE001
            lines.append(f"{part.__name__} failed: {type(e).__name__}: {e}")
        with open(out, "w") as f:  # after each part: a timeout keeps what was measured
            f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "gpu_profile.md")
