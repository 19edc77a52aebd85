"""Bytes a compiled step reads and writes, from XLA's optimized HLO: a count free of timing
noise, to set a chain beside its hand-fused reference.

Each top-level kernel of the step (a fusion, a custom call, a copy, a concatenation...)
reads its operands and writes its result; a value passed from one kernel to another goes
through memory, so this is the traffic XLA's program asks for, before caches. Two bounds:
a fusion reads of an operand that it only slices or gathers from what those slices and
gathers take (a gather of a leaf's factors out of a long vector reads that leaf's factors,
not the vector); and a loop fusion with no reduction in it (element-wise work, slices,
gathers, broadcasts) reads, for each use of an operand inside it, at most one element per
element it writes. Tuples, bitcasts and parameters move nothing. A ``while`` loop is
counted as its body and condition times the trip count XLA knows for it
(``known_trip_count``), or once where it knows none (in the steps measured here there is
one loop, in ``clip_by_value``'s non-finite branch, and its count is known).

A conditional runs one branch. Its branches are counted apart, and the step's *ordinary*
traffic takes, at each conditional, its cheapest branch: the branch an ordinary step takes
where the dearer one runs on rare steps only (optclip's overflow rescues, a clamp flag's
non-finite branch, Optax's ``apply_if_finite`` skip), except that with ``guard=True`` the
conditional that holds the most traffic (a guard's step) takes its dearest branch. It is
not always the step a user runs: ``clip_by_value`` takes the norm after its clamp in a
conditional whose dearer branch runs on every step that clamps (about 1 tree more), so its
ordinary count is that of a step that clamps nothing.

    python -m bench.traffic [--trees resnet50,gpt2] [--only agc,agc_fused,...]

runs ``bench.gn_probe``'s chains (train steps with adam, donated) and prints each one's
ordinary traffic in trees (bytes over the tree's float32 bytes), and its largest kernels.
On XLA:CPU adam alone moves 10 trees: its two moments each read with the gradient and
written (3 + 3), then the weights read with both new moments and written (4).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import re
from dataclasses import dataclass, field

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f16": 2, "bf16": 2, "s16": 2, "u16": 2,
                "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8,
                "c128": 16}
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([0-9,]*)\]")
_INSTR = re.compile(r"\s*(?:ROOT )?%(\S+) = (.*?) ([a-z][\w-]*)\((.*)$")
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
         "partition-id", "replica-id", "iota"}
_NOT_ELEMENTWISE = ("reduce(", "reduce-window(", "dot(", "convolution(", "sort(", "scatter(",
                    "custom-call(", "fft(", "while(")


def arrays(shape: str) -> list[tuple[int, int]]:
    """(elements, bytes per element) of each array in an HLO shape (a tuple has several)."""
    out = []
    for dtype, dims in _ARRAY.findall(shape):
        n = 1
        for d in dims.split(","):
            if d:
                n *= int(d)
        out.append((n, _DTYPE_BYTES[dtype]))
    return out


def nbytes(shape: str) -> int:
    return sum(n * b for n, b in arrays(shape))


def _operands(rest: str) -> list[str]:
    depth, text = 1, []
    for ch in rest:
        depth += (ch == "(") - (ch == ")")
        if depth == 0:
            break
        text.append(ch)
    return re.findall(r"%([\w.\-]+)", "".join(text))


def parse(hlo: str) -> dict[str, list[tuple[str, str, str, str]]]:
    """Computations of an HLO module's text: name ("ENTRY" for the entry) to its
    instructions, each (name, shape, opcode, the rest of the line)."""
    comps: dict[str, list] = {}
    cur = None
    for line in hlo.split("\n"):
        head = re.match(r"^(ENTRY )?%(\S+) ", line)
        if head and line.rstrip().endswith("{"):
            cur = "ENTRY" if head.group(1) else head.group(2)
            comps[cur] = []
        elif line.startswith("}"):
            cur = None
        elif cur is not None and (m := _INSTR.match(line)):
            comps[cur].append(m.groups())
    return comps


@dataclass
class Cost:
    """One computation's traffic outside its conditionals, its kernels by kind, and each
    conditional's branches (their own ``Cost``)."""
    bytes: int = 0
    kernels: dict = field(default_factory=lambda: collections.defaultdict(lambda: [0, 0, 0]))
    conds: list = field(default_factory=list)  # (name, [Cost per branch])

    def ordinary(self, guard: bool = False) -> int:
        """The traffic of an ordinary step: at each conditional its cheapest branch, but with
        ``guard`` the top-level conditional holding the most traffic takes its dearest."""
        chosen = [min(b, key=lambda c: c.ordinary()) for _, b in self.conds]
        total = self.bytes + sum(c.ordinary() for c in chosen)
        if guard and self.conds:
            i = max(range(len(self.conds)),
                    key=lambda k: max(c.ordinary() for c in self.conds[k][1]))
            step = max(self.conds[i][1], key=lambda c: c.ordinary())
            total += step.ordinary() - chosen[i].ordinary()
        return total


def _branches(rest: str) -> list[str]:
    if m := re.search(r"branch_computations=\{([^}]*)\}", rest):
        return [b.strip().lstrip("%") for b in m.group(1).split(",")]
    return [re.search(name + r"=%([\w.\-]+)", rest).group(1)
            for name in ("true_computation", "false_computation")]


def _calls_text(comps, name: str) -> str:
    """The text of a computation and of those it calls (a fusion's reducers)."""
    lines = comps.get(name, [])
    text = "\n".join(f"{op}({rest}" for _, _, op, rest in lines)
    for called in set(re.findall(r"(?:to_apply|calls)=%([\w.\-]+)", text)) - {name}:
        text += "\n" + _calls_text(comps, called)
    return text


def _parameter_numbers(instrs) -> dict[str, int]:
    """A fused computation's parameters: name to parameter number."""
    return {n: int(re.match(r"(\d+)", rest).group(1))
            for n, _, op, rest in instrs if op == "parameter"}


def _parameter_uses(instrs) -> dict[int, int]:
    """Per parameter number of a fused computation, how many of its instructions use it."""
    number = _parameter_numbers(instrs)
    uses: dict[int, int] = collections.Counter()
    for _, _, op, rest in instrs:
        if op != "parameter":
            for o in _operands(rest):
                if o in number:
                    uses[number[o]] += 1
    return uses


def _sliced_reads(instrs) -> dict[int, int]:
    """Per parameter number of a fused computation that it only slices, gathers from or
    dynamically slices: the bytes those take of it."""
    number = _parameter_numbers(instrs)
    taken: dict[int, int] = {}
    other: set[int] = set()
    for _, shape, op, rest in instrs:
        if op == "parameter":
            continue
        for pos, o in enumerate(_operands(rest)):
            if o not in number:
                continue
            if op in ("slice", "dynamic-slice", "gather") and pos == 0:
                taken[number[o]] = taken.get(number[o], 0) + nbytes(shape)
            else:
                other.add(number[o])
    return {k: v for k, v in taken.items() if k not in other}


def cost(comps, name: str = "ENTRY") -> Cost:
    """The traffic of computation ``name`` of ``parse``'s result."""
    shapes = {n: s for n, s, _, _ in comps[name]}
    out = Cost()
    for n, shape, op, rest in comps[name]:
        if op in _FREE:
            continue
        if op == "while":
            body = re.search(r"body=%([\w.\-]+)", rest).group(1)
            cond = re.search(r"condition=%([\w.\-]+)", rest).group(1)
            trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
            loop = ((cost(comps, body).ordinary() + cost(comps, cond).ordinary())
                    * (int(trips.group(1)) if trips else 1))
            k = out.kernels[("while", "known trips" if trips else "one pass (trips unknown)", "")]
            k[0] += 1
            k[1] += loop
            out.bytes += loop
            continue
        if op == "conditional":
            out.conds.append((n, [cost(comps, b) for b in _branches(rest)]))
            continue
        ops = _operands(rest)
        written = arrays(shape)
        read = [nbytes(shapes.get(o, "")) for o in ops]
        if op == "fusion":
            called = re.search(r"calls=%([\w.\-]+)", rest).group(1)
            sliced = _sliced_reads(comps[called])
            read = [min(r, sliced.get(i, r)) for i, r in enumerate(read)]
        if op == "fusion" and "kind=kLoop" in rest:
            if not any(k in _calls_text(comps, called) for k in _NOT_ELEMENTWISE):
                most = max((e for e, _ in written), default=0)
                uses = _parameter_uses(comps[called])
                read = [min(r, uses.get(i, 1) * most
                            * max((b for _, b in arrays(shapes.get(o, ""))), default=0))
                        for i, (r, o) in enumerate(zip(read, ops, strict=True))]
        kind = m.group(1) if (m := re.search(r"kind=(\w+)", rest)) else op
        where = m.group(1) if (m := re.search(r'op_name="([^"]*)"', rest)) else ""
        k = out.kernels[(op, kind, re.sub(r"\d+", "#", where)[:80])]
        k[0] += 1
        k[1] += sum(read)
        k[2] += sum(e * b for e, b in written)
        out.bytes += sum(read) + sum(e * b for e, b in written)
    return out


def step_cost(compiled) -> Cost:
    """``cost`` of a compiled JAX computation's optimized HLO."""
    return cost(parse(compiled.as_text()))


GUARDS = ("skip_nonfinite", "apply_if_finite")


def main() -> None:
    import jax  # noqa: PLC0415

    from bench import gn_probe, trees  # noqa: PLC0415
    from bench.run import temp_bytes, train_step  # noqa: PLC0415

    ap = argparse.ArgumentParser()
    ap.add_argument("--trees", default="resnet50,gpt2")
    ap.add_argument("--only", default="adam,fused,gn,optax_clip,value_fused,value,agc_fused,"
                                      "optax_agc,agc,clippy_fused,clippy,apply_if_finite,"
                                      "skip_nonfinite")
    ap.add_argument("--kernels", type=float, default=0.02,
                    help="list the kinds of kernel that move at least this many trees")
    args = ap.parse_args()
    print("device", jax.devices()[0], "jax", jax.__version__, flush=True)
    variants = gn_probe.variants()
    for tname in args.trees.split(","):
        p_s = trees.abstract_tree(trees.TREES[tname]())
        size = trees.tree_bytes(p_s)
        for name in args.only.split(","):
            make, mode = variants[name]
            tx = make()
            s_s = jax.eval_shape(tx.init, p_s)
            with gn_probe.MODES[mode]() if mode else contextlib.nullcontext():
                compiled = train_step(tx).lower(p_s, s_s, p_s).compile()
            c = step_cost(compiled)
            guard = name in GUARDS
            print(f"{tname} {name}: ordinary step {c.ordinary(guard) / size:.3f} trees, "
                  f"outside conditionals {c.bytes / size:.3f}, temp "
                  f"{temp_bytes(compiled) / size:.4f}", flush=True)
            for cname, branches in c.conds:
                print(f"    conditional {cname}: branches "
                      + ", ".join(f"{b.ordinary() / size:.3f}" for b in branches), flush=True)
            for (op, kind, where), (count, r, w) in sorted(
                    c.kernels.items(), key=lambda kv: -(kv[1][1] + kv[1][2])):
                if (r + w) / size < args.kernels:
                    break
                print(f"    {count:5d} {op} {kind}: read {r / size:.3f}, write {w / size:.3f}"
                      f"  {where}", flush=True)


if __name__ == "__main__":
    main()
