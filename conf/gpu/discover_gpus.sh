#!/usr/bin/env bash
# Spark resource discovery for GPUs: prints {"name": "gpu", "addresses": [...]}.
# On a GPU host it lists nvidia-smi's indices. DEEPSPARK_FAKE_GPUS="0,1" reports those addresses
# instead, so Spark's GPU scheduling can be tested on machines without GPUs.
set -euo pipefail
if [[ -n "${DEEPSPARK_FAKE_GPUS:-}" ]]; then
  addresses=$(echo "$DEEPSPARK_FAKE_GPUS" | tr ',' '\n' | sed 's/.*/"&"/' | paste -sd, -)
else
  addresses=$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | sed 's/.*/"&"/' | paste -sd, -)
fi
echo "{\"name\": \"gpu\", \"addresses\": [${addresses}]}"
