"""Build, train briefly and export the MobileNetV3-style test model ``tests/data/mnv3_digits.onnx``.

Not run by the tests (they read the committed ONNX; torch is not a test
dependency). Run it with torch installed to regenerate the file:

    python tests/data/make_mobilenetv3.py

The net has what makes MobileNetV3 hard to prune: HardSwish, depthwise
convs, BatchNorm after every conv, and squeeze-excite blocks
(GlobalAvgPool -> 1x1 conv -> ReLU -> 1x1 conv -> HardSigmoid -> Mul). It
is trained on examples/digits/train.npz, upsampled from 8x8 to 32x32 (6
epochs, seed 0), and exported with BatchNorm folded into the convs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(__file__).with_name("mnv3_digits.onnx")


def upsample(x: np.ndarray) -> np.ndarray:
    """8x8 digits to 32x32 (nearest, x4), the input size of the model."""
    return np.repeat(np.repeat(x, 4, axis=2), 4, axis=3).astype(np.float32)


class SE(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        r = max(8, c // 4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, r, 1)
        self.fc2 = nn.Conv2d(r, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.fc1(self.pool(x)))
        return x * nn.functional.hardsigmoid(self.fc2(s))


def conv_bn(cin: int, cout: int, k: int, s: int, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


class Bneck(nn.Module):
    def __init__(self, cin: int, exp: int, cout: int, k: int, s: int, se: bool, hs: bool) -> None:
        super().__init__()
        act = nn.Hardswish if hs else nn.ReLU
        layers: list[nn.Module] = []
        if exp != cin:
            layers += [*conv_bn(cin, exp, 1, 1), act()]
        layers += [*conv_bn(exp, exp, k, s, groups=exp), act()]
        if se:
            layers.append(SE(exp))
        layers += conv_bn(exp, cout, 1, 1)
        self.body = nn.Sequential(*layers)
        self.residual = s == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


class MobileNetV3Small(nn.Module):
    """MobileNetV3-small's layout (narrower), for 1x32x32 inputs and 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        cfg = [  # cin, exp, cout, k, s, se, hs
            (16, 16, 16, 3, 2, True, False),
            (16, 64, 24, 3, 2, False, False),
            (24, 72, 24, 3, 1, False, False),
            (24, 96, 40, 5, 2, True, True),
            (40, 160, 40, 5, 1, True, True),
            (40, 160, 40, 5, 1, True, True),
            (40, 96, 48, 5, 1, True, True),
            (48, 128, 48, 5, 1, True, True),
        ]
        self.stem = nn.Sequential(*conv_bn(1, 16, 3, 1), nn.Hardswish())
        self.blocks = nn.Sequential(*[Bneck(*c) for c in cfg])
        self.head = nn.Sequential(*conv_bn(48, 192, 1, 1), nn.Hardswish(), nn.AdaptiveAvgPool2d(1),
                                  nn.Conv2d(192, 256, 1), nn.Hardswish(), nn.Flatten(), nn.Linear(256, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def main() -> None:
    torch.manual_seed(0)
    data = np.load(ROOT / "examples" / "digits" / "train.npz")
    x, y = torch.from_numpy(upsample(data["x"])), torch.from_numpy(data["labels"].astype(np.int64))
    model = MobileNetV3Small()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    epochs = 6
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=epochs * ((len(x) + 63) // 64))
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            xb = x[idx] + 0.1 * torch.randn_like(x[idx])
            loss = nn.functional.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            acc = (model(x).argmax(1) == y).float().mean().item()
        print(f"epoch {epoch}: loss {loss.item():.3f} train acc {acc:.3f}")
    ev = np.load(ROOT / "examples" / "digits" / "eval.npz")
    with torch.no_grad():
        acc = (model(torch.from_numpy(upsample(ev["x"]))).argmax(1).numpy() == ev["labels"]).mean()
    print(f"eval acc {acc:.3f}")
    torch.onnx.export(model, (x[:1],), str(OUT), input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    print(f"wrote {OUT} ({OUT.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
