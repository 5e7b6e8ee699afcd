"""What a hospital integrator's `import trialwatch.publisher` loads: the contract and its validation, no engine.

A fresh interpreter, since this test process has loaded everything already.
"""

from __future__ import annotations

import json
import subprocess
import sys


def test_the_publisher_loads_no_engine_and_no_faust() -> None:
    probe = "import json, sys, trialwatch.publisher; print(json.dumps(sorted(sys.modules)))"
    loaded = json.loads(subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True).stdout)

    assert "trialwatch.event_file" in loaded  # what it validates files with
    assert [m for m in loaded if m.startswith(("trialwatch.engine", "trialwatch.replay", "faust"))] == []
