"""The offline long-context suite: synthetic retrieval and aggregation tasks at any token length, no downloads.

In the spirit of RULER (Hsieh et al., 2024): each task hides what the answer needs in a haystack sized to the
requested token length with the model's own tokenizer, asks for it, and scores the greedy answer by string match
(the fraction of the expected strings that appear in it, case-insensitive).

- ``passkey``: a 5-digit pass key in repeated filler sentences (:mod:`pqflex.harness.prompts`).
- ``niah_single``: one "special magic number" for a key, in a haystack of random-word sentences.
- ``niah_multikey``: four numbers for four keys; the question asks for one (three distractors).
- ``niah_multivalue``: four numbers for the same key; all four are asked for.
- ``niah_multiquery``: four numbers for four keys; two keys are asked for.
- ``vt``: variable tracking; a chain of 4 assignments (``VAR B = VAR A``) from a 5-digit value, in filler; all 5
  variables are asked for.
- ``cwe``: common-word extraction; a numbered word list where 10 words appear 30 times each and the rest 3 times;
  the 10 common words are asked for.
- ``fwe``: frequent-word extraction; coded words with Zipf (alpha 2) frequencies; the 3 most frequent are asked for.

Every sample is a pure function of (tokenizer, task, length, seed). Words come from the tokenizer's vocabulary
(lowercase ASCII words of 4-10 letters that are single tokens), so no word list ships with the package.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from typing import Any

from pqflex.harness.prompts import FILLER_SENTENCES, passkey_prompt

TASKS = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")

NIAH_INSTRUCTION = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
                    "I will quiz you about the numbers afterwards.")
NIAH_NEEDLE = "One of the special magic numbers for {key} is: {value}."
VT_INSTRUCTION = "Memorize and track the chain of variable assignments hidden in the following text."
CWE_INSTRUCTION = "Below is a numbered list of words. In these words, some appear more often than others."
FWE_INSTRUCTION = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                   "frequently appeared coded words.")


@dataclasses.dataclass(frozen=True)
class Sample:
    """One prompt of the suite.

    Attributes:
        task: the task name (one of :data:`TASKS`).
        input_ids: prompt token ids (the tokenizer's special tokens included).
        answers: the strings a correct answer contains.
        max_new_tokens: greedy tokens to generate.
        seed: the seed it was built from.
    """

    task: str
    input_ids: tuple[int, ...]
    answers: tuple[str, ...]
    max_new_tokens: int
    seed: int

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)


def score(prediction: str, answers: tuple[str, ...] | list[str]) -> float:
    """Fraction of ``answers`` that occur in ``prediction`` (case-insensitive): RULER's ``string_match_all``."""
    text = prediction.lower()
    return sum(a.lower() in text for a in answers) / len(answers)


def vocabulary(tokenizer: Any) -> list[str]:
    """Sorted lowercase ASCII words of 4-10 letters that the tokenizer encodes as one word-initial token.

    Tokens that begin a longer word token ("crit" of "critical") are left out: most are word fragments.
    """
    words = set()
    for token in tokenizer.get_vocab():
        if token[:1] in ("\u0120", "\u2581"):  # GPT-2 byte-level "G-dot" or SentencePiece's word-start marker
            word = token[1:]
            if 4 <= len(word) <= 10 and word.isascii() and word.isalpha() and word.islower():
                words.add(word)
    ordered = sorted(words)
    words = [w for w, after in zip(ordered, ordered[1:] + [""]) if not after.startswith(w)]
    if len(words) < 500:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} yields only {len(words)} whole-word tokens; "
                         "the suite needs at least 500")
    return words


def _tokens(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def _fit(tokenizer: Any, n_tokens: int, render: Callable[[int], str], most: int) -> list[int]:
    """Token ids of ``render(n)`` for the largest ``n <= most`` whose prompt has at most ``n_tokens`` tokens."""
    if len(_tokens(tokenizer, render(0))) > n_tokens:
        raise ValueError(f"n_tokens={n_tokens} is too short for this task's instruction and question "
                         f"({len(_tokens(tokenizer, render(0)))} tokens without any haystack)")
    lo, hi = 0, most
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(_tokens(tokenizer, render(mid))) <= n_tokens:
            lo = mid
        else:
            hi = mid - 1
    return _tokens(tokenizer, render(lo))


def _prompt(instruction: str, context: str, question: str, prefix: str) -> str:
    return f"{instruction}\n{context}\n{question} {prefix}"


def _insert(units: list[str], needles: list[str], depths: list[float]) -> str:
    """``units`` joined by spaces with each needle at the unit boundary nearest its depth."""
    out = list(units)
    for needle, depth in sorted(zip(needles, depths), key=lambda p: -p[1]):  # deepest first keeps indices valid
        out.insert(round(depth * len(units)), needle)
    return " ".join(out)


def _noise(n: int) -> list[str]:
    return [FILLER_SENTENCES[i % len(FILLER_SENTENCES)] for i in range(n)]


def _word_sentences(rng: random.Random, words: list[str], n: int) -> list[str]:
    out = []
    for _ in range(n):
        s = " ".join(rng.choice(words) for _ in range(rng.randint(6, 12)))
        out.append(s[0].upper() + s[1:] + ".")
    return out


def _niah(tokenizer, n_tokens, rng, words, n_needles, same_key, n_queries):
    keys = [f"{rng.choice(words)}-{rng.choice(words)}" for _ in range(1 if same_key else n_needles)]
    keys = keys * n_needles if same_key else keys
    values = [str(rng.randint(1_000_000, 9_999_999)) for _ in range(n_needles)]
    needles = [NIAH_NEEDLE.format(key=k, value=v) for k, v in zip(keys, values)]
    depths = [rng.uniform(0.05, 0.95) for _ in needles]
    asked = sorted(rng.sample(range(n_needles), n_queries)) if not same_key else list(range(n_needles))
    names = ", ".join(dict.fromkeys(keys[i] for i in asked))
    if same_key or n_queries > 1:
        question = f"What are all the special magic numbers for {names} mentioned in the provided text?"
        prefix = f"The special magic numbers for {names} mentioned in the provided text are"
    else:
        question = f"What is the special magic number for {names} mentioned in the provided text?"
        prefix = f"The special magic number for {names} mentioned in the provided text is"
    most = n_tokens // 6 + 1
    haystack = _word_sentences(rng, words, most)
    ids = _fit(tokenizer, n_tokens, lambda n: _prompt(NIAH_INSTRUCTION, _insert(haystack[:n], needles, depths),
                                                      question, prefix), most)
    return ids, tuple(values[i] for i in asked), 12 * len(asked)


def _vt(tokenizer, n_tokens, rng, hops=4):
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    names = []
    while len(names) < hops + 1:
        name = "".join(rng.choice(letters) for _ in range(5))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10_000, 99_999))
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i + 1]} = VAR {names[i]}." for i in range(hops)]
    depths = sorted(rng.uniform(0.05, 0.95) for _ in chain)
    question = f"Find all variables that are assigned the value {value} in the text above."
    prefix = (f"Answer: According to the chain of variable assignments in the text above, {hops + 1} variables are "
              f"assigned the value {value}, they are:")
    most = n_tokens // 4 + 1
    ids = _fit(tokenizer, n_tokens, lambda n: _prompt(VT_INSTRUCTION, _insert(_noise(n), chain, depths), question,
                                                      prefix), most)
    return ids, tuple(names), 40


def _cwe(tokenizer, n_tokens, rng, words, n_common=10, freq_common=30, freq_rare=3):
    pool = rng.sample(words, min(len(words), n_common + n_tokens // 4))
    common, rare = pool[:n_common], pool[n_common:]
    question = f"What are the {n_common} most common words in the above list?"
    prefix = f"Answer: The top {n_common} words that appear most often in the list are:"
    order_seed = rng.random()

    def render(n_rare: int) -> str:
        items = common * freq_common + rare[:n_rare] * freq_rare
        random.Random(order_seed).shuffle(items)
        listing = " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))
        return _prompt(CWE_INSTRUCTION, listing, question, prefix)

    ids = _fit(tokenizer, n_tokens, render, len(rare))
    return ids, tuple(common), 6 * n_common


def _fwe(tokenizer, n_tokens, rng, n_words=400, alpha=2.0):
    coded = []
    while len(coded) < n_words:
        w = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5))
        if w not in coded:
            coded.append(w)
    weights = [1 / (k + 1) ** alpha for k in range(n_words)]
    total_w = sum(weights)
    question = ("Question: Do not provide any explanation. Please ignore the dots '....'. What are the three most "
                "frequently appeared words in the above coded text?")
    prefix = "Answer: According to the coded text above, the three most frequently appeared words are:"
    order_seed = rng.random()

    def render(total: int) -> str:
        counts = [int(total * w / total_w) for w in weights]  # strictly decreasing at the top: clear top 3
        items = [w for w, c in zip(coded, counts) for _ in range(c)]
        random.Random(order_seed).shuffle(items)
        text = " ".join(w if (i + 1) % 10 else w + " ...." for i, w in enumerate(items))
        return _prompt(FWE_INSTRUCTION, text, question, prefix)

    ids = _fit(tokenizer, n_tokens, render, n_tokens)
    return ids, tuple(coded[:3]), 24


def make_sample(tokenizer: Any, task: str, n_tokens: int, seed: int, words: list[str] | None = None) -> Sample:
    """One sample of ``task`` with at most ``n_tokens`` prompt tokens (within a few tokens of it).

    Args:
        tokenizer: a transformers tokenizer.
        task: one of :data:`TASKS`.
        n_tokens: the target prompt length.
        seed: the sample's seed; the same arguments always give the same sample.
        words: :func:`vocabulary` of the tokenizer, if already computed.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; allowed: {TASKS}")
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
        raise ValueError(f"n_tokens must be an int >= 1, got {n_tokens!r}")
    rng = random.Random(f"{task}/{n_tokens}/{seed}")
    if task == "passkey":
        p = passkey_prompt(tokenizer, n_tokens, rng.uniform(0.05, 0.95), seed=rng.randint(0, 2 ** 31))
        return Sample(task, tuple(p.input_ids[0].tolist()), (p.passkey,), 8, seed)
    words = vocabulary(tokenizer) if words is None else words
    if task == "vt":
        ids, answers, new = _vt(tokenizer, n_tokens, rng)
    elif task == "cwe":
        ids, answers, new = _cwe(tokenizer, n_tokens, rng, words)
    elif task == "fwe":
        ids, answers, new = _fwe(tokenizer, n_tokens, rng)
    else:
        shape = {"niah_single": (1, False, 1), "niah_multikey": (4, False, 1), "niah_multivalue": (4, True, 4),
                 "niah_multiquery": (4, False, 2)}[task]
        ids, answers, new = _niah(tokenizer, n_tokens, rng, words, *shape)
    return Sample(task, tuple(ids), answers, new, seed)
