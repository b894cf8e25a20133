#!/usr/bin/env bash
# Fetch NudeNet's YOLOv8n detector (nudenet 3.4.2 on PyPI, AGPL-3.0) and scikit-image's sample pictures
# (scikit-image 0.26.0, BSD-3-Clause) for benchmarks/detector.py. Usage: fetch_nudenet.sh [DEST]
# (default: ./real-models; the model goes to DEST/nudenet/320n.onnx, the pictures to DEST/nudenet/pictures).
# Downloads only with pip. Do not commit either: fetch them where needed.
set -euo pipefail
dest=${1:-real-models}
mkdir -p "$dest/wheels" "$dest/nudenet/pictures"
python3 -m pip download -q --no-deps -d "$dest/wheels" nudenet==3.4.2
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 --platform manylinux_2_28_x86_64 \
  -d "$dest/wheels" scikit-image==0.26.0
unzip -o -j -q "$dest"/wheels/nudenet-3.4.2-*.whl 'nudenet/320n.onnx' -d "$dest/nudenet"
unzip -o -j -q "$dest"/wheels/scikit_image-0.26.0-*.whl 'skimage/data/*.png' 'skimage/data/*.jpg' -d "$dest/nudenet/pictures"
ls -l "$dest"/nudenet/320n.onnx
cat <<'INFO'
320n.onnx   YOLOv8n (ultralytics export, opset 17): images [N, 3, H, W] RGB in [0, 1] -> output0 [N, 4 + 18, A]
            (cx, cy, w, h in pixels, then 18 sigmoid class scores; A = 2100 anchors at 320 x 320)
pictures/   scikit-image's sample pictures (astronaut, coffee, chelsea, ...), cropped to 320 x 320 by the benchmark
INFO
