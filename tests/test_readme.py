"""The README's code runs: every python block (in order, in one namespace, as a reader pastes them) and every
cheap offline command of its bash blocks; the other commands are listed here with the reason they are not run,
so that a new command in the README needs a decision in this file."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

# Commands of the README's bash blocks that this test does not run, each with the reason.
NOT_RUN = {
    'pip install "revsnn-triton[train]"': "installs packages (needs network and changes the environment)",
    "revsnn train --config cifar10_revsresnet --model RevSResNet37 --data-dir data --download --amp bf16 --compile":
        "downloads CIFAR-10 and trains a full-size model",
    "torchrun --nproc-per-node 4 -m revsnn_triton train --config cifar100_revsformer --batch-size 16 --data-dir data":
        "needs CIFAR-100 and 4 processes (DDP is tested in tests/test_train_ddp.py)",
    "revsnn train --resume runs/train/<run>": "needs an earlier full run (resuming is tested in tests/test_training.py)",
    "revsnn bench neurons": "times CUDA kernels: needs a GPU",
    "revsnn tune": "tunes CUDA kernels: needs a GPU",
    "pytest test_my_block.py --hypothesis-profile=revsnn-ci":
        "the README's example test file: run by tests/test_testing_plugin.py in a folder without conftest",
}


# Flags added to a README command when the test runs it: the command must parse and run; how long it trains is not
# what is tested (the README's one-epoch run takes about a minute on a CPU).
QUICKER = {
    "revsnn train --epochs 1 --out runs/quickstart": ["--max-steps-per-epoch", "3", "--max-eval-samples", "100"],
}


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), flags=re.MULTILINE | re.DOTALL)


def _commands(block: str | None = None) -> list[str]:
    """Every command line of ``block`` (default: of all bash blocks), comments stripped."""
    lines = []
    for block in _blocks("bash") if block is None else [block]:
        for line in block.splitlines():
            command = line.split("  #")[0].split(" #")[0].strip() if not line.lstrip().startswith("#") else ""
            if command:
                lines.append(command)
    return lines


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def _fenced_blocks() -> list[tuple[str, str]]:
    """``(language, text)`` of every fenced block of the README, in order."""
    return re.findall(r"^```(\w*)\n(.*?)^```", README.read_text(), flags=re.MULTILINE | re.DOTALL)


def test_readme_runs_in_order(tmp_path, monkeypatch, capsys) -> None:
    """The README as a reader goes through it, from a fresh directory: every python block (in one namespace) and
    the cheap, offline ``revsnn`` commands of every bash block (as subprocesses), in document order, so that a
    later block may use what an earlier one made (the Python inference example loads the run the commands
    trained)."""
    pytest.importorskip("spikingjelly")
    pytest.importorskip("sklearn")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    python_blocks = 0
    for language, text in _fenced_blocks():
        if language == "python":
            python_blocks += 1
            try:
                exec(compile(text, f"README.md python block {python_blocks}", "exec"), namespace)
            except Exception as error:  # name the block: a reader sees which example broke
                raise AssertionError(f"README.md python block {python_blocks} failed: {type(error).__name__}: "
                                     f"{error}") from error
        elif language == "bash":
            for command in _commands(text):
                if command in NOT_RUN:
                    continue
                argv = shlex.split(command) + QUICKER.get(command, [])
                result = subprocess.run([sys.executable, "-m", "revsnn_triton", *argv[1:]], cwd=tmp_path,
                                        env=_env(), capture_output=True, text=True, timeout=900)
                assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
                assert "Traceback" not in result.stderr, command
    assert python_blocks >= 4, "the quick start has lost its code"
    out = capsys.readouterr().out
    # what the quick start says it shows
    assert "False" in out.splitlines()[0], out  # a float x off the grid is not rebuilt bit for bit
    assert "save=input" in out
    accuracy = float(re.search(r"test accuracy ([\d.]+)%", out).group(1))
    assert accuracy > 80.0, out  # a converted spikingjelly MLP learns the digits (89.4% measured)
    assert "RevSResNet-digits [" in out  # the model loaded from the run folder predicted


def test_every_bash_command_is_run_or_excused() -> None:
    commands = _commands()
    assert commands, "no bash blocks found"
    unknown = [c for c in commands if c not in NOT_RUN and not c.startswith("revsnn ")]  # revsnn ...: run
    assert not unknown, f"README commands with no decision in tests/test_readme.py: {unknown}"
    stale = [c for c in (*NOT_RUN, *QUICKER) if c not in commands]
    assert not stale, f"tests/test_readme.py excuses commands the README no longer has: {stale}"


def test_package_dir_lists_the_lazy_names() -> None:
    import revsnn_triton

    names = dir(revsnn_triton)
    assert "create_model" in names and "list_models" in names
    assert set(revsnn_triton.__all__) <= set(names)
