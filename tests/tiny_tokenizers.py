"""Tiny tokenizers of each family, trained here on a few KB of text (nothing downloaded), saved as Hugging Face
folders that `transformers.AutoTokenizer.from_pretrained` loads, and written into a GGUF as llama.cpp's
convert_hf_to_gguf.py would. Tests only.

    byte_level_tokenizer(folder, ...)    Llama 3 / Qwen2 / SmolLM: byte-level BPE, a pre-tokenizer regex
    sentencepiece_tokenizer(folder, ...) Llama 2 / Mistral / Gemma / Phi-3: BPE over characters with byte
                                         fallback, spaces as "▁", merges ranked by score as transformers
                                         converts a SentencePiece model
    family_tokenizer(family, folder)     either, with the family's special tokens and chat template
    gguf_tokenizer_metadata(folder)      the GGUF tokenizer keys of a folder; add_tokenizer_to_gguf writes them
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE

# Text in the mix a chat model meets: prose, code, numbers, accents, emoji, CJK, markup.
CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
It was the best of times, it was the worst of times; it was the age of wisdom, it was the age of foolishness.
What is the capital of France? The capital of France is Paris, and it is known for the Eiffel Tower.
Please summarise the following document in three sentences, and keep the names of the people involved.
I can't believe it's already 2024! We'll meet at 10:30 on Monday, 15 January, at the station.
You are a helpful assistant. Answer briefly and politely; if you do not know, say so.
Here is a list: apples, oranges, bananas, pears, and 12 kiwis. Total: 3,456.78 EUR (VAT incl.).
def fibonacci(n: int) -> int:
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)

for i in range(10):
    print(f"{i}: {fibonacci(i)}")  # prints 0 1 1 2 3 5 8 13 21 34

class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

const add = (a, b) => a + b; console.log(add(2, 3)); // 5
SELECT name, COUNT(*) FROM users WHERE age >= 18 GROUP BY name ORDER BY 2 DESC;
<html><body><p class="note">Hello &amp; welcome!</p></body></html>
{"name": "Ada", "languages": ["en", "fr"], "score": 99.5, "active": true}
Café, crème brûlée, naïve, façade, jalapeño, Müller, Ærø, smørrebrød, Zürich, São Paulo, Łódź.
Les élèves étudient à l'école; où est la bibliothèque? Über den Wolken muss die Freiheit wohl grenzenlos sein.
¿Dónde está el baño? ¡Muy bien! Ελληνικά κείμενα, русский текст, עברית, العربية, हिन्दी.
Emoji: 🚀 🎉 😀 👍 ❤️ 🇫🇷 🤖 🧠 ✨ — and a family: 👨‍👩‍👧.
日本語のテキストです。東京は日本の首都です。中文文本：北京是中国的首都。한국어 텍스트: 서울은 한국의 수도입니다.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 256 1000 65536 3.14159 2.71828 1e-5 -7 +8 0x1F 0b1010.
Whitespace:  two spaces,   three spaces,\ttab,\t\ttwo tabs,\nnewline,\n\nblank line, trailing spaces   .
Markdown: # Title\n## Subtitle\n- item one\n- item two\n**bold** and _italic_ and `code`.
The model said: "I think, therefore I am." Then it stopped; then it went on... (and on).
"""
TEXTS = CORPUS.splitlines()

# Pre-tokenizer regexes as the models' own tokenizer.json files write them, by llama.cpp's `tokenizer.ggml.pre` name
SPLITS = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+",
}
_CONTROL, _USER_DEFINED, _UNKNOWN, _UNUSED, _BYTE, _NORMAL = 3, 4, 2, 5, 6, 1

# The families' chat templates (written from the published ones; tool-calling branches kept where short).
LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a "
        "function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool') %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'
            + message['content'] | trim + '<|eot_id|>' }}
    {%- else %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {{- message.content }}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

CHATML_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n" }}
    {{- "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant") %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

QWEN3_TEMPLATE = """{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string
           and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content =
                    content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n')
                    + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

GEMMA_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {{- message['content'] | trim }}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""

PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{'<|system|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)


def byte_level_tokenizer(
    folder: Path,
    *,
    specials: Sequence[str],
    eos: str,
    chat_template: str | None,
    bos: str | None = None,
    add_bos: bool = False,
    pre: str = "llama-bpe",
    added: Sequence[str] = (),
    vocab_size: int = 1000,
) -> Path:
    """A byte-level BPE (Llama 3 with pre="llama-bpe", Qwen2 with "qwen2", SmolLM with "smollm") trained on
    CORPUS, with `specials` as special tokens (ids 0..), `added` as plain added tokens (as Qwen3's <think>), saved
    into `folder` with `chat_template`. BOS is put before every encoded text when `add_bos`."""
    tokenizer = Tokenizer(BPE())
    if pre == "smollm":
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        split = pre_tokenizers.Split(Regex(SPLITS[pre]), behavior="isolated")
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TEXTS, trainer)
    if pre == "llama-bpe":  # Llama 3's tokenizer.json looks a whole word up before merging
        raw = json.loads(tokenizer.to_str())
        raw["model"]["ignore_merges"] = True
        tokenizer = Tokenizer.from_str(json.dumps(raw))
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    return _save(folder, tokenizer, bos=bos, eos=eos, unk=None, add_bos=add_bos, chat_template=chat_template)


def sentencepiece_tokenizer(
    folder: Path,
    *,
    chat_template: str | None,
    specials: Sequence[str] = (),
    bos: str = "<s>",
    eos: str = "</s>",
    unk: str = "<unk>",
    add_bos: bool = True,
    prefix: str = "legacy",
    added: Sequence[str] = (),
    rstrip: Sequence[str] = (),
    vocab_size: int = 1000,
) -> Path:
    """A SentencePiece-style BPE (Llama 2, Mistral, Gemma, Phi-3) trained on CORPUS: <unk>, <s>, </s> (or the
    names given), the 256 byte tokens <0x00>..<0xFF> for byte fallback, then characters and merged pieces; the
    merges are every split of a piece ranked by its score (earlier merge: higher score), as transformers converts
    a SentencePiece model. `prefix`: how the space before the text is put: "legacy" (a Prepend normalizer, so
    after every special token too: Llama 2's and Phi-3's tokenizer.json, and llama.cpp), "first" (Metaspace with
    prepend_scheme "first": transformers 5's LlamaTokenizer), "none" (Gemma). `specials` (the family's turn
    tokens) come after the vocabulary as special tokens; those in `rstrip` swallow the whitespace after them
    (Phi-3's)."""
    trained = Tokenizer(BPE(unk_token=unk))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[unk, bos, eos], show_progress=False)
    trained.train_from_iterator(TEXTS, trainer)
    model = json.loads(trained.to_str())["model"]
    order = sorted(model["vocab"], key=model["vocab"].get)
    ranks = {"".join(m if isinstance(m, list) else m.split(" ")): r for r, m in enumerate(model["merges"])}
    pieces = [t for t in order if t not in (unk, bos, eos)]
    tokens = [unk, bos, eos, *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    scores = {t: -float(ranks[t]) if t in ranks else -float(len(ranks) + 1) for t in pieces}
    tokenizer = Tokenizer(
        BPE(
            vocab={t: i for i, t in enumerate(tokens)},
            merges=_merges_by_score(scores),
            unk_token=unk,
            byte_fallback=True,
            fuse_unk=True,
        )
    )
    replace = normalizers.Replace(" ", "\u2581")
    if prefix == "legacy":
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), replace])
    elif prefix == "first":
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    else:
        tokenizer.normalizer = replace
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(steps if prefix == "none" else [*steps, decoders.Strip(" ", 1, 0)])
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False, rstrip=t in rstrip) for t in (unk, bos, eos, *specials)]
    )
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    return _save(folder, tokenizer, bos=bos, eos=eos, unk=unk, add_bos=add_bos, chat_template=chat_template)


def _merges_by_score(scores: dict[str, float]) -> list[tuple[str, str]]:
    # transformers' SentencePiece conversion: every (left, right) with both in the vocabulary, best score first
    ranked = []
    for token, score in scores.items():
        for cut in range(1, len(token)):
            if token[:cut] in scores and token[cut:] in scores:
                ranked.append((-score, len(token[:cut]), token[:cut], token[cut:]))
    return [(left, right) for _, _, left, right in sorted(ranked)]


def _save(
    folder: Path,
    tokenizer: Tokenizer,
    *,
    bos: str | None,
    eos: str,
    unk: str | None,
    add_bos: bool,
    chat_template: str | None,
) -> Path:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        add_bos_token=add_bos,
        add_eos_token=False,
        chat_template=chat_template,
        clean_up_tokenization_spaces=False,
    )
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(folder))
    return folder


def family_tokenizer(family: str, folder: Path, *, vocab_size: int = 1000) -> Path:
    """The tiny tokenizer of `family` ("llama", "mistral", "llama2", "qwen2", "qwen3", "gemma3", "phi3") with
    its special tokens and chat template, saved into `folder`."""
    if family == "llama":
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
        return byte_level_tokenizer(
            folder, specials=specials, bos="<|begin_of_text|>", eos="<|eot_id|>", add_bos=True,
            chat_template=LLAMA3_TEMPLATE, vocab_size=vocab_size,
        )  # fmt: skip
    if family in ("qwen2", "qwen3"):
        return byte_level_tokenizer(
            folder, specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], eos="<|im_end|>", pre="qwen2",
            chat_template=QWEN3_TEMPLATE if family == "qwen3" else CHATML_TEMPLATE,
            added=["<think>", "</think>"] if family == "qwen3" else [], vocab_size=vocab_size,
        )  # fmt: skip
    if family in ("mistral", "llama2"):
        template = MISTRAL_TEMPLATE if family == "mistral" else LLAMA2_TEMPLATE
        return sentencepiece_tokenizer(folder, chat_template=template, vocab_size=vocab_size)
    if family == "gemma3":
        return sentencepiece_tokenizer(
            folder, specials=["<pad>", "<start_of_turn>", "<end_of_turn>"], bos="<bos>", eos="<eos>",
            prefix="none", chat_template=GEMMA_TEMPLATE, vocab_size=vocab_size,
        )  # fmt: skip
    if family == "phi3":
        # Phi-3's turn tokens swallow the whitespace after them (rstrip in its tokenizer.json; llama.cpp does the
        # same for a GGUF whose general.name says phi3)
        specials = ["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]
        return sentencepiece_tokenizer(
            folder, specials=specials, eos="<|endoftext|>", add_bos=False, chat_template=PHI3_TEMPLATE,
            rstrip=specials[1:], vocab_size=vocab_size,
        )  # fmt: skip
    raise ValueError(f"no tiny tokenizer for {family!r}")


def gguf_tokenizer_metadata(hf_folder: Path) -> dict[str, Any]:
    """The tokenizer keys llama.cpp's convert_hf_to_gguf.py writes for the tokenizer in `hf_folder`: "gpt2"
    (byte-level BPE: tokens, token types, merges, the pre-tokenizer's name) or "llama" (SentencePiece: tokens,
    scores from the merge ranks, token types with the byte tokens, add_space_prefix), the special ids,
    add_bos/add_eos and the chat template."""
    raw = json.loads((hf_folder / "tokenizer.json").read_text())
    config = json.loads((hf_folder / "tokenizer_config.json").read_text())
    spm = bool(raw["model"].get("byte_fallback"))
    vocab: dict[str, int] = dict(raw["model"]["vocab"])
    added = {t["id"]: t for t in raw["added_tokens"]}
    size = max([*vocab.values(), *added]) + 1
    tokens, types = [f"[PAD{i}]" for i in range(size)], [_UNUSED] * size
    for token, i in vocab.items():
        byte = spm and len(token) == 6 and token.startswith("<0x") and token.endswith(">")
        tokens[i], types[i] = token, _BYTE if byte else _NORMAL
    for i, token in added.items():
        tokens[i], types[i] = token["content"], _CONTROL if token["special"] else _USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in raw["model"]["merges"]]
    meta: dict[str, Any] = {"tokenizer.ggml.model": "llama" if spm else "gpt2", "tokenizer.ggml.tokens": tokens}
    if spm:
        unk = raw["model"].get("unk_token")
        types = [_UNKNOWN if t == unk else ty for t, ty in zip(tokens, types, strict=True)]
        meta["tokenizer.ggml.scores"] = _scores_from_merges(tokens, merges)
        meta["tokenizer.ggml.add_space_prefix"] = "Prepend" in json.dumps(raw["normalizer"]) or (
            (raw.get("pre_tokenizer") or {}).get("prepend_scheme", "never") != "never"
        )
        if unk is not None:
            meta["tokenizer.ggml.unknown_token_id"] = tokens.index(unk)
    else:
        meta["tokenizer.ggml.pre"] = _pre_name(raw["pre_tokenizer"])
        meta["tokenizer.ggml.merges"] = merges
    meta["tokenizer.ggml.token_type"] = types
    for name in ("bos", "eos"):
        if config.get(f"{name}_token") is not None:
            meta[f"tokenizer.ggml.{name}_token_id"] = tokens.index(config[f"{name}_token"])
    single = json.dumps((raw.get("post_processor") or {}).get("single", []))
    first = (raw.get("post_processor") or {}).get("single", [{}])[0]
    meta["tokenizer.ggml.add_bos_token"] = "SpecialToken" in first
    meta["tokenizer.ggml.add_eos_token"] = single.rfind("SpecialToken") > single.find("Sequence") >= 0
    template_file = hf_folder / "chat_template.jinja"
    template = template_file.read_text() if template_file.is_file() else config.get("chat_template")
    if template:
        meta["tokenizer.chat_template"] = template
    return meta


def _scores_from_merges(tokens: list[str], merges: list[str]) -> list[float]:
    # a BPE-trained SentencePiece vocabulary: a piece scores its first merge's rank (earlier: higher); others 0
    best: dict[str, float] = {}
    for rank, merge in enumerate(merges):
        best.setdefault(merge.replace(" ", "", 1), -float(rank))
    return [best.get(t, 0.0) for t in tokens]


def _pre_name(pre_tokenizer: dict[str, Any]) -> str:
    # convert_hf_to_gguf.py recognises a pre-tokenizer by the tokens it gives; here by its regex
    text = json.dumps(pre_tokenizer)
    if "Digits" in text:
        return "smollm"
    for name, regex in SPLITS.items():
        if json.dumps(regex)[1:-1] in text:
            return name
    raise ValueError(f"unknown pre-tokenizer {text[:200]}")


def add_tokenizer_to_gguf(writer: Any, hf_folder: Path) -> None:
    """Write the tokenizer of `hf_folder` into a `gguf.GGUFWriter`, as convert_hf_to_gguf.py would."""
    meta = gguf_tokenizer_metadata(hf_folder)
    writer.add_tokenizer_model(meta["tokenizer.ggml.model"])
    if "tokenizer.ggml.pre" in meta:
        writer.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    writer.add_token_list(meta["tokenizer.ggml.tokens"])
    writer.add_token_types(meta["tokenizer.ggml.token_type"])
    if "tokenizer.ggml.merges" in meta:
        writer.add_token_merges(meta["tokenizer.ggml.merges"])
    if "tokenizer.ggml.scores" in meta:
        writer.add_token_scores(meta["tokenizer.ggml.scores"])
        writer.add_add_space_prefix(meta["tokenizer.ggml.add_space_prefix"])
    for key, add in (
        ("bos_token_id", writer.add_bos_token_id),
        ("eos_token_id", writer.add_eos_token_id),
        ("unknown_token_id", writer.add_unk_token_id),
    ):
        if f"tokenizer.ggml.{key}" in meta:
            add(meta[f"tokenizer.ggml.{key}"])
    writer.add_add_bos_token(meta["tokenizer.ggml.add_bos_token"])
    writer.add_add_eos_token(meta["tokenizer.ggml.add_eos_token"])
    if "tokenizer.chat_template" in meta:
        writer.add_chat_template(meta["tokenizer.chat_template"])
