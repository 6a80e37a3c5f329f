#!/usr/bin/env bash
# Fetch, HERE (where pip reaches the package index), the wheels benchmarks/gpu_check.sh installs on the
# GPU machine, which cannot fetch anything: what gkd's GPU check needs beyond that machine's image
# (torch, transformers, accelerate, peft, pandas, pyarrow, … are there; see ../.library/device/KINDS.md).
# Pinned to the versions the CPU test suite runs with. Python 3.12, manylinux x86-64; ~2 MB.
#   bash benchmarks/gpu_wheels.sh        # → .whl/ (ignored by git; name it in the device run's carry)
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
ls -la .whl
