"""The README and docs/ as a newcomer uses them: the README's Python snippet runs as written
and prints what it says; every command and option they name exists; every relative link
points at a file (and, into a Markdown page, at a heading) that exists."""
import re
from pathlib import Path

import click

from infini_trt.runtime.cli import main

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS, ROOT / "examples" / "passkey" / "README.md"]

FENCED = re.compile(r"^```[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")
COMMAND = re.compile(r"infini-trt ([a-z][a-z-]*)")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
SCHEME = re.compile(r"[a-z][a-z0-9+.-]*:", re.I)


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else len(README)]


def without_code_blocks(text: str) -> str:
    """The text without its fenced code blocks (the links and headings are outside them)."""
    return FENCED.sub("", text)


def command_lines(text: str) -> list[str]:
    """Every `infini-trt ...` command the text shows: each line of a fenced code block that
    starts with it (continuation lines joined, a trailing ` # comment` dropped) and each inline
    code span that starts with it (table rows included)."""
    found = []
    for block in FENCED.findall(text):
        for line in re.sub(r"\\\n[ \t]*", " ", block).splitlines():
            line = re.split(r"\s#", line)[0].strip()
            if line.startswith("infini-trt "):
                found.append(line)
    found += [span for span in INLINE.findall(without_code_blocks(text))
              if span.startswith("infini-trt ")]
    return found


def options_of(command: click.Command) -> set[str]:
    with click.Context(command) as ctx:
        return {opt for p in command.get_params(ctx) if isinstance(p, click.Option)
                for opt in (*p.opts, *p.secondary_opts)}


def command_problems(text: str, prose_counts: bool) -> list[str]:
    """Commands and long options the text names that `infini-trt` does not have. With
    `prose_counts`, a command named in running text counts too (`infini-trt serve`)."""
    lines = command_lines(text)
    named = set(COMMAND.findall(text) if prose_counts else [])
    named |= {m.group(1) for line in lines if (m := COMMAND.match(line))}
    problems = [f"no command infini-trt {name}" for name in sorted(named)
                if name not in main.commands]
    for line in lines:
        rest = line[len("infini-trt "):]
        command = main
        if (m := COMMAND.match(line)) and m.group(1) in main.commands:
            command, rest = main.commands[m.group(1)], line[m.end():]
        elif m:
            continue                                   # reported above
        options = options_of(command)
        problems += [f"{line!r}: infini-trt {command.name} has no {flag}"
                     for flag in FLAG.findall(rest) if flag not in options]
    return problems


def anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens, a
    repeated heading numbered -1, -2, ..."""
    seen: dict[str, int] = {}
    result = set()
    for heading in re.findall(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", without_code_blocks(text),
                              re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        result.add(slug if n == 0 else f"{slug}-{n}")
    return result


def link_problems(page: Path, text: str) -> list[str]:
    """Relative links (and images) of a page whose file, or whose heading in a Markdown file,
    does not exist."""
    problems = []
    for target in LINK.findall(without_code_blocks(text)):
        if SCHEME.match(target):
            continue                                   # http(s), mailto: not checked here
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            problems.append(f"{page.name}: {target} (no {path})")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text()):
            problems.append(f"{page.name}: {target} (no heading #{anchor} in {file.name})")
    return problems


def test_the_python_snippet_runs_as_written(tmp_path, monkeypatch, capsys, shared_cache):
    code = re.search(r"```python\n(.*?)```", section("Python API"), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("INFINI_TRT_CACHE", str(shared_cache))
    exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})
    printed = capsys.readouterr().out
    assert printed.startswith("7 1 4 3 2 ("), printed          # the key, from the context
    assert (tmp_path / "document.ctx").is_file()


def test_every_command_and_option_the_readme_and_docs_name_exists():
    """The README's command table has one row per command, and every command and option the
    README and docs/*.md name exists."""
    rows = {m.group(1) for m in re.finditer(r"^\| `infini-trt ([a-z][a-z-]*)", section("Commands"),
                                             re.M)}
    assert rows == set(main.commands), ("one row per command", rows ^ set(main.commands))
    problems = command_problems(README, prose_counts=True)
    for page in DOCS:
        problems += [f"{page.name}: {p}" for p in command_problems(page.read_text(), False)]
    assert not problems, "\n".join(problems)


def test_every_relative_link_points_at_what_exists():
    assert DOCS, "docs/*.md"
    problems = [p for page in PAGES for p in link_problems(page, page.read_text())]
    assert not problems, "\n".join(problems)


def test_the_checks_catch_what_they_are_for(tmp_path):
    """A page with a hyphenated command that does not exist, a flag of a code-block line that
    its command lacks (after a continuation line), a flag of a table row, a missing file and a
    missing heading: each is reported; the same page made right is not."""
    bad = ("Run `infini-trt bench-servex` first.\n\n"
           "```bash\ninfini-trt bench-serve MODEL \\\n    --concurrency 1,4 --no-such-flag  # x\n"
           "infini-trt run MODEL --prompt hi --sstate a.ctx\n```\n\n"
           "| `infini-trt score MODEL --tokenz F` | scores |\n\n"
           "[gone](missing.md) and [here](page.md#no-such-heading)\n\n# A heading\n")
    page = tmp_path / "page.md"
    page.write_text(bad)
    found = command_problems(bad, prose_counts=True) + link_problems(page, bad)
    for expected in ("no command infini-trt bench-servex", "bench-serve has no --no-such-flag",
                     "run has no --sstate", "score has no --tokenz", "missing.md",
                     "#no-such-heading"):
        assert any(expected in p for p in found), (expected, found)
    assert len(found) == 6, found
    good = (bad.replace("bench-servex", "bench-serve").replace(" --no-such-flag", "")
            .replace("--sstate", "--state").replace("--tokenz", "--tokens")
            .replace("missing.md", "page.md").replace("#no-such-heading", "#a-heading"))
    page.write_text(good)
    assert command_problems(good, True) + link_problems(page, good) == []
