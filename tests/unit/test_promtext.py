"""shared.promtext: the exposition parser and histogram_quantile with Prometheus's semantics, read
back from what shared.telemetry renders."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared import promtext, telemetry
from shared.promtext import Histogram, PromTextError, histogram_quantile, parse

PAGE = """\
# HELP tidewire_ttft_seconds Time to first token
# TYPE tidewire_ttft_seconds histogram
tidewire_ttft_seconds_bucket{le="0.1"} 5
tidewire_ttft_seconds_bucket{le="0.5"} 8
tidewire_ttft_seconds_bucket{le="+Inf"} 10
tidewire_ttft_seconds_sum 3.5
tidewire_ttft_seconds_count 10
# TYPE tidewire_gateway_sends counter
tidewire_gateway_sends 42
# TYPE tidewire_tool_jobs counter
tidewire_tool_jobs{outcome="ok",tool="clock"} 3
tidewire_tool_jobs{tool="clock", outcome="error",} 1 1700000000000
tidewire_tool_jobs{outcome="ok",tool="calc"} 2

weird{msg="a \\"quoted\\" } brace, and\\\\ a\\nnewline"} -Inf
untyped_nan NaN
"""


def test_samples_keep_sorted_labels_values_and_timestamps() -> None:
    page = parse(PAGE)
    jobs = list(page.select("tidewire_tool_jobs"))
    assert jobs[0].labels == (("outcome", "ok"), ("tool", "clock"))
    assert jobs[1] == promtext.Sample(
        "tidewire_tool_jobs", (("outcome", "error"), ("tool", "clock")), 1.0, 1700000000000
    )
    assert page.value("tidewire_gateway_sends") == 42
    assert page.value("tidewire_tool_jobs", tool="clock") == 4
    assert page.value("tidewire_tool_jobs", outcome="ok") == 5
    assert page.value("absent", default=-1) == -1
    assert page.types["tidewire_ttft_seconds"] == "histogram"
    assert page.helps["tidewire_ttft_seconds"] == "Time to first token"


def test_label_values_are_unescaped_and_may_hold_braces_and_commas() -> None:
    page = parse(PAGE)
    (weird,) = page.select("weird")
    assert weird.label("msg") == 'a "quoted" } brace, and\\ a\nnewline'
    assert weird.value == -math.inf
    assert math.isnan(page.value("untyped_nan"))


def test_families_fold_histogram_series_into_their_metric() -> None:
    page = parse(PAGE)
    assert page.families() == {
        "tidewire_ttft_seconds",
        "tidewire_gateway_sends",
        "tidewire_tool_jobs",
        "weird",
        "untyped_nan",
    }
    # without a TYPE line a _count is a metric of its own
    assert parse("x_count 1\n").families() == {"x_count"}


def test_histogram_sums_over_labels_but_le() -> None:
    page = parse("""\
# TYPE h histogram
h_bucket{stage="a",le="1"} 1
h_bucket{stage="b",le="1"} 2
h_bucket{stage="a",le="+Inf"} 2
h_bucket{stage="b",le="+Inf"} 4
h_sum{stage="a"} 1.5
h_sum{stage="b"} 2.5
h_count{stage="a"} 2
h_count{stage="b"} 4
""")
    both = page.histogram("h")
    assert both == Histogram(((1.0, 3.0), (math.inf, 6.0)), 4.0, 6.0)
    only_b = page.histogram("h", stage="b")
    assert only_b is not None and only_b.buckets == ((1.0, 2.0), (math.inf, 4.0)) and only_b.mean == 2.5 / 4
    assert page.histogram("nope") is None


@pytest.mark.parametrize(
    "line",
    [
        "no_value",
        'bad{le="1} 2',
        'bad{1le="x"} 2',
        'bad{a="x" b="y"} 2',
        'bad{a="x",a="y"} 2',
        "bad 1 2 3",
        "bad notanumber",
        "bad 1 1.5",
        "{} 1",
    ],
)
def test_malformed_lines_raise_when_strict_and_are_counted_otherwise(line: str) -> None:
    with pytest.raises(PromTextError):
        parse(f"ok 1\n{line}\n")
    lenient = parse(f"ok 1\n{line}\n", strict=False)
    assert lenient.skipped == 1 and lenient.value("ok") == 1


def test_merge_adds_series_across_processes() -> None:
    a = parse('c{k="1"} 2\ng 5\n')
    b = parse('c{k="1"} 3\nc{k="2"} 1\n')
    merged = promtext.merge([a, b]).series()
    assert merged == {("c", (("k", "1"),)): 5.0, ("c", (("k", "2"),)): 1.0, ("g", ()): 5.0}


def test_since_gives_the_window_between_two_scrapes() -> None:
    before = Histogram(((0.1, 2.0), (1.0, 4.0), (math.inf, 4.0)), 1.0, 4.0)
    after = Histogram(((0.1, 2.0), (1.0, 9.0), (math.inf, 10.0)), 7.0, 10.0)
    window = after.since(before)
    assert window == Histogram(((0.1, 0.0), (1.0, 5.0), (math.inf, 6.0)), 6.0, 6.0)
    assert window.quantile(0.5) == pytest.approx(0.1 + 0.9 * 3 / 5)
    assert after.since(None) is after


# ---- histogram_quantile: Prometheus's own test cases (promql engine tests, testhistogram) ---------

POSITIVE = [(0.1, 50), (0.2, 70), (1.0, 110), (math.inf, 120)]
NEGATIVE = [(-0.2, 10), (-0.1, 20), (0.3, 20), (math.inf, 30)]


@pytest.mark.parametrize(
    ("q", "positive", "negative"),
    [
        (0.0, 0.0, -0.2),
        (0.2, 0.048, -0.2),
        (0.5, 0.15, -0.15),
        (0.8, 0.72, 0.3),
        (1.0, 1.0, 0.3),
    ],
)
def test_quantiles_match_prometheus(q: float, positive: float, negative: float) -> None:
    assert histogram_quantile(q, POSITIVE) == pytest.approx(positive)
    assert histogram_quantile(q, NEGATIVE) == pytest.approx(negative)


def test_out_of_range_quantiles_are_infinite_and_nan_is_nan() -> None:
    assert histogram_quantile(-0.1, POSITIVE) == -math.inf
    assert histogram_quantile(1.01, POSITIVE) == math.inf
    assert math.isnan(histogram_quantile(math.nan, POSITIVE))


@pytest.mark.parametrize(
    "buckets",
    [
        [],
        [(math.inf, 5)],  # fewer than two buckets
        [(0.1, 1), (1.0, 2)],  # no +Inf bucket
        [(0.1, 0), (1.0, 0), (math.inf, 0)],  # no observation
    ],
)
def test_no_answer_is_nan(buckets: list[tuple[float, float]]) -> None:
    assert math.isnan(histogram_quantile(0.5, buckets))


def test_a_rank_past_the_last_finite_bucket_answers_that_bound() -> None:
    assert histogram_quantile(0.99, [(0.1, 1), (1.0, 2), (math.inf, 10)]) == 1.0


def test_empty_buckets_before_the_rank_are_skipped() -> None:
    # nothing in (0.1, 0.5]: the median of 4 observations sits in (0.5, 1] and interpolates there
    assert histogram_quantile(0.5, [(0.1, 1), (0.5, 1), (1.0, 4), (math.inf, 4)]) == pytest.approx(
        0.5 + 0.5 / 3
    )


def test_q_zero_with_an_empty_first_bucket_is_nan_as_in_prometheus() -> None:
    assert math.isnan(histogram_quantile(0.0, [(0.1, 0), (1.0, 4), (math.inf, 4)]))


def test_order_duplicates_and_non_monotonic_counts_are_repaired_like_prometheus() -> None:
    shuffled = [(math.inf, 120), (0.2, 70), (0.1, 50), (1.0, 110)]
    assert histogram_quantile(0.5, shuffled) == pytest.approx(0.15)
    # two series with the same bound (not summed by the caller) are added together
    split = [(0.1, 20), (0.1, 30), (0.2, 70), (1.0, 110), (math.inf, 120)]
    assert histogram_quantile(0.5, split) == pytest.approx(0.15)
    # a count that goes down is raised to the running maximum
    dip = [(0.1, 50), (0.2, 40), (1.0, 110), (math.inf, 120)]
    assert histogram_quantile(0.5, dip) == pytest.approx(
        histogram_quantile(0.5, [(0.1, 50), (0.2, 50), (1.0, 110), (math.inf, 120)])
    )


@given(
    st.lists(st.floats(min_value=0, max_value=100, allow_nan=False), min_size=1, max_size=200),
    st.floats(min_value=0, max_value=1),
    st.floats(min_value=0, max_value=1),
)
def test_quantiles_are_monotonic_and_within_the_finite_range(
    values: list[float], q1: float, q2: float
) -> None:
    bounds = [0.5, 1, 2.5, 5, 10, 25, 50, math.inf]
    buckets = [(b, float(sum(v <= b for v in values))) for b in bounds]
    lo, hi = sorted((q1, q2))
    a, b = histogram_quantile(lo, buckets), histogram_quantile(hi, buckets)
    if not math.isnan(a):  # q == 0 with an empty first bucket
        assert 0 <= a <= b <= 50


def test_reads_what_telemetry_renders() -> None:
    """The parser and the renderer agree: an instrument recorded here comes back with its buckets."""
    hist = telemetry.meter("test.promtext").create_histogram(
        "tidewire_test_promtext_seconds", explicit_bucket_boundaries_advisory=(0.1, 1.0)
    )
    for v in (0.05, 0.5, 0.5, 5.0):
        hist.record(v, {"route": 'x"y'})
    page = parse(telemetry.render_prometheus())
    h = page.histogram("tidewire_test_promtext_seconds", route='x"y')
    assert h is not None
    assert (
        h.buckets == ((0.1, 1.0), (1.0, 3.0), (math.inf, 4.0))
        and h.count == 4
        and h.sum == pytest.approx(6.05)
    )
    assert "tidewire_test_promtext_seconds" in page.families()
    assert h.quantile(0.5) == pytest.approx(0.1 + 0.9 * 1 / 2)


def test_a_failing_metric_source_is_left_out_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    """One broken callback must not break the page, nor be silent, nor log at every scrape."""
    broken = True

    def source() -> int:
        if broken:
            raise RuntimeError("source down")
        return 7

    telemetry.observe("tidewire_test_promtext_flaky", source)
    with caplog.at_level("INFO", logger="shared.telemetry"):
        pages = [parse(telemetry.render_prometheus()) for _ in range(3)]
        assert all("tidewire_test_promtext_flaky" not in p.families() for p in pages)
        broken = False
        assert parse(telemetry.render_prometheus()).value("tidewire_test_promtext_flaky") == 7
    messages = [r.getMessage() for r in caplog.records if "tidewire_test_promtext_flaky" in r.getMessage()]
    assert messages == [
        "metric tidewire_test_promtext_flaky is not served while its source fails",
        "metric tidewire_test_promtext_flaky is served again",
    ]


def test_reads_what_the_lean_instruments_render() -> None:
    """`telemetry.histogram` / `counter` (the hot-path instruments) render as the SDK's did: buckets
    are (previous bound, bound], cumulative, with +Inf, sum and count; one series per attribute set."""
    hist = telemetry.histogram("tidewire_test_lean_seconds", description="lean", buckets=(0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 5.0):
        hist.record(v, {"route": 'x"y'})
    hist.record(0.2)
    total = telemetry.counter("tidewire_test_lean_events", description="lean events")
    total.add(2, {"kind": "a"})
    total.add(3, {"kind": "a"})
    total.add(1)
    page = parse(telemetry.render_prometheus())
    h = page.histogram("tidewire_test_lean_seconds", route='x"y')
    assert h is not None
    assert h.buckets == ((0.1, 2.0), (1.0, 3.0), (math.inf, 4.0)), h.buckets
    assert h.count == 4 and h.sum == pytest.approx(5.65)
    both = page.histogram("tidewire_test_lean_seconds")  # summed over both series, 0.2 unlabelled
    assert both is not None and both.buckets == ((0.1, 2.0), (1.0, 4.0), (math.inf, 5.0)), both
    assert page.value("tidewire_test_lean_events", kind="a") == 5
    assert page.value("tidewire_test_lean_events") == 6
    assert telemetry.histogram("tidewire_test_lean_seconds") is hist  # one per name
