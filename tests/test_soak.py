"""The short soak (benchmarks/soak.py) as a test: 80 requests, 16 at a time, 30% cut
short by every kind of cancellation, a few 1k-2k-token prompts; every ending checked,
a sample re-run alone with identical tokens, the engine idle after it. No timing is
asserted (the figures are printed; speed lives in benchmarks/)."""

from __future__ import annotations

import json

from benchmarks import soak


def test_short_soak_every_check_passes(tmp_path, capsys):
    out = tmp_path / "soak.json"
    status = soak.main(["--shape", "tiny", "--requests", "80", "--concurrency", "16", "--cancel", "0.3",
                        "--long-share", "0.05", "--long-len", "2048", "--max-tokens", "48", "--solo", "20",
                        "--deadline", "120", "--seed", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["checks"] and all(report["checks"].values()), printed
    assert status == 0
    # the run really exercised what it claims to: long prompts, every cancellation kind, re-runs
    assert report["long_prompts"] >= 2
    assert all(n > 0 for n in report["cancel_kinds_planned"].values()), report["cancel_kinds_planned"]
    assert report["outcomes"].get("cancelled", 0) > 0 and report["outcomes"].get("completed", 0) > 0
    assert report["solo"]["checked"] > 0
    assert report["engine_at_idle"]["active_requests"] == 0
    assert report["memory"]["closed"]["mlx_active"] <= report["memory"]["idle"]["mlx_active"]
