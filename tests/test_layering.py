"""The library's import structure: layers that import only downward, no circles, no function-local imports
of the library (which would hide a circle), and no import of the app (``train``) from the library.

Bottom to top: the node protocol (and the factored product the variants share); trees and shared values; the
spec; the variant and recipe registries; the quantized node with its code tables; ops, quantization, ``adapt``
and the other tree transforms; the variants, one module each (node, builder, settings, Optax pieces, recipe);
their import list, LoftQ and diagnostics; models; Hugging Face interop; the package's re-exports."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "lorax_variants"

LAYERS = [  # module name patterns (relative to lorax_variants), bottom first; a module may import its layer and below
    {"nodes.base", "nodes", "nodes.factored"},
    {"tree", "runtime", "inits", "shared"},
    {"spec"},
    {"registry", "recipes", "codec"},
    {"nodes.quantized"},
    {"ops", "quant", "adapt", "per_call", "routing", "sharding", "stats", "optim", "optim.*", "objectives"},
    {"variants.*"},  # one module per variant; a variant may build on another (LoRA's node)
    {"variants", "diagnostics"},
    {"models", "models.*"},
    {"hf", "hf.*", "harness"},  # harness: lm-evaluation-harness over the models (imports lm_eval)
    {""},  # lorax_variants/__init__.py
]


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        rel = f.relative_to(PKG).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _rank(name: str) -> int:
    for i, layer in enumerate(LAYERS):
        for pat in layer:
            if name == pat or (pat.endswith(".*") and name.startswith(pat[:-1])):
                return i
    raise AssertionError(f"lorax_variants.{name} is in no layer of tests/test_layering.py: place it")


def _imports(path: pathlib.Path, modules: dict[str, pathlib.Path]):
    """(target module, line, inside a function) for every import of the library or the app in ``path``."""
    tree = ast.parse(path.read_text())
    type_checking = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_checking.update(id(n) for n in ast.walk(node))
    funcs = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            funcs.update(id(n) for n in ast.walk(node) if n is not node)
    for node in ast.walk(tree):
        if id(node) in type_checking:
            continue
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            prefix = node.module[len("lorax_variants"):].lstrip(".")
            # ``from pkg import mod`` imports the module; ``from mod import name`` imports mod
            names = [f"{node.module}.{a.name}" if f"{prefix}.{a.name}".lstrip(".") in modules else node.module
                     for a in node.names]
        for full in dict.fromkeys(names):
            if full == "train" or full.startswith("train."):
                yield "train", node.lineno, id(node) in funcs
            if not full.startswith("lorax_variants"):
                continue
            rel = full[len("lorax_variants"):].lstrip(".")
            if rel in modules:
                yield rel, node.lineno, id(node) in funcs


def _graph():
    modules = _modules()
    return modules, {m: list(_imports(f, modules)) for m, f in modules.items()}


def test_the_library_never_imports_the_app():
    _, graph = _graph()
    bad = [(m, line) for m, edges in graph.items() for t, line, _ in edges if t == "train"]
    assert not bad, f"lorax_variants imports train at {bad}"


def test_no_function_local_imports_of_the_library():
    _, graph = _graph()
    local = [(f"lorax_variants/{m.replace('.', '/')}", line, t) for m, edges in graph.items()
             for t, line, inside in edges if inside]
    assert not local, f"imports inside functions (move them to the top; a circle they hide must be cut): {local}"


def test_imports_point_down_the_layers():
    _, graph = _graph()
    up = [(m, line, t) for m, edges in graph.items() for t, line, _ in edges
          if t != "train" and _rank(t) > _rank(m)]
    assert not up, "imports that point up the layers (module, line, imported): " + repr(up)


def test_no_import_circles():
    _, graph = _graph()
    edges = {m: sorted({t for t, _, _ in e if t not in ("train", m)}) for m, e in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in edges.get(m, []):
            if t == "":
                continue  # the package's __init__ re-exports everything; no module imports it
            if state.get(t) == 1:
                circles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not circles, f"import circles: {circles}"


def test_every_public_name_has_a_docstring():
    """Every class and function a library module exports (its ``__all__``) says what it is."""
    import importlib
    import inspect

    missing = []
    for name in sorted(_modules()):
        mod = importlib.import_module("lorax_variants" + ("." + name if name else ""))
        for public in getattr(mod, "__all__", []):
            obj = getattr(mod, public)
            doc = (obj.__doc__ or "").strip() if inspect.isclass(obj) or inspect.isfunction(obj) else "x"
            if inspect.isclass(obj) and doc.startswith(f"{obj.__name__}("):
                doc = ""  # the signature a dataclass writes when its class has no docstring
            if not doc:
                missing.append(f"{mod.__name__}.{public}")
            if inspect.isclass(obj) and obj.__module__ == mod.__name__:
                for attr, member in vars(obj).items():
                    if not attr.startswith("_") and inspect.isfunction(member) and not (member.__doc__ or "").strip():
                        missing.append(f"{mod.__name__}.{public}.{attr}")
    assert not missing, f"{len(missing)} public names without a docstring: {sorted(set(missing))}"


# Modules outside variants/ that still name variants, each with why (to shrink, never to grow).
NAMES_VARIANTS: dict[str, str] = {}  # none: PEFT formats are codecs in the variants' modules, trees of many
# adapters are read through the node protocol (``names``, ``as_one``)


def _variant_identifiers() -> set[str]:
    import lorax_variants as lv
    from lorax_variants.recipes import RECIPES

    from lorax_variants.recipes import INITS

    names = {n for n in RECIPES if n not in ("none", "lora")} | set(lv.variant_names()) - {"lora"}
    # the inits a variant's module registers (PiSSA, OLoRA, LoRA-GA, EVA, LoftQ); the random ones (kaiming,
    # gaussian: lorax_variants.inits) are the core's
    names |= set(INITS) - {"kaiming", "gaussian"}
    classes = {n for n in lv.variants.EXPORTS if n[:1].isupper()}
    return names | classes


def test_no_module_outside_variants_names_a_variant():
    """A variant's name (as a string) or one of its classes appears in its own module only (and in the
    modules listed in NAMES_VARIANTS); a module of the core finds variants through the registries and the
    node protocol."""
    wanted = _variant_identifiers()
    found = {}
    for name, path in _modules().items():
        if name == "variants" or name.startswith("variants.") or name == "":
            continue
        tree = ast.parse(path.read_text())
        hits = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in wanted:
                hits.add(node.value)
            elif isinstance(node, ast.Name) and node.id in wanted:
                hits.add(node.id)
            elif isinstance(node, ast.Attribute) and node.attr in wanted:
                hits.add(node.attr)
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lorax_variants.variants."):
                hits.add(node.module)
        if hits and name not in NAMES_VARIANTS:
            found[name] = sorted(hits)
    assert not found, f"modules outside variants/ that name a variant: {found}"
    stale = [m for m in NAMES_VARIANTS if m not in _modules()]
    assert not stale, f"NAMES_VARIANTS lists modules that no longer exist: {stale}"


# The app's modules that name variants, with why.
APP_NAMES_VARIANTS: dict[str, str] = {}  # none: the report draws the figure kinds recipes declare


def test_no_module_of_the_app_names_a_variant():
    """The app reads variants through the recipes (settings sections, hooks); the exceptions are listed."""
    wanted = _variant_identifiers()
    found = {}
    for path in sorted((ROOT / "train").glob("*.py")):
        if path.stem in APP_NAMES_VARIANTS or path.stem.startswith("demo"):
            continue
        hits = {n.value for n in ast.walk(ast.parse(path.read_text()))
                if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in wanted}
        hits |= {n.attr for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Attribute) and n.attr in wanted}
        if hits:
            found[path.stem] = sorted(hits)
    assert not found, f"app modules that name a variant: {found}"
