"""The chart's router settings come from the one owner, router.config.RouterConfig: the values schema admits, under
router.settings, exactly the router-section keys the chart does not set itself, each typed as RouterConfig types it and
bounded as router.config.BOUNDS bounds it; each reaches the config `splitserve up` reads in the head pod."""

from __future__ import annotations

import json
import types
import typing

import pytest
import yaml

from cluster.config import ROUTER_KEYS
from router.config import BOUNDS, CHOICES, RouterConfig
from tests.cluster.test_config import other_value
from tests.deploy.conftest import CHART, HelmError, chart_objects
from tests.deploy.test_placement import configmap_config, configmap_text, head_config

# Router-section keys the chart sets from elsewhere: the head's flags (--host 0.0.0.0, --tls-cert/--tls-key from
# tls.existingSecret) and the environment (API keys, admin token from Secrets). The rest of its router section comes
# from router.* values; router.settings takes every other key.
SET_BY_FLAG_OR_SECRET = {"host", "tls_certfile", "tls_keyfile", "api_keys", "admin_token"}
# String settings the router parses further: their schema entries add a pattern (and its description), which
# tests/deploy/test_consistency.py holds to the router's own parser on a table of samples.
PATTERNED = {"cors_origins"}


def setting_schema(name: str) -> dict:
    """The values-schema entry of one RouterConfig field (what tests expect values.schema.json to hold)."""
    hint = typing.get_type_hints(RouterConfig)[name]
    kinds = [t for t in typing.get_args(hint) if t is not type(None)] if isinstance(hint, types.UnionType) else [hint]
    optional = isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)
    (kind,) = kinds
    if name in CHOICES:
        return {"enum": list(CHOICES[name])}
    if kind is bool:
        return {"type": "boolean"}
    if kind is str:
        return {"type": ["string", "null"] if optional else "string"}
    bound = BOUNDS.get(name)
    if kind is int:
        schema = {"type": ["integer", "null"] if optional else "integer"}
        if bound is not None:  # an integer bound: the low end inclusive (tests/deploy/test_value_bounds.py probes it)
            schema["minimum"] = int(bound.low) + (1 if bound.low_open else 0)
            schema |= {} if bound.high is None else {"maximum": int(bound.high)}
        return schema
    assert kind is float, f"{name}: a RouterConfig type the chart's schema does not know"
    if bound is None:
        return {"anyOf": [{"type": "number"}, {"$ref": "#/definitions/decimalString"}]}
    # A decimal string's pattern can say "> 0" or ">= 0", nothing else.
    assert bound.high is None and bound.low == 0, f"{name}: a bound {bound} the chart's schema cannot state"
    return {"$ref": "#/definitions/positiveNumber" if bound.low_open else "#/definitions/nonNegativeNumber"}


def chart_router_keys() -> set[str]:
    return set(yaml.safe_load(configmap_text(chart_objects(), "/etc/splitserve/cluster.yaml"))["router"])


def test_router_settings_admit_every_router_key_the_chart_does_not_set_typed_as_routerconfig_types_it():
    schema = json.loads((CHART / "values.schema.json").read_text())
    settings = schema["properties"]["router"]["properties"]["settings"]
    expected = {name: setting_schema(name) for name in ROUTER_KEYS if name not in SET_BY_FLAG_OR_SECRET}
    for name in chart_router_keys():
        expected.pop(name)
    assert settings.get("additionalProperties") is False
    properties = dict(settings["properties"])
    for name in PATTERNED:
        assert properties[name]["pattern"], f"{name}: no pattern"
        properties[name] = {k: v for k, v in properties[name].items() if k not in ("pattern", "description")}
    assert properties == expected, "values.schema.json router.settings.properties should be:\n" + (json.dumps(expected))


def test_every_router_setting_reaches_the_head_config(tmp_path):
    schema = json.loads((CHART / "values.schema.json").read_text())
    names = sorted(schema["properties"]["router"]["properties"]["settings"]["properties"])
    wanted = {name: other_value(name) for name in names}
    objects = chart_objects(values={"router": {"settings": wanted}})
    config = head_config(objects, tmp_path)
    assert {name: getattr(config.router, name) for name in names} == wanted
    assert config.router.port == configmap_config(chart_objects()).router.port


@pytest.mark.parametrize("flag", ["--set", "--set-string"])
def test_fractional_settings_render_as_numbers_from_set(flag):
    objects = chart_objects(extra=[flag, "router.settings.kv_weight=0.5", flag, "router.settings.queue_timeout_s=2"])
    router = configmap_config(objects).router
    assert (router.kv_weight, router.queue_timeout_s) == (0.5, 2)


@pytest.mark.parametrize(
    "setting, message",
    [
        ("router.settings.max_runing=3", "max_runing"),
        ("router.settings.port=1", "port"),
        ("router.settings.routing_policy=random", "routing_policy"),
        ("router.settings.max_running=1.5", "max_running"),
    ],
)
def test_router_settings_the_chart_cannot_honour_are_refused_by_name(setting, message):
    with pytest.raises(HelmError, match=message):
        chart_objects(extra=["--set", setting])
