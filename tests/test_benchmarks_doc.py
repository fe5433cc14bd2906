"""Every `bench/` command printed in BENCHMARKS.md parses with its script's own argument parser.

The commands are read from the file (continuation lines joined), environment assignments and the Python
launcher dropped, and each script's `main()` is run with the printed arguments plus `--help`: argparse checks
every printed option and value (types, choices) before it reaches `--help`, then exits 0 without running the
benchmark. A command that does not parse (e.g. the shell-brace `--batch {16,1}` that was printed once) exits 2.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def printed_commands(text: str) -> list[list[str]]:
    joined = re.sub(r"\\\n\s*", " ", text)
    commands = []
    for line in joined.splitlines():
        for match in re.finditer(r"(?:^|`|\s)((?:[^\s`]*python[^\s`]*)\s+bench/bench_\w+\.py[^`#\n]*)", line):
            words = shlex.split(match.group(1))
            while words and "=" in words[0] and not words[0].startswith("-"):
                words.pop(0)
            commands.append(words)
    return commands


COMMANDS = printed_commands((ROOT / "BENCHMARKS.md").read_text())


def test_the_commands_are_found():
    """The extraction sees the file's commands (so the parse test below is not vacuous), for existing scripts."""
    printed = {Path(words[1]).name for words in COMMANDS}
    assert len(COMMANDS) >= 10 and {"bench_probe.py", "bench_generate.py", "bench_finetune.py", "bench_score.py",
                                    "bench_dag.py"} <= printed, printed
    assert all((ROOT / words[1]).exists() for words in COMMANDS), printed


def run_parser(words: list[str]) -> int:
    script = ROOT / words[1]
    spec = importlib.util.spec_from_file_location(f"printed_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(script.parent))
    old_argv = sys.argv
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        sys.argv = [str(script), *words[2:], "--help"]
        try:
            module.main()
        except SystemExit as exc:
            return int(exc.code or 0)
        return 0
    finally:
        sys.argv = old_argv
        sys.path.remove(str(script.parent))
        sys.modules.pop(spec.name, None)


@pytest.mark.parametrize("words", COMMANDS, ids=[" ".join(w[1:4]) for w in COMMANDS])
def test_printed_command_parses(words, capsys):
    assert Path(words[0]).name.startswith("python"), words
    assert run_parser(words) == 0, capsys.readouterr().err


def test_a_brace_argument_is_caught():
    assert run_parser(["python", "bench/bench_probe.py", "--batch", "{16,1}"]) == 2
