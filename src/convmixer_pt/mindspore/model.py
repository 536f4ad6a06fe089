"""ConvMixer as a MindSpore Cell whose parameter names are MindCV's, so `.ckpt` files move between the two.

Names: `network.0.*` patch conv, `network.2.*` BatchNorm, block i under `network.{3+i}` (`.0.fn.0`,
`.0.fn.2`, `.1`, `.3`), pooling and flatten (no parameters), classifier `network.{depth+5}.*`. Activations come
from the shared registry: "gelu" is the exact (erf) one the published weights were trained with, "gelu_tanh"
MindSpore's `nn.GELU()` default, which MindCV's cell uses.

Importing this module imports MindSpore; `import convmixer_pt` does not.
"""

from __future__ import annotations

from mindspore import Tensor, nn, ops

from ..variants import activation, check_sizes


def make_act(act: str) -> nn.Cell:
    cell, kwargs = activation(act).mindspore
    return getattr(nn, cell)(**kwargs)


class Residual(nn.Cell):
    """`fn(x) + x`, named `fn` as in MindCV and every PyTorch checkpoint."""

    def __init__(self, fn: nn.Cell) -> None:
        super().__init__()
        self.fn = fn

    def construct(self, x: Tensor) -> Tensor:
        return self.fn(x) + x


class GlobalAvgPool(nn.Cell):
    """Mean over height and width, keeping them as 1x1 (MindCV's pooling cell has no parameters either)."""

    def construct(self, x: Tensor) -> Tensor:
        return ops.mean(x, (2, 3), keep_dims=True)


class MSConvMixer(nn.Cell):
    """The ConvMixer of `convmixer_pt.model.ConvMixer`, in MindSpore, in inference mode."""

    def __init__(
        self,
        dim: int,
        depth: int,
        kernel_size: int = 9,
        patch_size: int = 7,
        in_chans: int = 3,
        num_classes: int = 1000,
        act: str = "gelu",
    ) -> None:
        super().__init__()
        check_sizes(dict(dim=dim, depth=depth, kernel_size=kernel_size, patch_size=patch_size, in_chans=in_chans,
                         num_classes=num_classes))
        self.dim, self.depth, self.kernel_size, self.patch_size = dim, depth, kernel_size, patch_size
        self.in_chans, self.num_classes, self.act = in_chans, num_classes, act
        # PyTorch's BatchNorm momentum 0.1 is MindSpore's 0.9 (MindSpore weights the old statistic).
        self.network = nn.SequentialCell([
            nn.Conv2d(in_chans, dim, patch_size, stride=patch_size, pad_mode="valid", has_bias=True),
            make_act(act),
            nn.BatchNorm2d(dim, eps=1e-5, momentum=0.9),
            *[nn.SequentialCell([
                Residual(nn.SequentialCell([
                    nn.Conv2d(dim, dim, kernel_size, group=dim, pad_mode="same", has_bias=True),
                    make_act(act),
                    nn.BatchNorm2d(dim, eps=1e-5, momentum=0.9),
                ])),
                nn.Conv2d(dim, dim, 1, pad_mode="valid", has_bias=True),
                make_act(act),
                nn.BatchNorm2d(dim, eps=1e-5, momentum=0.9),
            ]) for _ in range(depth)],
            GlobalAvgPool(),
            nn.Flatten(),
            nn.Dense(dim, num_classes),
        ])
        self.set_train(False)

    def construct(self, x: Tensor) -> Tensor:
        return self.network(x)

    def stages(self, x: Tensor) -> list[Tensor]:
        """Outputs after the stem and after each block, then the logits: where two models part ways."""
        cells = list(self.network.cell_list)
        x = cells[2](cells[1](cells[0](x)))
        outs = [x]
        for block in cells[3:3 + self.depth]:
            x = block(x)
            outs.append(x)
        for cell in cells[3 + self.depth:]:
            x = cell(x)
        outs.append(x)
        return outs
