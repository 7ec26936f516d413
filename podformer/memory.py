"""What a compiled program's temporaries are: its buffer assignment, read back as the largest buffers
with the op that makes each of them (the compile-only report's memory breakdown).

XLA writes the buffer assignment when asked to dump (``compiler_options={"xla_dump_to": DIR}``,
``COMPILER_OPTIONS`` below): allocations, each holding values at byte offsets, where values whose live
ranges do not overlap share bytes. The temporaries of ``memory_analysis()`` are the preallocated
temporary allocations of the default memory space. Each value is credited with the bytes of its
allocation that no larger value covers, so the credited bytes never count a byte twice, and they add up
to the allocation (less the padding no value touches): the test checks the sum against XLA's figure.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from collections import defaultdict

COMPILER_OPTIONS = {"xla_dump_hlo_as_text": True, "xla_dump_hlo_module_re": "train_step"}


@dataclasses.dataclass(frozen=True)
class Buffer:
    instruction: str  # the HLO instruction that defines the value ('fusion.12', 'while.3{4}')
    shape: str  # 'bf16[80,4,4096,8192]'
    size: int  # the value's bytes
    credited: int  # bytes of the allocation that this value holds and no larger one does
    op: str  # what made it: the JAX op name path of the instruction (its metadata), or '' unknown
    source: str = ""  # file:line of the Python that made it, where the HLO says


_ALLOCATION = re.compile(r"^allocation (\d+): size (\d+), (.*):$")
_VALUE = re.compile(r"^ value: <\d+ (\S+?)(?:\{[\d,]*\})? @\d+> \(size=(\d+),offset=(\d+)\): (.*)$")
_VALUE_INDEX = re.compile(r"^ value: <\d+ (\S+) @\d+>")


def temp_allocations(text: str) -> list[list[tuple[str, int, int, str]]]:
    """The default memory space's preallocated temporary allocations of a buffer-assignment dump, each a
    list of values (instruction, size, offset, shape), and their sizes."""
    out, current = [], None
    for line in text.splitlines():
        m = _ALLOCATION.match(line)
        if m:
            attrs = m.group(3)
            temp = "preallocated-temp" in attrs and "color" not in attrs  # color N: not HBM (VMEM, SMEM)
            current = [] if temp else None
            if temp:
                out.append((int(m.group(2)), current))
            continue
        if not line.startswith(" value:"):
            current = None  # past this allocation's values
            continue
        v = _VALUE.match(line)
        if current is not None and v:
            full = _VALUE_INDEX.match(line)
            shape = re.sub(r"\{[^}]*\}", "", v.group(4)).strip()
            current.append((full.group(1), int(v.group(2)), int(v.group(3)), shape))
    return out


def _credit(size: int, values: list) -> list[tuple[tuple, int]]:
    """Each value with the bytes of its [offset, offset + size) that no larger value already claimed."""
    claimed: list[tuple[int, int]] = []  # disjoint, sorted intervals
    out = []
    for v in sorted(values, key=lambda v: (-v[1], v[2])):
        lo, hi = v[2], min(v[2] + v[1], size)
        free, cursor = 0, lo
        for a, b in claimed:
            if b <= cursor or a >= hi:
                continue
            free += max(0, a - cursor)
            cursor = max(cursor, b)
        free += max(0, hi - cursor)
        out.append((v, free))
        if free:
            claimed = _merge(claimed + [(lo, hi)])
    return out


def _merge(intervals):
    merged = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$")
_COMP = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) [^=]*\{\s*$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_SOURCE = re.compile(r'source_file="([^"]*)" source_line=(\d+)')
_CALLS = re.compile(r"(?:calls|body)=%?([\w.\-]+)")


def op_names(hlo_text: str) -> dict[str, tuple[str, str]]:
    """instruction -> (JAX op name, source file:line) from an HLO module's text; a fusion (or loop)
    without metadata of its own takes its computation's root's."""
    names, calls, roots = {}, {}, {}
    comp = None
    for line in hlo_text.splitlines():
        c = _COMP.match(line)
        if c and " = " not in line:
            comp = c.group(1)
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        name, rest = m.group(1), m.group(2)
        op = _OP_NAME.search(rest)
        src = _SOURCE.search(rest)
        where = f"{os.path.basename(src.group(1))}:{src.group(2)}" if src else ""
        names[name] = (op.group(1) if op else "", where)
        called = _CALLS.search(rest)
        if called:
            calls[name] = called.group(1)
        if line.lstrip().startswith("ROOT") and comp is not None:
            roots[comp] = name
    for name, comp in calls.items():
        seen = 0
        while not names[name][0] and comp in roots and seen < 8:  # nested fusions: follow the roots down
            root = roots[comp]
            names[name] = names.get(root, ("", ""))
            comp, seen = calls.get(root), seen + 1
    return names


def _short(op: str) -> str:
    """'jit(train_step)/jit(main)/transpose(jvp(...))/while/body/dot_general' without the jit() frames."""
    parts = [p for p in op.split("/") if not re.fullmatch(r"jit\([^)]*\)", p)]
    return "/".join(parts)


def breakdown(dump_dir: str, hlo_text: str | None = None) -> list[Buffer]:
    """The temporaries of the train step dumped into ``dump_dir``, largest credited bytes first."""
    files = glob.glob(os.path.join(dump_dir, "*after_optimizations-buffer-assignment.txt"))
    if not files:
        return []
    path = max(files, key=os.path.getsize)  # the train step itself (a dump may hold small helper programs)
    with open(path) as f:
        allocations = temp_allocations(f.read())
    if hlo_text is None:
        hlo_path = path.replace("-buffer-assignment.txt", ".txt")
        hlo_text = open(hlo_path).read() if os.path.exists(hlo_path) else ""
    ops = op_names(hlo_text)
    out = []
    for size, values in allocations:
        for (instr, vsize, _, shape), credited in _credit(size, values):
            if credited:
                op, src = ops.get(re.sub(r"\{.*\}$", "", instr), ("", ""))
                out.append(Buffer(instr, shape, vsize, credited, _short(op), src))
    return sorted(out, key=lambda b: -b.credited)


_PEAK = re.compile(r"^\s*Live ranges at \d+ \(peak\):")
_LIVE = re.compile(r"^\s+(\S+?): (\d+) bytes \(cumulative")


def peak_live(text: str) -> list[tuple[str, int]]:
    """(value, bytes) live at the peak of XLA's heap simulation, from a ``*-live-range.txt`` dump: what
    the program holds at its worst moment, where the buffer assignment lists everything it ever holds."""
    out, inside = [], False
    for line in text.splitlines():
        if _PEAK.match(line):
            inside = True
            continue
        if inside:
            m = _LIVE.match(line)
            if not m:
                break
            out.append((m.group(1), int(m.group(2))))
    return out


def at_peak(dump_dir: str, hlo_text: str, buffers: list[Buffer]) -> list[Buffer]:
    """The temporaries live at the heap peak, largest first, named as in ``breakdown`` (``credited`` is the
    value's whole size: at one moment no two live values share bytes); the arguments are left out."""
    files = glob.glob(os.path.join(dump_dir, "*after_optimizations-live-range.txt"))
    if not files:
        return []
    with open(max(files, key=os.path.getsize)) as f:
        live = peak_live(f.read())
    shapes = {b.instruction: b.shape for b in buffers}
    ops = op_names(hlo_text)
    # The simulation also holds the entry's parameters (the state and the batch: the arguments, not
    # temporaries); a loop's own parameters alias its operands and are not listed as values there.
    arguments = set(re.findall(r"^\s*%?([\w.\-]+) = [^=]*? parameter\(\d+\)", _entry(hlo_text), re.M))
    out = []
    for value, size in live:
        instr = re.sub(r"\{.*\}$", "", value)
        if instr in arguments:
            continue
        op, src = ops.get(instr, ("", ""))
        out.append(Buffer(value, shapes.get(value, shapes.get(instr, "")), size, size, _short(op), src))
    return sorted(out, key=lambda b: -b.size)


def _entry(hlo_text: str) -> str:
    """The ENTRY computation's text."""
    start = hlo_text.find("\nENTRY ")
    if start < 0:
        return ""
    end = hlo_text.find("\n}", start)
    return hlo_text[start : end if end > 0 else None]


def by_op(buffers: list[Buffer]) -> list[tuple[str, int, int]]:
    """(op, credited bytes, number of buffers), largest first: the breakdown grouped by what made it."""
    groups = defaultdict(lambda: [0, 0])
    for b in buffers:
        key = b.op or b.instruction
        groups[key][0] += b.credited
        groups[key][1] += 1
    return sorted(((k, v[0], v[1]) for k, v in groups.items()), key=lambda g: -g[1])
