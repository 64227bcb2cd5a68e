#!/usr/bin/env bash
# The Beam stages on an Apache Flink cluster through Beam's Flink job server. Workers run the
# beam-sdk target of deploy/Dockerfile (--environment_type DOCKER), so every task manager needs
# Docker, or use --environment_type PROCESS with webpairs installed on the task managers.
set -euo pipefail
FLINK_MASTER=${FLINK_MASTER:-flink-jobmanager:8081}; RUN=${RUN:-s3://BUCKET/runs/cc-2026-47}
IMAGE=${IMAGE:-REGISTRY/webpairs-beam:VERSION}
FLINK=(--runner FlinkRunner --flink_master "$FLINK_MASTER" --parallelism 64
  --environment_type DOCKER --environment_config "$IMAGE")

webpairs crawl extract "$RUN/../../warc/*.warc.gz" --out "$RUN/links" "${FLINK[@]}"
webpairs filter "$RUN/download" --out "$RUN/filter" --encoder efficientnet-lite0 "${FLINK[@]}"
webpairs pair "$RUN/filter" --out "$RUN/pair" "${FLINK[@]}"
webpairs shards "$RUN/pair" --out "$RUN/shards" "${FLINK[@]}"
