"""The one parameter syntax (kvsieve.params): values, sizes, dotted keys, dicts, compressor specs, errors."""

from __future__ import annotations

import pytest

from kvsieve.params import CompressorSpec, flatten, parse_compressor_specs, parse_params, parse_size, parse_value


@pytest.mark.parametrize(
    "text, value",
    [("8", 8), ("0.2", 0.2), ("true", True), ("False", False), ("none", None), ("max", "max"), ("8K", 8192),
     ("1.5k", 1536), ("2M", 2 * 1024 * 1024), (" 7 ", 7), ("-3", -3)],
)
def test_parse_value(text, value):
    assert parse_value(text) == value and type(parse_value(text)) is type(value)


def test_parse_size_rejects_what_is_not_a_token_count():
    assert parse_size("32K") == 32768
    for bad in ("0.5", "-1", "abc", "1.0001K"):
        with pytest.raises(ValueError, match="whole number"):
            parse_size(bad)


def test_parse_params_dotted_keys_and_dicts_agree():
    from_cli = parse_params(["ratio=0.2", "scoring.pooling=max", "rpc.scoring.aggregation=group"])
    from_dict = parse_params({"ratio": 0.2, "scoring": {"pooling": "max"}, "rpc.scoring": {"aggregation": "group"}})
    assert from_cli == from_dict == {"ratio": 0.2, "scoring.pooling": "max", "rpc.scoring.aggregation": "group"}


@pytest.mark.parametrize(
    "items, error, match",
    [(["ratio"], ValueError, "key=value"), (["=3"], ValueError, "key=value"),
     (["ratio=0.1", "ratio=0.2"], ValueError, "'ratio' is given twice"), (["bad key=1"], ValueError, "not a parameter"),
     (["a..b=1"], ValueError, "not a parameter"), ("ratio=0.2", TypeError, "string"), ([3], TypeError, "key=value")],
)
def test_parse_params_errors_name_the_item(items, error, match):
    with pytest.raises(error, match=match):
        parse_params(items)


def test_flatten_refuses_a_key_given_twice_and_non_string_keys():
    with pytest.raises(ValueError, match="twice"):
        flatten({"scoring.pooling": "max", "scoring": {"pooling": "avg"}})
    with pytest.raises(TypeError, match="strings"):
        flatten({3: 1})


def test_compressor_specs():
    specs = parse_compressor_specs(["snapkv:window=8,scoring.pooling=max,rpc", "fastkv+rpc:rpc.interval=1K"])
    assert specs == [CompressorSpec("snapkv", {"window": 8, "scoring.pooling": "max"}), CompressorSpec("rpc"),
                     CompressorSpec("fastkv+rpc", {"rpc.interval": 1024})]
    assert specs[0].label == "snapkv(window=8,scoring.pooling=max)" and str(specs[2]) == "fastkv+rpc:rpc.interval=1024"
    assert parse_compressor_specs(["none", "snapkv", "rpc"]) == [CompressorSpec(n) for n in ("none", "snapkv", "rpc")]
    with pytest.raises(ValueError, match="before any compressor"):
        parse_compressor_specs(["ratio=0.2,snapkv"])
