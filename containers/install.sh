#!/usr/bin/env bash
# Installs hepml_dist into a vendor PyTorch image, from the one lock file both images share (requirements.lock).
# Run by the %post section of cuda.def and rocm.def, from the copied source tree (/opt/hepml_dist).
# The image's own torch (a CUDA or ROCm build) is kept: it is pinned, so nothing in the lock can replace it.
set -euo pipefail
cd "$(dirname "$0")/.."
test -f requirements.lock || { echo "requirements.lock missing next to containers/" >&2; exit 1; }
export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
python -c "import torch; print('torch==' + torch.__version__)" > torch-constraint.txt
# Vendor images ship their own pip constraints (NGC: /etc/pip/constraint.txt); ours replace them.
export PIP_CONSTRAINT=$PWD/torch-constraint.txt
# DeepSpeed is a source distribution whose build imports torch: build it against the image's torch, ops compiled
# just in time on first use (DS_BUILD_OPS=0).
DS_BUILD_OPS=0 python -m pip install --no-build-isolation -c requirements.lock deepspeed
python -m pip install -c requirements.lock ".[deepspeed,comet,export]"
# Every package hepml_dist[deepspeed,comet,export] pulls in must be at its locked version (not the vendor image's own).
python - <<'PY'
import importlib.metadata as md
import re
import sys

from packaging.requirements import Requirement

norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
pins = {}
for line in open("requirements.lock"):
    found = re.match(r"([A-Za-z0-9_.\-]+)==(\S+)", line)
    if found:
        pins[norm(found[1])] = found[2]
todo, seen, wrong = [("hepml-dist", {"deepspeed", "comet", "export"})], set(), []
while todo:
    name, extras = todo.pop()
    if name in seen:
        continue
    seen.add(name)
    dist = md.distribution(name)
    if name in pins and dist.version != pins[name]:
        wrong.append(f"{name}: {dist.version} installed, {pins[name]} locked")
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in (extras or {""})):
            todo.append((norm(req.name), set(req.extras)))
if wrong:
    sys.exit("versions differ from requirements.lock:\n  " + "\n  ".join(wrong))
print(f"hepml_dist installed: {len(seen)} packages, all locked ones at their locked versions")
PY
