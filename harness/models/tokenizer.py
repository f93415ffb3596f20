"""The offline tokenizer of the embedded and random-weight models: byte-level BPE without merges.

Every UTF-8 byte is a token, plus the family's special tokens (ChatML's and its media tokens), so
prompts tokenize without downloading a vocabulary. Real checkpoints bring their own tokenizer.
"""

from __future__ import annotations


def byte_level_tokenizer(special_tokens: list[str], *, eos: str, pad: str, chat_template: str):
    """A fast tokenizer over the 256 byte tokens and `special_tokens` (eos and pad among them)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    others = [t for t in special_tokens if t != pad]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=pad,
                                   additional_special_tokens=others)
    fast.add_special_tokens({"additional_special_tokens": others})
    fast.chat_template = chat_template
    return fast
