"""Reversible spiking ResNets (RevSResNet21/37/109 and the 1001-layer RevSResNet1001 on CIFAR, RevSResNet24 on
DVS frames).

Architecture (Zhang & Zhang, AAAI 2024): stem (conv3x3 -> BN, no neuron) -> stages of reversible blocks with
``F = G = neuron -> conv3x3 -> BN -> neuron -> conv3x3 -> BN`` acting on one half of the channels -> between
stages a non-reversible :class:`~revsnn_triton.models.conv.Downsample` (neuron -> AvgPool(3, s2, p1) -> 1x1
conv -> BN) -> neuron -> global mean -> Linear. ``widths`` are per half, so a stage carries ``2 * width``
channels. Each stage is one :class:`revsnn_triton.reversible.RevSequence`: its forward keeps no graph, and its
backward recomputes one F or G at a time from reset neuron state on the exactly reconstructed input (a small last
stage keeps its graph instead, see 5. below).

Where the training memory per image goes, and what the model side does about it (for scale: the original
RevSNN code needs 19.5 MiB per image for RevSResNet37 on an H100, fp32, T=4, CIFAR 32x32):

1. One block's recomputation graph, alive only while the engine walks that block in backward; stage 1's is the
   largest and sets the peak. Its conv inputs are spikes kept as 1-byte bools (``compact_spikes=True``,
   :func:`~revsnn_triton.ops.spike_conv.spike_conv`) instead of fp32; BN inputs and the neurons' saved state
   stay (``neuron_save``: the neuron op's default unless set; keeping the input or H costs the same here, as
   the input is a BN output that nothing else keeps, and ``"h_bf16"`` halves it at approximate gradients).
2. Stored stage outputs: one stream per stage, kept by the engine as the stage's float output itself (which the
   next layer keeps anyway) -- nothing per block.
3. Neuron state: every neuron is a :class:`~revsnn_triton.models.neurons.SequenceNeuron`, which drops its final
   membrane tensor after each call. Without that, each F and G of every block holds one ``[B, C, H, W]`` tensor
   from its forward until its recomputation, and memory grows with depth.
4. Non-reversible parts: the downsample's pooled map is not kept (pool fused into ``spike_conv``), its 1x1
   conv input is a bool; the downsample graphs are freed before the stage-1 recomputation begins, so at the
   peak only the stem's saved BN input (one copy per image, not T) is left of them. The stem runs once per
   image and is repeated over T by ``expand`` (the original repeats with a copy).

5. Time, not memory: the last stage, when its graph is small beside that peak
   (:meth:`RevSResNet.default_keep_graph_stages`; RevSResNet21/37/109 and RevSResNet24, not RevSResNet1001), runs
   with ordinary autograd instead of the engine. Its graph is freed before the first stage's recomputation begins,
   so the peak stays where it was, and its convolutions (a fifth of RevSResNet37's) are not run twice.
   ``keep_graph_stages`` sets how many stages do this.

Beyond this, the remaining per-image memory is the engine's backward work space during the stage-1
recomputation: the stage output (whose memory holds the re-encoded int32 stream meanwhile), the incoming
gradient (held by autograd for the whole call), the rebuilt X2 with its decode and the new stream gradient,
i.e. about six half-streams (1 MiB per image each in stage 1, fp32, T=4) next to the branch's graph. See
``revsnn_triton.bench.memory`` for the measurement.

``reversible=False`` builds the same network with ordinary autograd through every block (same parameters, same
quantized coupling), used to check gradients and as a baseline.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from revsnn_triton.recompute import recompute

from .base import SpikingModel, check_widths_blocks, init_conv_bn
from .conv import Downsample, SpikingResidualBranch
from .neurons import CIFAR_RESNET_NEURON, DVS_NEURON, neuron_factory
from .registry import register_variants
from .stems import SpikingHead, Stem


class RevSResNet(SpikingModel):
    """Reversible spiking ResNet.

    Args:
        widths: channels per half in each stage (a stage carries ``2 * width``).
        blocks: reversible blocks per stage.
        num_classes, T: classes; time steps (CIFAR: the image is repeated T times; DVS: must equal the input's T).
        neuron_impl: ``"triton" | "torch" | "spikingjelly"``; neuron: kind and parameters (:func:`make_neuron`).
        event_input: False: images ``[B, in_channels, H, W]``, stem stride 1, no pooling; True: event frames
            ``[B, T, in_channels, H, W]``, stem stride 2 followed by AvgPool(3, 2, 1).
        reversible, frac_bits: passed to every stage's ``RevSequence``.
        compact_spikes: keep conv input spikes as bool for backward; neuron_save: our neurons' ``save`` option.
        zero_init_last: start every F and G with its last BatchNorm weight at 0, so each block is the identity
            at initialisation (on for RevSResNet1001: with it off, its stage-1 gradients are ~1e7 times those of
            stage 4 at initialisation and the first SGD step drives the stream out of the fixed-point range).
        recompute_transitions: the stem and the downsample layers keep only their input (the image, resp. the
            stage output the reversible stage keeps anyway) and are recomputed in backward (one extra forward of
            them per step); False keeps their graphs.
        recompute_batch: None, or N: the reversible stages and the recomputed transitions run their
            recomputation in micro-batches of N images ("floor mode", see ``RevSequence``).
        keep_graph_stages: how many of the last stages run with ordinary autograd (``reversible=False``: they keep
            their graph and are not recomputed, same arithmetic and parameters). None (default): the last stage
            when its graph is small beside the work space of a first-stage block's recomputation, which sets the
            peak of a step (see :meth:`default_keep_graph_stages`), and none in floor mode. Each kept stage saves
            its recomputation time and costs its activations.
        transition_batch: None, or N: only the recomputed stem and downsample layers run in micro-batches of N
            (the default of the DVS model, whose stem works at 64x64 with T=10 and would otherwise set the peak);
            ``recompute_batch`` takes precedence.
    Forward returns logits ``[B, num_classes]`` (mean over T).
    """

    def __init__(self, widths: Sequence[int], blocks: Sequence[int], *, num_classes: int, T: int,
                 neuron_impl: str, neuron: dict, in_channels: int, event_input: bool, reversible: bool = True,
                 frac_bits: int = 16, compact_spikes: bool = True, neuron_save: Optional[str] = None,
                 zero_init_last: bool = False, recompute_transitions: bool = True,
                 recompute_batch: Optional[int] = None, transition_batch: Optional[int] = None,
                 keep_graph_stages: Optional[int] = None, name: str = "RevSResNet"):
        from revsnn_triton.reversible import RevBlock, RevSequence  # the engine; imported when a model is built

        super().__init__()
        check_widths_blocks(name, widths, blocks)
        # Total stride: the stem (DVS: conv stride 2 and a pool) and one halving per downsample.
        self.setup_input(name, num_classes, T, in_channels, event_input,
                         min_size=(4 if event_input else 1) * 2 ** (len(widths) - 1))
        kw = dict(neuron)
        sn = neuron_factory(neuron_impl, kw.pop("kind"), save=neuron_save, **kw)
        if keep_graph_stages is None:
            keep_graph_stages = 0 if recompute_batch is not None else self.default_keep_graph_stages(widths, blocks)
        elif isinstance(keep_graph_stages, bool) or not isinstance(keep_graph_stages, int) or \
                not 0 <= keep_graph_stages <= len(widths):
            raise ValueError(f"{name}: keep_graph_stages must be None or an int in [0, {len(widths)}] (the number of "
                             f"stages), got {keep_graph_stages!r}")
        self.keep_graph_stages = keep_graph_stages
        self.stem = Stem(in_channels, 2 * widths[0], stride=2 if event_input else 1,
                         pool="avg" if event_input else None)
        self.stages = torch.nn.ModuleList()
        self.downsamples = torch.nn.ModuleList()
        for i, (width, n) in enumerate(zip(widths, blocks)):
            if i:
                self.downsamples.append(Downsample(2 * widths[i - 1], 2 * width, sn, pool=True,
                                                   compact=compact_spikes))
            rev_blocks = [RevBlock(SpikingResidualBranch(width, width, sn, compact=compact_spikes),
                                   SpikingResidualBranch(width, width, sn, compact=compact_spikes), split_dim=2)
                          for _ in range(n)]
            kept = i >= len(widths) - keep_graph_stages
            self.stages.append(RevSequence(rev_blocks, frac_bits=frac_bits, reversible=reversible and not kept,
                                           recompute_batch=recompute_batch))
        if not isinstance(recompute_transitions, bool):
            raise TypeError(f"{name}: recompute_transitions must be a bool, got {type(recompute_transitions).__name__}")
        self.recompute_transitions, self.recompute_batch = recompute_transitions, recompute_batch
        self.transition_batch = recompute_batch if recompute_batch is not None else transition_batch
        self.head = SpikingHead(2 * widths[-1], num_classes, sn)
        init_conv_bn(self, zero_init_last=zero_init_last)

    @staticmethod
    def layer_count(blocks: Sequence[int]) -> int:
        """Weighted layers, counted as the zoo's names do: the stem conv, four 3x3 convs per reversible block
        (two in F, two in G), the 1x1 conv of each downsample between stages, and the Linear head."""
        return 1 + 4 * sum(blocks) + (len(blocks) - 1) + 1

    @staticmethod
    def default_keep_graph_stages(widths: Sequence[int], blocks: Sequence[int]) -> int:
        """1 if the last stage's activations are small enough to keep, else 0. A stage halves the resolution, so a
        half-stream of stage ``s`` holds ``widths[s] / 4**s`` of the first stage's elements per channel of the
        first. The peak of a training step is the recomputation of one first-stage block (several of its
        half-streams next to the stored stage outputs); the last stage's graph (a few of its half-streams per
        block) fits under it when ``blocks[-1] * widths[-1] / 4**(S-1) <= widths[0] / 2``. Measured on RevSResNet37
        (CPU, fp32): keeping stage 4 (ratio 0.22) leaves 8.50 MiB/image unchanged and shortens the step; keeping
        stages 3 and 4 as well (0.97) costs 3.2 MiB/image more."""
        if len(widths) < 2:
            return 0
        last = blocks[-1] * widths[-1] / 4 ** (len(widths) - 1)
        return int(last <= widths[0] / 2)

    def _transition(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.recompute_transitions:
            return recompute(module, x, self.transition_batch)
        return module(x)

    def forward_sequence(self, x: torch.Tensor) -> torch.Tensor:
        x = self._transition(self.stem, x)
        for i, stage in enumerate(self.stages):
            if i:
                x = self._transition(self.downsamples[i - 1], x)
            x = stage(x)
        return self.head(x)


CIFAR_WIDTHS = (64, 128, 256, 448)
# RevSResNet1001, in the spirit of ResNet-1001 on CIFAR (He et al., 2016: narrow widths, many blocks): the four
# stages of RevSResNet21 at a quarter of its per-half widths in the first three (stage 1 carries 32 channels) and
# 249 reversible blocks, so 1 + 4 * 249 + 3 + 1 = 1001 layers; 48.91M parameters with 100 classes (counted by
# the zoo's tests), 36.6M of them in stage 4. With widths=CIFAR_WIDTHS the same depth has RevSResNet21's widths.
DEEP_WIDTHS = (16, 32, 64, 128)
CONFIGS = {
    "RevSResNet21": dict(widths=CIFAR_WIDTHS, blocks=(1, 1, 1, 1)),
    "RevSResNet37": dict(widths=CIFAR_WIDTHS, blocks=(1, 2, 3, 2)),
    "RevSResNet109": dict(widths=CIFAR_WIDTHS, blocks=(2, 4, 16, 4)),
    "RevSResNet1001": dict(widths=DEEP_WIDTHS, blocks=(62, 62, 63, 62), zero_init_last=True),
}
# The non-reversible MS-ResNet of each (ms_resnet.py): a reversible block holds two residual functions (F and G)
# of the half width, an MS-ResNet basic block one, so the counterpart has twice the blocks at about the per-half
# widths (MS-ResNet18: 64..512 next to RevSResNet21's 64..448).
COUNTERPARTS = {"RevSResNet21": "MS-ResNet18", "RevSResNet37": "MS-ResNet34", "RevSResNet109": "MS-ResNet104",
                "RevSResNet1001": "MS-ResNet998"}


register_variants(RevSResNet, CONFIGS, num_classes=100, T=4, neuron=CIFAR_RESNET_NEURON, in_channels=3,
                  event_input=False, reversible=True, counterparts=COUNTERPARTS,
                  dataset="CIFAR-10/100", input="images [B, 3, 32, 32]",
                  doc="{name} (CIFAR, images [B, 3, H, W]): widths per half {widths}, blocks {blocks}, IF neurons, "
                      "ATan(2), detach_reset. Overrides: see RevSResNet.")


register_variants(RevSResNet, {"RevSResNet24": dict(widths=(16, 32, 48), blocks=(1, 2, 2), transition_batch=2)},
                  num_classes=10, T=10,
                  neuron=DVS_NEURON, in_channels=2, event_input=True, reversible=True,
                  counterparts={"RevSResNet24": "MS-ResNet20"},
                  dataset="DVS128 Gesture / CIFAR10-DVS", input="event frames [B, T, 2, 128, 128]",
                  doc="{name} (DVS, event frames [B, T, 2, 128, 128]): widths per half {widths}, blocks {blocks}, "
                      "LIF tau=1.5 with Sigmoid(4), detach_reset; stem conv stride 2 + AvgPool. Overrides: see "
                      "RevSResNet.")
