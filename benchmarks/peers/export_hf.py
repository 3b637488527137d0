"""Export blink's default model as a Hugging Face folder, for the peers that cannot read GGUF (vLLM, transformers).

Run with blink's venv (it has transformers, gguf and accelerate). transformers dequantizes the same GGUF file blink
serves (located the way blink locates it) and `save_pretrained` writes config.json, generation_config.json,
model.safetensors (float32), tokenizer.json, tokenizer_config.json and the chat template. blink's own prepared
folder is not in Hugging Face layout (its config.json and tokenizer.json are blink's formats), so it cannot be
handed to those peers as is; when it is given (--blink-export), every tensor of the export is compared with it, so
the peers provably run the same weights as blink.

    .venv/bin/python benchmarks/peers/export_hf.py --out benchmarks/peers/.cache/smollm2-135m-instruct-hf \
        [--blink-export "$(.venv/bin/blink prepare)"]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def export(gguf: Path, out: Path) -> None:
    import torch
    import transformers

    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    # a model loaded from GGUF is marked quantized and refuses save_pretrained: copy its (dequantized) weights into
    # a plain float32 model of the same config
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "source.json").write_text(json.dumps({"gguf": str(gguf), "transformers": transformers.__version__}) + "\n")


def compare(out: Path, blink_export: Path) -> float:
    """Largest absolute difference over the tensors both folders hold; raises if blink has a tensor we lack."""
    from safetensors import safe_open

    worst = 0.0
    with (
        safe_open(str(out / "model.safetensors"), "pt") as ours,
        safe_open(str(blink_export / "model.safetensors"), "pt") as theirs,
    ):
        our_keys = set(ours.keys())
        for key in theirs.keys():  # noqa: SIM118 (safe_open is not a mapping)
            if key not in our_keys:
                if key == "lm_head.weight":  # tied to the embeddings; save_pretrained drops the copy
                    continue
                raise ValueError(f"tensor {key} is in blink's export but not in the Hugging Face export")
            a, b = ours.get_tensor(key), theirs.get_tensor(key)
            if a.shape != b.shape:
                raise ValueError(f"tensor {key}: shape {tuple(a.shape)} here, {tuple(b.shape)} in blink's export")
            worst = max(worst, float((a.float() - b.float()).abs().max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a blink model name")
    parser.add_argument("--blink-export", type=Path, help="blink's prepared folder (default: ask `blink prepare`)")
    args = parser.parse_args()

    from blink.models import registry

    gguf = registry.get(args.model).locate()
    if not (args.out / "model.safetensors").is_file():
        export(gguf, args.out)
    print(f"exported {gguf} -> {args.out}")
    blink_export = args.blink_export
    if blink_export is None:
        blink = Path(sys.executable).parent / "blink"
        printed = subprocess.run(
            [str(blink), "prepare", "--model", args.model], check=True, capture_output=True, text=True
        ).stdout.split()
        # it prints the prepared model's folder, then the embedding model's
        blink_export = Path(next(p for p in printed if "/models/" in p))
    worst = compare(args.out, blink_export)
    print(f"largest |difference| from blink's export {blink_export}: {worst:.3g}")
    if worst > 1e-6:
        sys.exit("the Hugging Face export does not hold the weights blink serves")


if __name__ == "__main__":
    main()
