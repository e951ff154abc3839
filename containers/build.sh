#!/usr/bin/env bash
# Build the hepml_dist Apptainer/Singularity image for one GPU vendor, from the repository root.
#   containers/build.sh cuda|rocm [OUTPUT.sif] [more build options, e.g. --build-arg BASE_IMAGE=...]
# Both images install hepml_dist from the one lock file, requirements.lock (containers/install.sh).
# Needs apptainer (or singularity) with root or --fakeroot (used automatically when not root).
set -euo pipefail
usage() { echo "usage: $0 cuda|rocm [OUTPUT.sif] [build options...]" >&2; exit 2; }
[[ $# -ge 1 ]] || usage
flavour=$1
shift
case $flavour in cuda|rocm) ;; *) echo "unknown image '$flavour': cuda (NVIDIA) or rocm (AMD)" >&2; usage ;; esac
output=hepml-$flavour.sif
if [[ $# -ge 1 && $1 != -* ]]; then output=$1; shift; fi
output=$(realpath -m "$output")
runtime=$(command -v apptainer || command -v singularity || true)
[[ -n $runtime ]] || { echo "neither apptainer nor singularity is on the PATH" >&2; exit 1; }
cd "$(dirname "$0")/.."
[[ -f requirements.lock ]] || { echo "requirements.lock not found in $PWD" >&2; exit 1; }
options=()
[[ $(id -u) -eq 0 ]] || options+=(--fakeroot)
echo "building $output from containers/$flavour.def with $runtime" >&2
exec "$runtime" build "${options[@]}" "$@" "$output" "containers/$flavour.def"
