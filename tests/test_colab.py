"""colab.ipynb: a valid nbformat-4 notebook whose every script command parses against that script's current parser.

Each `python <script>.py ...` in the notebook (code cells: `!python ...` and `%run`, backslash continuations joined;
markdown: fenced blocks and inline code) is parsed by the parser the script itself builds: the script's module is
imported and its main() called with the command's arguments, with argparse's parse_args stopped right after a
successful parse (nothing runs, nothing is written). A flag renamed or removed in a script, a new required flag,
a value outside a flag's choices or type all fail here, naming the cell and the command. Abbreviated flags are
refused too: a prefix that works today may become ambiguous tomorrow. `{VAR}` and `$VAR` are replaced by the
first literal value the notebook assigns to VAR (form fields), or by a placeholder path.
"""
import argparse
import ast
import contextlib
import importlib
import inspect
import io
import json
import re
import shlex
import sys
from pathlib import Path

import pytest

from conftest import REPO

NOTEBOOK = REPO / "colab.ipynb"
PLACEHOLDER = "/placeholder/path"


def load_notebook():
    return json.loads(NOTEBOOK.read_text(encoding="utf-8"))


def cell_text(cell):
    src = cell["source"]
    return src if isinstance(src, str) else "".join(src)


def logical_lines(text):
    """Lines with backslash continuations joined, as IPython joins them before running `!` commands."""
    out, buf = [], ""
    for line in text.split("\n"):
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
        else:
            out.append(buf + line)
            buf = ""
    return out + ([buf] if buf else [])


def commands(nb):
    """[(cell index, command text)] of every line that runs a `python <script>.py` in the notebook."""
    found = []
    for k, cell in enumerate(nb["cells"]):
        text = cell_text(cell)
        if cell["cell_type"] == "code":
            candidates = [ln.strip() for ln in logical_lines(text)]
            candidates = [ln[1:].strip() if ln.startswith("!") else "python " + ln[4:].strip()
                          for ln in candidates if ln.startswith("!") or ln.startswith("%run ")]
        else:
            blocks = re.findall(r"```[^\n]*\n(.*?)```", text, re.S)
            inline = re.findall(r"(?<!`)`([^`\n]+)`(?!`)", re.sub(r"```.*?```", "", text, flags=re.S))
            candidates = [ln.strip().lstrip("!$ ").strip() for b in blocks for ln in logical_lines(b)] + inline
        for c in candidates:
            for part in re.split(r"\s*(?:&&|\|\||;|\|)\s*", c):
                if re.match(r"python3?\s+\S+\.py(\s|$)", part):
                    found.append((k, part))
    return found


def literal_values(nb):
    """{NAME: str(value)} of the first `NAME = <literal>` in the code cells (the form fields)."""
    values = {}
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        for line in cell_text(cell).split("\n"):
            m = re.match(r"\s*([A-Za-z_]\w*)\s*=\s*(.+?)\s*(#.*)?$", line)
            if m and m.group(1) not in values:
                try:
                    v = ast.literal_eval(m.group(2))
                except (ValueError, SyntaxError):
                    continue
                if isinstance(v, (str, int, float)) and not isinstance(v, bool) and str(v):
                    values[m.group(1)] = str(v)
    return values


def substitute(command, values):
    return re.sub(r"\{(\w+)\}|\$(\w+)", lambda m: values.get(m.group(1) or m.group(2), PLACEHOLDER), command)


def variables_used(command):
    return {a or b for a, b in re.findall(r"\{(\w+)\}|\$(\w+)", command)}


def as_python(text):
    """A code cell as plain Python: IPython's `!` / `%` lines become `pass` (indentation kept)."""
    lines = []
    for line in logical_lines(text):
        stripped = line.lstrip()
        lines.append(line[:len(line) - len(stripped)] + "pass" if stripped[:1] in "!%" and stripped else line)
    return "\n".join(lines)


class Parsed(BaseException):  # not an Exception: no `except Exception` in a script may swallow it
    pass


def strict(parser):
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                strict(sub)


def parse_command(tokens, monkeypatch):
    """Run the script's main() on the tokens up to its first complete parse. Returns (parser, error line or None)."""
    script = REPO / tokens[1]
    assert script.is_file(), f"{tokens[1]}: no such script in the repository"
    monkeypatch.setattr(sys, "path", [str(script.parent), *sys.path])  # (syspath_prepend would import pkg_resources)
    module = importlib.import_module(script.stem)
    assert Path(module.__file__).resolve() == script.resolve(), f"{script.stem} imported from {module.__file__}"
    state = {"depth": 0, "parser": None}
    original = {name: getattr(argparse.ArgumentParser, name) for name in ("parse_args", "parse_known_args")}

    def stopping(name):
        def parse(self, args=None, namespace=None):
            if state["depth"]:  # parse_args -> parse_known_args, or a subparser: not the outermost parse
                return original[name](self, args, namespace)
            strict(self)
            state["parser"] = self
            state["depth"] += 1
            try:
                result = original[name](self, args, namespace)
            finally:
                state["depth"] -= 1
            extras = result[1] if name == "parse_known_args" else []
            raise Parsed(extras)
        return parse

    for name in original:
        monkeypatch.setattr(argparse.ArgumentParser, name, stopping(name))
    argv = tokens[2:]
    monkeypatch.setattr(sys, "argv", [str(script)] + argv)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            module.main(argv) if inspect.signature(module.main).parameters else module.main()
    except Parsed as p:
        extras = p.args[0]
        return state["parser"], (f"unrecognized arguments: {' '.join(extras)}" if extras else None)
    except SystemExit as e:  # plain argparse: usage + error on stderr, exit 2
        return state["parser"], (err.getvalue().strip().splitlines() or [f"exit {e.code}"])[-1]
    except ValueError as e:  # models.ArgumentParser: a DataError line
        return state["parser"], str(e)
    pytest.fail(f"{tokens[1]}: main() returned without parsing its arguments")


NB = load_notebook() if NOTEBOOK.is_file() else {"cells": []}
COMMANDS = commands(NB)


def test_notebook_structure():
    """nbformat 4 by hand: the keys Jupyter and Colab need, every cell well formed, code cells valid Python."""
    nb = load_notebook()
    assert nb["nbformat"] == 4 and isinstance(nb["nbformat_minor"], int)
    assert isinstance(nb["metadata"], dict) and nb["metadata"]["kernelspec"]["language"] == "python"
    assert isinstance(nb["cells"], list) and nb["cells"]
    ids = []
    for k, cell in enumerate(nb["cells"]):
        assert cell["cell_type"] in ("markdown", "code", "raw"), f"cell {k}: cell_type {cell['cell_type']}"
        assert isinstance(cell["metadata"], dict), f"cell {k}: metadata"
        src = cell["source"]
        assert isinstance(src, str) or all(isinstance(s, str) for s in src), f"cell {k}: source"
        if nb["nbformat_minor"] >= 5:  # cell ids are required from nbformat 4.5
            assert re.fullmatch(r"[A-Za-z0-9_-]{1,64}", cell.get("id", "")), f"cell {k}: id {cell.get('id')!r}"
            ids.append(cell["id"])
        if cell["cell_type"] == "code":
            lines = [ln.strip() for ln in logical_lines(cell_text(cell))]
            for ln, after in zip(lines, lines[1:] + [""]):  # IPython goes on after a failed `!` line: stop there
                assert not ln.startswith("!") or after.startswith("check("), \
                    f"cell {k}: `{ln[:60]}` is not followed by check(...), which stops the cell when it fails"
            assert isinstance(cell["outputs"], list), f"cell {k}: outputs"
            assert cell["execution_count"] is None or isinstance(cell["execution_count"], int), f"cell {k}"
            compile(as_python(cell_text(cell)), f"colab.ipynb cell {k}", "exec")
        else:
            assert "outputs" not in cell and "execution_count" not in cell, f"cell {k}: a {cell['cell_type']} cell"
    assert len(ids) == len(set(ids)), "cell ids repeat"


def test_commands_found():
    """The notebook runs every stage of both parts (a regex that stopped matching must not pass silently)."""
    scripts = [shlex.split(substitute(c, {}))[1] for _, c in COMMANDS]
    for script in ("bench/toy_transfer.py", "data.py", "estimate_affinity.py", "finetune_oasis.py", "evaluate.py"):
        assert script in scripts, f"no `python {script}` command found in colab.ipynb"
    assert any("--labels" in c for _, c in COMMANDS) and any("--amp auto" in c for _, c in COMMANDS)


def test_variables_defined():
    """Every {VAR} / $VAR of a command is assigned in a code cell before the command's cell (or in it)."""
    assigned = set()
    for k, cell in enumerate(NB["cells"]):
        if cell["cell_type"] == "code":
            tree = ast.parse(as_python(cell_text(cell)))
            assigned |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        for j, command in COMMANDS:
            if j == k:
                missing = variables_used(command) - assigned
                assert not missing, f"cell {k}: {command!r} uses {sorted(missing)}, assigned in no earlier code cell"


@pytest.mark.parametrize("cell,command", COMMANDS, ids=[f"cell{k}-{c.split()[1]}" for k, c in COMMANDS])
def test_command_parses(cell, command, monkeypatch):
    tokens = shlex.split(substitute(command, literal_values(NB)))
    parser, error = parse_command(tokens, monkeypatch)
    assert error is None, f"colab.ipynb cell {cell}: `{command}` does not parse against {tokens[1]}: {error}"


def test_setup_cell_stops_without_repository(tmp_path, monkeypatch):
    """The first code cell: outside a checkout with REPO_URL unset it stops (Stop: one line, no traceback in IPython)
    naming REPO_URL; inside
    the checkout it keeps it (no clone, no network)."""
    setup = next(cell_text(c) for c in NB["cells"] if c["cell_type"] == "code")
    assert re.search(r'^REPO_URL = ""', setup, re.M), "REPO_URL must ship unset (the placeholder check relies on it)"
    monkeypatch.chdir(tmp_path)
    if Path("/content/cat").exists():
        pytest.skip("a /content/cat checkout exists here")
    with pytest.raises(Exception) as e:
        exec(compile(as_python(setup), "setup cell", "exec"), {})
    assert type(e.value).__name__ == "Stop" and "REPO_URL" in str(e.value) and "\n" not in str(e.value)
    monkeypatch.chdir(REPO)
    scope = {}
    exec(compile(as_python(setup), "setup cell", "exec"), scope)
    assert scope["REPO_DIR"] == str(REPO)
