"""``torchrun --nproc-per-node 2`` on the CPU (gloo): one DDP step equals one single-process step on the same
global batch."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch

from revsnn_triton.checkpoint import load_checkpoint
from revsnn_triton.testing import assert_close

BATCH, SEED, LR = 16, 5, 1.0

# A spiking model without BatchNorm (its batch statistics would differ per rank without SyncBatchNorm, which
# torch runs only on GPUs): Linear -> IF neuron over T steps (our op) -> mean over T -> Linear.
SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import torch.nn as nn
    from revsnn_triton import training
    from revsnn_triton.models.neurons import make_neuron

    class SpikingMLP(nn.Module):
        def __init__(self, num_classes, T):
            super().__init__()
            self.T = T
            self.fc1 = nn.Linear(64, 48)
            self.sn = make_neuron("triton", "if", surrogate="atan", alpha=2.0)
            self.fc2 = nn.Linear(48, num_classes)

        def forward(self, x):
            h = self.fc1(x.flatten(1)) * 3.0
            return self.fc2(self.sn(h.unsqueeze(0).expand(self.T, *h.shape)).mean(0))

    training.build_model = lambda cfg, data, name=None: SpikingMLP(data.num_classes, cfg.T)
    out, batch, seed, lr = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    training.train(out=out, epochs=1, max_steps_per_epoch=1, batch_size=batch, seed=seed, lr=lr, optimizer="sgd",
                   momentum=0.0, weight_decay=0.0, scheduler="constant", warmup_epochs=0, memory_report=False,
                   progress=False)
""")


def _initial_weights(script_path) -> dict:
    # The same construction as the script, with the seed train() sets before building the model.
    namespace: dict = {}
    source = script_path.read_text().split("training.build_model")[0]
    exec(compile(source, str(script_path), "exec"), namespace)
    torch.manual_seed(SEED)
    return namespace["SpikingMLP"](10, 4).state_dict()


def test_torchrun_two_processes_match_single_process_gradients(tmp_path):
    script = tmp_path / "ddp_step.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script), str(tmp_path / "ddp"), str(BATCH), str(SEED), str(LR)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert ddp.returncode == 0, ddp.stdout[-3000:] + ddp.stderr[-3000:]
    single = subprocess.run([sys.executable, str(script), str(tmp_path / "single"), str(2 * BATCH), str(SEED),
                             str(LR)], capture_output=True, text=True, timeout=300, env=env)
    assert single.returncode == 0, single.stderr[-3000:]

    # Rank 0 alone logs: one start line and one epoch line for the whole job.
    assert ddp.stdout.count("epoch   1/1") == 1 and "2 processes" in ddp.stdout
    w0 = _initial_weights(script)
    a, b = load_checkpoint(tmp_path / "ddp" / "checkpoint_last.pt"), load_checkpoint(tmp_path / "single" /
                                                                                         "checkpoint_last.pt")
    for name, start in w0.items():
        grad_ddp = (start - a["model"][name]) / LR
        grad_single = (start - b["model"][name]) / LR
        assert grad_single.abs().max() > 1e-4, f"{name}: no gradient reached it, the comparison would be empty"
        # Same gradients up to the order of the fp32 sums (DDP averages two half-batch means).
        assert_close(grad_ddp, grad_single, dtype=torch.float32, what=name)
    # Metrics are reduced over both ranks: same global loss and the same exact test accuracy.
    ha, hb = a["history"][0], b["history"][0]
    assert abs(ha["train_loss"] - hb["train_loss"]) < 1e-5
    assert ha["test_acc"] == hb["test_acc"]
