#!/usr/bin/env bash
# The Beam stages on Google Cloud Dataflow. Workers run the beam-sdk target of deploy/Dockerfile
# (webpairs, its pinned Beam and the encoder weights inside). Downloads run on Ray or Spark instead
# (img2dataset), see deploy/README.md.
set -euo pipefail
PROJECT=${PROJECT:?set PROJECT}; REGION=${REGION:-europe-west4}; BUCKET=${BUCKET:?set BUCKET}
RUN=gs://$BUCKET/runs/${RUN_NAME:-cc-2026-47}
IMAGE=${IMAGE:-$REGION-docker.pkg.dev/$PROJECT/webpairs/webpairs-beam:latest}
DATAFLOW=(--runner DataflowRunner --project "$PROJECT" --region "$REGION"
  --temp_location "gs://$BUCKET/tmp" --staging_location "gs://$BUCKET/staging"
  --sdk_container_image "$IMAGE" --experiments use_runner_v2 --max_num_workers 100)

webpairs crawl extract "gs://$BUCKET/warc/*.warc.gz" --out "$RUN/links" "${DATAFLOW[@]}"
webpairs filter "$RUN/download" --out "$RUN/filter" --encoder open_clip:ViT-B-32 \
  --encoder-weights /home/webpairs/weights/ViT-B-32.pt "${DATAFLOW[@]}" --machine_type n1-standard-8 \
  --dataflow_service_options "worker_accelerator=type:nvidia-tesla-t4;count:1;install-nvidia-driver"
webpairs pair "$RUN/filter" --out "$RUN/pair" "${DATAFLOW[@]}"
webpairs shards "$RUN/pair" --out "$RUN/shards" "${DATAFLOW[@]}"
