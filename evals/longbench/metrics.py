"""LongBench's official metrics, re-implemented with the packages the official ``metrics.py`` uses.

QA F1 on normalized words (English) or jieba tokens (Chinese), ROUGE-L F (the ``rouge`` package; Chinese text is
segmented with jieba first), classification by the class names the prediction mentions, paragraph retrieval and
counting by the numbers in the prediction, and code similarity (``fuzzywuzzy``'s ``fuzz.ratio``) of the first
line that is not a comment or a code fence. A sample scores the best value over its reference answers; a task
scores the mean over samples, times 100 (:func:`task_score`).
"""

from __future__ import annotations

import re
import string
from collections import Counter

from evals.longbench.protocol import FIRST_LINE_ONLY, METRICS

_ZH_PUNCTUATION = "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."


def normalize_answer(text: str) -> str:
    """Lowercase; drop punctuation and the articles a, an, the; collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def normalize_zh_answer(text: str) -> str:
    """Lowercase; drop English and Chinese punctuation and all whitespace."""
    drop = set(string.punctuation + _ZH_PUNCTUATION)
    return "".join("".join(ch for ch in text.lower() if ch not in drop).split())


def _f1(prediction: list[str], reference: list[str]) -> float:
    same = sum((Counter(prediction) & Counter(reference)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction), same / len(reference)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, reference: str, **_) -> float:
    return _f1(normalize_answer(prediction).split(), normalize_answer(reference).split())


def _jieba_tokens(text: str) -> list[str]:
    import jieba

    return list(jieba.cut(text, cut_all=False))


def qa_f1_zh(prediction: str, reference: str, **_) -> float:
    pred = [t for t in (normalize_zh_answer(w) for w in _jieba_tokens(prediction)) if t]
    ref = [t for t in (normalize_zh_answer(w) for w in _jieba_tokens(reference)) if t]
    return _f1(pred, ref)


def rouge(prediction: str, reference: str, **_) -> float:
    from rouge import Rouge

    try:
        return Rouge().get_scores([prediction], [reference], avg=True)["rouge-l"]["f"]
    except (ValueError, RecursionError):  # empty hypothesis, or one too long for the package: 0 as officially
        return 0.0


def rouge_zh(prediction: str, reference: str, **_) -> float:
    return rouge(" ".join(_jieba_tokens(prediction)), " ".join(_jieba_tokens(reference)))


def classification(prediction: str, reference: str, all_classes: list[str] | None = None, **_) -> float:
    """1 / (classes named) if the reference class is among the class names in the prediction (names contained
    in the reference but different from it do not count)."""
    named = [c for c in (all_classes or []) if c in prediction]
    named = [c for c in named if not (c in reference and c != reference)]
    return 1.0 / len(named) if reference in named else 0.0


def _numbers_match(prediction: str, wanted: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    return sum(n == wanted for n in numbers) / len(numbers) if numbers else 0.0


def retrieval(prediction: str, reference: str, **_) -> float:
    return _numbers_match(prediction, re.findall(r"Paragraph (\d+)", reference)[0])


def retrieval_zh(prediction: str, reference: str, **_) -> float:
    return _numbers_match(prediction, re.findall(r"段落(\d+)", reference)[0])


def count(prediction: str, reference: str, **_) -> float:
    return _numbers_match(prediction, str(reference))


def code_sim(prediction: str, reference: str, **_) -> float:
    from fuzzywuzzy import fuzz

    line = next((ln for ln in prediction.lstrip("\n").split("\n")
                 if "`" not in ln and "#" not in ln and "//" not in ln), "")
    return fuzz.ratio(line, reference) / 100


FUNCTIONS = {"qa_f1": qa_f1, "qa_f1_zh": qa_f1_zh, "rouge": rouge, "rouge_zh": rouge_zh,
             "classification": classification, "retrieval": retrieval, "retrieval_zh": retrieval_zh, "count": count,
             "code_sim": code_sim}


def sample_score(task: str, prediction: str, answers: list[str], all_classes: list[str] | None = None) -> float:
    """The official score of one prediction: the best over the reference answers, in [0, 1]."""
    if task not in METRICS:
        raise ValueError(f"unknown LongBench task {task!r}; allowed: {sorted(METRICS)}")
    if task in FIRST_LINE_ONLY:
        prediction = prediction.lstrip("\n").split("\n")[0]
    metric = FUNCTIONS[METRICS[task]]
    return max([0.0] + [metric(prediction, a, all_classes=all_classes) for a in answers])


def task_score(scores: list[float]) -> float:
    """Mean sample score times 100, rounded to 2 decimals (as the official ``eval.py``)."""
    return round(100 * sum(scores) / len(scores), 2) if scores else float("nan")
