"""Trace context in and out (W3C traceparent), and spans that cost nothing while tracing is off."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry import trace

from iim.core import tracing
from iim.telemetry import Tracing, chosen_exporter, resource_defaults
from tests.tracing_rig import Spans, is_child

VALID = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_a_valid_traceparent_names_its_remote_parent_and_is_written_back_the_same() -> None:
    ctx = tracing.context_from(VALID)
    assert ctx is not None
    parent = trace.get_current_span(ctx)
    assert tracing.traceparent_of(parent) == VALID


@pytest.mark.parametrize("value", [
    None, "", "00-zz", VALID.upper(), VALID + "-extra", VALID.replace("00-", "ff-", 1),
    "00-" + "0" * 32 + "-00f067aa0ba902b7-01", "00-4bf92f3577b34da6a3ce929d0e0e4736-" + "0" * 16 + "-01",
    " " + VALID, VALID.replace("-", "_"),
])
def test_a_malformed_or_all_zero_traceparent_is_ignored(value: str | None) -> None:
    assert tracing.context_from(value) is None


@given(st.text(max_size=80))
def test_no_traceparent_text_raises(value: str) -> None:
    ctx = tracing.context_from(value)
    assert ctx is None or tracing.traceparent_of(trace.get_current_span(ctx)) == value


def test_with_tracing_off_a_span_is_the_shared_no_op_and_carries_nothing() -> None:
    assert not tracing.recording()
    with tracing.span("off", parent=VALID, attributes=tracing.attrs(call_id="c")) as current:
        assert not current.is_recording()
        assert tracing.current_traceparent() is None
    assert not tracing.start("off").is_recording()


def test_spans_nest_under_a_remote_parent_and_attributes_skip_unknowns(spans: Spans) -> None:
    with tracing.span("outer", parent=VALID, attributes=tracing.attrs(call_id="c", tenant=None)) as outer:
        inner = tracing.start("inner", parent=outer)
        inner.end()
        assert tracing.current_traceparent() == tracing.traceparent_of(outer)
    done_outer, done_inner = spans.one("outer"), spans.one("inner")
    assert done_outer.attributes == {"iim.call_id": "c"}
    assert is_child(done_inner, done_outer)
    assert done_outer.parent is not None
    assert f"{done_outer.parent.span_id:016x}" == VALID[36:52]


def test_an_error_leaving_a_span_is_recorded_on_it(spans: Spans) -> None:
    with pytest.raises(ValueError, match="boom"), tracing.span("failing"):
        raise ValueError("boom")
    failed = spans.one("failing")
    assert not failed.status.is_ok
    assert [e.name for e in failed.events] == ["exception"]


@pytest.mark.parametrize(("setting", "env", "chosen"), [
    (None, {}, "none"),
    (None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, "otlp"),
    (None, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}, "otlp"),
    (None, {"OTEL_TRACES_EXPORTER": "console"}, "console"),
    (None, {"OTEL_TRACES_EXPORTER": "zipkin", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x"}, "none"),
    ("console", {"OTEL_TRACES_EXPORTER": "otlp"}, "console"),
    ("otlp", {"OTEL_SDK_DISABLED": "true"}, "none"),
    ("none", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x"}, "none"),
])
def test_the_exporter_follows_the_setting_then_the_standard_environment(setting: str | None, env: dict[str, str],
                                                                        chosen: str) -> None:
    assert chosen_exporter(setting, env) == chosen  # type: ignore[arg-type]


async def test_tracing_off_installs_nothing_and_records_nothing() -> None:
    async with Tracing("none", env={}) as off:
        assert not off.active
        assert not tracing.recording()


async def test_a_provider_installed_before_is_used_as_it_is_and_released_on_close(spans: Spans) -> None:
    async with Tracing("console", env={}) as borrowed:
        assert borrowed.active
        assert tracing.recording()
        with tracing.span("while-on"):
            pass
    assert not tracing.recording()
    assert spans.named("while-on")


@pytest.mark.parametrize(("env", "kept"), [
    ({}, {"service.name", "service.version"}),
    ({"OTEL_SERVICE_NAME": "iim-eu1"}, {"service.version"}),
    ({"OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=prod, service.name=iim-eu1"}, {"service.version"}),
    ({"OTEL_RESOURCE_ATTRIBUTES": "service.version=7,service.namespace=telecom"}, {"service.name"}),
])
def test_iims_resource_attributes_never_override_the_ones_the_standard_environment_sets(
        env: dict[str, str], kept: set[str]) -> None:
    """The SDK lets explicit attributes win over OTEL_RESOURCE_ATTRIBUTES: IIM passes only what is not set."""
    defaults = resource_defaults(env)
    assert set(defaults) == kept
    assert defaults.get("service.name", "iim") == "iim"


def test_a_fresh_traceparent_is_valid_and_new_each_time() -> None:
    first, second = tracing.new_traceparent(), tracing.new_traceparent()
    assert tracing.context_from(first) is not None
    assert first[3:35] != second[3:35]
    assert first.endswith("-01")  # sampled: an operator's command is always worth keeping
