import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_compose_example_holds_a_conversation():
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "compose.py")], capture_output=True, text=True, timeout=60, check=True
    )
    assert "user: Hello, is the restaurant open tonight?" in done.stdout
    assert "assistant: Good evening! Yes, we are open until eleven tonight." in done.stdout
    assert "voice-to-voice:" in done.stdout


def test_readme_example_matches_the_example_file():
    readme = (ROOT / "README.md").read_text()
    for line in ("async def polite(frame):", 'ScriptedLLM(["Hi! Yes, we are open until eleven tonight."])'):
        assert line in readme
        assert line in (ROOT / "examples" / "compose.py").read_text()
