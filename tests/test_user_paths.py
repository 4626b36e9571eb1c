"""What a new user meets first: the README's snippets run as they stand, mistakes get one line.

- The README's Python API blocks are excerpts of `examples/bridge_api.py` and `examples/model_api.py`,
  which run at one rank and under torchrun at TP=2 (the same greedy tokens at both).
- Each command-line mistake a user makes is answered with one `error:` line on stderr naming the
  problem and the fix, exit code 2 (usage) or 1, within seconds and before PyTorch is imported
  (`--help` likewise), and nothing is written.
- Ctrl-C during an import's write phase exits with one line (code 130) and leaves no output.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_v4.runtime.ranks import free_port

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
TORCHRUN = str(Path(PYTHON).with_name("torchrun"))

pytestmark = pytest.mark.timeout(600)


def _run(argv: list[str], timeout: float = 120, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MEGATRON_V4_VERBOSE", None)
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# --- the README's snippets ------------------------------------------------------------------------------
def _readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_python_blocks_are_excerpts_of_runnable_examples():
    examples = {name: (ROOT / "examples" / name).read_text() for name in ("bridge_api.py", "model_api.py")}
    blocks = _readme_python_blocks()
    assert len(blocks) >= 2
    for block in blocks:
        lines = [line for line in block.strip().splitlines() if line.strip()]
        home = [name for name, text in examples.items() if all(line in text.splitlines() for line in lines)]
        assert home, f"README block not found line by line in examples/bridge_api.py or model_api.py:\n{block}"


@pytest.mark.parametrize("script", ["bridge_api.py", "model_api.py"])
def test_readme_examples_run_at_one_rank_and_under_torchrun(script, tmp_path):
    extra = ["--workdir", str(tmp_path)] if script == "bridge_api.py" else []
    one = _run([PYTHON, f"examples/{script}", *extra])
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run([TORCHRUN, "--nproc-per-node", "2", "--master-port", str(free_port()), f"examples/{script}",
                "--tp", "2", *extra], timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    last = one.stdout.strip().splitlines()[-1]
    print(f"{script}: {last}")
    if script == "bridge_api.py":
        # The same logits (their argmax) at TP=2 as at one rank, on both ranks.
        expected = next(line for line in one.stdout.splitlines() if line.startswith("logits"))
        # (the two ranks' prints may interleave within the job's stdout)
        assert two.stdout.count(expected) == 2, two.stdout


# --- mistakes -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> str:
    from bridge import make_tiny_checkpoint

    path = tmp_path_factory.mktemp("tiny") / "hf"
    make_tiny_checkpoint(path, seed=0)
    return str(path)


MISTAKES = [
    # (argv with {hf} for a tiny checkpoint and {tmp} for an empty folder, exit code, words in the line)
    (["examples/pretrain.py", "--tp", "2"], 2, "torchrun --nproc-per-node 2"),
    (["examples/pretrain.py", "--hf", "{tmp}/missing"], 2, "--hf {tmp}/missing: no such directory"),
    (["examples/pretrain.py", "--data-path", "{tmp}/corpus"], 2, "{tmp}/corpus.bin and {tmp}/corpus.idx not found"),
    (["examples/pretrain.py", "--global-batch-size", "3"], 2, "not a multiple of --micro-batch-size"),
    (["examples/pretrain.py", "--no-such-flag"], 2, "unrecognized arguments: --no-such-flag"),
    (["examples/pretrain.py", "--sft-data", "{tmp}/chats.jsonl"], 2, "--sft-data {tmp}/chats.jsonl: no such file"),
    (["examples/pretrain.py", "--pack-documents"], 2, "--pack-documents divides the documents of --data-path"),
    (["examples/generate.py", "--hf", "{hf}", "--prompt-ids", "1,2,999"], 2, "token id 999 is outside the vocabulary"),
    (["examples/generate.py", "--hf", "{hf}", "--max-new-tokens", "100000000"], 2, "exceed max_position_embeddings"),
    (["examples/generate.py", "--prompt-ids", "1,x"], 2, "give comma-separated integers"),
    (["examples/generate.py", "--mcore", "{tmp}"], 2, "no dsv4_bridge/config.json"),
    (["examples/generate.py", "--pp", "2"], 2, "torchrun --nproc-per-node 2"),
    (["-m", "bridge", "export", "--mcore", "{tmp}/missing", "--out", "{tmp}/out"], 2, "no such directory"),
    (["-m", "bridge", "import", "--hf", "{hf}"], 2, "the following arguments are required: --out"),
    (["-m", "bridge", "export", "--mcore", "{hf}", "--out", "{tmp}/out"], 1, "no dsv4_bridge/config.json"),
    (["-m", "bridge", "export", "--mcore", "{hf}", "--out", "{hf}/out"], 2, "overlaps the input"),
    (["examples/main_job.py", "--seq-len"], 2, "expected one argument"),
]


@pytest.mark.parametrize("argv, code, words", MISTAKES, ids=[" ".join(m[0][:3]) for m in MISTAKES])
def test_a_mistake_is_one_line_and_an_exit_code(tiny_hf, tmp_path, argv, code, words):
    fill = {"hf": tiny_hf, "tmp": str(tmp_path)}
    argv = [arg.format(**fill) for arg in argv]
    before = sorted(os.listdir(tmp_path))
    started = time.perf_counter()
    result = _run([PYTHON, *argv], timeout=60)
    seconds = time.perf_counter() - started
    lines = result.stderr.strip().splitlines()
    print(f"{' '.join(argv)} -> {result.returncode} in {seconds:.1f} s: {lines}")
    assert result.returncode == code
    assert len(lines) == 1 and "error: " in lines[0], result.stderr[-2000:]
    assert words.format(**fill) in lines[0]
    assert sorted(os.listdir(tmp_path)) == before, "a failed command wrote something"
    assert seconds < 30


@pytest.mark.parametrize("argv", [["examples/pretrain.py"], ["examples/generate.py"], ["-m", "bridge"],
                                  ["-m", "bridge", "export"], ["examples/main_job.py"]])
def test_help_answers_without_importing_torch(argv):
    code = ("import runpy, sys, time; sys.argv = {argv!r}; t = time.perf_counter()\n"
            "try:\n    runpy.run_{kind}({target!r}, run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, round(time.perf_counter() - t, 3))")
    if argv[0] == "-m":
        program = code.format(argv=[argv[1], *argv[2:], "--help"], kind="module", target=argv[1])
    else:
        program = code.format(argv=[argv[0], "--help"], kind="path", target=argv[0])
    result = _run([PYTHON, "-c", program])
    assert result.returncode == 0, result.stderr[-2000:]
    *_, last = result.stdout.strip().splitlines()
    imported_torch, seconds = last.split()
    print(f"{' '.join(argv)} --help: {seconds} s, torch imported: {imported_torch}")
    assert imported_torch == "False"
    assert float(seconds) < 1.0


# `python -m bridge ...` whose first tensor write marks a file and then lasts 2 s: the test's Ctrl-C lands
# inside the write phase however fast the machine converts.
HELD_WRITE_IMPORT = """
import pathlib, signal, sys, time
# Ctrl-C as in a terminal, even where this test runs in the background (a shell ignores SIGINT there, and
# the ignoring is inherited)
signal.signal(signal.SIGINT, signal.default_int_handler)
from bridge import mcore_checkpoint
from bridge.cli import main
marker = pathlib.Path(sys.argv[1])
write_job = mcore_checkpoint._StreamingWriter._write_job
def held(*args):
    if not marker.exists():
        marker.touch()
        time.sleep(2)
    return write_job(*args)
mcore_checkpoint._StreamingWriter._write_job = staticmethod(held)
sys.exit(main(sys.argv[2:]))
"""


def test_ctrl_c_during_an_import_write_leaves_one_line_and_nothing(tmp_path):
    from bridge.tiny import make_tiny_checkpoint

    make_tiny_checkpoint(tmp_path / "hf", seed=0, with_mtp=False)
    marker = tmp_path / "writing"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([PYTHON, "-c", HELD_WRITE_IMPORT, str(marker), "import", "--hf", str(tmp_path / "hf"),
                                "--out", str(tmp_path / "mcore"), "--quiet"], cwd=ROOT, env=env,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert process.poll() is None and time.monotonic() < deadline, "the import never started writing"
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    lines = stderr.strip().splitlines()
    print(f"interrupted import: exit {process.returncode}, {lines}")
    assert process.returncode == 130
    assert lines == ["error: interrupted; no output was written"]
    assert sorted(os.listdir(tmp_path)) == ["hf", "writing"]
