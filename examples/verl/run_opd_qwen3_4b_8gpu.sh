#!/usr/bin/env bash
# pyopd methods inside verl (>= 0.9): a 4B student distilled from a 32B teacher on one 8-GPU node.
#
#   METHOD=fire  bash examples/verl/run_opd_qwen3_4b_8gpu.sh   # FiRe-OPD (default)
#   METHOD=copsd bash examples/verl/run_opd_qwen3_4b_8gpu.sh   # COPSD's dense group advantage
#   METHOD=opd   bash examples/verl/run_opd_qwen3_4b_8gpu.sh   # plain OPD
#   ... extra Hydra overrides are passed through ("$@").
#
# NOT RUN: written against verl 0.9.1's config schema and checked only by pyopd's
# CPU tests of the registered functions (tests/test_integration_verl.py); it has
# never been launched on GPUs. See docs/verl.md for what runs where.
#
# Needs: pip install "pyopd[verl]" (plus verl's GPU stack: vllm, flash-attn, ...),
# parquet prompt files in verl's RL format (data_source, prompt, ...).
set -euo pipefail

METHOD=${METHOD:-fire}
STUDENT=${STUDENT:-Qwen/Qwen3-4B}
TEACHER=${TEACHER:-Qwen/Qwen3-32B}
TRAIN_FILES=${TRAIN_FILES:-$HOME/data/math/train.parquet}
VAL_FILES=${VAL_FILES:-$HOME/data/math/test.parquet}

# Every verl process (driver, TaskRunner, Ray workers) must import the plug-in so
# that verl's registries know the pyopd names: verl reads this variable on `import verl`.
export VERL_USE_EXTERNAL_MODULES=pyopd.integrations.verl

case "$METHOD" in
  fire)
    METHOD_ARGS=(
      # FiRe-OPD: filter + token weights are computed once per step over the whole batch on the driver.
      +algorithm.pyopd.p=20            # drop the 20% rollouts with the lowest length-normalised teacher log-prob
      # verl 0.9's teacher server returns log-probs only, no teacher entropy: alpha must be 0
      # (no teacher-confidence term) unless a batch field with H_t is named in teacher_entropy_field.
      +algorithm.pyopd.alpha=0.0
      +algorithm.pyopd.beta=1.0        # student-confusion weight (1 + beta * H_s / max H_s)
      +algorithm.pyopd.normalize=trajectory   # weights average 1 per kept rollout
      +algorithm.pyopd.preset=paper    # "released" reproduces the authors' per-micro-batch statistics (set micro_batch)
      actor_rollout_ref.actor.clip_ratio=0.2
      actor_rollout_ref.rollout.n=4
    ) ;;
  copsd)
    METHOD_ARGS=(
      # COPSD: r = clip(log q - log p_old, -3, 5) + 0.02, normalised per prompt group (rollout.n samples).
      +algorithm.pyopd.reward_clip=[-3.0,5.0]
      +algorithm.pyopd.reward_bonus=0.02
      +algorithm.pyopd.preset=paper    # "released": ddof-1 group std as in the authors' code
      actor_rollout_ref.actor.clip_ratio=0.2
      actor_rollout_ref.actor.clip_ratio_c=3.0   # the pyopd_copsd loss applies this dual clip
      # COPSD's k3 KL to the initial student: verl's own KL loss (low_var_kl = k3 clamped to [-10, 10],
      # the released code's; pyopd's "paper" k3 has no clamp). Needs the reference model.
      actor_rollout_ref.actor.use_kl_loss=True
      actor_rollout_ref.actor.kl_loss_type=low_var_kl
      actor_rollout_ref.actor.kl_loss_coef=0.005
      actor_rollout_ref.rollout.n=8
    ) ;;
  opd)
    METHOD_ARGS=(
      actor_rollout_ref.actor.clip_ratio=0.2
      actor_rollout_ref.rollout.n=4
    ) ;;
  *) echo "METHOD must be fire, copsd or opd" >&2; exit 2 ;;
esac

python3 -m verl.trainer.main_ppo \
  data.train_files="['$TRAIN_FILES']" \
  data.val_files="['$VAL_FILES']" \
  data.train_batch_size=128 \
  data.max_prompt_length=1024 \
  data.max_response_length=4096 \
  actor_rollout_ref.model.path="$STUDENT" \
  actor_rollout_ref.model.use_remove_padding=True \
  actor_rollout_ref.model.enable_gradient_checkpointing=True \
  actor_rollout_ref.actor.optim.lr=1e-6 \
  actor_rollout_ref.actor.ppo_mini_batch_size=128 \
  actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4 \
  actor_rollout_ref.actor.loss_agg_mode=token-mean \
  actor_rollout_ref.rollout.name=vllm \
  actor_rollout_ref.rollout.tensor_model_parallel_size=1 \
  actor_rollout_ref.rollout.gpu_memory_utilization=0.6 \
  `# the method's batch-level signal: pyopd_fire | pyopd_copsd | pyopd_opd (driver, whole batch)` \
  algorithm.adv_estimator=pyopd_$METHOD \
  algorithm.use_kl_in_reward=False \
  `# the per-micro-batch PPO surrogate with the method's clipping (actor)` \
  actor_rollout_ref.actor.policy_loss.loss_mode=pyopd_$METHOD \
  `# verl's trainer, plus reading the teacher's log-probs into the advantage step` \
  trainer.use_v1=True \
  trainer.v1.trainer_mode=pyopd_sync \
  `# verl's distillation path serves the teacher and scores every rollout:` \
  distillation.enabled=True \
  distillation.n_gpus_per_node=4 \
  distillation.nnodes=1 \
  distillation.teacher_models.teacher_model.model_path="$TEACHER" \
  distillation.teacher_models.teacher_model.inference.tensor_model_parallel_size=4 \
  `# k1 = an estimator mode: the teacher returns the log-prob of the sampled token (what pyopd needs)` \
  distillation.distillation_loss.loss_mode=k1 \
  distillation.distillation_loss.use_policy_gradient=True \
  `# keep verl's own distillation term out of the loss: the pyopd policy loss above is the objective` \
  distillation.distillation_loss.use_task_rewards=True \
  distillation.distillation_loss.distillation_loss_coef=0.0 \
  `# pyopd policy losses reject rollout importance weights (neither method uses them)` \
  algorithm.rollout_correction.rollout_is=null \
  `# student: 4 GPUs; the teacher pool above takes the other 4` \
  trainer.n_gpus_per_node=4 \
  trainer.nnodes=1 \
  trainer.total_epochs=1 \
  trainer.logger='["console"]' \
  trainer.project_name=pyopd_verl \
  trainer.experiment_name="qwen3-4b-from-32b-$METHOD" \
  +ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES=pyopd.integrations.verl \
  "${METHOD_ARGS[@]}" \
  "$@"
