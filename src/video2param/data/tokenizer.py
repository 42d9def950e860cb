"""A word-level tokenizer built entirely in code, so tests and the demo need no download.

The tokenizer is a ``transformers.PreTrainedTokenizerFast`` around a ``tokenizers`` WordLevel model: input is
lower-cased, split into runs of word characters and runs of punctuation (``"square?"`` → ``square``, ``?``),
and each piece maps to one id. Special tokens: ``<pad>`` (0), ``<unk>`` (1), ``<s>`` (2, bos, added in front of
every encoded text by the post-processor) and ``</s>`` (3, eos). It saves and loads with
``save_pretrained`` / ``from_pretrained`` like any Hub tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from .collate import PROMPT_WORDS
from .moving_shapes import MovingShapesConfig, moving_shapes_vocabulary

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, BOS, EOS)


def build_word_tokenizer(words: Iterable[str], extra_special_tokens: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """A word-level tokenizer knowing ``words`` (lower-cased, de-duplicated) plus the four special tokens.

    ``extra_special_tokens`` (e.g. ``"<video>"``) are added as special tokens: never split, never lower-cased.
    Raises ``ValueError`` for an empty vocabulary or a word the pre-tokenizer would split (it could never be
    produced), e.g. ``"two words"`` or ``"don't"``.
    """
    if isinstance(words, str):
        raise ValueError("words: expected an iterable of words, got a single string")
    pre_tokenizer = pre_tokenizers.Whitespace()  # \w+|[^\w\s]+, the same split the benchmark's questions use
    vocab: dict[str, int] = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in words:
        if not isinstance(word, str):
            raise ValueError(f"words: expected strings, got {word!r}")
        lowered = word.lower()
        if lowered in vocab:
            continue
        pieces = [piece for piece, _ in pre_tokenizer.pre_tokenize_str(lowered)]
        if pieces != [lowered]:
            raise ValueError(
                f"words: {word!r} would be split into {pieces} by the pre-tokenizer and could never be produced; "
                "pass the pieces as separate words"
            )
        vocab[lowered] = len(vocab)
    if len(vocab) == len(SPECIAL_TOKENS):
        raise ValueError("words: the vocabulary is empty; pass at least one word")
    if isinstance(extra_special_tokens, str):  # one token given bare, not as a list of its characters
        extra_special_tokens = (extra_special_tokens,)
    extra = list(dict.fromkeys(extra_special_tokens))
    for token in extra:
        if not isinstance(token, str) or not token or token.strip() != token:
            raise ValueError(f"extra_special_tokens: expected non-empty strings without outer spaces, got {token!r}")
        if token in SPECIAL_TOKENS or token.lower() in vocab:
            raise ValueError(f"extra_special_tokens: {token!r} is already in the vocabulary")

    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizer
    bos_id = vocab[BOS]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[(BOS, bos_id)]
    )
    # No decoder: WordLevel decoding joins the tokens with single spaces, which is what a word tokenizer wants.
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        extra_special_tokens=extra,
        padding_side="right",
    )


def moving_shapes_tokenizer(config: MovingShapesConfig,
                            extra_special_tokens: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """The word tokenizer for MovingShapes: every question/answer word of ``config`` plus the prompt words."""
    return build_word_tokenizer(moving_shapes_vocabulary(config) + list(PROMPT_WORDS), extra_special_tokens)
