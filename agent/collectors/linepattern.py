"""A log pattern, checked and translated for engines that match in linear time.

A log pattern keeps the meaning Python gives it on one line of the log, without its newline:
`re.compile(pattern.encode(encoding)).search(line)`, bytes semantics (`\\d \\w \\s \\b` and
IGNORECASE are ASCII; `^ $ \\A \\Z` are the line's start and end). Python's engine backtracks, and
a line written to be hard (`(\\w+/?)+ HTTP` against `/api/` + 40 letters + `!`) never ends; the
engines used instead (hyperscan, google-re2) are automata, linear in the bytes read. So:

- What needs backtracking (backreferences, lookaround, conditionals, atomic groups, possessive
  quantifiers, the locale flag) is refused when the config is loaded (`linecount.check_pattern`),
  and so is a named group under a repeat that can match nothing (`(x*)+`): what Python captures
  there is its engine's own (re2 captures the last non-empty pass; Python an empty one).
- The rest is parsed with Python's own parser and written out again in a small common syntax:
  every byte as `\\xHH` or an explicit class (IGNORECASE expanded into letter pairs), and no class
  admits a newline, so no match can leave its line whatever the engine's own defaults are.
- Counting wants one report per matching line: `line_expression` wraps the pattern as
  `(?:P)[^\\n]*\\n`. Anchors are rewritten first, because hyperscan refuses `$` anywhere but at
  the end and `^` anywhere but at the start: a path through `$` consumes the newline where it
  passes (what follows must match empty there, which only `\\b`/`\\B` can restrict), and a path
  through `^` starts the line (what precedes must match empty there).
- An empty line is the one place where the engines' assertions and Python's can differ (Python
  before 3.14 never matches `\\B` in an empty string): its verdict and groups come from Python
  itself, on b"", which cannot backtrack (`empty_line`).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from itertools import product
from types import MappingProxyType
from typing import Any

if sys.version_info >= (3, 11):
    from re import _parser as sre_parse  # type: ignore[attr-defined]
else:  # pragma: no cover
    import sre_parse

NEWLINE = 10
MAXREPEAT = sre_parse.MAXREPEAT
MAX_EXPRESSION = 200_000  # bytes of translated pattern: beyond, the config is refused
MAX_LABEL_EXPRESSIONS = 256  # label-value combinations compiled as expressions of their own
MAX_CLASS_CHOICES = 32  # bytes of a class inside a label expanded so (hyperscan compiles 255
# one-byte alternatives such as (?P<k>.) in 14 s, 26 letters in 0.2 s)
RE2_MAX_REPEAT = 1000  # re2 refuses counted repeats above this, nested ones multiplied

# What Python's parser produces that only a backtracking engine can run: (what it is, what to
# remove). Keys are sre op names (lookarounds also by direction).
REFUSED = {
    "ASSERT>": ("a lookahead (?=...)", "(?=...)"),
    "ASSERT_NOT>": ("a negative lookahead (?!...)", "(?!...)"),
    "ASSERT<": ("a lookbehind (?<=...)", "(?<=...)"),
    "ASSERT_NOT<": ("a negative lookbehind (?<!...)", "(?<!...)"),
    "GROUPREF": ("a backreference (\\1, (?P=name))", "the backreference"),
    "GROUPREF_EXISTS": ("a conditional group (?(1)...|...)", "(?(...)...)"),
    "ATOMIC_GROUP": ("an atomic group (?>...)", "(?>...)"),
    "POSSESSIVE_REPEAT": ("a possessive quantifier (*+, ++, ?+, {m,n}+)", "the trailing +"),
}

# -- the pattern as a tree ---------------------------------------------------------------------


@dataclass(frozen=True)
class Chars:
    """One byte out of `allowed` (never a newline, except the one `line_expression` consumes)."""

    allowed: frozenset[int]


@dataclass(frozen=True)
class Seq:
    items: tuple[Node, ...]


@dataclass(frozen=True)
class Alt:
    """Ordered alternatives (their order is Python's preference, kept for re2's captures)."""

    items: tuple[Node, ...]


@dataclass(frozen=True)
class Repeat:
    item: Node
    min: int
    max: int | None  # None: unbounded
    lazy: bool


@dataclass(frozen=True)
class Group:
    """A capturing group; only named ones are kept as captures (labels and `value`)."""

    item: Node
    name: str | None


@dataclass(frozen=True)
class Anchor:
    kind: str  # "bol" (^ \A), "eol" ($ \Z), "wb" (\b), "nwb" (\B)


Node = Chars | Seq | Alt | Repeat | Group | Anchor
EMPTY = Seq(())
FAIL = Alt(())
ANY = frozenset(range(256)) - {NEWLINE}
WORD = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
DIGIT = frozenset(b"0123456789")
SPACE = frozenset(b" \t\n\r\x0b\x0c")
CATEGORIES = {
    "CATEGORY_DIGIT": DIGIT,
    "CATEGORY_NOT_DIGIT": frozenset(range(256)) - DIGIT,
    "CATEGORY_SPACE": SPACE,
    "CATEGORY_NOT_SPACE": frozenset(range(256)) - SPACE,
    "CATEGORY_WORD": WORD,
    "CATEGORY_NOT_WORD": frozenset(range(256)) - WORD,
}
# Contexts at a line's end (the byte before it) or start (the byte after it) in a non-empty line.
W, N = "word", "nonword"
BOTH = frozenset({W, N})


def seq(*items: Node) -> Node:
    out: list[Node] = []
    for item in items:
        if item == FAIL:
            return FAIL
        out.extend(item.items if isinstance(item, Seq) else (item,))
    return out[0] if len(out) == 1 else Seq(tuple(out))


def alt(*items: Node) -> Node:
    out: list[Node] = []
    for item in items:
        for one in item.items if isinstance(item, Alt) else (item,):
            if one not in out:  # a repeated alternative can never be the one that matches
                out.append(one)
    return out[0] if len(out) == 1 else Alt(tuple(out))


def repeat(item: Node, lo: int, hi: int | None, lazy: bool = False) -> Node:
    if hi == 0 or item == EMPTY:
        return EMPTY
    if item == FAIL or isinstance(item, Anchor):  # an assertion holds as often as it holds once
        return EMPTY if lo == 0 else item
    if lo == hi == 1:
        return item
    return Repeat(item, lo, hi, lazy)


def group(item: Node, name: str | None) -> Node:
    return FAIL if item == FAIL else Group(item, name)


def chars(allowed: frozenset[int]) -> Node:
    allowed = allowed - {NEWLINE}
    return Chars(allowed) if allowed else FAIL


# -- parsing and checking ----------------------------------------------------------------------


@dataclass(frozen=True)
class Parsed:
    tree: Node
    names: tuple[str, ...]  # named groups, in the pattern's order
    raw: bytes  # the encoded pattern, as Python compiles it


@lru_cache(maxsize=64)
def parse(pattern: str, encoding: str = "utf-8") -> Parsed:
    """The pattern's tree, or ValueError saying what cannot run in linear time and the fix."""
    try:
        raw = pattern.encode(encoding)
        parsed = sre_parse.parse(raw, 0)  # type: ignore[arg-type]  # (bytes, as re.compile does)
    except (re.error, ValueError, OverflowError) as e:
        raise ValueError(f"invalid regular expression: {e}") from None
    flags = parsed.state.flags
    if flags & re.LOCALE:
        raise ValueError(_locale_message())
    groups = parsed.state.groupdict
    tree = _convert(list(parsed.data), flags, {index: name for name, index in groups.items()})
    try:
        re.compile(raw)  # what the parser lets through and the compiler refuses
    except (re.error, ValueError, OverflowError, RecursionError) as e:
        raise ValueError(f"invalid regular expression: {e}") from None
    return Parsed(tree, tuple(sorted(groups, key=groups.__getitem__)), raw)


def _locale_message() -> str:
    return (
        "uses the locale flag (?L), whose classes depend on the machine's locale; log patterns"
        " run in linear time with ASCII classes: remove (?L)"
    )


def _refuse(key: str) -> ValueError:
    what, fix = REFUSED[key]
    return ValueError(
        f"uses {what}, which needs a backtracking engine; log patterns run in linear time:"
        f" rewrite it without {fix}"
    )


def _name(op: object) -> str:
    """sre opcodes are ints with a `name` (their str() is the number on Python 3.10)."""
    return str(getattr(op, "name", op))


def _convert(items: list[tuple[Any, Any]], flags: int, names: dict[int, str]) -> Node:
    nodes: list[Node] = []
    ignore = bool(flags & re.IGNORECASE)
    for op, av in items:
        name = _name(op)
        if name == "LITERAL":
            nodes.append(chars(_literal(av, ignore)))
        elif name == "NOT_LITERAL":
            nodes.append(chars(frozenset(range(256)) - _literal(av, ignore)))
        elif name == "ANY":
            nodes.append(chars(ANY))
        elif name == "IN":
            nodes.append(chars(_charset(av, ignore)))
        elif name == "AT":
            nodes.append(_anchor(_name(av)))
        elif name == "BRANCH":
            nodes.append(alt(*(_convert(list(b), flags, names) for b in av[1])) if av[1] else FAIL)
        elif name == "SUBPATTERN":
            group_id, add, remove, body = av
            if add & re.LOCALE:
                raise ValueError(_locale_message())
            inner = _convert(list(body), (flags | add) & ~remove, names)
            nodes.append(group(inner, names.get(group_id)) if group_id else inner)
        elif name in ("MAX_REPEAT", "MIN_REPEAT"):
            lo, hi, body = av
            inner = _convert(list(body), flags, names)
            if _named_inside(inner) and _nullable(inner):
                raise ValueError(_empty_repeat_message(inner))
            nodes.append(repeat(inner, lo, None if hi >= MAXREPEAT else hi, name == "MIN_REPEAT"))
        elif name in ("ASSERT", "ASSERT_NOT"):
            raise _refuse(name + (">" if av[0] >= 0 else "<"))
        elif name in REFUSED:
            raise _refuse(name)
        else:
            raise ValueError(f"uses {name.lower()}, which the linear-time engines do not support")
    return seq(*nodes)


def _nullable(node: Node) -> bool:
    """Whether `node` can match the empty string (assertions aside)."""
    if isinstance(node, Chars):
        return False
    if isinstance(node, Seq):
        return all(_nullable(i) for i in node.items)
    if isinstance(node, Alt):
        return any(_nullable(i) for i in node.items)
    if isinstance(node, Repeat):
        return node.min == 0 or _nullable(node.item)
    if isinstance(node, Group):
        return _nullable(node.item)
    return True


def _empty_repeat_message(body: Node) -> str:
    name = next(g.name for g in _groups_in(body) if g.name is not None)
    return (
        f"repeats a part that holds the named group (?P<{name}>...) and can match nothing, such"
        " as (x*)+ or (x?){2}; what such a group captures differs between Python and the"
        " linear-time engines: make the repeated part match at least one character"
    )


def _groups_in(node: Node) -> list[Group]:
    if isinstance(node, Group):
        return [node, *_groups_in(node.item)]
    if isinstance(node, (Seq, Alt)):
        return [g for i in node.items for g in _groups_in(i)]
    if isinstance(node, Repeat):
        return _groups_in(node.item)
    return []


def _lower(c: int) -> int:
    return c + 32 if 65 <= c <= 90 else c


def _literal(c: int, ignore: bool) -> frozenset[int]:
    if not ignore:
        return frozenset({c})
    return frozenset(x for x in range(256) if _lower(x) == _lower(c))


def _charset(items: list[tuple[Any, Any]], ignore: bool) -> frozenset[int]:
    """The bytes a class `[...]` admits. Under IGNORECASE Python lowers the byte before it looks
    it up among the class's lowered members (ASCII letters only, for bytes)."""
    negate = False
    members: set[int] = set()
    categories: list[frozenset[int]] = []
    fold = _lower if ignore else (lambda c: c)
    for op, av in items:
        name = _name(op)
        if name == "NEGATE":
            negate = True
        elif name == "LITERAL":
            members.add(fold(av))
        elif name == "RANGE":
            members.update(map(fold, range(av[0], av[1] + 1)))
        elif name == "CATEGORY" and _name(av) in CATEGORIES:
            categories.append(CATEGORIES[_name(av)])
        else:
            raise ValueError(f"uses {name.lower()} in a class, which the engines do not support")
    return frozenset(
        c
        for c in range(256)
        if (fold(c) in members or any(fold(c) in cat for cat in categories)) != negate
    )


def _anchor(code: str) -> Anchor:
    kind = {
        "AT_BEGINNING": "bol",
        "AT_BEGINNING_STRING": "bol",
        "AT_END": "eol",
        "AT_END_STRING": "eol",
        "AT_BOUNDARY": "wb",
        "AT_NON_BOUNDARY": "nwb",
    }.get(code)
    if kind is None:
        raise ValueError(f"uses {code.lower()}, which the linear-time engines do not support")
    return Anchor(kind)


# -- anchors: where a line starts and ends -----------------------------------------------------


def _has(node: Node, kind: str) -> bool:
    if isinstance(node, Anchor):
        return node.kind == kind
    if isinstance(node, (Seq, Alt)):
        return any(_has(i, kind) for i in node.items)
    if isinstance(node, (Repeat, Group)):
        return _has(node.item, kind)
    return False


def _empty_at(node: Node, edge: str) -> frozenset[str]:
    """The contexts (the line's last byte, for edge "eol"; its first, for "bol") in which `node`
    matches the empty string at that edge of a non-empty line."""
    if isinstance(node, Chars):
        return frozenset()
    if isinstance(node, Anchor):
        if node.kind == edge:
            return BOTH
        return {"wb": frozenset({W}), "nwb": frozenset({N})}.get(node.kind, frozenset())
    if isinstance(node, Seq):
        out = BOTH
        for item in node.items:
            out &= _empty_at(item, edge)
        return out
    if isinstance(node, Alt):
        found: frozenset[str] = frozenset()
        for item in node.items:
            found |= _empty_at(item, edge)
        return found
    if isinstance(node, Repeat):
        return BOTH if node.min == 0 else _empty_at(node.item, edge)
    return _empty_at(node.item, edge)


def _assert(contexts: frozenset[str]) -> Node:
    """Zero-width: the context at a line's edge is one of `contexts` (line not empty)."""
    if contexts == BOTH:
        return EMPTY
    if contexts == {W}:
        return Anchor("wb")
    if contexts == {N}:
        return Anchor("nwb")
    return FAIL


def _without(node: Node, kind: str) -> Node:
    """The node's paths that do not pass the anchor `kind`."""
    if not _has(node, kind):
        return node
    if isinstance(node, Anchor):
        return FAIL
    if isinstance(node, Seq):
        return seq(*(_without(i, kind) for i in node.items))
    if isinstance(node, Alt):
        return alt(*(_without(i, kind) for i in node.items)) if node.items else FAIL
    if isinstance(node, Repeat):
        return repeat(_without(node.item, kind), node.min, node.max)
    if isinstance(node, Group):
        return _without(node.item, kind)
    return node


def _through_eol(node: Node, ctx: frozenset[str]) -> Node:
    """The node's paths that pass `$`, with the newline consumed where the first `$` stands;
    what follows it must match empty at the line's end, in a context among `ctx`."""
    if not _has(node, "eol"):
        return FAIL
    if isinstance(node, Anchor):
        return seq(_assert(ctx), Chars(frozenset({NEWLINE})))
    if isinstance(node, Seq):
        options = []
        for i, item in enumerate(node.items):
            rest = _empty_at(Seq(node.items[i + 1 :]), "eol")
            head = [_without(x, "eol") for x in node.items[:i]]
            options.append(seq(*head, _through_eol(item, ctx & rest)))
        return alt(*options) if options else FAIL
    if isinstance(node, Alt):
        return alt(*(_through_eol(i, ctx) for i in node.items)) if node.items else FAIL
    if isinstance(node, Repeat):
        # The j-th pass goes through `$`: passes before it are open, the ones after it (as many
        # as the minimum still asks for) match empty at the line's end.
        item, lo, hi = node.item, node.min, node.max
        before_max = None if hi is None else hi - 1
        late = seq(
            repeat(_without(item, "eol"), max(lo - 1, 0), before_max), _through_eol(item, ctx)
        )
        if lo < 2:
            return late
        early = seq(
            repeat(_without(item, "eol"), 0, lo - 2),
            _through_eol(item, ctx & _empty_at(item, "eol")),
        )
        return alt(early, late)
    if isinstance(node, Group):
        return _through_eol(node.item, ctx)
    return FAIL


def _after_bol(node: Node, ctx: frozenset[str]) -> Node:
    """The node's paths that pass `^`, from the last `^` they pass on (what precedes it must
    match empty at the line's start, in a context among `ctx`); the caller puts the `^` first."""
    if not _has(node, "bol"):
        return FAIL
    if isinstance(node, Anchor):
        return _assert(ctx)
    if isinstance(node, Seq):
        options = []
        for i, item in enumerate(node.items):
            before = _empty_at(Seq(node.items[:i]), "bol")
            tail = [_without(x, "bol") for x in node.items[i + 1 :]]
            options.append(seq(_after_bol(item, ctx & before), *tail))
        return alt(*options) if options else FAIL
    if isinstance(node, Alt):
        return alt(*(_after_bol(i, ctx) for i in node.items)) if node.items else FAIL
    if isinstance(node, Repeat):
        item, lo, hi = node.item, node.min, node.max
        first = seq(
            _after_bol(item, ctx),
            repeat(_without(item, "bol"), max(lo - 1, 0), None if hi is None else hi - 1),
        )
        if hi is not None and hi < 2:
            return first
        later = seq(
            _after_bol(item, ctx & _empty_at(item, "bol")),
            repeat(_without(item, "bol"), 0, None if hi is None else hi - 2),
        )
        return alt(first, later)
    if isinstance(node, Group):
        return _after_bol(node.item, ctx)
    return FAIL


def line_form(tree: Node) -> Node:
    """A tree that matches a whole line and its newline where `tree` matches in that (non-empty)
    line, once per line, with `^` only at the start of an alternative and no `$` at all."""
    started = alt(_without(tree, "bol"), seq(Anchor("bol"), _after_bol(tree, BOTH)))
    rest_of_line = Repeat(Chars(ANY), 0, None, False)
    open_end = seq(_without(started, "eol"), rest_of_line, Chars(frozenset({NEWLINE})))
    return alt(open_end, _through_eol(started, BOTH))


# -- writing it out ----------------------------------------------------------------------------


def _class(allowed: frozenset[int]) -> str:
    if len(allowed) == 1:
        return f"\\x{next(iter(allowed)):02x}"
    ranges: list[tuple[int, int]] = []
    for c in sorted(allowed):
        if ranges and ranges[-1][1] == c - 1:
            ranges[-1] = (ranges[-1][0], c)
        else:
            ranges.append((c, c))
    body = "".join(f"\\x{a:02x}" if a == b else f"\\x{a:02x}-\\x{b:02x}" for a, b in ranges)
    return f"[{body}]"


def write(node: Node, captures: list[str] | None = None) -> str:
    """The tree in the syntax hyperscan and re2 share. With `captures` (re2), named groups are
    written as plain capturing groups, their names appended in order, and lazy repeats stay
    lazy; without (hyperscan), every group is non-capturing."""
    if isinstance(node, Chars):
        return _class(node.allowed)
    if isinstance(node, Anchor):
        return {"bol": "^", "eol": "$", "wb": "\\b", "nwb": "\\B"}[node.kind]
    if isinstance(node, Seq):
        return "".join(_atom(i, captures) if isinstance(i, Alt) else write(i, captures)
                       for i in node.items)  # fmt: skip
    if isinstance(node, Alt):
        if not node.items:
            return "[^\\x00-\\xff]"  # never reached: FAIL is pruned before writing
        return "|".join(write(i, captures) for i in node.items)
    if isinstance(node, Repeat):
        lo, hi = node.min, node.max
        if (lo, hi) == (0, None):
            q = "*"
        elif (lo, hi) == (1, None):
            q = "+"
        elif (lo, hi) == (0, 1):
            q = "?"
        elif hi is None:
            q = f"{{{lo},}}"
        elif lo == hi:
            q = f"{{{lo}}}"
        else:
            q = f"{{{lo},{hi}}}"
        lazy = "?" if node.lazy and captures is not None else ""
        return _atom(node.item, captures) + q + lazy
    if captures is not None and node.name is not None:
        captures.append(node.name)
        return f"({write(node.item, captures)})"
    return _atom(node.item, captures)


def _atom(node: Node, captures: list[str] | None) -> str:
    """`node` written so that a quantifier or a neighbour applies to all of it."""
    if isinstance(node, Chars) or (isinstance(node, Group) and captures is not None and node.name):
        return write(node, captures)
    return f"(?:{write(node, captures)})"


def line_expression(tree: Node) -> str:
    """The hyperscan expression (with HS_FLAG_MULTILINE) reporting each matching line once, at
    the end of its newline; "" when the pattern can match in no non-empty line."""
    form = line_form(tree)
    return "" if form == FAIL else write(form)


def capture_expression(tree: Node) -> tuple[str, list[str]]:
    """The re2 expression for one line on its own (no newline), with the named groups as
    captures; and their names, in capture order."""
    names: list[str] = []
    return write(tree, names), names


def re2_fits(tree: Node) -> bool:
    """Whether re2 accepts the tree's counted repeats (each, and nested ones multiplied, at most
    RE2_MAX_REPEAT), so that a pattern hyperscan compiled can also have its groups read."""

    def walk(node: Node, budget: int) -> bool:
        if isinstance(node, Repeat):
            count = node.max if node.max is not None else node.min
            if node.min > RE2_MAX_REPEAT or (node.max or 0) > RE2_MAX_REPEAT:
                return False
            if count >= 2:
                budget //= count
                if budget == 0:
                    return False
            return walk(node.item, budget)
        if isinstance(node, (Seq, Alt)):
            return all(walk(i, budget) for i in node.items)
        if isinstance(node, Group):
            return walk(node.item, budget)
        return True

    return walk(tree, RE2_MAX_REPEAT)


# -- labels as expressions of their own --------------------------------------------------------


def _language(node: Node, cap: int) -> list[bytes] | None:
    """The strings `node` matches, in Python's order of preference, when they are few (at most
    `cap`) and it has no anchors or captures inside; else None."""
    if isinstance(node, Chars):
        if len(node.allowed) > min(cap, MAX_CLASS_CHOICES):
            return None
        return [bytes([c]) for c in sorted(node.allowed)]
    if isinstance(node, Seq):
        out = [b""]
        for item in node.items:
            part = _language(item, cap)
            if part is None or len(out) * len(part) > cap:
                return None
            out = [a + b for a, b in product(out, part)]
        return out
    if isinstance(node, Alt):
        found: list[bytes] = []
        for item in node.items:
            part = _language(item, cap)
            if part is None:
                return None
            found.extend(s for s in part if s not in found)
            if len(found) > cap:
                return None
        return found
    if isinstance(node, Repeat) and node.max is not None:
        return _language(alt(*(seq(*[node.item] * k) for k in range(node.min, node.max + 1))), cap)
    return None


def _top_groups(node: Node) -> list[Group]:
    """Named groups that take part in every match exactly once (not under a repeat or an
    alternative), with no named group inside them."""
    if isinstance(node, Seq):
        return [g for i in node.items for g in _top_groups(i)]
    if isinstance(node, Group):
        if node.name is not None and not _named_inside(node.item):
            return [node]
        return _top_groups(node.item)
    return []


def _named_inside(node: Node) -> bool:
    if isinstance(node, Group):
        return node.name is not None or _named_inside(node.item)
    if isinstance(node, (Seq, Alt)):
        return any(_named_inside(i) for i in node.items)
    if isinstance(node, Repeat):
        return _named_inside(node.item)
    return False


def label_expansion(
    tree: Node, labels: tuple[str, ...], cap: int = MAX_LABEL_EXPRESSIONS
) -> list[tuple[dict[str, bytes], Node]] | None:
    """The pattern as one tree per combination of label values, when every label is a group that
    always takes part and matches one of a few fixed strings (`(?P<kind>items|orders)`); else
    None. A line that exactly one tree matches has that tree's values: every match of the
    pattern is a match of the tree whose strings its groups took."""
    groups = {g.name: g for g in _top_groups(tree)}
    if not labels or any(name not in groups for name in labels):
        return None
    choices: dict[str, list[bytes]] = {}
    total = 1
    for name in labels:
        strings = _language(groups[name].item, cap)
        if strings is None:
            return None
        total *= len(strings)
        if total > cap:
            return None
        choices[name] = strings
    out = []
    for combo in product(*(choices[n] for n in labels)):
        values = dict(zip(labels, combo, strict=True))
        out.append((values, _substitute(tree, values)))
    return out


def _substitute(node: Node, values: dict[str, bytes]) -> Node:
    if isinstance(node, Group) and node.name in values:
        return seq(*(Chars(frozenset({c})) for c in values[node.name]))
    if isinstance(node, Seq):
        return seq(*(_substitute(i, values) for i in node.items))
    if isinstance(node, Group):
        return group(_substitute(node.item, values), node.name)
    return node


# -- the empty line ----------------------------------------------------------------------------


@lru_cache(maxsize=64)
def empty_line(raw: bytes) -> Mapping[str, bytes | None] | None:
    """Python's own verdict on an empty line: None (no match), or the named groups' values.
    (b"" gives backtracking nothing to try: this is always quick.)"""
    m = re.compile(raw).search(b"")
    return None if m is None else MappingProxyType(m.groupdict())
