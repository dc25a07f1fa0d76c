"""Envoy's rules, checked before a resource is published (pure: no I/O, no state).

Owns: whether Envoy would accept a resource, in Envoy's terms, so that one bad service is
left out of the config instead of making Envoy reject the whole response (a NACK of the
RouteConfiguration takes every service's routes with it).

Two kinds of rules:

- The protoc-gen-validate (PGV) annotations Envoy's protos carry (`[(validate.rules)...]`),
  read from the message descriptors that `xds-protos` ships, and checked by one generic
  walker (`check_message`). Envoy runs exactly these on every resource it receives, so a
  hand-written copy would drift with each Envoy release; the descriptors do not. Nested
  `Any` (typed_config, extension options) is unpacked and checked too, as Envoy does.
  Envoy's own range check on every `Duration` (not negative, at most what fits in int64
  nanoseconds, as milliseconds conversions need) is added, since PGV does not state it.
- Rules that span resources, which no annotation can state (`check_domains`): within one
  RouteConfiguration, one `*` domain, every domain (lowercased; exact, `*suffix` and
  `prefix*` each their own table; a port is part of the string, so `h:*` is a prefix
  wildcard) once, every virtual host name once (Envoy's RouteMatcher); and torpor's own
  rule that hosts differing only by a trailing dot clash (see `domain_table`).
- EDS endpoint addresses are IP addresses (`check_endpoint_addresses`).

Fast and exact at 10k services (`Shape`): the resources of services built from the same
inputs differ only in their names, hosts and endpoint addresses. The walk of one resource
built with placeholders for them stands for all of them: a service's resource whose bytes
are that resource's with its own names in place of the placeholders passes exactly when
the placeholder resource passes all rules but those reading a placeholder, and those
rules pass on its names. Anything else (a difference, a failure) is walked, so a verdict
and its words are always the walk's (tests/xds_server/test_validation_shapes.py).

PGV rules not checked (none appear on the resources torpor builds): the `uri`, `uri_ref`,
`email` and `uuid` string formats, and timestamp rules. A `pattern` Python's `re` cannot
read (RE2-only syntax) is skipped.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from google.protobuf import any_pb2, descriptor_pool, duration_pb2, symbol_database
from google.protobuf.descriptor import Descriptor, FieldDescriptor, OneofDescriptor
from google.protobuf.message import Message
from validate import validate_pb2

from xds_server.wire import read_varint, varint

#: Envoy's `DurationUtil::durationToMilliseconds` limit: int64 nanoseconds, ~292 years.
MAX_DURATION_SECONDS = (2**63 - 1) // 1_000_000_000
#: Problems reported per resource at most (the first ones say enough).
MAX_PROBLEMS = 5

_WRAPPERS = frozenset(
    f"google.protobuf.{n}Value"
    for n in ("Double", "Float", "Int64", "UInt64", "Int32", "UInt32", "Bool", "String", "Bytes"))
_NUMERIC_RULES = frozenset({"float", "double", "int32", "int64", "uint32", "uint64", "sint32",
                            "sint64", "fixed32", "fixed64", "sfixed32", "sfixed64"})
# PGV's well-known regexes (validate.proto KnownRegex), strict and loose.
_HEADER_NAME = re.compile(r"^:?[0-9a-zA-Z!#$%&'*+\-.^_|~`]+$")
_HEADER_VALUE = re.compile(r"^[^\x00-\x08\x0A-\x1F\x7F]*$")
_HEADER_LOOSE = re.compile(r"^[^\x00\x0A\x0D]*$")
_HOST_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")


# --------------------------------------------------------------------------------------
# What Envoy checks inside one resource
# --------------------------------------------------------------------------------------


def check_message(message: Message, label: str = "") -> list[str]:
    """Every PGV rule and Duration range `message` breaks, each as "path: problem"
    (at most MAX_PROBLEMS). [] when Envoy's validation would pass."""
    problems: list[str] = []
    for problem in _walk(message, label or message.DESCRIPTOR.name):
        problems.append(problem)
        if len(problems) >= MAX_PROBLEMS:
            break
    return problems


def _walk(message: Message, path: str) -> Iterator[str]:
    descriptor = message.DESCRIPTOR
    if descriptor.full_name == "google.protobuf.Duration":
        yield from _duration_range(message, path)
        return
    if descriptor.full_name == "google.protobuf.Any":
        yield from _walk_any(message, path)
        return
    table = _rules_of(descriptor)
    if table is None:  # (validate.disabled) / (validate.ignored)
        return
    for oneof in table.required_oneofs:
        if message.WhichOneof(oneof.name) is None:
            yield f"{path}: one of {oneof.name} is required"
    present = message.ListFields()
    set_names = {field.name for field, _ in present}
    for field, rules in table.field_rules:
        member_of = field.containing_oneof
        if member_of is not None and message.WhichOneof(member_of.name) != field.name:
            continue  # rules of a oneof member (or proto3 optional) apply only when set
        if field.name in set_names:
            yield from _check_field(message, field, rules, f"{path}.{field.name}")
        else:  # the default value: the same verdict in every message of this type
            for problem in table.unset_verdict(message, field, rules):
                yield f"{path}.{field.name}{problem}"
    for field, value in present:
        shape = table.shapes.get(field.name)
        if shape is None:
            continue
        sub = f"{path}.{field.name}"
        if shape == "map":
            for key, item in value.items():
                yield from _walk_known(item, f"{sub}[{key}]")
        elif shape == "repeated":
            for index, item in enumerate(value):
                yield from _walk_known(item, f"{sub}[{index}]")
        else:
            yield from _walk_known(value, sub)


#: Verdicts on nested messages by content. Every service's resources are built from the
#: same few shapes: most nested messages (circuit breakers, retry policies, timeouts,
#: protocol options) are the same bytes in each, and only the parts holding a name, a
#: host or an address are walked again (measured: checking 10k services' resources went
#: from seconds to a fraction of that).
_VERDICTS: dict[tuple[str, bytes], tuple[str, ...]] = {}
_VERDICTS_MAX = 16_384


def _walk_known(message: Message, path: str) -> Iterator[str]:
    """`_walk` of a nested message, its verdict (paths relative to it) taken from
    `_VERDICTS` when the same type and bytes were judged before."""
    if _deferring is not None:  # judging a shape: its placeholders must reach the checks
        yield from _walk(message, path)
        return
    key = (message.DESCRIPTOR.full_name, message.SerializeToString(deterministic=True))
    verdict = _VERDICTS.get(key)
    if verdict is None:
        if len(_VERDICTS) >= _VERDICTS_MAX:
            _VERDICTS.clear()  # a bounded memo: start over rather than grow
        verdict = _VERDICTS[key] = tuple(_walk(message, ""))
    for problem in verdict:
        yield path + problem


def _walk_any(message: Message, path: str) -> Iterator[str]:
    """An Any is checked as the message it carries (Envoy unpacks and validates it).
    Verdicts are cached by content: most nested Anys (retry predicates, protocol options)
    are the same bytes in every service's resources."""
    assert isinstance(message, any_pb2.Any)
    if not message.type_url:
        return
    problems = _any_problems if _deferring is None else _any_problems.__wrapped__
    for problem in problems(message.type_url, message.value):
        yield path + problem


@functools.lru_cache(maxsize=1024)
def _any_problems(type_url: str, value: bytes) -> tuple[str, ...]:
    """Problems of a packed message, with paths relative to it ("" is the message)."""
    packed = any_pb2.Any(type_url=type_url, value=value)
    try:
        cls = symbol_database.Default().GetSymbol(packed.TypeName())
    except KeyError:
        return ()  # a type this process cannot read; Envoy judges it
    inner = cls()
    if not packed.Unpack(inner):
        return (f": cannot unpack {packed.TypeName()}",)
    return tuple(_walk(inner, ""))


def _duration_range(message: Message, path: str) -> Iterator[str]:
    """Envoy's check of every Duration: not negative, nanos < 1 s, fits int64 ns."""
    assert isinstance(message, duration_pb2.Duration)
    if message.seconds < 0 or message.nanos < 0:
        yield f"{path}: expected a positive duration, got {_show(message)}"
    elif message.nanos > 999_999_999 or message.seconds > MAX_DURATION_SECONDS:
        yield f"{path}: duration out of range ({_show(message)}; at most " \
              f"{MAX_DURATION_SECONDS}s)"


class _Table:
    """The rules of one message type, read once from its descriptor."""

    def __init__(self, field_rules: list[tuple[FieldDescriptor, Any]],
                 required_oneofs: list[OneofDescriptor], shapes: dict[str, str]) -> None:
        self.field_rules = field_rules
        self.required_oneofs = required_oneofs
        # Fields holding messages to walk into: "map" (of messages), "repeated", "single".
        self.shapes = shapes
        self._unset: dict[str, tuple[str, ...]] = {}

    def unset_verdict(self, message: Message, field: FieldDescriptor,
                      rules: Any) -> tuple[str, ...]:
        """The problems of `field` left at its default (unset), paths relative to it:
        judged once per type, as most rules of the many unset fields cannot fail."""
        verdict = self._unset.get(field.name)
        if verdict is None:
            empty = type(message)()
            verdict = self._unset[field.name] = tuple(
                problem.removeprefix(field.name)
                for problem in _check_field(empty, field, rules, field.name))
        return verdict


@functools.cache
def _rules_of(descriptor: Descriptor) -> _Table | None:
    options = descriptor.GetOptions()
    if options.Extensions[validate_pb2.disabled] or options.Extensions[validate_pb2.ignored]:
        return None
    field_rules = []
    for field in descriptor.fields:
        field_options = field.GetOptions()
        if field_options.HasExtension(validate_pb2.rules):
            field_rules.append((field, field_options.Extensions[validate_pb2.rules]))
    oneofs = [o for o in descriptor.oneofs
              if o.GetOptions().Extensions[validate_pb2.required]]
    shapes = {}
    for field in descriptor.fields:
        if field.type != FieldDescriptor.TYPE_MESSAGE:
            continue
        if _is_map(field):
            if _type_of(field).fields_by_name["value"].type == FieldDescriptor.TYPE_MESSAGE:
                shapes[field.name] = "map"
        else:
            shapes[field.name] = "repeated" if field.is_repeated else "single"
    return _Table(field_rules, oneofs, shapes)


def _type_of(field: FieldDescriptor) -> Descriptor:
    """The message type of a message field."""
    assert field.message_type is not None
    return field.message_type


def _is_map(field: FieldDescriptor) -> bool:
    return (field.is_repeated
            and field.type == FieldDescriptor.TYPE_MESSAGE
            and _type_of(field).GetOptions().map_entry)


def _check_field(message: Message, field: FieldDescriptor, rules: Any,
                 path: str) -> Iterator[str]:
    kind = rules.WhichOneof("type")
    if kind == "message" or (kind is None and rules.HasField("message")):
        if rules.message.skip:
            return
        if rules.message.required and not message.HasField(field.name):
            yield f"{path}: is required"
        return
    if kind is None:
        return
    value = getattr(message, field.name)
    if _is_map(field):
        yield from _check_map(value, getattr(rules, kind), path)
    elif field.is_repeated:
        yield from _check_repeated(field, value, getattr(rules, kind), path)
    else:
        yield from _check_single(message, field, value, rules, kind, path)


def _check_single(message: Message, field: FieldDescriptor, value: Any, rules: Any,
                  kind: str, path: str) -> Iterator[str]:
    """One (non-repeated) value: a scalar, a wrapper, a Duration or an Any."""
    is_message = field.type == FieldDescriptor.TYPE_MESSAGE
    if rules.HasField("message") and rules.message.required and is_message \
            and not message.HasField(field.name):
        yield f"{path}: is required"
        return
    if kind in ("duration", "any", "timestamp"):
        required = getattr(rules, kind).required
        if not message.HasField(field.name):
            if required:
                yield f"{path}: is required"
            return
        if kind == "duration":
            yield from _check_duration(value, rules.duration, path)
        elif kind == "any":
            yield from _check_any(value, rules.any, path)
        return
    if is_message:
        if _type_of(field).full_name not in _WRAPPERS or not message.HasField(field.name):
            return  # rules on a wrapper apply only when it is set
        value = value.value
    if kind == "enum":
        yield from _check_defined(field, value, rules.enum, path)
    yield from _check_value(value, kind, getattr(rules, kind), path)


def _check_defined(field: FieldDescriptor, value: int, rules: Any, path: str) -> Iterator[str]:
    """enum {defined_only: true}: a number the enum names."""
    if rules.defined_only and field.enum_type is not None \
            and value not in field.enum_type.values_by_number:
        yield f"{path}: must be one of {field.enum_type.name}'s values, got {value}"


def _check_repeated(field: FieldDescriptor, values: Any, rules: Any,
                    path: str) -> Iterator[str]:
    items = list(values)
    if _deferring is not None and field.type != FieldDescriptor.TYPE_MESSAGE and \
            _deferring.defer(tuple(items), functools.partial(_check_repeated, field,
                                                             rules=rules, path=path),
                             _strings_pass(rules)):
        return
    if rules.ignore_empty and not items:
        return
    if rules.HasField("min_items") and len(items) < rules.min_items:
        yield f"{path}: at least {rules.min_items} item(s) required, got {len(items)}"
    if rules.HasField("max_items") and len(items) > rules.max_items:
        yield f"{path}: at most {rules.max_items} item(s) allowed, got {len(items)}"
    if rules.unique and field.type != FieldDescriptor.TYPE_MESSAGE \
            and len(set(items)) != len(items):
        yield f"{path}: items must be unique"
    if rules.HasField("items"):
        kind = rules.items.WhichOneof("type")
        if kind is None or kind == "message":
            return
        for index, item in enumerate(items):
            sub = f"{path}[{index}]"
            if kind == "duration":
                yield from _check_duration(item, rules.items.duration, sub)
            elif kind == "any":
                yield from _check_any(item, rules.items.any, sub)
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                if _type_of(field).full_name in _WRAPPERS:
                    yield from _check_value(item.value, kind, getattr(rules.items, kind), sub)
            else:
                if kind == "enum":
                    yield from _check_defined(field, item, rules.items.enum, sub)
                yield from _check_value(item, kind, getattr(rules.items, kind), sub)


def _strings_pass(rules: Any) -> Callable[[Any], bool] | None:
    """For repeated strings, True when `_check_repeated` finds nothing (None for other
    items: the check itself is run)."""
    kind = rules.items.WhichOneof("type") if rules.HasField("items") else None
    if kind not in (None, "string"):
        return None
    item_passes = _string_passes(rules.items.string) if kind == "string" else None
    least = rules.min_items if rules.HasField("min_items") else None
    most = rules.max_items if rules.HasField("max_items") else None
    ignore_empty, unique = rules.ignore_empty, rules.unique

    def passes(items: Any) -> bool:
        if ignore_empty and not items:
            return True
        if (least is not None and len(items) < least) or (most is not None and len(items) > most):
            return False
        if unique and len(set(items)) != len(items):
            return False
        return item_passes is None or all(item_passes(item) for item in items)

    return passes


def _check_map(values: Any, rules: Any, path: str) -> Iterator[str]:
    if rules.ignore_empty and not values:
        return
    if rules.HasField("min_pairs") and len(values) < rules.min_pairs:
        yield f"{path}: at least {rules.min_pairs} pair(s) required, got {len(values)}"
    if rules.HasField("max_pairs") and len(values) > rules.max_pairs:
        yield f"{path}: at most {rules.max_pairs} pair(s) allowed, got {len(values)}"
    if rules.HasField("keys"):
        kind = rules.keys.WhichOneof("type")
        if kind is not None and kind != "message":
            for key in values:
                yield from _check_value(key, kind, getattr(rules.keys, kind), f"{path}[{key}]")


def _check_value(value: Any, kind: str, rules: Any, path: str) -> Iterator[str]:
    if _deferring is not None and _deferring.defer(
            value, functools.partial(_check_value, kind=kind, rules=rules, path=path),
            _string_passes(rules) if kind == "string" else None):
        return
    if kind in _NUMERIC_RULES:
        yield from _check_number(value, rules, path)
    elif kind == "string":
        yield from _check_string(value, rules, path)
    elif kind == "bytes":
        yield from _check_bytes(value, rules, path)
    elif kind == "enum":
        yield from _check_enum(value, rules, path)
    elif kind == "bool":
        if rules.HasField("const") and value != rules.const:
            yield f"{path}: must be {rules.const}"


def _check_number(value: Any, rules: Any, path: str) -> Iterator[str]:
    if getattr(rules, "ignore_empty", False) and value == 0:
        return
    if rules.HasField("const") and value != rules.const:
        yield f"{path}: must be {rules.const}, got {value}"
    if getattr(rules, "in") and value not in getattr(rules, "in"):
        yield f"{path}: must be one of {list(getattr(rules, 'in'))}, got {value}"
    if value in rules.not_in:
        yield f"{path}: must not be {value}"
    yield from _check_range(value, rules, path, str(value), lambda bound: bound, str)


def _check_range(value: Any, rules: Any, path: str, shown: str, convert: Any,
                 show_bound: Any) -> Iterator[str]:
    """PGV's gt/gte/lt/lte, including its "outside the range" form when lt < gt."""
    low = high = None
    if rules.HasField("gt"):
        low = (convert(rules.gt), False)
    elif rules.HasField("gte"):
        low = (convert(rules.gte), True)
    if rules.HasField("lt"):
        high = (convert(rules.lt), False)
    elif rules.HasField("lte"):
        high = (convert(rules.lte), True)

    def above(bound: tuple[Any, bool]) -> bool:
        return bool(value >= bound[0] if bound[1] else value > bound[0])

    def below(bound: tuple[Any, bool]) -> bool:
        return bool(value <= bound[0] if bound[1] else value < bound[0])

    def words(bound: tuple[Any, bool], more: bool) -> str:
        op = (">=" if bound[1] else ">") if more else ("<=" if bound[1] else "<")
        original = rules.gte if more and bound[1] else rules.gt if more else \
            rules.lte if bound[1] else rules.lt
        return f"{op} {show_bound(original)}"

    if low is not None and high is not None and high[0] < low[0]:
        if not (above(low) or below(high)):
            yield f"{path}: must be {words(low, True)} or {words(high, False)}, got {shown}"
        return
    if low is not None and not above(low):
        yield f"{path}: must be {words(low, True)}, got {shown}"
    if high is not None and not below(high):
        yield f"{path}: must be {words(high, False)}, got {shown}"


def _check_string(value: str, rules: Any, path: str) -> Iterator[str]:
    if rules.ignore_empty and not value:
        return
    shown = repr(value if len(value) <= 80 else value[:77] + "...")
    for rule, setting in rules.ListFields():
        problem = _STRING_RULES.get(rule.name, _no_problem)(value, setting)
        if problem:
            yield f"{path}: {problem}, got {shown}"
    known = rules.WhichOneof("well_known")
    if known is not None and not _well_known(known, rules, value):
        what = known if known != "well_known_regex" else \
            validate_pb2.KnownRegex.Name(rules.well_known_regex)
        yield f"{path}: must be a valid {what}, got {shown}"


def _string_passes(rules: Any) -> Callable[[Any], bool]:
    """True when `_check_string(value, rules, ...)` finds nothing, with the rules read
    once (a Shape runs them on every service's names); one per rules."""
    found = _STRING_PASSES.get(id(rules))
    if found is None or found[0] is not rules:
        found = _STRING_PASSES[id(rules)] = (rules, _read_string_rules(rules))
    return found[1]


_STRING_PASSES: dict[int, tuple[Any, Callable[[Any], bool]]] = {}


def _read_string_rules(rules: Any) -> Callable[[Any], bool]:
    ignore_empty = rules.ignore_empty
    tests = [(_STRING_RULES[rule.name], setting) for rule, setting in rules.ListFields()
             if rule.name in _STRING_RULES]
    known = rules.WhichOneof("well_known")

    def passes(value: Any) -> bool:
        if ignore_empty and not value:
            return True
        for test, setting in tests:
            if test(value, setting):
                return False
        return known is None or _well_known(known, rules, value)

    return passes


def _no_problem(value: str, setting: Any) -> str:
    return ""


def _pattern(value: str, setting: str) -> str:
    return "" if _matches(setting, value) else f"must match {setting!r}"


_STRING_RULES: dict[str, Callable[[str, Any], str]] = {
    "const": lambda v, c: "" if v == c else f"must be {c!r}",
    "len": lambda v, n: "" if len(v) == n else f"must be {n} characters",
    "min_len": lambda v, n: "" if len(v) >= n else f"must be at least {n} character(s)",
    "max_len": lambda v, n: "" if len(v) <= n else f"must be at most {n} characters",
    "len_bytes": lambda v, n: "" if len(v.encode()) == n else f"must be {n} bytes",
    "min_bytes": lambda v, n: "" if len(v.encode()) >= n else f"must be at least {n} byte(s)",
    "max_bytes": lambda v, n: "" if len(v.encode()) <= n else f"must be at most {n} bytes",
    "prefix": lambda v, p: "" if v.startswith(p) else f"must start with {p!r}",
    "suffix": lambda v, p: "" if v.endswith(p) else f"must end with {p!r}",
    "contains": lambda v, p: "" if p in v else f"must contain {p!r}",
    "not_contains": lambda v, p: "" if p not in v else f"must not contain {p!r}",
    "in": lambda v, allowed: "" if v in allowed else f"must be one of {list(allowed)}",
    "not_in": lambda v, refused: "" if v not in refused else "is not allowed",
    "pattern": _pattern,
}


def _well_known(known: str, rules: Any, value: str) -> bool:
    if known == "well_known_regex":
        if not rules.strict and rules.HasField("strict"):
            return bool(_HEADER_LOOSE.match(value))
        if rules.well_known_regex == validate_pb2.HTTP_HEADER_NAME:
            return bool(_HEADER_NAME.match(value))
        if rules.well_known_regex == validate_pb2.HTTP_HEADER_VALUE:
            return bool(_HEADER_VALUE.match(value))
        return True
    if known == "hostname":
        return _is_hostname(value)
    if known in ("ip", "ipv4", "ipv6"):
        return _is_ip(value, known)
    if known == "address":
        return _is_ip(value, "ip") or _is_hostname(value)
    return True  # uri, uri_ref, email, uuid: not checked (see the module docstring)


def _is_hostname(value: str) -> bool:
    host = value.lower().removesuffix(".")
    return 0 < len(host) <= 253 and all(
        len(label) <= 63 and _HOST_LABEL.match(label) for label in host.split("."))


_OCTET = "(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
#: Dotted-quad IPv4 as Python's ipaddress reads it (no leading zeros): the common case, at
#: a tenth of ipaddress's cost.
_IPV4 = re.compile(rf"{_OCTET}(\.{_OCTET}){{3}}")


def _is_ip(value: str, kind: str) -> bool:
    if kind != "ipv6" and _IPV4.fullmatch(value):
        return True
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return False
    return kind == "ip" or (address.version == 4) == (kind == "ipv4")


@functools.cache
def _compiled(pattern: str) -> re.Pattern[str] | None:
    try:
        return re.compile(pattern)
    except re.error:
        return None


def _matches(pattern: str, value: str) -> bool:
    compiled = _compiled(pattern)
    return compiled is None or compiled.search(value) is not None


def _check_bytes(value: bytes, rules: Any, path: str) -> Iterator[str]:
    if rules.ignore_empty and not value:
        return
    if rules.HasField("min_len") and len(value) < rules.min_len:
        yield f"{path}: must be at least {rules.min_len} byte(s)"
    if rules.HasField("max_len") and len(value) > rules.max_len:
        yield f"{path}: must be at most {rules.max_len} bytes"


def _check_enum(value: int, rules: Any, path: str) -> Iterator[str]:
    if rules.HasField("const") and value != rules.const:
        yield f"{path}: must be {rules.const}, got {value}"
    if getattr(rules, "in") and value not in getattr(rules, "in"):
        yield f"{path}: must be one of {list(getattr(rules, 'in'))}, got {value}"
    if value in rules.not_in:
        yield f"{path}: must not be {value}"


def _check_duration(value: duration_pb2.Duration, rules: Any, path: str) -> Iterator[str]:
    nanos = _nanos(value)
    if rules.HasField("const") and nanos != _nanos(rules.const):
        yield f"{path}: must be {_show(rules.const)}, got {_show(value)}"
    if getattr(rules, "in") and nanos not in {_nanos(d) for d in getattr(rules, "in")}:
        yield f"{path}: must be one of the allowed durations, got {_show(value)}"
    if nanos in {_nanos(d) for d in rules.not_in}:
        yield f"{path}: must not be {_show(value)}"
    yield from _check_range(nanos, rules, path, _show(value), _nanos, _show)


def _check_any(value: any_pb2.Any, rules: Any, path: str) -> Iterator[str]:
    if getattr(rules, "in") and value.type_url not in getattr(rules, "in"):
        yield f"{path}: type {value.type_url!r} is not allowed here"
    if value.type_url in rules.not_in:
        yield f"{path}: type {value.type_url!r} is not allowed here"


def _nanos(duration: duration_pb2.Duration) -> int:
    return int(duration.seconds) * 1_000_000_000 + int(duration.nanos)


def _show(duration: duration_pb2.Duration) -> str:
    nanos = _nanos(duration)
    if nanos % 1_000_000_000 == 0:
        return f"{nanos // 1_000_000_000}s"
    return f"{nanos / 1e9:g}s"


# --------------------------------------------------------------------------------------
# Judging many resources of one shape at once
# --------------------------------------------------------------------------------------
#
# At 10k services every service's cluster, endpoints and virtual host differ from the
# others' only in a few strings (its name, its hosts, its endpoint addresses), so the memo
# by content above finds nothing to reuse at their top levels and walks each one (~150 µs
# a service, most of a first build). A Shape is the walk of one message built from
# placeholders in place of those strings, done once; every message with the same bytes
# save those strings gets its verdict from it, by checking only the rules that read them.


def placeholder(index: int) -> str:
    """The stand-in of the `index`-th identifying string of a message built for a Shape:
    no name, host or address holds these characters."""
    return f"\x1e{index}\x1f"


_PLACEHOLDER = re.compile("\x1e([0-9]+)\x1f")
#: A string with placeholders, as its parts: literal strings and placeholder indexes.
Parts = tuple["str | int", ...]


def _parts(text: str) -> Parts | None:
    """`text` split at its placeholders; None when it holds none."""
    pieces = _PLACEHOLDER.split(text)
    if len(pieces) == 1:
        return None
    return tuple(int(p) if odd else p for odd, p in
                 ((i % 2 == 1, p) for i, p in enumerate(pieces)) if odd or p)


def _fill(parts: Parts, values: tuple[str, ...]) -> str:
    if len(parts) == 1 and type(parts[0]) is int:
        return values[parts[0]]
    return "".join(values[p] if type(p) is int else p for p in parts)  # type: ignore[misc]


class _Deferral:
    """While a Shape is judged: the checks that read a placeholder are not run on it but
    kept, to be run on the real values (`Shape.passes`): a check (a generator of
    problems taking the value) and the value's parts."""

    def __init__(self) -> None:
        self.checks: list[tuple[Callable[[Any], bool], Parts | tuple[Parts, ...]]] = []

    def defer(self, value: Any, check: Callable[[Any], Iterator[str]],
              passes: Callable[[Any], bool] | None = None) -> bool:
        """Keep `check` of `value` if it holds a placeholder (True). `passes`: the same
        verdict as `check` yielding nothing, faster."""
        ok = passes or (lambda v: next(iter(check(v)), None) is None)
        kept: Parts | tuple[Parts, ...]
        if isinstance(value, str):
            parts = _parts(value)
            if parts is None:
                return False
            kept = parts
        elif isinstance(value, tuple) and any(isinstance(v, str) and _parts(v) for v in value):
            kept = tuple(_parts(v) or (v,) for v in value)
        else:
            return False
        if (ok, kept) not in self.checks:  # the same rules on the same name: once
            self.checks.append((ok, kept))
        return True


_deferring: _Deferral | None = None


class _Field:
    """A length-delimited field of a Shape's serialization that holds placeholders: a
    string (`parts`) or a message (`pieces`). `tag`: its key's bytes."""

    __slots__ = ("implicit", "parts", "pieces", "tag")

    def __init__(self, tag: bytes, parts: Parts | None = None,
                 pieces: list[bytes | _Field] | None = None, implicit: bool = False) -> None:
        self.tag, self.parts, self.pieces = tag, parts, pieces
        # A string without presence: not serialized at all when empty.
        self.implicit = implicit


class Shape:
    """One message built with placeholders (`placeholder(i)`) in place of its identifying
    strings, standing for every message that differs from it only there.

    `render(values)` is the deterministic serialization of this message with `values[i]`
    in place of placeholder i (what a builder may send instead of building the same
    message again). A message whose own serialization equals it *is* this message with
    those strings (a serialization is read back one way only), so its walk meets the same
    fields, the same presence and the same other values, and breaks a rule only where
    this one does (`clean` is False) or in a check that reads one of those strings: those
    checks are kept (`_Deferral`) and run on `values` (`passes`). So
    `clean and render(values) == bytes and passes(values)` says exactly what
    `check_message(...) == []` says, without the walk; anything else is judged by the
    walk, for its words. The walk of the shape itself is done once, when first asked."""

    def __init__(self, message: Message, pieces: list[bytes | _Field]) -> None:
        self._message = message
        self._pieces = pieces
        self._verdict: tuple[bool, list[tuple[Callable[[Any], bool], int]],
                             list[tuple[Callable[[Any], bool], Any]]] | None = None
        self._addresses: list[Parts] | None = None
        self._last: tuple[tuple[str, ...], bytes] | None = None
        self._frames: dict[tuple[int, ...], list[bytes | int]] = {}

    @classmethod
    def of(cls, message: Message) -> Shape | None:
        """The Shape of `message` (built with placeholders); None when one cannot be made
        (a placeholder where the walk cannot defer it, e.g. in a type URL)."""
        try:
            pieces = _pieces(message.SerializeToString(deterministic=True),
                             message.DESCRIPTOR)
        except ValueError:
            return None
        return cls(message, pieces)

    def render(self, values: tuple[str, ...]) -> bytes:
        """The serialization of the message with `values` in place of the placeholders
        (the last one kept: a builder renders, then the quarantine compares).

        Every length prefix depends only on the values' lengths: per tuple of lengths the
        serialization is fixed bytes with the values between them (a frame), so a render
        is one join (~1 µs; walking the pieces each time was ~20 µs a virtual host)."""
        last = self._last
        if last is not None and last[0] == values:
            return last[1]
        encoded = [v.encode() for v in values]
        lengths = tuple(map(len, encoded))
        frame = self._frames.get(lengths)
        if frame is None:
            if len(self._frames) >= MAX_FRAMES:
                self._frames.clear()
            frame = self._frames[lengths] = _frame(self._pieces, lengths)
        data = b"".join([x if x.__class__ is bytes else encoded[x]  # type: ignore[index]
                         for x in frame])
        self._last = (values, data)
        return data

    @property
    def clean(self) -> bool:
        """True when the message breaks no rule but maybe those on placeholders."""
        return self._judged()[0]

    def passes(self, values: tuple[str, ...]) -> bool:
        """True when no rule that reads a placeholder is broken by `values`."""
        _, whole, other = self._judged()
        for ok, index in whole:  # a check of one name as it is (most)
            if not ok(values[index]):
                return False
        for ok, parts in other:
            if parts and type(parts[0]) is tuple:
                if not ok(tuple(_fill(p, values) for p in parts)):
                    return False
            elif not ok(_fill(parts, values)):
                return False
        return True

    def addresses_pass(self, values: tuple[str, ...]) -> bool:
        """For a ClusterLoadAssignment: True when `check_endpoint_addresses` finds nothing
        in the message rendered with `values` (its addresses are this one's, filled)."""
        if self._addresses is None:
            self._addresses = [_parts(a) or (a,) for a in _endpoint_addresses(self._message)]
        return all(_is_ip(_fill(p, values), "ip") for p in self._addresses)

    def _judged(self) -> tuple[bool, list[tuple[Callable[[Any], bool], int]],
                               list[tuple[Callable[[Any], bool], Any]]]:
        global _deferring
        if self._verdict is None:
            deferral = _Deferral()
            _deferring = deferral
            try:
                problems = list(_walk(self._message, self._message.DESCRIPTOR.name))
            finally:
                _deferring = None
            whole = [(ok, p[0]) for ok, p in deferral.checks
                     if len(p) == 1 and type(p[0]) is int]
            other = [(ok, p) for ok, p in deferral.checks
                     if not (len(p) == 1 and type(p[0]) is int)]
            self._verdict = (not problems, whole, other)
        return self._verdict


#: Frames kept per Shape at most (one per tuple of value lengths).
MAX_FRAMES = 256


def _frame(pieces: list[bytes | _Field], lengths: tuple[int, ...]) -> list[bytes | int]:
    """The serialization of `pieces` with values of these byte lengths: fixed bytes, and
    the indexes of the values that go between them."""
    flat, _ = _symbolic(pieces, lengths)
    out: list[bytes | int] = []
    for item in flat:
        if item.__class__ is bytes and out and out[-1].__class__ is bytes:
            out[-1] = out[-1] + item
        else:
            out.append(item)
    return out


def _symbolic(pieces: list[bytes | _Field], lengths: tuple[int, ...]
              ) -> tuple[list[bytes | int], int]:
    out: list[bytes | int] = []
    total = 0
    for piece in pieces:
        if isinstance(piece, bytes):
            out.append(piece)
            total += len(piece)
            continue
        if piece.parts is not None:
            inner: list[bytes | int] = [p if isinstance(p, int) else p.encode()
                                        for p in piece.parts]
            size = sum(lengths[p] if isinstance(p, int) else len(p) for p in inner)
            if not size and piece.implicit:
                continue  # an empty string without presence is not serialized
        else:
            assert piece.pieces is not None
            inner, size = _symbolic(piece.pieces, lengths)
        prefix = piece.tag + varint(size)
        out.append(prefix)
        out.extend(inner)
        total += len(prefix) + size
    return out, total




_ANY = any_pb2.Any.DESCRIPTOR.full_name


def _pieces(data: bytes, descriptor: Any) -> list[bytes | _Field]:
    """`data` (a serialization of a `descriptor` message) cut into literal bytes and the
    fields that hold placeholders, down through messages and the content of Anys."""
    out: list[bytes | _Field] = []
    pos, any_type = 0, None
    while pos < len(data):
        start = pos
        key, pos = read_varint(data, pos)
        number, wire, tag = key >> 3, key & 7, data[start:pos]
        if wire == 0:
            pos = read_varint(data, pos)[1]
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, begin = read_varint(data, pos)
            pos = begin + length
            body = data[begin:pos]
            field = descriptor.fields_by_number.get(number)
            inner: Descriptor | None = None
            if descriptor.full_name == _ANY and number == 1:
                name = body.decode()
                if _PLACEHOLDER.search(name):
                    raise ValueError("a placeholder in a type URL")
                any_type = _message_type(name.rpartition("/")[2])
            elif descriptor.full_name == _ANY and number == 2:
                inner = any_type
            elif field is not None and field.type == FieldDescriptor.TYPE_MESSAGE:
                inner = field.message_type
            elif field is not None and field.type == FieldDescriptor.TYPE_STRING:
                parts = _parts(body.decode())
                if parts is not None:
                    out.append(_Field(tag, parts=parts, implicit=not (
                        field.has_presence or field.is_repeated)))
                    continue
            if inner is not None:
                pieces = _pieces(body, inner)
                if any(type(p) is not bytes for p in pieces):
                    out.append(_Field(tag, pieces=pieces))
                    continue
        else:
            raise ValueError(f"wire type {wire}")
        if pos > len(data):
            raise ValueError("truncated field")
        if out and type(out[-1]) is bytes:
            out[-1] = out[-1] + data[start:pos]
        else:
            out.append(data[start:pos])
    return out


def _message_type(name: str) -> Descriptor | None:
    try:
        found: Descriptor = descriptor_pool.Default().FindMessageTypeByName(name)
    except KeyError:
        return None
    return found


# --------------------------------------------------------------------------------------
# What Envoy checks across the virtual hosts of one RouteConfiguration
# --------------------------------------------------------------------------------------


def domain_table(domain: str) -> tuple[str, str]:
    """Which of Envoy's domain tables `domain` goes to, and its key there (lowercased):
    ("default", "*"), ("suffix", "*.example.com"), ("prefix", "example.com:*"),
    ("exact", "example.com"). A port is part of the string.

    Stricter than Envoy in one way: a trailing dot of the host is dropped from the key.
    Envoy tells "a.test" and "a.test." apart, but torpor's activator and access-log
    collector do not (torpor.model.host_of), so two services whose hosts differ only by
    it would be routed to one by Envoy and woken as the other."""
    key = domain.lower()
    if key == "*":
        return "default", key
    if key.startswith("*"):
        return "suffix", key.removesuffix(".")
    if key.endswith(":*"):
        return "prefix", key[:-2].removesuffix(".") + ":*"
    if key.endswith("*"):
        return "prefix", key
    if ":" in key:
        host, _, port = key.rpartition(":")
        return "exact", f"{host.removesuffix('.')}:{port}"
    return "exact", key.removesuffix(".")


def check_domains(vhosts: Iterable[tuple[str, Iterable[str]]]) -> dict[str, list[str]]:
    """Problems per virtual host name, for (name, domains) in RouteConfiguration order.

    Envoy's RouteMatcher: every virtual host name once; one `*` domain; each domain
    (lowercased) once in its table. Envoy refuses the whole RouteConfiguration at the
    first clash; here the later virtual host is the one at fault (the earlier one stays)."""
    problems: dict[str, list[str]] = {}
    names: set[str] = set()
    owners: dict[tuple[str, str], str] = {}
    for name, domains in vhosts:
        if name in names:
            problems.setdefault(name, []).append(f"virtual host name {name!r} is used twice")
        names.add(name)
        for domain in domains:
            table_key = domain_table(domain)
            owner = owners.get(table_key)
            if owner is None:
                owners[table_key] = name
                continue
            what = "a second '*' domain (one is allowed per route table)" \
                if table_key[0] == "default" else \
                f"domain {table_key[1]!r} is already served by {owner!r}"
            problems.setdefault(name, []).append(what)
    return problems


class DomainIndex:
    """Which virtual host owns each domain table entry (Envoy's RouteMatcher rule of
    `check_domains`), kept across builds: a service claims and releases its domains one
    at a time, so checking one changed service costs its own domains, not the table's.
    The versions of one service claim the same entries together (`owner`: the service)."""

    def __init__(self, reserved: Iterable[tuple[str, Iterable[str]]] = ()) -> None:
        # (table, domain, path) -> (owner, the names holding it for the owner)
        self._owners: dict[tuple[str, str, str], tuple[str, set[str]]] = {}
        self._claimed: dict[str, list[tuple[str, str, str]]] = {}
        for name, domains in reserved:
            if self.claim(name, domains):
                raise ValueError(f"reserved virtual host {name!r} clashes with another")

    def claim(self, name: str, domains: Iterable[str], paths: Iterable[str] = ("/",),
              owner: str | None = None) -> list[str]:
        """Give `name` these domains under these path prefixes for `owner` (default:
        itself), replacing what it held; the problems instead if one is another owner's
        (then `name` holds nothing). Services may share a domain under different paths
        (torpor's virtual host of a shared host holds each one's routes)."""
        self.release(name)
        owner = owner or name
        keys = [(*domain_table(d), p) for d in domains for p in paths]
        problems = []
        for key in keys:
            held = self._owners.get(key)
            if held is not None and held[0] != owner:
                where = "" if key[2] == "/" else f" under {key[2]!r}"
                problems.append("a second '*' domain (one is allowed per route table)"
                                if key[0] == "default" else
                                f"domain {key[1]!r}{where} is already served by {held[0]!r}")
        if len(set(keys)) != len(keys):
            problems.append("a domain is listed twice")
        if problems:
            return problems
        for key in keys:
            self._owners.setdefault(key, (owner, set()))[1].add(name)
        self._claimed[name] = keys
        return []

    def release(self, name: str) -> None:
        """`name` serves no domain any more (its owner keeps those another name holds)."""
        for key in self._claimed.pop(name, ()):
            held = self._owners.get(key)
            if held is not None:
                held[1].discard(name)
                if not held[1]:
                    del self._owners[key]


def check_endpoint_addresses(message: Message, name: str) -> list[str]:
    """Envoy's EDS rule PGV does not state: an endpoint's address is an IP address (EDS
    clusters resolve no names; Envoy refuses the ClusterLoadAssignment otherwise)."""
    if isinstance(message, any_pb2.Any):
        cls = symbol_database.Default().GetSymbol(message.TypeName())
        inner = cls()
        message.Unpack(inner)
        message = inner
    problems = [f"endpoints of {name}: {address!r} is not an IP address (EDS endpoints "
                "must be)" for address in _endpoint_addresses(message)
                if not _is_ip(address, "ip")]
    return problems[:MAX_PROBLEMS]


def _endpoint_addresses(message: Message) -> list[str]:
    """The addresses of a ClusterLoadAssignment, or of the one inside a (STATIC) Cluster."""
    if message.DESCRIPTOR.name == "Cluster":
        message = message.load_assignment  # type: ignore[attr-defined]
    return [lb_endpoint.endpoint.address.socket_address.address
            for locality in getattr(message, "endpoints", ())
            for lb_endpoint in locality.lb_endpoints]
