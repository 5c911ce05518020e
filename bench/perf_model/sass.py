# SPDX-License-Identifier: Apache-2.0
"""SASS reading: one kernel's instructions from `cuobjdump -sass`, its control-flow graph, its
natural loops, and the instruction mix of the main loop (the innermost loop that holds the
tensor-core instructions, or the FMAs of a kernel without them).

Only what the performance model needs: no register dataflow, no latencies."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set, Tuple

import triton

TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"

_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)")
_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_TARGET = re.compile(r"\b0x([0-9a-f]+)\b")


@dataclass
class Instruction:
    address: int
    predicate: str  # "@P0", "@!P1", "" (always)
    opcode: str     # with modifiers: "HMMA.16816.F32", "LDGSTS.E.BYPASS.128"
    operands: str

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]

    @property
    def never(self) -> bool:
        return self.predicate == "@!PT"  # an encoding placeholder, never executed


def disassemble(cubin: Path) -> Dict[str, List[Instruction]]:
    """Kernel name -> its instructions, from cuobjdump -sass."""
    text = subprocess.run([str(TOOLS / "cuobjdump"), "-sass", str(cubin)], check=True,
                          capture_output=True, text=True).stdout
    return parse_sass(text)


def parse_sass(text: str) -> Dict[str, List[Instruction]]:
    kernels: Dict[str, List[Instruction]] = {}
    current: Optional[List[Instruction]] = None
    for line in text.splitlines():
        found = _FUNCTION.match(line)
        if found:
            current = kernels.setdefault(found.group(1), [])
            continue
        found = _LINE.match(line)
        if found is None or current is None:
            continue
        body = found.group(2).strip()
        predicate = ""
        if body.startswith("@"):
            predicate, body = body.split(None, 1)
        opcode, _, operands = body.partition(" ")
        current.append(Instruction(int(found.group(1), 16), predicate, opcode, operands.strip()))
    return kernels


# ---------------------------------------------------------------------------------------------
# control flow
# ---------------------------------------------------------------------------------------------

_ENDS_BLOCK = {"BRA", "EXIT", "RET", "BRX", "JMP", "JMX"}


@dataclass
class Block:
    start: int  # index of its first instruction
    end: int    # one past its last
    successors: List[int] = field(default_factory=list)  # block indices


def blocks(code: Sequence[Instruction]) -> List[Block]:
    """Basic blocks with their successor edges. A predicated branch or exit falls through too;
    an unconditional one does not. Indirect jumps (BRX/JMX) get no successors."""
    index_of = {ins.address: i for i, ins in enumerate(code)}
    leaders = {0}
    for i, ins in enumerate(code):
        if ins.base in _ENDS_BLOCK:
            leaders.add(i + 1)
            if ins.base in ("BRA", "JMP"):
                target = _TARGET.search(ins.operands)
                if target and int(target.group(1), 16) in index_of:
                    leaders.add(index_of[int(target.group(1), 16)])
    starts = sorted(s for s in leaders if s < len(code))
    result = [Block(s, e) for s, e in zip(starts, starts[1:] + [len(code)])]
    block_of = {b.start: n for n, b in enumerate(result)}
    for n, b in enumerate(result):
        last = code[b.end - 1]
        conditional = last.predicate not in ("", "@PT")
        if last.base in ("BRA", "JMP"):
            target = _TARGET.search(last.operands)
            if target and int(target.group(1), 16) in index_of:
                b.successors.append(block_of[index_of[int(target.group(1), 16)]])
        if (last.base not in _ENDS_BLOCK or conditional) and n + 1 < len(result):
            b.successors.append(n + 1)
    return result


@dataclass
class Loop:
    header: int       # block index
    body: Set[int]    # block indices, header included
    parent: Optional["Loop"] = None

    def depth(self) -> int:
        return 0 if self.parent is None else 1 + self.parent.depth()


def natural_loops(graph: List[Block]) -> List[Loop]:
    """Loops of the CFG: each retreating edge u -> h of a depth-first search from the entry
    (a back edge in the reducible graphs compilers emit) gives the blocks that reach u without
    passing h; back edges to one header make one loop. Nesting by inclusion."""
    predecessors: Dict[int, List[int]] = {n: [] for n in range(len(graph))}
    for n, b in enumerate(graph):
        for s in b.successors:
            predecessors[s].append(n)
    back_edges: List[Tuple[int, int]] = []
    state = {}  # 1: on the stack, 2: done
    stack = [(0, iter(graph[0].successors))] if graph else []
    state[0] = 1
    while stack:
        node, successors = stack[-1]
        nxt = next(successors, None)
        if nxt is None:
            state[node] = 2
            stack.pop()
        elif state.get(nxt) == 1:
            back_edges.append((node, nxt))
        elif nxt not in state:
            state[nxt] = 1
            stack.append((nxt, iter(graph[nxt].successors)))
    bodies: Dict[int, Set[int]] = {}
    for tail, header in back_edges:
        body = bodies.setdefault(header, {header})
        work = [tail]
        while work:
            n = work.pop()
            if n not in body:
                body.add(n)
                work.extend(predecessors[n])
    loops = [Loop(h, b) for h, b in bodies.items()]
    for loop in loops:  # parent: the smallest other loop that contains it
        outer = [o for o in loops if o is not loop and loop.body < o.body]
        loop.parent = min(outer, key=lambda o: len(o.body)) if outer else None
    return loops


# ---------------------------------------------------------------------------------------------
# instruction mix
# ---------------------------------------------------------------------------------------------

TENSOR_CORE = ("HMMA", "HGMMA", "IMMA", "WGMMA")
_CATEGORIES = (  # first match wins; order matters
    ("tensor", lambda op: op.split(".")[0] in TENSOR_CORE),
    ("ldsm", lambda op: op.startswith("LDSM")),
    ("lds", lambda op: op.split(".")[0] == "LDS"),
    ("sts", lambda op: op.split(".")[0] == "STS"),
    ("cp_async", lambda op: op.startswith("LDGSTS")),
    ("tma", lambda op: op.startswith("UTMALDG") or op.startswith("UBLKCP")),
    ("ldg", lambda op: op.split(".")[0] == "LDG"),
    ("stg", lambda op: op.split(".")[0] in ("STG", "RED", "ATOMG")),
    ("generic_ld", lambda op: op.split(".")[0] == "LD"),   # generic address space
    ("generic_st", lambda op: op.split(".")[0] == "ST"),
    ("local", lambda op: op.split(".")[0] in ("LDL", "STL")),  # register spills
    ("barrier", lambda op: op.split(".")[0] in ("BAR", "DEPBAR", "LDGDEPBAR", "WARPGROUP",
                                                "SYNCS", "MEMBAR", "WARPSYNC")),
    ("fma", lambda op: op.split(".")[0] in ("FFMA", "FMUL", "FADD", "HFMA2", "HMUL2", "HADD2")),
    ("branch", lambda op: op.split(".")[0] in ("BRA", "BSSY", "BSYNC", "EXIT", "CALL", "RET")),
    ("int", lambda op: op.split(".")[0] in ("IMAD", "IADD3", "LEA", "LOP3", "SHF", "ISETP",
                                             "IABS", "IMNMX", "SEL", "MOV", "VIADD", "PLOP3",
                                             "LEA.HI", "PRMT", "S2R", "S2UR", "CS2R", "ULDC",
                                             "UIADD3", "UMOV", "ULEA", "USHF", "UISETP",
                                             "ULOP3", "UIMAD", "R2UR", "P2R", "R2P", "IMNMX",
                                             "VIMNMX", "LDC", "I2F", "F2I", "FSEL", "FSETP",
                                             "ISETP", "UPRMT", "USEL", "VOTEU", "BMSK", "POPC",
                                             "FLO", "UPLOP3", "USHL", "ULDC", "MUFU", "I2FP",
                                             "F2FP", "SHFL")),
)


def category(opcode: str) -> str:
    for name, test in _CATEGORIES:
        if test(opcode):
            return name
    return "other"


@dataclass
class LoopMix:
    """The instructions of a loop's blocks, nested loops excluded unless `nested`."""
    instructions: int
    counts: Dict[str, int]              # category -> instructions
    opcodes: Dict[str, int]             # full opcode -> instructions
    global_bytes_per_warp: int          # LDG / LDGSTS bytes one warp asks for per pass


def _access_bytes(opcode: str) -> int:
    """Bytes one lane moves for a load/store opcode: .128 -> 16, .64 -> 8, .U16/.S16 -> 2, .U8 -> 1, else 4."""
    parts = opcode.split(".")
    for width, size in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if width in parts:
            return size
    return 4


def mix(code: Sequence[Instruction], graph: List[Block], block_ids: Set[int]) -> LoopMix:
    counts: Dict[str, int] = {}
    opcodes: Dict[str, int] = {}
    total = 0
    global_bytes = 0
    for n in block_ids:
        for ins in code[graph[n].start:graph[n].end]:
            if ins.never or ins.base == "NOP":
                continue
            total += 1
            kind = category(ins.opcode)
            counts[kind] = counts.get(kind, 0) + 1
            opcodes[ins.opcode] = opcodes.get(ins.opcode, 0) + 1
            if kind in ("ldg", "cp_async"):
                global_bytes += 32 * _access_bytes(ins.opcode)
    return LoopMix(total, counts, opcodes, global_bytes)


@dataclass
class KernelCode:
    """One kernel's SASS, its loops and the main loop's nest (innermost first)."""
    name: str
    code: List[Instruction]
    graph: List[Block]
    loops: List[Loop]
    main_nest: List[Loop]  # the main loop, then each enclosing loop
    reachable: Set[int]    # blocks reachable from the entry (not the padding after EXIT)

    def own_blocks(self, loop: Loop) -> Set[int]:
        """A loop's blocks less those of the loops nested in it."""
        inner = set()
        for other in self.loops:
            if other.parent is loop:
                inner |= other.body
        return loop.body - inner

    def nest_mix(self) -> List[LoopMix]:
        """Per level of the main nest (innermost first): the instructions of one pass through
        that level, the levels inside it excluded."""
        result = []
        inside: Set[int] = set()
        for loop in self.main_nest:
            result.append(mix(self.code, self.graph, loop.body - inside))
            inside = loop.body
        return result

    def outside_mix(self) -> LoopMix:
        """Everything outside the main nest, each instruction counted once (other loops too:
        their trip counts are not modelled)."""
        nest = self.main_nest[-1].body if self.main_nest else set()
        return mix(self.code, self.graph, self.reachable - nest)

    def total_mix(self) -> LoopMix:
        return mix(self.code, self.graph, self.reachable)


def _reach(start: int, edges: Dict[int, List[int]]) -> Set[int]:
    seen, work = set(), [start]
    while work:
        n = work.pop()
        if n not in seen:
            seen.add(n)
            work.extend(edges[n])
    return seen


def _cycle_through_first(code, graph: List[Block], loops: List[Loop],
                         priority: Sequence[Tuple[str, ...]]) -> Optional[Loop]:
    """The strongly connected blocks around the first block holding tensor-core instructions (else
    FMAs), as one loop: what a loop entered at two points looks like."""
    forward = {n: b.successors for n, b in enumerate(graph)}
    backward: Dict[int, List[int]] = {n: [] for n in range(len(graph))}
    for n, b in enumerate(graph):
        for s in b.successors:
            backward[s].append(n)
    for kinds in priority:
        for n, b in enumerate(graph):
            if any(category(i.opcode) in kinds and not i.never for i in code[b.start:b.end]):
                body = _reach(n, forward) & _reach(n, backward)
                if n in forward[n] or len(body) > 1:
                    loop = Loop(n, body)
                    outer = [o for o in loops if body < o.body]
                    loop.parent = min(outer, key=lambda o: len(o.body)) if outer else None
                    loops.append(loop)
                    return loop
    return None


CONV_MAIN_LOOP = (("tensor",), ("fma",))
STREAM_MAIN_LOOP = (("ldg", "cp_async"), ("fma",))  # bandwidth kernels: the loop that loads


def analyse(name: str, code: List[Instruction],
            priority: Sequence[Tuple[str, ...]] = CONV_MAIN_LOOP) -> KernelCode:
    """The kernel's loops and main nest: the main loop is the smallest loop holding instructions
    of the first category group in `priority` that any loop holds."""
    graph = blocks(code)
    loops = natural_loops(graph)

    def holds(loop: Loop, kinds: Tuple[str, ...]) -> bool:
        return any(category(ins.opcode) in kinds and not ins.never
                   for n in loop.body for ins in code[graph[n].start:graph[n].end])

    main = None
    for kinds in priority:
        candidates = [loop for loop in loops if holds(loop, kinds)]
        if candidates:
            main = min(candidates, key=lambda loop: len(loop.body))
            break
    if main is None:  # a loop with two entries (no natural loop): the cycle through the first
        main = _cycle_through_first(code, graph, loops, priority)  # tensor-core (or FMA) block
    nest = []
    while main is not None:
        nest.append(main)
        main = main.parent
    reachable, work = set(), [0] if graph else []
    while work:
        n = work.pop()
        if n not in reachable:
            reachable.add(n)
            work.extend(graph[n].successors)
    return KernelCode(name, code, graph, loops, nest, reachable)
