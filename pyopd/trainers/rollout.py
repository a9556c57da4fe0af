"""Rollouts and scoring: the student samples, the models score its tokens.

A `Rollouts` batch holds B = prompts x n sampled responses as right-padded
response ids [B, R] with a response mask [B, R] (1 up to and including EOS).
Scoring lays each row out as ``left-padded prompt ++ response`` for whichever
model scores it (the teacher may see another prompt, e.g. a constitution or a
chat template) and takes the per-token signals with `pyopd.token_stats` on
the response positions only, one micro-batch at a time, so only one
micro-batch of logits is alive at once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

import pyopd
from pyopd.objectives.base import Scores


@dataclass
class Rollouts:
    prompts: list[str]            # [B] the student's prompt of each row
    prompt_ids: list[list[int]]   # [B] token ids of that prompt (no padding)
    response: torch.Tensor        # [B, R] int64, pad after EOS
    mask: torch.Tensor            # [B, R] bool, True on response tokens (EOS included)
    group: torch.Tensor           # [B] int64, index of the prompt the row answers
    texts: list[str]              # [B] decoded responses (special tokens removed)

    @property
    def size(self) -> int:
        return self.response.shape[0]

    def lengths(self) -> torch.Tensor:
        return self.mask.sum(-1)


@torch.no_grad()
def sample_rollouts(model, tokenizer, prompts: Sequence[str], n: int, *, max_new_tokens: int,
                    temperature: float = 1.0, top_p: float = 1.0,
                    generation_batch: int = 256) -> Rollouts:
    """Sample ``n`` responses per prompt from ``model`` (left padding, stops at EOS)."""
    was_training = model.training
    model.eval()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    rows_prompts, rows_ids, responses, groups = [], [], [], []
    for start in range(0, len(prompts), max(1, generation_batch // n)):
        chunk = list(prompts[start:start + max(1, generation_batch // n)])
        enc = tokenizer(chunk, return_tensors="pt", padding=True).to(model.device)
        seqs = model.generate(
            input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
            do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
            max_new_tokens=max_new_tokens, num_return_sequences=n,
            pad_token_id=pad, eos_token_id=eos)
        resp = seqs[:, enc["input_ids"].shape[1]:]
        for i in range(resp.shape[0]):
            p = i // n
            rows_prompts.append(chunk[p])
            rows_ids.append(enc["input_ids"][p][enc["attention_mask"][p].bool()].tolist())
            groups.append(start + p)
        responses.append(resp)
    model.train(was_training)
    width = max(r.shape[1] for r in responses)
    response = torch.cat([torch.nn.functional.pad(r, (0, width - r.shape[1]), value=pad)
                          for r in responses])
    mask = response_mask(response, eos)
    response = torch.where(mask, response, torch.full_like(response, pad))
    texts = tokenizer.batch_decode(response, skip_special_tokens=True)
    return Rollouts(rows_prompts, rows_ids, response, mask, torch.tensor(groups, device=response.device), texts)


def response_mask(response: torch.Tensor, eos_id: int) -> torch.Tensor:
    """True up to and including the first EOS of each row (all True if none)."""
    is_eos = response == eos_id
    after = (is_eos.cumsum(-1) - is_eos.long()) > 0  # strictly after the first EOS
    return ~after


@dataclass
class ModelInputs:
    input_ids: torch.Tensor       # [b, P + R]
    attention_mask: torch.Tensor  # [b, P + R]
    position_ids: torch.Tensor    # [b, P + R], counted over real tokens as in generate()
    start: int                    # logits[:, start:start + R] predict the response tokens


def layout(prompt_ids: Sequence[Sequence[int]], response: torch.Tensor, mask: torch.Tensor,
           pad_id: int) -> ModelInputs:
    """Left-pad the prompts to one width and append the responses."""
    width = max(len(p) for p in prompt_ids)
    b = len(prompt_ids)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    att = torch.zeros((b, width), dtype=torch.long)
    for i, p in enumerate(prompt_ids):
        if len(p):
            ids[i, width - len(p):] = torch.tensor(p)
            att[i, width - len(p):] = 1
    ids, att = ids.to(response.device), att.to(response.device)
    input_ids = torch.cat([ids, response], dim=1)
    attention_mask = torch.cat([att, mask.long()], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return ModelInputs(input_ids, attention_mask, position_ids, width - 1)


@dataclass
class Head:
    """A model's output layer as a plain linear map: logits = hidden @ weight.T (+ bias)."""

    weight: torch.Tensor            # [V, H]
    bias: Optional[torch.Tensor]    # [V] or None


_HEADS: dict = {}  # id(model) -> Head or None: probed once per model


def linear_head(model, inputs: Optional[ModelInputs] = None, log=None) -> Optional[Head]:
    """The model's head when its logits are exactly ``lm_head(last hidden state)``, else None.

    The fused-linear ops (`pyopd.fused_linear_token_stats` / `fused_linear_reverse_kl`)
    then take the hidden states and the head's weight and never build the
    [tokens, vocab] logits. Checked once per model by comparing one batch of
    logits with the head applied to the hidden states (architectures that scale
    or soft-cap their logits fail it); ``log`` is told once when a model falls
    back to logits.
    """
    key = id(model)
    if key in _HEADS and _HEADS[key][0]() is model:
        return _HEADS[key][1]
    import weakref

    head = model.get_output_embeddings()
    found = None
    body = getattr(model, "base_model", model)
    if isinstance(head, torch.nn.Linear) and body is not model and inputs is not None:
        was_training = model.training
        model.eval()  # no dropout in the comparison
        with torch.no_grad():
            logits = response_logits(model, inputs, 2)
            hidden = response_hidden(model, inputs, 2)
            lin = torch.nn.functional.linear(hidden, head.weight, head.bias)
        model.train(was_training)
        if torch.allclose(lin.float(), logits.float(), rtol=1e-4, atol=1e-4):
            found = Head(head.weight, head.bias)
    if inputs is None:
        return None  # not probed yet: the caller decides on its first batch
    if found is None and log is not None:
        log(f"[pyopd] {type(model).__name__}: its head is not a plain linear map of the last hidden state; "
            f"using the materialised logits")
    _HEADS[key] = (weakref.ref(model), found)
    return found


FUSED_AUTO_BYTES = 256 << 20  # 'auto': fuse when a micro-batch's float32 logits would exceed this


def wants_fused(mode, rows: int, r: int, model) -> bool:
    """Whether to use the fused-linear path for ``rows`` x ``r`` tokens of ``model``
    (one of `pyopd.config.FUSED_LINEAR_MODES`).

    ``True``/``False`` are accepted as on/off.
    """
    if mode in (True, "on", "recompute", "grad-in-forward"):
        return True
    if mode in (False, "off"):
        return False
    vocab = model.get_output_embeddings().weight.shape[0]
    return rows * r * vocab * 4 > FUSED_AUTO_BYTES


def grad_in_forward(mode, weight: torch.Tensor) -> bool:
    """On the fused path, whether a loss linear in the KL (rkl, fire-rkl) takes its gradient in
    the forward pass (`pyopd.fused_linear_reverse_kl_loss`, 4 matmuls) rather than recomputing
    the logits in backward (`pyopd.fused_linear_reverse_kl`, 6 matmuls).

    'auto' / 'on' choose the former for a float32/float64 lm_head: the same matmuls as the
    materialised logits in [N/16, V] chunks (on the CPU at N = 4096, H = 1024, V = 32768:
    0.95x their time on one thread, 1.13x on two; bench/results/cpu-fused-linear-loss.md).
    For bf16/fp16 they choose the recompute: with more than one chunk the
    gradient-in-forward op keeps a float32 [V, H] running sum of grad_weight (2.3 GiB at
    V = 151936, H = 4096), which can exceed the logits it saves.
    """
    if mode == "grad-in-forward":
        return True
    if mode in ("auto", "on", True):
        return weight.dtype not in (torch.bfloat16, torch.float16)
    return False


def response_hidden(model, inputs: ModelInputs, r: int) -> torch.Tensor:
    """Last hidden states [b, R, H] at the positions that predict the response tokens."""
    out = model.base_model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                           position_ids=inputs.position_ids, use_cache=False)
    return out.last_hidden_state[:, inputs.start:inputs.start + r]


def response_logits(model, inputs: ModelInputs, r: int) -> torch.Tensor:
    """Logits [b, R, V] at the positions that predict the response tokens."""
    out = model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                position_ids=inputs.position_ids, use_cache=False)
    return out.logits[:, inputs.start:inputs.start + r]


@torch.no_grad()
def score(model, prompt_ids: Sequence[Sequence[int]], rollouts: Rollouts, pad_id: int,
          rows: Optional[torch.Tensor] = None, micro_batch: int = 16,
          temperature: float = 1.0, fused="auto", log=None) -> Scores:
    """Per-token log-prob and entropy of ``model`` on the rollout tokens (rows subset optional).

    ``fused`` ("on", "off", "auto": see `wants_fused`): through the fused linear op from
    the hidden states when the model's head is a plain linear map (`linear_head`), so
    no [tokens, vocab] logits exist.
    """
    idx = torch.arange(rollouts.size) if rows is None else rows
    r = rollouts.response.shape[1]
    logprob = torch.zeros(rollouts.size, r, device=rollouts.response.device)
    entropy = torch.zeros(rollouts.size, r, device=rollouts.response.device)
    was_training = model.training
    model.eval()
    for chunk in idx.split(micro_batch):
        resp, m = rollouts.response[chunk], rollouts.mask[chunk]
        inputs = layout([prompt_ids[i] for i in chunk.tolist()], resp, m, pad_id)
        head = linear_head(model, inputs, log) if wants_fused(fused, len(chunk), r, model) else None
        if head is not None:
            st = pyopd.fused_linear_token_stats(response_hidden(model, inputs, r), head.weight, resp, mask=m,
                                                temperature=temperature, bias=head.bias)
        else:
            st = pyopd.token_stats(response_logits(model, inputs, r), resp, mask=m, temperature=temperature)
        logprob[chunk], entropy[chunk] = st.logprob.float(), st.entropy.float()
    model.train(was_training)
    return Scores(logprob, entropy)
