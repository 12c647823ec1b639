"""A fuzzer for policy loading: mutated shipped policies, raw bytes and alias bombs.

Every input goes through ``guardrail validate`` as a user runs it (stdout and stderr are
strict UTF-8, as a terminal is). The budget is fixed (derandomised, 1000 examples), so CI
runs the same inputs every time. Targets: no traceback, every input answered in 2 s, and
an input of up to 1 MB in at most 200 MB.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import time
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guardrail.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = 1000
SECONDS_PER_INPUT = 2.0
PEAK_BYTES = 200 * 2**20

SMALL_SEEDS = [
    b"name: p\nmodel: {source: smollm2-135m-instruct}\n",
    b"extends: base-qwen2.5-coder-0.5b.yaml\nname: child\ngeneration: {max_new_tokens: 8}\n",
    b"name: p\nmodel: &m {source: '${GUARDRAIL_FUZZ_UNSET:-x}'}\nother: *m\n"
    b"rails: [{name: r, layers: [1, 2], energy_model: {plugin: mlp, artifact: a.safetensors}}]\n",
]
FRAGMENTS = [
    b"&a ", b"*a", b"<<: *a\n", b"[", b"]", b"{", b"}", b": ", b"- ", b"? ", b", ", b"|\n", b">\n",
    b"!!binary ", b"!!python/object:os.system ", b"!custom ", b'"\\0"', b'"\\ud800"', b'"\\x00"',
    b"${GUARDRAIL_FUZZ_UNSET}", b"${GUARDRAIL_FUZZ_UNSET:-}", b"${HOME}", b"\t", b"\n", b"'", b'"',
    b"extends: ", b"extends: fuzz.yaml\n", b"---\n", b"...\n", b"%YAML 1.1\n", b"#", b"\xef\xbb\xbf",
    b"\xff", b"\x00", b"~", b".inf", b".nan", b"-1", b"0", b"1.0e+30", b"9" * 5000, b"layers: []",
    b"layers: auto", b"artifact: /", b"artifact: .", b"hidden: [-5, 0]", b"rail: nosuchrail",
    b"sample: 1.0e+30", b"name: name\nname: x\n", b"2024-01-01", b"\xe2\x80\xae", b"\\",
    b"~nosuchuser/", b"artifact: ~nosuchuser/a", b"source: ~nosuchuser", b"a" * 5000 + b"/",
]


def alias_bomb(levels: int, fanout: int) -> bytes:
    lines = [f"b0: &b0 [{', '.join(['lol'] * fanout)}]"]
    lines += [f"b{i}: &b{i} [{', '.join([f'*b{i - 1}'] * fanout)}]" for i in range(1, levels)]
    return ("\n".join(lines) + "\n").encode()


@st.composite
def policy_inputs(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A seed with 1-4 mutations, raw bytes (10%), or a seed with an alias bomb or deep nesting."""
    kind = draw(st.integers(0, 19))
    if kind < 2:
        return draw(st.binary(max_size=4096))
    data = bytearray(draw(st.sampled_from(seeds)))
    if kind == 2:
        return bytes(data) + alias_bomb(draw(st.integers(3, 12)), draw(st.integers(2, 16)))
    if kind == 3:
        depth = draw(st.integers(10, 20000))
        opener, closer = draw(st.sampled_from([(b"[", b"]"), (b"{a: ", b"}"), (b"- ", b"")]))
        return bytes(data) + b"x: " + opener * depth + b"1" + closer * depth + b"\n"
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        op = draw(st.integers(0, 4))
        if op == 0 and data:  # flip one byte
            at = min(at, len(data) - 1)
            data[at] = draw(st.integers(0, 255))
        elif op == 1:  # insert raw bytes
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == 2:  # insert a YAML-ish fragment
            data[at:at] = draw(st.sampled_from(FRAGMENTS))
        elif op == 3:  # delete a slice
            data[at : at + draw(st.integers(1, 64))] = b""
        else:  # repeat a slice, up to about a megabyte
            piece = bytes(data[at : at + draw(st.integers(1, 512))])
            times = draw(st.sampled_from([2, 3, 10, 100, 1000, 10_000]))
            data[at:at] = piece * min(times, (1 << 20) // max(len(piece), 1))
    return bytes(data)


@dataclass
class Tally:
    """What the fuzzer saw."""

    inputs: int = 0
    ok: int = 0
    refused: int = 0
    largest: int = 0
    slowest_s: float = 0.0
    traced: int = 0
    peak_bytes: int = 0
    slow: list[tuple[float, bytes]] = field(default_factory=list)


def run_validate(path: Path) -> tuple[int, str, str]:
    """``guardrail validate PATH`` with stdout and stderr as strict UTF-8 streams."""
    out, err = io.BytesIO(), io.BytesIO()
    stdout = io.TextIOWrapper(out, encoding="utf-8", errors="strict")
    stderr = io.TextIOWrapper(err, encoding="utf-8", errors="strict")
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["validate", str(path)])
        stdout.flush()
        stderr.flush()
    return code, out.getvalue().decode(), err.getvalue().decode()


@pytest.fixture
def seeds_dir(tmp_path: Path) -> Path:
    """The shipped policies, copied so that ``extends:`` between them still resolves."""
    directory = tmp_path / "policies"
    shutil.copytree(ROOT / "policies", directory)
    return directory


def test_fuzzed_policies_never_crash_and_answer_fast(seeds_dir: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GUARDRAIL_FUZZ_UNSET", raising=False)
    seeds = [p.read_bytes() for p in sorted(seeds_dir.glob("*.yaml"))] + SMALL_SEEDS
    target = seeds_dir / "fuzz.yaml"
    tally = Tally()

    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(policy_inputs(seeds))
    def one(content: bytes) -> None:
        target.write_bytes(content)
        # Tracing memory slows Python down five times: trace what could be large (big
        # inputs, aliases) and every tenth input, and time every input untraced.
        traced = len(content) > 1 << 16 or b"*" in content or tally.inputs % 10 == 0
        started = time.perf_counter()
        code, out, err = run_validate(target)
        seconds = time.perf_counter() - started
        if traced:
            tracemalloc.start()
            try:
                run_validate(target)
                tally.traced += 1
                tally.peak_bytes = max(tally.peak_bytes, tracemalloc.get_traced_memory()[1])
            finally:
                tracemalloc.stop()
        assert code in (0, 1), (code, err)
        if code == 1:
            assert f"invalid policy {target}" in err or f"error: {target}" in err, err
            assert len(err) < 20_000, err[:2000]
            tally.refused += 1
        else:
            assert out.startswith(f"ok {target}"), out
            tally.ok += 1
        tally.inputs += 1
        tally.largest = max(tally.largest, len(content))
        tally.slowest_s = max(tally.slowest_s, seconds)
        if seconds > SECONDS_PER_INPUT:
            tally.slow.append((seconds, content[:200]))

    target.write_bytes(SMALL_SEEDS[0])
    run_validate(target)  # the first run imports every command module: not what is measured
    fuzz_started = time.perf_counter()
    one()
    print(f"\npolicy fuzz: {time.perf_counter() - fuzz_started:.1f} s, {tally.inputs} inputs "
          f"({tally.ok} ok, {tally.refused} refused), largest {tally.largest} bytes, slowest "
          f"{tally.slowest_s:.3f} s, peak {tally.peak_bytes / 2**20:.1f} MiB over "
          f"{tally.traced} traced inputs")
    assert tally.inputs >= EXAMPLES
    assert tally.refused > EXAMPLES // 2 and tally.ok > 0  # the mutations do reach the checks
    assert not tally.slow, tally.slow[:3]
    assert tally.peak_bytes < PEAK_BYTES


WORST_CASES = {
    "1 MB flow list": b"name: p\nx: [" + b"1," * 450_000 + b"1]\n",
    "1 MB of keys": b"".join(b"k%d: 1\n" % i for i in range(100_000)),
    "1 MB string": b"name: '" + b"a" * 1_000_000 + b"'\n",
    "1 MB of aliases": b"a: &a [1, 2, 3, 4, 5, 6, 7, 8]\nb: [" + b"*a, " * 250_000 + b"*a]\n",
    "bomb 9^12": alias_bomb(12, 9),
    "1 MB deep": b"x: " + b"[" * 500_000 + b"]" * 500_000,
    "1 MB of comments": b"name: p\n" + b"# comment\n" * 100_000,
}


@pytest.mark.parametrize("case", list(WORST_CASES))
def test_worst_case_inputs_up_to_1_mb_stay_within_time_and_memory(tmp_path: Path,
                                                                   case: str) -> None:
    content = WORST_CASES[case]
    assert len(content) <= 1 << 20
    path = tmp_path / "worst.yaml"
    path.write_bytes(content)
    run_validate(tmp_path / "warm-up.yaml")  # imports, outside what is measured
    started = time.perf_counter()
    code, _, err = run_validate(path)
    seconds = time.perf_counter() - started
    tracemalloc.start()  # a second run for memory: tracing slows Python down several times
    try:
        run_validate(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    print(f"\n{case}: {seconds:.3f} s, peak {peak / 2**20:.1f} MiB, exit {code}")
    assert code == 1 and f"invalid policy {path}" in err and len(err) < 2000
    assert seconds < SECONDS_PER_INPUT and peak < PEAK_BYTES
