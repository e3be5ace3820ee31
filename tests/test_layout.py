"""The code's shape: imports run down the floors of docs/design.md, no library signature restates
a default of `sae_jax/config.py`, and the project's prose speaks only of itself."""

import ast
import importlib
import inspect
import pkgutil
import re

import numpy as np
import pytest
from conftest import REPO

import sae_jax
from sae_jax.config import default_config

# docs/design.md, the floors table: a module imports from its own floor or below
FLOORS = {
    0: ("errors", "config", "hostmem", "hlo_cost"),
    1: ("data", "kernels", "parallel", "model.hooks", "model.tokenizer", "model.torch_worker"),
    2: ("model", "sae", "chips"),
    3: ("harvest", "train", "eval", "runs", "foreign"),
    4: ("export", "harvest_check"),
    5: ("cli", "api"),
}


def _floor(module: str) -> int:
    """The floor of `sae_jax.a.b`: the longest entry of FLOORS that names it or a package above it."""
    name = module.removeprefix("sae_jax.")
    best = None
    for floor, entries in FLOORS.items():
        for e in entries:
            if (name == e or name.startswith(e + ".")) and (best is None or len(e) > len(best[1])):
                best = (floor, e)
    assert best is not None, f"{module}: on no floor of docs/design.md (add it to FLOORS there and here)"
    return best[0]


def _modules():
    for f in sorted((REPO / "sae_jax").rglob("*.py")):
        parts = f.relative_to(REPO).with_suffix("").parts
        yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), f


def test_imports_run_down_the_floors():
    """Every `from sae_jax...` import, at module level or inside a function, targets a module on
    the importer's floor or below."""
    up = []
    for module, path in _modules():
        if module == "sae_jax":
            continue
        mine = _floor(module)
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sae_jax"):
                for a in node.names:  # `from sae_jax import parallel` names a module; `from sae_jax.x import f` a name in x
                    sub = f"{node.module}.{a.name}"
                    targets.append(sub if _is_module(sub) else node.module)
            elif isinstance(node, ast.Import):
                targets += [a.name for a in node.names if a.name.startswith("sae_jax")]
            for t in targets:
                if t != "sae_jax" and _floor(t) > mine:
                    up.append(f"{path.relative_to(REPO)}:{node.lineno} ({module}, floor {mine}) imports {t} (floor {_floor(t)})")
    assert not up, "imports running up the floors:\n" + "\n".join(up)


def _is_module(name: str) -> bool:
    return (REPO / (name.replace(".", "/") + ".py")).is_file() or (REPO / name.replace(".", "/") / "__init__.py").is_file()


def test_floors_table_is_the_one_in_the_design_notes():
    """The FLOORS above and docs/design.md's table name the same modules on the same floors."""
    text = (REPO / "docs" / "design.md").read_text()
    rows = dict(re.findall(r"^\| (\d) \| (.+) \|$", text, re.M))
    assert sorted(int(k) for k in rows) == sorted(FLOORS)
    for floor, entries in FLOORS.items():
        named = {m.strip("`").removesuffix("/*").replace("/", ".") for m in re.findall(r"`[^`]+`", rows[str(floor)])}
        for e in entries:
            assert e in named, f"floor {floor}: {e} is not in docs/design.md's row {rows[str(floor)]!r}"


# The config section a module's functions take their settings from: a parameter named like one of
# that section's fields (or like its alias below) must not restate the field's default.
SECTIONS = {
    "sae_jax.data.text": "data",
    "sae_jax.data.writer": "harvest",
    "sae_jax.data.saelens_cache": "harvest",
    "sae_jax.harvest": "harvest",
    "sae_jax.model": "model",
    "sae_jax.train": "train",
    "sae_jax.sae": "train",
    "sae_jax.kernels": "train",
}
ALIASES = {  # a library parameter -> the train setting it carries
    "encoder_scale": "encoder_init_scale",
    "init_threshold": "jumprelu_init_threshold",
    "block": "encoder_block",
    "encoder_dtype": "encoder_dtype",
    "bandwidth": "jumprelu_bandwidth",
    "adam": ("adam_b1", "adam_b2", "adam_eps"),
    "bias_lr_scale": "bias_lr_scale",
    "decoder_lr_scale": "decoder_lr_scale",
    "state_dtype": "optimizer_state",
}


def _same(a, b) -> bool:
    try:
        if isinstance(a, type) or isinstance(b, type) or isinstance(a, np.dtype):
            return np.dtype(a) == np.dtype(b)
        return type(a) is type(b) and a == b or (isinstance(a, int | float) and isinstance(b, int | float) and a == b)
    except TypeError:
        return False


def _signatures(mod):
    for name, obj in vars(mod).items():
        if getattr(obj, "__module__", None) != mod.__name__:
            continue
        if inspect.isfunction(obj):
            yield name, obj
        elif inspect.isclass(obj):
            for attr, f in vars(obj).items():
                f = getattr(f, "__func__", f)
                if inspect.isfunction(f):
                    yield f"{name}.{attr}", f


def test_no_library_signature_restates_a_config_default():
    """Walk default_config() and every function and method of the library: a parameter that
    carries a setting (same name, or an alias) has no literal default equal to the setting's;
    it takes the setting, or None for `config.default(...)`. Empty defaults (nothing given) and
    seeds of 0 are not a setting's value."""
    c = default_config()
    found, checked = [], 0
    for info in pkgutil.walk_packages(sae_jax.__path__, "sae_jax."):
        section = next((s for prefix, s in SECTIONS.items() if info.name == prefix or info.name.startswith(prefix + ".")), None)
        if section is None:
            continue
        fields = c[section]
        mod = importlib.import_module(info.name)
        for qual, f in _signatures(mod):
            for p in inspect.signature(f).parameters.values():
                keys = ALIASES.get(p.name, p.name) if section == "train" else p.name
                keys = keys if isinstance(keys, tuple) else (keys,)
                if not all(k in fields for k in keys):
                    continue
                checked += 1  # a parameter carrying a setting
                # None takes the config's default; an empty default ('', (), False, 0) says "none
                # given" (no skip connection, no AuxK selection), not a setting's chosen value
                if p.default is inspect.Parameter.empty or p.default is None or (not p.default and not isinstance(p.default, float)):
                    continue
                want = tuple(fields[k] for k in keys) if len(keys) > 1 else fields[keys[0]]
                if _same(p.default, want):
                    found.append(f"{info.name}.{qual}({p.name}={p.default!r}): restates {section}.{','.join(keys)}")
    assert checked >= 20, f"the walk found {checked} parameters carrying a setting: is SECTIONS still right?"
    assert not found, "\n".join(found)


def test_the_walk_catches_a_restated_default(monkeypatch):
    """The check above fails on a signature that restates a default (a planted one)."""
    from sae_jax.kernels import topk

    def planted(x, encoder_block=4096):
        return x

    planted.__module__ = topk.__name__
    monkeypatch.setattr(topk, "planted", planted, raising=False)
    with pytest.raises(AssertionError, match=r"planted\(encoder_block=4096\): restates train.encoder_block"):
        test_no_library_signature_restates_a_config_default()


WORDS = re.compile("|".join((r"\bsess" + r"ions?\b", r"\ble" + r"nt\b", "these mach" + "ines")), re.I)


def test_the_prose_speaks_only_of_the_project():
    """README, docs, code, tests and benchmarks never speak of how they were made (pytest's
    `scope="session"` aside), and the README stays a two-minute read."""
    files = [REPO / "README.md", *(REPO / "docs").glob("*.md")]
    for d in ("sae_jax", "tests", "benchmarks"):
        files += [f for f in (REPO / d).rglob("*") if f.suffix in (".py", ".md", ".cc", ".js", ".html")]
    bad = []
    for f in files:
        for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            if WORDS.search(re.sub(r'scope="sess\w+"', "", line)):
                bad.append(f"{f.relative_to(REPO)}:{n}: {line.strip()[:100]}")
    assert not bad, "\n".join(bad)
    assert len((REPO / "README.md").read_text().splitlines()) <= 250
