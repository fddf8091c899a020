"""``demo --quick`` end to end, offline: real EfficientNet-Lite0 and MiniLM weights, CPU training."""
import json

from click.testing import CliRunner

from multigrounding.cli import main


def test_quick_demo_points_far_better_than_the_center_baseline(tmp_path):
    result = CliRunner().invoke(main, ["demo", "--quick", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    root = tmp_path / "quick"
    metrics = json.loads((root / "report" / "metrics.json").read_text())
    pointing = metrics["pointing"]
    assert pointing["hits"] + pointing["misses"] >= 100
    assert pointing["accuracy"] > pointing["center_baseline"] + 0.25
    assert pointing["accuracy"] > 0.6
    # chance R@1 caption -> image is 1/48; the trained heads retrieve far better
    assert metrics["retrieval"]["text_to_image"]["r1"] > 5 * 100 / 48
    assert len(list((root / "report" / "pictures").glob("*.png"))) == 24
    assert str(root / "report" / "report.md") in result.output

    # a second run resumes every stage and gives the same figures
    again = CliRunner().invoke(main, ["demo", "--quick", "--out", str(tmp_path)])
    assert again.exit_code == 0, again.output
    assert json.loads((root / "report" / "metrics.json").read_text())["pointing"] == pointing
