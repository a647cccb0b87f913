"""What a new user's first mistakes with the router's CLI get: one line naming the fix, nothing left behind.

Found by following docs/hospital-flow.md as a new user (no server, Orthanc or router needed here).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def router(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "router", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=60, check=False)


def test_retry_without_state_names_the_flag_and_creates_nothing(tmp_path: Path) -> None:
    state = tmp_path / "no-state"
    result = router("retry", "6905cc75", "--state-dir", str(state))
    assert result.returncode == 2
    assert f"{state}: no router state here; pass the router's --state-dir" in result.stderr
    assert not state.exists()


def test_retry_of_an_unknown_id_says_which_id_it_wants(tmp_path: Path) -> None:
    from router.state import StateStore

    with StateStore(tmp_path / "router.sqlite"):
        pass
    result = router("retry", "6905cc75", "--state-dir", str(tmp_path))
    assert result.returncode == 1
    assert "6905cc75: no series of" in result.stderr and "starts with it" in result.stderr
    assert "see the IDs in brackets in `python -m router status` (or orthanc_id in `status --json`)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_unknown_seg_encoding_is_refused_before_the_router_starts(tmp_path: Path) -> None:
    result = router("run", "--seg-encoding", "labelmap-rel", "--state-dir", str(tmp_path / "s"))
    assert result.returncode == 2
    assert "invalid choice: 'labelmap-rel'" in result.stderr and "labelmap-rle" in result.stderr
    assert not (tmp_path / "s").exists()
