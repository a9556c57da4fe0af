"""pyopd's verl plug-in, called through verl's own registries (needs verl >= 0.9 installed).

Every registered function is looked up with verl's `get_adv_estimator_fn` /
`get_policy_loss_fn` and called the way verl calls it (verl 0.9.1:
`ray_trainer.compute_advantage` / `workers.utils.losses.ppo_loss`), then
compared with pyopd's own functions in float64, and the PPO losses also with
verl's own "vanilla" loss.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos", reason="verl is not installed")

import pyopd.integrations.verl as pv  # noqa: E402  (registers on import)
from pyopd.losses import copsd_loss, copsd_signals, fire_opd_loss, fire_opd_signals, opd_loss  # noqa: E402

from _helpers import assert_close  # noqa: E402

F64 = torch.float64
get_adv = core_algos.get_adv_estimator_fn
get_loss = core_algos.get_policy_loss_fn


def actor_config(**kw):
    from verl.workers.config import ActorConfig

    base = dict(strategy="fsdp", ppo_micro_batch_size_per_gpu=1, rollout_n=1, clip_ratio=0.2)
    base.update(kw)
    return ActorConfig(**base)


def rollout(B=8, T=7, seed=0, groups=4):
    """A verl-shaped batch: right-padded responses, one empty row, a 1e4-scale outlier."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[3] = 0  # an empty response
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(torch.int64)  # verl's masks are int / float
    old = -torch.rand(B, T, generator=g, dtype=F64) * 3
    lq = -torch.rand(B, T, generator=g, dtype=F64) * 4
    lq[5, 0] = -1e4  # a token the teacher finds (almost) impossible
    logprob = (old + 0.3 * torch.randn(B, T, generator=g, dtype=F64)).requires_grad_(True)
    hs = torch.rand(B, T, generator=g, dtype=F64) * 2
    ht = torch.rand(B, T, generator=g, dtype=F64) * 2
    uid = np.array([f"prompt-{i % groups}" for i in range(B)], dtype=object)
    return dict(mask=mask, old=old, lq=lq, logprob=logprob, hs=hs, ht=ht, uid=uid,
                rewards=torch.zeros(B, T, dtype=F64))


def estimate(name, r, config=None, **kw):
    args = dict(teacher_log_prob=r["lq"], old_log_probs=r["old"], student_entropy=r["hs"])
    args.update(kw)
    return get_adv(name)(token_level_rewards=r["rewards"], response_mask=r["mask"], config=config,
                         index=r["uid"], **args)


def call_loss(name, r, adv, config, mask=None, rows=slice(None), agg="token-mean"):
    m = r["mask"] if mask is None else mask
    return get_loss(name)(old_log_prob=r["old"][rows], log_prob=r["logprob"][rows], advantages=adv[rows],
                          response_mask=m[rows].bool(), loss_agg_mode=agg, config=config,
                          rollout_is_weights=None)


def grad_of(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


def test_registered_in_verls_registries():
    for m in pv.METHODS:
        assert get_adv(m).__name__ == f"compute_{m}_advantage"
        assert get_loss(m).__name__ == f"compute_policy_loss_{m}"
    # importing again must not trip verl's duplicate-registration check
    import importlib

    importlib.reload(pv)
    assert "pyopd_fire" in core_algos.ADV_ESTIMATOR_REGISTRY


def test_import_through_verl_external_modules_env(tmp_path):
    """VERL_USE_EXTERNAL_MODULES (read by `import verl` in every process) registers the plug-in."""
    import subprocess
    import sys

    from _helpers import subprocess_env

    env = subprocess_env(VERL_USE_EXTERNAL_MODULES="pyopd.integrations.verl")
    code = ("import verl\nfrom verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY as P, "
            "ADV_ESTIMATOR_REGISTRY as A\nprint(sorted(k for k in P if k.startswith('pyopd')), "
            "sorted(k for k in A if k.startswith('pyopd')))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    want = sorted(pv.METHODS)
    assert out.stdout.strip() == f"{want} {want}"


# ---- advantage estimators (driver) ---------------------------------------------------------


def test_opd_estimator_is_teacher_minus_old():
    r = rollout()
    adv, ret = estimate("pyopd_opd", r)
    m = r["mask"].bool()
    assert_close(adv, torch.where(m, r["lq"] - r["old"], torch.zeros((), dtype=F64)), atol=0, what="adv")
    assert torch.equal(adv, ret)


@pytest.mark.parametrize("preset", ["paper", "released"])
def test_copsd_estimator_matches_copsd_signals(preset):
    r = rollout(seed=1)
    cfg = {"pyopd": {"preset": preset, "reward_bonus": 0.05}}
    adv, _ = estimate("pyopd_copsd", r, config=cfg)
    ids = torch.tensor([int(u.split("-")[1]) for u in r["uid"]])
    want, _ = copsd_signals(r["lq"], r["old"], r["mask"].bool(), ids, reward_bonus=0.05, preset=preset, sync=False)
    assert_close(adv, want, atol=1e-12, what=f"copsd advantages ({preset})")
    assert float(adv.abs().sum()) > 0


def test_fire_estimator_matches_fire_opd_signals():
    r = rollout(B=10, seed=2)
    cfg = {"pyopd": {"p": 30.0, "alpha": 0.5, "beta": 2.0, "teacher_entropy_field": "teacher_entropy"}}
    adv, _ = estimate("pyopd_fire", r, config=cfg, teacher_entropy=r["ht"])
    m = r["mask"].bool()
    sig = fire_opd_signals(r["lq"], m, teacher_entropy=r["ht"], student_entropy=r["hs"], p=30.0, alpha=0.5,
                           beta=2.0, sync=False)
    assert 0 < int(sig.keep.sum()) < int(m.any(-1).sum())  # the filter did drop something
    want = torch.where(m & sig.keep[:, None], sig.weight * (r["lq"] - r["old"]), torch.zeros((), dtype=F64))
    assert_close(adv, want, atol=1e-12, what="fire advantages")
    # the driver step also removes dropped rollouts from the response mask
    res = pv.compute_pyopd_advantage(
        {"response_mask": r["mask"], "old_log_probs": r["old"], "teacher_log_prob": r["lq"], "entropy": r["hs"],
         "teacher_entropy": r["ht"]}, "pyopd_fire", cfg, index=r["uid"])
    assert torch.equal(res.response_mask, m & sig.keep[:, None])
    assert torch.equal(res.keep, sig.keep)
    assert_close(res.advantages, adv, atol=0, what="driver vs registry")
    assert res.metrics["keep_ratio"] == sig.metrics["keep_ratio"]


def test_fire_estimator_released_preset_per_micro_batch():
    r = rollout(B=8, seed=3)
    cfg = {"pyopd": {"preset": "released", "micro_batch": 4, "teacher_entropy_field": "h"}}
    adv, _ = estimate("pyopd_fire", r, config=cfg, teacher_entropy=r["ht"])
    m = r["mask"].bool()
    sig = fire_opd_signals(r["lq"], m, teacher_entropy=r["ht"], student_entropy=r["hs"], preset="released",
                           micro_batch=4)
    want = torch.where(m & sig.keep[:, None], sig.weight * (r["lq"] - r["old"]), torch.zeros((), dtype=F64))
    assert_close(adv, want, atol=1e-12, what="fire released advantages")


def test_fire_without_teacher_entropy_needs_alpha_zero():
    r = rollout(seed=4)
    with pytest.raises(ValueError, match="teacher_entropy"):
        estimate("pyopd_fire", r)
    adv, _ = estimate("pyopd_fire", r, config={"pyopd": {"alpha": 0.0}})
    m = r["mask"].bool()
    # alpha = 0: the teacher-confidence factor is 1 for any H_t
    sig = fire_opd_signals(r["lq"], m, teacher_entropy=r["ht"], student_entropy=r["hs"], alpha=0.0, sync=False)
    want = torch.where(m & sig.keep[:, None], sig.weight * (r["lq"] - r["old"]), torch.zeros((), dtype=F64))
    assert_close(adv, want, atol=1e-12, what="fire alpha=0")


def test_estimators_name_what_is_missing():
    r = rollout()
    for m in pv.METHODS:
        with pytest.raises(ValueError, match="teacher_log_prob.*pyopd_sync"):
            # exactly what verl's stock compute_advantage passes
            get_adv(m)(token_level_rewards=r["rewards"], response_mask=r["mask"], config=None, index=r["uid"])
    with pytest.raises(ValueError, match="index"):
        get_adv("pyopd_copsd")(token_level_rewards=r["rewards"], response_mask=r["mask"],
                               teacher_log_prob=r["lq"], old_log_probs=r["old"])
    with pytest.raises(ValueError, match="unknown option.*'q'"):
        estimate("pyopd_opd", r, config={"pyopd": {"q": 1}})
    with pytest.raises(ValueError, match="old_log_probs must have the shape"):
        estimate("pyopd_opd", r, old_log_probs=r["old"][:, :3])
    with pytest.raises(ValueError, match="micro_batch"):
        estimate("pyopd_fire", r, config={"pyopd": {"preset": "released"}}, teacher_entropy=r["ht"])


def test_options_from_omegaconf_algorithm_config():
    from omegaconf import OmegaConf

    algo = OmegaConf.create({"adv_estimator": "pyopd_fire", "pyopd": {"p": 10, "reward_clip": [-1, 2]}})
    o = pv.options(algo)
    assert o["p"] == 10 and o["reward_clip"] == (-1, 2) and o["preset"] == "paper"


# ---- policy losses (actor) -----------------------------------------------------------------


def test_opd_policy_loss_matches_opd_loss_and_verl_vanilla():
    r = rollout(seed=5)
    adv, _ = estimate("pyopd_opd", r)
    cfg = actor_config(clip_ratio_low=0.1, clip_ratio_high=0.28)
    loss, metrics = call_loss("pyopd_opd", r, adv, cfg)
    want, wm = opd_loss(r["logprob"], r["old"], r["lq"], r["mask"].bool(), clip_ratio_low=0.1, clip_ratio_high=0.28)
    assert_close(loss, want, atol=1e-12, what="loss")
    assert_close(grad_of(loss, r["logprob"]), grad_of(want, r["logprob"]), atol=1e-12, what="grad")
    assert metrics["actor/pg_clipfrac"] == pytest.approx(wm["pg_clipfrac"], abs=1e-12)
    # verl's own loss with a dual clip that never binds is the same surrogate
    vanilla, _ = call_loss("vanilla", r, adv, actor_config(clip_ratio_low=0.1, clip_ratio_high=0.28, clip_ratio_c=1e30))
    assert_close(loss, vanilla, atol=1e-12, what="vs verl vanilla")


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_copsd_policy_loss_matches_copsd_loss_and_verl_vanilla(agg):
    r = rollout(seed=6)
    adv, _ = estimate("pyopd_copsd", r)
    # off-policy enough that the clips and the dual clip bind
    r["logprob"] = (r["old"] + torch.randn(r["old"].shape, generator=torch.Generator().manual_seed(0),
                                           dtype=F64)).requires_grad_(True)
    cfg = actor_config(clip_ratio_c=3.0)
    loss, metrics = call_loss("pyopd_copsd", r, adv, cfg, agg=agg)
    want, wm = copsd_loss(r["logprob"], r["old"], None, r["mask"].bool(), advantages=adv, dual_clip=3.0, agg=agg)
    assert wm["pg_clipfrac_lower"] > 0
    assert_close(loss, want, atol=1e-12, what="loss")
    assert_close(grad_of(loss, r["logprob"]), grad_of(want, r["logprob"]), atol=1e-12, what="grad")
    vanilla, vm = call_loss("vanilla", r, adv, cfg, agg=agg)
    # verl divides a row by (n + 1e-8) in seq-mean-token-mean
    assert_close(loss, vanilla, atol=1e-9, what="vs verl vanilla")
    # verl takes its masked means in float32
    assert metrics["actor/pg_clipfrac_lower"] == pytest.approx(vm["actor/pg_clipfrac_lower"], abs=1e-7)


def test_fire_policy_loss_micro_batches_sum_to_fire_opd_loss():
    """Driver signals once, the actor's micro-batch losses with verl's global token count
    add up to pyopd's whole-batch FiRe-OPD loss (value and gradient)."""
    r = rollout(B=10, seed=7)
    cfg = {"pyopd": {"teacher_entropy_field": "h"}}
    res = pv.compute_pyopd_advantage(
        {"response_mask": r["mask"], "old_log_probs": r["old"], "teacher_log_prob": r["lq"], "entropy": r["hs"],
         "h": r["ht"]}, "pyopd_fire", cfg, index=r["uid"])
    m = r["mask"].bool()
    sig = fire_opd_signals(r["lq"], m, teacher_entropy=r["ht"], student_entropy=r["hs"], sync=False)
    want, _ = fire_opd_loss(r["logprob"], r["old"], r["lq"], m, keep=sig.keep, weight=sig.weight)
    actor = actor_config()
    # what verl's ppo_loss puts in global_batch_info: dp size and the mini-batch's token count
    actor.global_batch_info.update(dp_size=1, batch_num_tokens=int(res.response_mask.sum()), global_batch_size=10)
    total = sum(call_loss("pyopd_fire", r, res.advantages, actor, mask=res.response_mask, rows=rows)[0]
                for rows in (slice(0, 3), slice(3, 7), slice(7, 10)))
    assert_close(total, want, atol=1e-12, what="loss")
    assert_close(grad_of(total, r["logprob"]), grad_of(want, r["logprob"]), atol=1e-12, what="grad")


def test_policy_loss_dp_scaling_matches_verl():
    """With dp_size = 2 verl scales a rank's loss by dp / global count; so does the plug-in."""
    r = rollout(seed=8)
    adv, _ = estimate("pyopd_opd", r)
    cfg = actor_config(clip_ratio_c=1e30)
    cfg.global_batch_info.update(dp_size=2, batch_num_tokens=3 * int(r["mask"].sum()), global_batch_size=20)
    for agg in ("token-mean", "seq-mean-token-sum"):
        ours, _ = call_loss("pyopd_opd", r, adv, cfg, agg=agg)
        vanilla, _ = call_loss("vanilla", r, adv, cfg, agg=agg)
        assert_close(ours, vanilla, atol=1e-12, what=agg)


def test_policy_loss_errors():
    r = rollout()
    adv, _ = estimate("pyopd_opd", r)
    cfg = actor_config()
    with pytest.raises(ValueError, match="loss_agg_mode 'token-sum'"):
        call_loss("pyopd_fire", r, adv, cfg, agg="token-sum")
    with pytest.raises(ValueError, match="rollout_is_weights"):
        get_loss("pyopd_fire")(r["old"], r["logprob"], adv, r["mask"], "token-mean", cfg, torch.ones_like(adv))
    cfg.global_batch_info.update(dp_size=2)
    with pytest.raises(ValueError, match="global batch info"):
        call_loss("pyopd_copsd", r, adv, cfg)


def test_empty_batch_gives_zero_loss():
    r = rollout(B=6, T=4)
    r["mask"] = torch.zeros_like(r["mask"])
    adv, _ = estimate("pyopd_copsd", r)
    assert torch.equal(adv, torch.zeros_like(adv))
    loss, _ = call_loss("pyopd_copsd", r, adv, actor_config())
    assert float(loss.detach()) == 0.0 and torch.isfinite(grad_of(loss, r["logprob"])).all()


# ---- the v1 trainer mode -------------------------------------------------------------------


def test_trainer_mode_registered_or_reason_given():
    reason = pv.trainer_unavailable_reason()
    if reason is not None:
        pytest.skip(f"verl's v1 trainer does not import here: {reason}")
    from verl.trainer.ppo.v1.trainer_base import get_trainer_cls
    from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

    assert issubclass(get_trainer_cls(pv.TRAINER_MODE), PPOTrainerSync)


def test_trainer_mode_advantage_step_reads_teacher_logprobs(monkeypatch):
    """The "pyopd_sync" trainer's advantage step on a fake TransferQueue holding what verl
    0.9.1 stores: nested response fields, and teacher_logprobs over prompt + response [S, 1]."""
    reason = pv.trainer_unavailable_reason()
    if reason is not None:
        pytest.skip(f"verl's v1 trainer does not import here: {reason}")
    import transfer_queue as tq
    from omegaconf import OmegaConf
    from tensordict import NonTensorData, NonTensorStack, TensorDict
    from transfer_queue import KVBatchMeta
    from verl.trainer.ppo.v1.trainer_base import get_trainer_cls

    g = torch.Generator().manual_seed(11)
    resp = [3, 5, 1, 4, 2, 5]
    prompt = [2, 1, 4, 3, 2, 1]
    uids = ["u0", "u0", "u0", "u1", "u1", "u1"]
    old = [-torch.rand(n, generator=g) * 2 for n in resp]
    hs = [torch.rand(n, generator=g) for n in resp]
    teacher = [-torch.rand(p + n, 1, generator=g) * 3 for p, n in zip(prompt, resp)]

    def nest(xs):
        return torch.nested.as_nested_tensor(xs, layout=torch.jagged)

    store = TensorDict({
        "uid": NonTensorStack(*[NonTensorData(u) for u in uids]),
        "response_mask": nest([torch.ones(n, dtype=torch.int64) for n in resp]),
        "old_log_probs": nest(old), "entropy": nest(hs), "teacher_logprobs": nest(teacher),
    }, batch_size=len(resp))
    written = {}

    def kv_batch_get(keys, partition_id, select_fields):
        return store.select(*select_fields)

    def kv_batch_put(keys, partition_id, fields):
        written.update(fields.items())
        return "batch-after-put"

    monkeypatch.setattr(tq, "kv_batch_get", kv_batch_get)
    monkeypatch.setattr(tq, "kv_batch_put", kv_batch_put)
    trainer = object.__new__(get_trainer_cls(pv.TRAINER_MODE))
    trainer.config = OmegaConf.create({"distillation": {"enabled": True}, "algorithm": {
        "adv_estimator": "pyopd_fire", "use_kl_in_reward": False, "pyopd": {"alpha": 0.0, "p": 34.0},
        "rollout_correction": {"rollout_is": None, "rollout_rs": "token", "bypass_mode": False}}})
    batch = KVBatchMeta(keys=[f"k{i}" for i in range(len(resp))], tags=[{}] * len(resp), partition_id="train")
    metrics: dict = {}
    # settings whose effect the pyopd step would drop are refused, by name
    with pytest.raises(ValueError, match="rollout_correction.rollout_rs"):
        trainer._compute_advantage(batch, metrics)
    trainer.config.algorithm.rollout_correction.rollout_rs = None
    trainer.config.distillation.enabled = False
    with pytest.raises(ValueError, match="distillation.enabled"):
        trainer._compute_advantage(batch, metrics)
    trainer.config.distillation.enabled = True
    assert trainer._compute_advantage(batch, metrics) == "batch-after-put"

    # expected, by hand: the teacher's response slice as verl's distillation loss takes it
    # (positions S - n - 1 .. S - 2 of the sequence), padded to [B, T]
    T = max(resp)
    mask = torch.zeros(len(resp), T, dtype=torch.bool)
    lq, o, h = (torch.zeros(len(resp), T) for _ in range(3))
    for i, (p, n) in enumerate(zip(prompt, resp)):
        mask[i, :n] = True
        lq[i, :n] = teacher[i][p - 1: p + n - 1, 0]
        o[i, :n], h[i, :n] = old[i], hs[i]
    sig = fire_opd_signals(lq, mask, teacher_entropy=torch.zeros_like(h), student_entropy=h, p=34.0, alpha=0.0,
                           sync=False)
    assert int(sig.keep.sum()) == 4  # floor(0.34 * 6) = 2 rollouts dropped
    want = torch.where(mask & sig.keep[:, None], sig.weight * (lq - o), torch.zeros(()))
    got = written["advantages"].to_padded_tensor(0.0)
    assert_close(got, want, atol=1e-6, what="advantages written back")
    new_mask = written["response_mask"].to_padded_tensor(0)
    assert torch.equal(new_mask.bool(), mask & sig.keep[:, None])
    assert written["response_mask"].offsets().diff().tolist() == resp  # lengths unchanged, rows zeroed
    assert metrics["pyopd/keep_ratio"] == pytest.approx(4 / 6)


@pytest.mark.parametrize("method", ["fire", "copsd", "opd"])
def test_example_overrides_compose_with_verls_config(method, tmp_path):
    """examples/verl's launch script: its overrides compose with verl's own Hydra config
    (verl's schema, not a run) and name registered pyopd functions."""
    import os
    import pathlib
    import subprocess

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import verl
    from verl.utils.config import omega_conf_to_dataclass

    script = pathlib.Path(__file__).resolve().parents[1] / "examples" / "verl" / "run_opd_qwen3_4b_8gpu.sh"
    text = script.read_text()
    launch = "python3 -m verl.trainer.main_ppo"
    assert text.count(launch) == 1
    dry = tmp_path / "args.sh"
    dry.write_text(text.replace(launch, 'printf "%s\\n"'))
    out = subprocess.run(["bash", str(dry)], env=dict(os.environ, METHOD=method), capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    overrides = [a for a in out.stdout.splitlines() if a.strip()]
    cfg_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=cfg_dir, version_base=None):
        cfg = compose(config_name="ppo_trainer", overrides=overrides)
    name = f"pyopd_{method}"
    assert cfg.algorithm.adv_estimator == name and get_adv(name) is core_algos.ADV_ESTIMATOR_REGISTRY[name]
    assert cfg.actor_rollout_ref.actor.policy_loss.loss_mode == name and get_loss(name)
    assert cfg.trainer.v1.trainer_mode == pv.TRAINER_MODE
    opts = pv.options(cfg.algorithm)
    if method == "fire":
        assert opts["alpha"] == 0.0 and opts["p"] == 20
    loss_cfg = omega_conf_to_dataclass(cfg.distillation.distillation_loss)
    assert loss_cfg.loss_mode == "k1" and loss_cfg.distillation_loss_coef == 0.0 and loss_cfg.use_task_rewards
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    assert actor.use_kl_loss == (method == "copsd")
    assert OmegaConf.select(cfg, "algorithm.rollout_correction.rollout_is") is None
