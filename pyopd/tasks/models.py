"""Tiny causal LMs built from a ``transformers`` config (random init, no downloads)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class ModelSpec:
    """Shape of a tiny Llama-style decoder.  ``vocab_size=None`` means the tokenizer's size."""

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int | None = None  # default: 2 * hidden_size
    vocab_size: int | None = None
    max_positions: int = 256
    tie_word_embeddings: bool = True


def padded_vocab(n: int, multiple: int = 16) -> int:
    """The smallest multiple of ``multiple`` strictly larger than ``n`` (so ids >= n exist)."""
    return (n // multiple + 1) * multiple


def build_model(spec: ModelSpec, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised ``LlamaForCausalLM`` for ``spec``, deterministic for ``seed``.

    Special-token ids and a greedy generation config are set, so
    ``model.generate(input_ids, attention_mask=...)`` works without warnings.
    """
    vocab = spec.vocab_size or len(tokenizer)
    if vocab < len(tokenizer):
        raise ValueError(f"vocab_size {vocab} is smaller than the tokenizer ({len(tokenizer)})")
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size or 2 * spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=spec.tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        initializer_range=0.02,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    configure_generation(model, tokenizer)
    return model


def configure_generation(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Point the model's generation config at the tokenizer's special tokens (greedy by default)."""
    gc = model.generation_config
    gc.pad_token_id = tokenizer.pad_token_id
    gc.bos_token_id = tokenizer.bos_token_id
    gc.eos_token_id = tokenizer.eos_token_id
    gc.do_sample = False


def num_params(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())
