"""Per-turn latency trace.

Stages record *marks* (clock times) for a turn, keyed by the turn's epoch. When the turn's reply finishes or is
cut, the :class:`Tracer` turns the marks into a :class:`TurnRecord` whose critical-path segments add up exactly to
the voice-to-voice time: each mark is clamped to be no earlier than the one before it, and the arithmetic is
done in whole microseconds so the sum is exact, not merely close.

Observers see marks live (:meth:`Tracer.on_mark`) and finished turns (:meth:`Tracer.on_turn`);
:class:`JsonlTraceWriter` is such an observer that writes one JSON line per turn as it finishes. A mark or data that
comes for a turn after it finished (a stage unwinding after a barge-in, an error reported late) amends that turn's
record, never the turn in progress: the breakdown is recomputed, :attr:`TurnRecord.late` names what came late, and
:meth:`Tracer.on_late` observers see the amended record.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

# The critical path of a turn, in causal order, and the segment that ends at each mark.
CRITICAL_PATH: tuple[tuple[str, str], ...] = (
    ("turn.end_detected", "endpointing"),
    ("stt.final", "stt"),
    ("llm.request", "turn"),
    ("llm.first_token", "llm_ttft"),
    ("llm.first_chunk", "first_chunk"),
    ("tts.first_audio", "tts_ttfb"),
    ("out.first_play", "playout"),
)
SEGMENTS: tuple[str, ...] = tuple(segment for _, segment in CRITICAL_PATH)
START_MARK = "user.speech_end"
END_MARKS = ("out.done", "out.interrupted")

MarkObserver = Callable[[int, str, float, dict[str, Any]], None]
TurnObserver = Callable[["TurnRecord"], None]


def _us(seconds: float) -> int:
    return round(seconds * 1_000_000)


@dataclass
class TurnRecord:
    """One finished turn: its marks, its critical-path breakdown and what the caller heard."""

    turn: int
    marks: dict[str, float]
    segments_us: dict[str, int]
    voice_to_voice_us: int | None
    missing: list[str]
    interrupted: bool = False
    heard: list[str] = field(default_factory=list)
    played_s: float = 0.0
    data: dict[str, Any] = field(default_factory=dict)
    late: list[str] = field(default_factory=list)
    """Marks and data keys that came after the turn finished: the record first sent to observers had none of them."""

    @property
    def voice_to_voice_ms(self) -> float | None:
        return None if self.voice_to_voice_us is None else self.voice_to_voice_us / 1000

    @property
    def segments_ms(self) -> dict[str, float]:
        return {name: us / 1000 for name, us in self.segments_us.items()}

    def to_json(self) -> dict[str, Any]:
        record = asdict(self)
        record.pop("segments_us")
        record.pop("voice_to_voice_us")
        record["voice_to_voice_ms"] = self.voice_to_voice_ms
        record["segments_ms"] = self.segments_ms
        return record


def breakdown(marks: dict[str, float]) -> tuple[dict[str, int], int | None, list[str]]:
    """Critical-path segments (µs), voice-to-voice (µs) and the missing marks, from a turn's marks.

    Voice-to-voice is ``out.first_play - user.speech_end``; the segments telescope to exactly that. A missing
    mark makes its segment zero (and is listed), so a pipeline without, say, a separate STT still adds up.
    """
    missing = [name for name in (START_MARK, *(m for m, _ in CRITICAL_PATH)) if name not in marks]
    if START_MARK not in marks or "out.first_play" not in marks:
        return {}, None, missing
    start = _us(marks[START_MARK])
    end = max(_us(marks["out.first_play"]), start)
    segments: dict[str, int] = {}
    previous = start
    for mark, segment in CRITICAL_PATH:
        at = _us(marks[mark]) if mark in marks else previous
        at = min(max(at, previous), end)
        segments[segment] = at - previous
        previous = at
    return segments, end - start, missing


class Tracer:
    """Collects marks per turn and emits :class:`TurnRecord` objects as turns finish."""

    def __init__(self) -> None:
        self._open: dict[int, tuple[dict[str, float], dict[str, Any]]] = {}
        self._finished: dict[int, TurnRecord] = {}
        self.turns: list[TurnRecord] = []
        self._mark_observers: list[MarkObserver] = []
        self._turn_observers: list[TurnObserver] = []
        self._late_observers: list[TurnObserver] = []

    # ------------------------------------------------------------------------------ observers

    def on_mark(self, observer: MarkObserver) -> Callable[[], None]:
        """Call ``observer(turn, name, at, data)`` for every mark as it is recorded. Returns an unsubscribe."""
        self._mark_observers.append(observer)
        return lambda: self._mark_observers.remove(observer)

    def on_turn(self, observer: TurnObserver) -> Callable[[], None]:
        """Call ``observer(record)`` for every turn as it finishes. Returns an unsubscribe."""
        self._turn_observers.append(observer)
        return lambda: self._turn_observers.remove(observer)

    def on_late(self, observer: TurnObserver) -> Callable[[], None]:
        """Call ``observer(record)`` each time a finished turn's record is amended by a mark or data that came after
        it finished (the record is the one :meth:`on_turn` observers got). Returns an unsubscribe."""
        self._late_observers.append(observer)
        return lambda: self._late_observers.remove(observer)

    # ---------------------------------------------------------------------------------- marks

    def mark(self, turn: int, name: str, at: float, **data: Any) -> None:
        """Record mark ``name`` at clock time ``at`` for ``turn``. The first value of a mark wins. A mark for a turn
        that has finished amends its record (:meth:`on_late`)."""
        finished = self._finished.get(turn)
        if finished is None:
            marks, extra = self._open.setdefault(turn, ({}, {}))
            if name not in marks:
                marks[name] = at
            extra.update(data)
        for observer in self._mark_observers:
            observer(turn, name, at, data)
        if finished is not None:
            self._amend(finished, {name: at}, data)
        elif name in END_MARKS:
            self.finish(turn)

    def annotate(self, turn: int, **data: Any) -> None:
        """Attach data (texts, tool calls, usage, errors) to a turn without recording a mark. Data for a turn that
        has finished amends its record (:meth:`on_late`)."""
        finished = self._finished.get(turn)
        if finished is not None:
            self._amend(finished, {}, data)
            return
        self._open.setdefault(turn, ({}, {}))[1].update(data)

    def _amend(self, record: TurnRecord, marks: dict[str, float], data: dict[str, Any]) -> None:
        """Marks and data that came after ``record`` was sent: the record takes them (the first value of a mark
        still wins) with its breakdown recomputed, and names them in ``late``. The turn's ending (interrupted,
        heard, played) stays the one it finished with: a later end mark is kept as a mark, its data as data."""
        added = {name: at for name, at in marks.items() if name not in record.marks}
        if not added and not data:
            return  # a mark it has already: nothing changed
        if added:
            everything = {**record.marks, **added}
            record.marks = dict(sorted(everything.items(), key=lambda item: item[1]))
            record.segments_us, record.voice_to_voice_us, record.missing = breakdown(record.marks)
        record.data.update(data)
        record.late.extend(name for name in (*added, *data) if name not in record.late)
        for observer in self._late_observers:
            observer(record)

    def has_marks(self, turn: int) -> bool:
        """True when ``turn`` has at least one mark (finished, or still open): it is a turn, not just data."""
        if turn in self._finished:
            return True
        opened = self._open.get(turn)
        return opened is not None and bool(opened[0])

    def finish(self, turn: int) -> TurnRecord | None:
        """Close ``turn`` now (done automatically at ``out.done``/``out.interrupted``)."""
        opened = self._open.pop(turn, None)
        if opened is None:
            return None
        marks, extra = opened
        segments, v2v, missing = breakdown(marks)
        record = TurnRecord(
            turn=turn,
            marks=dict(sorted(marks.items(), key=lambda item: item[1])),
            segments_us=segments,
            voice_to_voice_us=v2v,
            missing=missing,
            interrupted="out.interrupted" in marks,
            heard=list(extra.pop("heard", [])),
            played_s=float(extra.pop("played_s", 0.0)),
            data=extra,
        )
        self.turns.append(record)
        self._finished[turn] = record
        for observer in self._turn_observers:
            observer(record)
        return record

    def close(self) -> None:
        """Finish every turn still open (end of call). One with data but no marks is not a turn — say, usage
        counted before the caller first spoke — and is dropped (a pipeline's :class:`UsageMeter` gives its usage
        back to ``unassigned`` first)."""
        for turn in sorted(self._open):
            if self._open[turn][0]:
                self.finish(turn)
        self._open.clear()

    def summary(self) -> Summary:
        return Summary.of(self.turns)


@dataclass(frozen=True)
class Stat:
    """p50/p95/max of one segment over the turns that have it, in milliseconds."""

    n: int
    p50: float
    p95: float
    max: float


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (the same definition as numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Summary:
    """Percentiles per segment and for voice-to-voice over the turns that were answered."""

    stats: dict[str, Stat]

    @classmethod
    def of(cls, turns: Iterable[TurnRecord]) -> Summary:
        answered = [t for t in turns if t.voice_to_voice_us is not None]
        columns: dict[str, list[float]] = {name: [] for name in (*SEGMENTS, "voice_to_voice")}
        for record in answered:
            for name, ms in record.segments_ms.items():
                columns[name].append(ms)
            assert record.voice_to_voice_ms is not None
            columns["voice_to_voice"].append(record.voice_to_voice_ms)
        stats = {name: Stat(len(v), percentile(v, 50), percentile(v, 95), max(v)) for name, v in columns.items() if v}
        return cls(stats)

    def rows(self) -> list[tuple[str, int, float, float, float]]:
        return [(name, s.n, s.p50, s.p95, s.max) for name, s in self.stats.items()]


class JsonlTraceWriter:
    """A turn observer that appends one JSON line per finished turn and flushes it at once.

    A turn's record can still gain marks and data after it finished: a reply cancelled by a barge-in counts its usage
    as its stream closes, after the playout cut ended the turn; a tool that ran on reports its error. Subscribed to
    :meth:`Tracer.on_late` as well, the writer appends the amended record: the last line of a turn is its record so
    far, and its ``late`` names what the earlier lines lacked. :meth:`rewrite` replaces the lines with the settled
    records, one per turn, at the end of the call.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file: IO[str] = self.path.open("w", encoding="utf-8")

    def __call__(self, record: TurnRecord) -> None:
        self._file.write(_json_line(record))
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def rewrite(self, records: Iterable[TurnRecord]) -> None:
        """Close, and replace the file with ``records`` (atomically: a reader sees the old lines or the new)."""
        self.close()
        settled = self.path.with_name(self.path.name + ".settled")
        settled.write_text("".join(_json_line(record) for record in records), encoding="utf-8")
        settled.replace(self.path)


def _json_line(record: TurnRecord) -> str:
    return json.dumps(record.to_json(), separators=(",", ":")) + "\n"
