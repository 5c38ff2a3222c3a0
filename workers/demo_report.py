"""What ``rmq demo`` shows: the live view, each session's results, and the summary."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from rmq.core.units import format_bytes

__all__ = ["DemoResult", "SessionReport", "print_sessions", "print_summary", "view"]

#: the largest round-trip word error rate a real session may show and still count as understood
MAX_WER = 0.40


@dataclass
class SessionReport:
    """One session's results, read from its tasks' results (real mode fills the text fields)."""

    session_id: str
    lang: str
    failed: str = ""  # "<step>: <error>" when a step failed
    said: str = ""
    heard: str = ""
    wer: float | None = None
    translation: str = ""
    match: float | None = None
    file: str = ""
    file_bytes: int = 0
    seconds: float | None = None  # the output's duration, decoded by the demo itself
    invalid: str = ""  # why the output is not valid audio

    def understood(self) -> bool:
        """The transcript recovered most of the input (word error rate at most ``MAX_WER``)."""
        return self.wer is not None and self.wer <= MAX_WER


@dataclass
class DemoResult:
    """What the demo saw, for the summary and for tests."""

    mode: str = "real"
    states: Counter = field(default_factory=Counter)
    unaccounted: list[str] = field(default_factory=list)
    runaway: str = ""
    snapshot: dict[str, Any] = field(default_factory=dict)
    sessions: list[SessionReport] = field(default_factory=list)
    seconds: float = 0.0

    def ok(self) -> bool:
        """Every task accounted for and, in real mode, every encoded file valid audio."""
        return not self.unaccounted and not any(s.invalid for s in self.sessions)


def _title(mode: str) -> str:
    if mode == "real":
        return "rmq demo (real pipeline: eSpeak NG, PocketSphinx, Silero VAD, ffmpeg)"
    return "rmq demo (synthetic workloads: real memory, no real models)"


def view(mode: str, snapshot: dict[str, Any], states: Counter, depths: dict[str, int], plain: bool) -> Any:
    """One line (``plain``) or a rich table of the worker's state."""
    mem = snapshot.get("memory", {})
    counters = snapshot.get("counters", {})
    models = {pid: [m.get("name") for m in (g.get("models") or [])]
              for pid, g in (snapshot.get("processes") or {}).items()}
    ratio = mem.get("ratio", 0.0) or 0.0
    if plain:
        return (f"memory {format_bytes(mem.get('worker_bytes'))} / {format_bytes(mem.get('budget_bytes'))} "
                f"({ratio:.0%}, {mem.get('zone', '?')})  queues {depths}  tasks {dict(states)}  "
                f"deferred {sum((counters.get('deferred') or {}).values())} killed {counters.get('killed', 0)}  "
                f"models {models}")
    from rich.table import Table

    from rmq.monitoring.status import memory_bar

    table = Table(title=_title(mode), expand=True)
    table.add_column("what", style="bold")
    table.add_column("state")
    table.add_row("memory", f"{memory_bar(ratio, 30)} {format_bytes(mem.get('worker_bytes'))} / "
                  f"{format_bytes(mem.get('budget_bytes'))} ({ratio:.0%}) zone={mem.get('zone')}")
    table.add_row("peak", f"{format_bytes(mem.get('peak_bytes'))}")
    table.add_row("queues", ", ".join(f"{q}={n}" for q, n in depths.items()))
    for pid, names in sorted(models.items()):
        table.add_row(f"models pid {pid}", ", ".join(n for n in names if n) or "-")
    table.add_row("tasks", ", ".join(f"{k}={v}" for k, v in sorted(states.items())))
    deferred = counters.get("deferred") or {}
    table.add_row("governor", f"admitted={counters.get('admitted', 0)} deferred={dict(deferred)} "
                  f"killed={counters.get('killed', 0)} unload requests={counters.get('unload_requests', 0)} "
                  f"paused={snapshot.get('paused')}")
    return table


def print_sessions(result: DemoResult) -> None:
    """Each session: what was said, heard, translated and encoded (real mode)."""
    if result.mode != "real":
        return
    print("\n=== sessions (real pipeline) ===")
    for s in result.sessions:
        print(f"{s.session_id} (en -> {s.lang})")
        if s.failed:
            print(f"  FAILED       : {s.failed}")
        print(f"  said         : {s.said}")
        if s.wer is not None:
            print(f"  heard        : {s.heard}  (word error rate {s.wer:.0%})")
        if s.translation:
            match = f"  (phrasebook match {s.match:.0%})" if s.match is not None else ""
            print(f"  translation  : {s.translation}{match}")
        if s.file or s.invalid:
            what = f"{s.seconds:.2f} s of audio" if s.seconds is not None else f"NOT VALID AUDIO: {s.invalid}"
            print(f"  output       : {s.file} ({format_bytes(s.file_bytes)} opus, {what}, decoded with ffmpeg)")


def print_summary(result: DemoResult, runaway: Any) -> None:
    """The resource story, and in real mode the round trip's quality."""
    snap = result.snapshot
    mem = snap.get("memory", {})
    counters = snap.get("counters", {})
    models = counters.get("models") or {}
    sessions = counters.get("sessions") or {}
    budget = mem.get("budget_bytes") or 0
    peak = mem.get("peak_bytes") or 0
    label = "real pipeline" if result.mode == "real" else "synthetic workloads"
    print(f"\n=== rmq demo summary ({label}) ===")
    print(f"tasks by final state : {dict(result.states)}")
    print(f"unaccounted tasks    : {len(result.unaccounted)} {result.unaccounted[:5]}")
    if result.mode == "real":
        wers = [s.wer for s in result.sessions if s.wer is not None]
        valid = [s for s in result.sessions if s.seconds is not None]
        if wers:
            print(f"round trip           : word error rate mean {sum(wers) / len(wers):.0%}, worst {max(wers):.0%} "
                  f"({sum(s.understood() for s in result.sessions)}/{len(result.sessions)} sessions at most "
                  f"{MAX_WER:.0%})")
        print(f"output files         : {len(valid)}/{len(result.sessions)} valid audio, "
              f"{sum(s.seconds or 0 for s in valid):.1f} s in all")
    print(f"runaway task         : {runaway.state} {type(runaway.result).__name__ if runaway.result else ''}: "
          f"{runaway.result}")
    print(f"admitted             : {counters.get('admitted', 0)}")
    print(f"deferrals            : {dict(counters.get('deferred') or {})}")
    print(f"kills                : {counters.get('killed', 0)}")
    print(f"model unloads        : {dict(models.get('evictions') or {})} "
          f"(loads {models.get('loads', 0)}, hits {models.get('hits', 0)}, "
          f"{format_bytes(models.get('bytes_unloaded', 0))} unloaded)")
    print(f"sessions             : {dict(sessions)}; cleaned by beat: {counters.get('sessions_cleaned', 0)}")
    print(f"peak memory          : {format_bytes(peak)} of a {format_bytes(budget)} budget "
          f"({(peak / budget if budget else 0):.0%}) - {'within' if peak <= budget else 'OVER'} the budget")
    print(f"took                 : {result.seconds:.0f}s")
    print("every task accounted for" if not result.unaccounted else "SOME TASKS ARE UNACCOUNTED FOR")
    if any(s.invalid for s in result.sessions):
        print("SOME OUTPUT FILES ARE NOT VALID AUDIO")
