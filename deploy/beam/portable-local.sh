#!/usr/bin/env bash
# Every Beam stage on Beam's portable runner against a local job service on 127.0.0.1 (what
# tests/test_portable.py proves gives the same output as the default in-process runner).
set -euo pipefail
PORT=${PORT:-8099}; WARCS=${1:?usage: portable-local.sh WARC_GLOB OUT}; OUT=${2:?usage: portable-local.sh WARC_GLOB OUT}
python -m apache_beam.runners.portability.local_job_service_main --port "$PORT" &
JOB=$!; trap 'kill $JOB' EXIT
sleep 3
PORTABLE=(--runner PortableRunner --job_endpoint "localhost:$PORT" --environment_type LOOPBACK)

webpairs crawl extract "$WARCS" --out "$OUT/links" --allow-hosts 127.0.0.1 "${PORTABLE[@]}"
webpairs crawl download "$OUT/links" --out "$OUT/download" --allow-hosts 127.0.0.1
webpairs filter "$OUT/download" --out "$OUT/filter" --encoder efficientnet-lite0 "${PORTABLE[@]}"
webpairs pair "$OUT/filter" --out "$OUT/pair" "${PORTABLE[@]}"
webpairs shards "$OUT/pair" --out "$OUT/shards" "${PORTABLE[@]}"
