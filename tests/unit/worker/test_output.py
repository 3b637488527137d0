from __future__ import annotations

import pytest

from blink.models.tokenizer import Tokenizer
from blink.worker.output import TextOutput


@pytest.fixture(scope="module")
def tok(model_and_tokenizer) -> Tokenizer:  # type: ignore[no-untyped-def]
    return model_and_tokenizer[1]  # type: ignore[no-any-return]


def stream(tok: Tokenizer, text: str, stop: tuple[str, ...]) -> tuple[list[str], bool]:
    out = TextOutput(tok, stop)
    pieces = []
    for t in tok.encode(text):
        pieces.append(out.push(t))
        if out.stopped:
            break
    pieces.append(out.finish())
    return pieces, out.stopped


def test_without_stop_strings_everything_is_sent(tok: Tokenizer) -> None:
    pieces, stopped = stream(tok, "one two three", ())
    assert "".join(pieces) == "one two three" and not stopped


def test_stop_string_truncates_and_is_never_sent(tok: Tokenizer) -> None:
    pieces, stopped = stream(tok, "alpha beta END gamma", ("END",))
    assert stopped and "".join(pieces) == "alpha beta "


def test_possible_stop_prefix_is_held_back_then_released(tok: Tokenizer) -> None:
    out = TextOutput(tok, ("STOP!",))
    sent = "".join(out.push(t) for t in tok.encode("wait ST"))
    assert sent == "wait "  # "ST" could begin "STOP!"
    rest = "".join(out.push(t) for t in tok.encode("ILL here")) + out.finish()
    assert sent + rest == "wait STILL here" and not out.stopped


def test_stop_string_spanning_tokens(tok: Tokenizer) -> None:
    pieces, stopped = stream(tok, "abc\n\nUser: more", ("\n\nUser:",))
    assert stopped and "".join(pieces) == "abc"


def test_a_stop_string_naming_a_control_token_matches_text_only(tok: Tokenizer) -> None:
    # the model's own <|im_end|> token is no text, so it never matches; the same name written as text does
    out = TextOutput(tok, ("<|im_end|>",))
    end = tok.token_id("<|im_end|>")
    assert end is not None and out.push(end) == "" and not out.stopped
    pieces, stopped = stream(tok, "done<|im_end|> more", ("<|im_end|>",))
    assert stopped and "".join(pieces) == "done"
