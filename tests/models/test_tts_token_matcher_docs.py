"""docs/models/tts_token_matcher.md: the worked example runs as printed, and what it
prints is the few-shot claim on the synthetic scenes — 10-shot fine-tuning on the
held-out normals beats the trivial baseline (the support labels' mean) and, with
TTS, beats the same model on its fixed timesteps or is within noise of it."""
from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("diffusers")

DOC = Path(__file__).resolve().parents[2] / "docs" / "models" / "tts_token_matcher.md"

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def worked_example() -> str:
    section = DOC.read_text().split("## Worked example", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_docs_worked_example_runs_and_beats_the_baseline(capsys):
    namespace: dict = {}
    exec(compile(worked_example(), str(DOC), "exec"), namespace)
    out = capsys.readouterr().out
    assert "timesteps after meta-training:" in out and "support mean: mErr" in out
    with_tts, fixed, baseline = (namespace[k]["normal"]["merr"] for k in ("with_tts", "fixed", "baseline"))
    trainer, model = namespace["trainer"], namespace["model"]
    # every run is fine-tuned and scored on the same supports as the baseline
    assert with_tts.supports == fixed.supports == baseline.supports and with_tts.runs == 2
    # beats the trivial baseline, in the mean and in every support draw
    assert with_tts.mean < baseline.mean and fixed.mean < baseline.mean
    assert all(t < b for t, b in zip(with_tts.values, baseline.values)), (with_tts, baseline)
    # TTS: better than the fixed set, or within the spread of the draws
    assert with_tts.mean <= fixed.mean + max(with_tts.std, fixed.std), (with_tts, fixed)
    # the fine-tuning rounds ran and the evaluation restored the meta-trained set
    rounds = [e for key, entries in namespace["tts"].adapt_history.items() for e in entries]
    assert len(rounds) == 2 * 3 and all(e["stage"] == "adapt" and e["task"] == "normal" for e in rounds)
    assert model.timesteps == rounds[0]["before"]
    assert [trainer.adapt_timesteps[("normal", r)] for r in range(2)] == [
        [e for e in rounds if e["run"] == r][-1]["after"] for r in range(2)]
