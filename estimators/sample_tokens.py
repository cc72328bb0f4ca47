"""What a synthetic sample's token ids are, read from the model's config: the one rule the harness's dataset
(:class:`optimem.harness.scenario.SyntheticTokens`) and the tracer's batch
(:func:`optimem.estimators.trace.step.real_batch`) share, so that the estimate and the real run see the same
tokens. Importing it needs no torch."""
from __future__ import annotations

BYTE_VOCAB = 256
"""The id range of a model whose config has no vocabulary (CANINE reads Unicode code points and hashes them):
byte ids, as a data file's text gives (:func:`optimem.harness.run_config.data_tokens`)."""


def vocab_size(config) -> int:
    """The token ids a sample draws from: ``config.vocab_size``, else its text config's (a composite config),
    else :data:`BYTE_VOCAB`."""
    vocab = getattr(config, "vocab_size", None)
    if not vocab:
        text = getattr(config, "get_text_config", None)
        vocab = getattr(text(), "vocab_size", None) if callable(text) else None
    return int(vocab or BYTE_VOCAB)


def closing_token(config) -> int | None:
    """The id each sample ends with, or None: an encoder-decoder model's ``eos_token_id`` (the first of a list),
    as its tokenizer writes every sample (BART's, T5's, mBART's... append ``</s>``; their classification heads
    pool that token and refuse a sample without it). None for other models, whose tokenizers do not all close
    a sample."""
    if not getattr(config, "is_encoder_decoder", False):
        return None
    eos = getattr(config, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    if not isinstance(eos, int) or isinstance(eos, bool) or not 0 <= eos < vocab_size(config):
        return None
    return eos


__all__ = ["BYTE_VOCAB", "closing_token", "vocab_size"]
