"""Plain-PyTorch SFT and greedy evaluation for the tiny task models."""
from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pyopd.tasks.base import Example, Task
from pyopd.trainers.sft import answer_loss, sft_loop
from pyopd.trainers.sft import sft_batch as _sft_batch

__all__ = ["answer_loss", "evaluate", "generate", "sft_batch", "train_sft"]

Log = Callable[[str], None]


def sft_batch(tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``labels`` for ``<bos> prompt answer <eos>``; labels only on answer + eos."""
    return _sft_batch(tokenizer, [(e.prompt, e.answer) for e in examples])


def train_sft(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    steps: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    exclude: Sequence[str] = (),
    log: Log | None = None,
    log_every: int = 100,
    tick: Callable[[], None] | None = None,
) -> list[float]:
    """Train on fresh ``task`` samples for ``steps`` AdamW steps (warmup + cosine); returns losses.

    ``tick``: called after every step (a progress bar's update)."""
    rng = random.Random(f"sft/{task.name}/{seed}")
    excluded = frozenset(exclude)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min((i + 1) / warmup, 0.1 + 0.45 * (1 + math.cos(math.pi * min(i / steps, 1.0))))
    )

    def batches():
        for _ in range(steps):
            yield [(e.prompt, e.answer) for e in task.sample(batch_size, rng, exclude=excluded)]

    def on_step(step: int, losses: list[float], elapsed: float) -> None:
        if tick is not None:
            tick()
        if log is not None and step % log_every == 0:
            recent = losses[-log_every:]
            log(f"  step {step}/{steps} loss {sum(recent) / len(recent):.4f} ({elapsed:.1f}s)")

    return sft_loop(model, tokenizer, batches(), opt, sched, on_step=on_step)


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 48,
    batch_size: int = 256,
    **gen_kwargs: object,
) -> list[str]:
    """Completions for ``prompts`` (greedy unless ``do_sample=True`` is passed), special tokens removed."""
    was_training = model.training
    model.eval()
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(list(prompts[i : i + batch_size]), return_tensors="pt", padding=True).to(model.device)
        kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, do_sample=False)
        kwargs.update(gen_kwargs)
        seqs = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], **kwargs)
        out += tokenizer.batch_decode(seqs[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    model.train(was_training)
    return out


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    examples: Sequence[Example] | None = None,
    max_new_tokens: int | None = None,
) -> float:
    """Greedy accuracy of ``model`` on ``examples`` (default: the task's eval set)."""
    examples = list(task.eval_set() if examples is None else examples)
    if max_new_tokens is None:
        max_new_tokens = max(len(e.answer) for e in examples) + 8
    completions = generate(model, tokenizer, [e.prompt for e in examples], max_new_tokens=max_new_tokens)
    return sum(task.score(examples, completions)) / max(1, len(examples))
