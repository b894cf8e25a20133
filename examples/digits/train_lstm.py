"""Train a mostly-LSTM digits reader and export it to ONNX: ``lstm.onnx`` next to this script.

The image is read row by row (8 steps of 8 pixels) by a 2-layer LSTM (hidden
96) and a linear head: 98% of its 116k weights are LSTM W/R/B, the kind of
model issue 16's cluster target is about (trained weights, not random ones).
Run by hand, never in CI (it needs torch; about 3 min on two cores)::

    pip install torch==2.13.0
    python examples/digits/train_lstm.py

Input ``x`` float32 ``[batch, 1, 8, 8]`` and output ``logits`` ``[batch, 10]``,
like the other digits models; trained on ``train.npz``, seeded. Last run with
torch 2.13.0: 97.4% on eval.npz.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


class LSTMReader(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = torch.nn.LSTM(8, 96, num_layers=2)
        self.fc = torch.nn.Linear(96, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(x.shape[0], 8, 8).transpose(0, 1)  # [steps, batch, pixels]
        out, _ = self.lstm(rows)
        return self.fc(out[-1])


def main() -> None:
    torch.manual_seed(0)
    train = np.load(HERE / "train.npz")
    x, y = torch.tensor(train["x"]), torch.tensor(train["labels"])
    net = LSTMReader()
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(60):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    evaluation = np.load(HERE / "eval.npz")
    with torch.no_grad():
        accuracy = (net(torch.tensor(evaluation["x"])).argmax(1).numpy() == evaluation["labels"]).mean()
    print(f"eval accuracy {accuracy:.4f}")
    torch.onnx.export(net, (torch.zeros(1, 1, 8, 8),), str(HERE / "lstm.onnx"), input_names=["x"],
                      output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
                      opset_version=17, dynamo=False)


if __name__ == "__main__":
    main()
