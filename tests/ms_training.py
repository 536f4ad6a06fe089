"""Real MindSpore training checkpoints for the tests: a small MindCV-layout ConvMixer cell trained one step with
`nn.TrainOneStepWithLossScaleCell`, `nn.AdamWeightDecay` and a dynamic loss scale, optionally with MindCV's EMA
(its `TrainStep`: an `updates` counter and `ParameterTuple(...).clone("ema")`), saved with
`save_checkpoint(train_cell)` as MindCV saves them. Imports MindSpore: only MindSpore tests import this.
"""

from __future__ import annotations

from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops
from mindspore.ops import functional as F

from convmixer_pt.mindspore.model import MSConvMixer

_ema_update = ops.MultitypeFuncGraph("ema_update")
_unscale = ops.MultitypeFuncGraph("unscale")


@_ema_update.register("Tensor", "Tensor", "Tensor")
def _ema(decay, ema_weight, weight):
    return F.assign(ema_weight, ema_weight * decay + weight * (1 - decay))


@_unscale.register("Tensor", "Tensor")
def _unscale_grad(scale, grad):
    return grad * ops.cast(ops.reciprocal(scale), ops.dtype(grad))


class TrainStep(nn.TrainOneStepWithLossScaleCell):
    """MindSpore's loss-scale training step, runnable on CPU, with MindCV's EMA when asked.

    On CPU the stock overflow check takes the Ascend branch, whose operator has no CPU kernel; this one tests
    the gradients for non-finite values instead. Nothing else of the stock cell changes.
    """

    def __init__(self, network: nn.Cell, optimizer: nn.Optimizer, scale_sense: nn.Cell, ema: bool = False,
                 ema_decay: float = 0.9) -> None:
        super().__init__(network, optimizer, scale_sense)
        self.ema, self.ema_decay = ema, ema_decay
        if ema:  # names exactly as MindCV's TrainStep
            self.updates = Parameter(Tensor(0.0, ms.float32))
            self.weights_all = ParameterTuple(list(network.get_parameters()))
            self.ema_weight = self.weights_all.clone("ema", init="same")

    def get_overflow_status(self, status, compute_output):
        return ops.stack([ops.logical_not(ops.isfinite(g).all()) for g in compute_output]).any()

    def construct(self, *inputs):
        if not self.ema:
            return super().construct(*inputs)
        loss = self.network(*inputs)
        scale = self.scale_sense
        sens = ops.ones_like(loss) * ops.cast(scale, ops.dtype(loss))
        grads = self.grad(self.network, self.weights)(*inputs, sens)
        grads = self.grad_reducer(self.hyper_map(F.partial(_unscale, scale), grads))
        overflow = self.process_loss_scale(self.get_overflow_status(Tensor([0] * 8, ms.int32), grads))
        if not overflow:
            loss = ops.depend(loss, self.optimizer(grads))
            self.updates += 1
            loss = ops.depend(loss, self.hyper_map(F.partial(_ema_update, Tensor(self.ema_decay, ms.float32)),
                                                   self.ema_weight, self.weights_all))
        return loss, overflow, scale


ARCH = dict(dim=16, depth=2, kernel_size=3, patch_size=2, in_chans=3, num_classes=5)


def train_checkpoint(path: Path, act: str = "gelu_tanh", ema: bool = False, seed: int = 0,
                     steps: int = 1) -> MSConvMixer:
    """Train a small MindCV-layout ConvMixer `steps` steps in MindSpore and save the training cell at `path`;
    returns the trained network (in inference mode), whose logits the converted weights must reproduce."""
    ms.set_seed(seed)
    rng = np.random.default_rng(seed)
    net = MSConvMixer(**ARCH, act=act)
    loss = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")
    optimizer = nn.AdamWeightDecay(net.trainable_params(), learning_rate=1e-2, weight_decay=0.05)
    scale = nn.DynamicLossScaleUpdateCell(loss_scale_value=2.0**10, scale_factor=2, scale_window=1000)
    train = TrainStep(nn.WithLossCell(net, loss), optimizer, scale, ema=ema)
    train.set_train()
    for _ in range(steps):
        x = Tensor(rng.standard_normal((4, 3, 16, 16)).astype(np.float32))
        y = Tensor(rng.integers(0, ARCH["num_classes"], 4).astype(np.int32))
        train(x, y)
    ms.save_checkpoint(train, str(path))
    net.set_train(False)
    return net
