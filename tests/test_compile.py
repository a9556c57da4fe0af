"""The six public ops under torch.compile(fullgraph=True), static and dynamic shapes.

Each compiled result is compared with the eager call on the same inputs (the
same kernels run in both, so forward values match exactly under the
aot_eager backend); the differentiable ops are also compared in backward.
Checks on argument values and on the data (temperature, token ids,
teacher_index, alpha) must still fire inside a compiled graph.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pyopd
from pyopd.ops import distributed
from pyopd.ops.signals import fire_token_weights, group_advantages, trajectory_filter, trajectory_scores
from _helpers import assert_close

MODES = [pytest.param(False, id="static"), pytest.param(True, id="dynamic")]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Each test compiles its own closures; a shared cache would hit the recompile limit.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compile(fn, dynamic: bool, backend: str = "aot_eager"):
    return torch.compile(fn, fullgraph=True, dynamic=dynamic, backend=backend)


def _vocab_inputs(b: int, t: int, v: int, vt: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, t, v, generator=g) * 2
    te = torch.randn(b, t, vt, generator=g) * 2
    y = torch.randint(0, v, (b, t), generator=g)
    mask = torch.rand(b, t, generator=g) > 0.25
    return s, te, y, mask


def _signal_inputs(b: int, t: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return dict(
        lq=-torch.rand(b, t, generator=g) * 3,
        lp=-torch.rand(b, t, generator=g) * 3,
        ht=torch.rand(b, t, generator=g) * 2,
        hs=torch.rand(b, t, generator=g) * 2,
        kl=torch.rand(b, t, generator=g),
        mask=torch.rand(b, t, generator=g) > 0.3,
        teacher=torch.randint(0, 3, (b,), generator=g),
        group=torch.randint(0, 4, (b,), generator=g),
    )


def _assert_same(got, want, what: str) -> None:
    assert type(got) is type(want), what
    for name, a, e in zip(want._fields, got, want):
        assert a.dtype == e.dtype and a.shape == e.shape, f"{what}.{name}"
        assert torch.equal(a, e) or bool(((a == e) | (a.isnan() & e.isnan())).all()), f"{what}.{name}"


# --------------------------------------------------------------------------- vocabulary ops


def _kl_loss(x, t, y, mask, temperature):
    r = pyopd.reverse_kl(x, t, y, mask=mask, temperature=temperature)
    return (r.kl + 0.3 * r.student_entropy - r.student_logprob + 0.1 * r.student_lse).sum(), r


def _ts_loss(x, y, mask, temperature):
    r = pyopd.token_stats(x, y, mask=mask, temperature=temperature)
    return (r.logprob - 0.5 * r.entropy + 0.1 * r.lse).sum(), r


@pytest.mark.parametrize("dynamic", MODES)
def test_reverse_kl_forward_and_backward(dynamic):
    fn = _compile(_kl_loss, dynamic)
    # two shapes and two temperatures: the dynamic graph must serve both
    for (b, t, v, vt), temp, seed in (((2, 5, 37, 40), 0.7, 0), ((3, 4, 50, 50), 1.3, 1)):
        s, te, y, mask = _vocab_inputs(b, t, v, vt, seed)
        x1, x2 = s.clone().requires_grad_(), s.clone().requires_grad_()
        loss_e, r_e = _kl_loss(x1, te, y, mask, temp)
        loss_c, r_c = fn(x2, te, y, mask, temp)
        _assert_same(r_c, r_e, "reverse_kl")
        loss_e.backward()
        loss_c.backward()
        assert torch.equal(x2.grad, x1.grad)


@pytest.mark.parametrize("dynamic", MODES)
def test_token_stats_forward_and_backward(dynamic):
    fn = _compile(_ts_loss, dynamic)
    for (b, t, v), temp, seed in (((2, 5, 33), 0.9, 2), ((4, 3, 64), 2.0, 3)):
        s, _, y, mask = _vocab_inputs(b, t, v, v, seed)
        x1, x2 = s.clone().requires_grad_(), s.clone().requires_grad_()
        loss_e, r_e = _ts_loss(x1, y, mask, temp)
        loss_c, r_c = fn(x2, y, mask, temp)
        _assert_same(r_c, r_e, "token_stats")
        loss_e.backward()
        loss_c.backward()
        assert torch.equal(x2.grad, x1.grad)


@pytest.mark.parametrize("dynamic", MODES)
def test_reverse_kl_backward_functional(dynamic):
    def fn(s, t, y, g, temp):
        return pyopd.reverse_kl_backward(s, t, y, grad_kl=g, grad_logprob=-g, temperature=temp,
                                         grad_dtype=torch.float32)

    cfn = _compile(fn, dynamic)
    for seed, shape in ((4, (2, 3, 21, 30)), (5, (1, 6, 40, 41))):
        s, te, y, _ = _vocab_inputs(*shape, seed)
        s = s.to(torch.bfloat16)
        g = torch.randn(shape[:2], generator=torch.Generator().manual_seed(seed))
        res_e, grad_e = fn(s, te, y, g, 0.8)
        res_c, grad_c = cfn(s, te, y, g, 0.8)
        _assert_same(res_c, res_e, "reverse_kl_backward")
        assert grad_c.dtype == torch.float32 and torch.equal(grad_c, grad_e)


@pytest.mark.parametrize("dynamic", MODES)
def test_vocab_argument_checks_fire_inside_the_graph(dynamic):
    fn = _compile(lambda x, t, y, temp: pyopd.reverse_kl(x, t, y, temperature=temp).kl, dynamic)
    s, te, y, _ = _vocab_inputs(2, 3, 20, 24, 6)
    fn(s, te, y, 1.0)
    bad = y.clone()
    bad[1, 2] = 20
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, 20\).*found 20"):
        fn(s, te, bad, 1.0)
    bad[1, 2] = -3
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, 20\).*found -3"):
        fn(s, te, bad, 1.0)
    for temp in (1e-39, 0.0, -2.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="temperature must"):
            fn(s, te, y, temp)


def test_masked_padding_ids_pass_under_compile():
    fn = _compile(lambda x, y, m: pyopd.token_stats(x, y, mask=m).logprob, True)
    s, _, y, mask = _vocab_inputs(2, 4, 16, 16, 7)
    y = torch.where(mask, y, torch.full_like(y, -100))  # HF-style padding under the mask
    assert torch.equal(fn(s, y, mask), pyopd.token_stats(s, y, mask=mask).logprob)


# --------------------------------------------------------------------------- signal ops


@pytest.mark.parametrize("dynamic", MODES)
@pytest.mark.parametrize("multi", [False, True], ids=["one-teacher", "multi-teacher"])
def test_trajectory_scores_and_filter(dynamic, multi):
    def fn(lq, mask, kl, ht, hs, teacher, p):
        ts = trajectory_scores(lq, mask, kl=kl, teacher_entropy=ht, student_entropy=hs, p=p,
                               teacher_index=teacher)
        tf = trajectory_filter(ts.score, ts.length, p=p, teacher_index=teacher)
        return ts, tf

    cfn = _compile(fn, dynamic)
    for b, t, seed in ((8, 7, 10), (13, 5, 11)):
        d = _signal_inputs(b, t, seed)
        args = (d["lq"], d["mask"], d["kl"], d["ht"], d["hs"], d["teacher"] if multi else None, 30.0)
        for got, want, what in zip(cfn(*args), fn(*args), ("trajectory_scores", "trajectory_filter")):
            _assert_same(got, want, what)


@pytest.mark.parametrize("dynamic", MODES)
@pytest.mark.parametrize("normalize", ["trajectory", "batch"])
def test_fire_token_weights(dynamic, normalize):
    def fn(ht, hs, mask, keep, teacher, alpha, beta):
        return fire_token_weights(ht, hs, mask, keep=keep, alpha=alpha, beta=beta, normalize=normalize,
                                  teacher_index=teacher, num_teachers=3)

    cfn = _compile(fn, dynamic)
    for b, t, seed in ((6, 9, 12), (11, 4, 13)):
        d = _signal_inputs(b, t, seed)
        keep = torch.arange(b) % 4 != 1
        args = (d["ht"], d["hs"], d["mask"], keep, d["teacher"], 0.5, 2.0)
        _assert_same(cfn(*args), fn(*args), "fire_token_weights")


@pytest.mark.parametrize("dynamic", MODES)
def test_group_advantages(dynamic):
    def fn(lq, lp, mask, group, bonus):
        return group_advantages(lq, lp, mask, group, clip_low=-2.0, clip_high=4.0, bonus=bonus)

    cfn = _compile(fn, dynamic)
    for b, t, seed in ((8, 6, 14), (5, 10, 15)):
        d = _signal_inputs(b, t, seed)
        args = (d["lq"], d["lp"], d["mask"], d["group"], 0.05)
        _assert_same(cfn(*args), fn(*args), "group_advantages")


@pytest.mark.parametrize("dynamic", MODES)
def test_signal_checks_fire_inside_the_graph(dynamic):
    d = _signal_inputs(4, 5, 16)
    scores = _compile(lambda lq, m, ti: trajectory_scores(lq, m, teacher_index=ti, num_teachers=2), dynamic)
    scores(d["lq"], d["mask"], torch.tensor([0, 1, 1, 0]))
    with pytest.raises(ValueError, match="teacher_index must be < num_teachers=2"):
        scores(d["lq"], d["mask"], torch.tensor([0, 2, 1, 0]))
    with pytest.raises(ValueError, match="teacher_index must be >= 0"):
        scores(d["lq"], d["mask"], torch.tensor([0, -1, 1, 0]))
    weights = _compile(lambda ht, hs, a: fire_token_weights(ht, hs, alpha=a).weight, dynamic)
    weights(d["ht"], d["hs"], 0.5)
    with pytest.raises(ValueError, match="alpha and beta are too large"):
        weights(d["ht"], d["hs"], 1e39)
    adv = _compile(lambda lq, lp, g, e: group_advantages(lq, lp, None, g, eps=e).advantage, dynamic)
    adv(d["lq"], d["lp"], d["group"], 1e-6)
    with pytest.raises(ValueError, match="eps must be > 0"):
        adv(d["lq"], d["lp"], d["group"], -1e-3)


def test_cross_rank_path_refuses_to_compile(monkeypatch):
    # Pretend torch.distributed has several ranks: with fullgraph the signal ops
    # must refuse to trace their collectives, with a message that says what to do.
    monkeypatch.setattr(distributed, "sync_group", lambda process_group, sync: "several-ranks")
    d = _signal_inputs(3, 4, 17)
    fn = _compile(lambda lq, m: trajectory_scores(lq, m).keep, False)
    with pytest.raises(Exception, match="cross-rank.*runs eagerly only.*sync=False"):
        fn(d["lq"], d["mask"])


def _two_rank_worker(rank: int, store: str, out_dir: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        d = _signal_inputs(6, 5, 40 + rank)  # each rank its own rollouts
        fn = lambda lq, m: trajectory_scores(lq, m, p=50.0)  # noqa: E731
        out = {"eager": fn(d["lq"], d["mask"])}
        # without fullgraph: a graph break, the collectives run eagerly in between
        out["compiled"] = torch.compile(fn, backend="aot_eager")(d["lq"], d["mask"])
        torch._dynamo.reset()  # else the graph-broken frames above would be reused
        try:
            torch.compile(fn, fullgraph=True, backend="aot_eager")(d["lq"], d["mask"])
            out["fullgraph_error"] = ""
        except Exception as e:  # noqa: BLE001  (the message is what is checked)
            out["fullgraph_error"] = str(e)
        local = lambda lq, m: trajectory_scores(lq, m, p=50.0, sync=False)  # noqa: E731
        out["local_eager"] = local(d["lq"], d["mask"])
        out["local_compiled"] = torch.compile(local, fullgraph=True, backend="aot_eager")(d["lq"], d["mask"])
        torch.save({k: (v if isinstance(v, str) else tuple(v)) for k, v in out.items()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.slow  # two spawned interpreters importing torch
def test_two_ranks_under_compile(tmp_path):
    mp.start_processes(_two_rank_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    for r in range(2):
        out = torch.load(tmp_path / f"rank{r}.pt")
        assert all(torch.equal(a, b) for a, b in zip(out["compiled"], out["eager"]))
        assert all(torch.equal(a, b) for a, b in zip(out["local_compiled"], out["local_eager"]))
        # the threshold is over both ranks' rollouts: 12 scored, not this rank's 6
        assert int(out["eager"][7]) > int(out["local_eager"][7])
        assert "runs eagerly only" in out["fullgraph_error"] and "sync=False" in out["fullgraph_error"]


# --------------------------------------------------------------------------- inductor


def test_inductor_backend_dynamic():
    """The default backend too (the custom ops become fallback kernels), one shape change."""
    def fn(x, t, y, mask, temp, ht, hs, lq, group):
        loss, r = _kl_loss(x, t, y, mask, temp)
        w = fire_token_weights(ht, hs, mask)
        a = group_advantages(lq, -r.student_logprob.detach(), mask, group)
        return loss, w.weight, a.advantage

    cfn = _compile(fn, True, backend="inductor")
    for shape, seed in (((2, 5, 37, 40), 20), ((3, 4, 30, 33), 21)):
        s, te, y, mask = _vocab_inputs(*shape, seed)
        d = _signal_inputs(shape[0], shape[1], seed)
        x1, x2 = s.clone().requires_grad_(), s.clone().requires_grad_()
        out_e = fn(x1, te, y, mask, 0.9, d["ht"], d["hs"], d["lq"], d["group"])
        out_c = cfn(x2, te, y, mask, 0.9, d["ht"], d["hs"], d["lq"], d["group"])
        for a, e, what in zip(out_c, out_e, ("loss", "weight", "advantage")):
            assert_close(a, e, atol=1e-5, rtol=1e-5, what=what)
        out_e[0].backward()
        out_c[0].backward()
        assert_close(x2.grad, x1.grad, atol=1e-6, rtol=1e-5, what="grad")


# --------------------------------------------------------------------------- opcheck


def _opcheck_cases():
    g = torch.Generator().manual_seed(30)
    B, T = 5, 7
    lq, ht, hs = -torch.rand(B, T, generator=g), torch.rand(B, T, generator=g), torch.rand(B, T, generator=g)
    m = torch.rand(B, T, generator=g) > 0.3
    ti = torch.tensor([0, 1, 1, 0, 2])
    s, t = torch.randn(6, 11, generator=g, requires_grad=True), torch.randn(6, 13, generator=g)
    y = torch.randint(0, 11, (6,), generator=g)
    fwd = torch.ops.pyopd.vocab_stats_fwd(s.detach(), t, y, None, 0.8)
    ops = torch.ops.pyopd
    return {
        "trajectory_scores": (ops.trajectory_scores.default, (lq, m, hs, ht, hs, ti, None, 30.0)),
        "trajectory_scores_k": (ops.trajectory_scores.default, (lq, None, None, None, None, ti, 4, 30.0)),
        "trajectory_filter": (ops.trajectory_filter.default,
                              (lq[:, 0], torch.tensor([1, 0, 3, 2, 2]), None, None, 50.0)),
        "fire_token_weights": (ops.fire_token_weights.default,
                               (ht, hs, m, torch.tensor([True, False, True, True, True]), ti, 3, 1.0, 2.0,
                                "batch")),
        "group_advantages": (ops.group_advantages.default,
                             (lq, hs, m, torch.tensor([3, 3, -1, 5, 5]), -3.0, 5.0, 0.02, 1e-6)),
        "checked_tokens": (ops.checked_tokens.default,
                           (torch.tensor([[1, 2], [3, 4]]), torch.tensor([[True, False], [True, True]]), 10)),
        "vocab_stats_fwd": (ops.vocab_stats_fwd.default, (s, t, y, None, 1.25)),
        "vocab_stats_bwd": (ops.vocab_stats_bwd.default,
                            (s.detach(), t, y, None, fwd[7], fwd[0], fwd[1], torch.ones(6), None, None, None,
                             0.8, torch.float32)),
    }


@pytest.mark.parametrize("name", list(_opcheck_cases()))
def test_opcheck(name):
    # torch's own consistency check of a custom op: schema, autograd registration,
    # fake (meta) implementation vs the real one, and AOT dispatch with dynamic shapes
    op, args = _opcheck_cases()[name]
    torch.library.opcheck(op, args)
