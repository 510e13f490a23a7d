"""The demo on a small setting: the paper's pipeline end to end, summary.json in its schema."""

import json

from agree import demo

SMALL = [
    "data.synthetic.train_images=16",
    "data.synthetic.val_images=8",
    "data.synthetic.test_images=12",
    "data.synthetic.vg_images_per_word=1",
    "trainer.enable_progress_bar=false",
]


def test_demo_writes_the_paper_table(tmp_path, capsys):
    out = tmp_path / "demo"
    try:
        demo.main([f"output_dir={out}", f"data.root={tmp_path / 'scenes'}", *SMALL])
    except SystemExit as e:  # a 3-step fine-tuning need not beat zero-shot; the table is still written
        assert "did not show what it should" in str(e)
    rows = json.loads((out / "summary.json").read_text())
    assert [(r["model"], r["losses"], r["stage"]) for r in rows] == [
        ("zero-shot", "none", "raw"),
        ("zero-shot", "none", "egr"),
        ("zero-shot", "none", "tbr"),
        ("zero-shot", "none", "egr_tbr"),
        ("fine-tuned", "agree", "raw"),
        ("fine-tuned", "agree", "tbr"),
    ]
    for row in rows:
        assert set(row) == {
            "model",
            "losses",
            "stage",
            "text_to_image",
            "image_to_text",
            "rsum",
            "swap_accuracy",
        }
        for direction in ("text_to_image", "image_to_text"):
            assert set(row[direction]) == {"r1", "r5", "r10", "mean_recall"}
        recalls = [row[d][k] for d in ("text_to_image", "image_to_text") for k in ("r1", "r5", "r10")]
        assert abs(sum(recalls) - row["rsum"]) < 1e-3
    printed = capsys.readouterr().out
    assert "I2T R@1" in printed and "egr_tbr" in printed and "SWAP" in printed
    assert (out / "fine_tuned" / "report.html").is_file()
    zero_shot = json.loads((out / "zero_shot" / "egr_tbr" / "results.json").read_text())
    assert rows[1]["rsum"] == zero_shot["egr"]["rsum"] and rows[3]["rsum"] == zero_shot["tbr"]["rsum"]
    # the binding probe: the zero-shot model's on its rows, the fine-tuned model's on its own
    tuned = json.loads((out / "fine_tuned" / "results.json").read_text())
    probes = [zero_shot["probe"]["swap_accuracy"]] * 4 + [tuned["probe"]["swap_accuracy"]] * 2
    assert [r["swap_accuracy"] for r in rows] == probes
