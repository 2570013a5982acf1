"""The package layering, read from the source with ``ast`` (nothing is imported): megasail/checkpoint sits
below training, convert, inference and evaluation, and only it touches a checkpoint's marker and megasail.json."""

from __future__ import annotations

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "megasail")
CHECKPOINT = os.path.join(PACKAGE, "checkpoint")
USERS = ("megasail.training", "megasail.convert", "megasail.inference", "megasail.evaluation")
FILE_NAMES = ("latest_checkpointed_iteration.txt", "megasail.json")  # megasail.checkpoint's MARKER, META
NAME_CONSTANTS = ("MARKER", "META")


def _python_files(*roots: str) -> list[str]:
    found = []
    for root in roots:
        if root.endswith(".py"):
            found.append(root)
            continue
        for d, _, files in os.walk(root):
            found += [os.path.join(d, f) for f in files if f.endswith(".py")]
    return sorted(found)


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, REPO)[: -len(".py")].split(os.sep)
    return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def _literal_prefix(node) -> str | None:
    """A str constant, or the literal start of an f-string (f"megasail.{x}" -> "megasail.")."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        return node.values[0].value
    return None


def imports_of(path: str) -> list[tuple[int, str]]:
    """(line, module) of every import in the file, at any depth (inside functions too): ``import x``,
    ``from x import y`` (as x and x.y), relative imports resolved, and importlib.import_module /
    __import__ calls with a literal (prefix of a) name."""
    tree = ast.parse(open(path).read(), path)
    package = _module_name(path) if path.endswith("__init__.py") else _module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__"):
                literal = _literal_prefix(node.args[0])
                if literal is not None:
                    found.append((node.lineno, literal))
    return found


def _is_under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_checkpoint_package_imports_none_of_its_users():
    """Nothing under megasail/checkpoint imports training, convert, inference or evaluation, at module level or lazily
    inside a function.

    Fault caught: ``from megasail.training.step import forward_step`` inside a function of
    megasail/checkpoint/sharded.py."""
    bad = [
        f"{os.path.relpath(path, REPO)}:{line}: imports {module}"
        for path in _python_files(CHECKPOINT)
        for line, module in imports_of(path)
        if any(_is_under(module, user) for user in USERS)
    ]
    assert bad == [], "\n".join(bad)


def test_training_convert_and_inference_import_the_checkpoint_package():
    """Each of training, convert, inference and evaluation reaches checkpoints through megasail.checkpoint, and no
    module of megasail, tools or pretrain_vlm.py imports the re-export left at
    megasail.training.checkpoint.

    Fault caught: megasail/convert/dist.py importing model_sharded_state_dict from
    megasail.training.checkpoint (the old name) again."""
    for user in USERS:
        directory = os.path.join(REPO, *user.split("."))
        importers = [
            path for path in _python_files(directory)
            if any(_is_under(m, "megasail.checkpoint") for _, m in imports_of(path))
        ]  # fmt: skip
        assert importers, f"no module of {user} imports megasail.checkpoint"
    through_old_name = [
        f"{os.path.relpath(path, REPO)}:{line}"
        for path in _python_files(PACKAGE, os.path.join(REPO, "tools"), os.path.join(REPO, "pretrain_vlm.py"))
        for line, module in imports_of(path)
        if _is_under(module, "megasail.training.checkpoint")
    ]
    assert through_old_name == [], through_old_name


def _docstrings(tree) -> set[int]:
    """ids of the string constants that are docstrings or bare string statements."""
    return {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    }


def _interpolated(tree) -> set[int]:
    """ids of the nodes inside f-string replacement fields ({MARKER} in a message)."""
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FormattedValue):
            inside |= {id(n) for n in ast.walk(node.value)}
    return inside


def checkpoint_file_uses(path: str) -> list[str]:
    """Where a module outside megasail/checkpoint names the marker or megasail.json other than in a
    docstring or a message: a string literal holding either file name, or the MARKER / META constant
    used anywhere but inside an f-string's replacement field."""
    tree = ast.parse(open(path).read(), path)
    docstrings, interpolated = _docstrings(tree), _interpolated(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if any(name in node.value for name in FILE_NAMES):
                found.append(f"{os.path.relpath(path, REPO)}:{node.lineno}: literal {node.value!r}")
        name = (
            node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else None
        )
        if name in NAME_CONSTANTS and id(node) not in interpolated:
            found.append(f"{os.path.relpath(path, REPO)}:{node.lineno}: uses {name} outside a message")
    return found


def test_only_the_checkpoint_package_reads_or_writes_its_files():
    """Outside megasail/checkpoint (megasail/, tools/, pretrain_vlm.py) the marker and megasail.json are
    named in messages only: every write (and read) of them goes through the package's functions.

    Faults caught: a marker write in megasail/convert/dist.py through the package's constant,
    ``open(os.path.join(root, MARKER), "w")``, and the same with the file name as a literal."""
    roots = [PACKAGE, os.path.join(REPO, "tools"), os.path.join(REPO, "pretrain_vlm.py")]
    found = [
        use
        for path in _python_files(*roots)
        if not path.startswith(CHECKPOINT + os.sep)
        for use in checkpoint_file_uses(path)
    ]
    assert found == [], "\n".join(found)


def test_the_checks_see_what_they_look_for(tmp_path):
    """The readers above find imports inside functions, relative imports, import_module calls, and
    marker writes by constant or literal (so an empty result means something)."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import importlib\n"
        "def f():\n"
        "    from megasail.training import loop\n"
        "    importlib.import_module(f'megasail.convert.{x}')\n"
        "    open(os.path.join(root, MARKER), 'w')\n"
        "    open(os.path.join(root, 'megasail.json'), 'w')\n"
        "    raise ValueError(f'no {MARKER} here')\n"
    )
    modules = [m for _, m in imports_of(str(sample))]
    assert "megasail.training.loop" in modules and "megasail.convert." in modules
    uses = checkpoint_file_uses(str(sample))
    assert len(uses) == 2 and ":5: uses MARKER" in uses[0] and ":6: literal" in uses[1]
