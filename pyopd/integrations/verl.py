"""verl plug-in: pyopd's OPD, FiRe-OPD and COPSD inside verl (>= 0.9) PPO training.

Importing this module registers, in verl's own registries
(`verl.trainer.ppo.core_algos`):

- advantage estimators "pyopd_opd", "pyopd_fire", "pyopd_copsd"
  (`algorithm.adv_estimator`): the batch-level signal, computed once on the
  driver over the whole rollout batch (FiRe-OPD's filter and token weights,
  COPSD's group advantages, OPD's log q - log p_old);
- policy losses of the same names (`actor_rollout_ref.actor.policy_loss.loss_mode`):
  the per-micro-batch PPO surrogate with the method's clipping, via
  `pyopd.losses.ppo_policy_loss`;
- a v1 trainer mode "pyopd_sync" (`trainer.v1.trainer_mode`): verl's synchronous
  trainer whose advantage step also reads the teacher's log-probs (verl's
  distillation path, `teacher_logprobs`) and the student entropies computed
  with the old log-probs, calls the estimator, and drops FiRe-filtered
  rollouts from `response_mask` (as verl's own rejection sampling does).

verl's stock advantage step passes an estimator only `token_level_rewards`,
`response_mask`, `config` and `index`; the teacher's log-probs never reach
it. That is why the trainer mode exists. The estimators take the extra
tensors as keyword arguments and raise a ValueError naming the missing one.

Method options come from `algorithm.pyopd.*` (see `DEFAULTS`, docs/verl.md).
Make verl's processes import the plug-in with
`VERL_USE_EXTERNAL_MODULES=pyopd.integrations.verl` (read by `import verl`
in every process, Ray workers included when the variable is forwarded).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import numpy as np
import torch

from verl.trainer.ppo.core_algos import (
    ADV_ESTIMATOR_REGISTRY,
    POLICY_LOSS_REGISTRY,
    register_adv_est,
    register_policy_loss,
)

from pyopd.losses import copsd_signals, fire_opd_signals, ppo_policy_loss

__all__ = [
    "DEFAULTS",
    "METHODS",
    "TRAINER_MODE",
    "PyopdAdvantage",
    "compute_pyopd_advantage",
    "options",
    "trainer_unavailable_reason",
]

METHODS = ("pyopd_opd", "pyopd_fire", "pyopd_copsd")
TRAINER_MODE = "pyopd_sync"

# algorithm.pyopd.* keys, with pyopd's paper defaults (docs/presets.md).
DEFAULTS: dict[str, Any] = {
    "preset": "paper",  # "paper" or "released"
    # FiRe-OPD
    "p": 20.0,  # % of rollouts dropped by length-normalised teacher log-prob
    "alpha": 1.0,  # teacher-confidence strength
    "beta": 1.0,  # student-confusion strength
    "normalize": "trajectory",  # weights average 1 per rollout ("batch": over the batch)
    "micro_batch": None,  # preset "released": rows per micro-batch of the authors' per-micro-batch signals
    "teacher_entropy_field": None,  # batch field holding H_t [B, T]; None: none (needs alpha = 0)
    # COPSD
    "reward_clip": (-3.0, 5.0),
    "reward_bonus": 0.02,
    "adv_eps": 1e-6,
}


def options(config: Any) -> dict[str, Any]:
    """`algorithm.pyopd` of a verl config (DictConfig, dataclass, dict or None) merged over DEFAULTS."""
    raw: Any = None
    if config is not None:
        if isinstance(config, Mapping) or hasattr(config, "get"):
            raw = config.get("pyopd", None)
        else:
            raw = getattr(config, "pyopd", None)
    if raw is None:
        return dict(DEFAULTS)
    try:  # DictConfig -> plain containers (tuples arrive as ListConfig)
        from omegaconf import DictConfig, OmegaConf

        if isinstance(raw, DictConfig):
            raw = OmegaConf.to_container(raw, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a verl dependency
        pass
    if not isinstance(raw, Mapping):
        raise ValueError(f"algorithm.pyopd must be a mapping of options, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"algorithm.pyopd: unknown option(s) {unknown}; known: {sorted(DEFAULTS)}")
    out = {**DEFAULTS, **raw}
    out["reward_clip"] = tuple(out["reward_clip"])
    return out


# ---- driver side: the batch-level signal ----------------------------------------------


@dataclass
class PyopdAdvantage:
    """What the driver writes back: advantages [B, T], the response mask [B, T]
    (FiRe-dropped rollouts removed), keep [B] bool, and plain-float metrics."""

    advantages: torch.Tensor
    response_mask: torch.Tensor
    keep: torch.Tensor
    metrics: dict


def _need(name: str, method: str, t: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    if t is None:
        raise ValueError(
            f"{method} needs {name} [B, T]; verl's stock advantage step does not pass it: "
            f"run with trainer.v1.trainer_mode={TRAINER_MODE} and distillation.enabled=True"
        )
    if tuple(t.shape) != tuple(like.shape):
        raise ValueError(f"{name} must have the shape of response_mask {tuple(like.shape)}, got {tuple(t.shape)}")
    return t


def _group_ids(index: Any, B: int, device: torch.device) -> torch.Tensor:
    """verl's `index` (the prompt uid of each row, strings in a numpy object array) as [B] int64."""
    if index is None:
        raise ValueError("pyopd_copsd needs index (verl's per-row prompt uid) to form groups")
    arr = np.asarray(index, dtype=object).reshape(-1)
    if arr.shape[0] != B:
        raise ValueError(f"index must have one uid per row ({B}), got {arr.shape[0]}")
    _, inverse = np.unique(arr.astype(str), return_inverse=True)
    return torch.as_tensor(inverse.reshape(-1), dtype=torch.int64, device=device)


def _signals(
    method: str,
    response_mask: torch.Tensor,
    *,
    config: Any,
    index: Any,
    teacher_log_prob: Optional[torch.Tensor],
    old_log_probs: Optional[torch.Tensor],
    student_entropy: Optional[torch.Tensor],
    teacher_entropy: Optional[torch.Tensor],
) -> PyopdAdvantage:
    opts = options(config)
    if response_mask.dim() != 2:
        raise ValueError(f"response_mask must be [B, T], got shape {tuple(response_mask.shape)}")
    mask = response_mask.bool()
    B = mask.shape[0]
    lq = _need("teacher_log_prob", method, teacher_log_prob, mask)
    old = _need("old_log_probs", method, old_log_probs, mask)
    zero = torch.zeros((), dtype=old.dtype, device=old.device)
    # The driver sees the whole batch in one process: no cross-rank reduction.
    if method == "pyopd_opd":
        adv = torch.where(mask, lq.to(old.dtype) - old, zero)
        keep = torch.ones(B, dtype=torch.bool, device=mask.device)
        metrics = {"reward_mean": float(adv.sum() / mask.sum().clamp(min=1))}
        return PyopdAdvantage(adv.detach(), mask, keep, metrics)
    if method == "pyopd_copsd":
        adv, metrics = copsd_signals(
            lq, old, mask, _group_ids(index, B, mask.device), reward_clip=opts["reward_clip"],
            reward_bonus=opts["reward_bonus"], adv_eps=opts["adv_eps"], preset=opts["preset"], sync=False,
        )
        return PyopdAdvantage(adv.detach(), mask, torch.ones(B, dtype=torch.bool, device=mask.device), metrics)
    if method == "pyopd_fire":
        hs = _need("student_entropy", method, student_entropy, mask)
        if teacher_entropy is None:
            # verl 0.9's teacher returns log-probs only. With alpha = 0 the teacher
            # confidence (1 + alpha c_t) is 1 whatever H_t is, so zeros are exact.
            if float(opts["alpha"]) != 0.0:
                raise ValueError(
                    "pyopd_fire needs teacher_entropy [B, T] (set algorithm.pyopd.teacher_entropy_field to a "
                    "batch field holding it); verl's teacher path gives only log-probs. Without it set "
                    "algorithm.pyopd.alpha=0 (no teacher-confidence term)"
                )
            ht = torch.zeros_like(hs)
        else:
            ht = _need("teacher_entropy", method, teacher_entropy, mask)
        kw: dict[str, Any] = {}
        if opts["preset"] == "released":
            kw["micro_batch"] = opts["micro_batch"]
        else:
            kw["normalize"] = opts["normalize"]
            kw["sync"] = False
        sig = fire_opd_signals(
            lq, mask, teacher_entropy=ht, student_entropy=hs, p=float(opts["p"]), alpha=float(opts["alpha"]),
            beta=float(opts["beta"]), preset=opts["preset"], **kw,
        )
        new_mask = mask & sig.keep.view(B, 1)
        reward = lq.to(old.dtype) - old
        adv = torch.where(new_mask, sig.weight.to(old.dtype) * reward, zero)
        return PyopdAdvantage(adv.detach(), new_mask, sig.keep, dict(sig.metrics))
    raise ValueError(f"unknown pyopd method {method!r}; one of {METHODS}")


def _estimator(method: str):
    def estimator(
        token_level_rewards: torch.Tensor,
        response_mask: torch.Tensor,
        config: Any = None,
        index: Any = None,
        *,
        teacher_log_prob: Optional[torch.Tensor] = None,
        old_log_probs: Optional[torch.Tensor] = None,
        student_entropy: Optional[torch.Tensor] = None,
        teacher_entropy: Optional[torch.Tensor] = None,
        **unused: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # token_level_rewards (the task reward) is not part of these objectives: the
        # teacher's log-probs are the reward. Returns (advantages, returns), both [B, T].
        r = _signals(method, response_mask, config=config, index=index, teacher_log_prob=teacher_log_prob,
                     old_log_probs=old_log_probs, student_entropy=student_entropy,
                     teacher_entropy=teacher_entropy)
        return r.advantages, r.advantages

    estimator.__name__ = f"compute_{method}_advantage"
    estimator.__qualname__ = estimator.__name__
    estimator.__doc__ = (
        f"verl advantage estimator {method!r}: (token_level_rewards, response_mask [B, T], config, index, "
        "teacher_log_prob=, old_log_probs=, student_entropy=, teacher_entropy=) -> (advantages, returns). "
        "Advantages are 0 on FiRe-dropped rollouts; use compute_pyopd_advantage to also get the new mask."
    )
    return estimator


def compute_pyopd_advantage(
    batch: Mapping[str, torch.Tensor],
    method: str,
    config: Any = None,
    index: Any = None,
) -> PyopdAdvantage:
    """The driver step: pyopd's signal of a whole rollout batch from verl batch fields.

    `batch` holds padded, response-aligned [B, T] tensors: "response_mask",
    "old_log_probs", "teacher_log_prob" (the teacher's log-prob of the sampled
    token), "entropy" (the student's, from the old-log-prob pass) and, when
    `algorithm.pyopd.teacher_entropy_field` names one, that field. `index`: the
    per-row prompt uid (`non_tensor_batch["uid"]`). `config`: `config.algorithm`.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if "response_mask" not in batch:
        raise ValueError("batch must hold response_mask")
    field = options(config)["teacher_entropy_field"]
    if field is not None and field not in batch:
        raise ValueError(f"algorithm.pyopd.teacher_entropy_field={field!r} is not a batch field")
    return _signals(
        method, batch["response_mask"], config=config, index=index, teacher_log_prob=batch.get("teacher_log_prob"),
        old_log_probs=batch.get("old_log_probs"), student_entropy=batch.get("entropy"),
        teacher_entropy=None if field is None else batch[field],
    )


# ---- actor side: the per-micro-batch PPO surrogate -------------------------------------


def _cfg(config: Any, key: str, default: Any = None) -> Any:
    if config is None:
        return default
    if isinstance(config, Mapping) or hasattr(config, "get"):
        try:
            return config.get(key, default)
        except (AttributeError, KeyError):
            pass
    return getattr(config, key, default)


def _denominator(loss_agg_mode: str, config: Any) -> tuple[str, Optional[float]]:
    """verl's loss_agg_mode and global batch info as pyopd's (agg, denominator).

    verl scales each rank's micro-batch loss by dp_size / (global count) so that
    the data-parallel gradient average gives the global-batch mean; pyopd's
    `denominator` = global count / dp_size is the same scaling.
    """
    info = _cfg(config, "global_batch_info", None) or {}
    dp = float(info.get("dp_size", 1) or 1)
    if loss_agg_mode == "token-mean":
        total = info.get("batch_num_tokens")
    elif loss_agg_mode in ("seq-mean-token-mean", "seq-mean-token-sum"):
        total = info.get("global_batch_size")
    else:
        raise ValueError(
            f"loss_agg_mode {loss_agg_mode!r} is not supported by pyopd's policy losses; "
            "use token-mean, seq-mean-token-mean or seq-mean-token-sum"
        )
    if total is None:
        if dp > 1:
            raise ValueError(f"loss_agg_mode {loss_agg_mode!r} with dp_size > 1 needs verl's global batch info")
        return loss_agg_mode, None
    total = float(total.item() if isinstance(total, torch.Tensor) else total)
    return loss_agg_mode, (total / dp if total > 0 else None)


def _policy_loss(method: str, dual_clip_key: Optional[str]):
    def policy_loss(
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        loss_agg_mode: str = "token-mean",
        config: Any = None,
        rollout_is_weights: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        if config is None:
            raise ValueError(f"{method} policy loss needs the actor config (clip_ratio, ...)")
        if rollout_is_weights is not None:
            # Neither method applies rollout importance weights (docs/presets.md rows 9, 13);
            # multiplying them in silently would change the objective.
            raise ValueError(
                f"{method} does not apply rollout_is_weights; unset algorithm.rollout_correction.rollout_is "
                "(or use the 'vanilla' policy loss)"
            )
        agg, denominator = _denominator(loss_agg_mode, config)
        clip = _cfg(config, "clip_ratio", 0.2)
        dual = None if dual_clip_key is None else _cfg(config, dual_clip_key, 3.0)
        loss, metrics = ppo_policy_loss(
            log_prob, old_log_prob, advantages, response_mask.bool(), clip_ratio=clip,
            clip_ratio_low=_cfg(config, "clip_ratio_low", None), clip_ratio_high=_cfg(config, "clip_ratio_high", None),
            dual_clip=dual, agg=agg, denominator=denominator,
        )
        # verl logs the policy loss itself; its metric names carry the "actor/" prefix.
        out = {f"actor/{k}": v for k, v in metrics.items() if k != "pg_loss"}
        return loss, out

    policy_loss.__name__ = f"compute_policy_loss_{method}"
    policy_loss.__qualname__ = policy_loss.__name__
    policy_loss.__doc__ = (
        f"verl policy loss {method!r}: PPO clipped surrogate (pyopd.losses.ppo_policy_loss) over the driver's "
        "advantages; clip_ratio / clip_ratio_low / clip_ratio_high from the actor config"
        + (f", dual clip {dual_clip_key}" if dual_clip_key else ", no dual clip")
        + ". Shapes [B, T]. Returns (loss, metrics)."
    )
    return policy_loss


# FiRe-OPD and OPD: no dual clip (docs/presets.md rows 9, 12); COPSD: dual clip c = clip_ratio_c (3).
_POLICY_LOSSES = {
    "pyopd_opd": _policy_loss("pyopd_opd", None),
    "pyopd_fire": _policy_loss("pyopd_fire", None),
    "pyopd_copsd": _policy_loss("pyopd_copsd", "clip_ratio_c"),
}
_ESTIMATORS = {m: _estimator(m) for m in METHODS}


def _register() -> None:
    for m in METHODS:
        # Importing twice (e.g. VERL_USE_EXTERNAL_MODULES and an explicit import) must not fail:
        # verl's register_adv_est rejects a second, different function under one name.
        if m not in ADV_ESTIMATOR_REGISTRY:
            register_adv_est(m)(_ESTIMATORS[m])
        if m not in POLICY_LOSS_REGISTRY:
            register_policy_loss(m)(_POLICY_LOSSES[m])


_register()


# ---- driver: the v1 trainer mode ---------------------------------------------------------

_TRAINER_UNAVAILABLE: Optional[str] = None


def trainer_unavailable_reason() -> Optional[str]:
    """Why the "pyopd_sync" trainer mode was not registered (verl's v1 trainer failed to import), else None."""
    return _TRAINER_UNAVAILABLE


def _check_trainer_config(method: str, config: Any) -> None:
    """Refuse verl settings whose effect the pyopd advantage step would silently drop."""
    dist = config.get("distillation", None)
    if dist is None or not dist.get("enabled", False):
        raise ValueError(f"{method} needs the teacher's log-probs: set distillation.enabled=True (verl's teacher path)")
    algo = config.algorithm
    if algo.get("use_kl_in_reward", False):
        raise ValueError(f"{method}: algorithm.use_kl_in_reward must be False (the teacher is the reward)")
    rc = algo.get("rollout_correction", None) or {}
    for key in ("rollout_is", "rollout_rs"):
        if rc.get(key, None) is not None:
            raise ValueError(f"{method} applies no rollout correction: set algorithm.rollout_correction.{key}=null")
    if method == "pyopd_fire" and rc.get("bypass_mode", False):
        raise ValueError("pyopd_fire needs the student entropy of the old-log-prob pass, which "
                         "algorithm.rollout_correction.bypass_mode=True skips")


def _register_trainer() -> Optional[str]:
    try:
        import transfer_queue as tq
        from tensordict import TensorDict

        from verl.protocol import DataProto

        with warnings.catch_warnings():
            # Importing verl 0.9.1's trainer warns about its own optional parts ("torchtitan
            # engine is not available", ray's "state API is no longer experimental"); those
            # notices are verl's and ray's, not a reason to fail a strict-warnings run.
            warnings.filterwarnings("ignore", message=r"\w+ engine is not available", category=UserWarning)
            warnings.filterwarnings("ignore", message="Ray state API is no longer experimental",
                                    category=DeprecationWarning)
            from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY, register_trainer
            from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
        from verl.workers.utils.padding import response_from_nested, response_to_nested
    except ImportError as e:  # verl's v1 trainer needs transfer_queue, torchdata, ... (GPU installs have them)
        return f"{type(e).__name__}: {e}"
    if TRAINER_MODE in TRAINER_REGISTRY:
        return None

    @register_trainer(TRAINER_MODE)
    class PyopdPPOTrainerSync(PPOTrainerSync):
        """verl's sync trainer; the advantage step of a pyopd estimator reads the teacher's log-probs."""

        def _compute_advantage(self, batch, metrics):
            method = str(getattr(self.config.algorithm.adv_estimator, "value", self.config.algorithm.adv_estimator))
            if method not in METHODS:
                return super()._compute_advantage(batch, metrics)
            algo = self.config.algorithm
            _check_trainer_config(method, self.config)
            field = options(algo)["teacher_entropy_field"]
            fields = ["uid", "response_mask", "old_log_probs", "teacher_logprobs"]
            if method == "pyopd_fire":
                fields.append("entropy")
            if field is not None:
                fields.append(field)
            data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
            response_mask = data["response_mask"]
            # teacher_logprobs covers prompt + response, [1] per position in verl's estimator
            # mode, position i holding the log-prob of token i + 1 (verl 0.9.1's
            # vllm_rollout/utils.py extract_prompt_logprobs drops vLLM's leading None and pads
            # the end), i.e. aligned like model outputs: slice the response the way verl's
            # distillation loss does (workers/utils/padding.py no_padding_2_padding).
            teacher = data.pop("teacher_logprobs")
            if teacher.dim() == 3 and teacher.shape[-1] != 1:
                raise ValueError(
                    f"{method} needs the teacher's log-prob of the sampled token: set "
                    "distillation.distillation_loss.loss_mode to an estimator mode (e.g. k1), not a top-k mode"
                )
            data["teacher_log_prob"] = response_from_nested(teacher, response_mask)
            padded = DataProto(batch=data.to_padded_tensor())
            uid = np.array(padded.batch.pop("uid").tolist(), dtype=object)
            tensors = {k: padded.batch[k] for k in padded.batch.keys()}
            if tensors["teacher_log_prob"].dim() == 3:
                tensors["teacher_log_prob"] = tensors["teacher_log_prob"].squeeze(-1)
            res = compute_pyopd_advantage(tensors, method, algo, index=uid)
            metrics.update({f"pyopd/{k}": v for k, v in res.metrics.items()})
            out = {
                "advantages": response_to_nested(res.advantages, response_mask),
                "returns": response_to_nested(res.advantages, response_mask),
                # FiRe's dropped rollouts leave the loss and its token count, as verl's
                # rejection sampling does by rewriting response_mask.
                "response_mask": response_to_nested(res.response_mask.to(tensors["response_mask"].dtype), response_mask),
            }
            return tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id,
                                   fields=TensorDict(out, batch_size=len(batch)))

    return None


_TRAINER_UNAVAILABLE = _register_trainer()
