#!/usr/bin/env bash
# The GPU check, as one command on a lent CUDA machine whose image has PyTorch but not all of qi's needs.
#
#   bash benchmarks/gpu_check.sh wheels   # here, with PyPI: .whl/ gets what that image lacks (cp312 wheels)
#   bash benchmarks/gpu_check.sh run      # there, with .whl carried: the CUDA tests, then gpu_full_size.py
#
# `run` installs the wheels into /tmp/site, qi itself in place (its plugins are entry points), and writes
# everything it prints to $OUT/gpu_check.log as well (./gpu-check/ when OUT is unset).
set -uo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
wheels)
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
    rm -rf .whl && mkdir .whl
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d .whl \
        pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
        "typing-extensions>=4.16" diffusers==0.42.1 importlib-metadata==10.2.0
    ls .whl
    ;;
run)
    out="${OUT:-gpu-check}"
    mkdir -p "$out"
    export PYTHONUNBUFFERED=1
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
    python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
    {
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
        python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
        python3 -m pytest -q -p no:cacheprovider -rs tests/memory/test_cuda_policies.py
        python3 benchmarks/gpu_full_size.py --diffusers
    } 2>&1 | tee "$out/gpu_check.log"
    ;;
*)
    echo "usage: bash benchmarks/gpu_check.sh wheels|run" >&2
    exit 2
    ;;
esac
