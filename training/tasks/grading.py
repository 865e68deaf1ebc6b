"""Where a completion's final answer is, and when a maths answer equals the reference.

Shared by the task rewards (gsm8k, math500, countdown, sudoku). Two concerns live here:

* **Locating the answer.** Instruction-tuned models answer as d1 (arXiv 2504.12216) prompts them:
  reasoning, then ``<answer>\\boxed{...}</answer>``. :func:`boxed_spans` finds every ``\\boxed{...}``
  (balanced braces, also ``\\fbox`` and ``\\boxed 5``), :func:`answer_tag` the ``<answer>`` tags.
  Text after an end-of-text marker (``<|eot_id|>``, ``<|endoftext|>``) is ignored by the callers.
* **Comparing maths answers.** :func:`math_equal` says two LaTeX answers are equal when their
  normalised strings are (:func:`normalize_math`: ``\\dfrac``/``\\frac34``/``\\frac9{19}`` -> one
  form, ``\\$`` and ``\\%`` and degrees dropped, ``\\text{...}`` unwrapped, trailing units removed,
  ``x = 5`` -> ``5``, thousands separators) or when Hugging Face's ``math-verify`` finds them equal in
  value (``15.975`` = ``\\frac{639}{40}``, ``7i - 2`` = ``-2 + 7i``, matrices, sets, intervals).

math-verify's own timeouts use ``signal.alarm``, which works only on the main thread, so they are
disabled here (rewards run in training loops and threads) and the input is bounded instead
(:func:`safe_for_sympy`): an answer longer than :data:`MAX_VERIFY_CHARS`, or one whose evaluation could
run for ever (``10^{10^{10}}``, ``99999!``), is compared by its normalised string only. Nothing here
raises on any input: a failure to parse means "not equal".
"""

from __future__ import annotations

import re
from fractions import Fraction
from functools import lru_cache

MAX_VERIFY_CHARS = 200  # longer answers skip math-verify (bounded parse time without signal timeouts)

_END_MARK = re.compile(r"<\|(?:eot_id|endoftext|im_end|end_of_text|eos)\|>")
_BOX = re.compile(r"\\(?:boxed|fbox)")


def strip_end(text: str) -> str:
    """``text`` up to its first end-of-text marker (``<|eot_id|>``, ``<|endoftext|>``, ...)."""
    m = _END_MARK.search(text)
    return text if m is None else text[:m.start()]


UNCLOSED_CHARS = 1000  # how much of the text a box whose brace never closes takes


def boxed_spans(text: str) -> list[tuple[str, bool]]:
    """Every ``\\boxed``/``\\fbox`` in ``text``, in order, as (content, closed): the content within its balanced
    braces; a box whose brace never closes takes the rest of the text (at most :data:`UNCLOSED_CHARS`
    characters; closed False); ``\\boxed 5`` takes the next word. One pass over the text."""
    found: dict[int, tuple[str, bool]] = {}  # start -> span, so that nested boxes come out in text order
    opens: set[int] = set()  # positions of the "{" that open a box
    for m in _BOX.finditer(text):
        i = m.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            opens.add(i)
        elif i > m.end():  # "\boxed 5": the next word, up to a closing $
            word = text[i:i + UNCLOSED_CHARS].split(None, 1)
            found[i] = (word[0].split("$")[0], True) if word else ("", False)
    if opens:
        stack: list[int] = []
        for j, ch in enumerate(text):
            if ch == "{":
                stack.append(j)
            elif ch == "}" and stack:
                i = stack.pop()
                if i in opens:
                    found[i] = (text[i + 1:j], True)
        for i in opens - found.keys():
            found[i] = (text[i + 1:i + 1 + UNCLOSED_CHARS], False)
    return [found[i] for i in sorted(found)]


def last_boxed(text: str) -> str | None:
    """Content of the last closed ``\\boxed{...}`` in ``text`` (stripped), or None."""
    closed = [s for s, ok in boxed_spans(text) if ok]
    return closed[-1].strip() if closed else None


def answer_tag(text: str) -> str | None:
    """Content of the first closed ``<answer>...</answer>`` in ``text`` (stripped), or None."""
    m = re.search(r"<answer>(.*?)</answer>", text, re.S | re.I)
    return None if m is None else m.group(1).strip()


def is_placeholder(s: str | None) -> bool:
    """True for no answer: None, empty, or dots (``\\boxed{...}`` copied from the prompt's template)."""
    return s is None or not s.strip() or re.fullmatch(r"\s*(\\ldots|\\dots|\.+)\s*", s) is not None


# ----------------------------------------------------------------------------------- numbers

_UNIT_WORDS = (r"(?:cm|m|km|mm|in|inches|inch|ft|feet|foot|yd|yards?|miles?|units?|degrees?|"
               r"dollars?|cents?|hours?|minutes?|seconds?|days?|weeks?|years?|sq|square|cubic|meters?)")
_NUM = re.compile(r"(?:(?<![\w.])-)?(?:\d+(?:\.\d+)?|\.\d+)")  # "5-3" holds 5 and 3, "x = -3" holds -3
_FRAC_NUM = re.compile(r"(-?)\\[dt]?frac\{\s*(-?\d+)\s*\}\{\s*(-?\d+)\s*\}")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_NUM_NOISE = ("\\$", "$", "\\%", "%", "\\!", "\\,", "\\;", "\\ ", "\\left", "\\right", "^\\circ", "^{\\circ}")
_TEXT = re.compile(r"\\(?:text|textbf|textrm|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")


def unwrap_text(s: str) -> str:
    """``\\text{...}`` (and ``\\mathrm``, ``\\mbox``, ...) replaced by their contents, nested ones too."""
    prev = None
    while prev != s:
        prev, s = s, _TEXT.sub(r"\1", s)
    return s


def _is_name_or_arithmetic(s: str) -> bool:
    """True for a variable name (``x``, ``a_1``, ``\\text{total}``) or arithmetic on numbers (``8 + 8 \\times 2``)."""
    s = s.strip()
    if re.fullmatch(r"[A-Za-z](_\{?\w+\}?)?|\\?[A-Za-z ]+", s):
        return True
    s = re.sub(r"\\(times|cdot|div|frac)", " ", s)
    return re.fullmatch(r"[\d\s.,+\-*/()=^{}]+", s) is not None


def numbers_in(text: str) -> list[Fraction]:
    """Every number in ``text``, in order (thousands separators, ``$`` and ``\\text{}`` wrappers tolerated)."""
    return [Fraction(x) for x in _NUM.findall(_THOUSANDS.sub("", unwrap_text(text).replace("$", "")))]


def number_value(s: str) -> Fraction | None:
    """Exact value of an answer that is one number: ``1,234``, ``\\$18.50``, ``50\\%``, ``-3``,
    ``\\frac{2}{3}``, ``2/3``, ``5 \\text{ apples}``, ``x = 12``; None when it is anything else."""
    s = unwrap_text(s)
    for token in _NUM_NOISE:
        s = s.replace(token, "")
    s = _THOUSANDS.sub("", s).strip().rstrip(".").strip()
    if "=" in s:  # "x = 12", "8 + 8 + 15 = 31": the right side; "5x + 4 = 0" is an equation, not a number
        left, _, right = s.rpartition("=")
        if not _is_name_or_arithmetic(left):
            return None
        s = right.strip()
    try:
        if m := _FRAC_NUM.fullmatch(s):
            value = Fraction(int(m[2]), int(m[3]))
            return -value if m[1] else value
        if m := re.fullmatch(r"(-?\d+)\s*/\s*(-?\d+)", s):
            return Fraction(int(m[1]), int(m[2]))
        if m := re.fullmatch(rf"(-?(?:\d+(?:\.\d*)?|\.\d+))\s*(?:{_UNIT_WORDS}(?:\^\d)?)?", s):  # maybe a unit
            return Fraction(m[1])
    except (ValueError, ZeroDivisionError):
        return None
    return None


# ----------------------------------------------------------------------------------- maths

_DROP = ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\ ", "\\$", "$", "\\%", "%",
         "^{\\circ}", "^\\circ", "\\circ", "\\displaystyle")


def _fix_frac_shorthand(s: str) -> str:
    """``\\frac34`` -> ``\\frac{3}{4}``, ``\\frac9{19}`` -> ``\\frac{9}{19}``, ``\\frac{a}b`` -> ``\\frac{a}{b}``."""
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\s*([\da-zA-Z])\s*\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\s*\{([^{}]*)\}\s*([\da-zA-Z])", r"\\frac{\1}{\2}", s)
    return s


def normalize_math(s: str) -> str:
    """One string form of a LaTeX answer, so that equal answers written differently compare equal."""
    s = s.replace("\n", " ").replace("\\\\", "\\")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\\(?:mbox|text)\{\s+[^{}]*\}(\^\d)?\s*$", "", s)  # trailing units: "15\mbox{ cm}^2"
    s = unwrap_text(s)
    for token in _DROP:
        s = s.replace(token, "")
    s = re.sub(r"\^\{?\\prime\}?", "'", s)
    s = _fix_frac_shorthand(s)
    s = re.sub(r"\\sqrt\s*(\d|[a-zA-Z])", r"\\sqrt{\1}", s)  # \sqrt2 -> \sqrt{2}
    s = "".join(s.split()).rstrip(".")
    if re.fullmatch(r"[A-Za-z]\w{0,1}=.+", s) and s.count("=") == 1:  # "x=5" -> "5"
        s = s.split("=", 1)[1]
    s = re.sub(rf"(?<=\d){_UNIT_WORDS}(\^\d)?$", "", s)  # "12cm" -> "12"
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):  # 10,080 -> 10080
        s = s.replace(",", "")
    s = re.sub(r"^(-?)\.(\d)", r"\g<1>0.\2", s)  # .5 -> 0.5
    if re.fullmatch(r"-?\d+\.\d*?0+", s) and "." in s:  # 36.00 -> 36, 2.50 -> 2.5
        s = s.rstrip("0").rstrip(".")
    if m := re.fullmatch(r"(-?)(\d+)/(\d+)", s):  # 3/4 -> \frac{3}{4}
        s = f"{m[1]}\\frac{{{m[2]}}}{{{m[3]}}}"
    return s


def _silence_math_verify_timeout_warning() -> None:
    """math-verify warns once that its timeout is off; here that is deliberate (see the module docstring)."""
    import math_verify.grader
    import math_verify.parser
    math_verify.parser.TIMEOUT_WARNING_SHOWN = True
    math_verify.grader.TIMEOUT_WARNING_SHOWN = True


@lru_cache(maxsize=4096)
def _mv_parse(s: str) -> tuple:
    """math-verify's parse of one LaTeX answer (without signal timeouts); () when it fails."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse
    _silence_math_verify_timeout_warning()
    try:
        return tuple(parse(f"\\boxed{{{s}}}", extraction_config=[LatexExtractionConfig(boxed_match_priority=0),
                                                                 ExprExtractionConfig()],
                           parsing_timeout=None))
    except Exception:  # math-verify and sympy raise many kinds on odd input
        return ()


_BIG_LITERAL = re.compile(r"\d{13,}")


def _argument(s: str, i: int) -> tuple[str, int]:
    """The argument that starts at ``s[i]`` and where it ends: a balanced ``{...}`` group's content, else
    one character."""
    while i < len(s) and s[i] == " ":
        i += 1
    if i < len(s) and s[i] == "{":
        depth = 0
        for j in range(i, len(s)):
            depth += {"{": 1, "}": -1}.get(s[j], 0)
            if depth == 0:
                return s[i + 1:j], j + 1
        return s[i + 1:], len(s)
    return s[i:i + 1], i + 1


def safe_for_sympy(s: str) -> bool:
    """True when sympy can evaluate ``s`` quickly. With math-verify's timeouts off, an answer such as
    ``10^{10^{10}}`` or ``99999!`` would compute for ever, so such answers are compared as strings only:
    at most :data:`MAX_VERIFY_CHARS` characters, no literal over 12 digits, exponents without a further
    power and with no number over 3 digits, factorials and binomials of literals of at most 3 digits."""
    if len(s) > MAX_VERIFY_CHARS or _BIG_LITERAL.search(s):
        return False
    for m in re.finditer(r"\^|\\binom|\\dbinom|\\tbinom|\\choose", s):
        arg, end = _argument(s, m.end())
        if m.group(0) == "^":  # no tower (9^9^9, 10^{10^{10}}), no exponent over 999
            if "^" in arg or re.search(r"\d{4,}", arg) or s[end:].lstrip().startswith("^"):
                return False
        elif re.search(r"\d{4,}", s[m.end():]):  # binomials of numbers up to 999
            return False
    for m in re.finditer(r"(?<!\\)!", s):  # a factorial ("\!" is a thin space)
        before = s[:m.start()]
        if not re.search(r"(?<!\d)\d{1,3}\s*$", before):
            return False
    return True


def verify_equal(pred: str, gold: str) -> bool:
    """math-verify's verdict that ``pred`` equals ``gold`` in value (False if either is unsafe to evaluate,
    :func:`safe_for_sympy`, or unparsable)."""
    if not (safe_for_sympy(pred) and safe_for_sympy(gold)):
        return False
    from math_verify import verify
    g, p = _mv_parse(gold), _mv_parse(pred)
    if not g or not p:
        return False
    try:
        return bool(verify(list(g), list(p), timeout_seconds=None))
    except Exception:
        return False


def math_equal(pred: str | None, gold: str) -> bool:
    """True when the answer ``pred`` equals the reference ``gold``: same normalised string, same
    number, or equal in value by math-verify. Never raises."""
    if is_placeholder(pred):
        return False
    try:
        a, b = normalize_math(pred), normalize_math(gold)
        if a and a == b:
            return True
        x, y = number_value(pred), number_value(gold)
        if x is not None and y is not None:
            return x == y
        return verify_equal(pred.strip(), gold.strip())
    except Exception:  # defensive: a reward must never raise
        return False
