#!/bin/bash
# N workers of one manifest as a SLURM job array: `sbatch --array=1-8 slurm-array.sh jobs/lighthouses.yaml`.
# Every array task runs the same `pipeline run`; they share the work through PostgreSQL (`state:` in
# the manifest, or --state) and write to object storage (or to a folder every node mounts). A task
# that is preempted loses its leases after lease_s; rerunning the array finishes what is left, and
# a finished manifest makes no request.
#SBATCH --job-name=imagegen
#SBATCH --cpus-per-task=1
#SBATCH --mem=1G
#SBATCH --time=12:00:00
#SBATCH --output=imagegen-%A_%a.log
set -euo pipefail

# Keys and passwords come from the environment only: a file only you can read, sourced here.
# It exports IMAGE_API_BASE_URL, IMAGE_API_KEY, PGPASSWORD (or use ~/.pgpass) and AWS_* for S3.
source "$HOME/.config/imagegen/env"

exec pipeline run "$1" --quiet --log-format json \
    --state "postgresql://imagegen@db.cluster.local:5432/lighthouses" \
    --output "s3://my-datasets/lighthouses"
