"""Answer extraction and normalisation for math responses: pure string functions, no sympy.

Extraction (DAPO convention, `verl/utils/reward_score/math_dapo.py`): only the last `tail_chars` (300)
characters of a response are read. Within that tail:
  1. the text after the LAST "Answer:" (case-insensitive; the rest of that line, or the next line when the
     colon ends its line) is the answer;
  2. otherwise (no "Answer:", or nothing after it) the content of the LAST `\\boxed{...}` / `\\fbox{...}`
     (nested braces matched; `\\boxed 5` without braces also accepted) is the answer;
  3. otherwise the rest of the line after the last "####" (GSM8K style);
  4. otherwise there is no answer (None).
Chat special tokens (`<|im_end|>`, `</s>`, ...) are removed from the tail first, and "**Answer:**" /
"Answer**:" count as "Answer:".

Normalisation (applied alike to the prediction and the ground truth) removes what graders commonly ignore:
surrounding `$...$` / `\\(...\\)` / `\\[...\\]`, `\\boxed{}`, markdown `**`, "The answer is", a leading
"x =" (everything up to the last "="), trailing punctuation, units and text after a number ("204 minutes",
`5\\text{ cm}`, `30^\\circ`, `50\\%`), LaTeX spacing (`\\,` `\\!` `~`), `\\left`/`\\right`,
`\\dfrac`/`\\tfrac`, thousands separators ("1,000", "1{,}000"), a leading "+" and the Unicode minus.
Unicode math is read as its LaTeX ("½" and "3½" as 1/2 and 7/2, "⁄" as "/", "x²" as x^{2}, "√2" as \\sqrt{2},
"∞" as \\infty), and what no one sees is removed: format characters (zero-width space, BOM, ...) and U+FFFD
(what a decoder writes for bytes cut off mid-character, e.g. in a response that hit its token limit). Control
characters and lone surrogates are kept: an answer holding them is wrong.
`as_exact_number` then reads integers (leading zeros allowed), decimals and integer fractions exactly, so
"007" == "7" and `\\frac{1}{2}` == "0.5" need no sympy.
"""

from __future__ import annotations

import re
import unicodedata
from fractions import Fraction

DAPO_TAIL_CHARS = 300
"""Characters at the end of a response that are searched for an answer (DAPO reads the last 300)."""

MAX_NUMBER_CHARS = 200
"""Longer digit strings are not converted to exact numbers (they go to the string/math-verify path)."""

_ANSWER_RE = re.compile(r"answer\s*\**\s*[:：]", re.IGNORECASE)
_HASHES_RE = re.compile(r"####")
_SPECIAL_TOKEN_RE = re.compile(r"<\|[^|<>]{0,40}\|>|</?s>|<eos>|<pad>")
_BOX_RE = re.compile(r"\\(?:boxed|fbox)")
_MATH_DELIMS = (
    re.compile(r"\$+(.+?)\$+", re.DOTALL),
    re.compile(r"\\\((.+?)\\\)", re.DOTALL),
    re.compile(r"\\\[(.+?)\\\]", re.DOTALL),
)
_LEADING_PHRASE_RE = re.compile(r"^(?:the\s+)?(?:final\s+)?answer\s+is\s*:?\s*", re.IGNORECASE)
_SIZING_RE = re.compile(r"\\(?:left|right|displaystyle|big|Big|bigg|Bigg)(?![A-Za-z])")
_SPACING_RE = re.compile(r"\\[,!;: ]|~|\\quad|\\qquad")
_TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|textrm|mathrm|mbox|mathbf)\s*\{([^{}]*)\}")
_NUMBER = r"[-+]?(?:\d+(?:,\d{3})*(?:\.\d*)?|\.\d+)"
_UNIT_TAIL_RE = re.compile(
    r"(?:\s*(?:\\text\{[^{}]*\}|\\mbox\{[^{}]*\}|\\mathrm\{[^{}]*\}|\^\s*\{?\\circ\}?|°|\\%|%)|\s+[A-Za-z]{2,}(?:\^\{?\d\}?)?\.?)+"
)
_NUMBER_WITH_UNITS_RE = re.compile(rf"({_NUMBER})({_UNIT_TAIL_RE.pattern})")
_THOUSANDS_RE = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_INT_RE = re.compile(r"-?\d+")
_DECIMAL_RE = re.compile(r"-?(?:\d+\.\d*|\.\d+)")
_FRAC_RE = re.compile(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}")
_SLASH_RE = re.compile(r"(-?\d+)/(-?\d+)")


def _vulgar_fractions() -> dict[str, tuple[int, int]]:
    """{"½": (1, 2), ...}: the Unicode characters that are one fraction (NFKC "1⁄2")."""
    out = {}
    for code in (*range(0x00BC, 0x00BF), *range(0x2150, 0x218A)):
        m = re.fullmatch(r"(\d+)\u2044(\d+)", unicodedata.normalize("NFKC", chr(code)))
        if m:
            out[chr(code)] = (int(m.group(1)), int(m.group(2)))
    return out


_VULGAR = _vulgar_fractions()
_VULGAR_RE = re.compile(rf"(?<!\d)(\d*)\s?([{''.join(_VULGAR)}])")  # a digit run is tried once, from its start
_SUPERSCRIPTS = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹⁻", "0123456789-")
_SUPERSCRIPT_RE = re.compile(r"⁻?[⁰¹²³⁴⁵⁶⁷⁸⁹]+")
_SQRT_RE = re.compile(r"√\s*(\d+(?:\.\d+)?|[A-Za-z])")


def _unicode_math(s: str) -> str:
    """Unicode math written as the LaTeX / ASCII the rest of the normalisation reads; unseen characters and
    U+FFFD removed (see the module docstring)."""
    if s.isascii():
        return s
    s = "".join(ch for ch in s if ch != "\ufffd" and unicodedata.category(ch) != "Cf")

    def fraction(m: re.Match) -> str:
        whole, (num, den) = m.group(1), _VULGAR[m.group(2)]
        if len(whole) > MAX_NUMBER_CHARS:
            return m.group(0)
        return f"{int(whole) * den + num}/{den}" if whole else f"{num}/{den}"

    s = _VULGAR_RE.sub(fraction, s).replace("\u2044", "/")
    s = _SUPERSCRIPT_RE.sub(lambda m: "^{" + m.group(0).translate(_SUPERSCRIPTS) + "}", s)
    return _SQRT_RE.sub(lambda m: "\\sqrt{" + m.group(1) + "}", s).replace("∞", "\\infty")


def extract_answer(response: str, tail_chars: int = DAPO_TAIL_CHARS) -> str | None:
    """The raw answer text of a response (see the module docstring for the order), or None."""
    tail = response[-tail_chars:] if tail_chars > 0 else response
    tail = _SPECIAL_TOKEN_RE.sub("", tail)
    line = answer_line(tail)
    if line is not None and line.strip(" \t*_}:."):
        return line
    boxed = last_boxed(tail)
    if boxed is not None:
        return boxed
    marks = list(_HASHES_RE.finditer(tail))
    if marks:
        rest = tail[marks[-1].end() :].strip().split("\n", 1)[0].strip()
        return rest or None
    return None


def answers_at_once(response: str) -> bool:
    """True when the response states its answer with nothing before it (no reasoning first): its first
    "Answer:" comes before any other text (whitespace and markdown emphasis aside)."""
    first = _ANSWER_RE.search(response)
    return first is not None and not response[: first.start()].strip(" \t\r\n*_#")


def last_answer(text: str) -> re.Match | None:
    """The last "Answer:" marker of `text` (as `_ANSWER_RE` reads it: case, "**" and a full-width colon aside),
    or None."""
    last = None
    for last in _ANSWER_RE.finditer(text):  # noqa: B007 - we want the last match
        pass
    return last


def answer_line(text: str) -> str | None:
    """The text after the last "Answer:" up to the end of its line (skipping whitespace right after the
    colon, so "Answer:\\n204" gives "204"), or None when there is no "Answer:"."""
    last = last_answer(text)
    if last is None:
        return None
    rest = text[last.end() :].lstrip()
    return rest.split("\n", 1)[0].strip()


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` or `\\fbox{...}` in `text` (braces matched), the token after
    `\\boxed ` when written without braces, or None (none found, or the last one is never closed)."""
    starts = list(_BOX_RE.finditer(text))
    if not starts:
        return None
    i = starts[-1].end()
    if i < len(text) and text[i] == "{":
        depth = 0
        for j in range(i, len(text)):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1 : j]
        return None
    rest = text[i:]
    if not rest[:1].isspace():
        return None  # e.g. "\boxedx": not a box command
    token = rest.split(None, 1)[0] if rest.strip() else ""
    token = token.split("$", 1)[0]
    return token or None


def normalize_answer(answer: str) -> str:
    """Normalise an answer string for comparison (see the module docstring). Whitespace is collapsed, not
    removed (LaTeX like `\\pi r` needs it); compare with `compare_key`."""
    s = _unicode_math(answer.replace("\u2212", "-").replace("\u00a0", " ").replace("\\$", ""))
    s = s.strip().strip("*_").strip()
    s = _LEADING_PHRASE_RE.sub("", s)
    for delim in _MATH_DELIMS:
        m = delim.search(s)
        if m:
            s = m.group(1)
            break
    s = s.replace("$", "").strip()
    boxed = last_boxed(s) if _BOX_RE.search(s) else None
    if boxed is not None:
        s = boxed
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _SIZING_RE.sub("", s).replace("{,}", ",")
    s = _SPACING_RE.sub(" ", s)
    s = re.sub(r"(?<=\d) (?=\d{3}\b)", "", s)  # "1 000" (a thin space became a space)
    if "=" in s:
        s = s.rsplit("=", 1)[1]
    s = " ".join(s.split())
    s = s.rstrip(".,;!?。 ").strip()
    m = _NUMBER_WITH_UNITS_RE.fullmatch(s)
    if m:
        s = m.group(1)
    s = _TEXT_CMD_RE.sub(lambda t: t.group(1), s).strip()
    s = _strip_outer_braces(s)
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    if s.startswith("+"):
        s = s[1:]
    return s.strip()


def _strip_outer_braces(s: str) -> str:
    """ "{{x}}" -> "x": remove braces that enclose the whole string (only when they match each other)."""
    while len(s) >= 2 and s[0] == "{" and s[-1] == "}":
        depth = 0
        for j, ch in enumerate(s):
            depth += ch == "{"
            depth -= ch == "}"
            if depth == 0 and j < len(s) - 1:
                return s  # the first brace closes early: "{a}{b}"
        s = s[1:-1].strip()
    return s


def compare_key(normalized: str) -> str:
    """The exact-match key of a normalised answer: all whitespace removed."""
    return "".join(normalized.split())


def as_exact_number(normalized: str) -> Fraction | None:
    """An integer, decimal or integer fraction (`a/b`, `\\frac{a}{b}`) read exactly, else None."""
    s = compare_key(normalized)
    if not s or len(s) > MAX_NUMBER_CHARS:
        return None
    try:
        if _INT_RE.fullmatch(s):
            return Fraction(int(s))
        if _DECIMAL_RE.fullmatch(s):
            return Fraction(s)
        m = _FRAC_RE.fullmatch(s)
        if m:
            value = Fraction(int(m.group(2)), int(m.group(3)))
            return -value if m.group(1) else value
        m = _SLASH_RE.fullmatch(s)
        if m:
            return Fraction(int(m.group(1)), int(m.group(2)))
    except (ValueError, ZeroDivisionError):
        return None
    return None
