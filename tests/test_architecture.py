"""The package's layering: data flows one way (model -> trace -> BayesNet -> invert -> compile -> guide -> training)
and no module imports one above it. docs/ARCHITECTURE.md draws the same layers."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pyro_struct"

# Layers, lowest first. A module may import modules of lower layers only; inside a layer, the
# modules listed earlier (a package's own parts) may be imported by the ones listed later.
LAYERS = [
    ["errors", "threads", "dag", "io", "models.circuit", "models.deconvolution", "models.hierarchical",
     "models.hmm", "models.linear_gaussian", "models.state_space", "models"],
    ["graph"],
    ["covariates"],
    ["trace.provenance", "trace.sparsity", "trace.probe", "trace.assemble", "trace", "trace.template"],
    ["inversion"],
    ["plates", "chains"],
    ["masks"],
    ["nn"],
    ["flows.base", "flows.transforms", "flows.straf", "flows.grf", "flows.cnf", "flows.plated", "flows.nested", "flows.chain",
     "flows"],
    ["decoders"],
    ["layout", "chain_layout"],
    ["compile"],
    ["amortizer"],
    ["inspect"],
    ["simulation"],
    ["objectives", "likelihood"],
    ["training.batches", "training.schedule", "training.guard", "training.checkpoint", "training.loop",
     "training.data", "training.distributed", "training.fit", "training"],
    ["diagnostics.checks", "diagnostics.psis", "diagnostics.refinement", "diagnostics.sbc", "diagnostics.after_fit", "diagnostics"],
    ["evaluate"],
    ["structure_learning", "density"],
    ["guide"],
    ["cli.base", "cli.commands", "cli", "cli.__main__"],
]
RANK = {name: (layer, pos) for layer, names in enumerate(LAYERS) for pos, name in enumerate(names)}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py") if _module_name(p)}


def _imports(name: str, path: Path) -> set[str]:
    """Every pyro_struct module ``name`` imports, at module level or inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("pyro_struct"):
                target = node.module[len("pyro_struct"):].lstrip(".")
            else:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}" if target else alias.name
                found.add(sub if sub in RANK else target)
        elif isinstance(node, ast.Import):
            found.update(a.name[len("pyro_struct."):] for a in node.names if a.name.startswith("pyro_struct."))
    return {t for t in found if t}


def test_every_module_has_a_layer():
    missing = sorted(set(_modules()) - set(RANK))
    assert not missing, f"modules without a layer in tests/test_architecture.py and docs/ARCHITECTURE.md: {missing}"


@pytest.mark.parametrize("name", sorted(_modules()))
def test_imports_point_down(name):
    path = _modules()[name]
    for target in _imports(name, path):
        if target == name or target not in RANK:
            continue
        assert RANK[target] < RANK[name], f"{name} imports {target}, which sits at or above it in the pipeline"


def test_the_layer_table_catches_an_upward_import(tmp_path):
    """The check itself: an upward import is found (guards against a parser that finds nothing)."""
    fake = tmp_path / "flows" / "straf.py"
    fake.parent.mkdir()
    fake.write_text("from ..guide import StructuredGuide\nimport pyro_struct.training\n")
    global PACKAGE
    old, PACKAGE = PACKAGE, tmp_path
    try:
        assert _imports("flows.straf", fake) == {"guide", "training"}
    finally:
        PACKAGE = old


def test_architecture_doc_lists_every_module():
    doc = (PACKAGE.parent / "docs" / "ARCHITECTURE.md").read_text()
    missing = [name for name in _modules() if f"`{name}`" not in doc]
    assert not missing, f"docs/ARCHITECTURE.md does not describe {missing}"
