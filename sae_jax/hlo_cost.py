"""What a compiled step does, counted from its optimized HLO (the text XLA's compiler emits), and a
roofline of it on a GPU.

    cost = step_cost(compiled.as_text())
    print(gpu_roofline(cost, "h100"))

Counted per kernel (a fusion or a library call, what the GPU launches), each multiplied by the
trip counts of the loops around it (`known_trip_count` of each `while`):

- matmuls: 2 x output elements x contracted elements of every `dot` in a GEMM kernel
  (`gemm_fusion_dot`, cuBLAS calls);
- sorts: per `sort`, rows x the compare-exchange steps of a bitonic network over the sorted
  dimension (n/2 x log2(n)(log2(n)+1)/2 per row, n rounded up to a power of two), and the bytes
  one compare-exchange moves (every operand read and written, for both elements);
- HBM: the bytes every other kernel reads and writes (its operands and outputs);
- launches: kernels, loop iterations included.

A kernel belongs to the TopK selection when its op name says so (`top_k`, or the `topk_select`
scope of `kernels.select`). A `conditional` contributes one branch: `paths` holds the cost with the
branch that sorts least taken at the conditional whose branches differ in sorting (the train
step's AuxK `cond`: the main path) and with the branch that sorts most (AuxK live); at every other
conditional the costlier branch.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "bf16": 2,
    "f16": 2,
    "s16": 2,
    "u16": 2,
    "f32": 4,
    "s32": 4,
    "u32": 4,
    "f64": 8,
    "s64": 8,
    "u64": 8,
}
SELECT_NAMES = ("/top_k", "topk_select")
# per GPU: HBM bytes/s, shared-memory bytes/s (the sorts' compare-exchanges run there), dense bf16
# FLOP/s, and the cost of one kernel launch (s), vendor figures and a launch's usual few microseconds
GPUS = {
    "h100": {"hbm": 3.35e12, "smem": 33e12, "flops": 989e12, "launch": 4e-6},
    "h200": {"hbm": 4.8e12, "smem": 33e12, "flops": 989e12, "launch": 4e-6},
}

# instructions outside fusions that launch nothing (views, tuples, constants, control flow)
NOT_KERNELS = {
    "parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all", "opt-barrier", "partition-id",
    "replica-id", "add-dependency", "domain", "while", "conditional", "call", "async-done", "async-update",
    "copy-done", "all-reduce-done", "all-gather-done", "collective-permute-done",
}  # fmt: skip

_SHAPE = re.compile(r"\b(pred|[su](?:8|16|32|64)|bf16|f16|f32|f64)\[([0-9,]*)\]")
_COMP = re.compile(r"^(ENTRY )?%([\w.\-]+) \(.*\) -> .* \{$")
_INSTR = re.compile(r"^\s*(ROOT )?%([\w.\-]+) = (.+?) ([a-z\-]+)\((.*)$")


@dataclass
class Cost:
    flops: float = 0.0  # matmul FLOPs
    sort_ce: float = 0.0  # compare-exchanges of every sort
    sort_bytes: float = 0.0  # bytes those compare-exchanges move (shared memory)
    sort_keys: dict = field(default_factory=dict)  # sorted dimension n -> rows sorted (trip counts included)
    hbm: float = 0.0  # bytes read and written by every other kernel
    select_hbm: float = 0.0  # of which the TopK selection's kernels
    select_ce_bytes: float = 0.0  # the selection's share of sort_bytes
    select_keys: dict = field(default_factory=dict)  # the selection's sorts: n -> rows
    launches: float = 0.0

    def add(self, o: Cost, times: float = 1.0) -> Cost:
        for f in ("flops", "sort_ce", "sort_bytes", "hbm", "select_hbm", "select_ce_bytes", "launches"):
            setattr(self, f, getattr(self, f) + times * getattr(o, f))
        for f in ("sort_keys", "select_keys"):
            mine = getattr(self, f)
            for n, rows in getattr(o, f).items():
                mine[n] = mine.get(n, 0) + times * rows
        return self

    def copy(self) -> Cost:
        return Cost().add(self)


def _shapes(text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(t, tuple(int(d) for d in dims.split(",") if d)) for t, dims in _SHAPE.findall(text)]


def _bytes(shapes) -> int:
    return sum(DTYPE_BYTES[t] * math.prod(dims) for t, dims in shapes)


def _parse(text: str):
    """{computation: [instruction dicts]}, the entry's name, and {instruction name: type text} per computation."""
    comps, entry, cur = {}, None, None
    for line in text.splitlines():
        m = _COMP.match(line)
        if m:
            cur = m.group(2)
            comps[cur] = []
            if m.group(1):
                entry = cur
            continue
        if cur is None:
            continue
        if line.startswith("}"):
            cur = None
            continue
        m = _INSTR.match(line)
        if m:
            _, name, typ, op, rest = m.groups()
            comps[cur].append({"name": name, "type": typ, "op": op, "rest": rest, "line": line})
    return comps, entry


def _attr(rest: str, key: str) -> str | None:
    m = re.search(rf"\b{key}=%?([\w.\-]+)", rest)
    return m.group(1) if m else None


def _operands(rest: str) -> list[str]:
    """The operands of an instruction: names, or `name#i` for element i of a tuple."""
    head = rest.split(")", 1)[0]
    return [n + (f"#{i}" if i else "") for n, i in re.findall(r"%([\w.\-]+)(?:#(\d+))?", head)]


def _type_of(ref: str, types) -> str:
    """The type text of an operand (`name` or `name#i`)."""
    name, _, i = ref.partition("#")
    t = types.get(name, "")
    if not i:
        return t
    shapes = _SHAPE.findall(t)
    j = int(i)
    return f"{shapes[j][0]}[{shapes[j][1]}]" if j < len(shapes) else ""


def _sort_cost(instr, types) -> tuple[int, int, float]:
    """(rows, n, bytes per compare-exchange) of a sort."""
    shapes = _shapes(instr["type"])
    dims = shapes[0][1]
    d = int(re.search(r"dimensions=\{(\d+)\}", instr["rest"]).group(1))
    n = dims[d]
    rows = math.prod(dims) // max(n, 1)
    per_ce = 2 * 2 * sum(DTYPE_BYTES[t] for t, _ in shapes)  # both elements of every operand, read and written
    return rows, n, per_ce


def _ce(n: int) -> float:
    p = 1 << max(0, math.ceil(math.log2(max(n, 1))))
    lg = int(math.log2(p))
    return p / 2 * lg * (lg + 1) / 2


def _dot_flops(instr, types) -> float:
    out = math.prod(_shapes(instr["type"])[0][1])
    ops = _operands(instr["rest"])
    lhs = _shapes(_type_of(ops[0], types))
    cdims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", instr["rest"])
    if not lhs or not cdims:
        return 0.0
    contracted = math.prod(lhs[0][1][int(c)] for c in cdims.group(1).split(",") if c)
    return 2.0 * out * contracted


def _io(instr, types) -> int:
    """Bytes a kernel reads and writes: its operands and outputs, whole."""
    return _bytes(_shapes(instr["type"])) + sum(_bytes(_shapes(_type_of(o, types))) for o in _operands(instr["rest"]))


SLICING = ("dynamic-slice", "slice", "gather")
VIEWS = ("bitcast", "reshape", "get-tuple-element", "copy")
IN_PLACE = ("dynamic-update-slice", "scatter")


def _fusion_io(instr, body: list, types) -> int:
    """Bytes a fusion reads and writes: an operand read only through slices or gathers counts
    what they read; one updated in place (operand 0 of a dynamic-update-slice or scatter inside)
    counts nothing to read, and the update is what is written, not the whole buffer."""
    outer = _operands(instr["rest"])
    local = {i["name"]: i for i in body}
    params = {}
    for i in body:
        if i["op"] == "parameter":
            params[i["name"]] = int(re.match(r"(\d+)", i["rest"]).group(1))
    users: dict[str, list] = {}
    for i in body:
        for pos, o in enumerate(_operands(i["rest"])):
            users.setdefault(o, []).append((i, pos))

    def reached(name: str) -> list:
        """The uses of `name`, looking through views (bitcast, reshape, get-tuple-element)."""
        out = []
        for u, pos in users.get(name, []):
            out += reached(u["name"]) if u["op"] in VIEWS else [(u, pos)]
        return out

    total, in_place_out = 0, 0
    for p, idx in params.items():
        full = _bytes(_shapes(_type_of(outer[idx], types))) if idx < len(outer) else _bytes(_shapes(local[p]["type"]))
        read, whole = 0, not reached(p)
        for u, pos in reached(p):
            if u["op"] in SLICING and pos == 0:
                read += _bytes(_shapes(u["type"]))
            elif u["op"] in IN_PLACE and pos == 0:  # written in place: the update (and its indices) moves, not the buffer
                ops = _operands(u["rest"])
                upd = ops[-1] if u["op"] == "scatter" else ops[1]
                in_place_out += _bytes(_shapes(local[upd]["type"])) if upd in local else 0
            else:
                whole = True
        total += full if whole else read
    root = next((i for i in body if i["line"].lstrip().startswith("ROOT")), None)
    out = _bytes(_shapes(instr["type"]))
    if root is not None and in_place_out and (root["op"] in IN_PLACE or root["op"] == "tuple"):
        out = in_place_out
    return total + out


def _is_select(instr) -> bool:
    m = re.search(r'op_name="([^"]*)"', instr["line"])
    return bool(m) and any(s in m.group(1) for s in SELECT_NAMES)


def step_cost(text: str, kernels: list | None = None) -> dict[str, Cost]:
    """{'main': Cost, 'aux': Cost} of the optimized HLO module `text` (see the module docstring);
    a module without a conditional that sorts differently has 'main' == 'aux'. `kernels`: a list
    to receive (path, computation, kernel, its Cost for one run, the loop trips around it)."""
    comps, entry = _parse(text)
    types = {c: {i["name"]: i["type"] for i in ins} for c, ins in comps.items()}

    def inner(comp: str) -> Cost:
        """What a fused computation holds: its dots and sorts (its HBM is counted at the fusion)."""
        c = Cost()
        for i in comps.get(comp, []):
            if i["op"] == "dot":
                c.flops += _dot_flops(i, types[comp])
            elif i["op"] == "sort":
                rows, n, per_ce = _sort_cost(i, types[comp])
                ce = rows * _ce(n)
                c.sort_ce += ce
                c.sort_bytes += ce * per_ce
                c.sort_keys[n] = c.sort_keys.get(n, 0) + rows
            for key in ("calls", "to_apply"):
                sub = _attr(i["rest"], key)
                if sub and sub in comps and i["op"] in ("fusion", "call"):
                    c.add(inner(sub))
        return c

    def walk(comp: str, mode: str, trips_above: int = 1) -> Cost:
        total = Cost()
        for i in comps.get(comp, []):
            op = i["op"]
            if op == "while":
                m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', i["line"])
                trips = int(m.group(1)) if m else 1
                total.add(walk(_attr(i["rest"], "body"), mode, trips_above * trips), trips)
                total.add(walk(_attr(i["rest"], "condition"), mode, trips_above * trips), trips)
            elif op == "conditional":
                names = re.findall(r"%([\w.\-]+)", (re.search(r"branch_computations=\{([^}]*)\}", i["rest"]) or [None, ""])[1])
                names = names or [_attr(i["rest"], "true_computation"), _attr(i["rest"], "false_computation")]
                branches = [walk(b, mode, trips_above) for b in names if b]
                if len({round(b.sort_ce) for b in branches}) > 1:  # the AuxK cond: which path this is
                    pick = (min if mode == "main" else max)(branches, key=lambda b: b.sort_ce)
                else:
                    pick = max(branches, key=lambda b: b.flops + b.hbm + b.sort_bytes)
                total.add(pick)
            elif op == "call":
                total.add(walk(_attr(i["rest"], "to_apply"), mode, trips_above))
            elif op not in NOT_KERNELS:
                body = _attr(i["rest"], "calls")
                if op == "async-start" and body:  # an async wrapper: the fusion it runs
                    wrapped = next((w for w in comps.get(body, []) if w["op"] == "fusion"), None)
                    i, comp_types, body = (wrapped, types[body], _attr(wrapped["rest"], "calls")) if wrapped else (i, types[comp], None)
                else:
                    comp_types = types[comp]
                k = inner(body) if body else Cost()
                if op == "sort":
                    rows, n, per_ce = _sort_cost(i, comp_types)
                    k.sort_ce, k.sort_bytes, k.sort_keys = rows * _ce(n), rows * _ce(n) * per_ce, {n: rows}
                if (op == "dot" or (op == "custom-call" and "gemm" in i["rest"])) and not k.flops:  # a dot or cuBLAS call outside fusions
                    k.flops = _dot_flops(i, comp_types)
                io = _fusion_io(i, comps.get(body, []), comp_types) if body else _io(i, comp_types)
                if not k.flops and not k.sort_ce:
                    k.hbm = io
                sel = _is_select(i)
                if sel:
                    k.select_hbm = k.hbm
                    k.select_ce_bytes = k.sort_bytes
                    k.select_keys = dict(k.sort_keys)
                k.launches = 1
                if kernels is not None:
                    kernels.append((mode, comp, i["name"], k, trips_above))
                total.add(k)
        return total

    return {"main": walk(entry, "main"), "aux": walk(entry, "aux")}


def gpu_roofline(cost: dict[str, Cost], gpu: str, rows: int | None = None) -> dict:
    """Predicted times (ms) on `gpu` (`GPUS`): the matmuls at peak, the selection (its sorts on
    shared-memory bandwidth, its other kernels on HBM), everything else on HBM, and the launches;
    for the main path and the AuxK path. `rows`: the rows one device selects over (batch rows x
    bank members), to state the keys the selection sorts per row."""
    g = GPUS[gpu]
    out = {"gpu": gpu}
    for path, c in cost.items():
        matmul = c.flops / g["flops"]
        select = c.select_ce_bytes / g["smem"] + c.select_hbm / g["hbm"]
        other = (c.sort_bytes - c.select_ce_bytes) / g["smem"] + (c.hbm - c.select_hbm) / g["hbm"]
        launch = c.launches * g["launch"]
        out[path] = {
            "matmul_ms": 1e3 * matmul,
            "select_ms": 1e3 * select,
            "other_ms": 1e3 * other,
            "launch_ms": 1e3 * launch,
            "step_ms": 1e3 * (matmul + select + other + launch),
            "select_over_matmul": select / matmul if matmul else float("nan"),
            "select_sorted_per_row": sum(n * r for n, r in c.select_keys.items()) / rows if rows else None,
            "sorts": {str(n): r for n, r in sorted(c.sort_keys.items())},
            "launches": c.launches,
            "matmul_tflop": c.flops / 1e12,
        }
    m, a = out.get("main"), out.get("aux")
    if m and a:
        out["aux_select_over_main_step"] = (a["select_ms"] - m["select_ms"]) / m["step_ms"] if m["step_ms"] else float("nan")
    return out
