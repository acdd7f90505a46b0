"""Reading Prometheus text exposition (format 0.0.4) and `histogram_quantile`, once for everyone.

`tidewire top`, the benchmarks and the integration tests all read `/metrics` pages. Each used to
parse them and interpolate quantiles its own way, and the copies had drifted apart (an empty bucket,
a rank past the last finite bound). This module is the one reader: `parse(text)` gives an
`Exposition` (samples with their labels, plus the `# TYPE`/`# HELP` metadata), and
`histogram_quantile(q, buckets)` follows Prometheus's own `bucketQuantile` (promql/quantile.go)
case by case, so a number printed here is the number a PromQL query would give:

- q < 0 → -Inf, q > 1 → +Inf, q NaN → NaN;
- no `+Inf` bucket, fewer than two buckets, or zero observations → NaN;
- buckets with the same bound are added together, counts that decrease are raised to the running
  maximum (after float noise below 1e-12 relative is smoothed), as Prometheus does;
- the rank `q·n` is found in the first bucket whose cumulative count reaches it, and interpolated
  linearly inside it from the previous bound (0 for the first bucket, unless its bound is <= 0:
  then that bound is the answer); a rank in the `+Inf` bucket answers the highest finite bound.

NaN, not None, is "no answer": it is what Prometheus returns, and `math.isnan` tells it apart.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

__all__ = [
    "Exposition",
    "Histogram",
    "Labels",
    "PromTextError",
    "Sample",
    "histogram_quantile",
    "merge",
    "parse",
]

Labels = tuple[tuple[str, str], ...]  # sorted by label name
SeriesKey = tuple[str, Labels]

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\\n]|\\.)*)"\s*(,?)')
_UNESCAPE = re.compile(r"\\(.)")
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
_SUMMARY_SUFFIXES = ("_sum", "_count")


class PromTextError(ValueError):
    """A line of the page is not Prometheus text format (only raised by `parse(strict=True)`)."""


class Sample(NamedTuple):
    name: str
    labels: Labels
    value: float
    timestamp_ms: int | None = None

    def label(self, key: str) -> str | None:
        for k, v in self.labels:
            if k == key:
                return v
        return None


def _unescape(raw: str) -> str:
    return _UNESCAPE.sub(lambda m: "\n" if m.group(1) == "n" else m.group(1), raw)


def _parse_labels(body: str, lineno: int) -> Labels:
    out: dict[str, str] = {}
    pos = 0
    while pos < len(body):
        if body[pos:].strip() == "":
            break
        m = _LABEL.match(body, pos)
        if m is None:
            raise PromTextError(f"line {lineno}: bad label set {{{body}}}")
        key, raw, comma = m.groups()
        if key in out:
            raise PromTextError(f"line {lineno}: label {key} given twice")
        out[key] = _unescape(raw)
        pos = m.end()
        if not comma and body[pos:].strip():
            raise PromTextError(f"line {lineno}: expected ',' between labels in {{{body}}}")
    return tuple(sorted(out.items()))


def _label_end(line: str, start: int) -> int:
    """Index of the '}' closing the label set opened at `start` (quotes and escapes respected)."""
    quoted = False
    i = start
    while i < len(line):
        c = line[i]
        if quoted:
            if c == "\\":
                i += 1
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c == "}":
            return i
        i += 1
    return -1


def _parse_sample(line: str, lineno: int) -> Sample:
    m = _NAME.match(line)
    if m is None:
        raise PromTextError(f"line {lineno}: no metric name in {line!r}")
    name, pos = m.group(0), m.end()
    labels: Labels = ()
    if pos < len(line) and line[pos] == "{":
        end = _label_end(line, pos + 1)
        if end < 0:
            raise PromTextError(f"line {lineno}: unterminated label set in {line!r}")
        labels = _parse_labels(line[pos + 1 : end], lineno)
        pos = end + 1
    rest = line[pos:].split()
    if not rest or len(rest) > 2 or (pos < len(line) and not line[pos].isspace()):
        raise PromTextError(f"line {lineno}: expected '<name>[{{labels}}] <value> [timestamp]' in {line!r}")
    try:
        value = float(rest[0])  # accepts +Inf, -Inf, NaN
        timestamp = int(rest[1]) if len(rest) == 2 else None
    except ValueError:
        raise PromTextError(f"line {lineno}: bad value or timestamp in {line!r}") from None
    return Sample(name, labels, value, timestamp)


@dataclass(frozen=True)
class Histogram:
    """A classic histogram: cumulative (upper bound, count) pairs sorted by bound, plus sum and count."""

    buckets: tuple[tuple[float, float], ...]
    sum: float = 0.0
    count: float = 0.0

    def quantile(self, q: float) -> float:
        return histogram_quantile(q, self.buckets)

    def since(self, before: Histogram | None) -> Histogram:
        """What was observed between an earlier scrape and this one (PromQL's `increase`, without
        reset handling: a restarted process shows negative counts, hence NaN quantiles)."""
        if before is None:
            return self
        prev = dict(before.buckets)
        return Histogram(
            tuple((b, c - prev.get(b, 0.0)) for b, c in self.buckets),
            self.sum - before.sum,
            self.count - before.count,
        )

    @property
    def mean(self) -> float:
        return self.sum / self.count if self.count > 0 else math.nan


@dataclass(frozen=True)
class Exposition:
    """One parsed page: samples in page order, and the metadata lines (`types`, `helps`)."""

    samples: tuple[Sample, ...]
    types: Mapping[str, str] = field(default_factory=dict)
    helps: Mapping[str, str] = field(default_factory=dict)
    skipped: int = 0  # malformed lines ignored by parse(strict=False)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def family(self, sample_name: str) -> str:
        """The metric a sample belongs to: `x_bucket` / `x_sum` / `x_count` of a histogram (or the
        sum and count of a summary) belong to `x` when the page declares its type."""
        for suffix in _HISTOGRAM_SUFFIXES:
            if sample_name.endswith(suffix):
                base = sample_name[: -len(suffix)]
                kind = self.types.get(base)
                if kind == "histogram" or (kind == "summary" and suffix in _SUMMARY_SUFFIXES):
                    return base
        return sample_name

    def families(self) -> set[str]:
        """Every metric the page serves at least one sample of."""
        return {self.family(s.name) for s in self.samples}

    def series(self) -> dict[SeriesKey, float]:
        """{(name, labels): value}; a series given twice keeps its last value."""
        return {(s.name, s.labels): s.value for s in self.samples}

    def select(self, name: str, **match: str) -> Iterator[Sample]:
        """The samples of `name` whose labels include every `match` pair."""
        want = set(match.items())
        return (s for s in self.samples if s.name == name and want <= set(s.labels))

    def value(self, name: str, *, default: float = 0.0, **match: str) -> float:
        """The sum over every matching series (one series: its value); `default` when none matches."""
        return self._sum(name, match, default)

    def _sum(self, name: str, match: Mapping[str, str], default: float = 0.0) -> float:
        found = [s.value for s in self.select(name, **match)]
        return math.fsum(found) if found else default

    def histogram(self, name: str, **match: str) -> Histogram | None:
        """The histogram `name` summed over every label but `le` (PromQL `sum by (le)`); None when
        the page has no bucket of it."""
        acc: dict[float, float] = {}
        for s in self.select(name + "_bucket", **match):
            le = s.label("le")
            if le is None:
                continue
            try:
                bound = float(le)
            except ValueError:
                continue
            acc[bound] = acc.get(bound, 0.0) + s.value
        if not acc:
            return None
        return Histogram(
            tuple(sorted(acc.items())), self._sum(name + "_sum", match), self._sum(name + "_count", match)
        )


def parse(text: str, *, strict: bool = True) -> Exposition:
    """Parses a page. With `strict` a malformed line raises PromTextError (a test wants to know);
    without, it is skipped and counted in `skipped` (a live view should keep going)."""
    samples: list[Sample] = []
    types: dict[str, str] = {}
    helps: dict[str, str] = {}
    skipped = 0
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            parts = line[1:].split(None, 2)
            if len(parts) >= 2 and parts[0] == "TYPE":
                types[parts[1]] = parts[2].strip() if len(parts) == 3 else "untyped"
            elif len(parts) >= 2 and parts[0] == "HELP":
                helps[parts[1]] = _unescape(parts[2]) if len(parts) == 3 else ""
            continue
        try:
            samples.append(_parse_sample(line, lineno))
        except PromTextError:
            if strict:
                raise
            skipped += 1
    return Exposition(tuple(samples), types, helps, skipped)


def merge(pages: Iterable[Exposition]) -> Exposition:
    """One page holding the sum of each series over several processes (counters and histogram
    buckets add up; so do gauges such as open sockets: take `max` yourself where that is wrong)."""
    acc: dict[SeriesKey, float] = {}
    types: dict[str, str] = {}
    helps: dict[str, str] = {}
    for page in pages:
        types.update(page.types)
        helps.update(page.helps)
        for s in page.samples:
            key = (s.name, s.labels)
            acc[key] = acc.get(key, 0.0) + s.value
    return Exposition(tuple(Sample(n, labels, v) for (n, labels), v in acc.items()), types, helps)


def histogram_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float:
    """Prometheus's `histogram_quantile(q, …)` over cumulative (upper bound, count) pairs, in any order."""
    if math.isnan(q):
        return math.nan
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    bs = sorted(([float(b), float(c)] for b, c in buckets), key=lambda bc: bc[0])
    if not bs or not math.isinf(bs[-1][0]) or bs[-1][0] < 0:
        return math.nan
    coalesced: list[list[float]] = []
    for b, c in bs:
        if coalesced and coalesced[-1][0] == b:
            coalesced[-1][1] += c
        else:
            coalesced.append([b, c])
    bs = coalesced
    # float noise first (Prometheus's correctPrecisionErrors, tolerance 1e-12), then the envelope
    prev = bs[0][1]
    for bc in bs[1:]:
        delta = abs(bc[1] - prev)
        if delta == 0:
            continue
        if bc[1] != 0 and delta / bc[1] <= 1e-12:
            bc[1] = prev
        else:
            prev = bc[1]
    top = bs[0][1]
    for bc in bs[1:]:
        if bc[1] > top:
            top = bc[1]
        elif bc[1] < top:
            bc[1] = top
    if len(bs) < 2:
        return math.nan
    observations = bs[-1][1]
    if observations == 0:
        return math.nan
    rank = q * observations
    b = next((i for i in range(len(bs) - 1) if bs[i][1] >= rank), len(bs) - 1)
    if b == len(bs) - 1:
        return bs[-2][0]
    if b == 0 and bs[0][0] <= 0:
        return bs[0][0]
    start, end, count = 0.0, bs[b][0], bs[b][1]
    if b > 0:
        start = bs[b - 1][0]
        count -= bs[b - 1][1]
        rank -= bs[b - 1][1]
    if count == 0:  # only when q == 0 and the first bucket is empty: 0/0 in Prometheus
        return math.nan
    return start + (end - start) * (rank / count)
