#!/usr/bin/env bash
# Fetch Silero VAD's ONNX models (silero-vad 6.2.3 on PyPI, MIT) for benchmarks/silero.py and the real-model tests.
# Usage: fetch_silero.sh [DEST]  (default: ./real-models; the models go to DEST/silero). Downloads only with pip.
# Do not commit the models: fetch them where needed.
set -euo pipefail
dest=${1:-real-models}
mkdir -p "$dest/wheels" "$dest/silero"
python3 -m pip download -q --no-deps -d "$dest/wheels" silero-vad==6.2.3
unzip -o -j -q "$dest"/wheels/silero_vad-6.2.3-*.whl 'silero_vad/data/*.onnx' -d "$dest/silero"
ls -l "$dest"/silero/*.onnx
cat <<'INFO'
silero_vad.onnx               input [N, 576|288] (64|32 samples of context + a 512|256-sample chunk), state [2, N, 128],
                              sr int64 scalar 16000|8000: an If chooses the 16 kHz or the 8 kHz weights (opset 16)
silero_vad_16k_op15.onnx      16 kHz only, opset 15         silero_vad_half.onnx         16 kHz, float16 weights
silero_vad_op18_ifless.onnx   both rates without If         silero_vad_openvino_16k.onnx fixed [1, 576]
silero_vad_16k_sequence.onnx  a whole sequence of 576-sample frames at once, h and c [1, 1, 128]
INFO
