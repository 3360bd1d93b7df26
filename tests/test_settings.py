"""Service settings: flags beat KVFERRY_* environment variables, which beat defaults; bad values stop
the process with a message naming the flag or variable."""

from __future__ import annotations

import pytest

from kvferry.coordinator.settings import CoordinatorSettings
from kvferry.decode_service.settings import DecodeSettings
from kvferry.prefill_service.settings import PrefillSettings
from kvferry.serving.settings import parse_settings


def test_defaults() -> None:
    s = parse_settings(DecodeSettings, [], environ={})
    assert (s.port, s.lease_seconds, s.model, s.page_size) == (50053, 30.0, None, 16)
    assert parse_settings(PrefillSettings, [], environ={}).port == 50052
    assert parse_settings(CoordinatorSettings, [], environ={}).decode_addresses == ["127.0.0.1:50053"]


def test_flag_beats_environment_beats_default() -> None:
    env = {"KVFERRY_PORT": "6000", "KVFERRY_LEASE_SECONDS": "4.5", "KVFERRY_KV_CACHE_BYTES": "1048576"}
    s = parse_settings(DecodeSettings, ["--port", "7000"], environ=env)
    assert s.port == 7000 and s.lease_seconds == 4.5 and s.kv_cache_bytes == 1 << 20


def test_lists_and_optionals_from_environment() -> None:
    env = {"KVFERRY_PREFILL_ADDRESSES": "a:1, b:2", "KVFERRY_DECODE_ADDRESSES": "c:3"}
    s = parse_settings(CoordinatorSettings, [], environ=env)
    assert s.prefill_addresses == ["a:1", "b:2"] and s.decode_addresses == ["c:3"]
    assert parse_settings(DecodeSettings, ["--max-model-len", "none"], environ={}).max_model_len is None


@pytest.mark.parametrize(
    ("argv", "env", "needle"),
    [
        (["--port", "x"], {}, "--port"),
        ([], {"KVFERRY_LEASE_SECONDS": "soon"}, "KVFERRY_LEASE_SECONDS"),
        (["--lease-seconds", "0"], {}, "lease_seconds"),
    ],
)
def test_bad_values_exit_naming_the_setting(
    argv: list[str], env: dict[str, str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_settings(DecodeSettings, argv, environ=env)
    assert exit_.value.code == 2
    assert needle in capsys.readouterr().err


def test_coordinator_needs_nodes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_settings(CoordinatorSettings, ["--decode-addresses", ""], environ={})
    assert "decode_addresses" in capsys.readouterr().err


def test_engine_settings_reach_the_engine_config() -> None:
    """Engine flags land in EngineConfig; a bad value fails there, naming the field."""
    from kvferry.engine.errors import InvalidArgumentError

    s = parse_settings(PrefillSettings, ["--prefill-attention", "triton", "--enforce-eager"], environ={})
    config = s.engine_config()
    assert config.prefill_attention == "triton" and config.enforce_eager
    assert parse_settings(PrefillSettings, [], environ={}).engine_config().prefill_attention == "auto"
    with pytest.raises(InvalidArgumentError, match="prefill_attention"):
        PrefillSettings(prefill_attention="flash")


@pytest.mark.parametrize("cls", [PrefillSettings, DecodeSettings])
@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--prefill-attention", "flash"], "prefill_attention"),
        (["--dtype", "fp8"], "dtype"),
        (["--page-size", "0"], "page_size"),
    ],
)
def test_bad_engine_values_exit_at_start(cls, argv, needle, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_settings(cls, argv, environ={})
    assert exit_.value.code == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize("cls", [CoordinatorSettings, PrefillSettings])
def test_compression_policy_from_flags_and_environment(cls: type) -> None:
    from kvferry.serving.compression_policy import CompressionPolicy

    assert parse_settings(cls, [], environ={}).compression_policy() == CompressionPolicy()
    env = {"KVFERRY_DEFAULT_RETENTION": "auto", "KVFERRY_DEFAULT_QUALITY_TARGET": "0.9"}
    s = parse_settings(cls, ["--default-compression", "snapkv"], environ=env)
    assert s.compression_policy() == CompressionPolicy("snapkv", "auto", 0.9)
    s = parse_settings(cls, ["--default-retention", "0.25"], environ={})
    assert s.compression_policy() == CompressionPolicy(None, 0.25, None)
    assert (
        not parse_settings(cls, ["--default-compression", "none"], environ={}).compression_policy().compresses
    )


@pytest.mark.parametrize("cls", [CoordinatorSettings, PrefillSettings])
@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--default-retention", "most"], "default_retention"),
        (["--default-retention", "1.5"], "default_retention"),
        (["--default-retention", "0"], "default_retention"),
        (["--default-quality-target", "0"], "default_quality_target"),
        (["--default-quality-target", "2"], "default_quality_target"),
        (["--default-compression", "none", "--default-retention", "0.5"], "default_retention"),
    ],
)
def test_bad_compression_policy_exits_at_start(
    cls: type, argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_settings(cls, argv, environ={})
    assert exit_.value.code == 2
    assert needle in capsys.readouterr().err


def test_the_prefill_service_checks_the_policys_method(capsys: pytest.CaptureFixture[str]) -> None:
    """The coordinator cannot (it never imports torch); the prefill nodes refuse to start."""
    with pytest.raises(SystemExit):
        parse_settings(PrefillSettings, ["--default-compression", "h2o"], environ={})
    assert "default_compression" in capsys.readouterr().err


def test_the_policy_fills_only_what_a_request_leaves_unset() -> None:
    from kvferry.serving.compression_policy import CompressionPolicy
    from kvferry.v1 import coordinator_pb2

    policy = CompressionPolicy.from_settings("snapkv", "auto", 0.9)
    empty = coordinator_pb2.GenerateRequest()
    policy.apply(empty)
    c = empty.compression
    assert (c.method, c.auto_retention, c.quality_target, c.HasField("retention")) == (
        "snapkv",
        True,
        0.9,
        False,
    )
    given = coordinator_pb2.GenerateRequest()
    given.compression.keep_tokens = 100
    given.compression.quality_target = 0.99
    policy.apply(given)
    c = given.compression
    assert (c.method, c.auto_retention, c.keep_tokens, c.quality_target) == ("snapkv", False, 100, 0.99)
    opted_out = coordinator_pb2.GenerateRequest()
    opted_out.compression.method = "none"
    policy.apply(opted_out)
    assert (
        opted_out.compression == coordinator_pb2.GenerateRequest(compression={"method": "none"}).compression
    )
    untouched = coordinator_pb2.GenerateRequest()
    CompressionPolicy.from_settings(None, None, 0.9).apply(untouched)  # a target alone compresses nothing
    assert not untouched.HasField("compression")
