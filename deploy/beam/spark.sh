#!/usr/bin/env bash
# The Beam stages on Apache Spark through Beam's Spark job server (Spark 3). The same environment
# choices as Flink: DOCKER with the beam-sdk image, or PROCESS with webpairs on every executor.
set -euo pipefail
SPARK_MASTER=${SPARK_MASTER:-spark://spark-master:7077}; RUN=${RUN:-s3://BUCKET/runs/cc-2026-47}
IMAGE=${IMAGE:-REGISTRY/webpairs-beam:VERSION}
SPARK=(--runner SparkRunner --spark_master_url "$SPARK_MASTER"
  --environment_type DOCKER --environment_config "$IMAGE")

webpairs crawl extract "$RUN/../../warc/*.warc.gz" --out "$RUN/links" "${SPARK[@]}"
webpairs filter "$RUN/download" --out "$RUN/filter" --encoder efficientnet-lite0 "${SPARK[@]}"
webpairs pair "$RUN/filter" --out "$RUN/pair" "${SPARK[@]}"
webpairs shards "$RUN/pair" --out "$RUN/shards" "${SPARK[@]}"
