"""Runs models on the aarch64 onnxruntime inside the emulated environment (see onnxopt.arm).

This file is executed by the sysroot's aarch64 Python, which has numpy and
onnxruntime only: it must not import onnxopt or anything else. It reads a
request (JSON), runs each model over the inputs in batches, and writes each
model's outputs to an .npz file and what it ran on to a JSON file.
"""

import json
import os
import platform
import sys
import time

import numpy as np
import onnxruntime as ort


def main(request_path):
    with open(request_path) as fh:
        request = json.load(fh)
    ort.set_default_logger_severity(3)
    data = np.load(request["inputs"])
    feeds = request["feeds"]  # list of {input name: npz key}
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(request.get("threads", 1))
    opts.inter_op_num_threads = 1
    report = {"machine": platform.machine(), "onnxruntime": ort.__version__,
              "available_providers": ort.get_available_providers(), "qemu_cpu": os.environ.get("QEMU_CPU", ""),
              "models": []}
    missing = [p for p in request["providers"] if p not in ort.get_available_providers()]
    if missing:
        report["error"] = "execution provider {} is not offered by the aarch64 onnxruntime (it has {})".format(
            ", ".join(missing), ", ".join(ort.get_available_providers()))
    else:
        for model, out_path in zip(request["models"], request["outputs"]):
            start = time.perf_counter()
            session = ort.InferenceSession(model, sess_options=opts, providers=request["providers"])
            names = request["output_names"]
            parts = {n: [] for n in names}
            for feed in feeds:
                results = session.run(names, {name: data[key] for name, key in feed.items()})
                for n, r in zip(names, results):
                    parts[n].append(np.atleast_1d(r))
            np.savez(out_path, **{n: np.concatenate(p, axis=0) for n, p in parts.items()})
            report["models"].append({"model": model, "providers": session.get_providers(),
                                     "emulated_wall_seconds": time.perf_counter() - start})
    with open(request["report"], "w") as fh:
        json.dump(report, fh)


if __name__ == "__main__":
    main(sys.argv[1])
