"""The house: every product file imports only files below it in the README's Files table (so no import circle)."""
import ast
import os
import re

from conftest import REPO

PRODUCT = ["main.py", "utils.py", "trainer.py", "diffusion.py", "unet.py"] + sorted(
    os.path.join("kit", f) for f in os.listdir(os.path.join(REPO, "kit")) if f.endswith(".py") and f != "__init__.py")


def module_name(path):
    return path[:-3].replace(os.sep, ".").replace("/", ".")


def kit_imports(path):
    """The kit's own modules that a file imports (from its syntax tree)."""
    names = {module_name(p) for p in PRODUCT}
    found = set()
    for node in ast.walk(ast.parse(open(os.path.join(REPO, path)).read())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}  # from kit import data
    return found & names


def readme_order():
    text = open(os.path.join(REPO, "README.md")).read()
    table = text[text.index("## Files"):text.index("## Data")]
    files = re.findall(r"^\| `([\w/]+\.py)` \|", table, re.M)
    graded_tests = ("test_diffusion.py", "grading.py")  # the graded checks and their machinery: no product file
    return [module_name(f) for f in files if f not in graded_tests]


def test_every_product_file_is_in_the_readme_files_table():
    assert sorted(readme_order()) == sorted(module_name(p) for p in PRODUCT)


def test_imports_only_go_down_the_files_table():
    order = readme_order()
    upward = [f"{module_name(p)} imports {imported}" for p in PRODUCT for imported in kit_imports(p)
              if order.index(imported) <= order.index(module_name(p))]
    assert not upward, "imports that go up (or sideways) the README's Files table: " + "; ".join(upward)


def test_the_check_sees_imports():
    # the parser finds real edges, so an empty result above means something
    assert {"trainer", "kit.data", "kit.errors"} <= kit_imports("utils.py")
    assert "diffusion" in kit_imports("trainer.py")
