"""`blink bench --typing`: keystroke replay. N users type questions key by key (typos and backspaces included),
pause, maybe revise the last word, press Enter, read the answer, and type the next one. Measured from the user's
action: Enter -> first token, plus the cost of working ahead (pre-load and pre-decode tokens wasted per useful
one, from the server's /metrics) and the streams' inter-token latency while others type.

    ws   blink's realtime WebSocket: one input_text.draft per keystroke, Enter sends conversation.item.create and
         response.create at once (the clock starts before them)
    sse  any OpenAI-compatible server (llama-server, vLLM, blink): it sees only the submit, sent when the same
         user would press Enter (the clock starts before the POST)

Keystroke timing follows published typing studies:
- Inter-key interval (IKI): Dhakal, Feit, Kristensson and Oulasvirta, "Observations on Typing from 136 Million
  Keystrokes", CHI 2018 (168,000 volunteers): mean IKI 238.66 ms, between-user SD 111.6 ms. Each user's mean IKI
  is drawn from that (within 90-600 ms); each key's interval from a log-normal around it (CV 0.45: IKIs are
  right-skewed).
- Corrections: the same study's keystrokes per character, KSPC 1.173: 17% more keys than characters, from errors
  corrected with backspace. A typo (TYPO_RATE per character) is noticed 0-2 characters later, erased and retyped:
  2.5 extra keys per typo on average, so TYPO_RATE = 0.173 / (2 * 2.5) ~ 0.035 gives that KSPC.
- Pauses: writing research counts pauses of 2 s and more between words as planning (Wengelin 2006; Conijn et al.
  2019): MID_PAUSE_RATE of word boundaries get one, log-normal with median 1.0 s.
- Before Enter: the Keystroke-Level Model's mental operator M, 1.35 s before a command key (Card, Moran and Newell,
  "The Keystroke-Level Model for User Performance Time with Interactive Systems", CACM 1980): log-normal with mean
  --enter-pause-ms (1350). With --edit-fraction, the user then revises the question's last word (backspaces, a new
  word) and presses Enter right after: the text submitted is not the one they paused on.

`typing_sessions` plans are pure (seeded: the same seed, the same keystrokes for every target).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

MEAN_IKI_MS, SD_IKI_MS = 238.66, 111.6  # Dhakal et al. 2018
IKI_RANGE_MS = (90.0, 600.0)
IKI_CV = 0.45
KSPC = 1.173  # Dhakal et al. 2018
TYPO_RATE = (KSPC - 1) / (2 * 2.5)
MID_PAUSE_RATE, MID_PAUSE_MEDIAN_S = 0.05, 1.0
KLM_M_S = 1.35  # Card, Moran and Newell 1980
PAUSE_SIGMA = 0.6
READ_MEDIAN_S = 1.5  # after an answer, before typing the next question

QUESTIONS = (
    "What is the capital of Australia?",
    "How do I reverse a list in Python?",
    "Why is the sky blue?",
    "Can you suggest a name for a coffee shop?",
    "What are three tips for better sleep?",
    "How many legs does a spider have?",
    "Explain photosynthesis in one sentence.",
    "What is the difference between a virus and a bacterium?",
    "Write a haiku about the sea.",
    "Who wrote Pride and Prejudice?",
    "How do I boil an egg?",
    "What does HTTP stand for?",
    "Give me a synonym for happy.",
    "What is the boiling point of water in Fahrenheit?",
    "How far is the moon from the earth?",
    "What should I pack for a weekend hike?",
    "Summarise the plot of Romeo and Juliet.",
    "What is a prime number?",
    "How do I say thank you in Japanese?",
    "Why do cats purr?",
    "What is the largest ocean on earth?",
    "Translate good morning into French.",
    "How does a refrigerator keep food cold?",
    "What year did the first person walk on the moon?",
)
REVISIONS = ("today", "please", "exactly", "briefly", "now", "again", "quickly", "first")
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class Key:
    delay_s: float  # after the previous key (or the session's start)
    text: str  # the draft after this key


@dataclass(frozen=True)
class Question:
    keys: tuple[Key, ...]  # up to the pause before Enter
    pause_s: float  # still, before Enter (or before the revision)
    revision: tuple[Key, ...]  # keys after the pause (an edit just before Enter); empty: none
    read_s: float  # reading the answer before the next question

    @property
    def still_text(self) -> str:
        return self.keys[-1].text if self.keys else ""

    @property
    def text(self) -> str:
        """What is submitted."""
        return self.revision[-1].text if self.revision else self.still_text

    @property
    def typing_s(self) -> float:
        """From the first key to Enter."""
        return sum(k.delay_s for k in self.keys) + self.pause_s + sum(k.delay_s for k in self.revision)

    @property
    def keystrokes(self) -> int:
        return len(self.keys) + len(self.revision)


def _lognormal(rng: random.Random, mean: float, cv: float) -> float:
    sigma = math.sqrt(math.log(1 + cv * cv))
    return rng.lognormvariate(math.log(mean) - sigma * sigma / 2, sigma)


class Typist:
    """One simulated user (seeded)."""

    def __init__(self, seed: int, *, context: str = "", enter_pause_s: float = KLM_M_S, edit_fraction: float = 0.0):
        self.rng = random.Random(seed)
        self.iki_s = min(max(self.rng.gauss(MEAN_IKI_MS, SD_IKI_MS), IKI_RANGE_MS[0]), IKI_RANGE_MS[1]) / 1000
        self.context, self.enter_pause_s, self.edit_fraction = context, enter_pause_s, edit_fraction

    def _iki(self) -> float:
        return _lognormal(self.rng, self.iki_s, IKI_CV)

    def _pause(self, mean_s: float) -> float:
        return self.rng.lognormvariate(math.log(mean_s) - PAUSE_SIGMA**2 / 2, PAUSE_SIGMA)

    def _type(self, base: str, text: str, keys: list[Key]) -> None:
        """Keys that turn the draft `base` into `base + text`, with typos corrected on the way."""
        typed, i = "", 0
        while i < len(text):
            delay = self._iki()
            if text[i] == " " and self.rng.random() < MID_PAUSE_RATE:
                delay += self._pause(MID_PAUSE_MEDIAN_S * math.exp(PAUSE_SIGMA**2 / 2))
            if text[i].isalpha() and self.rng.random() < TYPO_RATE:
                wrong = self.rng.choice(_LETTERS.replace(text[i].lower(), ""))
                more = self.rng.randint(0, 2)  # typed on before noticing
                typed_wrong = typed + wrong + text[i + 1 : i + 1 + more]
                keys.append(Key(delay, base + typed + wrong))
                for j in range(1, len(typed_wrong) - len(typed)):
                    keys.append(Key(self._iki(), base + typed_wrong[: len(typed) + j + 1]))
                for j in range(len(typed_wrong) - len(typed)):
                    keys.append(Key(self._iki(), base + typed_wrong[: len(typed_wrong) - j - 1]))
                delay = self._iki()
            typed += text[i]
            keys.append(Key(delay, base + typed))
            i += 1

    def question(self, text: str) -> Question:
        keys: list[Key] = []
        base = f"{self.context}\n\n" if self.context else ""
        if base:
            keys.append(Key(self._iki(), base))  # pasted
        self._type(base, text, keys)
        pause = self._pause(self.enter_pause_s)
        revision: list[Key] = []
        if self.rng.random() < self.edit_fraction:
            cut = text.rstrip("?.!").rfind(" ")
            end = text[len(text.rstrip("?.!")) :]
            kept = base + text[: cut + 1]
            current = base + text
            while len(current) > len(kept):
                current = current[:-1]
                revision.append(Key(self._iki(), current))
            self._type(kept, self.rng.choice(REVISIONS) + end, revision)
            revision.append(Key(self._iki(), revision[-1].text))  # Enter, one key after the last
        return Question(tuple(keys), pause, tuple(revision), self._pause(READ_MEDIAN_S))


def typing_sessions(
    users: int, questions: int, seed: int, *, context: str = "", enter_pause_s: float = KLM_M_S, edit_fraction: float
) -> list[list[Question]]:
    """Each user's questions, in order (the same arguments: the same keystrokes)."""
    out = []
    for u in range(users):
        typist = Typist(seed * 7919 + u, context=context, enter_pause_s=enter_pause_s, edit_fraction=edit_fraction)
        order = random.Random(seed * 104_729 + u).sample(range(len(QUESTIONS)), len(QUESTIONS))
        out.append([typist.question(QUESTIONS[order[q % len(order)]]) for q in range(questions)])
    return out
