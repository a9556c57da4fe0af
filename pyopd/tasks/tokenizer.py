"""A character-level tokenizer built in code (no downloads).

The vocabulary is four special tokens followed by newline and the 95 printable
ASCII characters, so ids are fixed forever: ``<pad>=0, <bos>=1, <eos>=2,
<unk>=3``, then ``"\\n"`` and ``" "`` .. ``"~"``.  Encoding adds ``<bos>`` in
front; it never adds ``<eos>`` (a training recipe appends it to answers).
Padding is on the left so batches can be fed to ``model.generate``.
"""
from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)
CHARS: tuple[str, ...] = ("\n",) + tuple(chr(c) for c in range(32, 127))
VOCAB: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARS)}
VOCAB_SIZE: int = len(VOCAB)  # 100


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Build the character-level tokenizer (deterministic ids, left padding)."""
    core = Tokenizer(models.WordLevel(vocab=dict(VOCAB), unk_token=UNK))
    # Every character (newline included) is its own pre-token.
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, VOCAB[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )
