"""Test oracle: a plain, loop-by-loop re-statement of what the released FiRe-OPD and COPSD code computes.

Written from reading the official repositories at fixed commits (no code was
copied; this is our own reading, kept deliberately slow and literal):

- FiRe-OPD: github.com/YuYingLi0/FiRe-OPD @ 2e23cd6d67575978cec5fa697b852838ef6ab2ee
    [F-actor]  verl/verl/workers/actor/dp_actor.py
               DataParallelPPOActor._compute_entropy_aware_loss, DataParallelPPOActor.update_policy
    [F-algos]  verl/verl/trainer/ppo/core_algos.py  agg_loss, compute_policy_loss_vanilla, kl_penalty_forward
    [F-func]   verl/verl/utils/torch_functional.py  masked_sum, masked_mean
    [F-rc]     verl/verl/trainer/ppo/rollout_corr_helper.py  compute_rollout_correction_weights
    [F-sh]     verl/examples/fire_opd/run_*.sh (the shipped settings)
- COPSD: github.com/SII-FLEEECERmw/SafeC-OPSD @ d563a3b8e0eb6d9af9e0b6552d04a6af7e48ea79
    [C-rfn]    reward_service/rewardfn_onpolicy_reward.py  compute_onpolicy_KL_reward
    [C-gate]   verl/workers/reward_manager/OPSDGate.py  OpsdGateRewardManager.__call__
    [C-algos]  verl/trainer/ppo/core_algos.py  compute_grpo_opsdgate_advantage, kl_penalty_forward,
               compute_policy_loss_vanilla, agg_loss
    [C-actor]  verl/workers/actor/dp_actor.py  DataParallelPPOActor.update_policy

Conventions: every tensor is float64 (the tests feed float64; the official code
runs float32), masks are 0/1 floats, a micro-batch is a list of row indices of
one rank's mini-batch, in order. Python loops over micro-batches, rows and
tokens on purpose: this file is the ground truth for the vectorised
`pyopd.presets.released`, so it must be obviously right, not fast.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

FIRE_COMMIT = "2e23cd6d67575978cec5fa697b852838ef6ab2ee"
COPSD_COMMIT = "d563a3b8e0eb6d9af9e0b6552d04a6af7e48ea79"


# ---- verl helpers -------------------------------------------------------------------


def verl_masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[F-func] masked_mean: masked positions are replaced by 0 with a select (so a NaN there
    leaves the value alone but, through autograd, still meets the zero gradient), times the
    mask, summed, divided by (count + 1e-8)."""
    zero = torch.zeros((), dtype=values.dtype)
    return (torch.where(mask != 0, values, zero) * mask).sum() / (mask.sum() + 1e-8)


def token_mean_loss(loss_mat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[F-algos]/[C-algos] agg_loss with the default loss_agg_mode "token-mean"."""
    return verl_masked_mean(loss_mat, mask)


def micro_batch_scale(micro: Sequence[int], mini_batch_rows: int) -> float:
    """[F-actor]/[C-actor] update_policy: each micro-batch loss is multiplied by
    1 / gradient_accumulation = micro_size / mini_size (fixed-size micro-batches;
    with use_dynamic_bsz it is rows_in_micro / mini_size, the same number), and the
    gradients of the micro-batches are summed before one optimizer step."""
    return len(micro) / mini_batch_rows


def ppo_clip_terms(logprob, old_logprob, adv, clip_ratio: float):
    """[F-actor] _compute_entropy_aware_loss step 3 / [F-algos] compute_policy_loss_vanilla:
    ratio = exp(clamp(logp - logp_old, -20, 20)); max(-A ratio, -A clip(ratio, 1-eps, 1+eps))."""
    ratio = torch.exp(torch.clamp(logprob - old_logprob, min=-20.0, max=20.0))
    l1 = -adv * ratio
    l2 = -adv * torch.clamp(ratio, 1 - clip_ratio, 1 + clip_ratio)
    return torch.maximum(l1, l2)


def dual_clip_terms(logprob, old_logprob, adv, clip_ratio: float, clip_ratio_c: float):
    """[F-algos]/[C-algos] compute_policy_loss_vanilla: the clipped loss, then for A < 0
    min(that, -A * clip_ratio_c) (dual clip, clip_ratio_c = 3 by default)."""
    l12 = ppo_clip_terms(logprob, old_logprob, adv, clip_ratio)
    out = torch.empty_like(l12)
    for i in range(adv.shape[0]):
        for t in range(adv.shape[1]):
            if adv[i, t] < 0:
                out[i, t] = torch.minimum(l12[i, t], -adv[i, t] * clip_ratio_c)
            else:
                out[i, t] = l12[i, t]
    return out


def low_var_kl(logprob, ref_logprob):
    """[F-algos]/[C-algos] kl_penalty_forward("low_var_kl"): d = clamp(ref - logp, -20, 20);
    clamp(exp(d) - d - 1, -10, 10)."""
    d = torch.clamp(ref_logprob - logprob, min=-20.0, max=20.0)
    return torch.clamp(torch.exp(d) - d - 1, min=-10.0, max=10.0)


# ---- FiRe-OPD -----------------------------------------------------------------------


def fire_micro_batch(
    logprob: torch.Tensor,
    old_logprob: torch.Tensor,
    teacher_logprobs: Sequence[torch.Tensor],
    teacher_entropies: Sequence[torch.Tensor],
    teacher_of_row: Sequence[int],
    student_entropy: torch.Tensor,
    mask: torch.Tensor,
    *,
    p: float,
    alpha: float,
    beta: float,
    clip_ratio: float = 0.2,
) -> dict:
    """[F-actor] _compute_entropy_aware_loss on ONE micro-batch (it is called once per micro-batch).

    teacher_logprobs / teacher_entropies: one [b, T] tensor per teacher (the
    official multi-teacher path has exactly two: ref = "math", base_ref = "code");
    teacher_of_row[i] picks row i's teacher.
    """
    b, T = mask.shape
    # Step 1: length-normalised score of each row with its own teacher; length clamped at 1,
    # so an empty row scores 0 (and still takes part in the quantile).
    scores = torch.zeros(b, dtype=torch.float64)
    for i in range(b):
        lq = teacher_logprobs[teacher_of_row[i]][i]
        n = max(float(mask[i].sum()), 1.0)
        s = torch.zeros((), dtype=torch.float64)
        for t in range(T):
            if mask[i, t] != 0:
                s = s + lq[t]
        scores[i] = s / n
    # The official code casts the scores to float32 for torch.quantile (and the multi-teacher
    # branch stores them in a float32 tensor). Its inputs are float32, so both casts are
    # no-ops there; we keep our float64 instead of rounding: rounding float64 scores would
    # move the threshold by an ulp and drop rollouts that sit on it (e.g. every rollout of a
    # one-row micro-batch, half the time), which the official runs never see.
    # One quantile over ALL rows of the micro-batch (every teacher together), torch.quantile's
    # linear interpolation; keep score >= threshold.
    threshold = torch.quantile(scores, p / 100.0)
    keep = [bool(scores[i] >= threshold) for i in range(b)]

    # Step 2: each row's own teacher's entropy; maxima over every valid token of the
    # micro-batch, dropped rows included; clamped at 1e-6; 1.0 when there is no valid token.
    ht = torch.stack([teacher_entropies[teacher_of_row[i]][i] for i in range(b)]) if b else mask.clone()
    vals_t = [ht[i, t] for i in range(b) for t in range(T) if mask[i, t] != 0]
    vals_s = [student_entropy[i, t] for i in range(b) for t in range(T) if mask[i, t] != 0]
    max_t = torch.clamp(torch.stack(vals_t).max(), min=1e-6) if vals_t else torch.tensor(1.0, dtype=torch.float64)
    max_s = torch.clamp(torch.stack(vals_s).max(), min=1e-6) if vals_s else torch.tensor(1.0, dtype=torch.float64)
    weight = torch.zeros(b, T, dtype=torch.float64)
    for i in range(b):
        for t in range(T):
            conf = torch.clamp(1.0 - ht[i, t] / max_t, 0.0, 1.0)
            confu = torch.clamp(student_entropy[i, t] / max_s, 0.0, 1.0)
            weight[i, t] = (1.0 + alpha * conf) * (1.0 + beta * confu)
    # Normalised to mean 1 over every valid token of the micro-batch (dropped rows included).
    wsum = torch.zeros((), dtype=torch.float64)
    for i in range(b):
        for t in range(T):
            if mask[i, t] != 0:
                wsum = wsum + weight[i, t]
    wmean = wsum / max(float(mask.sum()), 1.0)
    weight = weight / torch.clamp(wmean, min=1e-6)

    # Step 3: A = w * (log q - log p_old) with the row's teacher, zeroed on dropped rows;
    # plain PPO clip (no dual clip, no rollout importance weights), token mean over the
    # valid tokens of the kept rows.
    adv = torch.zeros(b, T, dtype=torch.float64)
    eff = torch.zeros(b, T, dtype=torch.float64)
    for i in range(b):
        lq = teacher_logprobs[teacher_of_row[i]][i]
        for t in range(T):
            adv[i, t] = weight[i, t] * (lq[t] - old_logprob[i, t]) * (1.0 if keep[i] else 0.0)
            eff[i, t] = mask[i, t] * (1.0 if keep[i] else 0.0)
    loss_mat = ppo_clip_terms(logprob, old_logprob, adv, clip_ratio)
    loss = token_mean_loss(loss_mat, eff)
    return {"loss": loss, "keep": keep, "weight": weight, "score": scores, "threshold": threshold,
            "max_teacher_entropy": max_t, "max_student_entropy": max_s}


def fire_step(
    logprob, old_logprob, teacher_logprobs, teacher_entropies, teacher_of_row, student_entropy, mask,
    micro_batches: Sequence[Sequence[int]], *, p: float, alpha: float = 1.0, beta: float = 1.0,
    clip_ratio: float = 0.2,
) -> dict:
    """[F-actor] update_policy with the FiRe path, one mini-batch of one rank: the loss whose
    gradient the optimizer step sees, sum over micro-batches of scale * micro-batch loss."""
    B = mask.shape[0]
    total = torch.zeros((), dtype=torch.float64)
    keep = [False] * B
    weight = torch.zeros_like(mask)
    for mb in micro_batches:
        idx = torch.tensor(list(mb), dtype=torch.long)
        r = fire_micro_batch(
            logprob[idx], old_logprob[idx], [x[idx] for x in teacher_logprobs],
            [x[idx] for x in teacher_entropies], [teacher_of_row[i] for i in mb], student_entropy[idx],
            mask[idx], p=p, alpha=alpha, beta=beta, clip_ratio=clip_ratio,
        )
        total = total + micro_batch_scale(mb, B) * r["loss"]
        for j, i in enumerate(mb):
            keep[i] = r["keep"][j]
            weight[i] = r["weight"][j]
    return {"loss": total, "keep": keep, "weight": weight}


# ---- the official OPD baseline ------------------------------------------------------


def rollout_is_weights(old_logprob, rollout_logprob, mask, threshold: float = 5.0):
    """[F-rc] compute_rollout_correction_weights, rollout_is="token" ([F-sh]: threshold 5.0),
    no batch normalisation: min(exp(clamp(old - rollout, -20, 20)), threshold) * mask, detached.
    Computed once per batch by the driver from the recomputed old log-probs and vLLM's."""
    w = torch.zeros_like(old_logprob)
    for i in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            d = min(max(float(old_logprob[i, t] - rollout_logprob[i, t]), -20.0), 20.0)
            w[i, t] = min(math.exp(d) * float(mask[i, t]), threshold)
    return w


def opd_baseline_step(logprob, old_logprob, teacher_logprob, mask, micro_batches, *,
                      is_weights: Optional[torch.Tensor], clip_ratio: float = 0.2, clip_ratio_c: float = 3.0):
    """[F-actor] update_policy, vanilla path with only_reverse_kl_advantages: A = log q - log p_old,
    compute_policy_loss_vanilla (dual clip 3) times the rollout IS weights, token mean per
    micro-batch, scaled and summed."""
    B = mask.shape[0]
    total = torch.zeros((), dtype=torch.float64)
    for mb in micro_batches:
        idx = torch.tensor(list(mb), dtype=torch.long)
        adv = teacher_logprob[idx] - old_logprob[idx]
        lm = dual_clip_terms(logprob[idx], old_logprob[idx], adv, clip_ratio, clip_ratio_c)
        if is_weights is not None:
            lm = lm * is_weights[idx]
        total = total + micro_batch_scale(mb, B) * token_mean_loss(lm, mask[idx])
    return total


# ---- COPSD --------------------------------------------------------------------------


def copsd_rewards(teacher_logprob, rollout_logprob, mask):
    """[C-rfn] compute_onpolicy_KL_reward + [C-gate] __call__: at each valid response token
    r = clamp(log q - log p_rollout, -3, 5) + 0.02 (the student side is vLLM's rollout
    log-prob); positions past the response stay 0."""
    r = torch.zeros_like(teacher_logprob)
    for i in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[i, t] != 0:
                r[i, t] = min(max(float(teacher_logprob[i, t] - rollout_logprob[i, t]), -3.0), 5.0) + 0.02
    return r


def copsd_token_rewards(teacher_logprob, rollout_logprob, mask, outcome_rows: Sequence[int] = (),
                        outcome_scores: Sequence[float] = ()):
    """[C-gate] __call__: dense rows get `copsd_rewards`; an outcome row (data source in
    OPSDGATE_OUTCOME_SOURCES) gets its judge score at its last valid position
    (index valid_length - 1) and 0 elsewhere."""
    r = copsd_rewards(teacher_logprob, rollout_logprob, mask)
    for i, s in zip(outcome_rows, outcome_scores):
        r[i] = 0.0
        r[i, int(mask[i].sum()) - 1] = s
    return r


def copsd_advantages(token_rewards, mask, group_ids: Sequence, outcome_rows: Sequence[int] = (),
                     eps: float = 1e-6):
    """[C-algos] compute_grpo_opsdgate_advantage with outcome rows (`grpo_index`): an outcome row's
    score is its reward row summed; per group, over the outcome rows only: mean, std = torch.std
    if more than one row else 1.0; A = (score - mean) / (std + eps) at every position. The other
    rows are pooled densely as in `copsd_dense_advantages` (outcome rows left out). Times the mask."""
    outcome = set(outcome_rows)
    scores: dict = {}
    pooled: dict = {}
    for i in range(mask.shape[0]):
        if i in outcome:
            scores.setdefault(group_ids[i], []).append(token_rewards[i].sum())
        else:
            pooled.setdefault(group_ids[i], []).append(token_rewards[i][mask[i] != 0])
    o_stats = {}
    for g, lst in scores.items():
        st = torch.stack(lst)
        o_stats[g] = (torch.mean(st), torch.std(st) if len(lst) > 1 else torch.tensor(1.0, dtype=st.dtype))
    d_stats = {}
    for g, parts in pooled.items():
        toks = torch.cat(parts)
        d_stats[g] = (torch.mean(toks),
                      torch.std(toks) if toks.numel() > 1 else torch.tensor(1.0, dtype=token_rewards.dtype))
    adv = torch.zeros_like(token_rewards)
    for i in range(mask.shape[0]):
        if i in outcome:
            mean, std = o_stats[group_ids[i]]
            adv[i] = (token_rewards[i].sum() - mean) / (std + eps)
        else:
            mean, std = d_stats[group_ids[i]]
            adv[i] = (token_rewards[i] - mean) / (std + eps)
    return adv * mask


def copsd_dense_advantages(rewards, mask, group_ids: Sequence, eps: float = 1e-6):
    """[C-algos] compute_grpo_opsdgate_advantage, dense rows (no outcome rows): pool the valid
    rewards of every row of a group; mean; std = torch.std (ddof 1) if more than one token
    else 1.0; A = (r - mean) / (std + eps) at every position, then times the mask. A group
    without any valid token has mean NaN, so its rows come out NaN everywhere (NaN * 0)."""
    pooled: dict = {}
    for i in range(mask.shape[0]):
        pooled.setdefault(group_ids[i], []).append(rewards[i][mask[i] != 0])
    stats = {}
    for g, parts in pooled.items():
        toks = torch.cat(parts)
        mean = torch.mean(toks)  # NaN for an empty group
        std = torch.std(toks) if toks.numel() > 1 else torch.tensor(1.0, dtype=rewards.dtype)
        stats[g] = (mean, std)
    adv = torch.zeros_like(rewards)
    for i in range(mask.shape[0]):
        mean, std = stats[group_ids[i]]
        adv[i] = (rewards[i] - mean) / (std + eps)
    return adv * mask


def copsd_step(logprob, old_logprob, advantages, ref_logprob, mask, micro_batches, *,
               kl_coef: float = 0.005, clip_ratio: float = 0.2, clip_ratio_c: float = 3.0):
    """[C-actor] update_policy: compute_policy_loss_vanilla (dual clip 3, no IS weights in the
    shipped script) + kl_coef * low_var_kl, each a token mean per micro-batch, scaled, summed."""
    B = mask.shape[0]
    total = torch.zeros((), dtype=torch.float64)
    for mb in micro_batches:
        idx = torch.tensor(list(mb), dtype=torch.long)
        pg = token_mean_loss(dual_clip_terms(logprob[idx], old_logprob[idx], advantages[idx], clip_ratio,
                                             clip_ratio_c), mask[idx])
        kl = token_mean_loss(low_var_kl(logprob[idx], ref_logprob[idx]), mask[idx])
        total = total + micro_batch_scale(mb, B) * (pg + kl_coef * kl)
    return total
