import asyncio
import itertools
import socket
import threading
import time

import pytest

from voxpipe.call import run_call
from voxpipe.pipeline import RealClock, VirtualClock
from voxpipe.testing import Say


def test_virtual_time_jumps_to_the_next_deadline():
    clock = VirtualClock()

    async def main() -> list[float]:
        seen = []
        for delay in (0.5, 10.0, 3600.0):
            await clock.sleep(delay)
            seen.append(clock.now())
        return seen

    wall = time.perf_counter()
    assert clock.run(main()) == [0.5, 10.5, 3610.5]
    assert time.perf_counter() - wall < 1.0


def test_metronome_ticks_on_schedule_without_drift():
    clock = VirtualClock()

    async def main() -> list[float]:
        ticks: list[float] = []
        done = asyncio.get_running_loop().create_future()

        async def on_tick(due: float) -> None:
            assert clock.now() == pytest.approx(due)
            ticks.append(due)
            if len(ticks) == 5000 and not done.done():
                done.set_result(None)

        metronome = clock.metronome(0.02)
        sub = metronome.subscribe(on_tick, lambda exc: None)
        await done
        await metronome.unsubscribe(sub)
        return ticks

    ticks = clock.run(main())
    assert ticks[-1] == pytest.approx(4999 * 0.02, abs=1e-9)
    metronome = clock.metronome(0.02)
    assert metronome.max_lateness == 0.0 and metronome.late_ticks == 0, "virtual time is never late"


def test_virtual_time_holds_still_while_a_worker_thread_computes():
    clock = VirtualClock()

    async def main() -> list[tuple[str, float]]:
        seen: list[tuple[str, float]] = []

        async def timer() -> None:
            await clock.sleep(10.0)
            seen.append(("timer", clock.now()))

        async def thread_job() -> None:
            await asyncio.to_thread(time.sleep, 0.05)  # real work: 50 ms of wall time, no virtual time
            seen.append(("thread", clock.now()))

        await asyncio.gather(timer(), thread_job())
        return seen

    assert clock.run(main()) == [("thread", 0.0), ("timer", 10.0)]


def test_a_thread_slower_than_the_hold_lets_time_pass_at_real_speed():
    clock = VirtualClock(thread_hold_s=0.05)

    async def main() -> tuple[float, float]:
        wall = time.perf_counter()
        with pytest.raises(TimeoutError):  # the timeout around a stuck job fires, neither at once nor never
            await asyncio.wait_for(asyncio.to_thread(time.sleep, 0.5), timeout=0.1)
        return clock.now(), time.perf_counter() - wall

    virtual, wall = clock.run(main())
    assert virtual == pytest.approx(0.1)
    assert wall >= 0.1, "virtual time ran ahead of real time while the thread was busy"


def test_past_the_hold_time_passes_at_real_speed_even_while_the_loop_is_woken():
    clock = VirtualClock(thread_hold_s=0.05)

    async def main() -> float:
        loop = asyncio.get_running_loop()
        stop = threading.Event()

        def waker() -> None:  # another thread (a model streaming tokens) waking the loop every 10 ms
            while not stop.wait(0.01):
                loop.call_soon_threadsafe(lambda: None)

        threading.Thread(target=waker, daemon=True).start()
        try:
            with pytest.raises(TimeoutError):  # the wake-ups must not freeze time around the stuck job
                await asyncio.wait_for(asyncio.to_thread(time.sleep, 1.0), timeout=0.1)
        finally:
            stop.set()
        return clock.now()

    assert clock.run(main()) == pytest.approx(0.1, abs=0.02)


def test_each_thread_job_gets_its_own_hold():
    clock = VirtualClock(thread_hold_s=0.5)

    async def main() -> float:
        async def ticker() -> None:  # timers keep coming, as a metronome's do
            while True:
                await clock.sleep(0.01)

        ticking = asyncio.create_task(ticker())
        long_job = asyncio.ensure_future(asyncio.to_thread(time.sleep, 1.5))  # a whole llama.cpp reply, say
        await asyncio.to_thread(time.sleep, 0.6)  # outlasts its own hold
        before = clock.now()
        await asyncio.to_thread(time.sleep, 0.02)  # a short job beside the long one: held all the same
        took = clock.now() - before
        ticking.cancel()
        await long_job
        return took

    assert clock.run(main()) == 0.0


async def test_real_clock_sleeps_for_real():
    clock = RealClock()
    start = clock.now()
    await clock.sleep_until(start + 0.05)
    assert clock.now() - start >= 0.045


def _five_minute_script() -> list:
    lines = [
        "I would like to change my booking please",
        "It is under the name Rossi",
        "Can we move it to Friday at eight",
        "Four people instead of two",
        "Do you have a table outside",
    ]
    return [Say(lines[i % len(lines)], pause=1.5) for i in range(60)]


def test_five_minute_call_gives_a_bit_identical_trace_on_every_run(tmp_path):
    # Its wall time is measured by benchmarks/virtual_call.py, not asserted here (timed tests flake).
    replies = ["Sure, let me look at that for you. One moment please, I am checking the book now."]
    outputs = []
    for run in range(2):
        result = run_call(_five_minute_script(), tmp_path / f"run{run}", replies=replies)
        outputs.append([(tmp_path / f"run{run}" / name).read_bytes() for name in ("trace.jsonl", "recording.wav")])
        last_mark = max(max(t.marks.values()) for t in result.turns)
        assert last_mark >= 300, f"the call should last five minutes, lasted {last_mark:.0f} s"
        assert len(result.turns) == 60
    assert outputs[0] == outputs[1]


def test_pipelines_without_a_clock_share_one_metronome():
    from voxpipe.pipeline import Pipeline, Stage

    first, second = Pipeline([Stage()]), Pipeline([Stage()])
    assert first.clock is second.clock
    assert first.clock.metronome(0.02) is second.clock.metronome(0.02)


def test_a_short_call_on_the_wall_clock_agrees_with_its_recording(tmp_path):
    from voxpipe.measure import measure_voice_to_voice

    result = run_call([Say("Hello there.", pause=0.2)], tmp_path, replies=["Hi, how can I help?"], clock=RealClock())
    assert result.outcome == "ended"
    [turn] = result.turns
    [measured] = measure_voice_to_voice(tmp_path / "recording.wav")
    assert abs(turn.voice_to_voice_ms - measured.voice_to_voice_ms) <= 20


def test_metronome_spreads_calls_over_phase_slots_and_keeps_a_call_together():
    clock = VirtualClock()

    async def main() -> dict[str, list[float]]:
        seen: dict[str, list[float]] = {}
        metronome = clock.metronome(0.02)
        subs = []
        for name, group in (("a-in", "a"), ("a-out", "a"), ("b-in", "b"), ("c-in", "c")):

            async def on_tick(due: float, name: str = name) -> None:
                seen.setdefault(name, []).append(due)

            subs.append(metronome.subscribe(on_tick, lambda exc: None, group=group))
        await clock.sleep(0.1)
        for sub in subs:
            await metronome.unsubscribe(sub)
        return seen

    seen = clock.run(main())
    assert seen["a-in"] == seen["a-out"], "a call's input and output tick together"
    offsets = {name: round((ticks[0] % 0.02) * 1000, 6) for name, ticks in seen.items()}
    assert offsets == {"a-in": 0.0, "a-out": 0.0, "b-in": 2.0, "c-in": 4.0}
    assert all(round(b - a, 9) == 0.02 for ticks in seen.values() for a, b in itertools.pairwise(ticks))


def test_the_virtual_loop_polls_sockets_while_callbacks_are_ready():
    """A task that keeps callbacks ready (sleep(0) in a loop) while it waits for a socket: asyncio's loop polls I/O
    every iteration, and so must the virtual one, or the data never arrives."""

    async def main() -> bool:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        with ours, theirs:
            ours.setblocking(False)
            got: asyncio.Future[bytes] = loop.create_future()
            loop.add_reader(ours, lambda: got.done() or got.set_result(ours.recv(10)))
            theirs.send(b"hi")
            for _ in range(1000):
                if got.done():
                    break
                await asyncio.sleep(0)
            loop.remove_reader(ours)
            return got.done() and got.result() == b"hi"

    assert VirtualClock().run(main())


def test_a_failing_subscriber_and_its_failing_error_handler_leave_the_metronome_ticking():
    clock = VirtualClock()
    failures: list[str] = []

    async def main() -> list[float]:
        metronome = clock.metronome(0.02)
        ticks: list[float] = []

        async def fails(due: float) -> None:
            raise ConnectionError("the caller hung up")

        async def raises_a_stray_cancel(due: float) -> None:
            raise asyncio.CancelledError  # as awaiting a task someone else cancelled does

        async def counts(due: float) -> None:
            ticks.append(due)

        def broken_handler(exc: Exception) -> None:
            raise RuntimeError("the error handler itself fails")

        metronome.subscribe(fails, broken_handler)
        metronome.subscribe(raises_a_stray_cancel, lambda exc: failures.append(type(exc).__name__))
        counting = metronome.subscribe(counts, lambda exc: None)
        await clock.sleep(1.0)
        await metronome.unsubscribe(counting)  # the last one out: stops the metronome, raises nothing
        return ticks

    ticks = clock.run(main())
    assert len(ticks) == 50
    assert failures == ["StrayCancellation"]
    assert clock.metronome(0.02).subscribers == 0
