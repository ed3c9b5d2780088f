"""The README: its set-up commands stay what CI runs, and every example and command in it runs as written.
And the docs: no file under src/ or docs/ (nor the README) cites a file that is not in the repository."""
import glob
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"



def _readme_commands():
    text = README.read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_readme_opens_with_two_commands():
    commands = _readme_commands()
    assert len(commands) == 2
    assert "pleas" in commands[0] and "pytest" in commands[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _readme_commands()[1] in ci


# ------------------------------------------------------------------------------ examples and commands

def _code_blocks(text: str) -> list[tuple[str, str]]:
    """Every fenced block as (language, body), in the order of the text."""
    return re.findall(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)


def _steps() -> list[tuple[str, str]]:
    """The README after its set-up block, as steps in order: ("python", code) or ("shell", command line)."""
    blocks = _code_blocks(README.read_text())
    assert blocks and blocks[0][0] == "bash", "the README opens with its set-up commands"
    steps = []
    for language, body in blocks[1:]:
        if language == "python":
            steps.append(("python", body))
        elif language == "bash":
            for line in body.splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    steps.append(("shell", line.strip()))
    return steps


def test_the_readme_has_a_python_example_and_the_cli_commands():
    steps = _steps()
    assert any(kind == "python" and "pleas.merge(" in code for kind, code in steps)
    shell = [line for kind, line in steps if kind == "shell"]
    for command in ("pleas merge ", "pleas methods", "pleas spec "):
        assert any(line.startswith(command) for line in shell), command
    assert all(line.startswith("pleas ") for line in shell), "every shell line after the set-up is a pleas command"


def test_every_example_and_command_in_the_readme_runs(tmp_path, monkeypatch):
    """In the README's order, in one directory: the Python blocks share one namespace (a block may use what an
    earlier one made, as a reader running them in turn would), and each shell command runs as a process of its
    own and must exit with 0."""
    monkeypatch.chdir(tmp_path)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])])
    namespace: dict = {"__name__": "__readme__"}
    for i, (kind, step) in enumerate(_steps()):
        if kind == "python":
            exec(compile(step, f"README.md python block {i}", "exec"), namespace)
            continue
        argv = shlex.split(step)
        assert argv[0] == "pleas"
        done = subprocess.run([sys.executable, "-m", "pleas", *argv[1:]], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{step}\nexit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        if argv[1] == "merge":
            for flag in ("--out", "--report"):
                if flag in argv:
                    assert (tmp_path / argv[argv.index(flag) + 1]).exists(), flag


# ----------------------------------------------------------------------------------------- citations

#: A file name or path with an extension, as a citation writes it ("docs/algorithm.md", "src/pleas/ops/",
#: "../BENCHMARKS.md", "docs/bench/*.png"); the part after it that is not a path is left out.
_PATH = re.compile(r"(?<![\w./*-])((?:\.\./|/)?[\w.*-]+(?:/[\w.*-]+)*\.(?:md|py|json|png|toml|txt|yaml|yml|cfg))\b")
_LINK = re.compile(r"\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#+\s+(.*?)\s*$", re.M)


def _cited_by(path: Path) -> list[str]:
    text = path.read_text()
    found = []
    for token in _PATH.findall(text):
        # a bare file name other than a Markdown page ("merged.json", "spec.json") names an output, not a file
        # of the repository; Markdown pages and paths are citations
        if "/" in token or token.endswith(".md"):
            found.append(token)
    if path.suffix == ".md":
        found += [t for t in _LINK.findall(text) if not re.match(r"[a-z]+:", t)]
    return found


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _problem(source: Path, citation: str) -> str | None:
    target, _, anchor = citation.partition("#")
    if not target:  # an anchor in the same page
        target_path = source
    else:
        # relative to the citing file, the repository, or the package (docs name modules as "refit/solve.py")
        bases = [source.parent, ROOT] if source.suffix == ".md" else [ROOT, source.parent]
        if not target.startswith(".."):
            bases.append(ROOT / "src" / "pleas")
        if target.startswith("/"):
            return "an absolute path"
        candidates = [(base / target).resolve() for base in bases]
        inside = [c for c in candidates if c == ROOT or ROOT in c.parents]
        if not inside:
            return "a path outside the repository"
        existing = [c for c in inside if glob.glob(str(c))]
        if not existing:
            return "no such file in the repository"
        target_path = existing[0]
    if anchor and target_path.suffix == ".md" and target_path.is_file():
        if anchor not in {_slug(h) for h in _HEADING.findall(target_path.read_text())}:
            return f"no heading with anchor #{anchor} in {target_path.relative_to(ROOT)}"
    return None


def _documents() -> list[Path]:
    files = sorted((ROOT / "src").rglob("*.py")) + sorted((ROOT / "docs").rglob("*.md"))
    return [*files, README]


def test_no_file_under_src_or_docs_cites_a_file_outside_the_repository():
    problems = []
    for path in _documents():
        for citation in _cited_by(path):
            why = _problem(path, citation)
            if why:
                problems.append(f"{path.relative_to(ROOT)}: {citation!r}: {why}")
    assert not problems, "\n".join(problems)


def test_the_citation_check_catches_files_outside_the_repository(tmp_path):
    module = tmp_path / "module.py"
    module.write_text('"""Matching (ALGORITHM.md section 2; ../shared/notes.md); writes merged.json."""')
    assert _cited_by(module) == ["ALGORITHM.md", "../shared/notes.md"]
    in_src, in_docs = ROOT / "src" / "pleas" / "module.py", ROOT / "docs" / "page.md"
    assert _problem(in_src, "ALGORITHM.md") == "no such file in the repository"
    assert _problem(in_docs, "../../shared/notes.md") == "a path outside the repository"
    assert _problem(in_src, "docs/api-guide.md") is None
    assert _problem(in_docs, "../BENCHMARKS.md") is None and _problem(in_docs, "api-guide.md#budgets") is None
    assert _problem(in_docs, "api-guide.md#no-such-heading").startswith("no heading")
