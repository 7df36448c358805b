#!/usr/bin/env bash
# Assembles the folder a device call carries (.dev/, git-excluded, ~55 MB of the 64 MiB a call may
# carry): a stripped CUDA build of kiln, the GPU test binaries, a copy of the parts of ../shared the
# runs need, the gguf wheel (make_synth_model.py), llama.cpp's source (llama-server and llama-bench
# are built on the device), and this folder's scripts. Run from the repository root:
#
#   crates/cuda/device-kit/prepare.sh [LLAMA_SDIST.tar.gz]
#
# LLAMA_SDIST: llama-cpp-python 0.3.36's sdist (`pip download --no-deps --no-binary :all:
# llama-cpp-python==0.3.36`; pip stops while preparing its metadata, but the archive is already in
# /tmp/pip-unpack-*/ by then). Without it the llama.cpp side-by-side stages are skipped.
# Then, with the device tool: run `bash .dev/kit/collect.sh SECONDS` carrying [".dev"]; a second
# call within the machine's warm window (30 s) picks up where the first stopped.
set -euo pipefail
T=${CARGO_TARGET_DIR:-/work/target-cuda}
export CARGO_TARGET_DIR=$T CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-2}
grep -qx "/.dev/" .git/info/exclude 2>/dev/null || echo "/.dev/" >> .git/info/exclude
mkdir -p .dev/whl .dev/kit .dev/share/models/synth .dev/share/fixtures/parity .dev/share/fixtures/tokenizer .dev/share/tools
cargo build --release -p kiln-cli --features cuda
bin() { cargo test --release "$@" --no-run --message-format=json 2>/dev/null |
    python3 -c "import json,sys; print([json.loads(l)['executable'] for l in sys.stdin if '\"executable\":\"' in l][-1])"; }
cp "$T/release/kiln" .dev/kiln
cp "$(bin -p kiln-cuda --test gpu)" .dev/gpu_tests
cp "$(bin --features cuda -p kiln-engine --test batch_invariance)" .dev/batch_invariance
strip .dev/kiln .dev/gpu_tests .dev/batch_invariance
cp crates/cuda/src/kernels.cu .dev/kernels.cu
cp crates/cuda/device-kit/pipeline.sh crates/cuda/device-kit/collect.sh .dev/kit/
S=../shared
# Llama synth models and fixtures (F32 left out: 6.6 MB), the llama vocabulary make_synth_model.py
# reads, and the tools.
for f in "$S"/models/synth/synth-tiny-*.gguf; do
    case $f in *-F32.gguf) ;; *) cp "$f" .dev/share/models/synth/ ;; esac
done
for f in "$S"/fixtures/parity/synth-tiny*; do
    case $f in *-F32*) ;; *) cp "$f" .dev/share/fixtures/parity/ ;; esac
done
cp "$S"/fixtures/tokenizer/ggml-vocab-llama-spm.gguf .dev/share/fixtures/tokenizer/
cp "$S"/tools/* .dev/share/tools/
[ -e .dev/whl/gguf-0.19.0-py3-none-any.whl ] ||
    python3 -m pip download -q --no-deps --only-binary=:all: gguf==0.19.0 -d .dev/whl
if [ $# -ge 1 ] && [ ! -e .dev/llama-src.tar.xz ]; then
    tmp=$(mktemp -d)
    tar xzf "$1" -C "$tmp"
    src=$(echo "$tmp"/llama_cpp_python-*/vendor/llama.cpp)
    tar cJf .dev/llama-src.tar.xz -C "$src" --exclude=ggml/src/ggml-sycl --exclude=ggml/src/ggml-vulkan \
        --exclude=ggml/src/ggml-opencl --exclude=ggml/src/ggml-hexagon --exclude=ggml/src/ggml-metal \
        --exclude=ggml/src/ggml-et CMakeLists.txt cmake ggml src include common tools vendor app scripts licenses LICENSE
    rm -rf "$tmp"
fi
du -sh .dev
