"""The verification step: a candidate that is close in meaning must also agree on the details that change an
answer, which cosine similarity barely sees ("cancel" / "un-cancel", "100 USD" / "1000 USD", "Tuesday" /
"Wednesday", "higher" / "lower").

`disagreement(query, candidate)` is a pure function: the first reason the two texts cannot share an answer, or
None. The checks, each symmetric:
  numbers     the same numbers (digits, with thousands separators and decimals normalised, and number words)
  negation    the same count of negations (not, no, never, n't, without, ...), and no word negated by a prefix
              in one text whose plain form is in the other (un-cancel / cancel, disable / enable)
  opposites   no word in one text whose opposite is in the other and not in the first (higher / lower)
  names       every name in one text (a capitalised word not starting a sentence, an acronym, a weekday or a
              month) appears in the other, in any case ("France" matches "france's")
  roles       the same words in another order are another question ("Why do Poles dislike Russians?" / "Why do
              Russians dislike Poles?"), unless the moved words sit around "and", "or", "vs" or "between"
              ("Telegram and WhatsApp" / "WhatsApp and Telegram")
  conditions  a condition one text adds ("... in Minnesota for business?" / "... in Minnesota?"): a preposition
              followed by words the other text has none of
Measured on ../shared/data/paraphrase (benchmarks/results/semantic_cache.md): it removes most false hits among
close pairs (dates, prices, counts, opposites) at a small cost in recall.
"""

from __future__ import annotations

import re


def _wordlist(text: str) -> list[str]:
    return text.split()


def _wordset(text: str) -> frozenset[str]:
    return frozenset(_wordlist(text))


_TOKEN = re.compile(r"[A-Za-z][A-Za-z'’\-]*|\d[\d,]*(?:\.\d+)?")
_SENTENCE_START = re.compile(r"(?:^|[.!?:;\n]\s*|[\"“(]\s*)$")

NEGATIONS = _wordset(
    "not no never none nobody nothing neither nor without cannot cant dont doesnt didnt isnt arent wasnt "
    "werent wont wouldnt shouldnt couldnt hasnt havent hadnt mustnt neednt aint"
)
NEGATING_PREFIXES = ("un", "non", "dis", "in", "im", "ir", "il", "de", "anti", "mis")
# number words that are almost always numbers ("one" is as often a pronoun, and magnitudes need the words
# around them, which this check does not parse)
_SMALL = "zero _ two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
NUMBER_WORDS = {w: i for i, w in enumerate(_wordlist(_SMALL + "seventeen eighteen nineteen twenty")) if w != "_"}
NUMBER_WORDS |= {"thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90}
_OPPOSITE_PAIRS = (
    "higher lower",
    "high low",
    "up down",
    "rise fall",
    "rises falls",
    "rose fell",
    "increase decrease",
    "increased decreased",
    "gain lose",
    "gained lost",
    "more less",
    "most least",
    "max min",
    "maximum minimum",
    "before after",
    "above below",
    "over under",
    "open close",
    "opened closed",
    "start stop",
    "enable disable",
    "buy sell",
    "add remove",
    "include exclude",
    "accept reject",
    "allow deny",
    "win lose",
    "won lost",
    "male female",
    "man woman",
    "men women",
    "boy girl",
    "first last",
    "early late",
    "earlier later",
    "cheap expensive",
    "cheapest most",
    "fast slow",
    "faster slower",
    "big small",
    "bigger smaller",
    "large small",
    "larger smaller",
    "long short",
    "longer shorter",
    "old new",
    "older newer",
    "hot cold",
    "true false",
    "yes no",
    "always never",
    "import export",
    "input output",
    "upload download",
    "push pull",
    "north south",
    "east west",
    "left right",
    "inside outside",
    "encrypt decrypt",
    "compress decompress",
    "join leave",
    "login logout",
    "sign-in sign-out",
    "subscribe unsubscribe",
)
OPPOSITES: dict[str, frozenset[str]] = {}
for _pair in _OPPOSITE_PAIRS:
    _a, _b = _pair.split()
    OPPOSITES[_a] = OPPOSITES.get(_a, frozenset()) | {_b}
    OPPOSITES[_b] = OPPOSITES.get(_b, frozenset()) | {_a}
CALENDAR = _wordset(
    "monday tuesday wednesday thursday friday saturday sunday january february march april may june july "
    "august september october november december jan feb mar apr jun jul aug sep sept oct nov dec"
)
_NOT_NAMES = _wordset("i i'm i've i'd i'll ok okay")


def _words(text: str) -> list[tuple[str, bool]]:
    """(token, starts a sentence) for each word or number in `text`."""
    return [(m.group(), bool(_SENTENCE_START.search(text[: m.start()]))) for m in _TOKEN.finditer(text)]


def _plain(word: str) -> str:
    """Lowercase, without possessive 's, apostrophes or hyphens: "France's" → "france", "un-cancel" → "uncancel"."""
    word = word.lower().replace("’", "'")
    word = re.sub(r"'s$", "", word)
    return word.replace("'", "").replace("-", "")


def _numbers(words: list[tuple[str, bool]]) -> set[float]:
    out: set[float] = set()
    for word, _ in words:
        if word[0].isdigit():
            out.add(float(word.replace(",", "")))
        elif (plain := _plain(word)) in NUMBER_WORDS:
            out.add(NUMBER_WORDS[plain])
    return out


def _negations(plain: list[str]) -> int:
    return sum(1 for w in plain if w in NEGATIONS)


def _prefix_negated(a: set[str], b: set[str]) -> str | None:
    """A word of `a` that is a word of `b` with a negating prefix (or the reverse), e.g. uncancel / cancel."""
    for x, y in ((a, b), (b, a)):
        for word in x - y:
            for prefix in NEGATING_PREFIXES:
                if word.startswith(prefix) and len(word) - len(prefix) >= 4 and word[len(prefix) :] in y - x:
                    return word
    return None


def _names(words: list[tuple[str, bool]]) -> set[str]:
    out = set()
    for word, sentence_start in words:
        plain = _plain(word)
        calendar = plain in CALENDAR and (word[0].isupper() or plain not in ("may", "march", "sat", "sun"))
        name = word[0].isupper() and not sentence_start and plain not in _NOT_NAMES
        acronym = len(word) >= 2 and word.isupper()  # even at a sentence start: USD, NASA
        if calendar or name or acronym:
            out.add(plain)
    return out


SYMMETRIC = _wordset("and or vs versus between & , /")
PREPOSITIONS = _wordset(
    "for in under with without by during after before near on at from over below above within per via against "
    "among across through until since"
)
FILLER = _wordset(
    "a an the is are was were be been being do does did of and or it its this that these those some any "
    "me my i you your one someone there their them they we us our what how why which who whom when where can "
    "could should would will shall may might must much many very really more most best good ways way get to like "
    "so if than then just also all"
)


def _content(words: list[str]) -> list[str]:
    return [w for w in words if w not in FILLER and w not in PREPOSITIONS]


DIRECTIONAL = _wordset("to from into onto for with than against over toward towards before after instead rather")


def _roles_swapped(qp: list[str], cp: list[str]) -> bool:
    """Two content words of both texts in opposite orders, each time with a content word or a directional word
    between them ("poles dislike russians" / "russians dislike poles", "celsius to fahrenheit" / "fahrenheit to
    celsius"); "the bubble burst in the bay area" / "the bubble in the bay area burst" moves words without
    swapping roles. Not around a symmetric word ("and")."""
    q, c = qp[:40], cp[:40]
    if set(_content(q)) != set(_content(c)) or q == c or any(w in SYMMETRIC for w in (*q, *c)):
        return False
    qi: dict[str, int] = {}
    ci: dict[str, int] = {}
    for order, words in ((qi, q), (ci, c)):
        for i, w in enumerate(words):
            if w not in FILLER and w not in PREPOSITIONS:
                order.setdefault(w, i)

    def linked(words: list[str], i: int, j: int) -> bool:
        between = words[min(i, j) + 1 : max(i, j)]
        return any(w in DIRECTIONAL or (w not in FILLER and w not in PREPOSITIONS) for w in between)

    names = list(qi)
    for i, x in enumerate(names):
        for y in names[i + 1 :]:
            if (qi[x] - qi[y]) * (ci[x] - ci[y]) < 0 and linked(q, qi[x], qi[y]) and linked(c, ci[x], ci[y]):
                return True
    return False


def _added_condition(qp: list[str], cp: list[str]) -> str | None:
    """One text is the other plus a condition: all the other's content words, and a preposition followed (up to
    the next one) by content words the other has none of."""
    for own, other in ((qp, cp), (cp, qp)):
        others = set(other)
        if not set(_content(other)) <= set(own):
            continue
        for i, word in enumerate(own):
            if word not in PREPOSITIONS or word in others:
                continue
            phrase = []
            for w in own[i + 1 :]:
                if w in PREPOSITIONS:
                    break
                if w not in FILLER:
                    phrase.append(w)
            if phrase and not any(w in others for w in phrase):
                return f"{word} {' '.join(phrase)}"
    return None


def disagreement(query: str, candidate: str) -> str | None:
    """Why `candidate`'s answer may not answer `query` (a short reason), or None when no check objects."""
    qw, cw = _words(query), _words(candidate)
    if _numbers(qw) != _numbers(cw):
        return "numbers differ"
    qp, cp = [_plain(w) for w, _ in qw], [_plain(w) for w, _ in cw]
    qs, cs = set(qp), set(cp)
    if _negations(qp) != _negations(cp):
        return "negation differs"
    if (word := _prefix_negated(qs, cs)) is not None:
        return f"negated word {word!r}"
    for word in qs ^ cs:
        own, other = (qs, cs) if word in qs else (cs, qs)
        if any(o in other and o not in own for o in OPPOSITES.get(word, ())):
            return f"opposite of {word!r}"
    for names, other in ((_names(qw), cs), (_names(cw), qs)):
        missing = names - other
        if missing:
            return f"name {sorted(missing)[0]!r} not in both"
    if _roles_swapped(qp, cp):
        return "roles swapped"
    if (phrase := _added_condition(qp, cp)) is not None:
        return f"condition {phrase!r} in one only"
    return None
