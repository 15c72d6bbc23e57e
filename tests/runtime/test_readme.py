"""The README as a newcomer uses it: its Python snippet runs as written and prints what it
says, and every command and option it names exists."""
import re
from pathlib import Path

import click

from infini_trt.runtime.cli import main

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else len(README)]


def test_the_python_snippet_runs_as_written(tmp_path, monkeypatch, capsys, shared_cache):
    code = re.search(r"```python\n(.*?)```", section("Python API"), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("INFINI_TRT_CACHE", str(shared_cache))
    exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})
    printed = capsys.readouterr().out
    assert printed.startswith("7 1 4 3 2 ("), printed          # the key, from the context
    assert (tmp_path / "document.ctx").is_file()


def test_every_command_and_option_the_readme_names_exists():
    commands = main.commands
    named = set(re.findall(r"infini-trt ([a-z]+)", README)) - {"exports"}
    assert named <= set(commands), named - set(commands)
    for line in README.splitlines():
        found = re.match(r"\| `infini-trt ([a-z]+) (.*?)` \|", line)
        if not found:
            continue
        command = commands[found.group(1)]
        options = {opt for p in command.params if isinstance(p, click.Option)
                   for opt in (*p.opts, *p.secondary_opts)}
        for flag in re.findall(r"--[a-z][a-z-]*", found.group(2)):
            assert flag in options, f"infini-trt {found.group(1)} has no {flag}"
