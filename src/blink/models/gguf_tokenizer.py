"""Hugging Face tokenizer files from a GGUF's tokenizer metadata, tokenizing as llama.cpp does.

A GGUF carries no `tokenizer.json`: llama.cpp keeps the vocabulary, the token types, the merges or the scores,
the special ids and the chat template as metadata, and tokenizes with its own code. `hf_files` writes the
`tokenizers` pipeline that gives the same tokens, so every model blink serves reads one format (tokenizer.py):

    gpt2  (byte-level BPE: Llama 3, Qwen2, SmolLM): the file's merges, and the pre-tokenizer regex llama.cpp
          picks by `tokenizer.ggml.pre`.
    llama (SentencePiece BPE: Llama 2, Mistral, Gemma, Phi-3): no merges in the file; llama.cpp repeatedly merges
          the adjacent pair whose concatenation is the best-scored token. A BPE whose merges are every split of
          every token, ranked by that token's score, does the same. Characters missing from the vocabulary fall
          back to <0xNN> byte tokens. llama.cpp puts a space before the text after every control token (not
          only at the start, as `Metaspace(prepend_scheme="first")` would), which a `Prepend` normalizer does,
          since `tokenizers` normalizes each stretch between added tokens on its own.

Token types: 3 (control) become special added tokens, 4 (user-defined) plain added tokens, both matched whole
in the text. One more rule of llama.cpp's keys on the model's name: a Phi-3's added tokens (but <unk>, <s> and
<|endoftext|>) swallow the whitespace after them, as Phi-3's own tokenizer.json says. Nothing here imports torch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_SUPPORTED = "gpt2 (byte-level BPE), llama (SentencePiece BPE)"
_PHI3_KEEP_SPACE = ("<unk>", "<s>", "<|endoftext|>")

# The pre-tokenizer regexes of llama.cpp's `llm_tokenizer_bpe`, as the models' own tokenizer.json write them.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# `tokenizer.ggml.pre` -> the split regex (llama.cpp's llama-vocab.cpp groups the names the same way); any other
# name gets GPT-2's regex, except "smollm" (and its kin), which first cuts every digit apart
_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "lfm2"), _LLAMA3_SPLIT),
    **dict.fromkeys(("dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "megrez", "stablelm2"), _QWEN2_SPLIT),
    **dict.fromkeys(("gpt-4o", "llama4"), _GPT4O_SPLIT),
    "tekken": _TEKKEN_SPLIT,
}
_DIGITS_FIRST = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone")
# pre-tokenizers whose words are looked up whole before merging, and which add BOS unless the file says otherwise
_IGNORE_MERGES = ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "lfm2", "tekken")


def hf_files(fields: Mapping[str, Any]) -> dict[str, str]:
    """`tokenizer.json`, `tokenizer_config.json` (and `generation_config.json` when the GGUF names end-of-turn
    tokens) reproducing llama.cpp's tokenization of the GGUF whose metadata is `fields` (key -> plain value, as
    `GGUFReader.fields[key].contents()` gives). Raises ValueError for a tokenizer model other than gpt2 or llama
    (or a GGUF without a vocabulary)."""
    model = fields.get("tokenizer.ggml.model")
    tokens: list[str] = list(fields.get("tokenizer.ggml.tokens") or [])
    if model not in ("gpt2", "llama") or not tokens:
        raise ValueError(f"the GGUF's tokenizer model {model!r} is not supported (supported: {_SUPPORTED})")
    types = [int(t) for t in fields.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)]
    pre = str(fields.get("tokenizer.ggml.pre") or "default")
    spm = model == "llama"
    # llama.cpp's defaults when a key is missing, for SentencePiece (its BPE ones are GPT-2's own ids)
    bos = _id(fields, "bos_token_id", 1 if spm else None)
    eos = _id(fields, "eos_token_id", 2 if spm else None)
    unk = _id(fields, "unknown_token_id", 0 if spm else None)
    add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", spm or pre in _IGNORE_MERGES))
    add_eos = bool(fields.get("tokenizer.ggml.add_eos_token", False))
    tokenizer = _sentencepiece(fields, tokens, types, unk) if spm else _byte_level(fields, tokens, pre)
    model_name = str(fields.get("general.name") or "").lower()
    _add_tokens(tokenizer, tokens, types, phi3="phi-3" in model_name or "phi3" in model_name)
    tokenizer.post_processor = _post_processor(tokens, bos if add_bos else None, eos if add_eos else None)
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    for name, token_id in (("bos", bos), ("eos", eos), ("unk", unk),
                           ("pad", _id(fields, "padding_token_id", None))):  # fmt: skip
        if token_id is not None and 0 <= token_id < len(tokens):
            config[f"{name}_token"] = tokens[token_id]
    config |= {"add_bos_token": add_bos, "add_eos_token": add_eos}
    if template := fields.get("tokenizer.chat_template"):
        config["chat_template"] = str(template)
    files = {"tokenizer.json": tokenizer.to_str(), "tokenizer_config.json": json.dumps(config, indent=1)}
    turn_ends = [i for i in (_id(fields, "eot_token_id", None), _id(fields, "eom_token_id", None)) if i is not None]
    if turn_ends:
        files["generation_config.json"] = json.dumps({"eos_token_id": [i for i in (eos, *turn_ends) if i is not None]})
    return files


def _id(fields: Mapping[str, Any], key: str, default: int | None) -> int | None:
    value = fields.get(f"tokenizer.ggml.{key}", default)
    return None if value is None else int(value)


def _byte_level(fields: Mapping[str, Any], tokens: list[str], pre: str) -> Tokenizer:
    merges = [tuple(m.split(" ", 1)) for m in fields.get("tokenizer.ggml.merges") or []]
    bpe = BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, ignore_merges=pre in _IGNORE_MERGES)
    tokenizer = Tokenizer(bpe)
    if pre in _SPLITS:
        split = pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated")
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    elif pre in _DIGITS_FIRST:
        digits = pre_tokenizers.Digits(individual_digits=True)
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([digits, byte_level])
    else:  # GPT-2's regex
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece(fields: Mapping[str, Any], tokens: list[str], types: list[int], unk: int | None) -> Tokenizer:
    scores = [float(s) for s in fields.get("tokenizer.ggml.scores") or [0.0] * len(tokens)]
    bpe = BPE(
        vocab={t: i for i, t in enumerate(tokens)},
        merges=merges_from_scores(tokens, scores, types),
        unk_token=tokens[unk] if unk is not None and 0 <= unk < len(tokens) else None,
        byte_fallback=True,
        fuse_unk=True,
    )
    tokenizer = Tokenizer(bpe)
    replace = normalizers.Replace(" ", "\u2581")
    add_space_prefix = bool(fields.get("tokenizer.ggml.add_space_prefix", True))
    tokenizer.normalizer = (
        normalizers.Sequence([normalizers.Prepend("\u2581"), replace]) if add_space_prefix else replace
    )
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence([*steps, decoders.Strip(" ", 1, 0)] if add_space_prefix else steps)
    return tokenizer


def merges_from_scores(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges that tokenize as llama.cpp's SentencePiece tokenizer: every split (left, right) of a normal
    token into two normal tokens, best-scored token first (equal scores: the lower id first). Control,
    user-defined, unknown, unused and byte tokens are never merged into, nor out of."""
    mergeable = {t: i for i, (t, ty) in enumerate(zip(tokens, types, strict=True)) if ty in (_NORMAL, 0)}
    ranked: list[tuple[float, int, int, str, str]] = []
    for token, i in mergeable.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-scores[i], i, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _add_tokens(tokenizer: Tokenizer, tokens: list[str], types: list[int], *, phi3: bool) -> None:
    def added(token: str, special: bool) -> AddedToken:
        rstrip = phi3 and token not in _PHI3_KEEP_SPACE  # llama.cpp's LLAMA_TOKEN_ATTR_RSTRIP for Phi-3
        return AddedToken(token, special=special, normalized=False, rstrip=rstrip)

    tokenizer.add_special_tokens(
        [added(t, True) for t, ty in zip(tokens, types, strict=True) if ty in (_CONTROL, _UNKNOWN)]
    )
    tokenizer.add_tokens([added(t, False) for t, ty in zip(tokens, types, strict=True) if ty == _USER_DEFINED])


def _post_processor(tokens: list[str], bos: int | None, eos: int | None) -> processors.TemplateProcessing:
    """BOS before (and EOS after) the text when llama.cpp adds them: transformers reads this, not the config's
    add_bos_token, when a tokenizer.json is present."""
    first = [(tokens[bos], bos)] if bos is not None else []
    last = [(tokens[eos], eos)] if eos is not None else []
    single = [*(f"{t}:0" for t, _ in first), "$A:0", *(f"{t}:0" for t, _ in last)]
    pair = [*single, *(f"{t}:1" for t, _ in first), "$B:1", *(f"{t}:1" for t, _ in last)]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(dict.fromkeys(first + last)))
