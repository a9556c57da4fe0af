"""Supervised fine-tuning: the one SFT loop of pyopd (task models, Cross-SFT, SFT baselines).

`sft_loop` runs AdamW steps over a stream of (prompt, answer) batches with the
loss on the answer + EOS tokens only. `sft_epochs` feeds it fixed records for
a number of epochs (Cross-SFT, the SFT baseline); `pyopd.tasks.recipe.train_sft`
feeds it fresh task samples with warmup + cosine (the built-in models).
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch

Pair = tuple[str, str]  # (prompt, answer)


@dataclass(frozen=True)
class SFTRecord:
    prompt: str      # what the model being fine-tuned sees (constitution-wrapped for Cross-SFT)
    response: str    # the target completion
    category: str    # benign | over_refusal | unsafe
    source: str      # "student" (its own answer), "frontier" (constitution-following) or "teacher"


def sft_batch(tokenizer, pairs: Sequence[Pair]) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``labels`` for ``<bos> prompt answer <eos>``; labels only on answer + eos."""
    prompts = tokenizer([p for p, _ in pairs], add_special_tokens=True)["input_ids"]
    answers = tokenizer([a for _, a in pairs], add_special_tokens=False)["input_ids"]
    seqs = [p + a + [tokenizer.eos_token_id] for p, a in zip(prompts, answers)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, len(p) : len(s)] = ids[i, len(p) : len(s)]
    return {"input_ids": ids, "labels": labels}


def answer_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (answer) positions."""
    # Right padding + causal attention: pads come after every real token, so no mask is needed.
    logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1))


def sft_loop(model, tokenizer, batches: Iterable[Sequence[Pair]], opt: torch.optim.Optimizer,
             sched=None, max_grad_norm: float = 1.0,
             on_step: Optional[Callable[[int, list[float], float], None]] = None) -> list[float]:
    """One AdamW step per batch of (prompt, answer) pairs; returns the per-step losses."""
    model.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    for step, pairs in enumerate(batches):
        loss = answer_loss(model, sft_batch(tokenizer, pairs))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"SFT step {step + 1}: the loss is {float(loss)}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step + 1, losses, time.perf_counter() - t0)
    model.eval()
    return losses


def sft_epochs(model, tokenizer, records: Sequence[SFTRecord], epochs: int = 2, batch_size: int = 32,
               lr: float = 5e-4, seed: int = 0) -> list[float]:
    """Plain SFT on fixed records, shuffled each epoch (constant lr); returns per-step losses."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if not records:
        raise ValueError("no SFT records")
    pairs = [(r.prompt, r.response) for r in records]
    rng = random.Random(seed)

    def batches():
        for _ in range(epochs):
            order = list(range(len(pairs)))
            rng.shuffle(order)
            for i in range(0, len(order), batch_size):
                yield [pairs[j] for j in order[i:i + batch_size]]

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    return sft_loop(model, tokenizer, batches(), opt)
