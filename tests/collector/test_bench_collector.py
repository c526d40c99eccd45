"""benchmarks/collector.py --layers with a few exports: its JSON, not its speed, is checked here
(the bulk and --pace modes take minutes; the README has their figures)."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "collector.py"


def test_the_layers_benchmark_reports_each_layer():
    r = subprocess.run([sys.executable, str(SCRIPT), "--layers", "--quick", "--exports", "40", "--senders", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["benchmark"] == "collector-layers" and out["exports"] == 40
    assert list(out["layers"]) == ["grpcio", "check", "wal"]
    for layer, m in out["layers"].items():
        assert m["errors"] == 0, layer  # every export acknowledged
        assert len(m["cpu_us_per_span"]) == 1 and m["cpu_us_per_span"][0] >= 0
        assert m["context_switches_per_export"][0] > 0
    assert "layers: wal, round 1 of 1" in r.stderr
