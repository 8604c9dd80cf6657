"""Passkey retrieval prompts: a short "pass key" needle hidden at a chosen depth of a long, repetitive haystack.

This is the synthetic long-context test of Landmark Attention (Mohtashami & Jaggi, 2023) and YaRN (Peng et al.,
2023): an instruction to memorize the important information, filler sentences ("The grass is green. The sky is
blue. ..."), the needle "The pass key is 71432. Remember it. 71432 is the pass key." at relative depth ``depth``
of the filler, and the question "What is the pass key?". The model passes when the first number it generates is
the pass key. Retrieval attention must find the few needle tokens among thousands of near-identical filler
tokens, which makes this a direct test of top-k recall.

Prompts are deterministic: the same tokenizer, length, depth and seed give the same token ids.
"""

from __future__ import annotations

import dataclasses
import random
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about the important information there.")
FILLER_SENTENCES = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                    "There and back again.")
NEEDLE = "The pass key is {passkey}. Remember it. {passkey} is the pass key."
QUESTION = "What is the pass key?"
# Starting the answer for the model makes it reply with the number itself instead of a sentence about it, so
# the first digit run of its output is its answer and 8 new tokens suffice (digits are single tokens).
ANSWER_PREFIX = "The pass key is"

_DIGITS = re.compile(r"\d+")


@dataclasses.dataclass(frozen=True, eq=False)
class PasskeyPrompt:
    """A tokenized passkey prompt.

    Attributes:
        input_ids: ``[1, T]`` int64 token ids, ready for ``model.generate``.
        passkey: the hidden pass key, a string of digits.
        depth: requested relative depth of the needle in the filler, in ``[0, 1]``; the needle sits at the
            sentence boundary nearest to it.
        n_tokens: actual prompt length ``T``.
    """

    input_ids: torch.Tensor
    passkey: str
    depth: float
    n_tokens: int

    @property
    def attention_mask(self) -> torch.Tensor:
        """``[1, T]`` all-ones mask, so ``generate`` need not guess one when pad and eos tokens coincide."""
        import torch

        return torch.ones_like(self.input_ids)


def _check_passkey(passkey: str | int | None, seed: int) -> str:
    if passkey is None:
        # A private generator: the prompt depends on the seed only, never on global RNG state.
        return str(random.Random(seed).randint(10_000, 99_999))
    if isinstance(passkey, bool) or not isinstance(passkey, (str, int)):
        raise TypeError(f"passkey must be a str of digits, an int or None, got {type(passkey).__name__}")
    text = str(passkey)
    if not text.isascii() or not text.isdigit():
        raise ValueError(f"passkey must be a non-negative number written in digits 0-9, got {passkey!r}")
    return text


def _filler_words(n_words: int) -> list[str]:
    words = " ".join(FILLER_SENTENCES).split(" ")
    return [words[i % len(words)] for i in range(n_words)]


def _needle_word_index(words: list[str], depth: float) -> int:
    """Index of the sentence boundary in ``words`` nearest to ``depth * len(words)``."""
    boundaries = [0] + [i + 1 for i, w in enumerate(words) if w.endswith(".")]
    if boundaries[-1] != len(words):
        boundaries.append(len(words))
    target = depth * len(words)
    return min(boundaries, key=lambda b: (abs(b - target), b))


def _render(tokenizer: Any, words: list[str], depth: float, passkey: str, chat: bool,
            answer_prefix: str | None) -> str:
    k = _needle_word_index(words, depth)
    needle = NEEDLE.format(passkey=passkey)
    haystack = " ".join(p for p in (" ".join(words[:k]), needle, " ".join(words[k:])) if p)
    user = "\n".join((INSTRUCTION, haystack, QUESTION))
    if chat:
        # tokenize=False always returns the string; with tokenize=True transformers 5 returns a BatchEncoding,
        # and the answer prefix has to be appended as text anyway.
        text = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
        return text + answer_prefix if answer_prefix else text
    return f"{user} {answer_prefix}" if answer_prefix else user


def _encode(tokenizer: Any, text: str, chat: bool) -> list[int]:
    # A chat template already writes its special tokens (BOS included) into the text; a plain prompt gets the
    # tokenizer's usual ones.
    ids = tokenizer(text, add_special_tokens=not chat)["input_ids"]
    return list(ids)


def passkey_prompt(
    tokenizer: Any,
    n_tokens: int,
    depth: float,
    passkey: str | int | None = None,
    seed: int = 0,
    *,
    chat: bool = False,
    answer_prefix: str | None = ANSWER_PREFIX,
) -> PasskeyPrompt:
    """Build a passkey retrieval prompt of about ``n_tokens`` tokens with the needle at relative ``depth``.

    The filler is grown word by word (binary search on the tokenized length) until the whole prompt, chat
    template included, is as close to ``n_tokens`` as possible; it comes out within 2% (in practice within a
    couple of tokens) of ``n_tokens``.

    Args:
        tokenizer: a transformers tokenizer (with a chat template when ``chat`` is True).
        n_tokens: target prompt length ``T``; at least the length of the prompt without filler.
        depth: relative position of the needle in the filler: 0 right after the instruction, 1 right before
            the question.
        passkey: the pass key (digits); ``None`` draws a 5-digit number from ``seed``.
        seed: seed of the default pass key.
        chat: wrap the prompt in the tokenizer's chat template as a user turn followed by the generation
            prompt. The default, False, is the plain-text prompt of the original papers, which SmolLM2-135M-Instruct
            answers far better: with full attention it finds the key in 5/5 prompts at 2K and 4K tokens plain,
            0/5 in its chat template (it describes "a magical key" instead).
        answer_prefix: text appended after the generation prompt (or the question), to be continued by the
            model; ``None`` or ``""`` for none.

    Returns:
        The :class:`PasskeyPrompt`, with ``input_ids`` of shape ``[1, T]``.

    Raises:
        ValueError: ``depth`` is outside ``[0, 1]``, ``n_tokens`` is below the minimum (the message gives it),
            the passkey is not a digit string, or ``chat`` is set but the tokenizer has no chat template.
        TypeError: ``n_tokens`` is not an int or ``passkey`` has an unsupported type.
    """
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int):
        raise TypeError(f"n_tokens must be an int, got {n_tokens!r} ({type(n_tokens).__name__})")
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be a number in [0, 1], got {depth!r}")
    if chat and not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no chat template; pass chat=False")
    key = _check_passkey(passkey, seed)

    def length(n_words: int) -> int:
        return len(_encode(tokenizer, _render(tokenizer, _filler_words(n_words), depth, key, chat, answer_prefix),
                           chat))

    minimum = length(0)
    if n_tokens < minimum:
        raise ValueError(f"n_tokens={n_tokens} cannot hold the instruction, needle and question; "
                         f"the minimum for this tokenizer is {minimum}")
    # Every filler word is at least one token, so n_tokens - minimum words always overshoot (or hit) the target.
    lo, hi = 0, n_tokens - minimum
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if length(mid) <= n_tokens:
            lo = mid
        else:
            hi = mid - 1
    n_words = min((lo, lo + 1), key=lambda n: (abs(length(n) - n_tokens), n))
    ids = _encode(tokenizer, _render(tokenizer, _filler_words(n_words), depth, key, chat, answer_prefix), chat)
    import torch  # here: the command line imports this module and answers --help without torch

    input_ids = torch.tensor([ids], dtype=torch.long)  # [1, T]
    return PasskeyPrompt(input_ids=input_ids, passkey=key, depth=float(depth), n_tokens=len(ids))


def passkey_found(text: str, passkey: str | int) -> bool:
    """Return True iff the first number (run of digits) in ``text`` is ``passkey``.

    Args:
        text: the generated answer, without the prompt.
        passkey: the expected pass key.

    Returns:
        Whether the answer starts its numbers with the pass key; ``"12345."`` and ``"It is 12345"`` pass for
        ``"12345"``, ``"123456"``, ``"1234"`` and ``"7 then 12345"`` do not.
    """
    match = _DIGITS.search(text)
    return match is not None and match.group() == str(passkey)
