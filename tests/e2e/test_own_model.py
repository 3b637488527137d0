"""`blink serve --model PATH`: a user's own GGUF file or Hugging Face folder, served by a real server to the
`openai` client under `--served-model-name`, answering what `transformers` answers (greedy, fp32 weights). The
models are tiny random-weight ones in their family's real shape (tests/tiny_models.py)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import torch

from tests.e2e.conftest import Server, serving
from tests.tiny_models import TINY, hf_model, write_gguf
from tests.tiny_tokenizers import family_tokenizer

transformers = pytest.importorskip("transformers")  # a test-only dependency, always installed by `make test`
pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _tiny(family: str, folder: Path) -> torch.nn.Module:
    family_tokenizer(family, folder)
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    eos = tok.eos_token_id
    tiny = TINY[family]
    tiny = type(tiny)(
        **{
            **tiny.__dict__,
            "config": {**tiny.config, "bos_token_id": tok.bos_token_id, "eos_token_id": eos, "pad_token_id": eos},
        }
    )
    model = hf_model(tiny, len(tok))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(folder))
    return model


def _reference_answer(model: torch.nn.Module, folder: Path, max_tokens: int) -> str:
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    ids = tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True, return_dict=False)
    turn_ends = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")  # blink stops at these too
    stop = [tok.eos_token_id, *(tok.convert_tokens_to_ids(t) for t in turn_ends if t in tok.get_vocab())]
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False, eos_token_id=stop, pad_token_id=stop[0]
        )
    return str(tok.decode(out[0, len(ids) :], skip_special_tokens=True))


@pytest.fixture(scope="module")
def gguf_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str]]:
    """A tiny Qwen3 as a Q8_0 GGUF, served as 'my-qwen3'; and what transformers answers with the file's weights."""
    folder = tmp_path_factory.mktemp("qwen3")
    model = _tiny("qwen3", folder)
    path = folder / "Tiny-Qwen3-Q8_0.gguf"
    held = write_gguf(TINY["qwen3"], model, folder, path, "Q8_0")
    model.load_state_dict(held, strict=False)
    answer = _reference_answer(model, folder, 16)
    flags = ("--model", str(path), "--served-model-name", "my-qwen3", "--weights", "fp32",
             "--cache-dir", str(tmp_path_factory.mktemp("cache")), "--no-semantic-cache")  # fmt: skip
    with serving(tmp_path_factory.mktemp("log") / "serve.log", *flags) as srv:
        yield srv, answer


def test_a_gguf_file_is_served_under_its_served_name(gguf_server: tuple[Server, str]) -> None:
    srv, answer = gguf_server
    client = openai.OpenAI(base_url=f"{srv.base}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["my-qwen3"]
    reply = client.chat.completions.create(model="my-qwen3", messages=QUESTION, max_tokens=16, temperature=0)  # type: ignore[arg-type]
    assert reply.choices[0].message.content == answer
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="Tiny-Qwen3-Q8_0", messages=QUESTION, max_tokens=4)  # type: ignore[arg-type]
    memory = srv.readyz()["replicas"][0]["memory"]
    assert memory["architecture"] == "qwen3" and memory["weights_mib"] > 0 and memory["kv_cache_mib"] > 0


def test_a_hugging_face_folder_streams_by_its_folder_name(tmp_path: Path) -> None:
    folder = tmp_path / "Tiny-Llama-3"
    model = _tiny("llama", folder)
    answer = _reference_answer(model, folder, 12)
    flags = ("--model", str(folder), "--weights", "fp32", "--cache-dir", str(tmp_path / "cache"), "--no-semantic-cache")
    with serving(tmp_path / "serve.log", *flags) as srv:
        client = openai.OpenAI(base_url=f"{srv.base}/v1", api_key="unused", max_retries=0)
        stream = client.chat.completions.create(
            model="Tiny-Llama-3",
            messages=QUESTION,
            max_tokens=12,
            temperature=0,
            stream=True,  # type: ignore[arg-type]
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == answer
