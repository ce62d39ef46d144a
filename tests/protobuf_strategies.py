"""Hypothesis strategies for protobuf messages, built from their descriptors: every field, every type, edge
values (0, the type's extremes, NaN and infinities), nested messages and oneofs. ``overrides`` pins or narrows
fields by name (say, an address that must stay on loopback) so fuzzing reaches past the first check."""

from __future__ import annotations

from collections.abc import Mapping

from google.protobuf.descriptor import FieldDescriptor
from hypothesis import strategies as st

_INTS = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
_SMALL = st.integers(0, 600)


def _integers(low: int, high: int) -> st.SearchStrategy[int]:
    edges = st.sampled_from(sorted(v for v in {low, high, 0, 1, 319, 320, 2**31} if low <= v <= high))
    return st.one_of(edges, _SMALL.filter(lambda v: low <= v <= high), st.integers(low, high))


def _scalar(field: FieldDescriptor) -> st.SearchStrategy:
    kind = field.type
    if kind in _INTS:
        return _integers(*_INTS[kind])
    if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        width = 32 if kind == FieldDescriptor.TYPE_FLOAT else 64
        return st.one_of(st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5]), st.floats(width=width))
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_STRING:
        return st.text(max_size=24)
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if kind == FieldDescriptor.TYPE_ENUM:
        return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), st.integers(-3, 50))
    raise TypeError(f"no strategy for field {field.full_name} of type {kind}")


def messages(message_class, overrides: Mapping[str, st.SearchStrategy] | None = None, depth: int = 3):
    """Messages of ``message_class``; ``overrides`` maps a field name (any nesting level) to its strategy."""
    overrides = dict(overrides or {})
    return _message(message_class.DESCRIPTOR, message_class, overrides, depth)


def _message(descriptor, message_class, overrides, depth):
    fields = {}
    for field in descriptor.fields:
        strategy = _field(field, overrides, depth)
        if strategy is not None:
            fields[field.name] = strategy
    # Optional: any subset of fields is set (oneof members included: the last one set wins).
    values = st.fixed_dictionaries({}, optional=fields)
    return values.map(lambda chosen: _build(message_class, descriptor, chosen))


def _field(field: FieldDescriptor, overrides, depth):
    if field.name in overrides:
        strategy = overrides[field.name]
    elif field.type == FieldDescriptor.TYPE_MESSAGE:
        if depth <= 0:
            return None
        if field.message_type.GetOptions().map_entry:
            key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            return st.dictionaries(_scalar(key), _scalar(value), max_size=4)
        strategy = _message(field.message_type, _class_of(field.message_type), overrides, depth - 1)
    else:
        strategy = _scalar(field)
    if _repeated(field) and field.name not in overrides:
        return st.lists(strategy, max_size=6)
    return strategy


def _repeated(field: FieldDescriptor) -> bool:
    if hasattr(field, "is_repeated"):
        return field.is_repeated
    return field.label == FieldDescriptor.LABEL_REPEATED


def _build(message_class, descriptor, chosen: dict):
    message = message_class()
    for name, value in chosen.items():
        field = descriptor.fields_by_name[name]
        if field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
            getattr(message, name).update(value)
        elif _repeated(field):
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                for item in value:
                    getattr(message, name).add().CopyFrom(item)
            else:
                getattr(message, name).extend(value)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            getattr(message, name).CopyFrom(value)
        else:
            setattr(message, name, value)
    return message


def _class_of(descriptor):
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(descriptor)
