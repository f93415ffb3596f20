"""The tokenizer of the models the harness builds: byte-level BPE with ChatML's special tokens.

Without a corpus every UTF-8 byte is a token (no merges): the random-weight and smoke models, whose
prompts must tokenize without downloading a vocabulary. With a corpus, merges are learnt from it
(the micro model, from its task's prompts, as a real checkpoint's BPE is learnt from its corpus):
a question is then ~35 tokens instead of ~120 bytes, and any other text still tokenizes byte by
byte. Real checkpoints bring their own tokenizer.
"""

from __future__ import annotations


def chat_tokenizer(special_tokens: list[str], *, eos: str, pad: str, chat_template: str,
                   corpus: list[str] | None = None, vocab_size: int = 1024):
    """A fast tokenizer over the 256 byte tokens (plus merges learnt from `corpus`, up to
    `vocab_size` entries) and `special_tokens` (eos and pad among them). Deterministic: the same
    corpus gives the same merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if corpus is None:
        tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(sorted(alphabet))}, merges=[]))
    else:
        tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=corpus is not None)
    tok.decoder = decoders.ByteLevel()
    if corpus is not None:
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet,
                                      special_tokens=special_tokens, show_progress=False)
        tok.train_from_iterator(corpus, trainer)
    others = [t for t in special_tokens if t != pad]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=pad,
                                   additional_special_tokens=others)
    fast.add_special_tokens({"additional_special_tokens": others})  # ids of their own, if not learnt
    fast.chat_template = chat_template
    return fast
