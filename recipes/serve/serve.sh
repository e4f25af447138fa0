#!/usr/bin/env bash
# Serve SmolLM2-135M-Instruct with demo adapters (written on first use); extra flags go to lora-serve.
#   recipes/serve/serve.sh --port 8001 --api-key "$KEY"
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="${ADAPTER_ROOT:-/tmp/lora_serve_adapters}"
python="${PYTHON:-python}"
if [ ! -d "$root" ]; then
    "$python" "$here/make_adapters.py" --out "$root" --count "${ADAPTER_COUNT:-8}"
fi
exec "$python" -m lora_serve --config "$here/config.yaml" --adapter-root "$root" "$@"
